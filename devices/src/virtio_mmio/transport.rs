//! The virtio-mmio version 2 transport: the register file a guest driver programs, and the
//! device status state machine that turns DRIVER_OK into `VirtioDevice::activate` and a
//! status write of 0 into `VirtioDevice::reset`.
//!
//! Only the control path runs here (each access is a VM exit). The data path bypasses it:
//! the VMM registers each queue's kick eventfd as a KVM ioeventfd on QueueNotify and the call
//! eventfd as a KVM irqfd, and the device hands both to whatever serves the queues.

use tracing::{debug, info, warn};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{QueueConfig, VirtioDevice, MAX_QUEUE_SIZE};
use super::error_chain;
use super::interrupt::InterruptStatus;
use super::registers::{self as reg, status};

/// VIRTIO_F_VERSION_1: the device follows the virtio 1.x (modern) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("the device does not offer VIRTIO_F_VERSION_1; virtio-mmio v2 is modern-only")]
    NotModern,
    #[error("the device has no queues")]
    NoQueues,
    #[error("the device has {0} queues; a transport supports at most {max}", max = u16::MAX)]
    TooManyQueues(usize),
    #[error("queue {index} has maximum size {size}; it must be a power of two from 1 to 32768")]
    BadQueueMaxSize { index: usize, size: u16 },
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// The registers of one queue as the driver wrote them.
#[derive(Clone, Copy, Debug)]
struct QueueRegisters {
    max_size: u16,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        QueueRegisters {
            max_size,
            // Until the driver writes QueueNum, the queue has its maximum size.
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }

    fn config(&self, index: u16) -> QueueConfig {
        QueueConfig {
            index,
            size: self.size,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
            ready: self.ready,
        }
    }
}

/// Replaces the low or high 32 bits of a 64-bit address register pair.
fn set_half(target: &mut u64, value: u32, high: bool) {
    *target = if high {
        (*target & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (*target & !0xffff_ffff) | u64::from(value)
    };
}

/// One virtio-mmio device as the guest sees it.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    /// Guest memory, read-only use: the used rings' `idx` for InterruptStatus, and the checks
    /// that a queue the driver makes ready lies in guest memory.
    memory: GuestMemoryMmap,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    queues: Vec<QueueRegisters>,
    status: u32,
    config_generation: u32,
    interrupts: InterruptStatus,
    /// `activate` was called since the last reset (successfully or not).
    activation_attempted: bool,
    queue_kicks: Vec<EventFd>,
    call: EventFd,
}

