//! Devices the guest sees and the backends that serve them.
pub mod blk;
pub mod serial;
pub mod vhost_user_server;
pub mod virtio_mmio;

#[cfg(test)]
pub(crate) mod test_util;
