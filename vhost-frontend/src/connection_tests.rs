//! The frontend against a fake backend in a thread, over a socketpair: the happy path, and a hostile
//! backend that answers wrongly in every way we could think of. Each hostile case must give a clear
//! error naming the message, never a panic, and leave no fd behind.

use super::*;
use crate::features::{PROTOCOL_CONFIG, PROTOCOL_INFLIGHT_SHMFD, VIRTIO_RING_F_EVENT_IDX};
use crate::test_support::{eventfd, open_fd_count, FD_LOCK};
use crate::wire::{
    recv_message, send_message, FrontendMessage, PeerGone as WirePeerGone, ReplyKind, U64Payload,
};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::thread::JoinHandle;
use std::time::Instant;

const OFFERED: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 0x46;
const OFFERED_PROTOCOL: u64 = 1 << PROTOCOL_MQ
    | 1 << PROTOCOL_REPLY_ACK
    | 1 << PROTOCOL_CONFIG
    | 1 << PROTOCOL_INFLIGHT_SHMFD;

/// A frontend wired to a fake backend running `backend` on the other end of a socketpair.
fn with_backend<T: Send + 'static>(
    backend: impl FnOnce(UnixStream) -> T + Send + 'static,
) -> (Frontend, JoinHandle<T>) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let handle = std::thread::spawn(move || backend(theirs));
    let mut frontend = Frontend::from_stream(ours, "test");
    frontend
        .set_reply_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    (frontend, handle)
}

/// Runs `case` with the fd lock held and checks that it leaves the fd table as it found it.
fn no_fd_leak(case: impl FnOnce()) {
    let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = open_fd_count();
    case();
    assert_eq!(open_fd_count(), before, "fds leaked");
}

fn read_request(stream: &UnixStream) -> (Header, FrontendMessage) {
    let (header, payload, fds) = recv_message(stream).expect("fake backend: receive");
    let message = FrontendMessage::decode(&header, &payload, fds).expect("fake backend: decode");
    (header, message)
}

fn reply(stream: &UnixStream, request: Request, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    send_message(
        stream,
        &Header::for_reply(request, payload.len()),
        payload,
        fds,
    )
    .expect("fake backend: reply");
}

/// Writes any header at all (a hostile peer), with the payload and optional fds, in one write.
fn send_raw(stream: &UnixStream, header: Header, payload: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut bytes = header.to_bytes();
    bytes.extend_from_slice(payload);
    crate::wire::socket::send_raw_for_tests(stream, &bytes, fds);
}

