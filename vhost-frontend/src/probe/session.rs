//! [`RawSession`]: one connection to the backend under test, with a bound on every wait. A probe
//! must tell apart the four things a backend can do with a message, because they mean different
//! things for its users:
//!
//! | [`Answer`] | what it means |
//! |---|---|
//! | `Reply` | it answered (the checks judge the header, payload and fds) |
//! | `Closed` | it ended the connection: a clean refusal of what it got |
//! | `TimedOut` | silence: it ignored the message, or it is stuck |
//! | `Broken` | it sent bytes that are not a vhost-user message |

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::message::ProbeMessage;
use crate::wire::{recv_message_by, Header, PeerGone, WireError};

/// Most fds one probe message may carry: far above the protocol's 8, to test that limit, and
/// below the kernel's SCM_MAX_FD (253).
pub const MAX_PROBE_FDS: usize = 64;

/// What came back for one message, within the session's bound.
#[derive(Debug)]
pub enum Answer {
    Reply {
        header: Header,
        payload: Vec<u8>,
        fds: Vec<OwnedFd>,
    },
    Closed,
    TimedOut,
    Broken(String),
}

impl Answer {
    /// One line for evidence: `reply GET_FEATURES (8 bytes, 0 fds)`, `closed`, ...
    pub fn describe(&self) -> String {
        match self {
            Answer::Reply {
                header,
                payload,
                fds,
            } => format!(
                "reply to code {} ({} bytes, {} fd(s), flags {:#x})",
                header.request,
                payload.len(),
                fds.len(),
                header.flags
            ),
            Answer::Closed => "connection closed".into(),
            Answer::TimedOut => "no answer".into(),
            Answer::Broken(why) => format!("malformed answer: {why}"),
        }
    }

    /// The u64 of a reply whose payload is exactly 8 bytes.
    pub fn u64(&self) -> Option<u64> {
        match self {
            Answer::Reply { payload, .. } => {
                let bytes: [u8; 8] = payload.as_slice().try_into().ok()?;
                Some(u64::from_le_bytes(bytes))
            }
            _ => None,
        }
    }
}

/// Why a message could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the backend closed the connection")]
    Closed,
    #[error("the backend stopped reading (send timed out)")]
    TimedOut,
    #[error("{0} fds on one message: the probe sends at most {MAX_PROBE_FDS}")]
    TooManyFds(usize),
    #[error("send failed: {0}")]
    Io(io::Error),
}

/// A connection to the backend under test.
pub struct RawSession {
    stream: UnixStream,
    timeout: Duration,
}

impl RawSession {
    /// Connects to `socket`; the connect and every later wait are bounded by `timeout`. (A
    /// plain blocking connect waits for ever when a wedged backend's listen backlog is full.)
    pub fn connect(socket: &Path, timeout: Duration) -> io::Result<RawSession> {
        let stream = connect_within(socket, timeout)?;
        Ok(RawSession::from_stream(stream, timeout))
    }

