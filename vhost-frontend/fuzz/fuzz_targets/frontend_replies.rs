//! A hostile backend against our `Frontend`: a fake backend thread on the other end of a
//! socketpair answers each request with the next reply built from the fuzz input (a plausible
//! reply with fuzz-chosen values, a message with the request's code but hostile flags, payload and
//! fds, a message with any code, or raw bytes that break the framing), then hangs up, while the
//! frontend runs `negotiate()` and then a fuzz-chosen series of requests (GET_CONFIG,
//! GET_VRING_BASE, GET_INFLIGHT_FD, the SET_* family with and without REPLY_ACK).
//!
//! Properties checked:
//! - no panic, no out-of-bounds access (ASan); every call returns Ok or an error;
//! - what `negotiate` agrees on is consistent: VERSION_1 and PROTOCOL_FEATURES were offered and
//!   are kept, nothing beyond the offer or the wish is agreed, a queue count exactly when MQ was;
//! - replies that are accepted have the asked-for shape (GET_CONFIG: exactly `size` bytes;
//!   GET_INFLIGHT_FD: a non-empty buffer within the bound for its queues, offset + size not
//!   overflowing);
//! - once a call fails for any reason but a refusal (REPLY_ACK status), a request refused before
//!   sending or a missing feature, the connection refuses further use;
//! - no fd outlives the input: the fds a backend attaches are closed on every path.
#![no_main]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost_frontend::connection::MAX_QUEUE_SIZE;
use vhost_frontend::features::{
    bit_mask, PROTOCOL_CONFIG, PROTOCOL_INFLIGHT_SHMFD, PROTOCOL_MQ, PROTOCOL_REPLY_ACK,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};
use vhost_frontend::wire::{
    recv_message, send_message, ConfigSpace, Header, InflightDescription, MemoryRegion, U64Payload,
    VringAddr, VringState, WireError, FLAG_NEED_REPLY, FLAG_REPLY, MAX_CONFIG_SIZE, MAX_FDS,
    MAX_PAYLOAD_SIZE, VERSION,
};
use vhost_frontend::{
    max_inflight_mmap_size, Frontend, FrontendError, MemoryRegionFd, Request, VhostUserFrontend,
};

/// What the VMM's vhost-user device asks for (plus INFLIGHT_SHMFD, which reconnect will use).
const WANTED_PROTOCOL: u64 = bit_mask(PROTOCOL_MQ)
    | bit_mask(PROTOCOL_REPLY_ACK)
    | bit_mask(PROTOCOL_CONFIG)
    | bit_mask(PROTOCOL_INFLIGHT_SHMFD);
const MAX_REPLIES: usize = 32;
const MAX_CALLS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let leaks_before = open_fd_count();
    let mut u = Unstructured::new(data);
    let (Ok(wanted_virtio), Ok(wanted_protocol)) = (u.arbitrary::<u64>(), wanted_protocol(&mut u))
    else {
        return;
    };
    let mut replies = Vec::new();
    let _ = build_replies(&mut u, &mut replies);
    let mut calls = Vec::new();
    let _ = build_calls(&mut u, &mut calls);

    let (frontend_end, backend_end) = UnixStream::pair().expect("socketpair");
    let backend = std::thread::spawn(move || fake_backend(backend_end, replies));

    let mut frontend = Frontend::from_stream(frontend_end, "fuzz");
    // As `vmm run` does: every exchange has one deadline, so the receive path fuzzed is the one
    // production runs (non-blocking recvmsg + poll for the whole message, fds included).
    frontend
        .set_reply_timeout(Some(std::time::Duration::from_secs(2)))
        .expect("set_reply_timeout");
    let negotiated = frontend.negotiate(wanted_virtio, wanted_protocol);
    note_failure(&frontend, &negotiated);
    if let Ok(n) = &negotiated {
        let required = bit_mask(VIRTIO_F_VERSION_1) | bit_mask(VHOST_USER_F_PROTOCOL_FEATURES);
        assert_eq!(n.backend_features & required, required, "{n:?}");
        assert_eq!(n.virtio_features & required, required, "{n:?}");
        assert_eq!(n.virtio_features & !n.backend_features, 0, "{n:?}");
        assert_eq!(n.virtio_features & !(wanted_virtio | required), 0, "{n:?}");
        assert_eq!(n.protocol_features & !wanted_protocol, 0, "{n:?}");
        assert_eq!(
            n.queue_num.is_some(),
            n.protocol_features & bit_mask(PROTOCOL_MQ) != 0
        );
        assert_eq!(frontend.protocol_features(), n.protocol_features);
    }
    let memory = memfd(4096);
    let eventfd = eventfd();
    for call in calls {
        call.run(&mut frontend, &memory, &eventfd);
    }

    drop(frontend); // The backend thread sees EOF and ends.
    backend.join().expect("fake backend thread");
    drop((memory, eventfd));
    let after = open_fd_count();
    assert!(
        after <= leaks_before,
        "{} fd(s) leaked",
        after - leaks_before
    );
});

