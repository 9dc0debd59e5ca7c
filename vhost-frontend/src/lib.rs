//! The vhost-user protocol: the wire format both sides share ([`wire`]), feature bits
//! ([`features`]), and the frontend connection.
//!
//! vhost-user lets a VMM (the *frontend*) hand a virtio device's data path to another process (the
//! *backend*): over a unix socket the frontend sends the guest memory layout (with memfds), the ring
//! addresses and two eventfds per queue; from then on the backend reads the rings itself and the
//! frontend only sees control-path messages.

pub mod connection;
pub mod features;
pub mod probe;
pub mod trace;
pub mod wire;

pub use connection::{
    max_inflight_mmap_size, Frontend, FrontendError, InflightBuffer, MemoryRegionFd, Negotiated,
    VhostUserFrontend,
};
pub use wire::{PeerGone, ProtocolError, Request, WireError};

#[cfg(test)]
mod test_support;
