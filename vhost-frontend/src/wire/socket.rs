//! Moving messages over a `UnixStream`: header and payload as bytes, fds as `SCM_RIGHTS` ancillary
//! data. Both sides use these two functions.
//!
//! Receiving fds is where C implementations leak: the kernel installs every fd it delivers into our
//! table, whether or not we wanted them. So every fd that arrives is wrapped in an `OwnedFd` at once,
//! before any check, and any error return drops (closes) them.
//!
//! Time bounds: [`send_message_by`] and [`recv_message_by`] take a deadline for the WHOLE message
//! (header, payload and fds). A socket timeout (SO_RCVTIMEO) would bound each `recvmsg` only, so a
//! peer sending one byte just before each timeout could hold one message for hours. With a deadline
//! every call is non-blocking (MSG_DONTWAIT) and the waiting is done in `poll` with what is left.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::{Header, PeerGone, ProtocolError, WireError, HEADER_SIZE, MAX_FDS, MAX_PAYLOAD_SIZE};

/// Sends one message: header and payload in one `sendmsg`, with `fds` attached to its first byte.
/// Uses MSG_NOSIGNAL so a vanished peer gives `PeerGone(BrokenPipe)`, not a SIGPIPE. Blocks as the
/// socket does (its own SO_SNDTIMEO, if any, bounds each call); see [`send_message_by`].
pub fn send_message(
    stream: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), WireError> {
    send_message_by(stream, header, payload, fds, None)
}

/// [`send_message`] that gives `TimedOut` unless the whole message has gone by `deadline`
/// (`None`: no bound of ours).
pub fn send_message_by(
    stream: &UnixStream,
    header: &Header,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> Result<(), WireError> {
    if header.size as usize != payload.len() {
        return Err(WireError::InvalidSend(format!(
            "header.size {} does not match the {}-byte payload",
            header.size,
            payload.len()
        )));
    }
    if payload.len() > MAX_PAYLOAD_SIZE {
        return Err(WireError::InvalidSend(format!(
            "payload of {} bytes exceeds {MAX_PAYLOAD_SIZE}",
            payload.len()
        )));
    }
    if fds.len() > MAX_FDS {
        return Err(WireError::InvalidSend(format!(
            "{} fds exceed the limit of {MAX_FDS}",
            fds.len()
        )));
    }
    let mut bytes = Vec::with_capacity(HEADER_SIZE + payload.len());
    bytes.extend_from_slice(&header.encode());
    bytes.extend_from_slice(payload);

    let raw_fds: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut sent = 0;
    // A stream socket may take fewer bytes than offered; the fds go with the first chunk taken.
    while sent < bytes.len() {
        let attach: &[RawFd] = if sent == 0 { &raw_fds } else { &[] };
        match send_some(stream, &bytes[sent..], attach, deadline)? {
            // A stream socket never accepts 0 of a non-empty buffer without an error; don't spin.
            0 => return Err(WireError::PeerGone(PeerGone::BrokenPipe)),
            n => sent += n,
        }
    }
    Ok(())
}

/// Receives one message: the 12-byte header, then exactly `header.size` payload bytes, and every fd
/// that came with them (at most [`MAX_FDS`]). The header is checked ([`Header::decode`]) before any
/// payload is read, so a hostile size never drives an allocation; the request code is left to the
/// caller, which can then name the message in its error. Blocks as the socket does (its own
/// SO_RCVTIMEO, if any, bounds each call); see [`recv_message_by`].
pub fn recv_message(stream: &UnixStream) -> Result<(Header, Vec<u8>, Vec<OwnedFd>), WireError> {
    recv_message_by(stream, None)
}

/// [`recv_message`] that gives `TimedOut` unless the whole message (header, payload, fds) has
/// arrived by `deadline` (`None`: no bound of ours). Fds received before the deadline passed are
/// closed with the error.
pub fn recv_message_by(
    stream: &UnixStream,
    deadline: Option<Instant>,
) -> Result<(Header, Vec<u8>, Vec<OwnedFd>), WireError> {
    let mut fds = Vec::new();
    let mut header_bytes = [0u8; HEADER_SIZE];
    recv_exact(stream, &mut header_bytes, &mut fds, true, deadline)?;
    let header = Header::decode(&header_bytes)?;
    let mut payload = vec![0u8; header.size as usize];
    recv_exact(stream, &mut payload, &mut fds, false, deadline)?;
    Ok((header, payload, fds))
}

/// Fills `buf` completely, collecting fds along the way. `at_message_start` tells a clean EOF
/// between messages apart from one that cuts a message short.
fn recv_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    at_message_start: bool,
    deadline: Option<Instant>,
) -> Result<(), WireError> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = recv_some(stream, &mut buf[filled..], fds, deadline)?;
        if n == 0 {
            let how = if filled == 0 && at_message_start {
                PeerGone::Closed
            } else {
                PeerGone::ClosedMidMessage
            };
            return Err(WireError::PeerGone(how));
        }
        filled += n;
    }
    Ok(())
}

