//! Helpers shared by the `devices` fuzz targets. Nothing here is under test: it builds the
//! hostile input (memfds, raw socket writes) and checks one property every target shares, that
//! no file descriptor outlives the input that caused it.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

/// Entries in /proc/self/fd. The directory handle used to read it counts once on every call.
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// Remembers how many fds were open when an input started; [`FdLeakCheck::assert_none_leaked`]
/// fails the input if more are open at its end (every harness thread must be joined by then).
pub struct FdLeakCheck {
    before: usize,
}

impl FdLeakCheck {
    pub fn start() -> Self {
        FdLeakCheck {
            before: open_fd_count(),
        }
    }

    pub fn assert_none_leaked(self, what: &str) {
        self.assert_none_leaked_within(what, std::time::Duration::ZERO)
    }

    /// As [`FdLeakCheck::assert_none_leaked`], for fds that may close a moment after the code
    /// under test returned (a detached helper thread of the backend finishing): the count must
    /// come back within `settle`. A real leak never does.
    pub fn assert_none_leaked_within(self, what: &str, settle: std::time::Duration) {
        let start = std::time::Instant::now();
        let mut after = open_fd_count();
        while after > self.before && start.elapsed() < settle {
            std::thread::sleep(std::time::Duration::from_millis(1));
            after = open_fd_count();
        }
        assert!(
            after <= self.before,
            "{what}: {} fd(s) leaked ({} open before, {after} after)",
            after - self.before,
            self.before
        );
    }
}

/// An anonymous in-memory file of `size` bytes (guest RAM or a disk image).
pub fn memfd(name: &CStr, size: u64) -> File {
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create reads nothing else.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("memfd set_len");
    file
}

/// Writes all of `bytes` (no fds), with MSG_NOSIGNAL: a peer that hung up gives `false`, never a
/// SIGPIPE (libFuzzer's C `main` does not ignore SIGPIPE the way a Rust `main` does).
pub fn send_all(stream: &UnixStream, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live buffer of `bytes.len()` bytes, only read by the kernel.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        if n == 0 {
            // A stream socket never takes 0 bytes of a non-empty buffer without an error.
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// The blk backend a session target serves its inputs with: 2 queues of 256 entries on a
/// 64 KiB image, opened once per run as `vmm blk-backend` opens its disk (the file is unlinked
/// at once: the backend holds it open). Each input is one `serve` session on it.
pub fn open_blk_backend(tag: &str) -> devices::blk::BlkBackend {
    let path = std::env::temp_dir().join(format!("{tag}-fuzz-{}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 64 * 1024]).expect("create the disk image");
    let backend = devices::blk::BlkBackend::open(devices::blk::BlkBackendConfig {
        path: path.clone(),
        readonly: false,
        num_queues: 2,
        queue_size: 256,
        direct: false,
        engine: Default::default(),
    })
    .expect("open the backend");
    let _ = std::fs::remove_file(&path);
    backend
}
