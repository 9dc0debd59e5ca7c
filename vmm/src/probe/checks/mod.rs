//! The catalogue of checks, in the order they run. Each runs on connections of its own and
//! returns its verdict with evidence; the runner (`super::run_one`) adds liveness, fd and memory
//! verdicts around it.

mod handshake;
pub mod identity;
mod inflight;
mod inflight_hostile;
mod resources;
mod resubmit;

use super::context::{Ack, Ctx};
use super::Outcome;

/// One check.
#[derive(Debug)]
pub struct Check {
    pub name: &'static str,
    pub group: &'static str,
    /// What it does, one line (`vmm probe --list`).
    pub about: &'static str,
    pub run: fn(&mut Ctx) -> Outcome,
    /// How much the backend's RSS may grow during it, KiB.
    pub rss_allowance_kib: u64,
}

const MIB: u64 = 1024;

macro_rules! check {
    ($group:literal, $name:literal, $run:path, $about:literal) => {
        Check {
            name: $name,
            group: $group,
            about: $about,
            run: $run,
            rss_allowance_kib: 8 * MIB,
        }
    };
}

pub static CHECKS: &[Check] = &[
    check!("identity", "identity", identity::identity,
        "device type, features and protocol features by name, queues, config space; stable across connections"),
    check!("handshake", "reply-format", handshake::reply_format,
        "GET_* replies carry the REPLY flag, the request's code, an exact size and no fds"),
    check!("handshake", "reply-ack", handshake::reply_ack,
        "with REPLY_ACK every NEED_REPLY message gets its ack: 0 for a good one, non-zero for a bad one"),
    check!("handshake", "rings-before-mem-table", handshake::rings_before_mem_table,
        "a ring configured and kicked before any SET_MEM_TABLE: an error or a close, not a crash"),
    check!("handshake", "inflight-before-features", handshake::inflight_before_features,
        "SET_INFLIGHT_FD before SET_FEATURES: an error or a close, not a crash"),
    check!("handshake", "unoffered-protocol-bit", handshake::unoffered_protocol_bit,
        "SET_PROTOCOL_FEATURES with a bit the backend did not offer is refused"),
    check!("inflight", "inflight-get", inflight::get,
        "GET_INFLIGHT_FD: one fd, the split layout's size, a zeroed region inside the file"),
    check!("inflight", "inflight-set", inflight::set,
        "SET_INFLIGHT_FD with the region GET returned is accepted"),
    check!("inflight", "inflight-resubmit", resubmit::resubmit,
        "recovery resubmits exactly what a hand-written region holds in flight, not a published request (virtio-blk)"),
    check!("inflight-hostile", "inflight-queue-count", inflight_hostile::queue_count,
        "GET_INFLIGHT_FD for 0 queues and for one more queue than the device has is refused"),
    check!("inflight-hostile", "inflight-queue-size", inflight_hostile::queue_size,
        "GET_INFLIGHT_FD for rings of 0, 3 and 0xffff entries is refused"),
    check!("inflight-hostile", "inflight-huge", inflight_hostile::huge,
        "GET_INFLIGHT_FD for 65535 x 65535 (over 2^32 bytes) and 4096 x 32768 (2 GiB) is refused, allocating nothing"),
    check!("inflight-hostile", "inflight-set-too-small", inflight_hostile::set_too_small,
        "SET_INFLIGHT_FD whose mmap_size is smaller than the geometry needs is refused"),
    check!("inflight-hostile", "inflight-set-past-end", inflight_hostile::set_past_end,
        "SET_INFLIGHT_FD whose offset + size lies past the end of its fd is refused"),
    check!("inflight-hostile", "inflight-set-unaligned", inflight_hostile::set_unaligned,
        "SET_INFLIGHT_FD with an offset that is not page aligned is refused"),
    check!("inflight-hostile", "inflight-set-overflow", inflight_hostile::set_overflow,
        "SET_INFLIGHT_FD whose offset + size overflows 64 bits is refused"),
    check!("inflight-hostile", "inflight-set-no-fd", inflight_hostile::set_no_fd,
        "SET_INFLIGHT_FD without an fd is refused"),
    check!("inflight-hostile", "inflight-set-two-fds", inflight_hostile::set_two_fds,
        "SET_INFLIGHT_FD with two fds: refused, or one taken and the other closed"),
    check!("inflight-hostile", "inflight-get-with-fds", inflight_hostile::get_with_fds,
        "fds attached to GET_INFLIGHT_FD are closed, not kept"),
    check!("inflight-hostile", "inflight-get-repeated", inflight_hostile::get_repeated,
        "GET_INFLIGHT_FD 1000 times on one connection keeps neither fds nor memory"),
    check!("inflight-hostile", "inflight-hostile-region", inflight_hostile::hostile_region,
        "a region whose last_batch_head, used_idx and next links are out of range or cyclic: refused or survived"),
    check!("resources", "memory-shrink", resources::memory_shrink,
        "guest RAM whose memfd shrinks to 0 after SET_MEM_TABLE, then a kick: no SIGBUS death"),
    check!("resources", "eventfd-flags", resources::eventfd_flags,
        "kick/call/err eventfds with O_NONBLOCK cleared and counters full: the backend does not wedge"),
    check!("resources", "silent-client", resources::silent_client,
        "a client that connects and says nothing does not lock the next frontend out (20 s)"),
    check!("resources", "trickle", resources::trickle,
        "messages that arrive a byte at a time are answered correctly"),
    check!("resources", "oversized-header", resources::oversized_header,
        "a header claiming a 4 GiB payload: closed at once, nothing allocated"),
    check!("resources", "oversized-payload", resources::oversized_payload,
        "SET_FEATURES with 1 KiB of payload and a memory table claiming 255 regions are refused"),
    check!("resources", "many-fds", resources::many_fds,
        "16 fds on one message (the protocol allows 8): every one closed"),
];

/// The verdict for a hostile message that deserves a refusal: an error ack or a clean close
/// pass; silence (no REPLY_ACK) passes with a note; acceptance fails with `accepted_means`.
pub fn refused(what: &str, ack: Ack, accepted_means: &str) -> Result<String, String> {
    match ack {
        Ack::Refused(_) | Ack::Closed => Ok(format!("{what}: {}", ack.describe())),
        Ack::Survived => Ok(format!(
            "{what}: survived (no REPLY_ACK, so whether it was refused cannot be seen)"
        )),
        Ack::Accepted => Err(format!("{what}: accepted (ack 0): {accepted_means}")),
        Ack::TimedOut => Err(format!("{what}: no answer (wedged?)")),
        Ack::Broken(why) => Err(format!("{what}: malformed answer: {why}")),
    }
}

/// Many cases, one verdict: PASS with every case's evidence, or FAIL naming the failed ones.
pub fn all_cases(cases: Vec<Result<String, String>>) -> Outcome {
    let failed: Vec<&String> = cases.iter().filter_map(|c| c.as_ref().err()).collect();
    if failed.is_empty() {
        let passed: Vec<&String> = cases.iter().filter_map(|c| c.as_ref().ok()).collect();
        Outcome::Pass(join(&passed))
    } else {
        Outcome::Fail(join(&failed))
    }
}

fn join(parts: &[&String]) -> String {
    parts
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `Err(why)` from a set-up step (the backend failed before the hostile part): FAIL.
pub fn setup_failed(why: String) -> Outcome {
    Outcome::Fail(format!("set-up failed: {why}"))
}
