//! virtio-blk over vhost-user: the backend (server) side, serving a raw disk image.
//!
//! - `disk`: the image file, capacity and bounds-checked positional I/O.
//! - `config`: the config space the guest reads (GET_CONFIG) and the offered feature bits.
//! - `request`: one request, parsed from a descriptor chain and executed.
//! - `memory`: guest memory mapped from the SET_MEM_TABLE fds, and address translation.
//! - `memory_faults`: surviving a frontend that shrinks a memory fd under us (SIGBUS).
//! - `peer_fd`: non-blocking use of the frontend's eventfds; escaping peer text for logs.
//! - `inflight`: the shared inflight region (GET/SET_INFLIGHT_FD): tracking and crash recovery.
//! - `queue_worker`: the data path of one virtqueue (kick → requests → used ring → call).
//! - `vring`: what the frontend told us about one ring, and when it runs.
//! - `backend`: the vhost-user protocol state machine and the public API.

pub mod backend;
pub mod config;
pub mod disk;
pub mod inflight;
pub mod memory;
pub mod memory_faults;
pub mod peer_fd;
pub mod queue_worker;
pub mod request;
pub mod vring;

pub use backend::{BlkBackend, BlkBackendConfig, BlkError};

#[cfg(test)]
mod interop_tests;
#[cfg(test)]
pub(crate) mod test_util;