/// Room for the ancillary data of one message: one SCM_RIGHTS header with MAX_FDS ints.
fn control_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<libc::c_int>()) as libc::c_uint) as usize }
}

/// Waits until `stream` is ready for `events` (POLLIN/POLLOUT) or `deadline` passes (`TimedOut`).
/// Hang-up and error conditions count as ready: the next recvmsg/sendmsg reports them.
fn wait_until(
    stream: &UnixStream,
    events: libc::c_short,
    deadline: Instant,
) -> Result<(), WireError> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WireError::TimedOut);
        }
        // Rounded up, so poll never returns just before the deadline and spins on a 0 ms wait.
        let ms = left.as_micros().div_ceil(1000);
        let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: pfd is one valid pollfd, alive and exclusively borrowed for the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(WireError::Io(err));
        }
        if ready > 0 {
            if pfd.revents & libc::POLLNVAL != 0 {
                return Err(WireError::Io(io::Error::from_raw_os_error(libc::EBADF)));
            }
            return Ok(());
        }
    }
}

/// One `recvmsg` (with a deadline: non-blocking, waiting in [`wait_until`] while there is nothing to
/// read). Every fd received is owned (pushed into `fds`) before anything is checked.
fn recv_some(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    deadline: Option<Instant>,
) -> Result<usize, WireError> {
    // u64 elements give the buffer the alignment cmsghdr needs.
    let mut control = vec![0u64; control_space().div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    let flags = libc::MSG_CMSG_CLOEXEC
        | if deadline.is_some() {
            libc::MSG_DONTWAIT
        } else {
            0
        };

    let n = loop {
        // Reset on every try: the kernel rewrites these.
        msg.msg_controllen = control.len() * size_of::<u64>();
        msg.msg_flags = 0;
        // SAFETY: msg points at `iov` (covering `buf`) and `control`, all alive and exclusively
        // borrowed for the duration of the call; the kernel writes at most their stated lengths.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, flags) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        match (err.kind(), deadline) {
            (io::ErrorKind::Interrupted, _) => {}
            // Nothing to read yet (no fds were delivered): wait for what is left of the deadline.
            (io::ErrorKind::WouldBlock, Some(deadline)) => {
                wait_until(stream, libc::POLLIN, deadline)?
            }
            _ => return Err(map_io_error(err)),
        }
    };

    // Take ownership of every delivered fd first, then judge the message.
    let mut unexpected = None;
    // SAFETY: msg was filled by a successful recvmsg; CMSG_FIRSTHDR/NXTHDR stay within
    // msg_control/msg_controllen as the kernel set them.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and points into `control`, which is suitably aligned.
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let data_len =
                (header.cmsg_len as usize).saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
            let count = data_len / size_of::<libc::c_int>();
            // SAFETY: CMSG_DATA points at data_len bytes inside `control`.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as *const libc::c_int;
            for i in 0..count {
                // SAFETY: i < count keeps the read inside this cmsg's data; the data may be
                // unaligned for c_int, hence read_unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: the kernel just installed `raw` in our fd table for us; nothing else
                // owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        } else {
            unexpected = Some((header.cmsg_level, header.cmsg_type));
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }

    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(ProtocolError::ControlTruncated.into());
    }
    if let Some((level, kind)) = unexpected {
        return Err(ProtocolError::UnexpectedControl { level, kind }.into());
    }
    if fds.len() > MAX_FDS {
        return Err(ProtocolError::TooManyFds { max: MAX_FDS }.into());
    }
    Ok(n)
}