fn memfd() -> OwnedFd {
    // SAFETY: the name is a valid C string; the result is checked before being owned.
    let fd = unsafe { libc::memfd_create(c"inflight".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: fd is fresh and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A memfd of `size` bytes: an inflight buffer as a backend hands it over.
fn memfd_of_size(size: u64) -> OwnedFd {
    let file = std::fs::File::from(memfd());
    file.set_len(size).expect("memfd size");
    file.into()
}

fn expect_protocol(err: FrontendError, message: &str, detail_has: &str) {
    match &err {
        FrontendError::Protocol { message: m, detail } => {
            assert_eq!(*m, message, "{err}");
            assert!(
                detail.contains(detail_has),
                "detail {detail:?} lacks {detail_has:?}"
            );
            assert!(err.to_string().contains(message), "{err}");
        }
        other => panic!("expected a protocol error in {message}, got {other:?}"),
    }
}

/// A well-behaved backend: answers everything, logs what it saw, signals the kick fd it receives.
fn good_backend(stream: UnixStream) -> Vec<String> {
    let mut log = Vec::new();
    loop {
        let (header, payload, fds) = match recv_message(&stream) {
            Ok(m) => m,
            Err(WireError::PeerGone(WirePeerGone::Closed)) => return log,
            Err(e) => panic!("fake backend: {e}"),
        };
        let message =
            FrontendMessage::decode(&header, &payload, fds).expect("fake backend: decode");
        let request = message.request();
        log.push(format!(
            "{}{}",
            request.name(),
            if header.need_reply() { "+ack" } else { "" }
        ));
        // Built as our backend builds its replies: typed, through `BackendReply::encode`.
        let answer = match message {
            FrontendMessage::GetFeatures => Some(BackendReply::Features(OFFERED)),
            FrontendMessage::GetProtocolFeatures => {
                Some(BackendReply::ProtocolFeatures(OFFERED_PROTOCOL))
            }
            FrontendMessage::GetQueueNum => Some(BackendReply::QueueNum(2)),
            FrontendMessage::GetConfig(c) => {
                let data: Vec<u8> = (0..c.size()).map(|i| i as u8).collect();
                Some(BackendReply::Config(ConfigSpace { payload: data, ..c }))
            }
            FrontendMessage::GetVringBase(s) => Some(BackendReply::VringBase(VringState {
                index: s.index,
                num: 42,
            })),
            FrontendMessage::GetInflightFd(d) => {
                let size = u64::from(d.num_queues)
                    * (16 + 16 * u64::from(d.queue_size)).next_multiple_of(64);
                Some(BackendReply::Inflight {
                    description: InflightDescription {
                        mmap_size: size,
                        mmap_offset: 0,
                        ..d
                    },
                    fd: Some(memfd_of_size(size)),
                })
            }
            FrontendMessage::SetVringKick { fd: Some(fd), .. } => {
                std::fs::File::from(fd)
                    .write_all(&1u64.to_ne_bytes())
                    .expect("signal kick");
                None
            }
            FrontendMessage::SetMemTable { table, fds } => {
                assert_eq!(table.regions.len(), fds.len());
                None
            }
            _ => None,
        };
        let answer = answer.or_else(|| {
            (ReplyKind::expected(request, header.need_reply()) == Some(ReplyKind::Ack))
                .then_some(BackendReply::Ack { request, status: 0 })
        });
        if let Some(answer) = answer {
            let (header, payload, fds) = answer.encode();
            send_message(&stream, &header, &payload, &fds).expect("fake backend: reply");
        }
    }
}

#[test]
fn happy_path_handshake_and_device_start() {
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(good_backend);
        frontend.set_trace(true);
        let wanted_protocol = OFFERED_PROTOCOL | 1 << crate::features::PROTOCOL_STATUS;
        let negotiated = frontend
            .negotiate(1 << VIRTIO_RING_F_EVENT_IDX, wanted_protocol)
            .unwrap();
        assert_eq!(
            negotiated,
            Negotiated {
                backend_features: OFFERED,
                virtio_features: 1 << VIRTIO_F_VERSION_1
                    | 1 << VHOST_USER_F_PROTOCOL_FEATURES
                    | 1 << VIRTIO_RING_F_EVENT_IDX,
                protocol_features: OFFERED_PROTOCOL,
                queue_num: Some(2),
            }
        );
        assert_eq!(frontend.protocol_features(), OFFERED_PROTOCOL);

        frontend.set_features(negotiated.virtio_features).unwrap();
        assert_eq!(frontend.get_config(0, 8).unwrap(), [0, 1, 2, 3, 4, 5, 6, 7]);
        let inflight = frontend.get_inflight_fd(1, 128).unwrap().expect("a buffer");
        assert_eq!(inflight.description.mmap_size, 2112);
        frontend
            .set_inflight_fd(&inflight.description, inflight.fd.as_fd())
            .unwrap();
        let ram = memfd();
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 0x10_0000,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
        };
        frontend
            .set_mem_table(&[MemoryRegionFd {
                region,
                fd: ram.as_fd(),
            }])
            .unwrap();
        frontend.set_vring_num(0, 128).unwrap();
        frontend.set_vring_base(0, 0).unwrap();
        let addr = VringAddr {
            index: 0,
            flags: 0,
            desc_user_addr: 0x7f00_0000_0000,
            used_user_addr: 0x7f00_0000_1000,
            avail_user_addr: 0x7f00_0000_0800,
            log_guest_addr: 0,
        };
        frontend.set_vring_addr(&addr).unwrap();
        let kick = eventfd();
        let call = eventfd();
        frontend.set_vring_kick(0, kick.as_fd()).unwrap();
        frontend.set_vring_call(0, call.as_fd()).unwrap();
        frontend.set_vring_enable(0, true).unwrap();
        assert_eq!(frontend.get_vring_base(0).unwrap(), 42);

        // The backend's copy of the kick fd is the same eventfd: its write arrived here.
        let mut counter = [0u8; 8];
        std::fs::File::from(kick).read_exact(&mut counter).unwrap();
        assert_eq!(u64::from_ne_bytes(counter), 1);

        drop(frontend);
        let log = backend.join().expect("backend thread");
        assert_eq!(
            log,
            [
                "GET_FEATURES",
                "GET_PROTOCOL_FEATURES",
                "SET_PROTOCOL_FEATURES", // REPLY_ACK is not in force yet
                "SET_OWNER+ack",
                "GET_QUEUE_NUM",
                "SET_FEATURES+ack",
                "GET_CONFIG",
                "GET_INFLIGHT_FD",
                "SET_INFLIGHT_FD+ack",
                "SET_MEM_TABLE+ack",
                "SET_VRING_NUM+ack",
                "SET_VRING_BASE+ack",
                "SET_VRING_ADDR+ack",
                "SET_VRING_KICK+ack",
                "SET_VRING_CALL+ack",
                "SET_VRING_ENABLE+ack",
                "GET_VRING_BASE",
            ]
        );
        drop(call);
    });
}

/// One hostile answer to GET_FEATURES, and what the frontend must make of it.
struct BadReply {
    name: &'static str,
    answer: fn(&UnixStream),
    check: fn(FrontendError),
}

