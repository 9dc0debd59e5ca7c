//! virtio-mmio: how the guest finds and programs a virtio device through a window of
//! memory-mapped registers (virtio spec 1.2, §4.2), and a device whose queues a vhost-user
//! backend serves.
//!
//! - [`registers`]: the register layout and status bits.
//! - [`device`]: the [`VirtioDevice`] trait a device implements for the transport.
//! - [`transport`]: [`MmioTransport`], the register file and the status state machine.
//! - `interrupt`: how InterruptStatus stays right while the backend raises interrupts itself.
//! - [`vhost_user_dev`]: [`VhostUserDevice`], a device whose queues a vhost-user backend serves.

pub mod device;
mod interrupt;
pub mod registers;
pub mod transport;
pub mod vhost_user_dev;

#[cfg(test)]
mod end_to_end_tests;

pub use device::{DeviceError, QueueConfig, VirtioDevice, MAX_QUEUE_SIZE};
pub use registers::{MMIO_WINDOW_SIZE, QUEUE_NOTIFY};
pub use transport::{MmioTransport, TransportError, VIRTIO_F_VERSION_1};
pub use vhost_user_dev::{
    Attempt, BackendState, Connector, DeviceKind, GuestRegion, MemoryTable, MemoryTableError,
    ReconnectHandle, ReconnectPolicy, StartedQueue, VhostUserDevice, VhostUserDeviceError,
    VhostUserDeviceOptions,
};

/// "error: cause: cause" on one line, for logs and for the VMM's final error message.
/// A cause whose text the message already carries is not repeated.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
