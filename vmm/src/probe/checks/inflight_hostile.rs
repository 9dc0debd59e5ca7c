//! Inflight tracking, hostile: the seed review's and the CVEs' bug classes (sizes that
//! overflow, geometry beyond the device, regions outside their fd, fds leaked on error paths,
//! regions whose contents lie).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use vhost_frontend::features::{has, VHOST_USER_F_PROTOCOL_FEATURES};
use vhost_frontend::probe::fds::{eventfd, memfd};
use vhost_frontend::probe::{Answer, ProbeMessage};
use vhost_frontend::wire::inflight::{
    region_size, split_entry_offset, HDR_DESC_NUM, HDR_VERSION, SPLIT_ENTRY_COUNTER,
    SPLIT_ENTRY_INFLIGHT, SPLIT_ENTRY_NEXT, SPLIT_HDR_LAST_BATCH_HEAD, SPLIT_HDR_USED_IDX,
};
use vhost_frontend::wire::{InflightDescription, InflightLayout, Request};

use super::inflight::{get_region, inflight_session, QUEUE_SIZE};
use super::{all_cases, refused, setup_failed};
use crate::probe::context::{Ack, Ctx};
use crate::probe::rings::{ring_setup, start_queue0, RING_SIZE};
use crate::probe::Outcome;

/// One GET_INFLIGHT_FD that deserves a refusal, on a fresh connection.
fn get_refused(ctx: &mut Ctx, num_queues: u16, queue_size: u16) -> Result<String, String> {
    let what = format!("{num_queues} x {queue_size}");
    let s = match inflight_session(ctx) {
        Ok(s) => s,
        Err(o) => return Err(o.evidence().to_string()),
    };
    // A weak backend may zero gigabytes first: its answer is awaited for 30 s, so the verdict
    // says what it did, not how fast.
    let wait = ctx.timeout.max(std::time::Duration::from_secs(30));
    let asked = ProbeMessage::get_inflight(num_queues, queue_size);
    match s.raw.call_within(&asked, wait) {
        Answer::Reply { payload, fds, .. } => {
            let size = InflightDescription::decode(&payload).map(|d| d.mmap_size);
            match (size, fds.len()) {
                (Ok(size), n) if size > 0 && n > 0 => Err(format!(
                    "{what}: answered with a {size}-byte region for a geometry it should refuse"
                )),
                (Ok(_), _) => Ok(format!("{what}: refused (no region)")),
                (Err(e), _) => Err(format!("{what}: malformed reply: {e}")),
            }
        }
        Answer::Closed => Ok(format!("{what}: connection closed")),
        other => Err(format!("{what}: {}", other.describe())),
    }
}

fn cases_or_na(ctx: &mut Ctx, geometries: &[(u16, u16)]) -> Outcome {
    if let Err(why) = ctx.inflight_applies() {
        return Outcome::NotApplicable(why);
    }
    let cases = geometries
        .iter()
        .map(|&(q, size)| get_refused(ctx, q, size))
        .collect();
    all_cases(cases)
}

pub fn queue_count(ctx: &mut Ctx) -> Outcome {
    let beyond = ctx.identity.queues.saturating_add(1);
    cases_or_na(ctx, &[(0, QUEUE_SIZE), (beyond, QUEUE_SIZE)])
}

pub fn queue_size(ctx: &mut Ctx) -> Outcome {
    cases_or_na(ctx, &[(1, 0), (1, 3), (1, 0xffff)])
}

pub fn huge(ctx: &mut Ctx) -> Outcome {
    if !ctx.allow_huge {
        match ctx.target.memory_cap() {
            Some(Some(_)) => {}
            Some(None) => {
                return Outcome::NotApplicable(
                    "the backend has no memory cap (ulimit -v, cgroup memory.max): a weak one \
                     would take the host's memory; cap it, or pass --allow-huge"
                        .into(),
                )
            }
            None => {
                return Outcome::NotApplicable(
                    "needs --pid (to see a memory cap) or --allow-huge".into(),
                )
            }
        }
    }
    cases_or_na(ctx, &[(0xffff, 0xffff), (4096, 32768)])
}

