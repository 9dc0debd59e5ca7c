//! One frontend session: receive a message, decode it, handle it, answer it; until the frontend
//! hangs up or breaks the protocol.
//!
//! ```text
//!  serve ─► Session::run ─┬─ recv_message_by (bounded by the handshake deadline until SET_OWNER)
//!                         ├─ FrontendMessage::decode ──(error)──────────────┐
//!                         ├─ Session::handle ─► Ok(Handled) ─► reply        │
//!                         │    negotiation, SET_MEM_TABLE, GET/SET_INFLIGHT_FD,
//!                         │    SET_VRING_* ─► Vring ─► VhostUserDevice::start_ring
//!                         │                └─► Err(Failure) ─► fail ◄───────┘
//!                         └─ fail: failure::answer ─► failure reply | silent | session ends
//! ```
//!
//! Replies are `BackendReply`s, encoded by the wire crate (the frontend decodes the same type).
//! A GET_* message always gets its reply; any other gets a success ack only with NEED_REPLY.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vhost_frontend::features::{
    bit_mask, describe_device_features, describe_protocol_features, has, PROTOCOL_INFLIGHT_SHMFD,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_RING_F_EVENT_IDX,
};
use vhost_frontend::trace::{describe_device_message, Direction};
use vhost_frontend::wire::{
    recv_message_by, send_message_by, BackendReply, ConfigSpace, FrontendMessage, Header,
    InflightDescription, PeerGone, Request, VringAddr, VringState, WireError, MAX_QUEUE_SIZE,
    VHOST_VRING_F_LOG,
};

use super::device::VhostUserDevice;
use super::failure::{self, Failure, FailureAnswer};
use super::inflight_region::LAYOUT;
use super::inflight_region::{checked_region_size, new_region_memfd, InflightLimits, InflightMap};
use super::memory::{MappedMemory, RegionLayout};
use super::vring::{eventfd_from_peer, RunContext, UserRingAddresses, Vring};
use super::{ServeError, SERVER_PROTOCOL_FEATURES};
use crate::blk::planted_flaw::PlantedFlaw;
use vhost_frontend::wire::inflight::region_size;

/// GET_FEATURES: the device's virtio bits and VHOST_USER_F_PROTOCOL_FEATURES.
pub fn offered_features(device: &impl VhostUserDevice) -> u64 {
    device.virtio_features() | bit_mask(VHOST_USER_F_PROTOCOL_FEATURES)
}

/// GET_PROTOCOL_FEATURES: what the device wants offered, of what the server implements.
pub fn offered_protocol_features(device: &impl VhostUserDevice) -> u64 {
    device.protocol_features() & SERVER_PROTOCOL_FEATURES
}

/// Serves one frontend on `stream` until it hangs up (then `Ok`) or breaks the protocol (then
/// `Err`, the connection closed). Every ring is stopped and drained before this returns. A
/// frontend has `handshake_timeout` from now to send SET_OWNER (module docs of the server).
pub fn serve<D: VhostUserDevice>(
    device: &D,
    stream: UnixStream,
    handshake_timeout: Duration,
) -> Result<(), ServeError> {
    let mut session = Session::new(device, &stream, handshake_timeout);
    let end = session.run();
    // A memory fd that shrank under us (memory_faults) shut the socket down: say why, not
    // "the frontend went away".
    if let Some((region, faults, addr)) = session.memory.as_ref().and_then(|m| m.vanished()) {
        let e = ServeError::MemoryVanished {
            region,
            faults,
            addr,
        };
        warn!("closing the vhost-user connection: {e}");
        return Err(e);
    }
    match end {
        Ok(()) => Ok(()),
        Err(SessionEnd::PeerGone(how)) => {
            info!("vhost-user frontend went away ({how})");
            Ok(())
        }
        Err(SessionEnd::Failed(e)) => {
            warn!("closing the vhost-user connection: {e}");
            Err(e)
        }
    }
}

/// Why a session stopped.
enum SessionEnd {
    PeerGone(PeerGone),
    Failed(ServeError),
}

impl From<WireError> for SessionEnd {
    fn from(e: WireError) -> Self {
        match e {
            WireError::PeerGone(how) => SessionEnd::PeerGone(how),
            WireError::Protocol(p) => SessionEnd::Failed(ServeError::Protocol(p.to_string())),
            other => SessionEnd::Failed(ServeError::Wire(other)),
        }
    }
}

/// What a message that was accepted sends back.
enum Handled {
    /// Nothing, or a success ack when NEED_REPLY is set.
    Ack,
    /// The reply of a GET_* message (its fd, if any, is closed once sent).
    Reply(BackendReply),
}

