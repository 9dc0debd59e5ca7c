//! The shared inflight region (the memfd of GET/SET_INFLIGHT_FD): its layout, its size, and a
//! decoded read-only view. The one definition both sides use.
//!
//! Spec: QEMU docs/interop/vhost-user.rst, "Inflight I/O tracking". The region is one queue region
//! per virtqueue, back to back; every implementation rounds each queue region up to 64 bytes (the
//! spec names no alignment; libvhost-user and DPDK both call it `INFLIGHT_ALIGNMENT`):
//!
//! ```text
//!  +----------------+----------------+-----+------------------+
//!  | queue 0 region | queue 1 region | ... | queue N-1 region |   each align64(header + n * entry)
//!  +----------------+----------------+-----+------------------+
//!
//!  split, per queue (QueueRegionSplit, 16-byte header, DescStateSplit entries of 16 bytes):
//!   0 u64 features   8 u16 version   10 u16 desc_num   12 u16 last_batch_head   14 u16 used_idx
//!   16 + 16*i: u8 inflight, u8 padding[5], u16 next (at 6), u64 counter (at 8)
//!
//!  packed, per queue (QueueRegionPacked, 32-byte header, DescStatePacked entries of 32 bytes):
//!   0 u64 features  8 u16 version  10 u16 desc_num  12 u16 free_head  14 u16 old_free_head
//!   16 u16 used_idx  18 u16 old_used_idx  20 u8 used_wrap_counter  21 u8 old_used_wrap_counter
//!   22 u8 padding[7] (the entries are 8-aligned, so they start at 32, not 29)
//!   32 + 32*i: u8 inflight, u8 pad, u16 next, u16 last, u16 num, u64 counter (at 8),
//!              u16 id (16), u16 flags (18), u32 len (20), u64 addr (24)
//! ```
//!
//! `mmap_size` is `num_queues * per-queue size` in every implementation that allocates the region
//! (libvhost-user `vu_get_inflight_fd`, DPDK `vhost_user_get_inflight_fd`); queue i starts at
//! `i * per-queue size` in both their SET handlers. QEMU as a frontend computes nothing: it maps
//! whatever `mmap_size` the backend replied. [`region_size`] gives the same numbers.
//!
//! # Reading a region a peer may be writing
//!
//! The view takes `&[u8]`, which may be a shared mapping whose other side is a hostile or crashing
//! peer. So: every bound (how many queues, where each queue starts, how many entries) comes from
//! our own `num_queues`/`queue_size` and the slice length, never from the region; the values the
//! region does supply (`desc_num`, `last_batch_head`, `next`) are range-checked against those
//! bounds before use. Each field is copied out of the slice exactly once (`first_chunk` into a
//! local array, then `from_le_bytes`: no alignment assumed, no `unsafe`) and every decision uses
//! that copy, so a value changing between two reads can give a wrong number, never an
//! out-of-bounds access or a panic. A queue header is copied once when its view is made.
//! For a consistent picture of a region that is still live (the trace while a backend runs),
//! the caller should copy the mapping into a private buffer first (volatile reads) and decode the
//! copy: a Rust `&[u8]` formally promises the bytes do not change under it.

use std::fmt;

use super::{MAX_QUEUES, MAX_QUEUE_SIZE};

/// Each queue region starts on this boundary (libvhost-user and DPDK `INFLIGHT_ALIGNMENT`).
pub const INFLIGHT_REGION_ALIGNMENT: u64 = 64;
/// The region version the spec defines. 0 means "fresh buffer, nothing recorded yet".
pub const INFLIGHT_VERSION: u16 = 1;

/// Split-ring queue region header (`QueueRegionSplit` without its `desc[]`).
pub const SPLIT_HEADER_SIZE: usize = 16;
/// One split-ring entry (`DescStateSplit`).
pub const SPLIT_ENTRY_SIZE: usize = 16;
/// Packed-ring queue region header (`QueueRegionPacked` without its `desc[]`, padded to 8).
pub const PACKED_HEADER_SIZE: usize = 32;
/// One packed-ring entry (`DescStatePacked`).
pub const PACKED_ENTRY_SIZE: usize = 32;

// Field offsets inside a header or an entry (C layout of the spec's structs; see the tests).
// The split-ring ones are public: the backend's writer (devices/src/blk/inflight.rs) stores to
// exactly these places, so reader and writer share one layout definition.
/// `u64 features` in either queue header.
pub const HDR_FEATURES: usize = 0;
/// `u16 version` in either queue header.
pub const HDR_VERSION: usize = 8;
/// `u16 desc_num` in either queue header.
pub const HDR_DESC_NUM: usize = 10;
/// `u16 last_batch_head` in a split queue header.
pub const SPLIT_HDR_LAST_BATCH_HEAD: usize = 12;
/// `u16 used_idx` in a split queue header.
pub const SPLIT_HDR_USED_IDX: usize = 14;
/// `u8 inflight` in a split entry.
pub const SPLIT_ENTRY_INFLIGHT: usize = 0;
/// `u16 next` in a split entry.
pub const SPLIT_ENTRY_NEXT: usize = 6;
/// `u64 counter` in a split entry.
pub const SPLIT_ENTRY_COUNTER: usize = 8;
const PACKED_HDR_FREE_HEAD: usize = 12;
const PACKED_HDR_OLD_FREE_HEAD: usize = 14;
const PACKED_HDR_USED_IDX: usize = 16;
const PACKED_HDR_OLD_USED_IDX: usize = 18;
const PACKED_HDR_USED_WRAP_COUNTER: usize = 20;
const PACKED_HDR_OLD_USED_WRAP_COUNTER: usize = 21;
const PACKED_ENTRY_INFLIGHT: usize = 0;
const PACKED_ENTRY_NEXT: usize = 2;
const PACKED_ENTRY_LAST: usize = 4;
const PACKED_ENTRY_NUM: usize = 6;
const PACKED_ENTRY_COUNTER: usize = 8;
const PACKED_ENTRY_ID: usize = 16;
const PACKED_ENTRY_FLAGS: usize = 18;
const PACKED_ENTRY_LEN: usize = 20;
const PACKED_ENTRY_ADDR: usize = 24;

/// Which ring format the region records (the backend picks it from VIRTIO_F_RING_PACKED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InflightLayout {
    Split,
    Packed,
}

impl InflightLayout {
    /// Bytes of a queue region's header.
    pub const fn header_size(self) -> usize {
        match self {
            InflightLayout::Split => SPLIT_HEADER_SIZE,
            InflightLayout::Packed => PACKED_HEADER_SIZE,
        }
    }

    /// Bytes of one descriptor entry.
    pub const fn entry_size(self) -> usize {
        match self {
            InflightLayout::Split => SPLIT_ENTRY_SIZE,
            InflightLayout::Packed => PACKED_ENTRY_SIZE,
        }
    }
}

impl fmt::Display for InflightLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InflightLayout::Split => "split",
            InflightLayout::Packed => "packed",
        })
    }
}

