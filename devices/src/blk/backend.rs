//! The vhost-user-blk backend: the *server* side of vhost-user, serving a raw disk image.
//!
//! One frontend at a time talks to it over a unix stream socket. The frontend drives, the backend
//! answers:
//!
//! ```text
//!  GET_FEATURES / SET_FEATURES            virtio + vhost-user feature bits
//!  GET/SET_PROTOCOL_FEATURES              which optional messages both sides speak
//!  SET_OWNER, GET_QUEUE_NUM, GET_CONFIG   session start; queue count; the virtio-blk config space
//!  SET_MEM_TABLE (+ one fd per region)    guest RAM: the backend maps it MAP_SHARED
//!  SET_VRING_NUM/BASE/ADDR                per ring: size, first avail index, ring addresses
//!  SET_VRING_KICK/CALL/ERR (+ eventfd)    guest->backend doorbell, backend->guest interrupt, errors
//!  SET_VRING_ENABLE 1                     the ring runs: data flows without the frontend
//!  GET_VRING_BASE                         stop the ring; reply: where it stopped
//!  GET_INFLIGHT_FD -> (+ one memfd)       a fresh inflight region for the frontend to keep
//!  SET_INFLIGHT_FD (+ that fd)            track requests in it; after a crash: recover them
//! ```
//!
//! With INFLIGHT_SHMFD (see `inflight`) a backend that was killed and restarted gets the
//! frontend's region back with SET_INFLIGHT_FD, no GET before it, and each ring resubmits what
//! the dead backend had taken from the avail ring and not completed. GET_VRING_BASE still drains
//! every in-flight request before it answers, as the spec requires without
//! GET_VRING_BASE_INFLIGHT (bit 20, not offered).
//!
//! Replies: GET_* messages always get one. With the REPLY_ACK protocol feature the frontend may set
//! NEED_REPLY on any other message and then gets a u64: 0 for success, non-zero for failure.
//! A message this backend cannot accept (unknown, malformed, or asking for something it does not
//! do) gets that failure ack when NEED_REPLY is set; otherwise the connection is closed with a
//! logged reason, since the frontend would carry on believing it succeeded.
//!
//! Who may hold the backend: a frontend has [`HANDSHAKE_TIMEOUT`] from connecting to send
//! SET_OWNER (the message that starts a vhost-user session), every message and reply before it
//! bounded by that one deadline; one that has not is dropped, so a client that connects and says
//! nothing (or trickles bytes) cannot keep every later frontend waiting. After SET_OWNER the
//! frontend owns the backend until it hangs up, idle or not: a running VM's control channel is
//! silent between reconfigurations, and a frontend that completed the handshake could hold the
//! disk just as well by behaving. Who may connect at all is decided by the socket's permissions.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use vhost_frontend::features::{
    bit_mask, describe_device_features, describe_protocol_features, has, PROTOCOL_CONFIG,
    PROTOCOL_INFLIGHT_SHMFD, PROTOCOL_MQ, PROTOCOL_REPLY_ACK, VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_ID_BLOCK, VIRTIO_RING_F_INDIRECT_DESC,
};
use vhost_frontend::trace::{describe_device_message, Direction};
use vhost_frontend::wire::{
    recv_message_by, send_message_by, ConfigSpace, FrontendMessage, Header, InflightDescription,
    PeerGone, Request, U64Payload, VringAddr, VringState, WireError, FLAG_REPLY, VERSION,
    VHOST_VRING_F_LOG,
};

use super::config::{offered_virtio_features, BlkConfig};
use super::disk::Disk;
use super::inflight::{checked_region_size, new_region_memfd, InflightLimits, InflightMap};
use super::memory::{MappedMemory, RegionLayout};
use super::vring::{eventfd_from_peer, RunContext, UserRingAddresses, Vring};

pub use super::queue_worker::{CompletionDelay, CompletionDelayError};
pub use vhost_frontend::wire::{MAX_QUEUES, MAX_QUEUE_SIZE};

/// The protocol features offered.
pub const OFFERED_PROTOCOL_FEATURES: u64 = bit_mask(PROTOCOL_MQ)
    | bit_mask(PROTOCOL_REPLY_ACK)
    | bit_mask(PROTOCOL_CONFIG)
    | bit_mask(PROTOCOL_INFLIGHT_SHMFD);

/// How long a frontend has, from connecting, to complete the handshake (send SET_OWNER) before
/// it is dropped; see the module docs for what it may hold afterwards.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkBackendConfig {
    /// The raw disk image.
    pub path: PathBuf,
    /// Offer VIRTIO_BLK_F_RO and fail every write with IOERR.
    pub readonly: bool,
    /// Request queues offered (GET_QUEUE_NUM, config space num_queues), 1..=MAX_QUEUES.
    pub num_queues: u16,
    /// Largest ring accepted in SET_VRING_NUM (a power of two); also sets seg_max (size - 2).
    /// QEMU's vhost-user-blk defaults to 128 and allows up to 1024.
    pub queue_size: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("invalid backend configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot open disk image {path}: {source}")]
    OpenDisk { path: PathBuf, source: io::Error },
    /// The frontend sent something this backend cannot accept; the connection was closed.
    #[error("frontend broke the protocol: {0}")]
    Protocol(String),
    /// The socket failed for a reason other than the frontend hanging up.
    #[error("vhost-user socket error: {0}")]
    Wire(WireError),
    #[error("cannot set up the listening socket {path}: {source}")]
    Listen { path: PathBuf, source: io::Error },
    #[error("cannot create the socket pair or thread: {0}")]
    Spawn(io::Error),
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

/// A virtio-blk device served over vhost-user. Holds the opened image; each `serve` call is one
/// frontend session with its own memory table and rings.
#[derive(Debug)]
pub struct BlkBackend {
    disk: Arc<Disk>,
    config: BlkConfig,
    num_queues: u16,
    queue_size: u16,
    handshake_timeout: Duration,
    completion_delay: Option<CompletionDelay>,
    /// Offer INFLIGHT_SHMFD (the default; `--no-inflight` measures what tracking costs).
    inflight: bool,
}

