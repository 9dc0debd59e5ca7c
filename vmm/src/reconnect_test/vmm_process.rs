//! The VMM under test: this same binary's `run` with the embedded guest, stdout (the guest's
//! serial console) and stderr (the VMM's log, with `--trace-vhost`) in files that are read as
//! they grow, and stdin kept open to tell the guest to stop.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use super::Error;

include!(concat!(env!("OUT_DIR"), "/guest.rs"));

/// Writes the embedded guest to `dir`, or says how to get one.
pub fn write_guest(dir: &Path) -> Result<PathBuf, Error> {
    let elf = GUEST_ELF.ok_or(Error::NoGuest)?;
    let path = dir.join("test-guest");
    std::fs::write(&path, elf).map_err(|e| Error::Io(format!("write {}", path.display()), e))?;
    Ok(path)
}

/// A file another process appends to, read a new chunk at a time; only whole lines are handed
/// out.
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: String,
}

impl LogTail {
    pub fn new(path: PathBuf) -> LogTail {
        LogTail {
            path,
            offset: 0,
            partial: String::new(),
        }
    }

    /// The lines completed since the last call.
    pub fn new_lines(&mut self) -> Vec<String> {
        let mut chunk = Vec::new();
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let _ = f.read_to_end(&mut chunk);
            }
        }
        self.offset += chunk.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&chunk));
        let mut lines: Vec<String> = self.partial.split('\n').map(str::to_string).collect();
        self.partial = lines.pop().unwrap_or_default();
        lines
    }
}

pub struct VmmProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    pub stdout: LogTail,
    pub stderr: LogTail,
}

impl VmmProcess {
    pub fn start(dir: &Path, guest: &Path, socket: &Path, cmdline: &str) -> Result<Self, Error> {
        let exe =
            std::env::current_exe().map_err(|e| Error::Io("find our own binary".into(), e))?;
        let out = dir.join("vmm.stdout");
        let err = dir.join("vmm.stderr");
        let create = |p: &Path| {
            std::fs::File::create(p).map_err(|e| Error::Io(format!("create {}", p.display()), e))
        };
        let mut child = Command::new(exe)
            .env("VMM_LOG", "info")
            .arg("run")
            .arg("--kernel")
            .arg(guest)
            .arg("--cmdline")
            .arg(cmdline)
            .arg("--blk")
            .arg(format!("socket={}", socket.display()))
            .arg("--trace-vhost")
            .stdin(Stdio::piped())
            .stdout(create(&out)?)
            .stderr(create(&err)?)
            .spawn()
            .map_err(|e| Error::Io("start the VMM".into(), e))?;
        let stdin = child.stdin.take();
        Ok(VmmProcess {
            child,
            stdin,
            stdout: LogTail::new(out),
            stderr: LogTail::new(err),
        })
    }

    /// The exit code once it has exited (`Some(None)`: killed by a signal).
    pub fn exited(&mut self) -> Option<Option<i32>> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            Ok(None) => None,
            Err(_) => Some(None),
        }
    }

    /// A byte on the guest's serial port: `stop-on-input` ends the writing after this pass.
    pub fn tell_guest_to_stop(&mut self) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(b"s");
            let _ = stdin.flush();
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