#[test]
fn hostile_replies_to_a_get_are_named_errors_without_leaks() {
    let cases = [
        BadReply {
            name: "payload too short",
            answer: |s| send_raw(s, Header::for_reply(Request::GetFeatures, 4), &[0; 4], &[]),
            check: |e| expect_protocol(e, "GET_FEATURES", "4 bytes, expected 8"),
        },
        BadReply {
            name: "payload too long",
            answer: |s| {
                send_raw(
                    s,
                    Header::for_reply(Request::GetFeatures, 16),
                    &[0; 16],
                    &[],
                )
            },
            check: |e| expect_protocol(e, "GET_FEATURES", "16 bytes, expected 8"),
        },
        BadReply {
            name: "wrong request code",
            answer: |s| {
                reply(
                    s,
                    Request::GetProtocolFeatures,
                    &U64Payload(OFFERED).encode(),
                    &[],
                )
            },
            check: |e| expect_protocol(e, "GET_FEATURES", "GET_PROTOCOL_FEATURES"),
        },
        BadReply {
            name: "unknown request code",
            answer: |s| {
                send_raw(
                    s,
                    Header {
                        request: 999,
                        flags: 5,
                        size: 8,
                    },
                    &[0; 8],
                    &[],
                )
            },
            check: |e| expect_protocol(e, "GET_FEATURES", "999"),
        },
        BadReply {
            name: "REPLY flag missing",
            answer: |s| {
                send_raw(
                    s,
                    Header {
                        request: 1,
                        flags: 1,
                        size: 8,
                    },
                    &[0; 8],
                    &[],
                )
            },
            check: |e| expect_protocol(e, "GET_FEATURES", "REPLY flag missing"),
        },
        BadReply {
            name: "bad version",
            answer: |s| {
                send_raw(
                    s,
                    Header {
                        request: 1,
                        flags: 0x6,
                        size: 8,
                    },
                    &[0; 8],
                    &[],
                )
            },
            check: |e| expect_protocol(e, "GET_FEATURES", "version"),
        },
        BadReply {
            name: "huge size in header",
            answer: |s| {
                send_raw(
                    s,
                    Header {
                        request: 1,
                        flags: 5,
                        size: u32::MAX,
                    },
                    &[],
                    &[],
                )
            },
            check: |e| expect_protocol(e, "GET_FEATURES", "exceeds"),
        },
        BadReply {
            name: "one extra fd",
            answer: |s| {
                let fd = eventfd();
                reply(
                    s,
                    Request::GetFeatures,
                    &U64Payload(OFFERED).encode(),
                    &[fd.as_fd()],
                )
            },
            check: |e| {
                expect_protocol(e, "GET_FEATURES", "1 fds attached to the reply, expected 0")
            },
        },
        BadReply {
            name: "many fds",
            answer: |s| {
                let fds: Vec<OwnedFd> = (0..12).map(|_| eventfd()).collect();
                let borrowed: Vec<BorrowedFd> = fds.iter().map(|f| f.as_fd()).collect();
                send_raw(
                    s,
                    Header::for_reply(Request::GetFeatures, 8),
                    &[0; 8],
                    &borrowed,
                )
            },
            check: |e| expect_protocol(e, "GET_FEATURES", "MSG_CTRUNC"),
        },
        BadReply {
            name: "closes without answering",
            answer: |_| {},
            check: |e| {
                assert!(
                    matches!(
                        e,
                        FrontendError::PeerGone {
                            during: "GET_FEATURES"
                        }
                    ),
                    "{e:?}"
                )
            },
        },
        BadReply {
            name: "closes mid-reply",
            answer: |s| {
                (&*s)
                    .write_all(&Header::for_reply(Request::GetFeatures, 8).to_bytes()[..7])
                    .unwrap()
            },
            check: |e| {
                assert!(
                    matches!(
                        e,
                        FrontendError::PeerGone {
                            during: "GET_FEATURES"
                        }
                    ),
                    "{e:?}"
                )
            },
        },
        BadReply {
            name: "closes after the header",
            answer: |s| {
                (&*s)
                    .write_all(&Header::for_reply(Request::GetFeatures, 8).to_bytes())
                    .unwrap()
            },
            check: |e| {
                assert!(
                    matches!(
                        e,
                        FrontendError::PeerGone {
                            during: "GET_FEATURES"
                        }
                    ),
                    "{e:?}"
                )
            },
        },
    ];
    for case in cases {
        no_fd_leak(|| {
            let (mut frontend, backend) = with_backend(move |stream| {
                let (_, message) = read_request(&stream);
                assert!(matches!(message, FrontendMessage::GetFeatures));
                (case.answer)(&stream);
            });
            let result = frontend.get_features();
            backend.join().expect("backend thread");
            match result {
                Ok(v) => panic!("{}: accepted, got {v:#x}", case.name),
                Err(e) => {
                    eprintln!("{}: {e}", case.name);
                    (case.check)(e);
                }
            }
            // Whatever went wrong, the connection now refuses to be used.
            assert!(!frontend.is_usable(), "{}", case.name);
            let again = frontend.get_features().unwrap_err();
            assert!(
                again.to_string().contains("GET_FEATURES"),
                "{}: {again}",
                case.name
            );
        });
    }
}

