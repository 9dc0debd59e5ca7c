//! Inflight tracking, well-formed: what a correct frontend (QEMU) does with GET/SET_INFLIGHT_FD.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use vhost_frontend::features::{bit_mask, PROTOCOL_INFLIGHT_SHMFD};
use vhost_frontend::probe::{Answer, ProbeMessage};
use vhost_frontend::wire::inflight::region_size;
use vhost_frontend::wire::{InflightDescription, InflightLayout, Request};

use super::setup_failed;
use crate::probe::context::{Ack, Ctx, Session};
use crate::probe::Outcome;

/// Ring size of the well-formed requests.
pub const QUEUE_SIZE: u16 = 256;

/// A session with INFLIGHT_SHMFD set when offered (when not: the backend answers GET anyway).
pub fn inflight_session(ctx: &mut Ctx) -> Result<Session, Outcome> {
    ctx.inflight_applies().map_err(Outcome::NotApplicable)?;
    let bit = if ctx.inflight_offered() {
        bit_mask(PROTOCOL_INFLIGHT_SHMFD)
    } else {
        0
    };
    ctx.session_with(bit).map_err(setup_failed)
}

/// What a GET_INFLIGHT_FD reply holds, checked against the request.
pub struct Region {
    pub description: InflightDescription,
    pub fd: OwnedFd,
}

/// GET_INFLIGHT_FD for `num_queues` x `queue_size` and the checks of its reply; `Err` names what
/// is wrong with it.
pub fn get_region(s: &Session, num_queues: u16, queue_size: u16) -> Result<Region, String> {
    let answer = s
        .raw
        .call(&ProbeMessage::get_inflight(num_queues, queue_size));
    let Answer::Reply {
        header,
        payload,
        mut fds,
    } = answer
    else {
        return Err(format!("GET_INFLIGHT_FD: {}", answer.describe()));
    };
    if header.request != Request::GetInflightFd.code() || !header.is_reply() {
        return Err(format!(
            "the reply names request {} with flags {:#x}",
            header.request, header.flags
        ));
    }
    let description =
        InflightDescription::decode(&payload).map_err(|e| format!("reply payload: {e}"))?;
    if fds.len() != 1 {
        return Err(format!("{} fds with the reply (want 1)", fds.len()));
    }
    let fd = fds.remove(0);
    Ok(Region { description, fd })
}

pub fn get(ctx: &mut Ctx) -> Outcome {
    let s = match inflight_session(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let queues = ctx.queues();
    let Some(want) = region_size(queues, QUEUE_SIZE, InflightLayout::Split) else {
        return setup_failed("region size".into());
    };
    let region = match get_region(&s, queues, QUEUE_SIZE) {
        Ok(r) => r,
        Err(e) => return Outcome::Fail(e),
    };
    let d = region.description;
    let mut wrong = Vec::new();
    if d.mmap_size != want {
        wrong.push(format!(
            "mmap_size {} (the split layout of {queues} x {QUEUE_SIZE} is {want})",
            d.mmap_size
        ));
    }
    if (d.num_queues, d.queue_size) != (queues, QUEUE_SIZE) {
        wrong.push(format!(
            "geometry {} x {} echoed (asked {queues} x {QUEUE_SIZE})",
            d.num_queues, d.queue_size
        ));
    }
    let file = File::from(region.fd);
    let file_size = file.metadata().map(|m| m.len()).unwrap_or(0);
    match d.mmap_offset.checked_add(d.mmap_size) {
        Some(end) if end <= file_size => {
            // A fresh region is all zeros (version 0: nothing recorded yet).
            let mut bytes = vec![0u8; usize::try_from(d.mmap_size.min(64 << 20)).unwrap_or(0)];
            match file.read_exact_at(&mut bytes, d.mmap_offset) {
                Ok(()) => {
                    if let Some(at) = bytes.iter().position(|&b| b != 0) {
                        wrong.push(format!("a fresh region is not zeroed (byte {at})"));
                    }
                }
                Err(e) => wrong.push(format!("cannot read the region: {e}")),
            }
        }
        _ => wrong.push(format!(
            "offset {} + size {} lies past the end of the {file_size}-byte fd",
            d.mmap_offset, d.mmap_size
        )),
    }
    let offered = if ctx.inflight_offered() {
        ""
    } else {
        " (INFLIGHT_SHMFD is not offered, yet GET_INFLIGHT_FD is answered)"
    };
    if wrong.is_empty() {
        Outcome::Pass(format!(
            "{queues} x {QUEUE_SIZE}: one fd, {want} bytes at offset {}, zeroed{offered}",
            d.mmap_offset
        ))
    } else {
        Outcome::Fail(format!("{}{offered}", wrong.join("; ")))
    }
}

pub fn set(ctx: &mut Ctx) -> Outcome {
    let s = match inflight_session(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let region = match get_region(&s, ctx.queues(), QUEUE_SIZE) {
        Ok(r) => r,
        Err(e) => return setup_failed(e),
    };
    let m = ProbeMessage::set_inflight(region.description, vec![region.fd], false);
    match s.ack(m) {
        a @ (Ack::Accepted | Ack::Survived) => {
            Outcome::Pass(format!("the region GET returned: {}", a.describe()))
        }
        other => Outcome::Fail(format!(
            "the region GET itself returned: {}",
            other.describe()
        )),
    }
}
