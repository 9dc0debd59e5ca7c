//! virtio-blk over virtio-mmio: bring-up (virtio 1.x §3.1), 4 KiB reads and
//! writes with several requests in flight, completion by polling the used
//! ring or by interrupt.
//!
//! Request slot `s` owns descriptors 3s (header, 16 bytes: type, reserved,
//! sector), 3s+1 (one 4 KiB data page) and 3s+2 (the status byte the device
//! writes). A flush uses the header and status descriptors only.
//!
//! With VIRTIO_F_INDIRECT_DESC slot `s` owns descriptor `s` alone, flagged
//! INDIRECT and pointing at the slot's own table of the same three entries
//! (two for a flush) in the `indirect` DMA page.
//!
//! With VIRTIO_F_EVENT_IDX kicks and interrupts are suppressed by ring index
//! (see queue.rs); `no-event-idx` and `no-indirect` on the command line keep
//! either feature off even when the device offers it.

pub use super::dma::MAX_SLOTS;
use super::dma::{self, DmaMemory, INDIRECT_TABLE_BYTES, MAX_QUEUE_SIZE, PAGE, STATUS_OFFSET};
use super::mmio::{self, status, Transport};
use super::queue::{write_descriptor, SplitQueue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::apic;
use crate::idt;
use crate::time::Instant;
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use test_guest::cmdline::MmioDevice;

pub const DEVICE_ID_BLOCK: u32 = 2;
pub const SECTOR_SIZE: u64 = 512;
const SECTORS_PER_BLOCK: u64 = PAGE as u64 / SECTOR_SIZE;

/// Feature bits (virtio 1.x §3.1.1 and §6).
pub mod feature {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}
/// What this driver implements; it accepts nothing else. (SEG_MAX and
/// BLK_SIZE only describe the device; every request here is one 4 KiB
/// segment. SIZE_MAX is left out: qemu-storage-daemon offers it with a
/// size_max of 0.)
const DRIVER_FEATURES: u64 = feature::VERSION_1
    | feature::SEG_MAX
    | feature::RO
    | feature::BLK_SIZE
    | feature::FLUSH
    | feature::RING_INDIRECT_DESC
    | feature::RING_EVENT_IDX;

/// How the driver sets the device up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Completion by interrupt (else the driver polls the used ring).
    pub irq: bool,
    /// Negotiate VIRTIO_F_EVENT_IDX if the device offers it.
    pub event_idx: bool,
    /// Negotiate VIRTIO_F_INDIRECT_DESC if the device offers it.
    pub indirect: bool,
}

const CONFIG_CAPACITY: u64 = 0x00;
const CONFIG_BLK_SIZE: u64 = 0x14;

const REQUEST_IN: u32 = 0;
const REQUEST_OUT: u32 = 1;
const REQUEST_FLUSH: u32 = 4;
const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPP: u8 = 2;
/// Written into the status byte before submission: a device that completes
/// a request without writing the status is caught.
const STATUS_UNWRITTEN: u8 = 0xff;

/// How long one completion may take before the driver gives up (generous:
/// reconnect tests restart the backend while requests are in flight).
const COMPLETION_TIMEOUT_MS: u64 = 30_000;
/// How often a waiting driver reads the device status to notice DEVICE_NEEDS_RESET.
const STATUS_CHECK_INTERVAL_MS: u64 = 100;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum BlkError {
    NotVirtio {
        base: u64,
        magic: u32,
    },
    LegacyTransport {
        base: u64,
        version: u32,
    },
    ResetTimeout,
    NoVersion1 {
        offered: u64,
    },
    FeaturesRejected {
        accepted: u64,
    },
    QueueAlreadyReady,
    NoQueue,
    QueueTooSmall {
        size: u32,
    },
    BlockSizeTooLarge {
        blk_size: u32,
    },
    DmaInUse,
    ConfigUnstable,
    Interrupt(apic::ApicError),
    NoInterruptVector {
        index: usize,
    },
    ReadOnly,
    BeyondEnd {
        block: u64,
        capacity_sectors: u64,
    },
    FlushNotOffered,
    NeedsReset {
        op: Op,
        block: u64,
    },
    Timeout {
        op: Op,
        block: u64,
        waiting_for_interrupt: bool,
        used_ring_moved: bool,
    },
    UnknownUsedId {
        id: u32,
    },
    Request {
        op: Op,
        block: u64,
        status: u8,
    },
}

