//! What the protocol server asks of the device it serves: [`VhostUserDevice`], and the
//! [`RingWorker`] the device returns for each ring it starts.
//!
//! The split, as in rust-vmm's vhost (`backend_req_handler.rs`, the protocol, against the
//! `VhostUserBackend` trait, the device): the server decides *when* (every message, every
//! negotiation rule, when a ring is complete enough to run, when it must stop) and the device
//! decides *what* (which feature bits, what its config space holds, what serving a ring means).
//!
//! ```text
//!  session (server)                        device (e.g. blk::BlkBackend)
//!  GET_FEATURES ─────────────────────────► virtio_features()      (+ PROTOCOL_FEATURES bit)
//!  GET_PROTOCOL_FEATURES ────────────────► protocol_features()    (& what the server speaks)
//!  GET_QUEUE_NUM, SET_VRING_NUM limit ───► num_queues(), max_queue_size()
//!  GET_CONFIG / SET_CONFIG ──────────────► read_config() / write_config()
//!  a ring becomes complete and enabled ──► start_ring(RingSetup) ──► Self::Ring
//!  GET_VRING_BASE, any change to a ring ─► RingWorker::stop() ──► next avail index
//! ```

use crate::blk::planted_flaw::PlantedFlaws;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::inflight_region::QueueRegion;
use super::notifier::Notifier;
use super::vring::RingAddresses;

/// A virtio device served over vhost-user by [`super::serve`] / [`super::listen_on`]. One value
/// serves every session (each session has its own memory table and rings), so `&self` only.
pub trait VhostUserDevice {
    /// Its virtio device ID (VIRTIO_ID_BLOCK, ...): trace lines decode feature bits with it.
    const VIRTIO_ID: u32;
    /// Names this side in trace lines and logs (e.g. "blk-backend").
    const TRACE_NAME: &'static str;
    /// A running ring, as [`VhostUserDevice::start_ring`] returns it.
    type Ring: RingWorker;
    /// Why a ring could not start (logged; the ring's err eventfd is written, the ring stays
    /// stopped until the frontend changes something).
    type RingError: std::fmt::Display;

    /// The virtio feature bits offered in GET_FEATURES: device, ring and transport bits. The
    /// server adds VHOST_USER_F_PROTOCOL_FEATURES (it always speaks protocol features) and
    /// refuses a SET_FEATURES with any bit beyond the two.
    fn virtio_features(&self) -> u64;

    /// The protocol features this device wants offered; the server offers those of them it
    /// implements ([`super::SERVER_PROTOCOL_FEATURES`]). INFLIGHT_SHMFD belongs here only if the
    /// device's rings track requests in the [`RingSetup::inflight`] region they get.
    fn protocol_features(&self) -> u64;

    /// Queues offered (GET_QUEUE_NUM): the session keeps that many rings, 1..=MAX_QUEUES.
    fn num_queues(&self) -> u16;

    /// Largest ring SET_VRING_NUM accepts (a power of two; the server also caps it at the wire's
    /// MAX_QUEUE_SIZE). GET/SET_INFLIGHT_FD geometry is checked against it too.
    fn max_queue_size(&self) -> u16;

    /// GET_CONFIG: `size` bytes of the config space from `offset`. `Err` (the window is not
    /// inside the space; the reason is logged) is answered with an empty payload, the protocol's
    /// "failed".
    fn read_config(&self, offset: u32, size: u32) -> Result<Vec<u8>, String>;

    /// SET_CONFIG: the driver writes `bytes` at `offset`. `Err` is a refusal (logged; a failure
    /// ack with NEED_REPLY; the session goes on either way).
    fn write_config(&self, offset: u32, bytes: &[u8]) -> Result<(), String>;

    /// Starts serving one ring: from here until [`RingWorker::stop`] the device's threads pop
    /// chains from the avail ring, complete them to the used ring and write `call`.
    fn start_ring(&self, ring: RingSetup) -> Result<Self::Ring, Self::RingError>;

    /// The control-plane defences a test build has switched off (`crate::blk::planted_flaw`);
    /// none in every normal build.
    fn planted_flaws(&self) -> PlantedFlaws {
        PlantedFlaws::NONE
    }
}

/// A ring the device is serving. Dropping it must stop it too (a session that ends drops every
/// ring), so `stop` is only needed for the index it returns.
pub trait RingWorker {
    /// The avail index serving started at: [`RingSetup::next_avail`], or past what inflight
    /// recovery resubmitted (for the "vring started" line).
    fn started_at(&self) -> u16;

    /// Stops taking chains, waits until every chain taken has reached the used ring, and returns
    /// the next avail index: where the ring resumes, and what GET_VRING_BASE reports.
    fn stop(self) -> u16;
}

/// Everything the server knows about a ring when it is complete (memory table, size,
/// addresses, kick fd, enabled), handed to [`VhostUserDevice::start_ring`].
#[derive(Debug)]
pub struct RingSetup {
    pub index: u16,
    /// From SET_VRING_NUM: a power of two, at most [`VhostUserDevice::max_queue_size`].
    pub size: u16,
    /// From SET_VRING_ADDR, translated through the memory table (each part checked to lie inside
    /// one region for this size).
    pub rings: RingAddresses,
    /// From SET_VRING_BASE (or where the ring last stopped): the first avail entry not consumed.
    pub next_avail: u16,
    /// The worker's own handle on the kick eventfd (the server keeps the original, so a failed
    /// start or a stop never loses it). Read it only through `peer_fd` (the peer shares its flags).
    pub kick: EventFd,
    /// The interrupt eventfd (SET_VRING_CALL), replaceable while the ring runs.
    pub call: Arc<Notifier>,
    /// The error eventfd (SET_VRING_ERR), replaceable while the ring runs.
    pub err: Arc<Notifier>,
    /// This queue's part of the SET_INFLIGHT_FD region, when the frontend gave one that covers
    /// this ring (a ring larger than the region runs untracked, with a warning).
    pub inflight: Option<QueueRegion>,
    /// Guest memory, as mapped from SET_MEM_TABLE.
    pub memory: Arc<GuestMemoryMmap>,
    /// VIRTIO_RING_F_EVENT_IDX was acked (SET_FEATURES): kicks and interrupts are suppressed
    /// through avail_event and used_event instead of the rings' flags.
    pub event_idx: bool,
}
