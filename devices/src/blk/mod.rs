//! virtio-blk over vhost-user: the device side, serving a raw disk image. The protocol itself
//! (socket, session, negotiation, guest memory, rings' bookkeeping, inflight region) is
//! `crate::vhost_user_server`'s; this module is what makes the device a block device.
//!
//! - `backend`: `BlkBackend`, the public API, and its `VhostUserDevice` implementation.
//! - `disk`: the image file, capacity and bounds-checked positional I/O.
//! - `config`: the config space the guest reads (GET_CONFIG) and the offered feature bits.
//! - `request`: one request, parsed from a descriptor chain and executed.
//! - `queue_worker`: the data path of one virtqueue (kick → requests → used ring → call).
//! - `queue_stats`: its counters (requests per kick, per publish, per interrupt; where the time
//!   goes), logged when a queue stops.
//! - `uring`: an io_uring engine that runs a batch of disk I/Os from one thread.
//! - `uring_path`: the `uring` I/O engine's dispatcher loop, which serves a queue through it
//!   (iovecs straight into guest memory; meant for O_DIRECT images).
//! - `inflight`: tracking requests in a queue's inflight region, and crash recovery from it.
//! - `planted_flaw`: known recovery bugs, switchable only in test builds, that prove the
//!   checkers catch them.

pub mod backend;
pub mod config;
pub mod disk;
pub mod inflight;
pub mod planted_flaw;
pub mod queue_stats;
pub mod queue_worker;
pub mod request;
pub mod uring;
mod uring_path;

pub use backend::{BlkBackend, BlkBackendConfig, BlkError};

#[cfg(test)]
mod backend_tests;
#[cfg(test)]
mod interop_tests;
