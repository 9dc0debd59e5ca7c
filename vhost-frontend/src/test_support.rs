//! Helpers shared by this crate's unit tests.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;

/// Tests that create fds or count open fds hold this lock, so a leak check never sees another
/// test's fds come and go.
pub static FD_LOCK: Mutex<()> = Mutex::new(());

/// Entries in /proc/self/fd (the count includes the directory handle used to read it, which is
/// the same on every call).
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A fresh eventfd, the cheapest fd to pass around in tests.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory preconditions; the result is checked before being owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
