//! `vmm probe`'s own messages, recombined by the fuzzer, against `BlkBackend::serve`: where
//! `backend_session` sends bytes without fds, this target builds every message with the probe's
//! builders (`vhost_frontend::probe::ProbeMessage`), fds included, so the handlers behind the
//! fds run too: SET_MEM_TABLE with a real (sealed or shrinkable) memfd, rings configured and
//! kicked with real eventfds, GET_INFLIGHT_FD for any geometry, SET_INFLIGHT_FD with zero, one or
//! two memfds holding fuzzer-written region bytes (and any mmap_size/offset), headers whose size
//! lies, and more fds than the protocol allows.
//!
//! Properties checked:
//! - no panic, no out-of-bounds access (ASan), no hang (libFuzzer timeout);
//! - every message back is a reply (REPLY flag) to a code that was sent, with an fd only on a
//!   GET_INFLIGHT_FD reply, and at most one;
//! - once the frontend hangs up, `serve` returns and no fd outlives the session (allowing 1 s
//!   for a detached signalling thread to finish; see the end of the target).
#![no_main]

use std::collections::HashSet;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;

use devices::blk::BlkBackend;
use fuzz_support::{open_blk_backend, FdLeakCheck};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost_frontend::probe::fds::{eventfd, memfd};
use vhost_frontend::probe::{Answer, ProbeMessage, RawSession};
use vhost_frontend::wire::{InflightDescription, MemoryRegion, Request};

const MAX_MESSAGES: usize = 32;
/// The fuzzer's guest RAM: small, so a corpus entry stays cheap.
const RAM: u64 = 64 * 1024;
const VA: u64 = 0x7f00_0000_0000;

fn backend() -> &'static BlkBackend {
    static BACKEND: OnceLock<BlkBackend> = OnceLock::new();
    BACKEND.get_or_init(|| open_blk_backend("probe-session"))
}

fuzz_target!(|data: &[u8]| {
    let backend = backend();
    let leaks = FdLeakCheck::start();
    let mut u = Unstructured::new(data);
    let mut messages = Vec::new();
    // Input that runs out mid-message ends the list; what was built so far is sent.
    let _ = build(&mut u, &mut messages);
    // PROBE_SESSION_DEBUG=1 lists the messages an input became (to read a crash).
    if std::env::var_os("PROBE_SESSION_DEBUG").is_some() {
        for m in &messages {
            eprintln!(
                "{} flags {:#x} size {} fds {} payload {:02x?}",
                m.name(),
                m.header.flags,
                m.header.size,
                m.fds.len(),
                m.payload
            );
        }
    }
    let sent: HashSet<u32> = messages.iter().map(|m| m.header.request).collect();

    let (frontend_end, backend_end) = UnixStream::pair().expect("socketpair");
    let reader_end = frontend_end.try_clone().expect("dup");
    let frontend = std::thread::spawn(move || {
        let session = RawSession::from_stream(frontend_end, Duration::from_secs(5));
        for m in &messages {
            if session.send(m).is_err() {
                break; // The backend closed the connection (a protocol breach).
            }
        }
        let _ = session.stream().shutdown(std::net::Shutdown::Write);
    });
    // Replies are read while messages go out, so neither side blocks on a full socket buffer.
    let replies = std::thread::spawn(move || check_replies(reader_end, &sent));
    let _ = backend.serve(backend_end);
    frontend.join().expect("frontend thread");
    replies.join().expect("reply checker");
    // A ring that cannot start is reported on its err eventfd from a detached helper thread
    // (`Notifier::signal_detached`: the session thread must never sleep on a peer's counter),
    // which may still hold that fd for a moment after `serve` returns. The first 10-minute run
    // found exactly that; it closes within microseconds, so the count must settle in 1 s.
    leaks.assert_none_leaked_within("probe session", Duration::from_secs(1));
});

fn check_replies(stream: UnixStream, sent: &HashSet<u32>) {
    let session = RawSession::from_stream(stream, Duration::from_secs(30));
    loop {
        match session.recv() {
            Answer::Reply { header, fds, .. } => {
                assert!(
                    header.is_reply(),
                    "backend message without REPLY: {header:?}"
                );
                assert!(
                    sent.contains(&header.request),
                    "reply for request code {} that was never sent",
                    header.request
                );
                let fds_allowed = if header.request == Request::GetInflightFd.code() {
                    1
                } else {
                    0
                };
                assert!(
                    fds.len() <= fds_allowed,
                    "{} fds on a reply to code {}",
                    fds.len(),
                    header.request
                );
            }
            Answer::Closed => return,
            Answer::TimedOut => panic!("the backend neither replied nor closed in 30 s"),
            Answer::Broken(why) => panic!("not a vhost-user reply: {why}"),
        }
    }
}

