//! Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), the backend's side: a region of
//! shared memory, kept by the frontend, where the backend records which requests it has taken from
//! the avail ring and not yet completed. A backend killed at any instruction and started again
//! reads it back, resubmits exactly those requests, and the guest never notices. Spec: QEMU
//! docs/interop/vhost-user.rst, "Inflight I/O tracking"; the layout (one definition for both
//! sides) is `vhost_frontend::wire::inflight`.
//!
//! The region itself (GET hands it out, SET maps it, each queue's part of it) is the protocol
//! server's: `crate::vhost_user_server::inflight_region`. This module is what the queue worker
//! writes into a queue's part, and how a ring recovers from it.
//!
//! ```text
//!  frontend                         backend
//!  GET_INFLIGHT_FD(queues, size) ─► new_region_memfd: sealed, zeroed memfd ──► reply + fd
//!  SET_INFLIGHT_FD(fd, geometry) ─► InflightMap::map: checked, mapped MAP_SHARED, fd closed
//!  ring starts (queue worker)    ─► QueueTracker::recover: fresh → stamp version 1; else roll the
//!                                    last batch back, resubmit the inflight heads (counter order)
//!  head leaves the avail ring    ─► mark_fetched:  desc[head].counter = n++, then inflight = 1
//!  request done                  ─► begin_batch:   link the batch, last_batch_head = first
//!                                   (add_used:      used elem, then used->idx, in guest memory)
//!                                   end_batch:     inflight = 0 for each, then used_idx = ring's
//!  backend SIGKILLed ...            the frontend keeps the memfd; a fresh backend gets SET again
//! ```
//!
//! Why that order recovers every request exactly once: under the queue lock a popped head is
//! marked before anything else happens to it, so every head consumed from the avail ring is either
//! in the used ring or marked inflight, except during a completion, between the used->idx store
//! and the clearing of the batch. Recovery sees that window as `used->idx != region used_idx` and
//! clears the whole batch (the `used->idx - used_idx` entries linked from `last_batch_head`:
//! libvhost-user and DPDK clear only `desc[last_batch_head]`, which repeats a completed request
//! from a larger batch, and DPDK's default head 0 drops a genuinely inflight desc 0, SPDK issue
//! #3766). Then `next_avail = used->idx + resubmitted`: the next position never consumed.
//!
//! Every store to the region is an atomic store, `Release` where its order matters: the
//! frontend (and the next backend) read the region after we die at any instruction, so program
//! order must be memory order. Every value read back from the region is a private copy
//! (`QueueRegion::snapshot`), decoded and bounds-checked by the wire module's views.
//!
//! The region a frontend hands over with SET must be sealed against shrinking (F_SEAL_SHRINK):
//! a mapping whose file shrinks raises SIGBUS on the next store, and the stores here happen on
//! I/O threads in the middle of a completion, where the guest-memory guard (`memory_faults`,
//! which fails one request and ends the session) has nothing to fail. Every implementation that
//! allocates inflight memfds (QEMU, DPDK, libvhost-user, this module) seals them, so the rule
//! costs an honest frontend nothing.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vhost_frontend::wire::inflight::{
    SplitQueue, HDR_DESC_NUM, HDR_VERSION, INFLIGHT_VERSION, SPLIT_ENTRY_COUNTER,
    SPLIT_ENTRY_INFLIGHT, SPLIT_ENTRY_NEXT, SPLIT_HDR_LAST_BATCH_HEAD, SPLIT_HDR_USED_IDX,
};
use vhost_frontend::wire::InflightError;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

use super::request::{BlkRequest, RequestError};
use crate::vhost_user_server::inflight_region::QueueRegion;

/// Why a ring with an inflight region cannot start. The ring stays stopped (err fd written);
/// nothing was resubmitted.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// The region's header or last-batch list is out of range (the error names the queue).
    #[error("{0}")]
    Region(#[from] InflightError),
    #[error(
        "queue {queue}: ring of {ring_size} entries, but the inflight region holds {capacity} per \
         queue"
    )]
    RingLargerThanRegion {
        queue: u16,
        ring_size: u16,
        capacity: u16,
    },
    #[error(
        "queue {queue}: the inflight region records a ring of {desc_num} entries, this ring has \
         {ring_size}"
    )]
    DescNumMismatch {
        queue: u16,
        desc_num: u16,
        ring_size: u16,
    },
    #[error("queue {queue}: inflight head {head} is outside the ring of {ring_size}")]
    HeadOutOfRange {
        queue: u16,
        head: u16,
        ring_size: u16,
    },
    #[error("queue {queue}: no room in guest physical address space to parse resubmitted heads")]
    NoScratchSpace { queue: u16 },
}

