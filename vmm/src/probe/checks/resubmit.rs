//! inflight-resubmit: does recovery resubmit exactly what a region records as in flight?
//!
//! The probe plays a frontend whose backend died mid-I/O: it writes the inflight region by hand
//! and hands it to a fresh connection with a ring that says every request was already fetched.
//!
//! ```text
//!  request  head  region entry          used ring           right recovery
//!  A        0     inflight, counter 1   -                   resubmitted (1st)
//!  B        3     inflight, counter 3   -                   resubmitted (3rd)
//!  C        6     inflight, counter 4,  used[0] = C         NOT run again: completed out of
//!                 last_batch_head       (used idx 1, region  order and published; the region
//!                                       used_idx still 0)    had not been closed yet
//!  D        9     inflight, counter 2   -                   resubmitted (2nd)
//! ```
//! All four are virtio-blk writes of a pattern to their own sector, with the status byte
//! preset to 0x55. Then the probe watches the used ring (A, B, D once each, no C), the status
//! bytes (C's untouched: it never ran again), the region (A, B, D no longer in flight), and the
//! disk (reads of A's, B's and D's sectors return their patterns).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use vhost_frontend::features::{
    bit_mask, has, PROTOCOL_INFLIGHT_SHMFD, VHOST_USER_F_PROTOCOL_FEATURES,
};
use vhost_frontend::probe::fds::{add_to_eventfd, memfd};
use vhost_frontend::probe::ProbeMessage;
use vhost_frontend::wire::inflight::{
    region_size, split_entry_offset, HDR_DESC_NUM, HDR_VERSION, SPLIT_ENTRY_COUNTER,
    SPLIT_ENTRY_INFLIGHT, SPLIT_HDR_LAST_BATCH_HEAD, SPLIT_HDR_USED_IDX,
};
use vhost_frontend::wire::{InflightDescription, InflightLayout, MemoryRegion};

use super::setup_failed;
use crate::probe::context::{Ctx, DeviceGuess, Session};
use crate::probe::rings::{configure_queue, start_queue0, write_descriptor, RingFds, RAM_SIZE, VA};
use crate::probe::Outcome;

const SIZE: u16 = 32;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x10200;
const USED: u64 = 0x10400;
const HEADERS: u64 = 0x20000;
const DATA: u64 = 0x40000;
const STATUS: u64 = 0x60000;
const READS: u64 = 0x80000;
const UNTOUCHED: u8 = 0x55;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;

/// (name, head, counter) of the four writes; C (index 2) is the published one.
const WRITES: [(&str, u16, u64); 4] = [("A", 0, 1), ("B", 3, 3), ("C", 6, 4), ("D", 9, 2)];
const PUBLISHED: usize = 2;

fn sector(i: usize) -> u64 {
    100 + 8 * i as u64
}

fn pattern(i: usize) -> u8 {
    0xa0 + i as u8
}

pub fn resubmit(ctx: &mut Ctx) -> Outcome {
    if ctx.identity.device != DeviceGuess::Blk {
        return Outcome::NotApplicable("builds virtio-blk requests; the device is not blk".into());
    }
    if !ctx.inflight_offered() {
        return Outcome::NotApplicable(
            "INFLIGHT_SHMFD not offered: recovery from a region cannot be negotiated".into(),
        );
    }
    let s = match ctx.session_with(bit_mask(PROTOCOL_INFLIGHT_SHMFD)) {
        Ok(s) => s,
        Err(e) => return setup_failed(e),
    };
    match run(ctx, &s) {
        Ok(Ok(evidence)) => Outcome::Pass(evidence),
        Ok(Err(wrong)) => Outcome::Fail(wrong),
        Err(setup) => setup_failed(setup),
    }
}

