//! The server side of vhost-user, for any virtio device: the socket, the session loop, the
//! negotiation, guest memory, the rings' bookkeeping and the inflight region. What is specific to
//! one device type (its feature bits, its config space, what serving a ring means) sits behind
//! [`VhostUserDevice`]; `crate::blk::BlkBackend` is the one implementation today.
//!
//! ```text
//!  listen_on (listener) ── accept, one frontend at a time ──┐
//!  serve (session) ◄────────────────────────────────────────┘  also called directly on a socketpair
//!   │ per message: decode FrontendMessage, handle, reply (BackendReply) or fail (failure)
//!   ├─ GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES ─► VhostUserDevice::{virtio,protocol}_features
//!   ├─ GET_QUEUE_NUM, GET/SET_CONFIG ───────────────► VhostUserDevice::{num_queues, *_config}
//!   ├─ SET_MEM_TABLE ─► memory::MappedMemory (memory_faults guards fds that can shrink)
//!   ├─ GET/SET_INFLIGHT_FD ─► inflight_region::{new_region_memfd, InflightMap}
//!   └─ SET_VRING_* / GET_VRING_BASE ─► vring::Vring (notifier: call/err, peer_fd: eventfd I/O)
//!                                        └─ complete & enabled ─► VhostUserDevice::start_ring
//!                                                                  └─► RingWorker (stop → base)
//! ```
//!
//! The frontend drives, the server answers:
//!
//! ```text
//!  GET_FEATURES / SET_FEATURES            virtio + vhost-user feature bits
//!  GET/SET_PROTOCOL_FEATURES              which optional messages both sides speak
//!  SET_OWNER, GET_QUEUE_NUM, GET_CONFIG   session start; queue count; the device's config space
//!  SET_MEM_TABLE (+ one fd per region)    guest RAM: the backend maps it MAP_SHARED
//!  SET_VRING_NUM/BASE/ADDR                per ring: size, first avail index, ring addresses
//!  SET_VRING_KICK/CALL/ERR (+ eventfd)    guest->backend doorbell, backend->guest interrupt, errors
//!  SET_VRING_ENABLE 1                     the ring runs: data flows without the frontend
//!  GET_VRING_BASE                         stop the ring; reply: where it stopped
//!  GET_INFLIGHT_FD -> (+ one memfd)       a fresh inflight region for the frontend to keep
//!  SET_INFLIGHT_FD (+ that fd)            track requests in it; after a crash: recover them
//! ```
//!
//! With INFLIGHT_SHMFD a backend that was killed and restarted gets the frontend's region back
//! with SET_INFLIGHT_FD, no GET before it, and each ring resubmits what the dead backend had
//! taken from the avail ring and not completed. GET_VRING_BASE still drains every in-flight
//! request before it answers, as the spec requires without GET_VRING_BASE_INFLIGHT (bit 20, not
//! offered).
//!
//! Replies: GET_* messages always get one. With the REPLY_ACK protocol feature the frontend may
//! set NEED_REPLY on any other message and then gets a u64: 0 for success, non-zero for failure.
//! A message the server cannot accept (unknown, malformed, or asking for something it does not
//! do) gets its failure reply when NEED_REPLY is set; otherwise the connection is closed with a
//! logged reason, since the frontend would carry on believing it succeeded. A failed GET_* gets
//! its own failure form, never a u64 it would read as a value, or ends the session where it has
//! none (the table is in `failure`).
//!
//! Who may hold the backend: a frontend has [`HANDSHAKE_TIMEOUT`] (or the caller's bound) from
//! connecting to send SET_OWNER (the message that starts a vhost-user session), every message and
//! reply before it bounded by that one deadline; one that has not is dropped, so a client that
//! connects and says nothing (or trickles bytes) cannot keep every later frontend waiting. After
//! SET_OWNER the frontend owns the backend until it hangs up, idle or not: a running VM's control
//! channel is silent between reconfigurations, and a frontend that completed the handshake could
//! hold the device just as well by behaving. Who may connect at all is decided by the socket's
//! permissions.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use vhost_frontend::features::{
    bit_mask, PROTOCOL_CONFIG, PROTOCOL_INFLIGHT_SHMFD, PROTOCOL_MQ, PROTOCOL_REPLY_ACK,
};
use vhost_frontend::wire::WireError;

pub mod device;
mod failure;
pub mod inflight_region;
mod listener;
pub mod memory;
pub mod memory_faults;
pub mod notifier;
pub mod peer_fd;
mod session;
pub mod vring;

pub use device::{RingSetup, RingWorker, VhostUserDevice};
pub use listener::listen_on;
pub use session::{offered_features, offered_protocol_features, serve};

#[cfg(test)]
pub(crate) mod test_frontend;
#[cfg(test)]
mod tests;

/// The protocol features this server implements (a device offers a subset of them):
/// multiqueue, REPLY_ACK, the config space messages and inflight tracking.
pub const SERVER_PROTOCOL_FEATURES: u64 = bit_mask(PROTOCOL_MQ)
    | bit_mask(PROTOCOL_REPLY_ACK)
    | bit_mask(PROTOCOL_CONFIG)
    | bit_mask(PROTOCOL_INFLIGHT_SHMFD);

/// How long a frontend has, from connecting, to complete the handshake (send SET_OWNER) before
/// it is dropped, unless the caller chooses another bound; see the module docs for what it may
/// hold afterwards.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session (or the listener) ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The frontend sent something the server cannot accept; the connection was closed.
    #[error("frontend broke the protocol: {0}")]
    Protocol(String),
    /// The socket failed for a reason other than the frontend hanging up.
    #[error("vhost-user socket error: {0}")]
    Wire(WireError),
    #[error("cannot set up the listening socket {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    /// The frontend did not send SET_OWNER in time (see [`HANDSHAKE_TIMEOUT`]); it was dropped.
    #[error("the frontend did not complete the handshake (SET_OWNER) within {0:?}; dropped it")]
    HandshakeTimeout(Duration),
    /// The frontend shrank a memory fd after SET_MEM_TABLE; the requests that touched the
    /// vanished pages failed (nothing was written from them) and the session was ended.
    #[error("guest memory region {region} shrank under the session ({faults} fault(s), first at host address {addr:#x}): its requests failed and the connection was closed")]
    MemoryVanished {
        region: usize,
        faults: u64,
        addr: usize,
    },
}