impl BlkBackend {
    /// Checks the configuration and opens the image (once, for every session).
    pub fn open(cfg: BlkBackendConfig) -> Result<Self, BlkError> {
        let _ = super::queue_worker::BACKEND_STARTED.set(Instant::now());
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(BlkError::InvalidConfig(format!(
                "num_queues {} is not in 1..={MAX_QUEUES}",
                cfg.num_queues
            )));
        }
        if !cfg.queue_size.is_power_of_two() {
            return Err(BlkError::InvalidConfig(format!(
                "queue_size {} is not a power of two",
                cfg.queue_size
            )));
        }
        let disk = Disk::open(&cfg.path, cfg.readonly).map_err(|source| BlkError::OpenDisk {
            path: cfg.path.clone(),
            source,
        })?;
        let config = BlkConfig::new(disk.capacity_sectors(), cfg.queue_size, cfg.num_queues);
        info!(
            path = %cfg.path.display(),
            sectors = disk.capacity_sectors(),
            readonly = cfg.readonly,
            "virtio-blk backend opened its image"
        );
        Ok(BlkBackend {
            disk: Arc::new(disk),
            config,
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            completion_delay: None,
            inflight: true,
        })
    }

    /// Another bound than [`HANDSHAKE_TIMEOUT`] (tests use a short one).
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Test option (`vmm blk-backend --delay-completions`): each finished request waits a random
    /// time in the range before it is published, so completions land out of order and a backend
    /// killed at any moment has requests in flight (what inflight recovery is tested with). The
    /// in-process fallback and the standalone backend run the same code.
    pub fn with_completion_delay(mut self, delay: Option<CompletionDelay>) -> Self {
        self.completion_delay = delay;
        self
    }

    /// Whether to offer INFLIGHT_SHMFD (`vmm blk-backend --no-inflight`: for measuring what
    /// tracking costs, and for testing frontends against a backend that keeps no region).
    pub fn with_inflight(mut self, inflight: bool) -> Self {
        self.inflight = inflight;
        self
    }

    /// The protocol features offered in GET_PROTOCOL_FEATURES.
    pub fn offered_protocol_features(&self) -> u64 {
        if self.inflight {
            OFFERED_PROTOCOL_FEATURES
        } else {
            OFFERED_PROTOCOL_FEATURES & !bit_mask(PROTOCOL_INFLIGHT_SHMFD)
        }
    }

    /// What a GET/SET_INFLIGHT_FD may ask for: this device's queues and ring limit.
    fn inflight_limits(&self) -> InflightLimits {
        InflightLimits {
            device_queues: self.num_queues,
            max_queue_size: self.queue_size.min(MAX_QUEUE_SIZE),
        }
    }

    /// The virtio feature bits offered in GET_FEATURES.
    pub fn offered_features(&self) -> u64 {
        offered_virtio_features(self.disk.is_readonly())
            | bit_mask(VIRTIO_RING_F_INDIRECT_DESC)
            | bit_mask(VHOST_USER_F_PROTOCOL_FEATURES)
    }

    /// Serves one frontend until it hangs up (then `Ok`) or breaks the protocol (then `Err`, the
    /// connection closed). Every ring is stopped and drained before this returns.
    pub fn serve(&self, stream: UnixStream) -> Result<(), BlkError> {
        let mut session = Session::new(self, &stream);
        let end = session.run();
        // A memory fd that shrank under us (memory_faults) shut the socket down: say why, not
        // "the frontend went away".
        if let Some((region, faults, addr)) = session.memory.as_ref().and_then(|m| m.vanished()) {
            let e = BlkError::MemoryVanished {
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

    /// The in-process fallback: a socketpair with the backend serving one end on its own thread.
    /// Returns the frontend's end and the thread (which ends when the frontend end is closed).
    pub fn spawn_in_process(
        cfg: BlkBackendConfig,
    ) -> Result<(UnixStream, JoinHandle<Result<(), BlkError>>), BlkError> {
        BlkBackend::open(cfg)?.spawn()
    }

    /// [`BlkBackend::spawn_in_process`] with this (opened, perhaps configured) backend.
    pub fn spawn(self) -> Result<(UnixStream, JoinHandle<Result<(), BlkError>>), BlkError> {
        let (frontend_end, backend_end) = UnixStream::pair().map_err(BlkError::Spawn)?;
        let handle = thread::Builder::new()
            .name("blk-backend".into())
            .spawn(move || self.serve(backend_end))
            .map_err(BlkError::Spawn)?;
        Ok((frontend_end, handle))
    }

    /// Standalone backend (`vmm blk-backend`): listens on `socket_path` and serves one frontend at
    /// a time, for ever; a frontend leaving (or misbehaving) does not end it. A stale socket file
    /// left by an earlier run is replaced; any other file at that path is an error. A frontend
    /// that has not sent SET_OWNER within the handshake timeout is dropped (module docs).
    pub fn listen(cfg: BlkBackendConfig, socket_path: &Path) -> Result<(), BlkError> {
        BlkBackend::open(cfg)?.listen_on(socket_path)
    }

    /// [`BlkBackend::listen`] with this (opened, perhaps configured) backend.
    pub fn listen_on(&self, socket_path: &Path) -> Result<(), BlkError> {
        let backend = self;
        let listen_err = |source| BlkError::Listen {
            path: socket_path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(socket_path) {
            if !meta.file_type().is_socket() {
                return Err(listen_err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "path exists and is not a socket",
                )));
            }
            std::fs::remove_file(socket_path).map_err(listen_err)?;
        }
        let listener = UnixListener::bind(socket_path).map_err(listen_err)?;
        info!(socket = %socket_path.display(), "vhost-user-blk backend listening");
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    info!("vhost-user frontend connected");
                    match backend.serve(stream) {
                        Ok(()) => info!("session ended; waiting for the next frontend"),
                        Err(e) => warn!("session failed: {e}; waiting for the next frontend"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(listen_err(e)),
            }
        }
    }
}

/// Why a session stopped.
enum SessionEnd {
    PeerGone(PeerGone),
    Failed(BlkError),
}

impl From<WireError> for SessionEnd {
    fn from(e: WireError) -> Self {
        match e {
            WireError::PeerGone(how) => SessionEnd::PeerGone(how),
            WireError::Protocol(p) => SessionEnd::Failed(BlkError::Protocol(p.to_string())),
            other => SessionEnd::Failed(BlkError::Wire(other)),
        }
    }
}

/// What a handled message sends back.
enum Reply {
    /// Nothing, or a success ack when NEED_REPLY is set.
    Ack,
    /// The reply payload of a GET_* message.
    Payload(Vec<u8>),
    /// A reply payload with one fd (GET_INFLIGHT_FD); ours is closed once it is sent.
    PayloadWithFd(Vec<u8>, OwnedFd),
}

/// Why a message was not accepted.
enum Failure {
    /// A legitimate "no" (e.g. SET_CONFIG on a read-only config space): the session goes on.
    Refused(String),
    /// The message breaks the protocol or asks for what was not negotiated.
    Breach(String),
}

/// One frontend session: negotiated features, the memory table, and the rings.
struct Session<'a> {
    backend: &'a BlkBackend,
    stream: &'a UnixStream,
    acked_features: u64,
    protocol_features: u64,
    memory: Option<MappedMemory>,
    /// The SET_INFLIGHT_FD region (a running ring's worker holds it too, until it stops).
    inflight: Option<Arc<InflightMap>>,
    vrings: Vec<Vring>,
    /// Until SET_OWNER: when the handshake must be done; bounds every receive and send.
    handshake_deadline: Option<Instant>,
}