/// One frontend session: negotiated features, the memory table, and the rings.
struct Session<'a, D: VhostUserDevice> {
    device: &'a D,
    stream: &'a UnixStream,
    handshake_timeout: Duration,
    acked_features: u64,
    protocol_features: u64,
    memory: Option<MappedMemory>,
    /// The SET_INFLIGHT_FD region (a running ring's worker holds it too, until it stops).
    inflight: Option<Arc<InflightMap>>,
    vrings: Vec<Vring<D::Ring>>,
    /// Until SET_OWNER: when the handshake must be done; bounds every receive and send.
    handshake_deadline: Option<Instant>,
}

impl<'a, D: VhostUserDevice> Session<'a, D> {
    fn new(device: &'a D, stream: &'a UnixStream, handshake_timeout: Duration) -> Self {
        Session {
            device,
            stream,
            handshake_timeout,
            acked_features: 0,
            protocol_features: 0,
            memory: None,
            inflight: None,
            vrings: Self::fresh_vrings(device),
            // Saturating: an absurd timeout from a caller means "no bound", not a panic.
            handshake_deadline: Instant::now()
                .checked_add(handshake_timeout)
                .filter(|_| !device.planted_flaws().has(PlantedFlaw::NoHandshakeTimeout)),
        }
    }

    fn fresh_vrings(device: &D) -> Vec<Vring<D::Ring>> {
        (0..device.num_queues()).map(Vring::new).collect()
    }

    /// A wire error as a session end; a deadline passing before SET_OWNER says so.
    fn wire_end(&self, e: WireError) -> SessionEnd {
        match e {
            WireError::TimedOut if self.handshake_deadline.is_some() => {
                SessionEnd::Failed(ServeError::HandshakeTimeout(self.handshake_timeout))
            }
            other => other.into(),
        }
    }

    fn run(&mut self) -> Result<(), SessionEnd> {
        loop {
            let (header, payload, fds) = recv_message_by(self.stream, self.handshake_deadline)
                .map_err(|e| self.wire_end(e))?;
            debug!(
                target: "vhost",
                "{}",
                describe_device_message(
                    Some(D::VIRTIO_ID),
                    Direction::ToBackend,
                    D::TRACE_NAME,
                    &header,
                    &payload,
                    fds.len(),
                )
            );
            let message = match FrontendMessage::decode(&header, &payload, fds) {
                Ok(message) => message,
                Err(e) => {
                    // The framing is intact (header.size bytes were read), so the frontend can
                    // be told (`failure::answer`: with NEED_REPLY, or a GET_* failure form) and
                    // the session can go on.
                    self.fail(&header, Failure::Breach(e.to_string()))?;
                    continue;
                }
            };
            let request = message.request();
            // The handshake is done with SET_OWNER: from then on the frontend owns the backend
            // (module docs); its ack is no longer bounded either.
            if request == Request::SetOwner {
                self.handshake_deadline = None;
            }
            match self.handle(message) {
                Ok(handled) => self.reply(request, &header, handled)?,
                Err(failure) => self.fail(&header, failure)?,
            }
        }
    }

    fn reply(&self, request: Request, header: &Header, handled: Handled) -> Result<(), SessionEnd> {
        match handled {
            Handled::Reply(reply) => self.send(&reply),
            Handled::Ack if header.need_reply() => {
                self.send(&BackendReply::Ack { request, status: 0 })
            }
            Handled::Ack => Ok(()),
        }
    }

    /// The policy is `failure::answer` (its module docs); this sends what it chose, or ends.
    fn fail(&self, header: &Header, failure: Failure) -> Result<(), SessionEnd> {
        let name = Request::from_code(header.request)
            .map(Request::name)
            .unwrap_or("unknown request");
        let code = header.request;
        let answer = failure::answer(header, &failure);
        let (Failure::Refused(reason) | Failure::Breach(reason)) = failure;
        match answer {
            FailureAnswer::Reply(reply) => {
                warn!(
                    "{name} (code {code}) failed: {reason}; sending {}",
                    reply.describe()
                );
                let (header, payload) = reply.encode();
                self.send_encoded(&header, &payload, &[])
            }
            FailureAnswer::Silent => {
                warn!("{name} refused: {reason}");
                Ok(())
            }
            FailureAnswer::EndSession => Err(SessionEnd::Failed(ServeError::Protocol(format!(
                "{name} (code {code}): {reason}"
            )))),
        }
    }

    fn send(&self, reply: &BackendReply) -> Result<(), SessionEnd> {
        let (header, payload, fds) = reply.encode();
        self.send_encoded(&header, &payload, &fds)
    }