/// One `sendmsg` of `bytes` with `fds` attached (none if empty); with a deadline non-blocking,
/// waiting in [`wait_until`] while the socket buffer is full.
fn send_some(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[RawFd],
    deadline: Option<Instant>,
) -> Result<usize, WireError> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as libc::c_uint) } as usize;
    // Sized from `fds` itself (tests send more than MAX_FDS to play a hostile peer).
    let mut control = vec![0u64; space.div_ceil(size_of::<u64>())];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: msg_control/msg_controllen describe `control`, large enough for one cmsghdr.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        // SAFETY: cmsg points at the start of `control` (non-null as controllen >= one header);
        // CMSG_DATA has room for fd_bytes as sized by CMSG_SPACE above.
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as libc::c_uint) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    let flags = libc::MSG_NOSIGNAL
        | if deadline.is_some() {
            libc::MSG_DONTWAIT
        } else {
            0
        };
    loop {
        // SAFETY: msg points at `iov` (covering `bytes`, only read by the kernel) and `control`,
        // both alive for the call.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        match (err.kind(), deadline) {
            (io::ErrorKind::Interrupted, _) => {}
            // The socket buffer is full (nothing, fds included, was taken): wait for room.
            (io::ErrorKind::WouldBlock, Some(deadline)) => {
                wait_until(stream, libc::POLLOUT, deadline)?
            }
            _ => return Err(map_io_error(err)),
        }
    }
}

/// Sends arbitrary bytes with fds attached, bypassing every check: tests use it to play a hostile peer.
#[cfg(test)]
pub(crate) fn send_raw_for_tests(stream: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let mut sent = send_some(stream, bytes, &raw, None).expect("raw send");
    while sent < bytes.len() {
        sent += send_some(stream, &bytes[sent..], &[], None).expect("raw send");
    }
}