/// `Err`: set-up failed; `Ok(Err)`: the recovery was wrong.
fn run(ctx: &Ctx, s: &Session) -> Result<Result<String, String>, String> {
    let ram = memfd(c"vmm-probe-ram", RAM_SIZE, true).map_err(|e| format!("memfd: {e}"))?;
    let w = |at: u64, bytes: &[u8]| ram.write_all_at(bytes, at).map_err(|e| format!("RAM: {e}"));
    for (i, &(_, head, _)) in WRITES.iter().enumerate() {
        request(
            &ram,
            i as u64,
            head,
            BLK_T_OUT,
            sector(i),
            DATA + 0x1000 * i as u64,
            false,
        )?;
        w(DATA + 0x1000 * i as u64, &[pattern(i); 512])?;
        // avail ring: every write made available (and, the ring base says, fetched).
        w(AVAIL + 4 + 2 * i as u64, &head.to_le_bytes())?;
    }
    w(AVAIL + 2, &4u16.to_le_bytes())?;
    // used ring: C published.
    w(USED + 4, &u32::from(WRITES[PUBLISHED].1).to_le_bytes())?;
    w(USED + 8, &1u32.to_le_bytes())?;
    w(USED + 2, &1u16.to_le_bytes())?;

    let queues = ctx.queues();
    let size = region_size(queues, SIZE, InflightLayout::Split).ok_or("region size")?;
    let region = memfd(c"vmm-probe-inflight", size, true).map_err(|e| format!("memfd: {e}"))?;
    let r = |at: usize, bytes: &[u8]| {
        region
            .write_all_at(bytes, at as u64)
            .map_err(|e| format!("region: {e}"))
    };
    r(HDR_VERSION, &1u16.to_le_bytes())?;
    r(HDR_DESC_NUM, &SIZE.to_le_bytes())?;
    r(
        SPLIT_HDR_LAST_BATCH_HEAD,
        &WRITES[PUBLISHED].1.to_le_bytes(),
    )?;
    r(SPLIT_HDR_USED_IDX, &0u16.to_le_bytes())?;
    for &(_, head, counter) in &WRITES {
        let entry = split_entry_offset(head);
        r(entry + SPLIT_ENTRY_INFLIGHT, &[1])?;
        r(entry + SPLIT_ENTRY_COUNTER, &counter.to_le_bytes())?;
    }

    let table = MemoryRegion {
        guest_phys_addr: 0,
        memory_size: RAM_SIZE,
        userspace_addr: VA,
        mmap_offset: 0,
    };
    let ram_fd = OwnedFd::from(ram.try_clone().map_err(|e| e.to_string())?);
    s.setup(ProbeMessage::mem_table(vec![table], vec![ram_fd], false))?;
    let region_fd = OwnedFd::from(region.try_clone().map_err(|e| e.to_string())?);
    let d = InflightDescription {
        mmap_size: size,
        mmap_offset: 0,
        num_queues: queues,
        queue_size: SIZE,
    };
    s.setup(ProbeMessage::set_inflight(d, vec![region_fd], false))?;
    configure_queue(s, SIZE, 4, [DESC, AVAIL, USED])?;
    let fds = RingFds::new()?;
    start_queue0(
        s,
        &fds,
        has(ctx.identity.features, VHOST_USER_F_PROTOCOL_FEATURES),
    )?;

    // Recovery runs as the ring starts; A, B and D come back on the used ring.
    let Some(used) = wait_used(&ram, 4) else {
        let now = read_u16(&ram, USED + 2);
        return Ok(Err(format!(
            "the used index went from 1 to {}, not 4, within 5 s: the three requests the \
             region holds in flight were not all resubmitted",
            now.map_or_else(|| "?".into(), |n| n.to_string())
        )));
    };
    let mut wrong = Vec::new();
    let heads: Vec<u16> = (1..used).map(|i| used_id(&ram, i)).collect();
    let name = |head: u16| {
        WRITES
            .iter()
            .find(|w| w.1 == head)
            .map_or_else(|| format!("head {head}"), |w| w.0.to_string())
    };
    let order: Vec<String> = heads.iter().map(|&h| name(h)).collect();
    let mut sorted = order.clone();
    sorted.sort();
    if sorted != ["A", "B", "D"] {
        wrong.push(format!(
            "used ring after recovery holds {order:?}, not A, B and D once each"
        ));
    }
    for (i, &(n, head, _)) in WRITES.iter().enumerate() {
        let mut status = [0u8];
        let _ = ram.read_exact_at(&mut status, STATUS + 0x10 * i as u64);
        let mut inflight = [0u8];
        let _ = region.read_exact_at(
            &mut inflight,
            (split_entry_offset(head) + SPLIT_ENTRY_INFLIGHT) as u64,
        );
        match (i == PUBLISHED, status[0]) {
            (true, UNTOUCHED) => {}
            (true, st) => wrong.push(format!(
                "C (completed and published before the crash) ran again: status {st:#x}"
            )),
            (false, 0) => {}
            (false, st) => wrong.push(format!("{n}: status {st:#x} after its resubmission")),
        }
        if i != PUBLISHED && inflight[0] != 0 {
            wrong.push(format!(
                "{n} is still marked in flight in the region after completing"
            ));
        }
    }
    // The disk: read back A's, B's and D's sectors.
    for (slot, &i) in [0usize, 1, 3].iter().enumerate() {
        let head = 12 + 3 * slot as u16;
        request(
            &ram,
            4 + slot as u64,
            head,
            BLK_T_IN,
            sector(i),
            READS + 0x1000 * slot as u64,
            true,
        )?;
        w(AVAIL + 4 + 2 * (4 + slot as u64), &head.to_le_bytes())?;
    }
    w(AVAIL + 2, &7u16.to_le_bytes())?;
    add_to_eventfd(&fds.kick, 1).map_err(|e| e.to_string())?;
    if wait_used(&ram, 7).is_none() {
        wrong.push("the three read-backs did not complete in 5 s".into());
    } else {
        for (slot, &i) in [0usize, 1, 3].iter().enumerate() {
            let mut got = [0u8; 512];
            let _ = ram.read_exact_at(&mut got, READS + 0x1000 * slot as u64);
            if got != [pattern(i); 512] {
                wrong.push(format!(
                    "{}'s sector {} does not hold its data after recovery (first byte {:#x})",
                    WRITES[i].0,
                    sector(i),
                    got[0]
                ));
            }
        }
    }
    Ok(if wrong.is_empty() {
        Ok(format!(
            "resubmitted A, B, D (completion order {}), not the published C; statuses OK; \
             region entries cleared; the disk holds all three",
            order.join(", ")
        ))
    } else {
        Err(wrong.join("; "))
    })
}

