//! Signalling and reading the eventfds a frontend gave us (kick, call, err) without ever blocking,
//! and escaping what a peer controls before it reaches a log line.
//!
//! An fd received over SCM_RIGHTS shares its *open file description* with the sender, and
//! O_NONBLOCK lives on the description: whatever we set there, the peer can clear again. So
//! nothing here depends on the fd's flags:
//!
//! - Reading (the kick fd, draining) uses `preadv2(RWF_NOWAIT)`, non-blocking per call whatever
//!   the flags (eventfds support it since Linux 5.12). Where the kernel refuses it (EOPNOTSUPP) we
//!   fall back to `poll(POLLIN, 0)` then `read`, which has the window described below.
//! - Writing has no per-call non-blocking form for eventfds (`pwritev2(RWF_NOWAIT)` gives
//!   EOPNOTSUPP). A write of 1 blocks only while the counter is exactly 2^64-2, and
//!   `poll(POLLOUT, 0)` says whether it is below that. So [`signal`] polls first and takes a full
//!   counter as "already signalled": whoever waits on it is woken anyway, skipping loses nothing.
//!
//! The residual window, honestly: between our poll and our write the peer may clear O_NONBLOCK
//! and fill the counter to exactly 2^64-2; the write then sleeps until someone reads the fd. We
//! hold the same description, so we can always end that sleep ourselves: [`unwedge`] drains a
//! full counter without blocking, which wakes the sleeping writer. The callers arrange that a
//! thread that may sleep there is never one that must make progress for others (the session
//! thread hands its signals to a helper, see `Notifier::signal_detached`), and that whoever waits
//! for such a thread (stopping a queue, replacing or dropping the fd) unwedges while it waits.

use std::io;
use std::os::fd::AsRawFd;

/// What [`signal`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    /// We added 1 to the counter.
    Sent,
    /// The counter is full: a signal is pending already.
    AlreadyPending,
}

/// Adds 1 to the eventfd's counter unless it is full. Never blocks on a counter that is full
/// when we look (see the module docs for the window between looking and writing).
pub fn signal(fd: &impl AsRawFd) -> io::Result<Signalled> {
    if poll_now(fd, libc::POLLOUT)? & libc::POLLOUT == 0 {
        return Ok(Signalled::AlreadyPending);
    }
    let one = 1u64.to_ne_bytes();
    loop {
        // SAFETY: writes 8 bytes from a live local buffer to an fd we hold open.
        let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n == 8 {
            return Ok(Signalled::Sent);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(Signalled::AlreadyPending),
            _ if n >= 0 => return Err(io::Error::other(format!("short eventfd write ({n})"))),
            _ => return Err(e),
        }
    }
}