#[test]
fn silence_is_a_timeout_naming_the_message() {
    no_fd_leak(|| {
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let (mut frontend, backend) = with_backend(move |stream| {
            let _ = read_request(&stream);
            let _ = done_rx.recv();
        });
        frontend
            .set_reply_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let err = frontend.get_queue_num().unwrap_err();
        assert!(
            matches!(
                err,
                FrontendError::TimedOut {
                    during: "GET_QUEUE_NUM"
                }
            ),
            "{err:?}"
        );
        done_tx.send(()).unwrap();
        backend.join().unwrap();
    });
}

/// A backend that trickles its reply, one byte well inside the timeout each time: the timeout is for
/// the whole reply, not for each read (with SO_RCVTIMEO this reply took 2 s and was accepted; a
/// byte every 9.9 s held one exchange for hours).
#[test]
fn a_trickled_reply_times_out_as_a_whole() {
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|stream| {
            let _ = read_request(&stream);
            let mut bytes = Header::for_reply(Request::GetFeatures, 8).to_bytes();
            bytes.extend_from_slice(&U64Payload(OFFERED).encode());
            for byte in bytes {
                std::thread::sleep(Duration::from_millis(100));
                // The frontend shuts the socket down when it gives up: then EPIPE ends the trickle.
                if (&stream).write_all(&[byte]).is_err() {
                    return false;
                }
            }
            true
        });
        frontend
            .set_reply_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let err = frontend.get_features().unwrap_err();
        assert!(
            matches!(
                err,
                FrontendError::TimedOut {
                    during: "GET_FEATURES"
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("did not answer GET_FEATURES in time"),
            "{err}"
        );
        assert!(
            !frontend.is_usable(),
            "a half-read reply leaves the stream out of step"
        );
        assert!(
            !backend.join().unwrap(),
            "the whole trickled reply was sent"
        );
    });
}

/// A backend that answers every message just inside the reply timeout cannot stretch a
/// sequence (a device start) past its deadline: the exchange that would cross it times out.
#[test]
fn a_sequence_deadline_bounds_many_timely_replies() {
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|stream| {
            let mut answered = 0u32;
            while recv_message(&stream).is_ok() {
                std::thread::sleep(Duration::from_millis(150));
                let mut bytes = Header::for_reply(Request::GetFeatures, 8).to_bytes();
                bytes.extend_from_slice(&U64Payload(OFFERED).encode());
                if (&stream).write_all(&bytes).is_err() {
                    break;
                }
                answered += 1;
            }
            answered
        });
        frontend
            .set_reply_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        frontend.set_sequence_deadline(Some(Instant::now() + Duration::from_millis(500)));
        let mut ok = 0;
        let err = loop {
            match frontend.get_features() {
                Ok(_) => ok += 1,
                Err(e) => break e,
            }
            assert!(ok < 10, "the sequence deadline was never enforced");
        };
        assert!(matches!(err, FrontendError::TimedOut { .. }), "{err:?}");
        // Each reply alone was well inside the 2 s reply timeout.
        assert!((1..=3).contains(&ok), "{ok} replies before the deadline");
        drop(frontend);
        assert!(backend.join().unwrap() >= ok);
    });
}

/// A unix socket path of its own for each test, in the temp dir.
fn socket_path(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "vhost-frontend-{tag}-{}-{n}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&path);
    path
}

