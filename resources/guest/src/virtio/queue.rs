//! A split virtqueue (virtio 1.x §2.7) as the driver sees it.
//!
//! The driver writes descriptors and publishes chain heads in the available
//! ring; the device returns them in the used ring. Everything the device can
//! see is accessed with volatile reads and writes, and the ring indices are
//! ordered against the entries with fences: an entry must be visible before
//! the index that publishes it, and an index must be read before the entry it
//! announces.
//!
//! With VIRTIO_F_EVENT_IDX (`event_idx`) notifications go by ring index
//! instead of flags: the driver kicks only when the available index crosses
//! the device's `avail_event`, and steers interrupts with its `used_event`
//! (kept behind the used index when it polls, at it when it waits for an
//! interrupt).

use super::dma::DmaMemory;
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};
use test_guest::ring_event::need_event;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
/// The descriptor's buffer is a table of descriptors (VIRTIO_F_INDIRECT_DESC).
pub const DESC_F_INDIRECT: u16 = 4;
/// In avail.flags: the driver does not want interrupts (it polls).
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Writes the 16-byte descriptor `index` of the table at `table` (the queue's
/// own table or an indirect one).
///
/// # Safety
/// `table` must point at a table of more than `index` descriptors that the
/// device is not reading.
pub unsafe fn write_descriptor(
    table: *mut u8,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    // SAFETY: the caller's promise.
    unsafe {
        let d = table.add(usize::from(index) * 16);
        write_volatile(d as *mut u64, addr);
        write_volatile(d.add(8) as *mut u32, len);
        write_volatile(d.add(12) as *mut u16, flags);
        write_volatile(d.add(14) as *mut u16, next);
    }
}

pub struct SplitQueue {
    size: u16,
    desc: *mut u8,
    avail: *mut u16,
    used: *mut u8,
    next_avail: u16,
    last_used: u16,
    /// VIRTIO_F_EVENT_IDX was negotiated.
    event_idx: bool,
    /// Whether the driver wants interrupts (set_interrupts_wanted).
    interrupts_wanted: bool,
    /// `next_avail` at the last kick decision (kick_prepare): what the device
    /// has been told about, or chose not to hear about.
    avail_at_kick: u16,
}

impl SplitQueue {
    /// `size` must be a power of two no larger than MAX_QUEUE_SIZE.
    pub fn new(memory: *mut DmaMemory, size: u16, event_idx: bool) -> Self {
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
            event_idx,
            interrupts_wanted: true,
            avail_at_kick: 0,
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
        // (size <= 256); the driver only rewrites descriptors of free slots.
        unsafe { write_descriptor(self.desc, index, addr, len, flags, next) };
    }

    /// used_event: the u16 after the available ring's entries.
    fn used_event_ptr(&self) -> *mut u16 {
        // SAFETY: avail = flags, idx, ring[size], used_event; 2 + size < 2048 u16s (size <= 256).
        unsafe { self.avail.add(2 + usize::from(self.size)) }
    }

    /// avail_event: the u16 after the used ring's elements.
    fn avail_event(&self) -> u16 {
        // SAFETY: used = flags, idx, ring[size] of 8 bytes, avail_event; 4 + 8*size + 2 <= 4096.
        unsafe { read_volatile(self.used.add(4 + 8 * usize::from(self.size)) as *const u16) }
    }

    /// Where used_event should stand: polling, one behind what the driver consumed, which the
    /// device's used index can never cross (so it never signals); waiting for interrupts, at
    /// it (signal when the next element is written).
    fn write_used_event(&self) {
        let event = if self.interrupts_wanted {
            self.last_used
        } else {
            self.last_used.wrapping_sub(1)
        };
        // SAFETY: see used_event_ptr.
        unsafe { write_volatile(self.used_event_ptr(), event) };
    }

    pub fn set_interrupts_wanted(&mut self, wanted: bool) {
        self.interrupts_wanted = wanted;
        // With EVENT_IDX the driver must leave avail.flags 0 (§2.7.7.1) and says it with
        // used_event instead.
        let flags = if wanted || self.event_idx {
            0
        } else {
            AVAIL_F_NO_INTERRUPT
        };
        // SAFETY: avail.flags is the first u16 of the available ring page.
        unsafe { write_volatile(self.avail, flags) };
        if self.event_idx {
            self.write_used_event();
        }
    }

    /// Offer the chain starting at `head` to the device. It is told at the
    /// next `kick_prepare` that says so.
    pub fn publish(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        // SAFETY: avail = flags, idx, ring[size]; slot < size <= 256 fits the page.
        unsafe { write_volatile(self.avail.add(2 + slot), head) };
        self.next_avail = self.next_avail.wrapping_add(1);
        // The ring entry (and the descriptors) before the index.
        fence(Ordering::Release);
        // SAFETY: avail.idx is the second u16.
        unsafe { write_volatile(self.avail.add(1), self.next_avail) };
    }

    /// Whether the device needs a notification for what was published since
    /// the last call (Linux's virtqueue_kick_prepare_split). Without EVENT_IDX
    /// always yes; with it, only when the available index passed the device's
    /// avail_event on its way from the last decision to now.
    pub fn kick_prepare(&mut self) -> bool {
        // The published index before reading avail_event (the device writes avail_event, then
        // reads avail.idx: one of us sees the other's write), and before the notification.
        fence(Ordering::SeqCst);
        let old = self.avail_at_kick;
        let new = self.next_avail;
        self.avail_at_kick = new;
        if !self.event_idx {
            return true;
        }
        need_event(self.avail_event(), new, old)
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
        if self.event_idx {
            self.write_used_event();
        }
        Some(id)
    }

    /// Before waiting for an interrupt on an empty used ring: whether it is
    /// still empty once the device must have seen where used_event stands
    /// (Linux's virtqueue_enable_cb). False: something arrived meanwhile,
    /// perhaps without an interrupt; pop it instead of waiting. Without
    /// EVENT_IDX the device signals every used element (avail.flags 0), so
    /// waiting is always safe.
    pub fn empty_before_wait(&mut self) -> bool {
        if !self.event_idx {
            return true;
        }
        self.write_used_event();
        // used_event before re-reading used.idx: either the device sees the new used_event and
        // signals, or this read sees its element.
        fence(Ordering::SeqCst);
        !self.has_used()
    }
}