/// Reads (and so resets) the counter: `Some(count)`, or `None` when it was 0. Never blocks.
pub fn drain(fd: &impl AsRawFd) -> io::Result<Option<u64>> {
    let mut buf = [0u8; 8];
    loop {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: one iovec over a live local 8-byte buffer; offset -1 is "current position".
        let n = unsafe { libc::preadv2(fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        if n == 8 {
            return Ok(Some(u64::from_ne_bytes(buf)));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            // An older kernel: poll, then read (the fallback has the window of the module docs).
            Some(libc::EOPNOTSUPP) => return drain_after_poll(fd),
            _ if n >= 0 => return Err(io::Error::other(format!("short eventfd read ({n})"))),
            _ => return Err(e),
        }
    }
}

fn drain_after_poll(fd: &impl AsRawFd) -> io::Result<Option<u64>> {
    if poll_now(fd, libc::POLLIN)? & libc::POLLIN == 0 {
        return Ok(None);
    }
    let mut buf = [0u8; 8];
    loop {
        // SAFETY: reads at most 8 bytes into a live local buffer from an fd we hold open.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n == 8 {
            return Ok(Some(u64::from_ne_bytes(buf)));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ if n >= 0 => return Err(io::Error::other(format!("short eventfd read ({n})"))),
            _ => return Err(e),
        }
    }
}

/// Drains the counter if it is full (2^64-2: only a hostile peer gets it there), which wakes a
/// writer of ours sleeping on it. Returns whether it drained. Never blocks.
pub fn unwedge(fd: &impl AsRawFd) -> io::Result<bool> {
    if poll_now(fd, libc::POLLOUT)? & libc::POLLOUT != 0 {
        return Ok(false);
    }
    Ok(drain(fd)?.is_some())
}

/// `poll` with timeout 0: the events of `events` that hold right now (plus error bits).
fn poll_now(fd: &impl AsRawFd, events: libc::c_short) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, alive and exclusively borrowed for the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, 0) };
        if ret >= 0 {
            return Ok(pfd.revents);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A peer-controlled string made safe for one log line: control characters (newlines above
/// all), Unicode line/paragraph separators and bidi overrides are written as `\u{..}` escapes
/// (`\n`, `\r`, `\t` as such), and `\` as `\\`, so an escape cannot be forged either.
pub fn escape_for_log(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out
}

/// [`escape_for_log`] for an OS string (a path from readlink): invalid UTF-8 is shown as U+FFFD.
pub fn escape_os_for_log(s: &std::ffi::OsStr) -> String {
    escape_for_log(&s.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EventFd;

    const FULL: u64 = 0xffff_ffff_ffff_fffe;

    /// A blocking eventfd, as a peer that cleared O_NONBLOCK leaves it.
    fn blocking_eventfd() -> EventFd {
        EventFd::new(0).unwrap()
    }

    /// Runs `f` on a thread and fails loudly if it does not return within 10 s (a hang).
    fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what} blocked"))
    }

    #[test]
    fn signal_on_a_full_blocking_counter_does_not_block() {
        let fd = blocking_eventfd();
        fd.write(FULL).unwrap();
        let dup = fd.try_clone().unwrap();
        let got = bounded("signal", move || signal(&dup).unwrap());
        assert_eq!(got, Signalled::AlreadyPending);
        assert_eq!(fd.read().unwrap(), FULL, "the counter is untouched");
        assert_eq!(signal(&fd).unwrap(), Signalled::Sent);
        assert_eq!(fd.read().unwrap(), 1);
    }

    #[test]
    fn drain_of_an_empty_blocking_counter_does_not_block() {
        let fd = blocking_eventfd();
        let dup = fd.try_clone().unwrap();
        assert_eq!(bounded("drain", move || drain(&dup).unwrap()), None);
        fd.write(3).unwrap();
        assert_eq!(drain(&fd).unwrap(), Some(3));
        assert_eq!(drain(&fd).unwrap(), None);
    }

    #[test]
    fn unwedge_releases_a_writer_sleeping_on_a_full_counter() {
        let fd = blocking_eventfd();
        fd.write(FULL).unwrap();
        // The residual window taken to the end: a plain blocking write on a full counter.
        let writer = fd.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(writer.write(1).is_ok());
        });
        assert!(unwedge(&fd).unwrap(), "a full counter is drained");
        let wrote = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the writer was not released");
        assert!(wrote);
        assert!(!unwedge(&fd).unwrap(), "a counter of 1 is left alone");
        assert_eq!(fd.read().unwrap(), 1);
    }

    #[test]
    fn escaping_keeps_one_line_and_cannot_be_forged() {
        assert_eq!(escape_for_log("plain/path"), "plain/path");
        assert_eq!(
            escape_for_log("/tmp/x\nWARN forged line\r\x1b[1m"),
            "/tmp/x\\nWARN forged line\\r\\u{1b}[1m"
        );
        assert_eq!(escape_for_log("a\\nb"), "a\\\\nb");
        assert_eq!(escape_for_log("x\u{2028}y\u{202e}"), "x\\u{2028}y\\u{202e}");
        assert!(!escape_for_log("\u{85}\u{0}").chars().any(char::is_control));
    }
}