/// Bytes of one queue's region: `align64(header + queue_size * entry)`. `None` for a queue size
/// outside 1..=[`MAX_QUEUE_SIZE`].
///
/// libvhost-user writes the split size as `align64(16 * queue_size + 2)` and DPDK as
/// `align64(16 * queue_size + 16)` (packed: `align64(32 * queue_size + 29)`); with entries a
/// multiple of 16 bytes these always round to the same value as ours (checked for every queue size
/// in the tests).
pub fn queue_region_size(queue_size: u16, layout: InflightLayout) -> Option<u64> {
    if queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
        return None;
    }
    u64::from(queue_size)
        .checked_mul(layout.entry_size() as u64)?
        .checked_add(layout.header_size() as u64)?
        .checked_next_multiple_of(INFLIGHT_REGION_ALIGNMENT)
}

/// Bytes of the whole region (`mmap_size`): `num_queues * queue_region_size`. `None` for a queue
/// count outside 1..=[`MAX_QUEUES`] or a queue size outside 1..=[`MAX_QUEUE_SIZE`].
pub fn region_size(num_queues: u16, queue_size: u16, layout: InflightLayout) -> Option<u64> {
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return None;
    }
    queue_region_size(queue_size, layout)?.checked_mul(u64::from(num_queues))
}

/// What is wrong with a region (or with the geometry asked for).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflightError {
    #[error("{num_queues} queues: an inflight region holds 1 to {max}")]
    BadQueueCount { num_queues: u16, max: u16 },
    #[error("queue size {queue_size}: an inflight region holds 1 to {max} entries per queue")]
    BadQueueSize { queue_size: u16, max: u16 },
    #[error("inflight region is {got} bytes; {num_queues} {layout} queues of {queue_size} need {needed}")]
    RegionTooSmall {
        needed: u64,
        got: usize,
        num_queues: u16,
        queue_size: u16,
        layout: InflightLayout,
    },
    #[error("no queue {index} in an inflight region of {num_queues} queues")]
    NoSuchQueue { index: u16, num_queues: u16 },
    #[error("inflight queue {queue}: region version {version} is unknown (0 fresh, 1 current)")]
    UnknownVersion { queue: u16, version: u16 },
    #[error("inflight queue {queue}: {field} is {value}, at most {max} allowed")]
    FieldOutOfRange {
        queue: u16,
        field: &'static str,
        value: u16,
        max: u16,
    },
    #[error(
        "inflight queue {queue}: the ring's used idx {ring_used_idx} is {batch} past the region's \
         used_idx {region_used_idx}, more than its {desc_num} entries"
    )]
    LastBatchTooLarge {
        queue: u16,
        ring_used_idx: u16,
        region_used_idx: u16,
        batch: u16,
        desc_num: u16,
    },
    #[error(
        "inflight queue {queue}: the last-batch list reaches descriptor {desc}, beyond its \
         {desc_num} entries"
    )]
    BatchLinkOutOfRange {
        queue: u16,
        desc: u16,
        desc_num: u16,
    },
}

/// The geometry both views share: our own bounds and the bytes they cover.
#[derive(Debug, Clone, Copy)]
struct RegionBytes<'a> {
    bytes: &'a [u8],
    num_queues: u16,
    queue_size: u16,
    queue_region_size: usize,
}

impl<'a> RegionBytes<'a> {
    fn new(
        bytes: &'a [u8],
        num_queues: u16,
        queue_size: u16,
        layout: InflightLayout,
    ) -> Result<Self, InflightError> {
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(InflightError::BadQueueCount {
                num_queues,
                max: MAX_QUEUES,
            });
        }
        let bad_size = InflightError::BadQueueSize {
            queue_size,
            max: MAX_QUEUE_SIZE,
        };
        let per_queue = queue_region_size(queue_size, layout).ok_or(bad_size.clone())?;
        let needed = region_size(num_queues, queue_size, layout).ok_or(bad_size.clone())?;
        // A region larger than needed is fine (a backend may round mmap_size up); only the first
        // `needed` bytes are read.
        let fits = usize::try_from(needed).is_ok_and(|needed| bytes.len() >= needed);
        if !fits {
            return Err(InflightError::RegionTooSmall {
                needed,
                got: bytes.len(),
                num_queues,
                queue_size,
                layout,
            });
        }
        Ok(RegionBytes {
            bytes,
            num_queues,
            queue_size,
            // Fits: it is at most `needed`, which fit a usize above.
            queue_region_size: usize::try_from(per_queue).map_err(|_| bad_size)?,
        })
    }

    /// Queue `index`'s bytes (exactly one queue region long) and a copy of its `N`-byte header.
    fn queue_bytes<const N: usize>(
        &self,
        index: u16,
    ) -> Result<(&'a [u8], [u8; N]), InflightError> {
        let no_such_queue = InflightError::NoSuchQueue {
            index,
            num_queues: self.num_queues,
        };
        if index >= self.num_queues {
            return Err(no_such_queue);
        }
        // Cannot fail for an index below num_queues (new() checked the length); checked anyway.
        let start = usize::from(index).checked_mul(self.queue_region_size);
        let end = start.and_then(|start| start.checked_add(self.queue_region_size));
        let bytes = match (start, end) {
            (Some(start), Some(end)) => self.bytes.get(start..end),
            _ => None,
        };
        let bytes = bytes.ok_or(no_such_queue.clone())?;
        let header = copy_out::<N>(bytes, 0).ok_or(no_such_queue)?;
        Ok((bytes, header))
    }
}

/// Copies `N` bytes at `offset` out of `bytes` (one read of the shared memory), or `None` if they
/// are not all there.
fn copy_out<const N: usize>(bytes: &[u8], offset: usize) -> Option<[u8; N]> {
    bytes.get(offset..)?.first_chunk::<N>().copied()
}

// Little-endian fields of an already copied array. The offsets are constants, so an index past the
// array is a compile error, not a run-time panic.
macro_rules! le_field {
    (u16, $a:expr, $at:expr) => {
        u16::from_le_bytes([$a[$at], $a[$at + 1]])
    };
    (u32, $a:expr, $at:expr) => {
        u32::from_le_bytes([$a[$at], $a[$at + 1], $a[$at + 2], $a[$at + 3]])
    };
    (u64, $a:expr, $at:expr) => {
        u64::from_le_bytes([
            $a[$at],
            $a[$at + 1],
            $a[$at + 2],
            $a[$at + 3],
            $a[$at + 4],
            $a[$at + 5],
            $a[$at + 6],
            $a[$at + 7],
        ])
    };
}

fn check_version(queue: u16, version: u16) -> Result<(), InflightError> {
    if version > INFLIGHT_VERSION {
        return Err(InflightError::UnknownVersion { queue, version });
    }
    Ok(())
}

fn check_at_most(
    queue: u16,
    field: &'static str,
    value: u16,
    max: u16,
) -> Result<(), InflightError> {
    if value > max {
        return Err(InflightError::FieldOutOfRange {
            queue,
            field,
            value,
            max,
        });
    }
    Ok(())
}

/// The inflight entries as (desc, counter), oldest fetch first: sorted by counter, ties (only a
/// buggy or hostile writer makes them) by descriptor index, so the order is always the same.
fn in_counter_order(inflight: impl Iterator<Item = (u16, u64)>) -> Vec<(u16, u64)> {
    let mut descs: Vec<(u16, u64)> = inflight.collect();
    descs.sort_unstable_by_key(|&(desc, counter)| (counter, desc));
    descs
}