/// What a ring start found in its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Version 0: a fresh buffer, now stamped; nothing to resubmit.
    pub fresh: bool,
    /// Entries of the last batch that were published but not yet cleared, now cleared.
    pub rolled_back: usize,
    /// Heads to run again before any new chain, oldest fetch first.
    pub resubmit: Vec<u16>,
}

impl Recovery {
    /// The one log line per ring start (tests grep for "resubmitting").
    pub fn summary(&self, queue: u16) -> String {
        if self.fresh {
            return format!("queue {queue}: inflight region is fresh; tracking from now on");
        }
        const SHOWN: usize = 32;
        let mut heads: Vec<String> = self
            .resubmit
            .iter()
            .take(SHOWN)
            .map(u16::to_string)
            .collect();
        if self.resubmit.len() > SHOWN {
            heads.push(format!("... {} more", self.resubmit.len() - SHOWN));
        }
        format!(
            "queue {queue}: inflight recovery: rolled back {} of the last batch, resubmitting {} \
             requests (heads [{}])",
            self.rolled_back,
            self.resubmit.len(),
            heads.join(", ")
        )
    }
}

/// The writer of one queue's region, owned by its queue worker and used under the queue lock.
#[derive(Debug)]
pub struct QueueTracker {
    region: QueueRegion,
    ring_size: u16,
    /// Fetch order for the next head taken from the avail ring.
    next_counter: u64,
}

/// How recovery treats the last batch: published (the used ring moved) but not closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollback {
    /// Every entry of it completed: none runs again. The only right answer.
    WholeBatch,
    /// Only its head is taken as completed (planted flaw `RollBackOneEntry`).
    OnlyTheHead,
}

impl QueueTracker {
    /// Reads the region back when ring `region.index()` (of `ring_size` entries, whose
    /// guest-visible used->idx is `ring_used_idx`) starts: stamps a fresh region, or rolls back
    /// the last batch and lists the heads to resubmit. Only bounded work: at most two passes over
    /// `ring_size` entries, whatever the region says.
    pub fn recover(
        region: QueueRegion,
        ring_size: u16,
        ring_used_idx: u16,
    ) -> Result<(QueueTracker, Recovery), RecoveryError> {
        Self::recover_with(region, ring_size, ring_used_idx, Rollback::WholeBatch)
    }