impl MmioTransport {
    /// Wraps `device`; `memory` is the guest RAM the driver will place queues in.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
    ) -> Result<Self, TransportError> {
        let device_features = device.device_features();
        if device_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(TransportError::NotModern);
        }
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() {
            return Err(TransportError::NoQueues);
        }
        if max_sizes.len() > usize::from(u16::MAX) {
            return Err(TransportError::TooManyQueues(max_sizes.len()));
        }
        for (index, &size) in max_sizes.iter().enumerate() {
            if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                return Err(TransportError::BadQueueMaxSize { index, size });
            }
        }
        let queue_kicks = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(TransportError::EventFd)?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?;
        Ok(MmioTransport {
            device,
            memory,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            queues: max_sizes.into_iter().map(QueueRegisters::new).collect(),
            status: 0,
            config_generation: 0,
            interrupts: InterruptStatus::default(),
            activation_attempted: false,
            queue_kicks,
            call,
        })
    }

    /// One eventfd per queue, in queue order. Register `queue_kick_fds()[i]` as a KVM ioeventfd
    /// at `base + QUEUE_NOTIFY` (4 bytes) with datamatch `i`.
    pub fn queue_kick_fds(&self) -> &[EventFd] {
        &self.queue_kicks
    }

    /// The device's interrupt. Register it as a KVM irqfd on the device's GSI.
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// The device status register as the driver would read it.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The virtio device id, for logs and the device's name in the DSDT.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Tells the driver the device configuration changed: bumps ConfigGeneration, sets
    /// InterruptStatus bit 1 and raises the interrupt.
    pub fn notify_config_change(&mut self) -> std::io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupts.raise_config_change();
        self.call.write(1)
    }

    /// The device cannot go on (its backend came back as a different device, or cannot come
    /// back): DEVICE_NEEDS_RESET, and a configuration change interrupt so the driver looks
    /// (virtio 1.2 §2.1.2).
    pub fn device_needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Err(err) = self.notify_config_change() {
            warn!(%err, "virtio-mmio: cannot raise the config change interrupt");
        }
    }

    /// A driver read of `data.len()` bytes at `offset` into the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG_SPACE {
            data.fill(0);
            if let Some(config_offset) = self.config_access(offset, data.len()) {
                self.device.read_config(config_offset, data);
            }
            return;
        }
        let value = if Self::is_register_access(offset, data.len()) {
            self.read_register(offset)
        } else {
            0
        };
        // A rejected access still fills what the driver reads (with zeros), never a panic.
        let bytes = value.to_le_bytes();
        let len = data.len().min(bytes.len());
        data.fill(0);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    /// A driver write of `data` at `offset` into the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG_SPACE {
            if let Some(config_offset) = self.config_access(offset, data.len()) {
                self.device.write_config(config_offset, data);
            }
            return;
        }
        if !Self::is_register_access(offset, data.len()) {
            return;
        }
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(data);
        self.write_register(offset, u32::from_le_bytes(bytes));
    }

    /// Registers are 32 bits wide and 4-byte aligned (virtio spec §4.2.2.2).
    fn is_register_access(offset: u64, len: usize) -> bool {
        let ok = len == 4 && offset.is_multiple_of(4);
        if !ok {
            debug!(
                offset,
                len,
                register = reg::register_name(offset),
                "virtio-mmio: register access is not 32-bit aligned; ignored"
            );
        }
        ok
    }

    /// Checks a config space access and returns its offset into the config space.
    fn config_access(&self, offset: u64, len: usize) -> Option<u64> {
        let config_offset = offset - reg::CONFIG_SPACE;
        let end = config_offset.checked_add(len as u64)?;
        if !matches!(len, 1 | 2 | 4 | 8) || end > reg::MMIO_WINDOW_SIZE - reg::CONFIG_SPACE {
            debug!(
                offset,
                len, "virtio-mmio: config space access out of range; ignored"
            );
            return None;
        }
        Some(config_offset)
    }

    fn selected_queue(&self) -> Option<usize> {
        let index = usize::try_from(self.queue_sel).ok()?;
        (index < self.queues.len()).then_some(index)
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE_OFFSET => reg::MAGIC_VALUE,
            reg::VERSION => reg::MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID_OFFSET => reg::VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .selected_queue()
                .map_or(0, |q| u32::from(self.queues[q].max_size)),
            reg::QUEUE_READY => self
                .selected_queue()
                .map_or(0, |q| u32::from(self.queues[q].ready)),
            reg::INTERRUPT_STATUS => self.interrupts.read(&self.memory),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            // Whatever SHMSel says, the region does not exist: length (and base) all ones.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            _ => {
                debug!(
                    offset,
                    register = reg::register_name(offset),
                    "virtio-mmio: read of a write-only or unknown register reads 0"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => self.write_driver_features(value),
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupts.acknowledge(value, &self.memory),
            reg::SHM_SEL => debug!(
                value,
                "virtio-mmio: SHMSel written; the device has no shared memory regions"
            ),
            reg::STATUS => self.write_status(value),
            _ => debug!(
                offset,
                value,
                register = reg::register_name(offset),
                "virtio-mmio: write to a read-only or unknown register ignored"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::FEATURES_OK != 0 {
            warn!("virtio-mmio: DriverFeatures written after FEATURES_OK; ignored");
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.driver_features, value, false),
            1 => set_half(&mut self.driver_features, value, true),
            // We offer no feature above bit 63, so the driver cannot accept one.
            sel => debug!(
                sel,
                value, "virtio-mmio: DriverFeatures beyond bit 63 ignored"
            ),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        let Some(index) = self.selected_queue() else {
            debug!(
                queue_sel = self.queue_sel,
                "virtio-mmio: queue register write for no queue"
            );
            return;
        };
        if self.status & status::DRIVER_OK != 0 {
            warn!(
                queue = index,
                register = reg::register_name(offset),
                "virtio-mmio: queue register written after DRIVER_OK; ignored"
            );
            return;
        }
        if offset == reg::QUEUE_READY {
            self.write_queue_ready(index, value);
            return;
        }
        // The driver sets a queue up, then makes it ready; a ready queue's setup is fixed.
        if self.queues[index].ready {
            warn!(
                queue = index,
                register = reg::register_name(offset),
                "virtio-mmio: queue register written while the queue is live; ignored"
            );
            return;
        }
        let queue = &mut self.queues[index];
        match offset {
            reg::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => queue.size = size,
                Err(_) => warn!(queue = index, value, "virtio-mmio: QueueNum beyond 16 bits"),
            },
            reg::QUEUE_DESC_LOW => set_half(&mut queue.desc_table, value, false),
            reg::QUEUE_DESC_HIGH => set_half(&mut queue.desc_table, value, true),
            reg::QUEUE_DRIVER_LOW => set_half(&mut queue.avail_ring, value, false),
            reg::QUEUE_DRIVER_HIGH => set_half(&mut queue.avail_ring, value, true),
            reg::QUEUE_DEVICE_LOW => set_half(&mut queue.used_ring, value, false),
            reg::QUEUE_DEVICE_HIGH => set_half(&mut queue.used_ring, value, true),
            _ => {}
        }
    }

    fn write_queue_ready(&mut self, index: usize, value: u32) {
        if value == 0 {
            // Linux's del_vqs does this; before DRIVER_OK no device uses the queue yet.
            self.queues[index].ready = false;
            return;
        }
        let config = self.queues[index].config(index as u16);
        match self.check_queue(&config) {
            Ok(()) => self.queues[index].ready = true,
            Err(reason) => {
                // The queue stays not-ready. The driver has no other way to learn of the
                // refusal, so the device also asks to be reset.
                warn!(queue = index, %reason, "virtio-mmio: queue refused; device needs reset");
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    /// A queue the driver wants ready must be a valid split ring inside guest memory; what
    /// serves it relies on that (the vhost-user device checks again against its own table).
    fn check_queue(&self, queue: &QueueConfig) -> Result<(), String> {
        let max = self.queues[usize::from(queue.index)].max_size;
        if queue.size == 0 || queue.size > max || !queue.size.is_power_of_two() {
            return Err(format!(
                "size {} is not a power of two from 1 to {max}",
                queue.size
            ));
        }
        let parts = [
            (
                "descriptor table",
                queue.desc_table,
                QueueConfig::DESC_TABLE_ALIGN,
                queue.desc_table_len(),
            ),
            (
                "avail ring",
                queue.avail_ring,
                QueueConfig::AVAIL_RING_ALIGN,
                queue.avail_ring_len(),
            ),
            (
                "used ring",
                queue.used_ring,
                QueueConfig::USED_RING_ALIGN,
                queue.used_ring_len(),
            ),
        ];
        for (name, addr, align, len) in parts {
            if !addr.is_multiple_of(align) {
                return Err(format!("{name} at {addr:#x} is not {align}-byte aligned"));
            }
            // `len` is at most 16 * 32768, so it fits in usize.
            if !self.memory.check_range(GuestAddress(addr), len as usize) {
                return Err(format!(
                    "{name} at {addr:#x} (+{len:#x}) is outside guest memory"
                ));
            }
        }
        Ok(())
    }

    fn notify_queue(&mut self, value: u32) {
        // Normally KVM's ioeventfd catches this write; when it does not, do what it would do.
        match usize::try_from(value)
            .ok()
            .and_then(|q| self.queue_kicks.get(q))
        {
            Some(kick) => {
                if let Err(err) = kick.write(1) {
                    warn!(queue = value, %err, "virtio-mmio: cannot signal the kick eventfd");
                }
            }
            None => debug!(queue = value, "virtio-mmio: notify for no queue ignored"),
        }
    }

    /// The device status state machine (virtio spec §2.1, §3.1.1).
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // NEEDS_RESET belongs to the device: the driver may write it back (read-modify-write)
        // but cannot set it.
        let mut new = (value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & old != old {
            warn!(
                old,
                value, "virtio-mmio: driver cleared status bits without a reset; ignored"
            );
            return;
        }
        // Each step needs the one before it, whether set in this write or an earlier one.
        let steps = [
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, needs) in steps {
            if new & bit != 0 && new & needs == 0 {
                warn!(
                    old,
                    value, "virtio-mmio: status bits set out of order; ignored"
                );
                return;
            }
        }
        let added = new & !old;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // Refusal is the FEATURES_OK bit not sticking; the driver reads it back.
            new &= !(status::FEATURES_OK | status::DRIVER_OK);
        }
        self.status = new;
        if added & status::DRIVER_OK != 0 && new & status::DRIVER_OK != 0 {
            if new & status::DEVICE_NEEDS_RESET != 0 {
                warn!("virtio-mmio: DRIVER_OK on a device that needs reset; not activated");
            } else {
                self.activate();
            }
        }
        if added & status::FAILED != 0 {
            warn!(
                device_type = self.device.device_type(),
                "virtio-mmio: the driver gave up (FAILED)"
            );
        }
    }

    fn features_acceptable(&self) -> bool {
        let unoffered = self.driver_features & !self.device_features;
        if unoffered != 0 {
            warn!(
                unoffered = format_args!("{unoffered:#x}"),
                "virtio-mmio: driver accepted features the device did not offer; FEATURES_OK refused"
            );
            return false;
        }
        if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1 (legacy driver); FEATURES_OK refused");
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let queues: Vec<QueueConfig> = self
            .queues
            .iter()
            .enumerate()
            .map(|(index, registers)| registers.config(index as u16))
            .collect();
        self.activation_attempted = true;
        // Note where each used ring stands *before* the backend can touch it: a buffer it uses
        // the moment it is started (a kick that came before DRIVER_OK) must count as news.
        self.interrupts.watch_queues(&queues, &self.memory);
        match self
            .device
            .activate(self.driver_features, &queues, &self.queue_kicks, &self.call)
        {
            Ok(()) => {
                info!(
                    device_type = self.device.device_type(),
                    features = format_args!("{:#x}", self.driver_features),
                    ready_queues = queues.iter().filter(|q| q.ready).count(),
                    "virtio-mmio: device activated"
                );
            }
            Err(err) => {
                warn!(
                    device_type = self.device.device_type(),
                    error = %error_chain(&err),
                    "virtio-mmio: activation failed; device needs reset"
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupts.reset();
                if let Err(err) = self.notify_config_change() {
                    warn!(%err, "virtio-mmio: cannot raise the config change interrupt");
                }
            }
        }
    }

    fn reset(&mut self) {
        if self.activation_attempted {
            if let Err(err) = self.device.reset() {
                // The transport resets regardless: the driver is entitled to a fresh device.
                warn!(error = %error_chain(&err), "virtio-mmio: device reset failed");
            }
        }
        self.activation_attempted = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueRegisters::new(queue.max_size);
        }
        self.interrupts.reset();
        // The eventfds stay: KVM holds them as ioeventfd/irqfd for the device's lifetime.
        debug!(
            device_type = self.device.device_type(),
            "virtio-mmio: device reset"
        );
    }
}

#[cfg(test)]
mod tests;
