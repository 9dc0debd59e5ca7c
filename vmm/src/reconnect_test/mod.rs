//! `vmm reconnect-test`: does a vhost-user-blk backend survive being SIGKILLed mid-I/O?
//!
//! One command assembles what a backend author would otherwise put together by hand:
//!
//! 1. a private temp directory with a sparse disk (`--disk-size`), the socket path and the
//!    embedded test guest (`vmm/build.rs` puts `resources/guest`'s ELF inside `vmm`);
//! 2. the backend: the user's `--backend` command with `{socket}` and `{disk}` replaced
//!    (shell-quoted), run by `sh -c` in its own process group, output in `backend.log`
//!    ([`backend`], [`command`]);
//! 3. this same binary's `vmm run` with the guest's `blk-write-verify`: pass after pass over every
//!    block, each pass with its own seed (a generation), so a write of an older pass replayed
//!    after a newer one leaves a block the checks name ([`vmm_process`]);
//! 4. the kill loop ([`kill_loop`]): at random moments (reproducible with `--seed`) SIGKILL the
//!    backend's process group, start it again, and wait (bounded) for the VMM's
//!    "vhost-user backend back after N ms" line before the next kill; a recovery that never comes
//!    is a hang. Once the kills are done the guest is told (a byte on its serial port) to stop
//!    after the pass under way, and verifies that pass;
//! 5. the verdicts: the guest's (PASS, or the first wrong block or request it names) and the
//!    host's reading of the disk file ([`pattern`]: every block holds the last pass, nothing else
//!    was written), and the report ([`report`]): whether INFLIGHT_SHMFD was negotiated, kills,
//!    recoveries and their times, requests resubmitted, errors, wrong blocks, hangs.
//!
//! Success (exit 0) means: every kill recovered, the guest passed, and the file holds exactly
//! the last pass.

mod backend;
mod command;
mod kill_loop;
mod pattern;
mod plot;
mod report;
mod vmm_process;

use std::path::{Path, PathBuf};

pub use report::Report;

/// What `vmm reconnect-test` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Shell command line with `{socket}` and `{disk}`.
    pub backend: String,
    /// Kills to deliver (with `duration`, at most this many).
    pub kills: u32,
    /// Kill for this long instead of (or as well as) a count.
    pub duration: Option<std::time::Duration>,
    pub queue_depth: u16,
    pub disk_size: u64,
    pub seed: u64,
    /// Keep the temp directory (logs, disk) and print its path.
    pub keep: bool,
}

/// The most requests the test guest keeps in flight (a 256-entry queue, 3 descriptors each).
pub const MAX_QUEUE_DEPTH: u16 = 85;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the backend command has no {0} placeholder (it must contain both {{socket}} and {{disk}})"
    )]
    MissingPlaceholder(&'static str),
    #[error("--queue-depth {0}: the test guest keeps 1 to {MAX_QUEUE_DEPTH} requests in flight")]
    QueueDepth(u16),
    #[error("--disk-size: {0}")]
    DiskSize(String),
    #[error("this vmm was built without the test guest: run resources/guest/build, then rebuild vmm (cargo build --release -p vmm)")]
    NoGuest,
    #[error("the backend did not listen on {} within {secs} s", socket.display())]
    NoSocket { socket: PathBuf, secs: u64 },
    #[error(
        "the backend exited ({status}) before listening on its socket; its last line: {last_line}"
    )]
    BackendExited { status: String, last_line: String },
    #[error("the VMM exited before the guest found its disk; its last line: {0}")]
    VmmDidNotStart(String),
    #[error("the guest did not find its disk within {0} s")]
    GuestDidNotStart(u64),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// A private directory (0700), removed on drop unless kept.
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    fn new(keep: bool) -> Result<TempDir, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "vmm-reconnect-test.{}.{nanos:08x}",
            std::process::id()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::Io(format!("create {}", path.display()), e))?;
        Ok(TempDir { path, keep })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("reconnect-test: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn create_disk(path: &Path, size: u64) -> Result<(), Error> {
    let io = |e| Error::Io(format!("create the disk {}", path.display()), e);
    let file = std::fs::File::create(path).map_err(io)?;
    file.set_len(size).map_err(io)
}

/// Runs the whole test; `Err` only when it could not be run (bad input, a backend that never
/// came up). A run that found problems is an `Ok` report whose [`Report::passed`] is false.
pub fn run(options: &Options) -> Result<Report, Error> {
    if options.queue_depth == 0 || options.queue_depth > MAX_QUEUE_DEPTH {
        return Err(Error::QueueDepth(options.queue_depth));
    }
    let block = pattern::BLOCK_SIZE as u64;
    if options.disk_size < 16 * block {
        return Err(Error::DiskSize(format!(
            "{} bytes is too small (at least 64K)",
            options.disk_size
        )));
    }
    // Checked before anything is started, so bad input leaves nothing behind.
    let dir = TempDir::new(options.keep)?;
    let socket = dir.path().join("blk.sock");
    let disk = dir.path().join("disk.img");
    let command = command::substitute(&options.backend, &socket, &disk)?;
    let guest = vmm_process::write_guest(dir.path())?;
    create_disk(&disk, options.disk_size)?;
    let blocks = options.disk_size / block;
    let setup = kill_loop::Setup {
        dir: dir.path(),
        command: &command,
        socket: &socket,
        guest: &guest,
        blocks,
        options,
    };
    let version = backend::version(&command);
    let outcome = kill_loop::run(&setup)?;
    let accepted = outcome.accepted_seeds(options.seed);
    let disk_check = pattern::check_disk(&disk, blocks, &accepted)
        .map_err(|e| Error::Io(format!("read back {}", disk.display()), e))?;
    Ok(Report::new(options, version, outcome, disk_check))
}
