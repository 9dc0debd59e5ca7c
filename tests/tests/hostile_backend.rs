//! Hostile vhost-user backends against `vmm run --blk socket=`.
//!
//! Each fake backend is a thread in this test process listening on a unix socket and speaking the
//! wire format by hand (12-byte header: u32 request, u32 flags, u32 payload size; fds as
//! SCM_RIGHTS), written here independently of our own `vhost-frontend` crate so that a shared
//! misreading of the spec cannot hide. It answers the handshake honestly except for one injected
//! fault. Each time vmm must exit 1 with ONE stderr line naming the vhost-user message involved,
//! without a panic and without hanging; and it must close the connection.
//!
//! The control test runs the honest fake to the end, so that every failure below is caused by its
//! fault and not by a broken fake.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration_tests::{
    full_backlog_listener, require_kvm, run_guest_with_blk_socket, Outcome, TempDir,
};

// Request codes (vhost-user spec, "Front-end message types").
const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;

// Header flags: version 1 in bits 0..2, REPLY bit 2, NEED_REPLY bit 3.
const VERSION_1_FLAGS: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// virtio-blk SEG_MAX, BLK_SIZE, FLUSH.
const BLK_FEATURES: u64 = (1 << 2) | (1 << 6) | (1 << 9);
/// Protocol features MQ, REPLY_ACK, CONFIG: what vmm asks for.
const PROTOCOL_FEATURES: u64 = (1 << 0) | (1 << 3) | (1 << 9);

/// vmm waits this long for a reply before giving up on a backend.
const VMM_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The gap between bytes of a [`Fault::Trickle`] reply (a 20-byte reply: 60 s in all).
const TRICKLE_GAP: Duration = Duration::from_secs(3);

/// The one thing the fake does wrong.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Answers everything correctly.
    None,
    /// The reply to this request carries a payload of 4 bytes instead of 8.
    ShortPayload(u32),
    /// The reply to this request carries the code of another request.
    WrongCode(u32),
    /// The reply to this request lacks the REPLY flag.
    NoReplyFlag(u32),
    /// The reply to this request comes with an fd attached.
    ExtraFd(u32),
    /// The ack for this request reports failure (status 1).
    NackStatus(u32),
    /// The backend hangs up on receiving this request.
    CloseOn(u32),
    /// The backend never answers this request (but keeps the connection open).
    SilentOn(u32),
    /// The reply to this request comes one byte every [`TRICKLE_GAP`]: each byte well inside the
    /// reply timeout, the whole reply far outside it.
    Trickle(u32),
    /// GET_FEATURES lacks VIRTIO_F_VERSION_1.
    NoVersion1,
}

/// What the fake saw: the requests in order, and whether the frontend closed the connection.
#[derive(Debug)]
struct Session {
    requests: Vec<u32>,
    frontend_closed: bool,
}

struct Message {
    request: u32,
    flags: u32,
    payload: Vec<u8>,
    _fds: Vec<OwnedFd>,
}

/// sendmsg of `bytes` with `fd` (if any) as SCM_RIGHTS.
fn send_raw(stream: &UnixStream, bytes: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64s keep the control buffer aligned for cmsghdr; 32 bytes hold CMSG_SPACE(4) (24 on x86-64).
    let mut control = [0u64; 4];
    // SAFETY: an all-zero msghdr is a valid empty message; we fill in the fields we use.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is pure arithmetic.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
        // SAFETY: msg_control points at `control`, which is large enough for one cmsghdr with 4
        // bytes of data, so CMSG_FIRSTHDR is non-null and CMSG_DATA lies inside `control`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd);
        }
    }
    // SAFETY: msg points at live buffers (iov -> bytes, control) for the duration of the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short sendmsg"));
    }
    Ok(())
}

/// Receives one message (header, fds, payload); None at EOF between messages.
fn recv(stream: &mut UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; 12];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    };
    // Room for 8 fds (CMSG_SPACE(32) = 48 on x86-64).
    let mut control = [0u64; 8];
    // SAFETY: an all-zero msghdr is a valid empty message; we fill in the fields we use.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg points at live buffers (iov -> header, control) for the duration of the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed cmsghdrs;
    // CMSG_FIRSTHDR/NXTHDR stay inside it, and each SCM_RIGHTS payload holds that many fds, now
    // ours to own (and close).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                let data = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 {
        return Ok(None);
    }
    let got = n as usize;
    if got < header.len() {
        stream.read_exact(&mut header[got..])?;
    }
    let word = |i: usize| u32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
    let size = word(2) as usize;
    assert!(size <= 4096, "the frontend sent a payload of {size} bytes");
    let mut payload = vec![0u8; size];
    stream.read_exact(&mut payload)?;
    Ok(Some(Message {
        request: word(0),
        flags: word(1),
        payload,
        _fds: fds,
    }))
}