impl<'a> Session<'a> {
    fn new(backend: &'a BlkBackend, stream: &'a UnixStream) -> Self {
        Session {
            backend,
            stream,
            acked_features: 0,
            protocol_features: 0,
            memory: None,
            inflight: None,
            vrings: (0..backend.num_queues).map(Vring::new).collect(),
            // Saturating: an absurd timeout from a caller means "no bound", not a panic.
            handshake_deadline: Instant::now().checked_add(backend.handshake_timeout),
        }
    }

    /// A wire error as a session end; a deadline passing before SET_OWNER says so.
    fn wire_end(&self, e: WireError) -> SessionEnd {
        match e {
            WireError::TimedOut if self.handshake_deadline.is_some() => {
                SessionEnd::Failed(BlkError::HandshakeTimeout(self.backend.handshake_timeout))
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
                    Some(VIRTIO_ID_BLOCK),
                    Direction::ToBackend,
                    TRACE_NAME,
                    &header,
                    &payload,
                    fds.len(),
                )
            );
            let message = match FrontendMessage::decode(&header, &payload, fds) {
                Ok(message) => message,
                Err(e) => {
                    // The framing is intact (header.size bytes were read), so with NEED_REPLY
                    // the frontend can be told and the session can go on.
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
                Ok(reply) => self.reply(request, &header, reply)?,
                Err(failure) => self.fail(&header, failure)?,
            }
        }
    }

    fn reply(&self, request: Request, header: &Header, reply: Reply) -> Result<(), SessionEnd> {
        match reply {
            Reply::Payload(payload) => {
                let header = Header::for_reply(request, payload.len());
                trace_reply(&header, &payload, 0);
                send_message_by(self.stream, &header, &payload, &[], self.handshake_deadline)
                    .map_err(|e| self.wire_end(e))?;
            }
            Reply::PayloadWithFd(payload, fd) => {
                let header = Header::for_reply(request, payload.len());
                trace_reply(&header, &payload, 1);
                send_message_by(
                    self.stream,
                    &header,
                    &payload,
                    &[fd.as_fd()],
                    self.handshake_deadline,
                )
                .map_err(|e| self.wire_end(e))?;
            }
            Reply::Ack if header.need_reply() => self.send_ack(header.request, 0)?,
            Reply::Ack => {}
        }
        Ok(())
    }

    fn fail(&self, header: &Header, failure: Failure) -> Result<(), SessionEnd> {
        let name = Request::from_code(header.request)
            .map(Request::name)
            .unwrap_or("unknown request");
        let (reason, fatal) = match failure {
            Failure::Refused(reason) => (reason, false),
            Failure::Breach(reason) => (reason, true),
        };
        if header.need_reply() {
            warn!(
                "{name} (code {}) failed: {reason}; sending a failure ack",
                header.request
            );
            self.send_ack(header.request, 1)?;
            Ok(())
        } else if fatal {
            Err(SessionEnd::Failed(BlkError::Protocol(format!(
                "{name} (code {}): {reason}",
                header.request
            ))))
        } else {
            warn!("{name} refused: {reason}");
            Ok(())
        }
    }

    /// The REPLY_ACK u64: 0 success, anything else failure. Built from the raw code so that an
    /// unknown request can be answered too.
    fn send_ack(&self, request_code: u32, value: u64) -> Result<(), SessionEnd> {
        let payload = U64Payload(value).encode();
        let header = Header {
            request: request_code,
            flags: VERSION | FLAG_REPLY,
            size: payload.len() as u32,
        };
        trace_reply(&header, &payload, 0);
        send_message_by(self.stream, &header, &payload, &[], self.handshake_deadline)
            .map_err(|e| self.wire_end(e))?;
        Ok(())
    }