fn sealed_region(u: &mut Unstructured<'_>) -> Result<OwnedFd> {
    let size = u.int_in_range(0..=16u64 * 1024)?;
    let file = memfd(c"fuzz-inflight", size, true).expect("memfd");
    let len = u.int_in_range(0..=256)?;
    let bytes = u.bytes(len)?;
    if !bytes.is_empty() && size > 0 {
        let at = u.int_in_range(0..=size.saturating_sub(1))?;
        let n = bytes.len().min((size - at) as usize);
        file.write_all_at(&bytes[..n], at).expect("write region");
    }
    Ok(file.into())
}

fn build(u: &mut Unstructured<'_>, out: &mut Vec<ProbeMessage>) -> Result<()> {
    while !u.is_empty() && out.len() < MAX_MESSAGES {
        let need_reply = u.ratio(1, 2)?;
        let m = match u.int_in_range(0..=15)? {
            0 => ProbeMessage::u64(Request::SetFeatures, u.arbitrary()?, need_reply),
            1 => ProbeMessage::u64(
                Request::SetProtocolFeatures,
                if u.ratio(3, 4)? {
                    backend().offered_protocol_features()
                } else {
                    u.arbitrary()?
                },
                need_reply,
            ),
            2 => ProbeMessage::bare(Request::SetOwner, need_reply),
            3 => ProbeMessage::get_inflight(u.arbitrary()?, u.arbitrary()?),
            4 => {
                let description = InflightDescription {
                    mmap_size: if u.ratio(1, 2)? {
                        u.int_in_range(0..=20_000)?
                    } else {
                        u.arbitrary()?
                    },
                    mmap_offset: if u.ratio(3, 4)? { 0 } else { u.arbitrary()? },
                    num_queues: u.int_in_range(0..=3)?,
                    queue_size: *u.choose(&[0, 1, 3, 8, 64, 256, 0xffff])?,
                };
                let fds = (0..u.int_in_range(0..=2)?)
                    .map(|_| sealed_region(u))
                    .collect::<Result<Vec<_>>>()?;
                ProbeMessage::set_inflight(description, fds, need_reply)
            }
            5 => {
                let sealed = u.ratio(1, 2)?;
                let file = memfd(c"fuzz-ram", RAM, sealed).expect("memfd");
                if u.ratio(1, 8)? {
                    file.set_len(0).ok(); // Shrunk before the backend maps it (unsealed only).
                }
                let region = MemoryRegion {
                    guest_phys_addr: 0,
                    memory_size: if u.ratio(7, 8)? { RAM } else { u.arbitrary()? },
                    userspace_addr: VA,
                    mmap_offset: if u.ratio(7, 8)? { 0 } else { u.arbitrary()? },
                };
                ProbeMessage::mem_table(vec![region], vec![file.into()], need_reply)
            }
            6 => ProbeMessage::vring_state(
                Request::SetVringNum,
                u.int_in_range(0..=2)?,
                *u.choose(&[0, 1, 8, 256, 257, 0x10000])?,
                need_reply,
            ),
            7 => ProbeMessage::vring_state(
                Request::SetVringBase,
                u.int_in_range(0..=2)?,
                u.arbitrary()?,
                need_reply,
            ),
            8 => {
                let mut at = || -> Result<u64> {
                    Ok(if u.ratio(7, 8)? {
                        VA + u.int_in_range(0..=RAM)?
                    } else {
                        u.arbitrary()?
                    })
                };
                let (d, a, us) = (at()?, at()?, at()?);
                ProbeMessage::vring_addr(u.int_in_range(0..=2)?, d, a, us, need_reply)
            }
            9 | 10 => {
                let request = *u.choose(&[
                    Request::SetVringKick,
                    Request::SetVringCall,
                    Request::SetVringErr,
                ])?;
                let fd = if u.ratio(7, 8)? {
                    Some(eventfd(u.arbitrary()?, u.int_in_range(0..=2)?).expect("eventfd"))
                } else {
                    None
                };
                ProbeMessage::vring_fd(request, u.int_in_range(0..=2)?, fd, need_reply)
            }
            11 => ProbeMessage::vring_state(
                Request::SetVringEnable,
                u.int_in_range(0..=2)?,
                u.int_in_range(0..=1)?,
                need_reply,
            ),
            12 => {
                ProbeMessage::vring_state(Request::GetVringBase, u.int_in_range(0..=2)?, 0, false)
            }
            13 => {
                // More fds than the protocol's 8 on any request.
                let request = *u.choose(Request::ALL)?;
                let fds = (0..u.int_in_range(9..=16)?)
                    .map(|_| eventfd(true, 0).expect("eventfd"))
                    .collect();
                ProbeMessage::u64(request, 0, need_reply).with_fds(fds)
            }
            14 => ProbeMessage::bare(
                *u.choose(&[
                    Request::GetFeatures,
                    Request::GetProtocolFeatures,
                    Request::GetQueueNum,
                ])?,
                false,
            ),
            _ => {
                // A header whose size lies (the last message: the stream is out of step after it).
                let m =
                    ProbeMessage::u64(Request::SetFeatures, 0, false).claiming_size(u.arbitrary()?);
                out.push(m);
                return Ok(());
            }
        };
        out.push(m);
    }
    Ok(())
}