/// A listener that never accepts, its backlog filled (listen(fd, 0), then clients until the kernel
/// refuses one): the next connect has nowhere to go. The clients must be kept alive.
fn full_backlog_listener(path: &Path) -> (std::os::unix::net::UnixListener, Vec<OwnedFd>) {
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
    // SAFETY: plain syscall on a listening socket we own; re-listening just changes the backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let mut clients = Vec::new();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid empty address.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in sun.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *s as libc::c_char;
    }
    loop {
        assert!(clients.len() < 64, "the backlog never filled");
        // SAFETY: plain syscall; the result is checked before being owned.
        let raw = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        assert!(raw >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: fresh fd, owned by nobody else.
        let client = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sun is a valid, NUL-terminated sockaddr_un alive for the call.
        let r = unsafe {
            libc::connect(
                client.as_raw_fd(),
                (&sun as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r != 0 {
            let err = io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "connect: {err}");
            return (listener, clients);
        }
        clients.push(client);
    }
}

/// connect() to a backend whose backlog is full and who never accepts blocked for ever; now it
/// gives up within the bound, as TimedOut, and says why.
#[test]
fn connect_to_a_backend_that_never_accepts_times_out() {
    let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = socket_path("full");
    let (listener, clients) = full_backlog_listener(&path);
    let (tx, rx) = std::sync::mpsc::channel();
    let target = path.clone();
    let connecting = std::thread::spawn(move || {
        let _ = tx.send(connect_with_timeout(&target, Duration::from_millis(300)));
    });
    let outcome = rx.recv_timeout(Duration::from_secs(30));
    // Closing the listener fails a connect still stuck in it (ECONNREFUSED): the thread ends.
    drop(listener);
    drop(clients);
    connecting.join().unwrap();
    let _ = std::fs::remove_file(&path);
    match outcome {
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
            assert!(e.to_string().contains("listen backlog is full"), "{e}")
        }
        Ok(other) => panic!("expected a connect timeout, got {other:?}"),
        Err(_) => panic!("connect blocked for 30 s on a backend that never accepts"),
    }

    // The error the VMM shows names the socket, escaped to one line.
    let err = FrontendError::Connect {
        path: PathBuf::from("/run/x\nforged"),
        source: io::Error::new(io::ErrorKind::TimedOut, "no answer"),
    };
    assert_eq!(
        err.to_string(),
        "cannot connect to vhost-user socket /run/x\\nforged: no answer"
    );
}

/// A listening backend is connected at once, and the stream is plain blocking with no timeouts.
#[test]
fn connect_to_a_listening_backend() {
    let path = socket_path("ok");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let stream = connect_with_timeout(&path, Duration::from_secs(5)).expect("connect");
    assert_eq!(stream.write_timeout().unwrap(), None);
    assert_eq!(stream.read_timeout().unwrap(), None);
    let (_server, _) = listener.accept().expect("accept");
    let _ = std::fs::remove_file(&path);
    let err = connect_with_timeout(&path, Duration::from_secs(5)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    let long = PathBuf::from("/".repeat(200));
    let err = connect_with_timeout(&long, Duration::from_secs(5)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
}

/// A backend that stops reading: without REPLY_ACK nothing waits for a reply, so the requests pile
/// up until the socket buffer is full (a device start with 64 queues sends ~400). The send must
/// then time out too, not block the VMM (a vCPU thread) for ever.
#[test]
fn a_backend_that_stops_reading_times_the_send_out() {
    let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut frontend = Frontend::from_stream(ours, "test");
    frontend
        .set_reply_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        let result = (0..100_000).try_for_each(|_| frontend.set_vring_num(0, 128));
        let _ = done_tx.send(result);
    });
    let outcome = done_rx.recv_timeout(Duration::from_secs(10));
    // Closing the unread end unblocks a stuck send (EPIPE), so the thread can be joined.
    drop(theirs);
    sender.join().unwrap();
    match outcome {
        Ok(Err(FrontendError::TimedOut {
            during: "SET_VRING_NUM",
        })) => {}
        Ok(other) => panic!("expected a send timeout, got {other:?}"),
        Err(_) => panic!("send blocked for 10 s on a backend that does not read"),
    }
}

/// Negotiates REPLY_ACK with the fake backend first, then lets `then` play the backend.
fn with_reply_ack<T: Send + 'static>(
    then: impl FnOnce(&UnixStream) -> T + Send + 'static,
) -> (Frontend, JoinHandle<T>) {
    let (mut frontend, backend) = with_backend(move |stream| {
        let (_, m) = read_request(&stream);
        assert!(matches!(m, FrontendMessage::SetProtocolFeatures(_)));
        then(&stream)
    });
    frontend
        .set_protocol_features(1 << PROTOCOL_REPLY_ACK | 1 << PROTOCOL_INFLIGHT_SHMFD)
        .unwrap();
    (frontend, backend)
}

#[test]
fn reply_ack_failures_are_reported_on_the_message() {
    // A refusal (status != 0) is the backend's answer, not a broken stream: the connection stays usable.
    no_fd_leak(|| {
        let (mut frontend, backend) = with_reply_ack(|s| {
            let (h, _) = read_request(s);
            assert!(h.need_reply());
            reply(s, Request::SetMemTable, &U64Payload(22).encode(), &[]);
            let (h, _) = read_request(s);
            assert!(h.need_reply());
            reply(s, Request::SetVringNum, &U64Payload(0).encode(), &[]);
        });
        let ram = memfd();
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 0x1000,
            userspace_addr: 0x1000,
            mmap_offset: 0,
        };
        let err = frontend
            .set_mem_table(&[MemoryRegionFd {
                region,
                fd: ram.as_fd(),
            }])
            .unwrap_err();
        assert!(
            matches!(
                err,
                FrontendError::BackendFailed {
                    message: "SET_MEM_TABLE",
                    status: 22
                }
            ),
            "{err:?}"
        );
        assert!(frontend.is_usable());
        frontend.set_vring_num(0, 256).unwrap();
        backend.join().unwrap();
    });
    // Ack with the wrong code, with an fd, with a bad size; and no ack at all.
    type Answer = fn(&UnixStream);
    let cases: [(Answer, &str); 4] = [
        (
            |s| reply(s, Request::SetVringNum, &U64Payload(0).encode(), &[]),
            "SET_VRING_NUM",
        ),
        (
            |s| {
                reply(
                    s,
                    Request::SetMemTable,
                    &U64Payload(0).encode(),
                    &[eventfd().as_fd()],
                )
            },
            "expected 0",
        ),
        (
            |s| reply(s, Request::SetMemTable, &[0; 4], &[]),
            "expected 8",
        ),
        (|_| {}, ""),
    ];
    for (answer, detail) in cases {
        no_fd_leak(|| {
            let (mut frontend, backend) = with_reply_ack(move |s| {
                let _ = read_request(s);
                answer(s);
            });
            let ram = memfd();
            let region = MemoryRegion {
                guest_phys_addr: 0,
                memory_size: 0x1000,
                userspace_addr: 0x1000,
                mmap_offset: 0,
            };
            let err = frontend
                .set_mem_table(&[MemoryRegionFd {
                    region,
                    fd: ram.as_fd(),
                }])
                .unwrap_err();
            backend.join().unwrap();
            if detail.is_empty() {
                assert!(
                    matches!(
                        err,
                        FrontendError::PeerGone {
                            during: "SET_MEM_TABLE"
                        }
                    ),
                    "{err:?}"
                );
            } else {
                expect_protocol(err, "SET_MEM_TABLE", detail);
            }
        });
    }
}