// ---------------------------------------------------------------------------------------------
// Split ring

/// A split-ring inflight region: `num_queues` queue regions for rings of `queue_size` entries.
#[derive(Debug, Clone, Copy)]
pub struct InflightRegion<'a> {
    region: RegionBytes<'a>,
}

impl<'a> InflightRegion<'a> {
    /// A view of `bytes` as a split-ring region. Fails if the geometry is outside our limits or
    /// `bytes` is shorter than [`region_size`]; longer is fine (the rest is not read).
    pub fn new(bytes: &'a [u8], num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let region = RegionBytes::new(bytes, num_queues, queue_size, InflightLayout::Split)?;
        Ok(InflightRegion { region })
    }

    pub fn num_queues(&self) -> u16 {
        self.region.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.region.queue_size
    }

    /// Queue `index`'s view; its header is copied out and checked now.
    pub fn queue(&self, index: u16) -> Result<SplitQueue<'a>, InflightError> {
        let (bytes, header) = self.region.queue_bytes::<SPLIT_HEADER_SIZE>(index)?;
        SplitQueue::new(index, self.region.queue_size, bytes, &header)
    }

    /// Every queue's view, in index order.
    pub fn queues(&self) -> impl Iterator<Item = Result<SplitQueue<'a>, InflightError>> + '_ {
        (0..self.region.num_queues).map(move |index| self.queue(index))
    }
}

/// A split-ring queue region's header (`QueueRegionSplit`), as copied out once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitQueueHeader {
    /// Always 0 so far.
    pub features: u64,
    /// 0: fresh buffer, 1: current ([`INFLIGHT_VERSION`]).
    pub version: u16,
    /// Entries recorded; the backend sets it to the queue size (0 in a fresh buffer).
    pub desc_num: u16,
    /// Head of the list (through `next`) of the last batch of used descriptors.
    pub last_batch_head: u16,
    /// The used ring's idx once the last batch was fully recorded (free-running, any u16).
    pub used_idx: u16,
}

impl SplitQueueHeader {
    fn decode(h: &[u8; SPLIT_HEADER_SIZE]) -> Self {
        SplitQueueHeader {
            features: le_field!(u64, h, HDR_FEATURES),
            version: le_field!(u16, h, HDR_VERSION),
            desc_num: le_field!(u16, h, HDR_DESC_NUM),
            last_batch_head: le_field!(u16, h, SPLIT_HDR_LAST_BATCH_HEAD),
            used_idx: le_field!(u16, h, SPLIT_HDR_USED_IDX),
        }
    }
}

/// One split-ring entry (`DescStateSplit`) for descriptor `desc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitEntry {
    pub desc: u16,
    /// The `inflight` byte is non-zero (how libvhost-user and DPDK test it; conforming writers
    /// store exactly 1).
    pub inflight: bool,
    /// Link in the last-batch list (meaningful only for descriptors of that batch).
    pub next: u16,
    /// Fetch order: the backend's global counter when it took this head from the avail ring.
    pub counter: u64,
}

impl SplitEntry {
    fn decode(desc: u16, e: &[u8; SPLIT_ENTRY_SIZE]) -> Self {
        SplitEntry {
            desc,
            inflight: e[SPLIT_ENTRY_INFLIGHT] != 0,
            next: le_field!(u16, e, SPLIT_ENTRY_NEXT),
            counter: le_field!(u64, e, SPLIT_ENTRY_COUNTER),
        }
    }
}

/// One split-ring queue region. The header is the copy taken when the view was made (and checked
/// then: known version, `desc_num <= queue_size`, `last_batch_head < queue_size`); entries are read
/// when asked for, each once per call.
#[derive(Debug, Clone, Copy)]
pub struct SplitQueue<'a> {
    index: u16,
    queue_size: u16,
    header: SplitQueueHeader,
    bytes: &'a [u8],
}

/// Where descriptor `desc`'s entry starts inside a split queue region (the header comes first).
pub const fn split_entry_offset(desc: u16) -> usize {
    SPLIT_HEADER_SIZE + desc as usize * SPLIT_ENTRY_SIZE
}

impl<'a> SplitQueue<'a> {
    /// The view of one queue region on its own: `bytes` is queue `index`'s region (at least
    /// [`queue_region_size`] for `queue_size`; longer is fine), e.g. a private copy of just that
    /// queue's part of a live mapping. Same checks as [`InflightRegion::queue`].
    pub fn decode(index: u16, queue_size: u16, bytes: &'a [u8]) -> Result<Self, InflightError> {
        let region = RegionBytes::new(bytes, 1, queue_size, InflightLayout::Split)?;
        let (bytes, header) = region.queue_bytes::<SPLIT_HEADER_SIZE>(0)?;
        SplitQueue::new(index, queue_size, bytes, &header)
    }

    fn new(
        index: u16,
        queue_size: u16,
        bytes: &'a [u8],
        raw_header: &[u8; SPLIT_HEADER_SIZE],
    ) -> Result<Self, InflightError> {
        let header = SplitQueueHeader::decode(raw_header);
        check_version(index, header.version)?;
        check_at_most(index, "desc_num", header.desc_num, queue_size)?;
        // queue_size >= 1 (RegionBytes::new), so the subtraction cannot wrap.
        let last_desc = queue_size.saturating_sub(1);
        check_at_most(index, "last_batch_head", header.last_batch_head, last_desc)?;
        Ok(SplitQueue {
            index,
            queue_size,
            header,
            bytes,
        })
    }

    /// Which queue this is.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// The header as copied when the view was made.
    pub fn header(&self) -> SplitQueueHeader {
        self.header
    }

    /// Descriptor `desc`'s entry, or `None` beyond `desc_num`.
    pub fn entry(&self, desc: u16) -> Option<SplitEntry> {
        if desc >= self.header.desc_num {
            return None;
        }
        copy_out::<SPLIT_ENTRY_SIZE>(self.bytes, split_entry_offset(desc))
            .map(|raw| SplitEntry::decode(desc, &raw))
    }