impl core::fmt::Display for BlkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BlkError::NotVirtio { base, magic } => {
                write!(f, "no virtio-mmio device at {base:#x} (magic {magic:#x})")
            }
            BlkError::LegacyTransport { base, version } => {
                write!(
                    f,
                    "virtio-mmio at {base:#x} is version {version}, only version 2 is supported"
                )
            }
            BlkError::ResetTimeout => write!(f, "device status did not return to 0 after reset"),
            BlkError::NoVersion1 { offered } => {
                write!(
                    f,
                    "device does not offer VIRTIO_F_VERSION_1 (features {offered:#x})"
                )
            }
            BlkError::FeaturesRejected { accepted } => {
                write!(f, "device cleared FEATURES_OK for features {accepted:#x}")
            }
            BlkError::QueueAlreadyReady => write!(f, "queue 0 is already live after reset"),
            BlkError::NoQueue => write!(f, "queue 0 is not available (QueueNumMax 0)"),
            BlkError::QueueTooSmall { size } => {
                write!(f, "queue 0 holds {size} descriptors, a request needs 3")
            }
            BlkError::BlockSizeTooLarge { blk_size } => {
                write!(
                    f,
                    "device block size {blk_size} exceeds the 4096-byte requests"
                )
            }
            BlkError::ConfigUnstable => {
                write!(
                    f,
                    "ConfigGeneration kept changing while reading the capacity"
                )
            }
            BlkError::DmaInUse => write!(f, "the driver's DMA memory is already in use"),
            BlkError::Interrupt(e) => write!(f, "interrupt routing: {e}"),
            BlkError::NoInterruptVector { index } => {
                write!(
                    f,
                    "device #{index} has no interrupt vector (only {} exist)",
                    idt::IRQ_VECTORS
                )
            }
            BlkError::ReadOnly => write!(f, "the device is read-only (VIRTIO_BLK_F_RO)"),
            BlkError::BeyondEnd {
                block,
                capacity_sectors,
            } => write!(
                f,
                "block {block} is beyond the end of the disk ({capacity_sectors} sectors)"
            ),
            BlkError::FlushNotOffered => {
                write!(f, "flush requested but VIRTIO_BLK_F_FLUSH not negotiated")
            }
            BlkError::NeedsReset { op, block } => write!(
                f,
                "device set DEVICE_NEEDS_RESET while {} of block {block} was pending",
                op.name()
            ),
            BlkError::Timeout {
                op,
                block,
                waiting_for_interrupt,
                used_ring_moved,
            } => {
                write!(
                    f,
                    "{} of block {block} did not complete within {COMPLETION_TIMEOUT_MS} ms",
                    op.name()
                )?;
                if waiting_for_interrupt {
                    write!(
                        f,
                        " (no interrupt; used ring {})",
                        if used_ring_moved {
                            "has entries"
                        } else {
                            "is empty"
                        }
                    )?;
                }
                Ok(())
            }
            BlkError::UnknownUsedId { id } => {
                write!(
                    f,
                    "device returned descriptor {id}, which heads no pending request"
                )
            }
            BlkError::Request { op, block, status } => {
                let meaning = match status {
                    STATUS_IOERR => "VIRTIO_BLK_S_IOERR",
                    STATUS_UNSUPP => "VIRTIO_BLK_S_UNSUPP",
                    STATUS_UNWRITTEN => "status byte never written",
                    _ => "not a virtio-blk status",
                };
                write!(
                    f,
                    "{} of block {block} failed: status {status} ({meaning})",
                    op.name()
                )
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Pending {
    op: Op,
    block: u64,
}

pub struct BlkDevice {
    transport: Transport,
    queue: SplitQueue,
    memory: *mut DmaMemory,
    features: u64,
    capacity_sectors: u64,
    slots: usize,
    pending: [Option<Pending>; MAX_SLOTS],
    /// Interrupt mode: the counter index (vector 0x30+index) and bookkeeping.
    irq: Option<usize>,
    irq_seen: u64,
    interrupts: u64,
    notified: bool,
    /// Notifications actually written to QueueNotify.
    kicks: u64,
}

/// The virtio-blk devices among the command line's virtio-mmio windows, with
/// their position in the command line (which picks the interrupt vector).
pub fn find_block_devices(devices: &[MmioDevice], mut found: impl FnMut(usize, &MmioDevice)) {
    for (index, device) in devices.iter().enumerate() {
        let id = Transport::new(device.base).identity();
        if id.magic == mmio::MAGIC && id.device_id == DEVICE_ID_BLOCK {
            found(index, device);
        }
    }
}

impl BlkDevice {
    /// Bring up device `index` (its position in the command line) and its
    /// queue 0. `setup.irq`: complete by interrupt (vector 0x30+index);
    /// `setup.event_idx` / `setup.indirect`: take those ring features where
    /// offered.
    pub fn open(device: &MmioDevice, index: usize, setup: Setup) -> Result<Self, BlkError> {
        let irq = setup.irq;
        let transport = Transport::new(device.base);
        let id = transport.identity();
        if id.magic != mmio::MAGIC {
            return Err(BlkError::NotVirtio {
                base: device.base,
                magic: id.magic,
            });
        }
        if id.version != mmio::MODERN_VERSION {
            return Err(BlkError::LegacyTransport {
                base: device.base,
                version: id.version,
            });
        }
        if !transport.reset() {
            return Err(BlkError::ResetTimeout);
        }
        transport.add_status(status::ACKNOWLEDGE);
        transport.add_status(status::DRIVER);

        let offered = transport.device_features();
        if offered & feature::VERSION_1 == 0 {
            transport.add_status(status::FAILED);
            return Err(BlkError::NoVersion1 { offered });
        }
        let mut wanted = DRIVER_FEATURES;
        if !setup.event_idx {
            wanted &= !feature::RING_EVENT_IDX;
        }
        if !setup.indirect {
            wanted &= !feature::RING_INDIRECT_DESC;
        }
        let features = offered & wanted;
        let indirect = features & feature::RING_INDIRECT_DESC != 0;
        transport.set_driver_features(features);
        transport.add_status(status::FEATURES_OK);
        if transport.status() & status::FEATURES_OK == 0 {
            transport.add_status(status::FAILED);
            return Err(BlkError::FeaturesRejected { accepted: features });
        }
        let fail = |error| {
            transport.add_status(status::FAILED);
            Err(error)
        };
        if features & feature::BLK_SIZE != 0 {
            let blk_size = transport.config_read32(CONFIG_BLK_SIZE);
            if blk_size as usize > PAGE {
                return fail(BlkError::BlockSizeTooLarge { blk_size });
            }
        }
        let Some(capacity_sectors) = transport.config_read64(CONFIG_CAPACITY) else {
            return fail(BlkError::ConfigUnstable);
        };

        transport.select_queue(0);
        if transport.queue_ready() {
            return fail(BlkError::QueueAlreadyReady);
        }
        let max = transport.queue_num_max();
        if max == 0 {
            return fail(BlkError::NoQueue);
        }
        // A request takes three descriptors, or one with indirect tables.
        if max < 3 && !indirect {
            return fail(BlkError::QueueTooSmall { size: max });
        }
        // Split rings want a power of two; use the largest that fits.
        let limit = max.min(u32::from(MAX_QUEUE_SIZE));
        let size = 1u16 << (31 - limit.leading_zeros());
        let Some(memory) = dma::take() else {
            return fail(BlkError::DmaInUse);
        };
        let mut queue = SplitQueue::new(memory, size, features & feature::RING_EVENT_IDX != 0);
        queue.set_interrupts_wanted(irq);
        let (desc, driver, device_ring) = queue.addresses();
        transport.activate_queue(size, desc, driver, device_ring);

        let irq = if irq {
            if index >= idt::IRQ_VECTORS {
                return fail(BlkError::NoInterruptVector { index });
            }
            if let Err(e) = apic::route_gsi(device.gsi, idt::IRQ_VECTOR_BASE + index as u8) {
                return fail(BlkError::Interrupt(e));
            }
            apic::enable_local_apic(idt::SPURIOUS_VECTOR);
            Some(index)
        } else {
            None
        };
        transport.add_status(status::DRIVER_OK);

        Ok(BlkDevice {
            transport,
            slots: if indirect {
                usize::from(size)
            } else {
                usize::from(size) / 3
            }
            .min(MAX_SLOTS),
            queue,
            memory,
            features,
            capacity_sectors,
            pending: [None; MAX_SLOTS],
            irq_seen: irq.map_or(0, idt::irq_count),
            irq,
            interrupts: 0,
            notified: false,
            kicks: 0,
        })
    }

    /// Resets the device (status 0, which stops it using our memory) and releases the DMA
    /// memory, so the device can be brought up again with `open`.
    pub fn close(self) -> Result<(), BlkError> {
        if !self.transport.reset() {
            return Err(BlkError::ResetTimeout);
        }
        dma::give_back(self.memory);
        Ok(())
    }

    pub fn base(&self) -> u64 {
        self.transport.base()
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn capacity_blocks(&self) -> u64 {
        self.capacity_sectors / SECTORS_PER_BLOCK
    }

    /// Requests that can be in flight at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    pub fn can_flush(&self) -> bool {
        self.features & feature::FLUSH != 0
    }

    /// Interrupts taken so far (interrupt mode).
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    /// Notifications sent to the device so far (QueueNotify writes).
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// VIRTIO_F_EVENT_IDX was negotiated.
    pub fn event_idx(&self) -> bool {
        self.features & feature::RING_EVENT_IDX != 0
    }

    /// VIRTIO_F_INDIRECT_DESC was negotiated.
    pub fn indirect(&self) -> bool {
        self.features & feature::RING_INDIRECT_DESC != 0
    }

    /// The data page of `slot`, to fill before a write or read after a read.
    pub fn data(&mut self, slot: usize) -> &mut [u8; PAGE] {
        assert!(slot < self.slots && self.pending[slot].is_none());
        // SAFETY: the slot is not pending, so the device is not using its
        // page; the &mut borrow of self keeps it that way while this lives.
        unsafe { &mut *addr_of_mut!((*self.memory).data[slot]) }
    }

    fn status_byte(&self, slot: usize) -> *mut u8 {
        // SAFETY: STATUS_OFFSET + slot < PAGE (checked at compile time in dma.rs).
        unsafe { (addr_of_mut!((*self.memory).requests) as *mut u8).add(STATUS_OFFSET + slot) }
    }

    /// Queue a request in `slot` (free); it reaches the device at `kick`.
    pub fn push(&mut self, slot: usize, op: Op, block: u64) -> Result<(), BlkError> {
        assert!(slot < self.slots && self.pending[slot].is_none());
        match op {
            Op::Write if self.features & feature::RO != 0 => return Err(BlkError::ReadOnly),
            Op::Flush if !self.can_flush() => return Err(BlkError::FlushNotOffered),
            Op::Read | Op::Write if block >= self.capacity_blocks() => {
                return Err(BlkError::BeyondEnd {
                    block,
                    capacity_sectors: self.capacity_sectors,
                })
            }
            _ => {}
        }
        let (kind, sector) = match op {
            Op::Read => (REQUEST_IN, block * SECTORS_PER_BLOCK),
            Op::Write => (REQUEST_OUT, block * SECTORS_PER_BLOCK),
            Op::Flush => (REQUEST_FLUSH, 0),
        };
        // SAFETY: header `slot` (16 bytes at slot*16) lies within the page
        // (MAX_SLOTS*16 <= STATUS_OFFSET); the slot is ours, not the device's.
        let header = unsafe {
            let h = (addr_of_mut!((*self.memory).requests) as *mut u8).add(slot * 16);
            write_volatile(h as *mut u32, kind);
            write_volatile(h.add(4) as *mut u32, 0);
            write_volatile(h.add(8) as *mut u64, sector);
            h as u64
        };
        let status = self.status_byte(slot);
        // SAFETY: see status_byte.
        unsafe { write_volatile(status, STATUS_UNWRITTEN) };
        // SAFETY: field address only.
        let data = unsafe { addr_of_mut!((*self.memory).data[slot]) as u64 };
        let data_flags = if op == Op::Read {
            DESC_F_WRITE | DESC_F_NEXT
        } else {
            DESC_F_NEXT
        };
        let head = if self.indirect() {
            // Table entries 0 (header), 1 (data; not for a flush) and 2 (status), chained
            // with indices inside the table.
            // SAFETY: table `slot` (INDIRECT_TABLE_BYTES at slot*INDIRECT_TABLE_BYTES) lies
            // within the page (MAX_SLOTS*INDIRECT_TABLE_BYTES <= PAGE, dma.rs); the slot is
            // free, so the device is not reading it.
            let table = unsafe {
                (addr_of_mut!((*self.memory).indirect) as *mut u8).add(slot * INDIRECT_TABLE_BYTES)
            };
            let entries: u16 = if op == Op::Flush {
                // SAFETY: as above, for entries 0 and 1 of the table.
                unsafe {
                    write_descriptor(table, 0, header, 16, DESC_F_NEXT, 1);
                    write_descriptor(table, 1, status as u64, 1, DESC_F_WRITE, 0);
                }
                2
            } else {
                // SAFETY: as above, for entries 0 to 2 of the table.
                unsafe {
                    write_descriptor(table, 0, header, 16, DESC_F_NEXT, 1);
                    write_descriptor(table, 1, data, PAGE as u32, data_flags, 2);
                    write_descriptor(table, 2, status as u64, 1, DESC_F_WRITE, 0);
                }
                3
            };
            let head = slot as u16;
            self.queue.set_descriptor(
                head,
                table as u64,
                u32::from(entries) * 16,
                DESC_F_INDIRECT,
                0,
            );
            head
        } else {
            let head = (slot * 3) as u16;
            if op == Op::Flush {
                self.queue
                    .set_descriptor(head, header, 16, DESC_F_NEXT, head + 2);
            } else {
                self.queue
                    .set_descriptor(head, header, 16, DESC_F_NEXT, head + 1);
                self.queue
                    .set_descriptor(head + 1, data, PAGE as u32, data_flags, head + 2);
            }
            self.queue
                .set_descriptor(head + 2, status as u64, 1, DESC_F_WRITE, 0);
            head
        };
        self.pending[slot] = Some(Pending { op, block });
        self.queue.publish(head);
        Ok(())
    }

    /// Tell the device that new requests wait in queue 0, unless it said
    /// (EVENT_IDX's avail_event) that it does not need to hear about them.
    pub fn kick(&mut self) {
        if self.queue.kick_prepare() {
            self.transport.notify(0);
            self.kicks += 1;
        }
    }

    /// Some pending request, for error messages.
    fn any_pending(&self) -> Pending {
        self.pending
            .iter()
            .flatten()
            .next()
            .copied()
            .unwrap_or(Pending {
                op: Op::Read,
                block: 0,
            })
    }

    /// The next used element, if one is there to take now. In interrupt mode
    /// the used ring is only read once an interrupt said so; once it is
    /// drained (and stays so after used_event is set, with EVENT_IDX), the
    /// next interrupt is awaited.
    fn poll_used(&mut self) -> Option<u32> {
        let Some(index) = self.irq else {
            return self.queue.pop_used();
        };
        let count = idt::irq_count(index);
        if count != self.irq_seen {
            self.interrupts += count.wrapping_sub(self.irq_seen);
            self.irq_seen = count;
            self.transport.acknowledge_interrupt();
            self.notified = true;
        }
        if !self.notified {
            return None;
        }
        let id = self.queue.pop_used();
        if id.is_none() && self.queue.empty_before_wait() {
            self.notified = false;
        }
        id
    }

    /// A completion already in the used ring, without waiting: its slot, which
    /// is free again (None: nothing there now). A request the device failed
    /// is an error.
    pub fn try_complete(&mut self) -> Result<Option<usize>, BlkError> {
        match self.poll_used() {
            Some(id) => self.finish_used(id).map(Some),
            None => Ok(None),
        }
    }

    /// Wait for the next completed request; returns its slot, which is free
    /// again. A request the device failed is an error.
    pub fn complete(&mut self) -> Result<usize, BlkError> {
        let start = Instant::now();
        let mut spins: u32 = 0;
        let mut next_status_check_ms = STATUS_CHECK_INTERVAL_MS;
        let used_id = loop {
            if let Some(id) = self.poll_used() {
                break id;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) {
                core::hint::spin_loop();
                continue;
            }
            let waited = start.elapsed_ms();
            // A device that gave up (DEVICE_NEEDS_RESET, e.g. its backend failed) completes
            // nothing more: notice within a status-check interval, not at the timeout. Reading
            // the status is an MMIO exit, so not on every spin.
            if waited >= next_status_check_ms {
                next_status_check_ms = waited + STATUS_CHECK_INTERVAL_MS;
                if self.transport.status() & status::NEEDS_RESET != 0 {
                    let Pending { op, block } = self.any_pending();
                    return Err(BlkError::NeedsReset { op, block });
                }
            }
            if waited >= COMPLETION_TIMEOUT_MS {
                let Pending { op, block } = self.any_pending();
                return Err(BlkError::Timeout {
                    op,
                    block,
                    waiting_for_interrupt: self.irq.is_some(),
                    used_ring_moved: self.queue.has_used(),
                });
            }
            core::hint::spin_loop();
        };
        self.finish_used(used_id)
    }

    /// The request whose chain head the device returned: free its slot and
    /// check its status byte.
    fn finish_used(&mut self, used_id: u32) -> Result<usize, BlkError> {
        let (slot, head_of_slot) = if self.indirect() {
            (used_id as usize, true)
        } else {
            (used_id as usize / 3, used_id.is_multiple_of(3))
        };
        if !head_of_slot || slot >= self.slots {
            return Err(BlkError::UnknownUsedId { id: used_id });
        }
        let Some(Pending { op, block }) = self.pending[slot].take() else {
            return Err(BlkError::UnknownUsedId { id: used_id });
        };
        // SAFETY: see status_byte; the device is done with it.
        let status = unsafe { read_volatile(self.status_byte(slot)) };
        if status != STATUS_OK {
            if self.transport.status() & status::NEEDS_RESET != 0 {
                return Err(BlkError::NeedsReset { op, block });
            }
            return Err(BlkError::Request { op, block, status });
        }
        Ok(slot)
    }
}