/// A three-descriptor blk request: header (type, sector), 512-byte data, status (preset 0x55).
fn request(
    ram: &File,
    slot: u64,
    head: u16,
    kind: u32,
    sector: u64,
    data: u64,
    device_writes_data: bool,
) -> Result<(), String> {
    let w = |at: u64, bytes: &[u8]| ram.write_all_at(bytes, at).map_err(|e| format!("RAM: {e}"));
    let header_at = HEADERS + 0x100 * slot;
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&kind.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    w(header_at, &header)?;
    let status_at = STATUS + 0x10 * slot;
    w(status_at, &[UNTOUCHED])?;
    let data_flags = 1 | if device_writes_data { 2 } else { 0 };
    let descs = [
        (header_at, 16u32, 1u16, head + 1),
        (data, 512, data_flags, head + 2),
        (status_at, 1, 2, 0),
    ];
    for (k, (addr, len, flags, next)) in descs.into_iter().enumerate() {
        write_descriptor(
            ram,
            DESC,
            u64::from(head) + k as u64,
            addr,
            len,
            flags,
            next,
        )?;
    }
    Ok(())
}

fn read_u16(ram: &File, at: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    ram.read_exact_at(&mut b, at).ok()?;
    Some(u16::from_le_bytes(b))
}

fn used_id(ram: &File, i: u16) -> u16 {
    let mut b = [0u8; 4];
    let _ = ram.read_exact_at(&mut b, USED + 4 + 8 * u64::from(i % SIZE));
    u32::from_le_bytes(b) as u16
}

/// Waits (5 s) for the used index to reach `want`; the index reached.
fn wait_used(ram: &File, want: u16) -> Option<u16> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if read_u16(ram, USED + 2) == Some(want) {
            return Some(want);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}