    /// Entries 0..desc_num, in descriptor order.
    pub fn entries(&self) -> impl Iterator<Item = SplitEntry> + 'a {
        let queue = *self;
        // `entry` is None only past desc_num, which the range never reaches.
        (0..self.header.desc_num).filter_map(move |desc| queue.entry(desc))
    }

    /// How many entries are marked inflight (one pass).
    pub fn inflight_count(&self) -> usize {
        self.entries().filter(|e| e.inflight).count()
    }

    /// The inflight descriptors as (desc, counter) in the order to resubmit them: by counter,
    /// ties by descriptor index. At most `desc_num` long; each entry is read once.
    pub fn inflight_descs_in_counter_order(&self) -> Vec<(u16, u64)> {
        in_counter_order(
            self.entries()
                .filter(|e| e.inflight)
                .map(|e| (e.desc, e.counter)),
        )
    }

    /// The descriptors of the last batch a backend published but may not have cleared, given the
    /// guest-visible used ring idx: the `ring_used_idx - used_idx` entries of the list starting at
    /// `last_batch_head`, in list order (spec: "When reconnecting", split). Empty when the two
    /// idx agree. Errors when the batch would be larger than the region's entries (a `used_idx`
    /// out of range) or the list leaves them; a list that loops ends after `batch` steps.
    pub fn last_batch(&self, ring_used_idx: u16) -> Result<Vec<u16>, InflightError> {
        let header = self.header;
        let batch = ring_used_idx.wrapping_sub(header.used_idx);
        if batch > header.desc_num {
            return Err(InflightError::LastBatchTooLarge {
                queue: self.index,
                ring_used_idx,
                region_used_idx: header.used_idx,
                batch,
                desc_num: header.desc_num,
            });
        }
        let mut descs = Vec::with_capacity(usize::from(batch));
        let mut desc = header.last_batch_head;
        for _ in 0..batch {
            let entry = self.entry(desc).ok_or(InflightError::BatchLinkOutOfRange {
                queue: self.index,
                desc,
                desc_num: header.desc_num,
            })?;
            descs.push(desc);
            desc = entry.next;
        }
        Ok(descs)
    }

    /// One line for the trace.
    pub fn describe(&self) -> String {
        let h = self.header;
        format!(
            "inflight queue {} (split, size {}): version {}, desc_num {}, {} inflight, used_idx {}, \
             last_batch_head {}",
            self.index,
            self.queue_size,
            h.version,
            h.desc_num,
            self.inflight_count(),
            h.used_idx,
            h.last_batch_head
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Packed ring

/// A packed-ring inflight region: `num_queues` queue regions for rings of `queue_size` entries.
#[derive(Debug, Clone, Copy)]
pub struct PackedInflightRegion<'a> {
    region: RegionBytes<'a>,
}

impl<'a> PackedInflightRegion<'a> {
    /// A view of `bytes` as a packed-ring region; same rules as [`InflightRegion::new`].
    pub fn new(bytes: &'a [u8], num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let region = RegionBytes::new(bytes, num_queues, queue_size, InflightLayout::Packed)?;
        Ok(PackedInflightRegion { region })
    }

    pub fn num_queues(&self) -> u16 {
        self.region.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.region.queue_size
    }

    /// Queue `index`'s view; its header is copied out and checked now.
    pub fn queue(&self, index: u16) -> Result<PackedQueue<'a>, InflightError> {
        let (bytes, header) = self.region.queue_bytes::<PACKED_HEADER_SIZE>(index)?;
        PackedQueue::new(index, self.region.queue_size, bytes, &header)
    }

    /// Every queue's view, in index order.
    pub fn queues(&self) -> impl Iterator<Item = Result<PackedQueue<'a>, InflightError>> + '_ {
        (0..self.region.num_queues).map(move |index| self.queue(index))
    }
}

/// A packed-ring queue region's header (`QueueRegionPacked`), as copied out once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedQueueHeader {
    pub features: u64,
    pub version: u16,
    pub desc_num: u16,
    /// Head of the free entry list (`queue_size` when the list is empty).
    pub free_head: u16,
    pub old_free_head: u16,
    /// The device's used index in the descriptor ring (below `queue_size`).
    pub used_idx: u16,
    pub old_used_idx: u16,
    /// 0 or 1.
    pub used_wrap_counter: u8,
    pub old_used_wrap_counter: u8,
}

impl PackedQueueHeader {
    fn decode(h: &[u8; PACKED_HEADER_SIZE]) -> Self {
        PackedQueueHeader {
            features: le_field!(u64, h, HDR_FEATURES),
            version: le_field!(u16, h, HDR_VERSION),
            desc_num: le_field!(u16, h, HDR_DESC_NUM),
            free_head: le_field!(u16, h, PACKED_HDR_FREE_HEAD),
            old_free_head: le_field!(u16, h, PACKED_HDR_OLD_FREE_HEAD),
            used_idx: le_field!(u16, h, PACKED_HDR_USED_IDX),
            old_used_idx: le_field!(u16, h, PACKED_HDR_OLD_USED_IDX),
            used_wrap_counter: h[PACKED_HDR_USED_WRAP_COUNTER],
            old_used_wrap_counter: h[PACKED_HDR_OLD_USED_WRAP_COUNTER],
        }
    }
}

/// One packed-ring entry (`DescStatePacked`) at index `desc` of the region's array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedEntry {
    pub desc: u16,
    /// Non-zero `inflight` byte (head entries only).
    pub inflight: bool,
    /// Next free entry.
    pub next: u16,
    /// Last entry of this head's descriptor list.
    pub last: u16,
    /// Length of this head's descriptor list.
    pub num: u16,
    pub counter: u64,
    pub id: u16,
    pub flags: u16,
    pub len: u32,
    pub addr: u64,
}

impl PackedEntry {
    fn decode(desc: u16, e: &[u8; PACKED_ENTRY_SIZE]) -> Self {
        PackedEntry {
            desc,
            inflight: e[PACKED_ENTRY_INFLIGHT] != 0,
            next: le_field!(u16, e, PACKED_ENTRY_NEXT),
            last: le_field!(u16, e, PACKED_ENTRY_LAST),
            num: le_field!(u16, e, PACKED_ENTRY_NUM),
            counter: le_field!(u64, e, PACKED_ENTRY_COUNTER),
            id: le_field!(u16, e, PACKED_ENTRY_ID),
            flags: le_field!(u16, e, PACKED_ENTRY_FLAGS),
            len: le_field!(u32, e, PACKED_ENTRY_LEN),
            addr: le_field!(u64, e, PACKED_ENTRY_ADDR),
        }
    }
}

/// One packed-ring queue region. The header is copied and checked when the view is made: known
/// version, `desc_num <= queue_size`, used indexes below `queue_size`, free heads at most
/// `queue_size`, wrap counters 0 or 1.
#[derive(Debug, Clone, Copy)]
pub struct PackedQueue<'a> {
    index: u16,
    queue_size: u16,
    header: PackedQueueHeader,
    bytes: &'a [u8],
}

impl<'a> PackedQueue<'a> {
    fn new(
        index: u16,
        queue_size: u16,
        bytes: &'a [u8],
        raw_header: &[u8; PACKED_HEADER_SIZE],
    ) -> Result<Self, InflightError> {
        let h = PackedQueueHeader::decode(raw_header);
        check_version(index, h.version)?;
        check_at_most(index, "desc_num", h.desc_num, queue_size)?;
        let last_desc = queue_size.saturating_sub(1);
        check_at_most(index, "used_idx", h.used_idx, last_desc)?;
        check_at_most(index, "old_used_idx", h.old_used_idx, last_desc)?;
        check_at_most(index, "free_head", h.free_head, queue_size)?;
        check_at_most(index, "old_free_head", h.old_free_head, queue_size)?;
        let wrap = u16::from(h.used_wrap_counter);
        check_at_most(index, "used_wrap_counter", wrap, 1)?;
        let old_wrap = u16::from(h.old_used_wrap_counter);
        check_at_most(index, "old_used_wrap_counter", old_wrap, 1)?;
        Ok(PackedQueue {
            index,
            queue_size,
            header: h,
            bytes,
        })
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    /// The header as copied when the view was made.
    pub fn header(&self) -> PackedQueueHeader {
        self.header
    }

    /// Entry `desc`, or `None` beyond `desc_num`.
    pub fn entry(&self, desc: u16) -> Option<PackedEntry> {
        if desc >= self.header.desc_num {
            return None;
        }
        let offset = PACKED_HEADER_SIZE + usize::from(desc) * PACKED_ENTRY_SIZE;
        copy_out::<PACKED_ENTRY_SIZE>(self.bytes, offset).map(|raw| PackedEntry::decode(desc, &raw))
    }

    /// Entries 0..desc_num, in array order.
    pub fn entries(&self) -> impl Iterator<Item = PackedEntry> + 'a {
        let queue = *self;
        (0..self.header.desc_num).filter_map(move |desc| queue.entry(desc))
    }