    /// [`QueueTracker::recover`], rolling back the last batch as `rollback` says (anything but
    /// `WholeBatch` is the planted flaw of `planted_flaw`).
    pub fn recover_with(
        region: QueueRegion,
        ring_size: u16,
        ring_used_idx: u16,
        rollback: Rollback,
    ) -> Result<(QueueTracker, Recovery), RecoveryError> {
        let queue = region.index();
        let capacity = region.capacity();
        if ring_size == 0 || ring_size > capacity {
            return Err(RecoveryError::RingLargerThanRegion {
                queue,
                ring_size,
                capacity,
            });
        }
        let copy = region.snapshot();
        let view = SplitQueue::decode(queue, capacity, &copy)?;
        let header = view.header();
        let tracker = |next_counter| QueueTracker {
            region: region.clone(),
            ring_size,
            next_counter,
        };
        if header.version == 0 {
            // A fresh buffer (GET gave zeros). Entries are cleared anyway: a frontend's stale
            // bytes must not be resubmitted after a later crash. Version last, so a crash in
            // between leaves a region that is still "fresh".
            for desc in 0..ring_size {
                region.store_u8(
                    QueueRegion::entry_field(desc, SPLIT_ENTRY_INFLIGHT),
                    0,
                    Ordering::Relaxed,
                );
            }
            region.store_u16(HDR_DESC_NUM, ring_size, Ordering::Relaxed);
            region.store_u16(SPLIT_HDR_LAST_BATCH_HEAD, 0, Ordering::Relaxed);
            region.store_u16(SPLIT_HDR_USED_IDX, ring_used_idx, Ordering::Relaxed);
            region.store_u16(HDR_VERSION, INFLIGHT_VERSION, Ordering::Release);
            let fresh = Recovery {
                fresh: true,
                rolled_back: 0,
                resubmit: Vec::new(),
            };
            return Ok((tracker(0), fresh));
        }
        if header.desc_num != ring_size {
            return Err(RecoveryError::DescNumMismatch {
                queue,
                desc_num: header.desc_num,
                ring_size,
            });
        }
        // Published (used->idx moved) but not cleared: the whole batch, not just its head.
        let mut batch = view.last_batch(ring_used_idx)?;
        if rollback == Rollback::OnlyTheHead {
            batch.truncate(1);
        }
        let mut completed = vec![false; usize::from(ring_size)];
        let mut rolled_back = 0;
        for &desc in &batch {
            // last_batch stays inside desc_num == ring_size; a looping list repeats entries.
            if let Some(seen) = completed.get_mut(usize::from(desc)) {
                if !*seen {
                    *seen = true;
                    rolled_back += 1;
                }
            }
        }
        let mut resubmit = Vec::new();
        let mut next_counter = 0u64;
        for (desc, counter) in view.inflight_descs_in_counter_order() {
            if desc >= ring_size {
                return Err(RecoveryError::HeadOutOfRange {
                    queue,
                    head: desc,
                    ring_size,
                });
            }
            if completed[usize::from(desc)] {
                continue;
            }
            resubmit.push(desc);
            // Sorted by counter: the last one kept is the largest. Saturating: a hostile
            // u64::MAX only makes later ties, which resolve by descriptor index.
            next_counter = counter.saturating_add(1);
        }
        // The writes, in the order a later crash can take at any point.
        for (desc, _) in completed.iter().enumerate().filter(|(_, done)| **done) {
            // desc < ring_size <= u16::MAX + 1; the cast cannot truncate.
            region.store_u8(
                QueueRegion::entry_field(desc as u16, SPLIT_ENTRY_INFLIGHT),
                0,
                Ordering::Release,
            );
        }
        region.store_u16(SPLIT_HDR_USED_IDX, ring_used_idx, Ordering::Release);
        let recovery = Recovery {
            fresh: false,
            rolled_back,
            resubmit,
        };
        Ok((tracker(next_counter), recovery))
    }

    pub fn ring_size(&self) -> u16 {
        self.ring_size
    }

    pub fn region(&self) -> &QueueRegion {
        &self.region
    }

    /// `head` left the avail ring: record its fetch order, then mark it inflight (in that order
    /// in memory, so an inflight entry always has its counter). Before any I/O of the request.
    pub fn mark_fetched(&mut self, head: u16) {
        if head >= self.ring_size {
            return; // the caller breaks the ring for such a head; nothing to record
        }
        let counter = self.next_counter;
        self.next_counter = self.next_counter.saturating_add(1);
        self.region.store_u64(
            QueueRegion::entry_field(head, SPLIT_ENTRY_COUNTER),
            counter,
            Ordering::Relaxed,
        );
        self.region.store_u8(
            QueueRegion::entry_field(head, SPLIT_ENTRY_INFLIGHT),
            1,
            Ordering::Release,
        );
    }

    /// Before publishing `heads` to the used ring (in this order): links them through `next`
    /// and points `last_batch_head` at the first, so recovery can find all of them.
    pub fn begin_batch(&self, heads: &[u16]) {
        let Some(&first) = heads.first() else { return };
        if heads.iter().any(|&h| h >= self.ring_size) {
            return;
        }
        for pair in heads.windows(2) {
            self.region.store_u16(
                QueueRegion::entry_field(pair[0], SPLIT_ENTRY_NEXT),
                pair[1],
                Ordering::Relaxed,
            );
        }
        self.region
            .store_u16(SPLIT_HDR_LAST_BATCH_HEAD, first, Ordering::Release);
    }

    /// After `heads` are in the used ring and its idx is `used_idx`: clears each, then records
    /// `used_idx`, which closes the batch.
    pub fn end_batch(&self, heads: &[u16], used_idx: u16) {
        for &head in heads.iter().filter(|&&h| h < self.ring_size) {
            self.region.store_u8(
                QueueRegion::entry_field(head, SPLIT_ENTRY_INFLIGHT),
                0,
                Ordering::Release,
            );
        }
        self.region
            .store_u16(SPLIT_HDR_USED_IDX, used_idx, Ordering::Release);
    }
}

