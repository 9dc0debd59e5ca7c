//! A split virtqueue (virtio 1.x §2.7) as the driver sees it.
//!
//! The driver writes descriptors and publishes chain heads in the available
//! ring; the device returns them in the used ring. Everything the device can
//! see is accessed with volatile reads and writes, and the ring indices are
//! ordered against the entries with fences: an entry must be visible before
//! the index that publishes it, and an index must be read before the entry it
//! announces.

use super::dma::DmaMemory;
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// In avail.flags: the driver does not want interrupts (it polls).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

pub struct SplitQueue {
    size: u16,
    desc: *mut u8,
    avail: *mut u16,
    used: *mut u8,
    next_avail: u16,
    last_used: u16,
}

impl SplitQueue {
    /// `size` must be a power of two no larger than MAX_QUEUE_SIZE.
    pub fn new(memory: *mut DmaMemory, size: u16) -> Self {
        // SAFETY: `memory` is the DMA area handed out by dma::take; these are
        // field addresses only.
        let (desc, avail, used) = unsafe {
            (
                addr_of_mut!((*memory).desc) as *mut u8,
                addr_of_mut!((*memory).avail) as *mut u16,
                addr_of_mut!((*memory).used) as *mut u8,
            )
        };
        SplitQueue {
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available ring and
    /// used ring (identity mapping: the same as their addresses).
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    pub fn set_descriptor(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.size);
        // SAFETY: 16-byte descriptor `index` lies inside the 4 KiB table
        // (size <= 256).
        unsafe {
            let d = self.desc.add(usize::from(index) * 16);
            write_volatile(d as *mut u64, addr);
            write_volatile(d.add(8) as *mut u32, len);
            write_volatile(d.add(12) as *mut u16, flags);
            write_volatile(d.add(14) as *mut u16, next);
        }
    }

    pub fn set_interrupts_wanted(&mut self, wanted: bool) {
        let flags = if wanted { 0 } else { AVAIL_F_NO_INTERRUPT };
        // SAFETY: avail.flags is the first u16 of the available ring page.
        unsafe { write_volatile(self.avail, flags) };
    }

    /// Offer the chain starting at `head` to the device.
    pub fn publish(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: avail = flags, idx, ring[size]; slot < size <= 256 fits the page.
        unsafe { write_volatile(self.avail.add(2 + slot), head) };
        self.next_avail = self.next_avail.wrapping_add(1);
        // The ring entry (and the descriptors) before the index.
        fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16.
        unsafe { write_volatile(self.avail.add(1), self.next_avail) };
        // The index before the notification that may follow (an MMIO write).
        fence(Ordering::SeqCst);
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: used = flags (u16), idx (u16), ring[size] of (u32 id, u32 len).
        unsafe { read_volatile((self.used as *const u16).add(1)) }
    }

    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Take the next element of the used ring, if the device returned one:
    /// the head of the chain it completed. (Its `len`, the bytes written,
    /// is not needed: the status byte says whether a request worked.)
    pub fn pop_used(&mut self) -> Option<u32> {
        if self.used_idx() == self.last_used {
            return None;
        }
        // The index before the element it announces.
        fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: element `slot` (u32 id, u32 len at 4 + slot*8) lies inside the page.
        let id = unsafe { read_volatile(self.used.add(4 + slot * 8) as *const u32) };
        self.last_used = self.last_used.wrapping_add(1);
        Some(id)
    }
}
