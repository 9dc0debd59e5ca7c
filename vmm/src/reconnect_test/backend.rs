//! The backend process: `sh -c COMMAND` in its own process group (a kill reaches whatever the
//! shell started), output appended to one log file, and the wait for its listening socket.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::Error;

/// How long a (re)started backend has to listen on its socket.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running backend; dropping it kills its process group and reaps the shell.
pub struct Backend {
    child: Child,
}

impl Backend {
    /// Starts `command` (already substituted) with stdout and stderr appended to `log`, then
    /// waits until `socket` accepts connections.
    pub fn start(command: &str, log: &Path, socket: &Path) -> Result<Backend, Error> {
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| Error::Io(format!("open {}", log.display()), e))
        };
        let child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?)
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Io("start the backend (sh -c)".into(), e))?;
        let mut backend = Backend { child };
        backend.wait_listening(socket, log)?;
        Ok(backend)
    }

    fn wait_listening(&mut self, socket: &Path, log: &Path) -> Result<(), Error> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::BackendExited {
                    status: status.to_string(),
                    last_line: last_line(log),
                });
            }
            if is_listening(socket) {
                return Ok(());
            }
            if start.elapsed() > LISTEN_TIMEOUT {
                return Err(Error::NoSocket {
                    socket: socket.to_path_buf(),
                    secs: LISTEN_TIMEOUT.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL to the whole process group, then reap the shell.
    pub fn kill(self) {
        drop(self);
    }

    fn kill_group(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: a plain syscall; the group is the one our unreaped child leads, so its id
        // cannot have been reused.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
        // Processes of the group that outlive the shell for a moment: wait until none of them
        // runs any more, bounded. Not `kill(-pgid, 0)`: a killed grandchild stays a zombie (in
        // the group) until whoever inherits it reaps it, which in a container may be never, and
        // the wait would then always last its whole bound.
        let start = Instant::now();
        while group_has_live_members(pgid) && start.elapsed() < Duration::from_millis(500) {
            // SAFETY: as above.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// True when /proc/net/unix lists `path` as a listening socket (flag __SO_ACCEPTCON, 0x10000).
/// Looked up rather than connected to, so the backend never sees a client that is not the VMM.
fn is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == want
            && u32::from_str_radix(cols[3], 16).is_ok_and(|flags| flags & 0x1_0000 != 0)
    })
}

/// What the backend's program prints for `--version` (its first line), if it prints one
/// within a few seconds and exits 0: the first word of `command` as the shell parses it,
/// after an `env` and `NAME=value` words.
pub fn version(command: &str) -> Option<String> {
    const SCRIPT: &str = r#"eval "set -- $1"
while [ "$1" = env ] || case "$1" in *=*) true ;; *) false ;; esac; do shift; done
exec "$1" --version"#;
    let mut child = Command::new("sh")
        .args(["-c", SCRIPT, "sh", command])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .ok()?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => break None,
        }
    };
    if !status.is_some_and(|s| s.success()) {
        // SAFETY: a plain syscall on the group our unreaped child leads.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = child.wait();
        return None;
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
    let line = out.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(line.chars().take(200).collect())
}

/// The last non-empty line of `log`, for an error message.
pub fn last_line(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
        .trim()
        .to_string()
}

/// Where the backends' output goes (all starts appended, each start marked).
pub fn log_path(dir: &Path) -> PathBuf {
    dir.join("backend.log")
}

/// Whether a process of group `pgid` is still alive (not a zombie), from /proc/PID/stat:
/// `pid (comm) state ppid pgrp ...`, with `comm` possibly holding spaces or parentheses, so
/// the fields are read after the last ')'.
fn group_has_live_members(pgid: libc::pid_t) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<libc::pid_t>().ok());
        pgrp == Some(pgid) && state != Some("Z")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_first_words_own() {
        let v = version("env A=1 'true' --socket /x {disk}").expect("true --version");
        assert!(v.starts_with("true (GNU coreutils)"), "{v}");
        assert_eq!(version("/nonexistent/backend --socket s"), None);
        // dash has no --version: it fails, and so no version.
        assert_eq!(version("sh -c 'sleep 10'"), None);
    }
}