    fn send_encoded(
        &self,
        header: &Header,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SessionEnd> {
        debug!(
            target: "vhost",
            "{}",
            describe_device_message(
                Some(D::VIRTIO_ID),
                Direction::FromBackend,
                D::TRACE_NAME,
                header,
                payload,
                fds.len(),
            )
        );
        send_message_by(self.stream, header, payload, fds, self.handshake_deadline)
            .map_err(|e| self.wire_end(e))
    }

    fn handle(&mut self, message: FrontendMessage) -> Result<Handled, Failure> {
        use FrontendMessage as M;
        match message {
            M::GetFeatures => Ok(Handled::Reply(BackendReply::Features(offered_features(
                self.device,
            )))),
            M::SetFeatures(features) => self.set_features(features),
            M::SetOwner => Ok(Handled::Ack),
            M::ResetOwner | M::ResetDevice => {
                self.reset();
                Ok(Handled::Ack)
            }
            M::GetProtocolFeatures => Ok(Handled::Reply(BackendReply::ProtocolFeatures(
                offered_protocol_features(self.device),
            ))),
            M::SetProtocolFeatures(features) => self.set_protocol_features(features),
            M::GetQueueNum => Ok(Handled::Reply(BackendReply::QueueNum(u64::from(
                self.device.num_queues(),
            )))),
            M::GetConfig(window) => self.get_config(window),
            M::SetConfig(window) => {
                self.device
                    .write_config(window.offset, &window.payload)
                    .map_err(Failure::Refused)?;
                Ok(Handled::Ack)
            }
            M::SetMemTable { table, fds } => {
                let layouts: Vec<RegionLayout> = table
                    .regions
                    .iter()
                    .map(|r| RegionLayout {
                        guest_phys_addr: r.guest_phys_addr,
                        memory_size: r.memory_size,
                        userspace_addr: r.userspace_addr,
                        mmap_offset: r.mmap_offset,
                    })
                    .collect();
                // Regions whose fd is not sealed against shrinking are guarded: a fault in one
                // fails its request and shuts this session's socket down (memory_faults).
                let memory =
                    MappedMemory::map_for_session(&layouts, fds, Some(self.stream.as_fd()))
                        .map_err(|e| Failure::Breach(e.to_string()))?;
                info!("guest memory mapped: {} region(s)", layouts.len());
                // Rings keep their guest physical addresses; they restart on the new mapping.
                self.vrings.iter_mut().for_each(Vring::pause);
                self.memory = Some(memory);
                self.resume_all();
                Ok(Handled::Ack)
            }
            M::SetVringNum(VringState { index, num }) => {
                let size = self.check_ring_size(num)?;
                self.reconfigure(index, |v| v.set_size(size))
            }
            M::SetVringAddr(addr) => self.set_vring_addr(addr),
            M::SetVringBase(VringState { index, num }) => {
                let base = u16::try_from(num).map_err(|_| {
                    Failure::Breach(format!("base {num} does not fit a split ring index"))
                })?;
                self.reconfigure(index, |v| v.set_next_avail(base))
            }
            M::GetVringBase(VringState { index, .. }) => {
                let i = self.vring_index(index)?;
                let vring = &mut self.vrings[i];
                vring.pause();
                vring.forget_kick();
                let base = vring.next_avail();
                info!(queue = index, base, "vring stopped by GET_VRING_BASE");
                Ok(Handled::Reply(BackendReply::VringBase(VringState {
                    index,
                    num: u32::from(base),
                })))
            }
            M::SetVringKick { index, fd } => {
                let kick = fd
                    .map(|fd| eventfd_from_peer(fd, "SET_VRING_KICK"))
                    .transpose()
                    .map_err(Failure::Breach)?;
                self.reconfigure(u32::from(index), |v| v.set_kick(kick))
            }
            M::SetVringCall { index, fd } => {
                let call = fd
                    .map(|fd| eventfd_from_peer(fd, "SET_VRING_CALL"))
                    .transpose()
                    .map_err(Failure::Breach)?;
                let i = self.vring_index(u32::from(index))?;
                self.vrings[i].set_call(call);
                Ok(Handled::Ack)
            }
            M::SetVringErr { index, fd } => {
                let err = fd
                    .map(|fd| eventfd_from_peer(fd, "SET_VRING_ERR"))
                    .transpose()
                    .map_err(Failure::Breach)?;
                let i = self.vring_index(u32::from(index))?;
                self.vrings[i].set_err(err);
                Ok(Handled::Ack)
            }
            M::SetVringEnable { index, enable } => {
                self.reconfigure(index, |v| v.set_enabled(enable))
            }
            M::GetInflightFd(description) => self.get_inflight_fd(&description),
            M::SetInflightFd { description, fd } => self.set_inflight_fd(&description, fd),
            other => Err(Failure::Breach(format!(
                "{} is not supported by this backend (not offered)",
                other.request()
            ))),
        }
    }

    fn set_features(&mut self, features: u64) -> Result<Handled, Failure> {
        let offered = offered_features(self.device);
        if features & !offered != 0 {
            return Err(Failure::Breach(format!(
                "acks feature bits that were not offered: {}",
                describe_device_features(Some(D::VIRTIO_ID), features & !offered)
            )));
        }
        info!(
            "virtio features acked: {}",
            describe_device_features(Some(D::VIRTIO_ID), features)
        );
        self.acked_features = features;
        Ok(Handled::Ack)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<Handled, Failure> {
        let offered = offered_protocol_features(self.device);
        let flawed = self
            .device
            .planted_flaws()
            .has(PlantedFlaw::AcceptUnofferedProtocolBits);
        if features & !offered != 0 && !flawed {
            return Err(Failure::Breach(format!(
                "sets protocol bits that were not offered: {}",
                describe_protocol_features(features & !offered)
            )));
        }
        info!(
            "protocol features set: {}",
            describe_protocol_features(features)
        );
        self.protocol_features = features;
        Ok(Handled::Ack)
    }

    /// GET_CONFIG: the requested window of the device's config space. A window the device
    /// refuses gets an empty reply (`failure`), which is how libvhost-user says "failed" and how
    /// QEMU understands it.
    fn get_config(&self, window: ConfigSpace) -> Result<Handled, Failure> {
        let bytes = self
            .device
            .read_config(window.offset, window.size())
            .map_err(Failure::Refused)?;
        Ok(Handled::Reply(BackendReply::Config(ConfigSpace {
            offset: window.offset,
            flags: window.flags,
            payload: bytes,
        })))
    }

    /// What a GET/SET_INFLIGHT_FD may ask for: this device's queues and ring limit.
    fn inflight_limits(&self) -> InflightLimits {
        InflightLimits {
            device_queues: self.device.num_queues(),
            max_queue_size: self.ring_limit(),
        }
    }

    fn require_inflight_negotiated(&self) -> Result<(), Failure> {
        if has(self.protocol_features, PROTOCOL_INFLIGHT_SHMFD) {
            Ok(())
        } else {
            Err(Failure::Breach(
                "INFLIGHT_SHMFD was not negotiated (SET_PROTOCOL_FEATURES)".into(),
            ))
        }
    }

    /// GET_INFLIGHT_FD: a new, sealed, zeroed region for the geometry asked, if it is within this
    /// device's limits (never sized from unchecked peer values). Nothing is kept: the frontend
    /// owns the region and hands it back with SET_INFLIGHT_FD (`new_region_memfd`).
    fn get_inflight_fd(&mut self, asked: &InflightDescription) -> Result<Handled, Failure> {
        self.require_inflight_negotiated()?;
        let size = if self
            .device
            .planted_flaws()
            .has(PlantedFlaw::UncheckedInflightGeometry)
        {
            region_size(asked.num_queues, asked.queue_size, LAYOUT)
                .ok_or_else(|| Failure::Breach("region size overflows".into()))?
        } else {
            checked_region_size(asked.num_queues, asked.queue_size, self.inflight_limits())
                .map_err(|e| Failure::Breach(e.to_string()))?
        };
        let reply = match new_region_memfd(size) {
            Ok(fd) => {
                info!(
                    "inflight region created: {} queue(s) of {} entries, {size} bytes",
                    asked.num_queues, asked.queue_size
                );
                BackendReply::Inflight {
                    description: InflightDescription {
                        mmap_size: size,
                        mmap_offset: 0,
                        ..*asked
                    },
                    fd: Some(fd),
                }
            }
            // Our own failure (no memory, no fds), not the frontend's: "this backend keeps no
            // inflight buffer" (mmap_size 0), after which QEMU carries on without tracking.
            Err(e) => {
                warn!("cannot create an inflight region ({e}); replying without one");
                BackendReply::Inflight {
                    description: InflightDescription {
                        mmap_size: 0,
                        mmap_offset: 0,
                        ..*asked
                    },
                    fd: None,
                }
            }
        };
        Ok(Handled::Reply(reply))
    }

    /// SET_INFLIGHT_FD: maps the frontend's region (every check in `InflightMap::map`; the fd is
    /// closed on every path) and tracks every ring in it from the next start. A fresh backend gets
    /// this without any GET before it: that is the restart after a crash, and each ring recovers
    /// what the region records when it starts.
    fn set_inflight_fd(
        &mut self,
        description: &InflightDescription,
        fd: OwnedFd,
    ) -> Result<Handled, Failure> {
        self.require_inflight_negotiated()?;
        let leaked = self
            .device
            .planted_flaws()
            .has(PlantedFlaw::LeakRefusedInflightFd)
            .then(|| fd.try_clone().ok())
            .flatten();
        let map = InflightMap::map(fd, description, self.inflight_limits()).map_err(|e| {
            // The planted leak: the copy is never closed.
            std::mem::forget(leaked);
            Failure::Breach(e.to_string())
        })?;
        info!(
            "inflight region set: {} queue(s) of {} entries",
            description.num_queues, description.queue_size
        );
        for line in map.describe_queues() {
            info!(target: "vhost", "{line}");
        }
        // Running rings drain and restart on the new region (recovering it), like a new memory
        // table; the old region is unmapped once no worker holds it.
        self.vrings.iter_mut().for_each(Vring::pause);
        self.inflight = Some(map);
        self.resume_all();
        Ok(Handled::Ack)
    }

    fn set_vring_addr(&mut self, addr: VringAddr) -> Result<Handled, Failure> {
        if addr.flags & VHOST_VRING_F_LOG != 0 {
            return Err(Failure::Breach(
                "used-ring logging requested, but LOG_ALL was not offered".into(),
            ));
        }
        let user = UserRingAddresses {
            desc_table: addr.desc_user_addr,
            avail_ring: addr.avail_user_addr,
            used_ring: addr.used_user_addr,
        };
        // Early, clear diagnosis when the table is already known; the full-size check happens
        // when the ring starts (the size may still change).
        if let Some(memory) = &self.memory {
            for (part, at) in [
                ("descriptor table", user.desc_table),
                ("avail ring", user.avail_ring),
                ("used ring", user.used_ring),
            ] {
                if memory.user_to_guest(at, 1).is_none() {
                    return Err(Failure::Breach(format!(
                        "{part} address {at:#x} is not in the memory table"
                    )));
                }
            }
        }
        self.reconfigure(addr.index, |v| v.set_addresses(user))
    }

    /// The largest ring accepted: the device's limit, within the wire's.
    fn ring_limit(&self) -> u16 {
        self.device.max_queue_size().min(MAX_QUEUE_SIZE)
    }

    fn check_ring_size(&self, num: u32) -> Result<u16, Failure> {
        let limit = self.ring_limit();
        match u16::try_from(num) {
            Ok(size) if size.is_power_of_two() && size <= limit => Ok(size),
            _ => Err(Failure::Breach(format!(
                "ring size {num} is not a power of two in 1..={limit}"
            ))),
        }
    }

    fn vring_index(&self, index: u32) -> Result<usize, Failure> {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < self.vrings.len())
            .ok_or_else(|| {
                Failure::Breach(format!(
                    "queue index {index} out of range (the device has {} queues)",
                    self.vrings.len()
                ))
            })
    }

    /// Pause the ring, change it, resume it if it is (still) complete.
    fn reconfigure(
        &mut self,
        index: u32,
        change: impl FnOnce(&mut Vring<D::Ring>),
    ) -> Result<Handled, Failure> {
        let i = self.vring_index(index)?;
        self.vrings[i].pause();
        change(&mut self.vrings[i]);
        self.resume(i);
        Ok(Handled::Ack)
    }

    fn resume(&mut self, i: usize) {
        let ctx = RunContext {
            memory: self.memory.as_ref(),
            starts_disabled: has(self.acked_features, VHOST_USER_F_PROTOCOL_FEATURES),
            inflight: self.inflight.as_ref(),
            event_idx: has(self.acked_features, VIRTIO_RING_F_EVENT_IDX),
        };
        self.vrings[i].resume(self.device, &ctx);
    }

    fn resume_all(&mut self) {
        for i in 0..self.vrings.len() {
            self.resume(i);
        }
    }

    /// RESET_OWNER / RESET_DEVICE: back to a fresh session (rings stopped, memory and inflight
    /// region unmapped; a frontend gets a new region with GET after a reset, as QEMU does).
    fn reset(&mut self) {
        info!("device reset: stopping every ring and dropping the memory table");
        self.vrings.iter_mut().for_each(Vring::pause);
        self.vrings = Self::fresh_vrings(self.device);
        self.memory = None;
        self.inflight = None;
        self.acked_features = 0;
    }
}