    pub fn inflight_count(&self) -> usize {
        self.entries().filter(|e| e.inflight).count()
    }

    /// Inflight head entries as (entry index, counter), by counter, ties by index.
    pub fn inflight_descs_in_counter_order(&self) -> Vec<(u16, u64)> {
        in_counter_order(
            self.entries()
                .filter(|e| e.inflight)
                .map(|e| (e.desc, e.counter)),
        )
    }

    /// One line for the trace.
    pub fn describe(&self) -> String {
        let h = self.header;
        format!(
            "inflight queue {} (packed, size {}): version {}, desc_num {}, {} inflight, used_idx {} \
             (old {}), wrap {} (old {}), free_head {} (old {})",
            self.index,
            self.queue_size,
            h.version,
            h.desc_num,
            self.inflight_count(),
            h.used_idx,
            h.old_used_idx,
            h.used_wrap_counter,
            h.old_used_wrap_counter,
            h.free_head,
            h.old_free_head
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    // The spec's C structs (QEMU docs/interop/vhost-user.rst; the same fields as libvhost-user's
    // VuDescStateSplit/VuVirtqInflight and DPDK's rte_vhost_inflight_*), laid out by rustc with C
    // rules, so the offsets below are what a C compiler gives the other side.
    #[allow(dead_code)]
    #[repr(C)]
    struct DescStateSplit {
        inflight: u8,
        padding: [u8; 5],
        next: u16,
        counter: u64,
    }
    #[allow(dead_code)]
    #[repr(C)]
    struct QueueRegionSplit {
        features: u64,
        version: u16,
        desc_num: u16,
        last_batch_head: u16,
        used_idx: u16,
        desc: [DescStateSplit; 0],
    }
    #[allow(dead_code)]
    #[repr(C)]
    struct DescStatePacked {
        inflight: u8,
        padding: u8,
        next: u16,
        last: u16,
        num: u16,
        counter: u64,
        id: u16,
        flags: u16,
        len: u32,
        addr: u64,
    }
    #[allow(dead_code)]
    #[repr(C)]
    struct QueueRegionPacked {
        features: u64,
        version: u16,
        desc_num: u16,
        free_head: u16,
        old_free_head: u16,
        used_idx: u16,
        old_used_idx: u16,
        used_wrap_counter: u8,
        old_used_wrap_counter: u8,
        padding: [u8; 7],
        desc: [DescStatePacked; 0],
    }

    #[test]
    fn layout_matches_the_c_structs_of_the_spec() {
        // Split: 16-byte header, desc[] at 16, 16-byte entries.
        assert_eq!(size_of::<DescStateSplit>(), SPLIT_ENTRY_SIZE);
        assert_eq!(SPLIT_ENTRY_SIZE, 16);
        assert_eq!(offset_of!(DescStateSplit, inflight), SPLIT_ENTRY_INFLIGHT);
        assert_eq!(offset_of!(DescStateSplit, next), SPLIT_ENTRY_NEXT);
        assert_eq!(offset_of!(DescStateSplit, counter), SPLIT_ENTRY_COUNTER);
        assert_eq!(offset_of!(QueueRegionSplit, features), HDR_FEATURES);
        assert_eq!(offset_of!(QueueRegionSplit, version), HDR_VERSION);
        assert_eq!(offset_of!(QueueRegionSplit, desc_num), HDR_DESC_NUM);
        assert_eq!(
            offset_of!(QueueRegionSplit, last_batch_head),
            SPLIT_HDR_LAST_BATCH_HEAD
        );
        assert_eq!(offset_of!(QueueRegionSplit, used_idx), SPLIT_HDR_USED_IDX);
        assert_eq!(offset_of!(QueueRegionSplit, desc), SPLIT_HEADER_SIZE);
        assert_eq!(SPLIT_HEADER_SIZE, 16);

        // Packed: 8+12+9 = 29 bytes of header fields, desc[] 8-aligned at 32, 32-byte entries.
        assert_eq!(size_of::<DescStatePacked>(), PACKED_ENTRY_SIZE);
        assert_eq!(PACKED_ENTRY_SIZE, 32);
        assert_eq!(offset_of!(DescStatePacked, inflight), PACKED_ENTRY_INFLIGHT);
        assert_eq!(offset_of!(DescStatePacked, next), PACKED_ENTRY_NEXT);
        assert_eq!(offset_of!(DescStatePacked, last), PACKED_ENTRY_LAST);
        assert_eq!(offset_of!(DescStatePacked, num), PACKED_ENTRY_NUM);
        assert_eq!(offset_of!(DescStatePacked, counter), PACKED_ENTRY_COUNTER);
        assert_eq!(offset_of!(DescStatePacked, id), PACKED_ENTRY_ID);
        assert_eq!(offset_of!(DescStatePacked, flags), PACKED_ENTRY_FLAGS);
        assert_eq!(offset_of!(DescStatePacked, len), PACKED_ENTRY_LEN);
        assert_eq!(offset_of!(DescStatePacked, addr), PACKED_ENTRY_ADDR);
        assert_eq!(offset_of!(QueueRegionPacked, features), HDR_FEATURES);
        assert_eq!(offset_of!(QueueRegionPacked, version), HDR_VERSION);
        assert_eq!(offset_of!(QueueRegionPacked, desc_num), HDR_DESC_NUM);
        assert_eq!(
            offset_of!(QueueRegionPacked, free_head),
            PACKED_HDR_FREE_HEAD
        );
        assert_eq!(
            offset_of!(QueueRegionPacked, old_free_head),
            PACKED_HDR_OLD_FREE_HEAD
        );
        assert_eq!(offset_of!(QueueRegionPacked, used_idx), PACKED_HDR_USED_IDX);
        assert_eq!(
            offset_of!(QueueRegionPacked, old_used_idx),
            PACKED_HDR_OLD_USED_IDX
        );
        assert_eq!(
            offset_of!(QueueRegionPacked, used_wrap_counter),
            PACKED_HDR_USED_WRAP_COUNTER
        );
        assert_eq!(
            offset_of!(QueueRegionPacked, old_used_wrap_counter),
            PACKED_HDR_OLD_USED_WRAP_COUNTER
        );
        assert_eq!(offset_of!(QueueRegionPacked, padding), 22);
        assert_eq!(offset_of!(QueueRegionPacked, desc), PACKED_HEADER_SIZE);
        assert_eq!(size_of::<QueueRegionPacked>(), PACKED_HEADER_SIZE);
        assert_eq!(PACKED_HEADER_SIZE, 32);
    }

    /// The other implementations' size formulas, written as they are (not copied code):
    /// libvhost-user `vu_inflight_queue_size`: ALIGN_UP(sizeof(VuDescStateSplit) * n +
    /// sizeof(uint16_t), 64); DPDK `get_pervq_shm_size_split`: RTE_ALIGN_MUL_CEIL(16 * n + 8 +
    /// 2 * 4, 64), `get_pervq_shm_size_packed`: RTE_ALIGN_MUL_CEIL(32 * n + 8 + 2 * 6 + 9, 64).
    #[test]
    fn sizes_agree_with_libvhost_user_and_dpdk_for_every_queue_size() {
        let align64 = |n: u64| n.div_ceil(64) * 64;
        for n in 1..=MAX_QUEUE_SIZE {
            let q = u64::from(n);
            let libvhost_user_split = align64(16 * q + 2);
            let dpdk_split = align64(16 * q + 8 + 2 * 4);
            let dpdk_packed = align64(32 * q + 8 + 2 * 6 + 9);
            let split = queue_region_size(n, InflightLayout::Split).unwrap();
            let packed = queue_region_size(n, InflightLayout::Packed).unwrap();
            assert_eq!(split, libvhost_user_split, "split, queue size {n}");
            assert_eq!(split, dpdk_split, "split, queue size {n}");
            assert_eq!(packed, dpdk_packed, "packed, queue size {n}");
            assert_eq!(split % INFLIGHT_REGION_ALIGNMENT, 0);
            assert_eq!(packed % INFLIGHT_REGION_ALIGNMENT, 0);
        }
        // qemu-storage-daemon (libvhost-user) replies 2112 for one queue of 128.
        assert_eq!(region_size(1, 128, InflightLayout::Split), Some(2112));
        assert_eq!(region_size(4, 256, InflightLayout::Split), Some(4 * 4160));
        assert_eq!(region_size(1, 1, InflightLayout::Split), Some(64));
        assert_eq!(region_size(1, 1, InflightLayout::Packed), Some(64));
        assert_eq!(region_size(2, 128, InflightLayout::Packed), Some(2 * 4160));
    }

    #[test]
    fn packed_size_is_the_frontends_upper_bound() {
        for (queues, size) in [(1, 1), (1, 128), (4, 256), (MAX_QUEUES, MAX_QUEUE_SIZE)] {
            let bound = crate::max_inflight_mmap_size(queues, size);
            assert_eq!(region_size(queues, size, InflightLayout::Packed), bound);
            assert!(region_size(queues, size, InflightLayout::Split) <= bound);
        }
    }

    #[test]
    fn sizes_outside_our_limits_are_none_never_overflow() {
        for layout in [InflightLayout::Split, InflightLayout::Packed] {
            assert_eq!(queue_region_size(0, layout), None);
            assert_eq!(queue_region_size(MAX_QUEUE_SIZE + 1, layout), None);
            assert_eq!(queue_region_size(u16::MAX, layout), None);
            assert_eq!(region_size(0, 128, layout), None);
            assert_eq!(region_size(MAX_QUEUES + 1, 128, layout), None);
            assert_eq!(region_size(u16::MAX, u16::MAX, layout), None);
            assert_eq!(region_size(1, 0, layout), None);
        }
        // The largest we accept: 64 queues of 32768.
        assert_eq!(
            region_size(MAX_QUEUES, MAX_QUEUE_SIZE, InflightLayout::Split),
            Some(64 * 524_352)
        );
        assert_eq!(
            region_size(MAX_QUEUES, MAX_QUEUE_SIZE, InflightLayout::Packed),
            Some(64 * 1_048_640)
        );
    }

    // Hand-written regions: raw bytes at the spec's offsets, no encoder of ours involved.
    fn put16(region: &mut [u8], at: usize, value: u16) {
        region[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }
    fn put64(region: &mut [u8], at: usize, value: u64) {
        region[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    struct SplitHeaderFields {
        version: u16,
        desc_num: u16,
        last_batch_head: u16,
        used_idx: u16,
    }
    fn put_split_header(region: &mut [u8], queue_start: usize, h: SplitHeaderFields) {
        put64(region, queue_start, 0);
        put16(region, queue_start + 8, h.version);
        put16(region, queue_start + 10, h.desc_num);
        put16(region, queue_start + 12, h.last_batch_head);
        put16(region, queue_start + 14, h.used_idx);
    }
    fn put_split_entry(region: &mut [u8], queue_start: usize, desc: usize, e: (u8, u16, u64)) {
        let at = queue_start + 16 + 16 * desc;
        region[at] = e.0;
        put16(region, at + 6, e.1);
        put64(region, at + 8, e.2);
    }

    /// Two queues of 8: queue 0 has descs 5, 2, 7 inflight (fetched in that order) and a last
    /// batch 3 -> 1 published but not cleared; queue 1 is version 1 with nothing inflight.
    fn sample_split_region() -> Vec<u8> {
        let per_queue = queue_region_size(8, InflightLayout::Split).unwrap() as usize;
        assert_eq!(per_queue, 192); // align64(16 + 8 * 16) = align64(144)
        let mut region = vec![0u8; 2 * per_queue];
        put_split_header(
            &mut region,
            0,
            SplitHeaderFields {
                version: 1,
                desc_num: 8,
                last_batch_head: 3,
                used_idx: 40,
            },
        );
        put_split_entry(&mut region, 0, 5, (1, 0, 100));
        put_split_entry(&mut region, 0, 2, (1, 0, 101));
        put_split_entry(&mut region, 0, 7, (1, 0, 102));
        put_split_entry(&mut region, 0, 3, (1, 1, 98));
        put_split_entry(&mut region, 0, 1, (1, 6, 99));
        put_split_header(
            &mut region,
            per_queue,
            SplitHeaderFields {
                version: 1,
                desc_num: 8,
                last_batch_head: 0,
                used_idx: 7,
            },
        );
        region
    }

    #[test]
    fn split_region_round_trip() {
        let bytes = sample_split_region();
        let region = InflightRegion::new(&bytes, 2, 8).unwrap();
        assert_eq!((region.num_queues(), region.queue_size()), (2, 8));
        let q0 = region.queue(0).unwrap();
        assert_eq!(
            q0.header(),
            SplitQueueHeader {
                features: 0,
                version: 1,
                desc_num: 8,
                last_batch_head: 3,
                used_idx: 40,
            }
        );
        let entries: Vec<SplitEntry> = q0.entries().collect();
        assert_eq!(entries.len(), 8);
        assert_eq!(
            entries[1],
            SplitEntry {
                desc: 1,
                inflight: true,
                next: 6,
                counter: 99
            }
        );
        assert!(!entries[0].inflight && !entries[4].inflight && !entries[6].inflight);
        assert_eq!(q0.inflight_count(), 5);
        assert_eq!(
            q0.inflight_descs_in_counter_order(),
            vec![(3, 98), (1, 99), (5, 100), (2, 101), (7, 102)]
        );
        // The ring's used idx moved 2 past the region's: the batch is 3 -> 1.
        assert_eq!(q0.last_batch(42).unwrap(), vec![3, 1]);
        assert_eq!(q0.last_batch(40).unwrap(), Vec::<u16>::new());
        assert_eq!(
            q0.describe(),
            "inflight queue 0 (split, size 8): version 1, desc_num 8, 5 inflight, used_idx 40, \
             last_batch_head 3"
        );

        let q1 = region.queue(1).unwrap();
        assert_eq!(q1.header().used_idx, 7);
        assert_eq!(q1.inflight_count(), 0);
        assert!(q1.inflight_descs_in_counter_order().is_empty());
        assert_eq!(region.queues().filter(Result::is_ok).count(), 2);
        assert_eq!(q1.entry(7).map(|e| e.desc), Some(7));
        assert_eq!(q1.entry(8), None);
    }

    #[test]
    fn one_queue_decoded_on_its_own_matches_its_view_in_the_region() {
        let bytes = sample_split_region();
        let region = InflightRegion::new(&bytes, 2, 8).unwrap();
        let per_queue = queue_region_size(8, InflightLayout::Split).unwrap() as usize;
        for index in 0..2u16 {
            let start = usize::from(index) * per_queue;
            let alone = SplitQueue::decode(index, 8, &bytes[start..start + per_queue]).unwrap();
            let within = region.queue(index).unwrap();
            assert_eq!(alone.index(), index);
            assert_eq!(alone.header(), within.header());
            assert!(alone.entries().eq(within.entries()));
            assert_eq!(alone.describe(), within.describe());
        }
        assert!(matches!(
            SplitQueue::decode(0, 8, &bytes[..per_queue - 1]),
            Err(InflightError::RegionTooSmall { .. })
        ));
        assert_eq!(split_entry_offset(0), SPLIT_HEADER_SIZE);
        assert_eq!(
            split_entry_offset(3),
            SPLIT_HEADER_SIZE + 3 * SPLIT_ENTRY_SIZE
        );
    }

    #[test]
    fn a_fresh_zeroed_region_decodes_as_empty() {
        let size = region_size(3, 256, InflightLayout::Split).unwrap() as usize;
        let bytes = vec![0u8; size];
        let region = InflightRegion::new(&bytes, 3, 256).unwrap();
        for queue in region.queues() {
            let queue = queue.unwrap();
            assert_eq!(queue.header().version, 0);
            assert_eq!(queue.entries().count(), 0); // desc_num 0 until a backend sets it
            assert_eq!(queue.last_batch(0).unwrap(), Vec::<u16>::new());
            assert!(queue.last_batch(1).is_err());
        }
        let packed_size = region_size(3, 256, InflightLayout::Packed).unwrap() as usize;
        let bytes = vec![0u8; packed_size];
        let region = PackedInflightRegion::new(&bytes, 3, 256).unwrap();
        assert!(region
            .queues()
            .all(|q| q.is_ok_and(|q| q.inflight_count() == 0)));
    }

    #[test]
    fn counter_ties_and_odd_inflight_bytes_are_deterministic() {
        let per_queue = queue_region_size(4, InflightLayout::Split).unwrap() as usize;
        let mut bytes = vec![0u8; per_queue];
        let header = SplitHeaderFields {
            version: 1,
            desc_num: 4,
            last_batch_head: 0,
            used_idx: 0,
        };
        put_split_header(&mut bytes, 0, header);
        put_split_entry(&mut bytes, 0, 3, (0xff, 0, 7)); // any non-zero byte is inflight
        put_split_entry(&mut bytes, 0, 0, (1, 0, 7));
        put_split_entry(&mut bytes, 0, 2, (2, 0, 5));
        let queue = InflightRegion::new(&bytes, 1, 4).unwrap().queue(0).unwrap();
        assert_eq!(
            queue.inflight_descs_in_counter_order(),
            vec![(2, 5), (0, 7), (3, 7)]
        );
    }

    #[test]
    fn truncated_or_oversized_slices_and_bad_geometry() {
        let bytes = sample_split_region();
        for len in [0, 1, 15, 16, 191, 192, 383] {
            assert_eq!(
                InflightRegion::new(&bytes[..len], 2, 8).unwrap_err(),
                InflightError::RegionTooSmall {
                    needed: 384,
                    got: len,
                    num_queues: 2,
                    queue_size: 8,
                    layout: InflightLayout::Split,
                }
            );
        }
        // Longer than needed: fine, the tail is not read.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xff; 4096]);
        let region = InflightRegion::new(&longer, 2, 8).unwrap();
        assert_eq!(region.queue(0).unwrap().inflight_count(), 5);
        assert!(matches!(
            region.queue(2),
            Err(InflightError::NoSuchQueue {
                index: 2,
                num_queues: 2
            })
        ));
        assert!(region.queue(u16::MAX).is_err());

        for (queues, size) in [(0, 8), (MAX_QUEUES + 1, 8), (u16::MAX, u16::MAX)] {
            assert!(matches!(
                InflightRegion::new(&longer, queues, size),
                Err(InflightError::BadQueueCount { .. })
            ));
        }
        for size in [0, MAX_QUEUE_SIZE + 1, u16::MAX] {
            assert!(matches!(
                InflightRegion::new(&longer, 1, size),
                Err(InflightError::BadQueueSize { .. })
            ));
            assert!(matches!(
                PackedInflightRegion::new(&longer, 1, size),
                Err(InflightError::BadQueueSize { .. })
            ));
        }
        // The largest geometry we accept still just asks for the bytes.
        assert!(matches!(
            InflightRegion::new(&longer, MAX_QUEUES, MAX_QUEUE_SIZE),
            Err(InflightError::RegionTooSmall { .. })
        ));
    }

    #[test]
    fn hostile_split_headers_are_errors() {
        let per_queue = queue_region_size(8, InflightLayout::Split).unwrap() as usize;
        let cases: [(SplitHeaderFields, &str); 4] = [
            (
                SplitHeaderFields {
                    version: 1,
                    desc_num: 9,
                    last_batch_head: 0,
                    used_idx: 0,
                },
                "desc_num",
            ),
            (
                SplitHeaderFields {
                    version: 1,
                    desc_num: u16::MAX,
                    last_batch_head: 0,
                    used_idx: 0,
                },
                "desc_num",
            ),
            (
                SplitHeaderFields {
                    version: 1,
                    desc_num: 8,
                    last_batch_head: 8,
                    used_idx: 0,
                },
                "last_batch_head",
            ),
            (
                SplitHeaderFields {
                    version: 2,
                    desc_num: 8,
                    last_batch_head: 0,
                    used_idx: 0,
                },
                "version",
            ),
        ];
        for (header, what) in cases {
            let mut bytes = vec![0u8; per_queue];
            put_split_header(&mut bytes, 0, header);
            let err = InflightRegion::new(&bytes, 1, 8)
                .unwrap()
                .queue(0)
                .unwrap_err();
            let matched = match &err {
                InflightError::FieldOutOfRange { field, .. } => *field == what,
                InflightError::UnknownVersion { version: 2, .. } => what == "version",
                _ => false,
            };
            assert!(matched, "{what}: {err}");
        }
    }

    #[test]
    fn hostile_last_batches_are_errors_and_loops_end() {
        let bytes = sample_split_region();
        let queue = InflightRegion::new(&bytes, 2, 8).unwrap().queue(0).unwrap();
        // used_idx 40 vs a ring at 49: 9 published entries in a queue of 8.
        assert!(matches!(
            queue.last_batch(49),
            Err(InflightError::LastBatchTooLarge { batch: 9, .. })
        ));
        // A ring idx behind the region's wraps to a huge batch: an error, not a long walk.
        assert!(matches!(
            queue.last_batch(39),
            Err(InflightError::LastBatchTooLarge { batch: 65535, .. })
        ));
        // 3 -> 1 -> 6 -> 0 -> 0 ...: entry 6 links to 0, whose next (0) loops on itself.
        assert_eq!(queue.last_batch(48).unwrap(), vec![3, 1, 6, 0, 0, 0, 0, 0]);

        // A link past desc_num.
        let mut bytes = sample_split_region();
        put_split_entry(&mut bytes, 0, 1, (1, 8, 99));
        let queue = InflightRegion::new(&bytes, 2, 8).unwrap().queue(0).unwrap();
        assert_eq!(
            queue.last_batch(43).unwrap_err(),
            InflightError::BatchLinkOutOfRange {
                queue: 0,
                desc: 8,
                desc_num: 8
            }
        );
    }

    fn put_packed_queue(region: &mut [u8], h: PackedQueueHeader) {
        put64(region, 0, h.features);
        put16(region, 8, h.version);
        put16(region, 10, h.desc_num);
        put16(region, 12, h.free_head);
        put16(region, 14, h.old_free_head);
        put16(region, 16, h.used_idx);
        put16(region, 18, h.old_used_idx);
        region[20] = h.used_wrap_counter;
        region[21] = h.old_used_wrap_counter;
    }

    fn packed_header() -> PackedQueueHeader {
        PackedQueueHeader {
            features: 0,
            version: 1,
            desc_num: 16,
            free_head: 4,
            old_free_head: 4,
            used_idx: 3,
            old_used_idx: 3,
            used_wrap_counter: 1,
            old_used_wrap_counter: 1,
        }
    }

    #[test]
    fn packed_region_round_trip() {
        let per_queue = queue_region_size(16, InflightLayout::Packed).unwrap() as usize;
        assert_eq!(per_queue, 576); // align64(32 + 16 * 32) = align64(544)
        let mut bytes = vec![0u8; per_queue];
        put_packed_queue(&mut bytes, packed_header());
        let at = PACKED_HEADER_SIZE + 2 * PACKED_ENTRY_SIZE;
        bytes[at] = 1;
        put16(&mut bytes, at + 2, 3);
        put16(&mut bytes, at + 4, 2);
        put16(&mut bytes, at + 6, 1);
        put64(&mut bytes, at + 8, 77);
        put16(&mut bytes, at + 16, 9);
        put16(&mut bytes, at + 18, 0x8080);
        bytes[at + 20..at + 24].copy_from_slice(&512u32.to_le_bytes());
        put64(&mut bytes, at + 24, 0x1234_5000);
        let region = PackedInflightRegion::new(&bytes, 1, 16).unwrap();
        let queue = region.queue(0).unwrap();
        assert_eq!(queue.header(), packed_header());
        assert_eq!(
            queue.entry(2),
            Some(PackedEntry {
                desc: 2,
                inflight: true,
                next: 3,
                last: 2,
                num: 1,
                counter: 77,
                id: 9,
                flags: 0x8080,
                len: 512,
                addr: 0x1234_5000,
            })
        );
        assert_eq!(queue.entries().count(), 16);
        assert_eq!(queue.inflight_descs_in_counter_order(), vec![(2, 77)]);
        assert_eq!(
            queue.describe(),
            "inflight queue 0 (packed, size 16): version 1, desc_num 16, 1 inflight, used_idx 3 \
             (old 3), wrap 1 (old 1), free_head 4 (old 4)"
        );
        assert!(region.queue(1).is_err());
    }

    #[test]
    fn hostile_packed_headers_are_errors() {
        let per_queue = queue_region_size(16, InflightLayout::Packed).unwrap() as usize;
        type Spoil = fn(&mut PackedQueueHeader);
        let hostile: [(&str, Spoil); 7] = [
            ("desc_num", |h| h.desc_num = 17),
            ("used_idx", |h| h.used_idx = 16),
            ("old_used_idx", |h| h.old_used_idx = u16::MAX),
            ("free_head", |h| h.free_head = 17),
            ("old_free_head", |h| h.old_free_head = 1000),
            ("used_wrap_counter", |h| h.used_wrap_counter = 2),
            ("old_used_wrap_counter", |h| h.old_used_wrap_counter = 0xff),
        ];
        for (what, spoil) in hostile {
            let mut header = packed_header();
            spoil(&mut header);
            let mut bytes = vec![0u8; per_queue];
            put_packed_queue(&mut bytes, header);
            let region = PackedInflightRegion::new(&bytes, 1, 16).unwrap();
            match region.queue(0) {
                Err(InflightError::FieldOutOfRange { field, .. }) => assert_eq!(field, what),
                other => panic!("{what}: {other:?}"),
            }
        }
        // free_head == queue_size is an empty free list: allowed.
        let mut header = packed_header();
        header.free_head = 16;
        let mut bytes = vec![0u8; per_queue];
        put_packed_queue(&mut bytes, header);
        assert!(PackedInflightRegion::new(&bytes, 1, 16)
            .unwrap()
            .queue(0)
            .is_ok());
    }

    /// Pseudo-random regions and geometries through every accessor: errors are fine, panics not.
    /// (The fuzz target does the same with coverage guidance.)
    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..300 {
            let len = (next() % 4096) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 3 == 0 {
                // Mostly plausible headers, so the entry paths run too.
                for chunk in bytes.chunks_mut(64) {
                    if let Some(version) = chunk.get_mut(8..10) {
                        version.copy_from_slice(&1u16.to_le_bytes());
                    }
                }
            }
            let num_queues = (next() % 5) as u16;
            let queue_size = (next() % 40) as u16;
            if let Ok(region) = InflightRegion::new(&bytes, num_queues, queue_size) {
                for queue in (0..=num_queues).filter_map(|i| region.queue(i).ok()) {
                    let desc_num = queue.header().desc_num;
                    assert!(desc_num <= queue_size);
                    assert_eq!(queue.entries().count(), usize::from(desc_num));
                    let order = queue.inflight_descs_in_counter_order();
                    assert!(order.len() <= usize::from(desc_num));
                    assert!(order
                        .windows(2)
                        .all(|w| (w[0].1, w[0].0) < (w[1].1, w[1].0)));
                    if let Ok(batch) = queue.last_batch(next() as u16) {
                        assert!(batch.len() <= usize::from(desc_num));
                    }
                    let _ = queue.describe();
                }
            }
            if let Ok(region) = PackedInflightRegion::new(&bytes, num_queues, queue_size) {
                for queue in (0..=num_queues).filter_map(|i| region.queue(i).ok()) {
                    assert_eq!(
                        queue.entries().count(),
                        usize::from(queue.header().desc_num)
                    );
                    let _ = queue.inflight_descs_in_counter_order();
                    let _ = queue.describe();
                }
            }
        }
    }
}