    /// [`RawSession::connect`], also waiting (up to `timeout`) while the socket is missing or
    /// refuses: a backend between two frontends may have removed and not yet re-created it
    /// (vhost-device-vsock does), or bound it and not yet listened.
    pub fn connect_retrying(socket: &Path, timeout: Duration) -> io::Result<RawSession> {
        let deadline = Instant::now() + timeout;
        loop {
            match RawSession::connect(socket, timeout) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10))
                }
                other => return other,
            }
        }
    }

    /// A session on a connected stream (a socketpair in the fuzz targets).
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> RawSession {
        RawSession { stream, timeout }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Sends `message` (any size, any fd count up to [`MAX_PROBE_FDS`]).
    pub fn send(&self, message: &ProbeMessage) -> Result<(), SendError> {
        self.send_bytes(&message.bytes(), &message.borrowed_fds())
    }

    /// Sends `bytes` with `fds` attached to the first byte.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), SendError> {
        if fds.len() > MAX_PROBE_FDS {
            return Err(SendError::TooManyFds(fds.len()));
        }
        let deadline = Instant::now() + self.timeout;
        let mut sent = 0;
        let mut fds = fds;
        while sent < bytes.len() {
            match send_once(&self.stream, &bytes[sent..], fds) {
                Ok(n) => {
                    sent += n;
                    fds = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(SendError::TimedOut);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)) =>
                {
                    return Err(SendError::Closed)
                }
                Err(e) => return Err(SendError::Io(e)),
            }
        }
        Ok(())
    }

    /// Sends `message` a few bytes at a time with `pause` between the pieces: a peer that
    /// trickles. The fds ride on the first piece.
    pub fn send_trickled(
        &self,
        message: &ProbeMessage,
        piece: usize,
        pause: Duration,
    ) -> Result<(), SendError> {
        let bytes = message.bytes();
        let fds = message.borrowed_fds();
        for (i, chunk) in bytes.chunks(piece.max(1)).enumerate() {
            let attached: &[BorrowedFd<'_>] = if i == 0 { &fds } else { &[] };
            self.send_bytes(chunk, attached)?;
            std::thread::sleep(pause);
        }
        Ok(())
    }

    /// The next message from the backend, within the session's bound.
    pub fn recv(&self) -> Answer {
        self.recv_within(self.timeout)
    }

    /// The next message from the backend within `wait`.
    pub fn recv_within(&self, wait: Duration) -> Answer {
        match recv_message_by(&self.stream, Some(Instant::now() + wait)) {
            Ok((header, payload, fds)) => Answer::Reply {
                header,
                payload,
                fds,
            },
            Err(WireError::PeerGone(PeerGone::Closed))
            | Err(WireError::PeerGone(PeerGone::Reset))
            | Err(WireError::PeerGone(PeerGone::BrokenPipe)) => Answer::Closed,
            Err(WireError::TimedOut) => Answer::TimedOut,
            Err(e) => Answer::Broken(e.to_string()),
        }
    }

    /// Sends `message` and waits for one answer. A send the backend refused by closing is
    /// `Closed`, as is a reply cut short.
    pub fn call(&self, message: &ProbeMessage) -> Answer {
        self.call_within(message, self.timeout)
    }

    /// [`RawSession::call`] with its own bound on the answer.
    pub fn call_within(&self, message: &ProbeMessage, wait: Duration) -> Answer {
        match self.send(message) {
            Ok(()) => self.recv_within(wait),
            Err(SendError::Closed) => Answer::Closed,
            Err(SendError::TimedOut) => Answer::TimedOut,
            Err(e) => Answer::Broken(e.to_string()),
        }
    }

    /// Whether the backend has closed this connection, looking for up to `wait` (data that
    /// arrives meanwhile is not consumed).
    pub fn closed_within(&self, wait: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, alive and exclusively borrowed for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready <= 0 {
            return false;
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0 {
            return true;
        }
        // Readable: EOF only if a peek reads nothing.
        let mut byte = [0u8; 1];
        // SAFETY: peeks at most one byte into a live buffer.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
    }
}

/// A non-blocking connect retried while the backlog is full (EAGAIN), up to `timeout`.
fn connect_within(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let path = socket.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid empty value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if path.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(path) {
        *dst = src as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + path.len() + 1) as libc::socklen_t;
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: integer arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: addr is a valid sockaddr_un of `len` bytes, alive for the call.
        let rc = unsafe { libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len) };
        if rc == 0 {
            let stream = UnixStream::from(owned);
            stream.set_nonblocking(false)?;
            return Ok(stream);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EAGAIN) || Instant::now() >= deadline {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One non-blocking sendmsg of `bytes` with `fds` as SCM_RIGHTS; the bytes sent. The probe's
/// own, not `wire::socket`'s: that one refuses more than the protocol's MAX_FDS, and sending
/// more is what `many-fds` is for.
fn send_once(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let raw: Vec<libc::c_int> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let payload_len = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(payload_len as libc::c_uint) } as usize;
    // u64 elements give the buffer the alignment cmsghdr needs.
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control points at `space` zeroed, aligned bytes, room for one cmsghdr
        // with `payload_len` bytes of data, which is what CMSG_FIRSTHDR/CMSG_DATA address.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload_len as libc::c_uint) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload_len,
            );
        }
    }
    // SAFETY: msg points at `iov` (over `bytes`) and `control`, both alive for the call; the
    // fds named in the control data are borrowed and stay open during it.
    let n = unsafe {
        libc::sendmsg(
            stream.as_raw_fd(),
            &msg,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::fds::eventfd;
    use crate::wire::{recv_message, Request};
    use std::os::fd::AsFd;

    #[test]
    fn the_four_answers_are_told_apart() {
        // Creates fds: not while a test counts the process's fds.
        let _guard = crate::test_support::FD_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (ours, theirs) = UnixStream::pair().unwrap();
        let s = RawSession::from_stream(ours, Duration::from_millis(50));
        assert!(matches!(s.recv(), Answer::TimedOut));
        std::io::Write::write_all(&mut &theirs, &[1, 0, 0, 0, 0xff, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        assert!(matches!(s.recv(), Answer::Broken(_)), "bad flags");
        let reply = Header::for_reply(Request::GetFeatures, 8);
        crate::wire::send_message(&theirs, &reply, &7u64.to_le_bytes(), &[]).unwrap();
        assert_eq!(s.recv().u64(), Some(7));
        drop(theirs);
        assert!(s.closed_within(Duration::from_millis(50)));
        assert!(matches!(s.recv(), Answer::Closed));
    }

    #[test]
    fn more_fds_than_the_protocol_allows_can_be_sent() {
        // Creates fds: not while a test counts the process's fds.
        let _guard = crate::test_support::FD_LOCK
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (ours, theirs) = UnixStream::pair().unwrap();
        let s = RawSession::from_stream(ours, Duration::from_secs(1));
        let fds: Vec<OwnedFd> = (0..12).map(|_| eventfd(true, 0).unwrap()).collect();
        let m = ProbeMessage::bare(Request::GetFeatures, false).with_fds(fds);
        s.send(&m).unwrap();
        // Our own receiver takes at most 8 and reports the cut (MSG_CTRUNC) as an error.
        assert!(recv_message(&theirs).is_err());
        let too_many: Vec<BorrowedFd<'_>> =
            (0..MAX_PROBE_FDS + 1).map(|_| s.stream().as_fd()).collect();
        assert!(matches!(
            s.send_bytes(&[0], &too_many),
            Err(SendError::TooManyFds(_))
        ));
    }
}
