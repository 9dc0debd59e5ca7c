//! Handshake conformance: reply framing, REPLY_ACK, and messages out of order.

use vhost_frontend::features::{
    bit_mask, has, PROTOCOL_MQ, PROTOCOL_REPLY_ACK, VHOST_USER_F_PROTOCOL_FEATURES,
};
use vhost_frontend::probe::fds::{eventfd, memfd};
use vhost_frontend::probe::{Answer, ProbeMessage};
use vhost_frontend::wire::inflight::region_size;
use vhost_frontend::wire::{InflightDescription, InflightLayout, FLAG_REPLY, VERSION};
use vhost_frontend::Request;

use super::{all_cases, setup_failed};
use crate::probe::context::{acked_features, acked_protocol_features, Ack, Ctx};
use crate::probe::Outcome;

/// Every GET_* with a u64 answer: REPLY flag, version 1, the same code, 8 bytes, no fds.
pub fn reply_format(ctx: &mut Ctx) -> Outcome {
    let s = match ctx.connect() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let mut asked = vec![Request::GetFeatures];
    if has(ctx.identity.features, VHOST_USER_F_PROTOCOL_FEATURES) {
        asked.push(Request::GetProtocolFeatures);
    }
    if ctx.identity.offers(PROTOCOL_MQ) {
        // Only once MQ is acked, as QEMU does it (rust-vmm's backends insist).
        let set = ProbeMessage::u64(
            Request::SetProtocolFeatures,
            acked_protocol_features(ctx.identity.protocol_features),
            false,
        );
        if let Err(e) = s.send(&set) {
            return setup_failed(format!("SET_PROTOCOL_FEATURES: {e}"));
        }
        asked.push(Request::GetQueueNum);
    }
    let cases = asked
        .into_iter()
        .map(
            |request| match s.call(&ProbeMessage::bare(request, false)) {
                Answer::Reply {
                    header,
                    payload,
                    fds,
                } => {
                    let mut wrong = Vec::new();
                    if header.request != request.code() {
                        wrong.push(format!("names request {}", header.request));
                    }
                    if header.flags != VERSION | FLAG_REPLY {
                        wrong.push(format!(
                            "flags {:#x} (want {:#x})",
                            header.flags,
                            VERSION | FLAG_REPLY
                        ));
                    }
                    if payload.len() != 8 {
                        wrong.push(format!("{} payload bytes (want 8)", payload.len()));
                    }
                    if !fds.is_empty() {
                        wrong.push(format!("{} fd(s) attached", fds.len()));
                    }
                    if wrong.is_empty() {
                        Ok(format!("{} ok", request.name()))
                    } else {
                        Err(format!("{} reply: {}", request.name(), wrong.join(", ")))
                    }
                }
                other => Err(format!("{}: {}", request.name(), other.describe())),
            },
        )
        .collect();
    all_cases(cases)
}

/// With REPLY_ACK: a good SET_FEATURES is acked 0, a SET_VRING_NUM for a queue that does not
/// exist is acked non-zero (or the connection closed).
pub fn reply_ack(ctx: &mut Ctx) -> Outcome {
    if !ctx.identity.offers(PROTOCOL_REPLY_ACK) {
        return Outcome::NotApplicable("REPLY_ACK not offered".into());
    }
    let s = match ctx.session() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let good = s.ack(ProbeMessage::u64(
        Request::SetFeatures,
        acked_features(ctx.identity.features),
        false,
    ));
    let bad = s.ack(ProbeMessage::vring_state(
        Request::SetVringNum,
        0xffff,
        256,
        false,
    ));
    let cases = vec![
        match good {
            Ack::Accepted => Ok("SET_FEATURES: ack 0".to_string()),
            other => Err(format!(
                "a valid SET_FEATURES with NEED_REPLY: {}",
                other.describe()
            )),
        },
        match bad {
            Ack::Refused(_) | Ack::Closed => {
                Ok(format!("SET_VRING_NUM for queue 65535: {}", bad.describe()))
            }
            other => Err(format!(
                "SET_VRING_NUM for queue 65535 (no such queue): {}",
                other.describe()
            )),
        },
    ];
    all_cases(cases)
}