    fn handle(&mut self, message: FrontendMessage) -> Result<Reply, Failure> {
        use FrontendMessage as M;
        match message {
            M::GetFeatures => Ok(u64_reply(self.backend.offered_features())),
            M::SetFeatures(features) => self.set_features(features),
            M::SetOwner => Ok(Reply::Ack),
            M::ResetOwner | M::ResetDevice => {
                self.reset();
                Ok(Reply::Ack)
            }
            M::GetProtocolFeatures => Ok(u64_reply(self.backend.offered_protocol_features())),
            M::SetProtocolFeatures(features) => self.set_protocol_features(features),
            M::GetQueueNum => Ok(u64_reply(u64::from(self.backend.num_queues))),
            M::GetConfig(window) => Ok(self.get_config(&window)),
            M::SetConfig(_) => Err(Failure::Refused(
                "the virtio-blk config space is read-only here".into(),
            )),
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
                Ok(Reply::Ack)
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
                Ok(Reply::Payload(
                    VringState {
                        index,
                        num: u32::from(base),
                    }
                    .encode(),
                ))
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
                Ok(Reply::Ack)
            }
            M::SetVringErr { index, fd } => {
                let err = fd
                    .map(|fd| eventfd_from_peer(fd, "SET_VRING_ERR"))
                    .transpose()
                    .map_err(Failure::Breach)?;
                let i = self.vring_index(u32::from(index))?;
                self.vrings[i].set_err(err);
                Ok(Reply::Ack)
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

    fn set_features(&mut self, features: u64) -> Result<Reply, Failure> {
        let offered = self.backend.offered_features();
        if features & !offered != 0 {
            return Err(Failure::Breach(format!(
                "acks feature bits that were not offered: {}",
                describe_device_features(Some(VIRTIO_ID_BLOCK), features & !offered)
            )));
        }
        info!(
            "virtio features acked: {}",
            describe_device_features(Some(VIRTIO_ID_BLOCK), features)
        );
        self.acked_features = features;
        Ok(Reply::Ack)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<Reply, Failure> {
        let offered = self.backend.offered_protocol_features();
        if features & !offered != 0 {
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
        Ok(Reply::Ack)
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
    /// owns the region and hands it back with SET_INFLIGHT_FD (`inflight::new_region_memfd`).
    fn get_inflight_fd(&mut self, asked: &InflightDescription) -> Result<Reply, Failure> {
        self.require_inflight_negotiated()?;
        let size = checked_region_size(
            asked.num_queues,
            asked.queue_size,
            self.backend.inflight_limits(),
        )
        .map_err(|e| Failure::Breach(e.to_string()))?;
        let reply = match new_region_memfd(size) {
            Ok(fd) => {
                info!(
                    "inflight region created: {} queue(s) of {} entries, {size} bytes",
                    asked.num_queues, asked.queue_size
                );
                let payload = InflightDescription {
                    mmap_size: size,
                    mmap_offset: 0,
                    ..*asked
                }
                .encode();
                Reply::PayloadWithFd(payload, fd)
            }
            // Our own failure (no memory, no fds), not the frontend's: "this backend keeps no
            // inflight buffer" (mmap_size 0), after which QEMU carries on without tracking.
            Err(e) => {
                warn!("cannot create an inflight region ({e}); replying without one");
                Reply::Payload(
                    InflightDescription {
                        mmap_size: 0,
                        mmap_offset: 0,
                        ..*asked
                    }
                    .encode(),
                )
            }
        };
        Ok(reply)
    }

    /// SET_INFLIGHT_FD: maps the frontend's region (every check in `InflightMap::map`; the fd is
    /// closed on every path) and tracks every ring in it from the next start. A fresh backend gets
    /// this without any GET before it: that is the restart after a crash, and each ring recovers
    /// what the region records when it starts.
    fn set_inflight_fd(
        &mut self,
        description: &InflightDescription,
        fd: OwnedFd,
    ) -> Result<Reply, Failure> {
        self.require_inflight_negotiated()?;
        let map = InflightMap::map(fd, description, self.backend.inflight_limits())
            .map_err(|e| Failure::Breach(e.to_string()))?;
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
        Ok(Reply::Ack)
    }

    /// GET_CONFIG: the requested window of the config space. A window outside it gets an empty
    /// reply, which is how libvhost-user says "failed" and how QEMU understands it.
    fn get_config(&self, window: &ConfigSpace) -> Reply {
        match self
            .backend
            .config
            .read_window(window.offset, window.size())
        {
            Ok(bytes) => Reply::Payload(
                ConfigSpace {
                    offset: window.offset,
                    flags: window.flags,
                    payload: bytes,
                }
                .encode(),
            ),
            Err(e) => {
                warn!("GET_CONFIG refused: {e}");
                Reply::Payload(Vec::new())
            }
        }
    }

    fn set_vring_addr(&mut self, addr: VringAddr) -> Result<Reply, Failure> {
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

    fn check_ring_size(&self, num: u32) -> Result<u16, Failure> {
        let limit = self.backend.queue_size.min(MAX_QUEUE_SIZE);
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
        change: impl FnOnce(&mut Vring),
    ) -> Result<Reply, Failure> {
        let i = self.vring_index(index)?;
        self.vrings[i].pause();
        change(&mut self.vrings[i]);
        self.resume(i);
        Ok(Reply::Ack)
    }

    fn resume(&mut self, i: usize) {
        let ctx = RunContext {
            memory: self.memory.as_ref(),
            disk: &self.backend.disk,
            starts_disabled: has(self.acked_features, VHOST_USER_F_PROTOCOL_FEATURES),
            inflight: self.inflight.as_ref(),
            completion_delay: self.backend.completion_delay,
        };
        self.vrings[i].resume(&ctx);
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
        self.vrings = (0..self.backend.num_queues).map(Vring::new).collect();
        self.memory = None;
        self.inflight = None;
        self.acked_features = 0;
    }
}

/// Names this side in trace lines (arrows are drawn from the frontend's point of view).
const TRACE_NAME: &str = "blk-backend";

fn trace_reply(header: &Header, payload: &[u8], fds: usize) {
    debug!(
        target: "vhost",
        "{}",
        describe_device_message(
            Some(VIRTIO_ID_BLOCK),
            Direction::FromBackend,
            TRACE_NAME,
            header,
            payload,
            fds,
        )
    );
}

fn u64_reply(value: u64) -> Reply {
    Reply::Payload(U64Payload(value).encode())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::config::CONFIG_SPACE_SIZE;
    use crate::blk::inflight::MEMFD_NAME;
    use crate::blk::test_util::{
        fds_referring_to, guest_memory, memfds_named, request_header, sealed_memfd, temp_path,
        wait_readable, TestRing, INFLIGHT_MEMFD_LOCK,
    };
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
    use std::time::Duration;
    use vhost_frontend::wire::{
        recv_message, send_message, MemoryRegion, MemoryTable, VringFdIndex, FLAG_NEED_REPLY,
    };
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_RO, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Where the fake frontend pretends guest RAM is mapped in its own address space.
    const FRONTEND_VA: u64 = 0x7f12_3400_0000;

    /// The smallest frontend that can drive the backend: raw wire messages over the socket.
    struct FakeFrontend {
        stream: UnixStream,
    }

    impl FakeFrontend {
        fn send(&self, request: Request, payload: &[u8], fds: &[BorrowedFd<'_>], need_reply: bool) {
            let header = Header::for_request(request, payload.len(), need_reply);
            send_message(&self.stream, &header, payload, fds).expect("send");
        }

        fn recv_reply(&self, request: Request) -> Vec<u8> {
            let (header, payload, fds) = recv_message(&self.stream).expect("reply");
            assert_eq!(header.request, request.code(), "reply to the right request");
            assert!(header.is_reply());
            assert!(fds.is_empty());
            payload
        }

        fn get_u64(&self, request: Request) -> u64 {
            self.send(request, &[], &[], false);
            U64Payload::decode(&self.recv_reply(request)).unwrap().0
        }

        /// Sends with NEED_REPLY and returns the ack value (0 = success).
        fn acked(&self, request: Request, payload: &[u8], fds: &[BorrowedFd<'_>]) -> u64 {
            self.send(request, payload, fds, true);
            U64Payload::decode(&self.recv_reply(request)).unwrap().0
        }

        fn vring(&self, request: Request, index: u32, num: u32) -> u64 {
            self.acked(request, &VringState { index, num }.encode(), &[])
        }

        fn vring_fd(&self, request: Request, index: u8, fd: &impl AsRawFd) -> u64 {
            let payload = VringFdIndex {
                index,
                no_fd: false,
            }
            .encode();
            // SAFETY: `fd` is borrowed for this call, so the descriptor stays open while sent.
            let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
            self.acked(request, &payload, &[borrowed])
        }
    }

    fn disk_image(sectors: u64) -> PathBuf {
        let path = temp_path("disk.img");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(sectors * 512).unwrap();
        path
    }

    fn spawn(path: &Path, readonly: bool) -> (FakeFrontend, JoinHandle<Result<(), BlkError>>) {
        let (stream, handle) = BlkBackend::spawn_in_process(BlkBackendConfig {
            path: path.to_path_buf(),
            readonly,
            num_queues: 2,
            queue_size: 128,
        })
        .unwrap();
        (FakeFrontend { stream }, handle)
    }

    fn handshake(fe: &FakeFrontend) {
        let features = fe.get_u64(Request::GetFeatures);
        assert!(has(features, 32), "VERSION_1 offered");
        assert!(has(features, VHOST_USER_F_PROTOCOL_FEATURES));
        fe.send(
            Request::SetFeatures,
            &U64Payload(features).encode(),
            &[],
            false,
        );
        let protocol = fe.get_u64(Request::GetProtocolFeatures);
        assert_eq!(protocol, OFFERED_PROTOCOL_FEATURES);
        fe.send(
            Request::SetProtocolFeatures,
            &U64Payload(protocol).encode(),
            &[],
            false,
        );
        assert_eq!(fe.acked(Request::SetOwner, &[], &[]), 0);
        assert_eq!(fe.get_u64(Request::GetQueueNum), 2);
    }

    /// Sends the memory table and sets queue 0 up on `ring`; returns the kick and call eventfds.
    fn start_queue(
        fe: &FakeFrontend,
        ram: &std::fs::File,
        ram_size: u64,
        ring: &TestRing,
    ) -> (EventFd, EventFd) {
        let table = MemoryTable {
            regions: vec![MemoryRegion {
                guest_phys_addr: 0,
                memory_size: ram_size,
                userspace_addr: FRONTEND_VA,
                mmap_offset: 0,
            }],
        };
        assert_eq!(
            fe.acked(Request::SetMemTable, &table.encode(), &[ram.as_fd()]),
            0
        );
        assert_eq!(fe.vring(Request::SetVringNum, 0, u32::from(ring.size)), 0);
        assert_eq!(fe.vring(Request::SetVringBase, 0, 0), 0);
        let addr = VringAddr {
            index: 0,
            flags: 0,
            desc_user_addr: FRONTEND_VA + ring.rings.desc_table.0,
            used_user_addr: FRONTEND_VA + ring.rings.used_ring.0,
            avail_user_addr: FRONTEND_VA + ring.rings.avail_ring.0,
            log_guest_addr: 0,
        };
        assert_eq!(fe.acked(Request::SetVringAddr, &addr.encode(), &[]), 0);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        assert_eq!(fe.vring_fd(Request::SetVringKick, 0, &kick), 0);
        assert_eq!(fe.vring_fd(Request::SetVringCall, 0, &call), 0);
        assert_eq!(fe.vring(Request::SetVringEnable, 0, 1), 0);
        (kick, call)
    }

    fn wait_call(call: &EventFd) {
        assert!(
            wait_readable(call, Duration::from_secs(10)),
            "no interrupt from the backend"
        );
        call.read().unwrap();
    }

    /// A frontend that shrinks its memory fd and then kicks: the backend process survives, the
    /// write fails without touching the disk, and the session ends saying why.
    #[test]
    fn a_memory_fd_shrunk_under_the_session_ends_it_and_writes_nothing() {
        let path = disk_image(64);
        std::fs::write(&path, vec![0xeeu8; 64 * 512]).unwrap();
        let (fe, backend) = spawn(&path, false);
        handshake(&fe);
        let ram_size = 0x20_0000;
        let (mem, ram) = guest_memory(ram_size);
        let g = mem.guest().clone();
        let mut ring = TestRing::new(128, 0x1000);
        let (kick, _call) = start_queue(&fe, &ram, ram_size, &ring);
        g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 0), GuestAddress(0x10000))
            .unwrap();
        g.write_slice(&[0x5a; 4096], GuestAddress(0x10_0000))
            .unwrap();
        // The data page goes; the rings and the header stay. Then the request is published
        // (published first, the running ring could serve it before the shrink).
        ram.set_len(0x8_0000).unwrap();
        ring.add_chain(
            &g,
            &[
                (0x10000, 16, false),
                (0x10_0000, 4096, false),
                (0x12000, 1, true),
            ],
        );
        kick.write(1).unwrap();
        let end = backend.join().expect("backend thread");
        assert!(
            matches!(end, Err(BlkError::MemoryVanished { region: 0, .. })),
            "{end:?}"
        );
        let disk = std::fs::read(&path).unwrap();
        assert!(disk.iter().all(|b| *b == 0xee), "the disk was written");
        // The frontend's end sees the connection closed.
        assert!(recv_message(&fe.stream).is_err());
    }

    impl FakeFrontend {
        /// GET_INFLIGHT_FD; the raw reply (header, payload, fds).
        fn get_inflight(
            &self,
            num_queues: u16,
            queue_size: u16,
            need_reply: bool,
        ) -> (Header, Vec<u8>, Vec<OwnedFd>) {
            let asked = InflightDescription {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues,
                queue_size,
            };
            self.send(Request::GetInflightFd, &asked.encode(), &[], need_reply);
            recv_message(&self.stream).expect("GET_INFLIGHT_FD reply")
        }

        fn set_inflight(&self, description: &InflightDescription, fd: &impl AsFd) -> u64 {
            self.acked(Request::SetInflightFd, &description.encode(), &[fd.as_fd()])
        }
    }

    fn inflight_backend_memfds() -> usize {
        memfds_named(MEMFD_NAME.to_str().unwrap())
    }

    #[test]
    fn get_inflight_fd_hands_out_a_sealed_region_and_keeps_nothing() {
        let _lock = INFLIGHT_MEMFD_LOCK.lock().unwrap();
        let path = disk_image(8);
        let (fe, backend) = spawn(&path, false);
        handshake(&fe);
        for _ in 0..3 {
            // Repeated GETs: each a new region; none stays open in the backend.
            let (header, payload, fds) = fe.get_inflight(2, 128, false);
            assert!(header.is_reply());
            assert_eq!(header.request, Request::GetInflightFd.code());
            let reply = InflightDescription::decode(&payload).unwrap();
            assert_eq!(
                reply,
                InflightDescription {
                    mmap_size: 2 * 2112,
                    mmap_offset: 0,
                    num_queues: 2,
                    queue_size: 128,
                }
            );
            assert_eq!(fds.len(), 1, "exactly one fd");
            let file = std::fs::File::from(fds.into_iter().next().unwrap());
            assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
            assert!(crate::blk::memory_faults::sealed_against_shrinking(
                file.as_fd()
            ));
            assert_eq!(fe.get_u64(Request::GetQueueNum), 2);
            assert_eq!(inflight_backend_memfds(), 1, "only the copy we received");
        }
        assert_eq!(inflight_backend_memfds(), 0);
        drop(fe);
        backend.join().unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    /// Every hostile GET/SET value gets a failure ack; the session stays usable, and no fd the
    /// backend created or received stays open.
    #[test]
    fn hostile_inflight_messages_get_failure_acks_and_leak_no_fd() {
        let _lock = INFLIGHT_MEMFD_LOCK.lock().unwrap();
        let path = disk_image(64);
        let (fe, backend) = spawn(&path, false);
        handshake(&fe);
        for (queues, size) in [
            (0, 128),
            (3, 128),
            (u16::MAX, 128),
            (1, 0),
            (1, 100),
            (1, 256),
            (1, u16::MAX),
        ] {
            let (header, payload, fds) = fe.get_inflight(queues, size, true);
            assert_eq!(header.request, Request::GetInflightFd.code());
            assert_eq!(
                U64Payload::decode(&payload).unwrap().0,
                1,
                "GET {queues}x{size}"
            );
            assert!(fds.is_empty());
            assert_eq!(inflight_backend_memfds(), 0, "GET {queues}x{size}");
        }
        let good = InflightDescription {
            mmap_size: 2112,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 128,
        };
        let region = || sealed_memfd("fe-inflight", &[0u8; 8192]);
        let (sock, _peer) = UnixStream::pair().unwrap();
        let cases: Vec<(&str, InflightDescription, std::fs::File)> = vec![
            (
                "no queues",
                InflightDescription {
                    num_queues: 0,
                    ..good
                },
                region(),
            ),
            (
                "more queues than the device",
                InflightDescription {
                    num_queues: 3,
                    ..good
                },
                region(),
            ),
            (
                "65535 queues",
                InflightDescription {
                    num_queues: u16::MAX,
                    ..good
                },
                region(),
            ),
            (
                "queue size 0",
                InflightDescription {
                    queue_size: 0,
                    ..good
                },
                region(),
            ),
            (
                "queue size not a power of two",
                InflightDescription {
                    queue_size: 96,
                    ..good
                },
                region(),
            ),
            (
                "queue size 65535",
                InflightDescription {
                    queue_size: u16::MAX,
                    ..good
                },
                region(),
            ),
            (
                "mmap_size too small",
                InflightDescription {
                    mmap_size: 2048,
                    ..good
                },
                region(),
            ),
            (
                "offset + size overflows",
                InflightDescription {
                    mmap_offset: 4096,
                    mmap_size: u64::MAX,
                    ..good
                },
                region(),
            ),
            (
                "offset past the file",
                InflightDescription {
                    mmap_offset: 1 << 20,
                    ..good
                },
                region(),
            ),
            (
                "an unsealed memfd",
                good,
                crate::blk::test_util::memfd("fe-unsealed", 8192),
            ),
        ];
        for (what, description, file) in &cases {
            assert_ne!(fe.set_inflight(description, file), 0, "{what}");
            assert_eq!(
                fds_referring_to(file),
                1,
                "{what}: the received fd was kept"
            );
        }
        // Not a file at all: a socket.
        assert_ne!(fe.set_inflight(&good, &sock), 0, "a socket");
        assert_eq!(fds_referring_to(&sock), 1, "the received socket was kept");
        // The session is still usable: a good region, a ring, a request through both.
        let memfd = region();
        assert_eq!(fe.set_inflight(&good, &memfd), 0);
        assert_eq!(fds_referring_to(&memfd), 1, "mapped, and the fd closed");
        let ram_size = 0x20_0000;
        let (mem, ram) = guest_memory(ram_size);
        let g = mem.guest().clone();
        let mut ring = TestRing::new(128, 0x1000);
        let (kick, call) = start_queue(&fe, &ram, ram_size, &ring);
        g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 1), GuestAddress(0x10000))
            .unwrap();
        ring.add_chain(
            &g,
            &[
                (0x10000, 16, false),
                (0x11000, 512, false),
                (0x12000, 1, true),
            ],
        );
        kick.write(1).unwrap();
        wait_call(&call);
        assert_eq!(ring.used_idx(&g), 1);
        // Without NEED_REPLY a bad SET closes this connection.
        fe.send(
            Request::SetInflightFd,
            &InflightDescription {
                num_queues: 9,
                ..good
            }
            .encode(),
            &[memfd.as_fd()],
            false,
        );
        assert!(matches!(
            recv_message(&fe.stream),
            Err(WireError::PeerGone(_))
        ));
        assert!(matches!(
            backend.join().unwrap(),
            Err(BlkError::Protocol(_))
        ));
        assert_eq!(fds_referring_to(&memfd), 1);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn inflight_messages_need_the_protocol_feature() {
        let path = disk_image(8);
        let (fe, backend) = spawn(&path, false);
        let features = fe.get_u64(Request::GetFeatures);
        fe.send(
            Request::SetFeatures,
            &U64Payload(features).encode(),
            &[],
            false,
        );
        let without = OFFERED_PROTOCOL_FEATURES & !bit_mask(PROTOCOL_INFLIGHT_SHMFD);
        assert_eq!(
            fe.acked(
                Request::SetProtocolFeatures,
                &U64Payload(without).encode(),
                &[]
            ),
            0
        );
        let (_, payload, fds) = fe.get_inflight(1, 128, true);
        assert_eq!((U64Payload::decode(&payload).unwrap().0, fds.len()), (1, 0));
        let memfd = sealed_memfd("fe-inflight", &[0u8; 4096]);
        let description = InflightDescription {
            mmap_size: 2112,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 128,
        };
        assert_ne!(fe.set_inflight(&description, &memfd), 0);
        drop(fe);
        backend.join().unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    /// The restart case: a fresh backend gets SET_INFLIGHT_FD with no GET before it, on a region
    /// a killed backend left with head 0 inflight, and SET_VRING_BASE 0 (the used idx, as QEMU
    /// sends after a crash) while the avail ring already says 1. The request runs once: resubmitted
    /// from the region, not popped again.
    #[test]
    fn a_restarted_backend_resubmits_what_the_region_records() {
        let path = disk_image(64);
        let (fe, backend) = spawn(&path, false);
        handshake(&fe);
        let ram_size = 0x20_0000;
        let (mem, ram) = guest_memory(ram_size);
        let g = mem.guest().clone();
        let mut ring = TestRing::new(128, 0x1000);
        g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 3), GuestAddress(0x10000))
            .unwrap();
        g.write_slice(&[0x3c; 512], GuestAddress(0x11000)).unwrap();
        let head = ring.add_chain(
            &g,
            &[
                (0x10000, 16, false),
                (0x11000, 512, false),
                (0x12000, 1, true),
            ],
        );
        assert_eq!(head, 0);
        // The dead backend's record: version 1, desc_num 128, used_idx 0, desc 0 inflight.
        let mut bytes = vec![0u8; 4096];
        bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
        bytes[10..12].copy_from_slice(&128u16.to_le_bytes());
        bytes[16] = 1;
        bytes[24..32].copy_from_slice(&5u64.to_le_bytes());
        let region = sealed_memfd("fe-inflight", &bytes);
        let description = InflightDescription {
            mmap_size: 4096,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 128,
        };
        assert_eq!(fe.set_inflight(&description, &region), 0);
        let (kick, call) = start_queue(&fe, &ram, ram_size, &ring);
        wait_call(&call);
        assert_eq!(ring.used_idx(&g), 1);
        assert_eq!(ring.used_elem(&g, 0), (0, 1));
        kick.write(1).unwrap();
        assert!(
            !wait_readable(&call, Duration::from_millis(100)),
            "ran twice"
        );
        assert_eq!(ring.used_idx(&g), 1);
        assert_eq!(g.read_obj::<u8>(GuestAddress(0x12000)).unwrap(), 0);
        assert_eq!(
            &std::fs::read(&path).unwrap()[3 * 512..4 * 512],
            &[0x3c; 512]
        );
        // GET_VRING_BASE reports where popping resumes: past the resubmitted request.
        fe.send(
            Request::GetVringBase,
            &VringState { index: 0, num: 0 }.encode(),
            &[],
            false,
        );
        let base = VringState::decode(&fe.recv_reply(Request::GetVringBase)).unwrap();
        assert_eq!(base.num, 1);
        drop(fe);
        backend.join().unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    /// QEMU sizes the inflight region by its queue-size property (128 by default) while a
    /// virtio-mmio driver may set up a larger ring. Such a ring is served, untracked (with a
    /// warning): refusing it would hang the guest, and writing past the region is out of bounds.
    #[test]
    fn a_ring_larger_than_the_inflight_region_is_served_untracked() {
        let path = disk_image(64);
        let (fe, backend) = spawn(&path, false);
        handshake(&fe);
        let ram_size = 0x20_0000;
        let (mem, ram) = guest_memory(ram_size);
        let g = mem.guest().clone();
        let mut ring = TestRing::new(128, 0x1000);
        g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 2), GuestAddress(0x10000))
            .unwrap();
        g.write_slice(&[0x5e; 512], GuestAddress(0x11000)).unwrap();
        ring.add_chain(
            &g,
            &[
                (0x10000, 16, false),
                (0x11000, 512, false),
                (0x12000, 1, true),
            ],
        );
        // A fresh region of 16 entries per queue, for a ring of 128.
        let bytes = vec![0u8; 4096];
        let region = sealed_memfd("fe-small-inflight", &bytes);
        let description = InflightDescription {
            mmap_size: 4096,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 16,
        };
        assert_eq!(fe.set_inflight(&description, &region), 0);
        let (_kick, call) = start_queue(&fe, &ram, ram_size, &ring);
        wait_call(&call);
        assert_eq!(ring.used_idx(&g), 1);
        assert_eq!(
            &std::fs::read(&path).unwrap()[2 * 512..3 * 512],
            &[0x5e; 512]
        );
        // Not a byte of the region was written (no entry can be recorded for this ring).
        let mut now = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&region, &mut now, 0).unwrap();
        assert!(now.iter().all(|&b| b == 0), "the region was written");
        drop(fe);
        backend.join().unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn fake_frontend_writes_and_reads_through_the_protocol() {
        let path = disk_image(64);
        let (fe, backend) = spawn(&path, false);
        handshake(&fe);

        let config = fe.recv_config(0, CONFIG_SPACE_SIZE as u32);
        assert_eq!(&config[0..8], &64u64.to_le_bytes(), "capacity in sectors");

        let ram_size = 0x20_0000;
        let (mem, ram) = guest_memory(ram_size);
        let g = mem.guest().clone();
        let mut ring = TestRing::new(128, 0x1000);
        let (kick, call) = start_queue(&fe, &ram, ram_size, &ring);

        // Write 1 KiB at sector 2.
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 253) as u8).collect();
        g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 2), GuestAddress(0x10000))
            .unwrap();
        g.write_slice(&pattern, GuestAddress(0x11000)).unwrap();
        ring.add_chain(
            &g,
            &[
                (0x10000, 16, false),
                (0x11000, 1024, false),
                (0x12000, 1, true),
            ],
        );
        kick.write(1).unwrap();
        wait_call(&call);
        assert_eq!(ring.used_idx(&g), 1);
        assert_eq!(
            g.read_obj::<u8>(GuestAddress(0x12000)).unwrap(),
            0,
            "status OK"
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(
            &on_disk[1024..2048],
            &pattern[..],
            "the file holds the written bytes"
        );

        // Read it back into other buffers.
        g.write_slice(&request_header(VIRTIO_BLK_T_IN, 2), GuestAddress(0x13000))
            .unwrap();
        ring.add_chain(
            &g,
            &[
                (0x13000, 16, false),
                (0x14000, 1024, true),
                (0x15000, 1, true),
            ],
        );
        kick.write(1).unwrap();
        wait_call(&call);
        let mut read_back = vec![0u8; 1024];
        g.read_slice(&mut read_back, GuestAddress(0x14000)).unwrap();
        assert_eq!(read_back, pattern);
        assert_eq!(ring.used_elem(&g, 1).1, 1025);

        // GET_VRING_BASE stops the ring and says where.
        fe.send(
            Request::GetVringBase,
            &VringState { index: 0, num: 0 }.encode(),
            &[],
            false,
        );
        let base = VringState::decode(&fe.recv_reply(Request::GetVringBase)).unwrap();
        assert_eq!(base, VringState { index: 0, num: 2 });

        // A stopped ring serves nothing until it gets a (new) kick fd; then it resumes.
        g.write_slice(&request_header(VIRTIO_BLK_T_IN, 0), GuestAddress(0x16000))
            .unwrap();
        ring.add_chain(
            &g,
            &[
                (0x16000, 16, false),
                (0x17000, 512, true),
                (0x18000, 1, true),
            ],
        );
        kick.write(1).unwrap();
        assert!(
            !wait_readable(&call, Duration::from_millis(100)),
            "stopped ring must not run"
        );
        assert_eq!(fe.vring(Request::SetVringBase, 0, 2), 0);
        let new_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        assert_eq!(fe.vring_fd(Request::SetVringKick, 0, &new_kick), 0);
        wait_call(&call);
        assert_eq!(ring.used_idx(&g), 3);

        // The kick fd replaced while the ring runs: the old one no longer wakes the ring.
        let third_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        assert_eq!(fe.vring_fd(Request::SetVringKick, 0, &third_kick), 0);
        // A (re)started ring looks at the avail ring once on its own thread; let that pass so
        // only a kick can make it look again.
        std::thread::sleep(Duration::from_millis(50));
        ring.add_chain(
            &g,
            &[
                (0x16000, 16, false),
                (0x17000, 512, true),
                (0x18000, 1, true),
            ],
        );
        new_kick.write(1).unwrap();
        assert!(
            !wait_readable(&call, Duration::from_millis(100)),
            "old kick fd still served"
        );
        third_kick.write(1).unwrap();
        wait_call(&call);
        assert_eq!(ring.used_idx(&g), 4);

        drop(fe);
        backend
            .join()
            .unwrap()
            .expect("a hang-up ends the session with Ok");
        std::fs::remove_file(&path).unwrap();
    }

    impl FakeFrontend {
        fn recv_config(&self, offset: u32, size: u32) -> Vec<u8> {
            self.send(
                Request::GetConfig,
                &ConfigSpace::request(offset, size).unwrap().encode(),
                &[],
                false,
            );
            let reply = self.recv_reply(Request::GetConfig);
            if reply.is_empty() {
                return reply;
            }
            let space = ConfigSpace::decode(&reply).unwrap();
            assert_eq!((space.offset, space.size()), (offset, size));
            space.payload
        }
    }

    #[test]
    fn bad_messages_get_failure_acks_and_the_session_goes_on() {
        let path = disk_image(8);
        let (fe, backend) = spawn(&path, false);
        handshake(&fe);

        // Unknown request code with NEED_REPLY.
        let header = Header {
            request: 99,
            flags: VERSION | FLAG_NEED_REPLY,
            size: 0,
        };
        send_message(&fe.stream, &header, &[], &[]).unwrap();
        let (reply, payload, _) = recv_message(&fe.stream).unwrap();
        assert_eq!(
            (reply.request, U64Payload::decode(&payload).unwrap().0),
            (99, 1)
        );

        assert_ne!(
            fe.vring(Request::SetVringNum, 7, 128),
            0,
            "queue index out of range"
        );
        assert_ne!(
            fe.vring(Request::SetVringNum, 0, 100),
            0,
            "not a power of two"
        );
        assert_ne!(
            fe.vring(Request::SetVringNum, 0, 256),
            0,
            "beyond queue_size"
        );
        assert_ne!(
            fe.vring(Request::SetVringBase, 0, 70000),
            0,
            "base beyond u16"
        );
        assert_ne!(
            fe.acked(
                Request::SetProtocolFeatures,
                &U64Payload(1 << 20).encode(),
                &[]
            ),
            0,
            "GET_VRING_BASE_INFLIGHT was not offered"
        );
        assert_ne!(
            fe.acked(Request::SetFeatures, &U64Payload(1 << 34).encode(), &[]),
            0
        );
        // A kick "eventfd" that is a plain file.
        let not_an_eventfd = crate::blk::test_util::memfd("kick", 8);
        assert_ne!(fe.vring_fd(Request::SetVringKick, 0, &not_an_eventfd), 0);
        // A memory region larger than its fd.
        let ram = crate::blk::test_util::memfd("ram", 0x1000);
        let table = MemoryTable {
            regions: vec![MemoryRegion {
                guest_phys_addr: 0,
                memory_size: 0x10_0000,
                userspace_addr: FRONTEND_VA,
                mmap_offset: 0,
            }],
        };
        assert_ne!(
            fe.acked(Request::SetMemTable, &table.encode(), &[ram.as_fd()]),
            0
        );
        // Wrong fd count for the table (decode error, framing intact).
        assert_ne!(fe.acked(Request::SetMemTable, &table.encode(), &[]), 0);
        // Messages this backend does not do.
        assert_ne!(
            fe.acked(Request::SetStatus, &U64Payload(0xf).encode(), &[]),
            0
        );
        // GET_CONFIG outside the space: an empty reply; inside: the bytes.
        assert!(fe.recv_config(90, 10).is_empty());
        assert_eq!(fe.recv_config(34, 2), 2u16.to_le_bytes());
        // SET_CONFIG without NEED_REPLY is refused quietly; the session goes on.
        fe.send(
            Request::SetConfig,
            &ConfigSpace {
                offset: 0,
                flags: 0,
                payload: vec![1],
            }
            .encode(),
            &[],
            false,
        );
        assert_eq!(fe.get_u64(Request::GetQueueNum), 2);

        // Without NEED_REPLY, a bad message ends the session.
        fe.send(
            Request::SetVringNum,
            &VringState { index: 9, num: 128 }.encode(),
            &[],
            false,
        );
        assert!(matches!(
            recv_message(&fe.stream),
            Err(WireError::PeerGone(_))
        ));
        assert!(matches!(
            backend.join().unwrap(),
            Err(BlkError::Protocol(_))
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn readonly_backend_offers_the_ro_bit() {
        let path = disk_image(8);
        let (fe, backend) = spawn(&path, true);
        assert!(has(fe.get_u64(Request::GetFeatures), VIRTIO_BLK_F_RO));
        drop(fe);
        backend.join().unwrap().unwrap();
        let (fe, backend) = spawn(&path, false);
        assert!(!has(fe.get_u64(Request::GetFeatures), VIRTIO_BLK_F_RO));
        drop(fe);
        backend.join().unwrap().unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn open_refuses_bad_configurations() {
        let path = disk_image(8);
        let cfg = |num_queues, queue_size| BlkBackendConfig {
            path: path.clone(),
            readonly: false,
            num_queues,
            queue_size,
        };
        assert!(matches!(
            BlkBackend::open(cfg(0, 128)),
            Err(BlkError::InvalidConfig(_))
        ));
        assert!(matches!(
            BlkBackend::open(cfg(65, 128)),
            Err(BlkError::InvalidConfig(_))
        ));
        assert!(matches!(
            BlkBackend::open(cfg(1, 100)),
            Err(BlkError::InvalidConfig(_))
        ));
        assert!(BlkBackend::open(cfg(1, 128)).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            BlkBackend::open(cfg(1, 128)),
            Err(BlkError::OpenDisk { .. })
        ));
    }

    /// A listener with a short handshake timeout on its own thread (left behind at the end).
    fn listener(timeout: Duration) -> (PathBuf, PathBuf) {
        let path = disk_image(8);
        let socket = temp_path("blk.sock");
        let backend = BlkBackend::open(BlkBackendConfig {
            path: path.clone(),
            readonly: false,
            num_queues: 1,
            queue_size: 128,
        })
        .unwrap()
        .with_handshake_timeout(timeout);
        let socket_for_thread = socket.clone();
        thread::spawn(move || backend.listen_on(&socket_for_thread));
        (path, socket)
    }

    fn connect(socket: &Path) -> UnixStream {
        (0..500)
            .find_map(|_| {
                UnixStream::connect(socket)
                    .map_err(|_| thread::sleep(Duration::from_millis(10)))
                    .ok()
            })
            .expect("listener up")
    }

    /// Waits (bounded, failing loudly) until the backend closes `stream`.
    fn assert_dropped(stream: &UnixStream) {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut byte = [0u8; 1];
        match io::Read::read(&mut &*stream, &mut byte) {
            Ok(0) => {}
            other => panic!("the backend did not drop the client: {other:?}"),
        }
    }

    #[test]
    fn a_silent_or_trickling_client_is_dropped_and_the_next_one_served() {
        let (path, socket) = listener(Duration::from_millis(300));
        let silent = connect(&socket);
        assert_dropped(&silent);
        // Half a header, then nothing: the deadline covers the whole message.
        let trickling = connect(&socket);
        io::Write::write_all(&mut &trickling, &[1, 0, 0]).unwrap();
        assert_dropped(&trickling);
        let fe = FakeFrontend {
            stream: connect(&socket),
        };
        assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&socket).unwrap();
    }

    #[test]
    fn after_set_owner_an_idle_frontend_keeps_the_backend() {
        let (path, socket) = listener(Duration::from_millis(100));
        let fe = FakeFrontend {
            stream: connect(&socket),
        };
        assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
        fe.send(Request::SetOwner, &[], &[], false);
        // Idle for longer than the handshake timeout (no pass/fail on time: it must still
        // be served afterwards).
        thread::sleep(Duration::from_millis(300));
        assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&socket).unwrap();
    }

    #[test]
    fn listener_serves_one_frontend_after_another() {
        let path = disk_image(8);
        let socket = temp_path("blk.sock");
        let cfg = BlkBackendConfig {
            path: path.clone(),
            readonly: false,
            num_queues: 1,
            queue_size: 128,
        };
        let socket_for_thread = socket.clone();
        // The listener runs for ever; the thread is left behind when the test ends.
        thread::spawn(move || BlkBackend::listen(cfg, &socket_for_thread));
        for _ in 0..2 {
            let stream = (0..500)
                .find_map(|_| {
                    UnixStream::connect(&socket)
                        .map_err(|_| thread::sleep(Duration::from_millis(10)))
                        .ok()
                })
                .expect("listener up");
            let fe = FakeFrontend { stream };
            assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
        }
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&socket).unwrap();
    }
}