/// Mostly what the VMM asks for; sometimes any set.
fn wanted_protocol(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(if u.ratio(3, 4)? {
        WANTED_PROTOCOL
    } else {
        u.arbitrary()?
    })
}

/// How the fake backend answers the next request it reads.
enum Reply {
    /// What a working backend would send (nothing where no reply is due), with `value` where the
    /// reply carries a number: features (VERSION_1 and PROTOCOL_FEATURES always set), protocol
    /// features, queue count, ring base, inflight buffer size; acks say success.
    Plausible(u64),
    /// A message with the request's own code and fuzz-chosen flags, payload and fds: the reply
    /// gets past the code check and the rest is hostile.
    Echo {
        flags: u32,
        payload: Vec<u8>,
        fds: usize,
    },
    /// A message with any code (size matching the payload).
    Framed {
        header: Header,
        payload: Vec<u8>,
        fds: usize,
    },
    /// Bytes that may cut or desynchronise the stream. After one, the backend stops reading
    /// requests: it sends all the rest blindly and hangs up (the frontend may be waiting for the
    /// rest of a message that never comes; only the hang-up can end that wait).
    Raw(Vec<u8>),
}

fn build_replies(u: &mut Unstructured<'_>, replies: &mut Vec<Reply>) -> Result<()> {
    while !u.is_empty() && replies.len() < MAX_REPLIES {
        let kind = u.int_in_range(0..=15)?;
        if kind < 8 {
            replies.push(Reply::Plausible(u.arbitrary()?));
            continue;
        }
        if kind == 8 {
            let len = u.int_in_range(0..=48)?;
            replies.push(Reply::Raw(u.bytes(len)?.to_vec()));
            continue;
        }
        let request = if u.ratio(15, 16)? {
            u.choose(Request::ALL)?.code()
        } else {
            u.arbitrary()?
        };
        let flags = match u.int_in_range(0..=7)? {
            0 => u.arbitrary()?,
            1 => VERSION,
            2 => VERSION | FLAG_REPLY | FLAG_NEED_REPLY,
            _ => VERSION | FLAG_REPLY,
        };
        let payload = payload(u)?;
        let fds = match u.int_in_range(0..=15)? {
            0 => u.int_in_range(2..=MAX_FDS + 1)?,
            1..=3 => 1,
            _ => 0,
        };
        replies.push(if kind < 13 {
            Reply::Echo {
                flags,
                payload,
                fds,
            }
        } else {
            Reply::Framed {
                header: Header {
                    request,
                    flags,
                    size: payload.len() as u32,
                },
                payload,
                fds,
            }
        });
    }
    Ok(())
}

/// Shaped like a reply payload (u64, vring state, config space, inflight description), every
/// field from the input; or raw bytes of any length the wire allows.
fn payload(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match u.int_in_range(0..=5)? {
        0 => {}
        1 => out.extend_from_slice(&u.arbitrary::<u64>()?.to_le_bytes()),
        2 => {
            // struct vhost_vring_state: mostly for queue 0..3.
            out.extend_from_slice(&u.int_in_range(0..=3u32)?.to_le_bytes());
            out.extend_from_slice(&u.arbitrary::<u32>()?.to_le_bytes());
        }
        3 => {
            // struct vhost_user_config: offset, size, flags, then size bytes.
            let size = u.int_in_range(0..=MAX_CONFIG_SIZE as u32 + 4)?;
            out.extend_from_slice(&u.int_in_range(0..=64u32)?.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&u.arbitrary::<u32>()?.to_le_bytes());
            out.extend_from_slice(u.bytes(size as usize)?);
        }
        4 => {
            // The inflight description: mmap_size, mmap_offset, num_queues, queue_size, padding.
            let size: u64 = if u.arbitrary()? {
                u.arbitrary()?
            } else {
                u.int_in_range(0..=0x4000)?
            };
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&u.arbitrary::<u64>()?.to_le_bytes());
            out.extend_from_slice(u.bytes(8)?);
        }
        _ => {
            let len = u.int_in_range(0..=MAX_PAYLOAD_SIZE)?;
            out.extend_from_slice(u.bytes(len)?);
        }
    }
    Ok(out)
}