/// A ring sized, addressed and kicked with no memory table: nothing to translate its addresses
/// with. An error, a close, or a backend that waits for the table; never a crash.
pub fn rings_before_mem_table(ctx: &mut Ctx) -> Outcome {
    let s = match ctx.session() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let kick = match eventfd(true, 1) {
        Ok(k) => k,
        Err(e) => return setup_failed(e.to_string()),
    };
    let steps = [
        ProbeMessage::vring_state(Request::SetVringNum, 0, 8, false),
        ProbeMessage::vring_addr(
            0,
            0x7f00_0000_1000,
            0x7f00_0000_1080,
            0x7f00_0000_10a0,
            false,
        ),
        ProbeMessage::vring_fd(Request::SetVringKick, 0, Some(kick), false),
        ProbeMessage::vring_state(Request::SetVringEnable, 0, 1, false),
    ];
    let mut seen = Vec::new();
    for step in steps {
        let name = step.name();
        let ack = s.ack(step);
        seen.push(format!("{name}: {}", ack.describe()));
        match ack {
            Ack::Closed => break,
            Ack::TimedOut | Ack::Broken(_) => return Outcome::Fail(seen.join("; ")),
            _ => {}
        }
    }
    Outcome::Pass(seen.join("; "))
}

/// SET_INFLIGHT_FD before anything but GET_FEATURES (no features set, no owner).
pub fn inflight_before_features(ctx: &mut Ctx) -> Outcome {
    let s = match ctx.connect() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let queues = ctx.queues();
    let Some(size) = region_size(queues, 256, InflightLayout::Split) else {
        return setup_failed("region size".into());
    };
    let region = match memfd(c"vmm-probe-inflight", size, true) {
        Ok(f) => f,
        Err(e) => return setup_failed(e.to_string()),
    };
    let description = InflightDescription {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: queues,
        queue_size: 256,
    };
    let m = ProbeMessage::set_inflight(description, vec![region.into()], false);
    if s.send(&m).is_err() {
        return Outcome::Pass("closed the connection".into());
    }
    match s.call(&ProbeMessage::bare(Request::GetFeatures, false)) {
        Answer::Reply { .. } => Outcome::Pass("no crash; still answering".into()),
        Answer::Closed => Outcome::Pass("closed the connection".into()),
        other => Outcome::Fail(format!("after it: {}", other.describe())),
    }
}

/// SET_PROTOCOL_FEATURES with the lowest protocol bit (0..=18) the backend did not offer.
pub fn unoffered_protocol_bit(ctx: &mut Ctx) -> Outcome {
    if !has(ctx.identity.features, VHOST_USER_F_PROTOCOL_FEATURES) {
        return Outcome::NotApplicable("PROTOCOL_FEATURES not offered".into());
    }
    let offered = ctx.identity.protocol_features;
    let Some(bit) = (0..=18).find(|&b| !has(offered, b)) else {
        return Outcome::NotApplicable("every known protocol bit is offered".into());
    };
    let s = match ctx.connect() {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    let set = [
        ProbeMessage::u64(
            Request::SetFeatures,
            acked_features(ctx.identity.features),
            false,
        ),
        ProbeMessage::u64(
            Request::SetProtocolFeatures,
            acked_protocol_features(offered) | bit_mask(bit),
            false,
        ),
    ];
    for m in &set {
        if s.send(m).is_err() {
            return Outcome::Pass(format!("protocol bit {bit}: connection closed"));
        }
    }
    let name = vhost_frontend::features::protocol_feature_name(bit).unwrap_or("?");
    match s.call(&ProbeMessage::bare(Request::GetProtocolFeatures, false)) {
        Answer::Closed => Outcome::Pass(format!("protocol bit {bit} ({name}): connection closed")),
        Answer::Reply { .. } => Outcome::Fail(format!(
            "accepted protocol bit {bit} ({name}), which it never offered: it now assumes a \
             feature neither side agreed on"
        )),
        other => Outcome::Fail(format!("protocol bit {bit} ({name}): {}", other.describe())),
    }
}