/// Parses a resubmitted head from the descriptor table exactly as a popped chain is parsed
/// (virtio-queue's own chain walker: indirect tables, loop and length limits, then
/// `BlkRequest::parse`), although no avail ring entry names it any more.
///
/// virtio-queue 0.18 makes `DescriptorChain::new` crate-private: a chain comes only from
/// `Queue::iter`, which reads its head from an avail ring. So the parser owns a private one-entry
/// avail ring in a page of its own memory, mapped at a guest physical address no guest region
/// uses, next to the guest's own regions (shared, not copied) in a private `GuestMemoryMmap`, and
/// a private `Queue` on the real descriptor table. The guest's memory is never written. A
/// descriptor that names the private page (outside the guest's memory, so an error for a popped
/// chain) reads its bytes: a header there is type 0x10000, answered UNSUPP; buffers are checked
/// against the guest's own memory when the request runs, so nothing is written there.
pub struct ResubmitParser {
    memory: GuestMemoryMmap,
    avail: GuestAddress,
    queue: Queue,
}

impl std::fmt::Debug for ResubmitParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResubmitParser")
            .field("avail", &self.avail)
            .finish_non_exhaustive()
    }
}

const SCRATCH_PAGE: u64 = 4096;

impl ResubmitParser {
    pub fn new(
        guest: &GuestMemoryMmap,
        desc_table: GuestAddress,
        ring_size: u16,
        queue: u16,
    ) -> Result<Self, RecoveryError> {
        let no_room = || RecoveryError::NoScratchSpace { queue };
        let avail = scratch_address(guest).ok_or_else(no_room)?;
        let page = MmapRegion::new(SCRATCH_PAGE as usize).map_err(|_| no_room())?;
        let region = GuestRegionMmap::new(page, avail).ok_or_else(no_room)?;
        let memory = guest
            .insert_region(Arc::new(region))
            .map_err(|_| no_room())?;
        let mut ring = Queue::new(ring_size).map_err(|_| no_room())?;
        ring.try_set_desc_table_address(desc_table)
            .map_err(|_| no_room())?;
        ring.try_set_avail_ring_address(avail)
            .map_err(|_| no_room())?;
        // Never written (nothing is added to this queue's used ring), but must be set.
        ring.try_set_used_ring_address(GuestAddress(avail.0 + SCRATCH_PAGE / 2))
            .map_err(|_| no_room())?;
        ring.set_ready(true);
        Ok(ResubmitParser {
            memory,
            avail,
            queue: ring,
        })
    }

    /// The request whose chain starts at `head` (already checked to be below the ring size).
    pub fn parse(&mut self, head: u16) -> BlkRequest {
        let unparsable = BlkRequest {
            head,
            status_addr: None,
            body: Err(RequestError::Malformed(
                "resubmitted head could not be read back",
            )),
        };
        // The private avail ring: flags 0, idx 1, ring[0] = head; the queue consumes entry 0.
        let mut ring = [0u8; 6];
        ring[2..4].copy_from_slice(&1u16.to_le_bytes());
        ring[4..6].copy_from_slice(&head.to_le_bytes());
        if self.memory.write_slice(&ring, self.avail).is_err() {
            return unparsable;
        }
        self.queue.set_next_avail(0);
        let chain = match self.queue.iter(&self.memory) {
            Ok(mut chains) => chains.next(),
            Err(_) => None,
        };
        match chain {
            Some(chain) => BlkRequest::parse(chain),
            None => unparsable,
        }
    }
}