fn reply_bytes(request: u32, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + payload.len());
    v.extend_from_slice(&request.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// The honest answer to `m`, if it gets one: GET_* replies, acks when NEED_REPLY is set.
fn honest_reply(m: &Message, fault: Fault) -> Option<Vec<u8>> {
    match m.request {
        GET_FEATURES => {
            let mut f = VHOST_USER_F_PROTOCOL_FEATURES | BLK_FEATURES;
            if fault != Fault::NoVersion1 {
                f |= VIRTIO_F_VERSION_1;
            }
            Some(f.to_le_bytes().to_vec())
        }
        GET_PROTOCOL_FEATURES => Some(PROTOCOL_FEATURES.to_le_bytes().to_vec()),
        GET_QUEUE_NUM => Some(1u64.to_le_bytes().to_vec()),
        GET_CONFIG => {
            // Echo offset, size and flags, then `size` bytes of config space: capacity 32768
            // sectors (16 MiB) first, the rest zero.
            let size = u32::from_le_bytes(m.payload.get(4..8)?.try_into().ok()?) as usize;
            let mut p = m.payload.get(..12)?.to_vec();
            let mut config = vec![0u8; size.min(256)];
            if config.len() >= 8 {
                config[..8].copy_from_slice(&32768u64.to_le_bytes());
            }
            p.extend_from_slice(&config);
            Some(p)
        }
        _ if m.flags & FLAG_NEED_REPLY != 0 => Some(0u64.to_le_bytes().to_vec()),
        _ => None,
    }
}

/// A fake backend listening on `socket`, serving one connection with `fault`.
fn spawn_fake_backend(socket: &Path, fault: Fault) -> JoinHandle<Session> {
    let listener = UnixListener::bind(socket).expect("bind the fake backend's socket");
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        // vmm connects within a second of starting; don't wait for ever if it never does.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("the fake backend got no connection: {e}"),
            }
        };
        stream.set_nonblocking(false).unwrap();
        // Bounded, so a frontend that never hangs up fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(40)))
            .unwrap();
        let mut requests = Vec::new();
        let mut silent = false;
        loop {
            let m = match recv(&mut stream) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    return Session {
                        requests,
                        frontend_closed: true,
                    }
                }
                // ECONNRESET: the frontend closed with our reply unread; it did close.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Session {
                        requests,
                        frontend_closed: true,
                    }
                }
                Err(e) => {
                    panic!("the fake backend could not read a message ({e}); saw {requests:?}")
                }
            };
            requests.push(m.request);
            if silent || fault == Fault::SilentOn(m.request) {
                silent = true;
                continue;
            }
            if fault == Fault::CloseOn(m.request) {
                return Session {
                    requests,
                    frontend_closed: false,
                };
            }
            let Some(mut payload) = honest_reply(&m, fault) else {
                continue;
            };
            let mut code = m.request;
            let mut flags = VERSION_1_FLAGS | FLAG_REPLY;
            let mut fd = None;
            let dev_null = std::fs::File::open("/dev/null").expect("open /dev/null");
            match fault {
                Fault::ShortPayload(r) if r == m.request => payload.truncate(4),
                Fault::WrongCode(r) if r == m.request => code = GET_FEATURES,
                Fault::NoReplyFlag(r) if r == m.request => flags = VERSION_1_FLAGS,
                Fault::ExtraFd(r) if r == m.request => fd = Some(dev_null.as_raw_fd()),
                Fault::NackStatus(r) if r == m.request => payload = 1u64.to_le_bytes().to_vec(),
                _ => {}
            }
            let bytes = reply_bytes(code, flags, &payload);
            if fault == Fault::Trickle(m.request) {
                for byte in &bytes {
                    std::thread::sleep(TRICKLE_GAP);
                    // vmm hung up (as it must, in time): stop; the next read sees the EOF.
                    if send_raw(&stream, std::slice::from_ref(byte), None).is_err() {
                        break;
                    }
                }
                continue;
            }
            // The frontend may already have hung up on an earlier bad reply; reading tells.
            let _ = send_raw(&stream, &bytes, fd);
        }
    })
}

/// Runs `vmm run --blk socket=` against a fake backend with `fault`; `hello` does not touch the
/// device, so everything the fake sees is vmm's handshake at VM construction.
fn run_against(fault: Fault) -> (Outcome, Session) {
    run_against_with(fault, "hello")
}

/// Like [`run_against`] with the guest running `cmdline`.
fn run_against_with(fault: Fault, cmdline: &str) -> (Outcome, Session) {
    require_kvm();
    let dir = TempDir::new("hostile");
    let socket: PathBuf = dir.path("fake.sock");
    let fake = spawn_fake_backend(&socket, fault);
    let o = run_guest_with_blk_socket(&socket, cmdline, Duration::from_secs(40));
    let session = fake.join().expect("fake backend thread");
    (o, session)
}