/// A sealed memfd of `file_size` bytes and a SET_INFLIGHT_FD describing `description` with it,
/// judged on a fresh connection.
fn set_refused(
    ctx: &mut Ctx,
    what: &str,
    description: InflightDescription,
    fds: Vec<OwnedFd>,
    accepted_means: &str,
) -> Outcome {
    let s = match inflight_session(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let ack = s.ack(ProbeMessage::set_inflight(description, fds, false));
    match refused(what, ack, accepted_means) {
        Ok(e) => Outcome::Pass(e),
        Err(e) => Outcome::Fail(e),
    }
}

/// The size a well-formed region of this device needs.
fn needed(ctx: &Ctx) -> (u16, u64) {
    let queues = ctx.queues();
    let size = region_size(queues, QUEUE_SIZE, InflightLayout::Split).unwrap_or(u64::MAX);
    (queues, size)
}

fn sealed(size: u64) -> Result<OwnedFd, Outcome> {
    memfd(c"vmm-probe-inflight", size, true)
        .map(OwnedFd::from)
        .map_err(|e| setup_failed(e.to_string()))
}

fn description(queues: u16, size: u64, offset: u64) -> InflightDescription {
    InflightDescription {
        mmap_size: size,
        mmap_offset: offset,
        num_queues: queues,
        queue_size: QUEUE_SIZE,
    }
}

pub fn set_too_small(ctx: &mut Ctx) -> Outcome {
    let (queues, size) = needed(ctx);
    let small = size - 64;
    let fd = match sealed(small) {
        Ok(f) => f,
        Err(o) => return o,
    };
    set_refused(
        ctx,
        &format!("mmap_size {small} for {queues} x {QUEUE_SIZE} ({size} needed)"),
        description(queues, small, 0),
        vec![fd],
        "the last ring's last entries lie past the region it described: a store there lands outside it (past the mapping, a fault)",
    )
}

pub fn set_past_end(ctx: &mut Ctx) -> Outcome {
    let (queues, size) = needed(ctx);
    let fd = match sealed(size) {
        Ok(f) => f,
        Err(o) => return o,
    };
    set_refused(
        ctx,
        &format!("offset 4096 + {size} bytes in a {size}-byte fd"),
        description(queues, size, 4096),
        vec![fd],
        "the mapping runs past the end of the file: a store there is SIGBUS",
    )
}

pub fn set_unaligned(ctx: &mut Ctx) -> Outcome {
    let (queues, size) = needed(ctx);
    let fd = match sealed(size + 4096) {
        Ok(f) => f,
        Err(o) => return o,
    };
    set_refused(
        ctx,
        "mmap_offset 8",
        description(queues, size, 8),
        vec![fd],
        "mmap cannot map at an unaligned offset; a backend that rounds it maps the wrong bytes",
    )
}

pub fn set_overflow(ctx: &mut Ctx) -> Outcome {
    let (queues, size) = needed(ctx);
    let offset: u64 = !0xfff;
    let fd = match sealed(size) {
        Ok(f) => f,
        Err(o) => return o,
    };
    set_refused(
        ctx,
        &format!("mmap_offset {offset:#x} + {size} (wraps past 2^64)"),
        description(queues, size, offset),
        vec![fd],
        "offset + size wrapped, so a bounds check passed that should not have",
    )
}

pub fn set_no_fd(ctx: &mut Ctx) -> Outcome {
    let (queues, size) = needed(ctx);
    set_refused(
        ctx,
        "no fd",
        description(queues, size, 0),
        vec![],
        "there is no region to map",
    )
}

pub fn set_two_fds(ctx: &mut Ctx) -> Outcome {
    let (queues, size) = needed(ctx);
    let (a, b) = match (sealed(size), sealed(size)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(o), _) | (_, Err(o)) => return o,
    };
    let s = match inflight_session(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let ack = s.ack(ProbeMessage::set_inflight(
        description(queues, size, 0),
        vec![a, b],
        false,
    ));
    let leak_note = if ctx.target.pid().is_some() {
        "the runner checks the other fd was closed"
    } else {
        "without --pid the probe cannot see whether the other fd leaked"
    };
    match ack {
        Ack::Refused(_) | Ack::Closed | Ack::Accepted | Ack::Survived => {
            Outcome::Pass(format!("two fds: {}; {leak_note}", ack.describe()))
        }
        other => Outcome::Fail(format!("two fds: {}", other.describe())),
    }
}

pub fn get_with_fds(ctx: &mut Ctx) -> Outcome {
    let s = match inflight_session(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let fds: Result<Vec<OwnedFd>, _> = (0..3).map(|_| eventfd(true, 0)).collect();
    let fds = match fds {
        Ok(f) => f,
        Err(e) => return setup_failed(e.to_string()),
    };
    let m = ProbeMessage::get_inflight(ctx.queues(), QUEUE_SIZE).with_fds(fds);
    let answer = s.raw.call(&m);
    let note = if ctx.target.pid().is_some() {
        "(the runner checks the 3 fds were closed)"
    } else {
        "(without --pid the probe cannot see whether they leaked)"
    };
    match answer {
        Answer::Reply { .. } | Answer::Closed => Outcome::Pass(format!(
            "3 fds on GET_INFLIGHT_FD: {} {note}",
            answer.describe()
        )),
        other => Outcome::Fail(format!("3 fds on GET_INFLIGHT_FD: {}", other.describe())),
    }
}

pub fn get_repeated(ctx: &mut Ctx) -> Outcome {
    let s = match inflight_session(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let queues = ctx.queues();
    for i in 0..1000 {
        // Each region is dropped (its fd closed) at once, as a frontend that asks again does.
        if let Err(e) = get_region(&s, queues, QUEUE_SIZE) {
            return Outcome::Fail(format!("GET number {}: {e}", i + 1));
        }
    }
    let note = if ctx.target.pid().is_some() {
        "the runner compares fds and RSS"
    } else {
        "without --pid the probe cannot see fds or memory kept"
    };
    Outcome::Pass(format!(
        "1000 regions of {queues} x {QUEUE_SIZE} answered; {note}"
    ))
}

/// A region that lies: queue 0 claims every entry in flight with the next links in a cycle
/// and equal counters, a last_batch_head and a used_idx out of range. Then the ring starts on it.
pub fn hostile_region(ctx: &mut Ctx) -> Outcome {
    let s = match inflight_session(ctx) {
        Ok(s) => s,
        Err(o) => return o,
    };
    let queues = ctx.queues();
    let Some(size) = region_size(queues, RING_SIZE, InflightLayout::Split) else {
        return setup_failed("region size".into());
    };
    let file = match memfd(c"vmm-probe-inflight", size, true) {
        Ok(f) => f,
        Err(e) => return setup_failed(e.to_string()),
    };
    if let Err(e) = write_lying_region(&file) {
        return setup_failed(e);
    }
    let (_ram, fds) = match ring_setup(&s, true) {
        Ok(r) => r,
        Err(o) => return o,
    };
    let d = InflightDescription {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: queues,
        queue_size: RING_SIZE,
    };
    let ack = s.ack(ProbeMessage::set_inflight(d, vec![file.into()], false));
    if ack.is_refusal() {
        return Outcome::Pass(format!("the lying region: {}", ack.describe()));
    }
    if let Err(e) = start_queue0(
        &s,
        &fds,
        has(ctx.identity.features, VHOST_USER_F_PROTOCOL_FEATURES),
    ) {
        return Outcome::Pass(format!("region {}; starting the ring: {e}", ack.describe()));
    }
    std::thread::sleep(Duration::from_millis(100));
    match s.raw.call(&ProbeMessage::vring_state(
        Request::GetVringBase,
        0,
        0,
        false,
    )) {
        Answer::Reply { .. } => Outcome::Pass(format!(
            "region {}; the ring started on it and stopped again (GET_VRING_BASE answered)",
            ack.describe()
        )),
        Answer::Closed => Outcome::Pass(format!(
            "region {}; the connection was closed once the ring started",
            ack.describe()
        )),
        other => Outcome::Fail(format!(
            "region {}; after the ring started on it, GET_VRING_BASE got {}",
            ack.describe(),
            other.describe()
        )),
    }
}

fn write_lying_region(file: &File) -> Result<(), String> {
    let put = |at: usize, bytes: &[u8]| {
        file.write_all_at(bytes, at as u64)
            .map_err(|e| format!("writing the region: {e}"))
    };
    put(HDR_VERSION, &1u16.to_le_bytes())?;
    put(HDR_DESC_NUM, &RING_SIZE.to_le_bytes())?;
    put(SPLIT_HDR_LAST_BATCH_HEAD, &0xfff0u16.to_le_bytes())?;
    put(SPLIT_HDR_USED_IDX, &0x7777u16.to_le_bytes())?;
    for desc in 0..RING_SIZE {
        let entry = split_entry_offset(desc);
        put(entry + SPLIT_ENTRY_INFLIGHT, &[1])?;
        put(
            entry + SPLIT_ENTRY_NEXT,
            &((desc + 1) % RING_SIZE).to_le_bytes(),
        )?;
        put(entry + SPLIT_ENTRY_COUNTER, &7u64.to_le_bytes())?;
    }
    Ok(())
}