#[test]
fn hostile_inflight_replies() {
    type Answer = fn(&UnixStream, InflightDescription);
    let cases: [(&str, Answer, Option<&str>); 14] = [
        (
            "no fd",
            |s, d| {
                reply(
                    s,
                    Request::GetInflightFd,
                    &InflightDescription {
                        mmap_size: 2112,
                        ..d
                    }
                    .encode(),
                    &[],
                )
            },
            Some("0 fds"),
        ),
        (
            "two fds",
            |s, d| {
                let (a, b) = (memfd(), memfd());
                reply(
                    s,
                    Request::GetInflightFd,
                    &InflightDescription {
                        mmap_size: 2112,
                        ..d
                    }
                    .encode(),
                    &[a.as_fd(), b.as_fd()],
                )
            },
            Some("2 fds"),
        ),
        (
            "mmap_size beyond the bound",
            |s, d| {
                let fd = memfd();
                // 1 queue x 128 entries can need at most 4160 bytes (packed layout).
                reply(
                    s,
                    Request::GetInflightFd,
                    &InflightDescription {
                        mmap_size: 4161,
                        ..d
                    }
                    .encode(),
                    &[fd.as_fd()],
                )
            },
            Some("exceeds 4160"),
        ),
        (
            "mmap_size 2 GiB",
            |s, d| {
                let fd = memfd();
                reply(
                    s,
                    Request::GetInflightFd,
                    &InflightDescription {
                        mmap_size: 1 << 31,
                        ..d
                    }
                    .encode(),
                    &[fd.as_fd()],
                )
            },
            Some("exceeds"),
        ),
        (
            "offset wraps",
            |s, d| {
                let fd = memfd();
                let desc = InflightDescription {
                    mmap_size: 2112,
                    mmap_offset: u64::MAX - 100,
                    ..d
                };
                reply(s, Request::GetInflightFd, &desc.encode(), &[fd.as_fd()])
            },
            Some("overflows"),
        ),
        (
            // Mapping it as told would SIGBUS on the first touch past the file's end.
            "fd shorter than offset + size",
            |s, d| {
                let fd = memfd_of_size(2112);
                let desc = InflightDescription {
                    mmap_size: 2112,
                    mmap_offset: 4096,
                    ..d
                };
                reply(s, Request::GetInflightFd, &desc.encode(), &[fd.as_fd()])
            },
            Some("past the end"),
        ),
        (
            "empty memfd",
            |s, d| {
                let fd = memfd();
                let desc = InflightDescription {
                    mmap_size: 2112,
                    ..d
                };
                reply(s, Request::GetInflightFd, &desc.encode(), &[fd.as_fd()])
            },
            Some("past the end"),
        ),
        (
            "not a file",
            |s, d| {
                let fd = eventfd();
                let desc = InflightDescription {
                    mmap_size: 2112,
                    ..d
                };
                reply(s, Request::GetInflightFd, &desc.encode(), &[fd.as_fd()])
            },
            Some("not a regular file"),
        ),
        (
            "20-byte packed struct",
            |s, _| reply(s, Request::GetInflightFd, &[0; 20], &[memfd().as_fd()]),
            Some("expected 24"),
        ),
        (
            "empty buffer, no fd",
            |s, d| {
                reply(
                    s,
                    Request::GetInflightFd,
                    &InflightDescription { mmap_size: 0, ..d }.encode(),
                    &[],
                )
            },
            None,
        ),
        (
            // Tolerated, and the fd is closed (no_fd_leak checks).
            "empty buffer, one fd",
            |s, d| {
                let fd = memfd();
                reply(
                    s,
                    Request::GetInflightFd,
                    &InflightDescription { mmap_size: 0, ..d }.encode(),
                    &[fd.as_fd()],
                )
            },
            None,
        ),
        (
            "empty buffer, two fds",
            |s, d| {
                let (a, b) = (memfd(), memfd());
                reply(
                    s,
                    Request::GetInflightFd,
                    &InflightDescription { mmap_size: 0, ..d }.encode(),
                    &[a.as_fd(), b.as_fd()],
                )
            },
            Some("2 fds with an empty buffer"),
        ),
        (
            "another request's reply",
            |s, d| {
                let fd = memfd();
                reply(
                    s,
                    Request::SetInflightFd,
                    &InflightDescription {
                        mmap_size: 2112,
                        ..d
                    }
                    .encode(),
                    &[fd.as_fd()],
                )
            },
            Some("request code 32 (SET_INFLIGHT_FD)"),
        ),
        (
            "REPLY flag missing",
            |s, d| {
                let fd = memfd();
                let payload = InflightDescription {
                    mmap_size: 2112,
                    ..d
                }
                .encode();
                let header = Header::for_request(Request::GetInflightFd, payload.len(), false);
                send_raw(s, header, &payload, &[fd.as_fd()])
            },
            Some("REPLY flag missing"),
        ),
    ];
    for (name, answer, detail) in cases {
        no_fd_leak(|| {
            let (mut frontend, backend) = with_reply_ack(move |s| {
                let (h, m) = read_request(s);
                assert!(
                    !h.need_reply(),
                    "GET_INFLIGHT_FD replies anyway; NEED_REPLY adds nothing"
                );
                match m {
                    FrontendMessage::GetInflightFd(d) => answer(s, d),
                    other => panic!("{other:?}"),
                }
            });
            let result = frontend.get_inflight_fd(1, 128);
            backend.join().unwrap();
            match (result, detail) {
                (Err(e), Some(detail)) => expect_protocol(e, "GET_INFLIGHT_FD", detail),
                (Ok(None), None) => {}
                (other, _) => panic!("{name}: {other:?}"),
            }
        });
    }
}

