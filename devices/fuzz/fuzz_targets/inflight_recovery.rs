//! Inflight recovery on a hostile or torn region: the fuzz input becomes one queue's inflight
//! region (what a crashed backend, or a hostile frontend, left in the SET_INFLIGHT_FD memfd), the
//! ring's size and its guest-visible used idx, and goes through what a ring start does:
//! `InflightMap::map` of a sealed memfd, `QueueTracker::recover`, the resubmitted heads parsed
//! from a fuzz descriptor table with `ResubmitParser`, then tracking a few more requests.
//!
//! Properties checked:
//! - no panic, no out-of-bounds access (ASan), no unbounded loop (libFuzzer's -timeout), no fd
//!   left open;
//! - a refused region is left exactly as it was (every check comes before any write);
//! - an accepted one: the resubmitted heads are distinct, below the ring size, and afterwards
//!   exactly the entries the region shows inflight; the region then says version 1, desc_num =
//!   ring size, used_idx = the ring's; a second recovery finds the same heads and nothing to roll
//!   back (recovery is idempotent, so a crash during recovery is harmless);
//! - each resubmitted head parses into a request for that head.
#![no_main]

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use devices::blk::inflight::{QueueTracker, ResubmitParser};
use devices::vhost_user_server::inflight_region::{InflightLimits, InflightMap};
use fuzz_support::FdLeakCheck;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost_frontend::wire::inflight::{queue_region_size, SplitQueue};
use vhost_frontend::wire::{InflightDescription, InflightLayout, MAX_QUEUE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Largest region (entries) built here: 256 entries is a 4160-byte region, fast per input.
const MAX_CAPACITY_LOG2: u32 = 8;

fuzz_target!(|data: &[u8]| {
    let leaks = FdLeakCheck::start();
    let _ = run(&mut Unstructured::new(data));
    leaks.assert_none_leaked("inflight recovery");
});

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let capacity: u16 = 1 << u.int_in_range(0..=MAX_CAPACITY_LOG2)?;
    // Mostly a ring the region can hold; sometimes one twice its size (refused).
    let ring_size: u16 = if u.ratio(1, 8)? {
        capacity.saturating_mul(2).min(MAX_QUEUE_SIZE)
    } else {
        1 << u.int_in_range(0..=capacity.trailing_zeros())?
    };
    let ring_used_idx: u16 = u.arbitrary()?;
    let len = queue_region_size(capacity, InflightLayout::Split).expect("in limits") as usize;
    let mut bytes = vec![0u8; len];
    u.fill_buffer(&mut bytes)?;
    if u.ratio(3, 4)? {
        // A plausible header, so the batch and resubmit paths run: version 0 or 1, desc_num =
        // the ring, a last batch of a few entries before the ring's used idx.
        let version: u16 = u.int_in_range(0..=1)?;
        let batch: u16 = u.int_in_range(0..=ring_size.min(4))?;
        let head: u16 = u.int_in_range(0..=ring_size - 1)?;
        bytes[8..10].copy_from_slice(&version.to_le_bytes());
        bytes[10..12].copy_from_slice(&ring_size.to_le_bytes());
        bytes[12..14].copy_from_slice(&head.to_le_bytes());
        bytes[14..16].copy_from_slice(&ring_used_idx.wrapping_sub(batch).to_le_bytes());
        // Links of the batch list mostly inside the ring.
        for entry in bytes[16..].chunks_exact_mut(16) {
            let next = u16::from_le_bytes([entry[6], entry[7]]);
            if next >= ring_size && !u.ratio(1, 16)? {
                entry[6..8].copy_from_slice(&(next % ring_size).to_le_bytes());
            }
        }
    }

    let memfd = sealed_memfd(&bytes);
    let description = InflightDescription {
        mmap_size: len as u64,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: capacity,
    };
    let limits = InflightLimits {
        device_queues: 1,
        max_queue_size: MAX_QUEUE_SIZE,
    };
    let fd = memfd.try_clone().expect("dup memfd").into();
    let map = InflightMap::map(fd, &description, limits).expect("a well-formed SET is accepted");
    let region = map.queue(0).expect("queue 0");

    let (mut tracker, recovery) =
        match QueueTracker::recover(region.clone(), ring_size, ring_used_idx) {
            Err(_) => {
                assert_eq!(region.snapshot(), bytes, "a refused region was written");
                return Ok(());
            }
            Ok(recovered) => recovered,
        };
    let distinct: HashSet<u16> = recovery.resubmit.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        recovery.resubmit.len(),
        "a head resubmitted twice"
    );
    assert!(recovery.resubmit.iter().all(|&h| h < ring_size));
    assert!(recovery.rolled_back <= usize::from(ring_size));
    let copy = region.snapshot();
    let view = SplitQueue::decode(0, capacity, &copy).expect("a recovered region decodes");
    let header = view.header();
    assert_eq!(
        (header.version, header.desc_num, header.used_idx),
        (1, ring_size, ring_used_idx)
    );
    let inflight: HashSet<u16> = view
        .entries()
        .filter(|e| e.inflight)
        .map(|e| e.desc)
        .collect();
    assert_eq!(
        inflight, distinct,
        "the region's inflight set is what gets resubmitted"
    );
    let _ = recovery.summary(0);

    let again = QueueTracker::recover(region.clone(), ring_size, ring_used_idx)
        .expect("a recovered region recovers again")
        .1;
    assert_eq!(
        again.resubmit, recovery.resubmit,
        "recovery is not idempotent"
    );
    assert_eq!(again.rolled_back, 0);

    // The resubmitted heads, parsed from a fuzz descriptor table in a small guest memory.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
    let table = u.bytes((16 * usize::from(ring_size)).min(u.len()))?;
    mem.write_slice(table, GuestAddress(0))
        .expect("table in memory");
    let mut parser =
        ResubmitParser::new(&mem, GuestAddress(0), ring_size, 0).expect("a scratch page");
    for &head in &recovery.resubmit {
        assert_eq!(parser.parse(head).head, head);
    }

    // Then tracking goes on: fetches and batches with fuzz heads, and one more recovery.
    for _ in 0..u.int_in_range(0..=8)? {
        let head: u16 = u.arbitrary()?;
        tracker.mark_fetched(head % ring_size.saturating_mul(2));
        if u.arbitrary()? {
            tracker.begin_batch(&[head % ring_size]);
            tracker.end_batch(&[head % ring_size], u.arbitrary()?);
        }
    }
    let _ = QueueTracker::recover(region, ring_size, u.arbitrary()?);
    Ok(())
}

/// A memfd holding `bytes`, sealed against shrinking as SET_INFLIGHT_FD requires.
fn sealed_memfd(bytes: &[u8]) -> File {
    // SAFETY: a NUL-terminated name; memfd_create reads nothing else.
    let fd = unsafe {
        libc::memfd_create(
            c"fuzz-inflight".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes.len() as u64).expect("memfd size");
    file.write_all_at(bytes, 0).expect("memfd contents");
    // SAFETY: F_ADD_SEALS with an integer argument on an fd we own.
    let sealed = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(sealed, 0, "F_ADD_SEALS");
    file
}