/// vmm failed cleanly: exit 1, in time, one stderr line with every `needles`, no panic, and the
/// guest never ran.
fn assert_clean_failure(o: &Outcome, needles: &[&str]) {
    assert!(!o.timed_out, "vmm hung: {}", o.describe());
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    let err = o.stderr.trim();
    assert!(!err.contains("panicked"), "{}", o.describe());
    assert_eq!(
        err.lines().count(),
        1,
        "one stderr line expected: {}",
        o.describe()
    );
    for n in needles {
        assert!(err.contains(n), "expected '{n}' in: {err}");
    }
    assert!(
        !o.stdout.contains("Hello from the test guest"),
        "the guest ran despite a broken device: {}",
        o.describe()
    );
}

fn assert_closed_by_vmm(s: &Session) {
    assert!(s.frontend_closed, "vmm did not close the connection: {s:?}");
}

#[test]
fn control_honest_fake_completes_the_handshake() {
    let (o, s) = run_against(Fault::None);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains("Hello from the test guest"),
        "{}",
        o.describe()
    );
    assert!(o.stderr.trim().is_empty(), "{}", o.describe());
    // The whole handshake reached the fake, GET_CONFIG last.
    for r in [
        GET_FEATURES,
        GET_PROTOCOL_FEATURES,
        SET_PROTOCOL_FEATURES,
        SET_OWNER,
        GET_QUEUE_NUM,
        GET_CONFIG,
    ] {
        assert!(s.requests.contains(&r), "request {r} never came: {s:?}");
    }
    assert_eq!(s.requests.last(), Some(&GET_CONFIG), "{s:?}");
    assert_closed_by_vmm(&s);
}

#[test]
fn reply_with_a_wrong_size() {
    let (o, s) = run_against(Fault::ShortPayload(GET_FEATURES));
    assert_clean_failure(
        &o,
        &["GET_FEATURES", "broke the protocol", "4 bytes, expected 8"],
    );
    assert_closed_by_vmm(&s);
    assert_eq!(
        s.requests,
        [GET_FEATURES],
        "vmm went on after a bad reply: {s:?}"
    );
}

#[test]
fn reply_with_a_wrong_request_code() {
    let (o, s) = run_against(Fault::WrongCode(GET_PROTOCOL_FEATURES));
    assert_clean_failure(
        &o,
        &[
            "GET_PROTOCOL_FEATURES",
            "broke the protocol",
            "request code 1",
        ],
    );
    assert_closed_by_vmm(&s);
    assert_eq!(
        s.requests.last(),
        Some(&GET_PROTOCOL_FEATURES),
        "vmm went on after a bad reply: {s:?}"
    );
}

#[test]
fn reply_without_the_reply_flag() {
    let (o, s) = run_against(Fault::NoReplyFlag(GET_QUEUE_NUM));
    assert_clean_failure(
        &o,
        &["GET_QUEUE_NUM", "broke the protocol", "REPLY flag missing"],
    );
    assert_closed_by_vmm(&s);
    assert_eq!(
        s.requests.last(),
        Some(&GET_QUEUE_NUM),
        "vmm went on after a bad reply: {s:?}"
    );
}

#[test]
fn reply_with_an_unexpected_fd() {
    let (o, s) = run_against(Fault::ExtraFd(GET_CONFIG));
    assert_clean_failure(
        &o,
        &[
            "GET_CONFIG",
            "broke the protocol",
            "1 fds attached to the reply, expected 0",
        ],
    );
    assert_closed_by_vmm(&s);
}

#[test]
fn ack_that_reports_failure() {
    let (o, s) = run_against(Fault::NackStatus(SET_OWNER));
    assert_clean_failure(&o, &["SET_OWNER", "refused", "status 1"]);
    assert_closed_by_vmm(&s);
    assert_eq!(
        s.requests.last(),
        Some(&SET_OWNER),
        "vmm went on after a refusal: {s:?}"
    );
}

#[test]
fn backend_closes_mid_handshake() {
    let (o, s) = run_against(Fault::CloseOn(GET_CONFIG));
    assert_clean_failure(&o, &["GET_CONFIG", "went away"]);
    assert_eq!(s.requests.last(), Some(&GET_CONFIG), "{s:?}");
}

#[test]
fn backend_that_never_answers_is_given_up_on() {
    let start = Instant::now();
    let (o, s) = run_against(Fault::SilentOn(GET_FEATURES));
    let took = start.elapsed();
    assert_clean_failure(&o, &["GET_FEATURES", "did not answer"]);
    assert!(
        took >= VMM_REPLY_TIMEOUT && took < VMM_REPLY_TIMEOUT + Duration::from_secs(10),
        "gave up after {took:?}, the reply timeout is {VMM_REPLY_TIMEOUT:?}"
    );
    assert_closed_by_vmm(&s);
}