/// Sorts socket errors into "peer went away", "timed out" and everything else.
fn map_io_error(err: io::Error) -> WireError {
    match err.raw_os_error() {
        Some(libc::ECONNRESET) => WireError::PeerGone(PeerGone::Reset),
        Some(libc::EPIPE) => WireError::PeerGone(PeerGone::BrokenPipe),
        Some(libc::EAGAIN) => WireError::TimedOut,
        _ => WireError::Io(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{eventfd, open_fd_count, FD_LOCK};
    use crate::wire::{Request, VringState};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// Writes raw bytes with raw fds, bypassing send_message's checks (a hostile peer).
    fn send_raw(stream: &UnixStream, bytes: &[u8], fds: &[RawFd]) {
        let n = send_some(stream, bytes, fds, None).unwrap();
        assert_eq!(n, bytes.len());
    }

    #[test]
    fn round_trip_with_payload_and_fds() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        {
            let (a, b) = UnixStream::pair().unwrap();
            let payload = VringState { index: 1, num: 256 }.encode();
            let header = Header::for_request(Request::SetVringNum, payload.len(), true);
            send_message(&a, &header, &payload, &[]).unwrap();
            let (h, p, fds) = recv_message(&b).unwrap();
            assert_eq!((h, p, fds.len()), (header, payload, 0));

            // An fd passed across really is the same object: write through the received copy of
            // a pipe's write end, read from the original read end.
            let (mut reader, writer) = std::io::pipe().unwrap();
            let header = Header::for_request(Request::SetVringKick, 8, false);
            send_message(&a, &header, &[0; 8], &[writer.as_fd()]).unwrap();
            drop(writer);
            let (_, _, mut fds) = recv_message(&b).unwrap();
            assert_eq!(fds.len(), 1);
            let mut received = std::fs::File::from(fds.pop().unwrap());
            received.write_all(b"kick").unwrap();
            drop(received);
            let mut text = String::new();
            reader.read_to_string(&mut text).unwrap();
            assert_eq!(text, "kick");

            // Eight fds (a full memory table) is the most one message carries.
            let evs: Vec<OwnedFd> = (0..MAX_FDS).map(|_| eventfd()).collect();
            let borrowed: Vec<BorrowedFd> = evs.iter().map(|f| f.as_fd()).collect();
            send_message(
                &a,
                &Header::for_request(Request::SetMemTable, 0, false),
                &[],
                &borrowed,
            )
            .unwrap();
            assert_eq!(recv_message(&b).unwrap().2.len(), MAX_FDS);
        }
        assert_eq!(open_fd_count(), before, "fds leaked");
    }

    #[test]
    fn send_refuses_what_the_protocol_cannot_carry() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let (a, _b) = UnixStream::pair().unwrap();
        let header = Header::for_request(Request::SetFeatures, 8, false);
        assert!(matches!(
            send_message(&a, &header, &[0; 4], &[]),
            Err(WireError::InvalidSend(_))
        ));
        let big = vec![0; MAX_PAYLOAD_SIZE + 1];
        let header = Header::for_request(Request::SetConfig, big.len(), false);
        assert!(matches!(
            send_message(&a, &header, &big, &[]),
            Err(WireError::InvalidSend(_))
        ));
        let evs: Vec<OwnedFd> = (0..=MAX_FDS).map(|_| eventfd()).collect();
        let borrowed: Vec<BorrowedFd> = evs.iter().map(|f| f.as_fd()).collect();
        let header = Header::for_request(Request::SetMemTable, 0, false);
        assert!(matches!(
            send_message(&a, &header, &[], &borrowed),
            Err(WireError::InvalidSend(_))
        ));
    }

    #[test]
    fn too_many_fds_is_ctrunc_and_nothing_leaks() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        {
            let (a, b) = UnixStream::pair().unwrap();
            let evs: Vec<OwnedFd> = (0..MAX_FDS + 3).map(|_| eventfd()).collect();
            let raw: Vec<RawFd> = evs.iter().map(|f| f.as_raw_fd()).collect();
            let header = Header::for_request(Request::SetMemTable, 0, false).encode();
            send_raw(&a, &header, &raw);
            match recv_message(&b) {
                Err(WireError::Protocol(ProtocolError::ControlTruncated)) => {}
                other => panic!("expected ControlTruncated, got {other:?}"),
            }
        }
        assert_eq!(open_fd_count(), before, "fds leaked after MSG_CTRUNC");
    }

    #[test]
    fn fds_spread_over_header_and_payload_are_counted_together() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        {
            let (a, b) = UnixStream::pair().unwrap();
            let evs: Vec<OwnedFd> = (0..MAX_FDS).map(|_| eventfd()).collect();
            let raw: Vec<RawFd> = evs.iter().map(|f| f.as_raw_fd()).collect();
            // 8 fds with the header, 8 more with the payload: 16 in one message.
            send_raw(
                &a,
                &Header::for_request(Request::SetFeatures, 8, false).encode(),
                &raw,
            );
            send_raw(&a, &[0; 8], &raw);
            match recv_message(&b) {
                Err(WireError::Protocol(ProtocolError::TooManyFds { max: MAX_FDS })) => {}
                other => panic!("expected TooManyFds, got {other:?}"),
            }
        }
        assert_eq!(open_fd_count(), before, "fds leaked");
    }

    #[test]
    fn fds_with_a_bad_header_are_closed() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        {
            let (a, b) = UnixStream::pair().unwrap();
            let ev = eventfd();
            let mut header = Header::for_request(Request::SetVringKick, 8, false);
            header.flags = 0x2; // version 2
            send_raw(&a, &header.encode(), &[ev.as_raw_fd()]);
            assert!(matches!(
                recv_message(&b),
                Err(WireError::Protocol(ProtocolError::BadVersion { .. }))
            ));
            header.flags = 1;
            header.size = 1 << 20;
            send_raw(&a, &header.encode(), &[ev.as_raw_fd()]);
            assert!(matches!(
                recv_message(&b),
                Err(WireError::Protocol(ProtocolError::PayloadTooLarge { .. }))
            ));
        }
        assert_eq!(open_fd_count(), before, "fds leaked");
    }

    #[test]
    fn peer_gone_is_told_apart() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // Clean EOF between messages.
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(matches!(
            recv_message(&b),
            Err(WireError::PeerGone(PeerGone::Closed))
        ));

        // EOF inside the header.
        let (a, b) = UnixStream::pair().unwrap();
        send_raw(&a, &[1, 0, 0], &[]);
        drop(a);
        assert!(matches!(
            recv_message(&b),
            Err(WireError::PeerGone(PeerGone::ClosedMidMessage))
        ));

        // EOF inside the payload.
        let (a, b) = UnixStream::pair().unwrap();
        send_raw(
            &a,
            &Header::for_request(Request::SetFeatures, 8, false).encode(),
            &[],
        );
        send_raw(&a, &[0; 3], &[]);
        drop(a);
        assert!(matches!(
            recv_message(&b),
            Err(WireError::PeerGone(PeerGone::ClosedMidMessage))
        ));

        // Writing to a closed peer: EPIPE, and no SIGPIPE kills the test.
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let header = Header::for_request(Request::GetFeatures, 0, false);
        let err = send_message(&a, &header, &[], &[]).unwrap_err();
        assert!(err.is_peer_gone(), "{err:?}");

        // Reading after the peer closed with data of ours unread: ECONNRESET or EOF, both "gone".
        let (a, b) = UnixStream::pair().unwrap();
        send_message(&a, &header, &[], &[]).unwrap();
        drop(b);
        let err = recv_message(&a).unwrap_err();
        assert!(err.is_peer_gone(), "{err:?}");
    }

    #[test]
    fn silence_is_a_timeout() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let (a, _b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        assert!(matches!(recv_message(&a), Err(WireError::TimedOut)));
    }

    /// A deadline is for the whole message: a header cut short then silence is `TimedOut` (not
    /// "peer gone"), and the fd that came with the first byte is closed with the error.
    #[test]
    fn a_deadline_bounds_the_whole_message_and_closes_its_fds() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        {
            let (a, b) = UnixStream::pair().unwrap();
            let ev = eventfd();
            let header = Header::for_request(Request::SetVringKick, 8, false).encode();
            send_raw(&a, &header[..1], &[ev.as_raw_fd()]);
            let deadline = Instant::now() + Duration::from_millis(50);
            assert!(matches!(
                recv_message_by(&b, Some(deadline)),
                Err(WireError::TimedOut)
            ));
            // Sends too: fill the socket buffer of a peer that never reads.
            let header = Header::for_request(Request::SetVringNum, 8, false);
            let deadline = Instant::now() + Duration::from_millis(50);
            let stuck = (0..1_000_000)
                .map(|_| send_message_by(&a, &header, &[0; 8], &[], Some(deadline)))
                .find(Result::is_err);
            assert!(matches!(stuck, Some(Err(WireError::TimedOut))), "{stuck:?}");
        }
        assert_eq!(open_fd_count(), before, "fds leaked");
    }

    #[test]
    fn partial_writes_are_reassembled() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = UnixStream::pair().unwrap();
        let payload = VringState { index: 7, num: 9 }.encode();
        let header = Header::for_request(Request::SetVringBase, payload.len(), false);
        let mut all = header.to_bytes();
        all.extend_from_slice(&payload);
        for byte in &all {
            send_raw(&a, std::slice::from_ref(byte), &[]);
        }
        let (h, p, _) = recv_message(&b).unwrap();
        assert_eq!(
            (h, VringState::decode(&p).unwrap()),
            (header, VringState { index: 7, num: 9 })
        );
    }
}