/// Answers each request the frontend sends with the next scripted reply. Every reply but `Raw` is
/// a whole message (its header's size is its payload's), so the frontend never waits for bytes
/// that do not come while this thread waits for a request. When the script ends (or a `Raw`
/// reply broke the framing: then the rest goes out blindly) it hangs up its sending side and
/// reads until the frontend closes, so the frontend never blocks on a full socket.
fn fake_backend(stream: UnixStream, replies: Vec<Reply>) {
    let mut replies = replies.into_iter();
    let mut in_step = true;
    while in_step {
        let Ok((header, payload, _fds)) = recv_message(&stream) else {
            break; // The frontend closed or sent garbage; fds that came are closed here.
        };
        let Some(reply) = replies.next() else { break };
        let sent = match reply {
            Reply::Plausible(value) => match plausible_reply(&header, &payload, value) {
                Some((reply, payload, fds)) => send(&stream, &reply, &payload, fds),
                None => true,
            },
            Reply::Echo {
                flags,
                payload,
                fds,
            } => {
                let reply = Header {
                    request: header.request,
                    flags,
                    size: payload.len() as u32,
                };
                send(&stream, &reply, &payload, fds)
            }
            Reply::Framed {
                header,
                payload,
                fds,
            } => send(&stream, &header, &payload, fds),
            Reply::Raw(bytes) => {
                in_step = false;
                send_raw(&stream, &bytes)
            }
        };
        if !sent {
            break;
        }
    }
    if !in_step {
        for reply in replies {
            let sent = match reply {
                Reply::Plausible(_) => true,
                Reply::Echo { .. } => true,
                Reply::Framed {
                    header,
                    payload,
                    fds,
                } => send(&stream, &header, &payload, fds),
                Reply::Raw(bytes) => send_raw(&stream, &bytes),
            };
            if !sent {
                break;
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    while recv_message(&stream).is_ok() {}
    // Whatever is left unread (after a framing error) goes when the socket closes.
}

/// The reply a working backend gives to `request`, if one is due.
fn plausible_reply(
    request: &Header,
    payload: &[u8],
    value: u64,
) -> Option<(Header, Vec<u8>, usize)> {
    let kind = Request::from_code(request.request).ok()?;
    let reply = |payload: Vec<u8>, fds| {
        Some((
            Header {
                request: request.request,
                flags: VERSION | FLAG_REPLY,
                size: payload.len() as u32,
            },
            payload,
            fds,
        ))
    };
    let u64_reply = |v: u64| reply(U64Payload(v).encode(), 0);
    match kind {
        Request::GetFeatures => {
            let required = bit_mask(VIRTIO_F_VERSION_1) | bit_mask(VHOST_USER_F_PROTOCOL_FEATURES);
            u64_reply(value | required)
        }
        Request::GetProtocolFeatures | Request::GetMaxMemSlots | Request::GetStatus => {
            u64_reply(value)
        }
        Request::GetQueueNum => u64_reply(value % 9),
        Request::GetVringBase => {
            let index = VringState::decode(payload).ok()?.index;
            reply(
                VringState {
                    index,
                    num: value as u32,
                }
                .encode(),
                0,
            )
        }
        Request::GetConfig => {
            let asked = ConfigSpace::decode(payload).ok()?;
            reply(
                ConfigSpace {
                    payload: vec![value as u8; asked.payload.len()],
                    ..asked
                }
                .encode(),
                0,
            )
        }
        Request::GetInflightFd => {
            let asked = InflightDescription::decode(payload).ok()?;
            let bound = max_inflight_mmap_size(asked.num_queues, asked.queue_size)?;
            let mmap_size = value % (bound + 1);
            reply(
                InflightDescription {
                    mmap_size,
                    mmap_offset: 0,
                    ..asked
                }
                .encode(),
                usize::from(mmap_size != 0),
            )
        }
        _ if request.need_reply() => u64_reply(0),
        _ => None,
    }
}

/// Sends one message with `fds` fresh eventfds attached (at most MAX_FDS: send_message refuses
/// more). False once the frontend hung up.
fn send(stream: &UnixStream, header: &Header, payload: &[u8], fds: usize) -> bool {
    let owned: Vec<OwnedFd> = (0..fds.min(MAX_FDS)).map(|_| eventfd()).collect();
    let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(|fd| fd.as_fd()).collect();
    match send_message(stream, header, payload, &borrowed) {
        Ok(()) => true,
        Err(WireError::InvalidSend(why)) => panic!("harness built an unsendable message: {why}"),
        Err(_) => false,
    }
}

fn send_raw(stream: &UnixStream, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is a live buffer of its length, only read. MSG_NOSIGNAL: libFuzzer's C
        // main does not ignore SIGPIPE.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// A request the frontend makes after the handshake.
enum Call {
    GetConfig { offset: u32, size: u32 },
    GetVringBase(u32),
    GetInflightFd { queues: u16, size: u16 },
    GetQueueNum,
    SetFeatures(u64),
    SetVringNum(u32, u32),
    SetVringAddr(u32),
    SetMemTable,
    SetVringKick(u32),
}

fn build_calls(u: &mut Unstructured<'_>, calls: &mut Vec<Call>) -> Result<()> {
    while !u.is_empty() && calls.len() < MAX_CALLS {
        calls.push(match u.int_in_range(0..=8)? {
            0 => Call::GetConfig {
                offset: u.int_in_range(0..=64)?,
                size: u.int_in_range(0..=MAX_CONFIG_SIZE as u32 + 1)?,
            },
            1 => Call::GetVringBase(u.int_in_range(0..=3)?),
            2 => Call::GetInflightFd {
                queues: u.arbitrary()?,
                size: u.arbitrary()?,
            },
            3 => Call::GetQueueNum,
            4 => Call::SetFeatures(u.arbitrary()?),
            5 => Call::SetVringNum(u.int_in_range(0..=3)?, u.arbitrary()?),
            6 => Call::SetVringAddr(u.int_in_range(0..=3)?),
            7 => Call::SetMemTable,
            _ => Call::SetVringKick(u.int_in_range(0..=300)?),
        });
    }
    Ok(())
}

impl Call {
    fn run(self, frontend: &mut Frontend, memory: &OwnedFd, eventfd: &OwnedFd) {
        match self {
            Call::GetConfig { offset, size } => {
                let result = frontend.get_config(offset, size);
                if let Ok(bytes) = &result {
                    assert_eq!(bytes.len(), size as usize, "GET_CONFIG reply length");
                }
                note_failure(frontend, &result);
            }
            Call::GetVringBase(index) => {
                let result = frontend.get_vring_base(index);
                note_failure(frontend, &result);
            }
            Call::GetInflightFd { queues, size } => {
                let result = frontend.get_inflight_fd(queues, size);
                if let Ok(Some(buffer)) = &result {
                    let d = &buffer.description;
                    assert!(queues > 0 && size > 0 && size <= MAX_QUEUE_SIZE);
                    assert_eq!((d.num_queues, d.queue_size), (queues, size));
                    assert!(d.mmap_size > 0);
                    let bound = max_inflight_mmap_size(queues, size).expect("bound");
                    assert!(d.mmap_size <= bound, "{d:?} exceeds {bound}");
                    assert!(d.mmap_offset.checked_add(d.mmap_size).is_some(), "{d:?}");
                }
                note_failure(frontend, &result);
            }
            Call::GetQueueNum => {
                let result = frontend.get_queue_num();
                note_failure(frontend, &result);
            }
            Call::SetFeatures(features) => {
                let result = frontend.set_features(features);
                note_failure(frontend, &result);
            }
            Call::SetVringNum(index, num) => {
                let result = frontend.set_vring_num(index, num);
                note_failure(frontend, &result);
            }
            Call::SetVringAddr(index) => {
                let addr = VringAddr {
                    index,
                    flags: 0,
                    desc_user_addr: 0x7f00_0000_0000,
                    used_user_addr: 0x7f00_0000_1000,
                    avail_user_addr: 0x7f00_0000_2000,
                    log_guest_addr: 0,
                };
                let result = frontend.set_vring_addr(&addr);
                note_failure(frontend, &result);
            }
            Call::SetMemTable => {
                let region = MemoryRegionFd {
                    region: MemoryRegion {
                        guest_phys_addr: 0,
                        memory_size: 4096,
                        userspace_addr: 0x7f00_0000_0000,
                        mmap_offset: 0,
                    },
                    fd: memory.as_fd(),
                };
                let result = frontend.set_mem_table(&[region]);
                note_failure(frontend, &result);
            }
            Call::SetVringKick(index) => {
                let result = frontend.set_vring_kick(index, eventfd.as_fd());
                note_failure(frontend, &result);
            }
        }
    }
}

/// After a failure the connection is unusable, unless the stream is still in step: the backend
/// only refused (REPLY_ACK status), the request was refused before anything was sent, or
/// `negotiate` found a well-formed offer lacking a feature it needs.
fn note_failure<T>(frontend: &Frontend, result: &std::result::Result<T, FrontendError>) {
    match result {
        Ok(_) => {}
        Err(
            FrontendError::BackendFailed { .. }
            | FrontendError::InvalidRequest { .. }
            | FrontendError::MissingFeature { .. },
        ) => {}
        Err(e) => assert!(!frontend.is_usable(), "connection still usable after: {e}"),
    }
}

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.count())
        .unwrap_or(0)
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory preconditions; the result is checked before being owned.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is fresh and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn memfd(size: i64) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated literal; memfd_create reads nothing else.
    let fd = unsafe { libc::memfd_create(c"fuzz-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on an fd we own.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }, 0);
    fd
}
