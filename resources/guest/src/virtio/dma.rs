//! The memory the device reads and writes: rings, request headers, status
//! bytes and data buffers, all static. The page tables map memory 1:1, so the
//! address of a static is also its guest-physical address, which is what the
//! device needs.

use core::sync::atomic::{AtomicBool, Ordering};

pub const PAGE: usize = 4096;
/// The largest queue the driver sets up (a 4 KiB descriptor table).
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Requests in flight at once: each takes three descriptors (or, with INDIRECT_DESC, one
/// descriptor pointing at a three-entry table in `indirect`).
pub const MAX_SLOTS: usize = MAX_QUEUE_SIZE as usize / 3;
/// Offset of the status bytes within the `requests` page.
pub const STATUS_OFFSET: usize = 2048;
/// Bytes of one slot's indirect descriptor table (header, data, status: 3 x 16 bytes), at
/// slot*INDIRECT_TABLE_BYTES in the `indirect` page.
pub const INDIRECT_TABLE_BYTES: usize = 3 * 16;

#[repr(C, align(4096))]
pub struct DmaMemory {
    pub desc: [u8; PAGE],
    pub avail: [u8; PAGE],
    pub used: [u8; PAGE],
    /// 16-byte request headers at slot*16, status bytes at STATUS_OFFSET+slot.
    pub requests: [u8; PAGE],
    /// Per-slot indirect descriptor tables (INDIRECT_DESC), INDIRECT_TABLE_BYTES each.
    pub indirect: [u8; PAGE],
    pub data: [[u8; PAGE]; MAX_SLOTS],
}

const _: () = assert!(MAX_SLOTS * 16 <= STATUS_OFFSET && STATUS_OFFSET + MAX_SLOTS <= PAGE);
const _: () = assert!(MAX_SLOTS * INDIRECT_TABLE_BYTES <= PAGE);
// The split ring's event indices fit their pages at the largest queue: used_event after the
// available ring (flags, idx, ring[size] of u16), avail_event after the used ring (flags, idx,
// ring[size] of (u32 id, u32 len)); each is a u16.
const _: () = assert!(4 + 2 * MAX_QUEUE_SIZE as usize + 2 <= PAGE);
const _: () = assert!(4 + 8 * MAX_QUEUE_SIZE as usize + 2 <= PAGE);

static mut DMA: DmaMemory = DmaMemory {
    desc: [0; PAGE],
    avail: [0; PAGE],
    used: [0; PAGE],
    requests: [0; PAGE],
    indirect: [0; PAGE],
    data: [[0; PAGE]; MAX_SLOTS],
};
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The DMA memory, once: one device at a time owns it. Zeroed on hand-out.
pub fn take() -> Option<*mut DmaMemory> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    let memory = core::ptr::addr_of_mut!(DMA);
    // SAFETY: the flag above makes this the only pointer ever handed out.
    unsafe { core::ptr::write_bytes(memory, 0, 1) };
    Some(memory)
}

/// Hands the DMA memory back. Only after the device was reset (status 0): a reset device no
/// longer reads or writes it, so the next `take` may zero it and give it to a new bring-up.
pub fn give_back(memory: *mut DmaMemory) {
    debug_assert!(core::ptr::eq(memory, core::ptr::addr_of_mut!(DMA)));
    TAKEN.store(false, Ordering::Release);
}