/// A reply trickled a byte every 3 s: each read is well inside the 10 s reply timeout, the whole
/// reply (60 s) is not. The timeout is for the whole message, so vmm gives up after 10 s, not
/// after an hour on a slower trickle.
#[test]
fn backend_that_trickles_its_reply_is_given_up_on() {
    let (o, s) = run_against(Fault::Trickle(GET_FEATURES));
    assert_clean_failure(&o, &["GET_FEATURES", "did not answer"]);
    assert!(
        !o.stderr.contains("broke the protocol"),
        "a slow backend is not a protocol error: {}",
        o.describe()
    );
    assert_closed_by_vmm(&s);
    assert_eq!(s.requests, [GET_FEATURES], "{s:?}");
}

/// A backend whose listen backlog is full and that never accepts: connect() would block for
/// ever; vmm gives up (CONNECT_TIMEOUT, 5 s) and says which socket did not answer, in one line,
/// exiting 1 well within 30 s.
#[test]
fn backend_that_never_accepts_is_given_up_on() {
    require_kvm();
    let dir = TempDir::new("hostile");
    let socket = dir.path("full.sock");
    let (_listener, _clients) = full_backlog_listener(&socket);
    let o = run_guest_with_blk_socket(&socket, "hello", Duration::from_secs(30));
    assert_clean_failure(
        &o,
        &[
            "blk device 0",
            "cannot connect",
            &socket.display().to_string(),
            "listen backlog is full",
        ],
    );
}

#[test]
fn backend_without_version_1() {
    let (o, s) = run_against(Fault::NoVersion1);
    assert_clean_failure(&o, &["VIRTIO_F_VERSION_1"]);
    assert_closed_by_vmm(&s);
    assert_eq!(
        s.requests,
        [GET_FEATURES],
        "vmm went on with a legacy-only backend: {s:?}"
    );
}

/// Each fact once, and the message named, e.g. "...: vhost-user backend broke the protocol in
/// GET_FEATURES: u64 payload: 4 bytes, expected 8"; a silent backend is not said to have broken
/// the protocol; the VERSION_1 line names the message (GET_FEATURES).
#[test]
fn handshake_errors_state_each_fact_once_and_name_the_message() {
    let cases = [
        (Fault::ShortPayload(GET_FEATURES), "GET_FEATURES"),
        (
            Fault::WrongCode(GET_PROTOCOL_FEATURES),
            "GET_PROTOCOL_FEATURES",
        ),
        (Fault::NoReplyFlag(GET_QUEUE_NUM), "GET_QUEUE_NUM"),
        (Fault::ExtraFd(GET_CONFIG), "GET_CONFIG"),
        (Fault::NackStatus(SET_OWNER), "SET_OWNER"),
        (Fault::CloseOn(GET_CONFIG), "GET_CONFIG"),
        (Fault::NoVersion1, "GET_FEATURES"),
        (Fault::SilentOn(GET_FEATURES), "GET_FEATURES"),
    ];
    let mut problems = Vec::new();
    for (fault, message) in cases {
        let (o, _) = run_against(fault);
        let err = o.stderr.trim();
        if !err.contains(message) {
            problems.push(format!("{fault:?}: does not name {message}: {err}"));
        }
        if err.matches("vhost-user backend").count() > 1 {
            problems.push(format!("{fault:?}: says it twice: {err}"));
        }
        if matches!(fault, Fault::SilentOn(_)) && err.contains("broke the protocol") {
            problems.push(format!(
                "{fault:?}: a silent backend did not break the protocol: {err}"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A fault when the guest driver starts the device (SET_MEM_TABLE refused, after DRIVER_OK):
/// the guest learns of it (DEVICE_NEEDS_RESET) and fails, and vmm says so in one line.
#[test]
fn refusal_at_device_start_fails_the_guest_with_one_line() {
    let (o, s) = run_against_with(
        Fault::NackStatus(SET_MEM_TABLE),
        "blk-write-verify blocks=4",
    );
    assert_eq!(s.requests.last(), Some(&SET_MEM_TABLE), "{s:?}");
    assert!(!o.timed_out, "vmm hung: {}", o.describe());
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    assert!(
        o.stdout.contains("test-guest: blk-write-verify FAIL"),
        "{}",
        o.describe()
    );
    let err = o.stderr.trim();
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escapes in stderr: {}",
        o.describe()
    );
    assert_eq!(
        err.lines().count(),
        1,
        "one stderr line expected: {}",
        o.describe()
    );
    assert!(
        err.contains("SET_MEM_TABLE") && err.contains("refused"),
        "{}",
        o.describe()
    );
}