#[test]
fn get_inflight_fd_refuses_requests_outside_our_limits() {
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|s| {
            // Nothing may reach the backend.
            assert!(matches!(
                recv_message(&s),
                Err(WireError::PeerGone(WirePeerGone::Closed))
            ));
        });
        for (queues, size) in [(0, 128), (1, 0), (1, MAX_QUEUE_SIZE + 1)] {
            let err = frontend.get_inflight_fd(queues, size).unwrap_err();
            assert!(
                matches!(
                    err,
                    FrontendError::InvalidRequest {
                        message: "GET_INFLIGHT_FD",
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        assert_eq!(max_inflight_mmap_size(1, 128), Some(4160));
        // 32 + 32 * 32768 = 1048608 bytes, rounded up to a multiple of 64: 1048640 per queue.
        assert_eq!(
            max_inflight_mmap_size(u16::MAX, MAX_QUEUE_SIZE),
            Some(65535 * 1_048_640)
        );
        drop(frontend);
        backend.join().unwrap();
    });
}

#[test]
fn get_config_and_vring_base_replies_must_match_the_question() {
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|s| {
            let _ = read_request(&s);
            let c = ConfigSpace {
                offset: 4,
                flags: 0,
                payload: vec![0; 8],
            };
            reply(&s, Request::GetConfig, &c.encode(), &[]);
        });
        expect_protocol(
            frontend.get_config(0, 8).unwrap_err(),
            "GET_CONFIG",
            "offset 0x4",
        );
        backend.join().unwrap();
    });
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|s| {
            let _ = read_request(&s);
            let c = ConfigSpace {
                offset: 0,
                flags: 0,
                payload: vec![0; 4],
            };
            reply(&s, Request::GetConfig, &c.encode(), &[]);
        });
        expect_protocol(
            frontend.get_config(0, 8).unwrap_err(),
            "GET_CONFIG",
            "size 4",
        );
        backend.join().unwrap();
    });
    // libvhost-user's "failed": an empty payload. Still an error that ends the exchange, named so.
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|s| {
            let _ = read_request(&s);
            let (header, payload, fds) = BackendReply::ConfigFailed.encode();
            send_message(&s, &header, &payload, &fds).expect("fake backend: reply");
        });
        expect_protocol(
            frontend.get_config(0, 8).unwrap_err(),
            "GET_CONFIG",
            "how libvhost-user says the read failed",
        );
        assert!(!frontend.is_usable());
        backend.join().unwrap();
    });
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|s| {
            let _ = read_request(&s);
            reply(
                &s,
                Request::GetVringBase,
                &VringState { index: 1, num: 0 }.encode(),
                &[],
            );
        });
        expect_protocol(
            frontend.get_vring_base(0).unwrap_err(),
            "GET_VRING_BASE",
            "queue 1",
        );
        backend.join().unwrap();
    });
}