/// A page-aligned guest physical page that no guest region touches and is not page 0 (which
/// virtio-queue takes for "avail ring not set"): page 1, or the page after some region's end.
fn scratch_address(guest: &GuestMemoryMmap) -> Option<GuestAddress> {
    let free = |start: u64| {
        let Some(end) = start.checked_add(SCRATCH_PAGE) else {
            return false;
        };
        guest
            .iter()
            .all(|r| r.last_addr().0 < start || r.start_addr().0 >= end)
    };
    std::iter::once(SCRATCH_PAGE)
        .chain(guest.iter().filter_map(|r| {
            r.last_addr()
                .0
                .checked_add(1)?
                .checked_next_multiple_of(SCRATCH_PAGE)
        }))
        .find(|&start| free(start))
        .map(GuestAddress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{
        guest_memory, pop_chain, request_header, sealed_memfd, TestRing, VIRTQ_DESC_F_NEXT,
        VIRTQ_DESC_F_WRITE,
    };
    use crate::vhost_user_server::inflight_region::{InflightLimits, InflightMap, LAYOUT};
    use vhost_frontend::wire::inflight::{queue_region_size, split_entry_offset};
    use vhost_frontend::wire::{InflightDescription, MAX_QUEUE_SIZE};

    /// A split queue header, as a crafted region says it.
    #[derive(Clone, Copy)]
    struct Header {
        version: u16,
        desc_num: u16,
        last_batch_head: u16,
        used_idx: u16,
    }

    /// One entry: (desc, inflight byte, next, counter).
    type Entry = (u16, u8, u16, u64);

    /// One queue region of `queue_size` entries holding `header` and `entries`.
    fn queue_bytes(queue_size: u16, h: Header, entries: &[Entry]) -> Vec<u8> {
        let len = queue_region_size(queue_size, LAYOUT).unwrap() as usize;
        let mut b = vec![0u8; len];
        b[HDR_VERSION..HDR_VERSION + 2].copy_from_slice(&h.version.to_le_bytes());
        b[HDR_DESC_NUM..HDR_DESC_NUM + 2].copy_from_slice(&h.desc_num.to_le_bytes());
        b[SPLIT_HDR_LAST_BATCH_HEAD..SPLIT_HDR_LAST_BATCH_HEAD + 2]
            .copy_from_slice(&h.last_batch_head.to_le_bytes());
        b[SPLIT_HDR_USED_IDX..SPLIT_HDR_USED_IDX + 2].copy_from_slice(&h.used_idx.to_le_bytes());
        for &(desc, inflight, next, counter) in entries {
            let at = split_entry_offset(desc);
            b[at + SPLIT_ENTRY_INFLIGHT] = inflight;
            b[at + SPLIT_ENTRY_NEXT..at + SPLIT_ENTRY_NEXT + 2]
                .copy_from_slice(&next.to_le_bytes());
            b[at + SPLIT_ENTRY_COUNTER..at + SPLIT_ENTRY_COUNTER + 8]
                .copy_from_slice(&counter.to_le_bytes());
        }
        b
    }

    /// `bytes` in a sealed memfd, mapped as SET_INFLIGHT_FD maps it.
    fn mapped(bytes: &[u8], num_queues: u16, queue_size: u16) -> Arc<InflightMap> {
        let fd = sealed_memfd("test-inflight", bytes);
        let description = InflightDescription {
            mmap_size: bytes.len() as u64,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        let any_geometry = InflightLimits {
            device_queues: num_queues,
            max_queue_size: MAX_QUEUE_SIZE,
        };
        InflightMap::map(fd.into(), &description, any_geometry).expect("map")
    }

    fn queue0(bytes: &[u8], queue_size: u16) -> QueueRegion {
        mapped(bytes, 1, queue_size).queue(0).unwrap()
    }

    fn version1(desc_num: u16, last_batch_head: u16, used_idx: u16) -> Header {
        Header {
            version: 1,
            desc_num,
            last_batch_head,
            used_idx,
        }
    }

    /// What the region says now, decoded from a snapshot.
    fn decoded(region: &QueueRegion) -> (Vec<u8>, u16) {
        (region.snapshot(), region.capacity())
    }

    fn view(copy: &(Vec<u8>, u16)) -> SplitQueue<'_> {
        SplitQueue::decode(0, copy.1, &copy.0).unwrap()
    }

    #[test]
    fn a_fresh_region_is_stamped_and_stale_bytes_cleared() {
        let stale = queue_bytes(
            16,
            Header {
                version: 0,
                desc_num: 0,
                last_batch_head: 5,
                used_idx: 900,
            },
            &[(3, 1, 0, 7)],
        );
        let region = queue0(&stale, 16);
        let (tracker, recovery) = QueueTracker::recover(region.clone(), 8, 42).unwrap();
        assert!(recovery.fresh && recovery.resubmit.is_empty());
        let copy = decoded(&region);
        let h = view(&copy).header();
        assert_eq!((h.version, h.desc_num, h.used_idx), (1, 8, 42));
        assert_eq!(
            view(&copy).inflight_count(),
            0,
            "stale inflight byte cleared"
        );
        assert_eq!(tracker.ring_size(), 8);
    }

    /// The protocol's steps, as the queue worker takes them, seen in the region.
    #[test]
    fn fetch_marks_and_completion_clears_in_order() {
        let region = queue0(&queue_bytes(8, version1(8, 0, 0), &[]), 8);
        let mut tracker = QueueTracker::recover(region.clone(), 8, 0).unwrap().0;
        tracker.mark_fetched(5);
        tracker.mark_fetched(2);
        tracker.mark_fetched(200); // outside the ring: ignored (the worker breaks such a ring)
        let copy = decoded(&region);
        assert_eq!(
            view(&copy).inflight_descs_in_counter_order(),
            vec![(5, 0), (2, 1)]
        );
        // A batch of two: linked 2 -> 5, named by its first, then published (used idx 0 -> 2).
        tracker.begin_batch(&[2, 5]);
        let copy = decoded(&region);
        assert_eq!(view(&copy).header().last_batch_head, 2);
        assert_eq!(view(&copy).entry(2).unwrap().next, 5);
        assert_eq!(view(&copy).last_batch(2).unwrap(), vec![2, 5]);
        tracker.end_batch(&[2, 5], 2);
        let copy = decoded(&region);
        assert_eq!(view(&copy).inflight_count(), 0);
        assert_eq!(view(&copy).header().used_idx, 2);
    }

    /// A batch of three, 4 -> 1 -> 6, of which used->idx shows all published, plus two genuinely
    /// inflight requests: the whole batch is rolled back. Clearing only desc[last_batch_head]
    /// (libvhost-user, DPDK) would resubmit 1 and 6, which the guest already has.
    #[test]
    fn a_published_batch_is_rolled_back_whole() {
        let entries = [
            (4, 1, 1, 10),
            (1, 1, 6, 11),
            (6, 1, 0, 12),
            (0, 1, 0, 13),
            (2, 1, 0, 9),
        ];
        let bytes = queue_bytes(8, version1(8, 4, 10), &entries);
        let naive: Vec<u16> = SplitQueue::decode(0, 8, &bytes)
            .unwrap()
            .inflight_descs_in_counter_order()
            .into_iter()
            .map(|(d, _)| d)
            .filter(|&d| d != 4)
            .collect();
        assert_eq!(
            naive,
            vec![2, 1, 6, 0],
            "single-entry rollback repeats 1 and 6"
        );
        let region = queue0(&bytes, 8);
        let (_, recovery) = QueueTracker::recover(region.clone(), 8, 13).unwrap();
        assert_eq!(recovery.rolled_back, 3);
        assert_eq!(recovery.resubmit, vec![2, 0]);
        let copy = decoded(&region);
        assert_eq!(view(&copy).header().used_idx, 13);
        assert_eq!(
            view(&copy).inflight_descs_in_counter_order(),
            vec![(2, 9), (0, 13)]
        );
        assert!(recovery
            .summary(0)
            .contains("rolled back 3 of the last batch, resubmitting 2"));
    }

    /// Killed after two of the batch's three entries reached the used ring: those two are
    /// completed, the third was never published and runs again.
    #[test]
    fn a_partly_published_batch_rolls_back_only_its_published_part() {
        let entries = [(4, 1, 1, 10), (1, 1, 6, 11), (6, 1, 0, 12)];
        let region = queue0(&queue_bytes(8, version1(8, 4, 10), &entries), 8);
        let (_, recovery) = QueueTracker::recover(region, 8, 12).unwrap();
        assert_eq!((recovery.rolled_back, recovery.resubmit), (2, vec![6]));
    }

    #[test]
    fn resubmission_follows_the_counter_not_the_head_index() {
        let entries = [(7, 1, 0, 1), (2, 1, 0, 3), (5, 1, 0, 2), (3, 0, 0, 0)];
        let region = queue0(&queue_bytes(8, version1(8, 0, 77), &entries), 8);
        let (mut tracker, recovery) = QueueTracker::recover(region.clone(), 8, 77).unwrap();
        assert_eq!(recovery.resubmit, vec![7, 5, 2]);
        assert_eq!(recovery.rolled_back, 0);
        // New fetches continue after the largest counter.
        tracker.mark_fetched(3);
        let copy = decoded(&region);
        assert_eq!(view(&copy).entry(3).unwrap().counter, 4);
    }

    /// SPDK issue #3766: DPDK's rollback of desc[last_inflight_io] (0 by default) dropped a
    /// genuinely inflight desc 0. Here it is resubmitted, whether or not a batch is open.
    #[test]
    fn a_genuinely_inflight_desc_0_is_resubmitted() {
        let region = queue0(&queue_bytes(8, version1(8, 0, 5), &[(0, 1, 0, 1)]), 8);
        let (_, recovery) = QueueTracker::recover(region, 8, 5).unwrap();
        assert_eq!(recovery.resubmit, vec![0]);
        // A batch of one (head 3) published but not cleared, desc 0 still in flight.
        let entries = [(0, 1, 0, 1), (3, 1, 0, 2)];
        let region = queue0(&queue_bytes(8, version1(8, 3, 5), &entries), 8);
        let (_, recovery) = QueueTracker::recover(region, 8, 6).unwrap();
        assert_eq!((recovery.rolled_back, recovery.resubmit), (1, vec![0]));
    }

    #[test]
    fn recovery_is_idempotent() {
        let entries = [(4, 1, 1, 10), (1, 1, 6, 11), (6, 1, 0, 12), (0, 1, 0, 13)];
        let region = queue0(&queue_bytes(8, version1(8, 4, 10), &entries), 8);
        let first = QueueTracker::recover(region.clone(), 8, 12).unwrap().1;
        let second = QueueTracker::recover(region, 8, 12).unwrap().1;
        assert_eq!(first.resubmit, vec![6, 0]);
        assert_eq!(second.resubmit, first.resubmit);
        assert_eq!(second.rolled_back, 0);
    }

    /// Hostile or stale regions: each is a clear refusal, no panic, no endless walk, and nothing
    /// written to the region.
    #[test]
    fn hostile_regions_are_refused_without_a_write() {
        let fresh = Header {
            version: 0,
            ..version1(0, 0, 0)
        };
        let cases: [(&str, Vec<u8>, u16, u16); 8] = [
            (
                "used_idx far off",
                queue_bytes(8, version1(8, 0, 1000), &[]),
                8,
                5,
            ),
            (
                "ring idx behind",
                queue_bytes(8, version1(8, 0, 6), &[]),
                8,
                5,
            ),
            (
                "last_batch_head out of range",
                queue_bytes(8, version1(8, 8, 0), &[]),
                8,
                1,
            ),
            (
                "a next link out of range",
                queue_bytes(8, version1(8, 2, 0), &[(2, 1, 200, 0)]),
                8,
                2,
            ),
            (
                "desc_num wrong",
                queue_bytes(8, version1(4, 0, 0), &[]),
                8,
                0,
            ),
            (
                "version 7",
                queue_bytes(
                    8,
                    Header {
                        version: 7,
                        ..version1(8, 0, 0)
                    },
                    &[],
                ),
                8,
                0,
            ),
            (
                "ring larger than the region",
                queue_bytes(8, version1(8, 0, 0), &[]),
                16,
                0,
            ),
            (
                "a fresh region smaller than the ring",
                queue_bytes(8, fresh, &[]),
                16,
                0,
            ),
        ];
        for (what, bytes, ring_size, ring_used_idx) in cases {
            let region = queue0(&bytes, 8);
            let err =
                QueueTracker::recover(region.clone(), ring_size, ring_used_idx).expect_err(what);
            assert!(!err.to_string().is_empty());
            assert_eq!(region.snapshot(), bytes, "{what}: the region was written");
        }
        // A `next` loop (4 -> 4) in a batch of three ends after three steps: 4 rolled back once.
        let region = queue0(
            &queue_bytes(8, version1(8, 4, 0), &[(4, 1, 4, 0), (5, 1, 0, 1)]),
            8,
        );
        let (_, recovery) = QueueTracker::recover(region, 8, 3).unwrap();
        assert_eq!((recovery.rolled_back, recovery.resubmit), (1, vec![5]));
    }

    /// The largest ring: bounded work, and the summary names at most 32 heads.
    #[test]
    fn a_full_large_ring_recovers_in_bounded_time() {
        let size = 1024u16;
        let entries: Vec<Entry> = (0..size).map(|d| (d, 1, 0, u64::from(size - d))).collect();
        let region = mapped(&queue_bytes(size, version1(size, 0, 0), &entries), 1, size);
        let (_, recovery) = QueueTracker::recover(region.queue(0).unwrap(), size, 0).unwrap();
        assert_eq!(recovery.resubmit.len(), usize::from(size));
        assert_eq!(
            recovery.resubmit[0],
            size - 1,
            "largest head has the smallest counter"
        );
        assert!(recovery.summary(0).contains("... 992 more"));
    }

    /// A resubmitted head parses exactly like the same chain popped from the avail ring,
    /// direct and indirect.
    #[test]
    fn a_resubmitted_head_parses_like_a_popped_chain() {
        let (mem, _ram) = guest_memory(0x20_0000);
        let g = mem.guest();
        let mut ring = TestRing::new(128, 0x1000);
        g.write_slice(&request_header(1, 4), GuestAddress(0x10000))
            .unwrap();
        let direct = ring.add_chain(
            g,
            &[
                (0x10000, 16, false),
                (0x11000, 512, false),
                (0x12000, 1, true),
            ],
        );
        // An indirect table at 0x13000 holding the same three descriptors.
        let table = 0x13000u64;
        for (i, (addr, len, flags)) in [
            (0x10000u64, 16u32, VIRTQ_DESC_F_NEXT),
            (0x11000, 512, VIRTQ_DESC_F_NEXT),
            (0x12000, 1, VIRTQ_DESC_F_WRITE),
        ]
        .into_iter()
        .enumerate()
        {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            g.write_slice(&raw, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let indirect = 50u16;
        ring.write_desc(g, indirect, table, 48, 4, 0);
        ring.publish(g, indirect);
        let mut parser = ResubmitParser::new(g, ring.rings.desc_table, ring.size, 0).unwrap();
        for (position, head) in [(0u16, direct), (1, indirect)] {
            let popped = BlkRequest::parse(pop_chain(g, &ring, position));
            let resubmitted = parser.parse(head);
            assert_eq!(resubmitted.head, popped.head);
            assert_eq!(resubmitted.status_addr, popped.status_addr);
            assert_eq!(
                format!("{:?}", resubmitted.body),
                format!("{:?}", popped.body),
                "head {head}"
            );
            assert!(resubmitted.body.is_ok());
        }
        // The private page lies outside the guest's memory, which was never written.
        assert!(g.find_region(parser.avail).is_none());
        assert!(mem.guest().find_region(parser.avail).is_none());
    }

    #[test]
    fn the_scratch_page_avoids_every_guest_region() {
        let (mem, _ram) = guest_memory(0x20_0000);
        let at = scratch_address(mem.guest()).unwrap();
        assert_eq!(
            at,
            GuestAddress(0x20_0000),
            "page 1 is guest RAM; the page after it is free"
        );
        let high =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x10_0000), 0x1000)]).unwrap();
        assert_eq!(scratch_address(&high), Some(GuestAddress(SCRATCH_PAGE)));
        let top = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x2000),
            // Its next page would end past 2^64: not a candidate.
            (GuestAddress(u64::MAX - 0x1fff), 0x1000),
        ])
        .unwrap();
        assert_eq!(scratch_address(&top), Some(GuestAddress(0x2000)));
    }

    #[test]
    fn describe_reads_a_snapshot() {
        let region = queue0(&queue_bytes(8, version1(8, 3, 40), &[(1, 1, 0, 5)]), 8);
        assert_eq!(
            region.describe(),
            "inflight queue 0 (split, size 8): version 1, desc_num 8, 1 inflight, used_idx 40, \
             last_batch_head 3"
        );
        let broken = queue0(
            &queue_bytes(
                8,
                Header {
                    version: 9,
                    ..version1(8, 0, 0)
                },
                &[],
            ),
            8,
        );
        assert!(
            broken.describe().contains("version 9"),
            "{}",
            broken.describe()
        );
    }
}
