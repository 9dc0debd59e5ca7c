//! The fds the probe hands a backend: guest RAM and inflight regions (memfds), eventfds for
//! kick/call/err. Each is returned owned, so every error path closes it.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A memfd of `size` bytes; with `sealed` it is sealed against shrinking and growing, as
/// inflight regions must be (QEMU and our backend refuse an unsealed one).
pub fn memfd(name: &CStr, size: u64, sealed: bool) -> io::Result<File> {
    let flags = libc::MFD_CLOEXEC | if sealed { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: a valid NUL-terminated name and integer flags; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    if sealed {
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: F_ADD_SEALS with an integer argument on an fd we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

/// An eventfd holding `counter`; `nonblock` sets O_NONBLOCK on its (shareable) description.
pub fn eventfd(nonblock: bool, counter: u64) -> io::Result<OwnedFd> {
    let flags = libc::EFD_CLOEXEC | if nonblock { libc::EFD_NONBLOCK } else { 0 };
    // SAFETY: integer arguments; the result is checked.
    let fd = unsafe { libc::eventfd(0, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if counter > 0 {
        add_to_eventfd(&fd, counter)?;
    }
    Ok(fd)
}

/// Adds `value` to an eventfd's counter (one 8-byte write).
pub fn add_to_eventfd(fd: &OwnedFd, value: u64) -> io::Result<()> {
    let bytes = value.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an fd we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets or clears O_NONBLOCK on the open file description behind `fd`. A backend that got a
/// dup of it (over SCM_RIGHTS) shares the description, so it sees the change too: the peer
/// behaviour a backend must survive.
pub fn set_nonblock(fd: &OwnedFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl with integer arguments on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_sealed_memfd_cannot_shrink() {
        // Creates fds: not while a test counts the process's fds.
        let _guard = crate::test_support::FD_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let f = memfd(c"probe-test", 8192, true).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 8192);
        assert!(f.set_len(0).is_err());
        let open = memfd(c"probe-test", 4096, false).unwrap();
        open.set_len(0).unwrap();
    }

    #[test]
    fn an_eventfd_holds_its_counter_and_its_flags_can_change() {
        // Creates fds: not while a test counts the process's fds.
        let _guard = crate::test_support::FD_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let fd = eventfd(false, 5).unwrap();
        set_nonblock(&fd, true).unwrap();
        let mut file = File::from(fd);
        let mut b = [0u8; 8];
        file.read_exact(&mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 5);
        // Empty and non-blocking now: a read says so instead of blocking.
        assert_eq!(
            file.read(&mut b).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }
}