#[test]
fn backend_closing_mid_handshake_is_peer_gone() {
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|s| {
            let _ = read_request(&s);
            reply(&s, Request::GetFeatures, &U64Payload(OFFERED).encode(), &[]);
            let _ = read_request(&s); // GET_PROTOCOL_FEATURES, then hang up.
        });
        let err = frontend.negotiate(u64::MAX, u64::MAX).unwrap_err();
        assert!(
            matches!(
                err,
                FrontendError::PeerGone {
                    during: "GET_PROTOCOL_FEATURES"
                }
            ),
            "{err:?}"
        );
        assert!(err.is_peer_gone());
        backend.join().unwrap();
        // Later calls say the same without touching the socket.
        let err = frontend.set_owner().unwrap_err();
        assert!(
            matches!(
                err,
                FrontendError::PeerGone {
                    during: "SET_OWNER"
                }
            ),
            "{err:?}"
        );
    });
}

#[test]
fn negotiate_requires_version_1_and_protocol_features() {
    for (offered, missing) in [
        (
            1u64 << VHOST_USER_F_PROTOCOL_FEATURES,
            "VIRTIO_F_VERSION_1 (bit 32) in its GET_FEATURES reply",
        ),
        (
            1u64 << VIRTIO_F_VERSION_1,
            "VHOST_USER_F_PROTOCOL_FEATURES (bit 30) in its GET_FEATURES reply",
        ),
    ] {
        no_fd_leak(|| {
            let (mut frontend, backend) = with_backend(move |s| {
                let _ = read_request(&s);
                reply(&s, Request::GetFeatures, &U64Payload(offered).encode(), &[]);
            });
            let err = frontend.negotiate(u64::MAX, u64::MAX).unwrap_err();
            assert!(
                matches!(err, FrontendError::MissingFeature { feature } if feature == missing),
                "{err:?}"
            );
            backend.join().unwrap();
        });
    }
}

#[test]
fn negotiate_sets_only_offered_protocol_bits() {
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|s| {
            let _ = read_request(&s);
            reply(&s, Request::GetFeatures, &U64Payload(OFFERED).encode(), &[]);
            let _ = read_request(&s);
            reply(
                &s,
                Request::GetProtocolFeatures,
                &U64Payload(1 << PROTOCOL_CONFIG | 1 << 40).encode(),
                &[],
            );
            let (_, set) = read_request(&s);
            let (owner_header, owner) = read_request(&s);
            assert!(
                !owner_header.need_reply(),
                "no REPLY_ACK negotiated, no NEED_REPLY"
            );
            assert!(matches!(owner, FrontendMessage::SetOwner));
            match set {
                FrontendMessage::SetProtocolFeatures(f) => f,
                other => panic!("{other:?}"),
            }
        });
        let negotiated = frontend
            .negotiate(0, 1 << PROTOCOL_CONFIG | 1 << PROTOCOL_MQ)
            .unwrap();
        assert_eq!(negotiated.protocol_features, 1 << PROTOCOL_CONFIG);
        assert_eq!(negotiated.queue_num, None);
        assert_eq!(
            negotiated.virtio_features,
            1 << VIRTIO_F_VERSION_1 | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        );
        assert_eq!(backend.join().unwrap(), 1 << PROTOCOL_CONFIG);
    });
}

#[test]
fn requests_the_protocol_cannot_express_are_refused_before_sending() {
    no_fd_leak(|| {
        let (mut frontend, backend) = with_backend(|s| {
            assert!(matches!(
                recv_message(&s),
                Err(WireError::PeerGone(WirePeerGone::Closed))
            ));
        });
        let ram = memfd();
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 0x1000,
            userspace_addr: 0x1000,
            mmap_offset: 0,
        };
        let nine: Vec<MemoryRegionFd> = (0..9)
            .map(|i| MemoryRegionFd {
                region: MemoryRegion {
                    guest_phys_addr: i * 0x1000,
                    ..region
                },
                fd: ram.as_fd(),
            })
            .collect();
        assert!(matches!(
            frontend.set_mem_table(&nine),
            Err(FrontendError::InvalidRequest { .. })
        ));
        let empty = MemoryRegion {
            memory_size: 0,
            ..region
        };
        assert!(matches!(
            frontend.set_mem_table(&[MemoryRegionFd {
                region: empty,
                fd: ram.as_fd()
            }]),
            Err(FrontendError::InvalidRequest { .. })
        ));
        let kick = eventfd();
        assert!(matches!(
            frontend.set_vring_kick(256, kick.as_fd()),
            Err(FrontendError::InvalidRequest { .. })
        ));
        assert!(matches!(
            frontend.get_config(0, 257),
            Err(FrontendError::InvalidRequest { .. })
        ));
        assert!(matches!(
            frontend.set_config(0, &[0; 300]),
            Err(FrontendError::InvalidRequest { .. })
        ));
        assert!(frontend.is_usable());
        drop(frontend);
        backend.join().unwrap();
    });
}
