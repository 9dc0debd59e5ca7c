//! A hostile vhost-user frontend against `BlkBackend::serve`: the fuzz input becomes up to
//! MAX_MESSAGES messages (well-framed with a chosen request code, flags and payload, or raw bytes
//! that break the framing), written to one end of a socketpair while `serve` runs on the other.
//! No fds travel: messages that need one (SET_MEM_TABLE, SET_VRING_KICK, ...) arrive without it,
//! so the rings never start here (blk_request covers what a running ring parses).
//!
//! Properties checked:
//! - no panic, no out-of-bounds access (ASan);
//! - `serve` returns once the harness has closed its end (a hang is a libFuzzer timeout);
//! - everything the backend sends back is a well-formed vhost-user reply: a valid header with the
//!   REPLY flag, the code of a request that was sent, and no fds;
//! - no fd outlives the session.
#![no_main]

use std::collections::HashSet;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use devices::blk::BlkBackend;
use fuzz_support::{open_blk_backend, send_all, FdLeakCheck};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost_frontend::wire::{
    recv_message, Header, Request, WireError, FLAG_NEED_REPLY, FLAG_REPLY, MAX_PAYLOAD_SIZE,
    VERSION,
};

/// Bounds the bytes in flight: the harness writes every message before it reads any reply, so
/// the replies (at most one per message, each under 300 bytes) must fit the socket buffer.
const MAX_MESSAGES: usize = 64;
const NUM_QUEUES: u16 = 2;

/// One backend for the whole run (the image is opened once, as `vmm blk-backend` does); each
/// input is one `serve` session on it, and sessions share nothing else.
fn backend() -> &'static BlkBackend {
    static BACKEND: OnceLock<BlkBackend> = OnceLock::new();
    BACKEND.get_or_init(|| open_blk_backend("backend-session"))
}

fuzz_target!(|data: &[u8]| {
    let backend = backend();
    let leaks = FdLeakCheck::start();
    let mut u = Unstructured::new(data);
    let mut messages = Vec::new();
    let mut codes = Some(HashSet::new());
    // Input that runs out mid-message ends the list; what was built so far is sent.
    let _ = build_messages(&mut u, &mut messages, &mut codes);

    let (frontend_end, backend_end) = UnixStream::pair().expect("socketpair");
    let frontend = std::thread::spawn(move || {
        for bytes in &messages {
            if !send_all(&frontend_end, bytes) {
                break; // The backend closed the connection (a protocol breach).
            }
        }
        // The frontend hangs up: from here on `serve` must come to an end.
        let _ = frontend_end.shutdown(std::net::Shutdown::Write);
        check_replies(&frontend_end, &codes);
    });
    // Ok (frontend hung up) or Err (it broke the protocol): both are answers, never a panic.
    let _ = backend.serve(backend_end);
    frontend.join().expect("frontend thread");
    leaks.assert_none_leaked("backend session");
});

/// Reads every reply until the backend closes the connection. `sent_codes` is `None` once raw
/// bytes broke the framing (then the backend may answer codes it read out of step).
fn check_replies(stream: &UnixStream, sent_codes: &Option<HashSet<u32>>) {
    loop {
        match recv_message(stream) {
            Ok((header, _payload, fds)) => {
                assert!(
                    header.is_reply(),
                    "backend message without REPLY: {header:?}"
                );
                assert!(
                    sent_codes
                        .as_ref()
                        .is_none_or(|codes| codes.contains(&header.request)),
                    "reply for request code {} that was never sent",
                    header.request
                );
                assert!(
                    fds.is_empty(),
                    "backend attached {} fds to a reply",
                    fds.len()
                );
            }
            Err(WireError::PeerGone(_)) => return,
            Err(e) => panic!("the backend sent something that is not a vhost-user reply: {e}"),
        }
    }
}

/// The wire bytes of every message, and the request codes they carry (while the framing holds).
fn build_messages(
    u: &mut Unstructured<'_>,
    messages: &mut Vec<Vec<u8>>,
    codes: &mut Option<HashSet<u32>>,
) -> Result<()> {
    while !u.is_empty() && messages.len() < MAX_MESSAGES {
        if u.ratio(1, 16)? {
            // Raw bytes: a cut header, a lying size, a REPLY flag, anything.
            let len = u.int_in_range(0..=64)?;
            messages.push(u.bytes(len)?.to_vec());
            // The stream is out of step now: any 4 bytes may be read as a request code.
            *codes = None;
            continue;
        }
        let code = if u.ratio(15, 16)? {
            u.choose(Request::ALL)?.code()
        } else {
            u.arbitrary()?
        };
        let flags = match u.int_in_range(0..=7)? {
            0 => u.arbitrary()?,
            1 | 2 => VERSION | FLAG_NEED_REPLY,
            3 => VERSION | FLAG_REPLY,
            _ => VERSION,
        };
        let payload = payload(u)?;
        let header = Header {
            request: code,
            flags,
            size: payload.len() as u32,
        };
        let mut bytes = header.to_bytes();
        bytes.extend_from_slice(&payload);
        if let Some(codes) = codes.as_mut() {
            codes.insert(code);
        }
        messages.push(bytes);
    }
    Ok(())
}

/// A payload shaped like one of the protocol's structs (so the fuzzer gets past the size checks
/// quickly), with every field from the input; or raw bytes of any length the wire allows.
fn payload(u: &mut Unstructured<'_>) -> Result<Vec<u8>> {
    // A small queue index most of the time, so that the vring paths are reached.
    let index = |u: &mut Unstructured<'_>| -> Result<u32> {
        Ok(if u.ratio(3, 4)? {
            u32::from(u.int_in_range(0..=NUM_QUEUES)?)
        } else {
            u.arbitrary()?
        })
    };
    let mut out = Vec::new();
    match u.int_in_range(0..=7)? {
        0 => {}
        // u64 payloads: features, status, or a vring fd index (queue, NOFD flag at bit 8).
        1 => {
            let value = if u.arbitrary()? {
                u.arbitrary::<u64>()?
            } else {
                u64::from(index(u)?) | if u.arbitrary()? { 1 << 8 } else { 0 }
            };
            out.extend_from_slice(&value.to_le_bytes());
        }
        // struct vhost_vring_state.
        2 => {
            out.extend_from_slice(&index(u)?.to_le_bytes());
            out.extend_from_slice(&u.arbitrary::<u32>()?.to_le_bytes());
        }
        // struct vhost_vring_addr (40 bytes).
        3 => {
            out.extend_from_slice(&index(u)?.to_le_bytes());
            out.extend_from_slice(u.bytes(36)?);
        }
        // struct vhost_memory: nregions, padding, then nregions * 32 bytes.
        4 => {
            let regions = u.int_in_range(0..=9u32)?;
            out.extend_from_slice(&regions.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(u.bytes(32 * regions as usize)?);
        }
        // struct vhost_user_config: offset, size, flags, then size bytes.
        5 => {
            let size = u.int_in_range(0..=300u32)?;
            out.extend_from_slice(&u.int_in_range(0..=0x110u32)?.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&u.arbitrary::<u32>()?.to_le_bytes());
            out.extend_from_slice(u.bytes(size as usize)?);
        }
        // The inflight description (24 bytes).
        6 => out.extend_from_slice(u.bytes(24)?),
        _ => {
            let len = u.int_in_range(0..=MAX_PAYLOAD_SIZE)?;
            out.extend_from_slice(u.bytes(len)?);
        }
    }
    Ok(out)
}
