//! Devices the guest sees and the backends that serve them.
pub mod blk;
pub mod serial;
pub mod virtio_mmio;
