//! What the transport needs from a virtio device: its identity, features, configuration space,
//! and the two moments its queues start (DRIVER_OK) and stop (reset).

use vmm_sys_util::eventfd::EventFd;

pub use vhost_frontend::wire::MAX_QUEUE_SIZE;

/// One virtqueue as the driver set it up: guest physical addresses of its three parts.
///
/// Only split virtqueues are supported (we never offer VIRTIO_F_RING_PACKED), so the
/// sizes below follow the split layout (virtio spec §2.7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    pub desc_table: u64,
    /// The "driver area" (avail ring).
    pub avail_ring: u64,
    /// The "device area" (used ring).
    pub used_ring: u64,
    pub ready: bool,
}

impl QueueConfig {
    /// Alignment the spec requires of each part (§2.7, "Virtqueue Alignment").
    pub const DESC_TABLE_ALIGN: u64 = 16;
    pub const AVAIL_RING_ALIGN: u64 = 2;
    pub const USED_RING_ALIGN: u64 = 4;

    /// Bytes of the descriptor table: 16 per descriptor.
    pub fn desc_table_len(&self) -> u64 {
        16 * u64::from(self.size)
    }

    /// Bytes of the avail ring: flags, idx, ring[size], used_event.
    pub fn avail_ring_len(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    /// Bytes of the used ring: flags, idx, ring[size] of (id: u32, len: u32), avail_event.
    pub fn used_ring_len(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    /// Guest physical address of the used ring's `idx` field (after the 16-bit `flags`).
    /// `used_ring` is checked in guest memory (and 4-aligned) before a queue becomes ready,
    /// so this cannot overflow for a ready queue; `checked_add` keeps it honest anyway.
    pub fn used_idx_addr(&self) -> Option<u64> {
        self.used_ring.checked_add(2)
    }
}

/// Why a device could not start or stop its queues.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The queue setup the driver wrote cannot be served (for example a ring outside the
    /// memory the backend can see).
    #[error("queue {index} cannot be used: {reason}")]
    BadQueue { index: u16, reason: String },
    /// The driver started the device without a queue the device cannot work without.
    #[error("the driver made no queue ready")]
    NoQueueReady,
    /// Whatever serves the device (a vhost-user backend) failed; the source says how.
    #[error("the device backend failed")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

/// A virtio device behind a virtio-mmio transport.
///
/// The transport owns the register file and the status state machine; the device is told
/// only what it needs: configuration space accesses, activation with the negotiated features
/// and queue addresses, and reset.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block, 1 = net, ...; virtio spec §5).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues the device has.
    fn queue_max_sizes(&self) -> Vec<u16>;

    /// Feature bits offered to the driver. Must include VIRTIO_F_VERSION_1 (bit 32).
    fn device_features(&self) -> u64;

    /// Reads the device configuration space at `offset`. Bytes outside it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device configuration space at `offset`; writes outside it are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: start serving `queues` (every queue the device has, with
    /// `ready` telling which the driver set up). `queue_kicks[i]` is signalled when the driver
    /// notifies queue `i`; writing `call` raises the device's interrupt. Both belong to the
    /// transport: a device that needs them later keeps a `try_clone`.
    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
        queue_kicks: &[EventFd],
        call: &EventFd,
    ) -> Result<(), DeviceError>;

    /// The driver reset the device (status 0). Called only after an `activate` call, even a
    /// failed one, so the device can undo what it had started. Afterwards the device must be
    /// ready for a new negotiation and `activate`.
    fn reset(&mut self) -> Result<(), DeviceError>;
}
