//! A virtio device whose queues a vhost-user backend serves.
//!
//! The guest programs this device through the virtio-mmio transport like any other; what the
//! device does with it is talk vhost-user to a backend:
//!
//! - at creation, the handshake: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER,
//!   GET_QUEUE_NUM, GET_CONFIG (the configuration space the guest will read);
//! - at DRIVER_OK (`activate`), in QEMU's order: SET_FEATURES, SET_MEM_TABLE, then per queue
//!   SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_KICK, SET_VRING_CALL,
//!   SET_VRING_ENABLE. From then on the backend serves the rings directly: kicks arrive on the
//!   ioeventfds, interrupts leave through the irqfd, nothing passes through the VMM;
//! - at reset, per started queue SET_VRING_ENABLE(0) and GET_VRING_BASE (which stops the ring);
//!   the next start is fresh (ring base 0).
//!
//! The device's life is the explicit [`BackendState`]. A backend that goes away leaves the
//! device `Disconnected` (reconnect builds on that state); one that breaks the protocol leaves
//! it `Broken`. Either way the guest sees DEVICE_NEEDS_RESET, never a VMM crash.

mod memory_table;
#[cfg(test)]
mod tests;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use tracing::{debug, info};
use vhost_frontend::connection::{FrontendError, MemoryRegionFd, VhostUserFrontend};
use vhost_frontend::features::{
    self, PROTOCOL_CONFIG, PROTOCOL_MQ, PROTOCOL_REPLY_ACK, VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
};
use vhost_frontend::wire::{MemoryRegion, VringAddr};
use vmm_sys_util::eventfd::EventFd;

pub use memory_table::{GuestRegion, MemoryTable, MemoryTableError, MAX_MEMORY_REGIONS};

use super::device::{DeviceError, QueueConfig, VirtioDevice, MAX_QUEUE_SIZE};
use super::error_chain;

/// Protocol features we use when the backend offers them.
/// MQ: the backend says how many queues it serves. REPLY_ACK: every set_* is confirmed, so a
/// refused SET_MEM_TABLE or SET_VRING_ADDR fails at activation, not silently later.
/// CONFIG: GET_CONFIG, the only way to learn the device's configuration space.
const WANTED_PROTOCOL_FEATURES: u64 = features::bit_mask(PROTOCOL_MQ)
    | features::bit_mask(PROTOCOL_REPLY_ACK)
    | features::bit_mask(PROTOCOL_CONFIG);

/// What kind of virtio device the backend implements, as far as the frontend must know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceKind {
    /// virtio device id.
    pub device_type: u32,
    /// Device-specific feature bits (0-23) passed from the backend to the guest when offered.
    pub device_features: u64,
    /// Bytes of configuration space fetched with GET_CONFIG and shown to the guest.
    pub config_size: u32,
    /// Where the configuration space holds the queue count (patched to what we expose).
    pub num_queues_config_offset: Option<usize>,
    /// Where it holds seg_max (le32), clamped to what the ring we expose can carry.
    pub seg_max_config_offset: Option<usize>,
}

impl DeviceKind {
    /// virtio-blk (virtio spec §5.2).
    pub const BLOCK: DeviceKind = DeviceKind {
        device_type: 2,
        // SIZE_MAX(1) SEG_MAX(2) GEOMETRY(4) RO(5) BLK_SIZE(6) FLUSH(9) TOPOLOGY(10) MQ(12)
        // DISCARD(13) WRITE_ZEROES(14). Not CONFIG_WCE(11): the guest would write the config
        // space, which we do not forward (no SET_CONFIG yet).
        device_features: (1 << 1)
            | (1 << 2)
            | (1 << 4)
            | (1 << 5)
            | (1 << 6)
            | (1 << 9)
            | (1 << 10)
            | (1 << 12)
            | (1 << 13)
            | (1 << 14),
        // capacity .. write_zeroes_may_unmap and padding: everything those features describe.
        config_size: 60,
        num_queues_config_offset: Some(34),
        seg_max_config_offset: Some(12),
    };
}

/// The longest a whole control sequence may take: the start-up handshake, a device start at
/// DRIVER_OK (up to hundreds of messages) or a stop at reset. Each exchange also has its own
/// reply timeout; this bounds their sum, so a backend answering every message just in time
/// cannot hold a vCPU thread for long.
pub const CONTROL_SEQUENCE_BUDGET: Duration = Duration::from_secs(30);

/// Choices the VMM makes for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VhostUserDeviceOptions {
    /// Queues to expose (at most what the backend serves).
    pub num_queues: u16,
    /// Maximum size of each queue; vhost-user has no message for the backend's limit.
    pub queue_size: u16,
}

/// Where the conversation with the backend stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendState {
    /// Handshake done; queues not started (fresh device).
    Negotiated,
    /// DRIVER_OK happened: the backend serves these queues. Kept in full because a backend
    /// that comes back must be told all of it again.
    Running {
        acked_features: u64,
        queues: Vec<StartedQueue>,
    },
    /// The driver reset the device; the backend stopped the queues at these ring positions
    /// (`(queue, base)` from GET_VRING_BASE). The next start is fresh.
    Stopped { last_bases: Vec<(u16, u32)> },
    /// The backend went away during `during`. Reconnect leaves this state.
    Disconnected { during: &'static str },
    /// The backend broke the protocol during `during`; we no longer talk to it.
    Broken { during: &'static str },
}

/// A queue the backend was told to serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartedQueue {
    pub index: u16,
    pub size: u16,
    /// As sent in SET_VRING_ADDR (VMM virtual addresses).
    pub addr: VringAddr,
}

/// Why the device could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserDeviceError {
    // The frontend's error already names the message and what happened; `during` is for code.
    #[error("{source}")]
    BackendGone {
        during: &'static str,
        #[source]
        source: FrontendError,
    },
    #[error("{source}")]
    BackendBroken {
        during: &'static str,
        #[source]
        source: FrontendError,
    },
    /// The backend understood and refused (REPLY_ACK with a non-zero status): the connection
    /// is fine, the request was not.
    #[error("{source}")]
    BackendRefused {
        during: &'static str,
        #[source]
        source: FrontendError,
    },
    #[error("vhost-user backend does not offer {0}")]
    MissingFeature(&'static str),
    #[error("vhost-user backend answered GET_CONFIG with {got} bytes, asked for {asked}")]
    ConfigSize { asked: u32, got: usize },
    #[error("vhost-user backend serves {backend} queues; {wanted} were asked for")]
    TooFewQueues { backend: u64, wanted: u16 },
    #[error("invalid device options: {0}")]
    BadOptions(String),
    #[error("queue {index}: {reason}")]
    BadQueue { index: u16, reason: String },
    #[error("the backend is {0}; the device cannot start until it is back")]
    Unavailable(&'static str),
    #[error("the driver made no queue ready")]
    NoQueueReady,
}

impl From<VhostUserDeviceError> for DeviceError {
    fn from(err: VhostUserDeviceError) -> Self {
        match err {
            VhostUserDeviceError::BadQueue { index, reason } => {
                DeviceError::BadQueue { index, reason }
            }
            VhostUserDeviceError::NoQueueReady => DeviceError::NoQueueReady,
            other => DeviceError::Backend(Box::new(other)),
        }
    }
}

/// A virtio-mmio device served by a vhost-user backend.
pub struct VhostUserDevice {
    frontend: Box<dyn VhostUserFrontend + Send>,
    kind: DeviceKind,
    memory: MemoryTable,
    options: VhostUserDeviceOptions,
    /// Feature bits the backend offered (GET_FEATURES).
    backend_features: u64,
    /// Protocol features both sides use.
    protocol_features: u64,
    /// The configuration space as GET_CONFIG returned it (queue count patched).
    config: Vec<u8>,
    state: BackendState,
}

impl VhostUserDevice {
    /// Performs the handshake with the backend behind `frontend`.
    pub fn new(
        mut frontend: Box<dyn VhostUserFrontend + Send>,
        kind: DeviceKind,
        memory: MemoryTable,
        options: VhostUserDeviceOptions,
    ) -> Result<Self, VhostUserDeviceError> {
        if options.num_queues == 0
            || options.queue_size == 0
            || options.queue_size > MAX_QUEUE_SIZE
            || !options.queue_size.is_power_of_two()
        {
            return Err(VhostUserDeviceError::BadOptions(format!(
                "{} queues of size {}: need at least one queue, size a power of two up to {MAX_QUEUE_SIZE}",
                options.num_queues, options.queue_size
            )));
        }

        // Cleared before `Ok`; on an error the frontend is dropped with the device.
        frontend.set_sequence_deadline(Some(Instant::now() + CONTROL_SEQUENCE_BUDGET));
        // The shared handshake (vhost_frontend): GET_FEATURES (VERSION_1 and PROTOCOL_FEATURES
        // required), GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES (offered AND wanted: setting a
        // bit the backend did not offer makes some backends hang up), SET_OWNER, GET_QUEUE_NUM.
        let negotiated = call(
            frontend.negotiate(kind.device_features, WANTED_PROTOCOL_FEATURES),
            "the handshake",
        )?;
        let protocol_features = negotiated.protocol_features;
        if !features::has(protocol_features, PROTOCOL_CONFIG) {
            return Err(VhostUserDeviceError::MissingFeature(
                "protocol feature CONFIG in its GET_PROTOCOL_FEATURES reply (needed for GET_CONFIG)",
            ));
        }
        // Without MQ a backend serves one queue (the spec's default).
        let backend_queues = negotiated.queue_num.unwrap_or(1);
        if backend_queues < u64::from(options.num_queues) {
            return Err(VhostUserDeviceError::TooFewQueues {
                backend: backend_queues,
                wanted: options.num_queues,
            });
        }

        let mut config = call(frontend.get_config(0, kind.config_size), "GET_CONFIG")?;
        if config.len() != kind.config_size as usize {
            return Err(VhostUserDeviceError::ConfigSize {
                asked: kind.config_size,
                got: config.len(),
            });
        }
        // The guest must see the queue count we expose, not the backend's maximum.
        if let Some(offset) = kind.num_queues_config_offset {
            if let Some(field) = config.get_mut(offset..offset + 2) {
                field.copy_from_slice(&options.num_queues.to_le_bytes());
            }
        }
        // seg_max is the backend's promise for *its* largest ring; the guest gets ours, without
        // INDIRECT_DESC, so a request can have at most queue_size - 2 data segments (plus header
        // and status). A larger seg_max would have the driver build chains the ring cannot hold.
        if let Some(offset) = kind.seg_max_config_offset {
            if let Some(field) = config.get_mut(offset..offset + 4) {
                let limit = u32::from(options.queue_size.saturating_sub(2)).max(1);
                let offered = u32::from_le_bytes([field[0], field[1], field[2], field[3]]);
                if offered > limit {
                    debug!(
                        offered,
                        limit, "vhost-user device: seg_max clamped to the ring"
                    );
                    field.copy_from_slice(&limit.to_le_bytes());
                }
            }
        }

        info!(
            device_type = kind.device_type,
            features = %features::describe_device_features(Some(kind.device_type), negotiated.backend_features),
            protocol = %features::describe_protocol_features(protocol_features),
            queues = options.num_queues,
            "vhost-user device: backend negotiated"
        );
        frontend.set_sequence_deadline(None);
        Ok(VhostUserDevice {
            frontend,
            kind,
            memory,
            options,
            backend_features: negotiated.backend_features,
            protocol_features,
            config,
            state: BackendState::Negotiated,
        })
    }

    /// Where the conversation with the backend stands.
    pub fn state(&self) -> &BackendState {
        &self.state
    }

    /// Protocol features in use with the backend.
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    /// Features offered to the guest: VERSION_1 and the device-specific bits we know, where the
    /// backend offers them. Never VHOST_USER_F_PROTOCOL_FEATURES (a vhost-user bit, not a
    /// virtio one), never ring layout bits (EVENT_IDX, PACKED: kept simple on purpose).
    fn offered_features(&self) -> u64 {
        self.backend_features & (features::bit_mask(VIRTIO_F_VERSION_1) | self.kind.device_features)
    }

    /// Remembers how a conversation with the backend failed, and turns it into our error.
    /// A refusal leaves the connection usable; anything else ends it.
    fn failed(&mut self, during: &'static str, source: FrontendError) -> VhostUserDeviceError {
        let err = classify(during, source);
        match err {
            VhostUserDeviceError::BackendGone { .. } => {
                self.state = BackendState::Disconnected { during };
                debug!(error = %error_chain(&err), "vhost-user device: backend went away");
            }
            VhostUserDeviceError::BackendRefused { .. } => {
                debug!(error = %error_chain(&err), "vhost-user device: backend refused a request");
            }
            _ => {
                self.state = BackendState::Broken { during };
                debug!(error = %error_chain(&err), "vhost-user device: backend unusable");
            }
        }
        err
    }

    /// Ring addresses for SET_VRING_ADDR: the driver's guest physical addresses translated to
    /// the VMM's virtual addresses, each part entirely inside one region.
    fn vring_addr(&self, queue: &QueueConfig) -> Result<VringAddr, VhostUserDeviceError> {
        let translate = |what: &str, addr: u64, len: u64| {
            self.memory
                .translate(addr, len)
                .ok_or_else(|| VhostUserDeviceError::BadQueue {
                    index: queue.index,
                    reason: format!(
                        "{what} at {addr:#x} (+{len:#x}) is not inside one guest RAM region"
                    ),
                })
        };
        Ok(VringAddr {
            index: u32::from(queue.index),
            flags: 0,
            desc_user_addr: translate(
                "descriptor table",
                queue.desc_table,
                queue.desc_table_len(),
            )?,
            used_user_addr: translate("used ring", queue.used_ring, queue.used_ring_len())?,
            avail_user_addr: translate("avail ring", queue.avail_ring, queue.avail_ring_len())?,
            log_guest_addr: 0,
        })
    }

    fn start(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
        queue_kicks: &[EventFd],
        call_fd: &EventFd,
    ) -> Result<(), VhostUserDeviceError> {
        match &self.state {
            BackendState::Negotiated | BackendState::Stopped { .. } => {}
            BackendState::Running { .. } => {
                return Err(VhostUserDeviceError::Unavailable("already running"))
            }
            BackendState::Disconnected { .. } => {
                return Err(VhostUserDeviceError::Unavailable("disconnected"))
            }
            BackendState::Broken { .. } => return Err(VhostUserDeviceError::Unavailable("broken")),
        }
        // Check everything the driver wrote before telling the backend anything, so a bad
        // queue leaves the backend untouched.
        let mut to_start = Vec::new();
        for queue in queues.iter().filter(|q| q.ready) {
            let index = usize::from(queue.index);
            if index >= usize::from(self.options.num_queues) || index >= queue_kicks.len() {
                return Err(VhostUserDeviceError::BadQueue {
                    index: queue.index,
                    reason: "no such queue".into(),
                });
            }
            if queue.size == 0
                || queue.size > self.options.queue_size
                || !queue.size.is_power_of_two()
            {
                return Err(VhostUserDeviceError::BadQueue {
                    index: queue.index,
                    reason: format!(
                        "size {} is not a power of two up to {}",
                        queue.size, self.options.queue_size
                    ),
                });
            }
            to_start.push((*queue, self.vring_addr(queue)?));
        }
        if to_start.is_empty() {
            return Err(VhostUserDeviceError::NoQueueReady);
        }

        // The backend must know the features first: they decide the ring layout it expects.
        let features = acked_features | features::bit_mask(VHOST_USER_F_PROTOCOL_FEATURES);
        if let Err(err) = self.frontend.set_features(features) {
            return Err(self.failed("SET_FEATURES", err));
        }
        let regions: Vec<MemoryRegionFd> = self
            .memory
            .regions()
            .iter()
            .map(|region| MemoryRegionFd {
                region: MemoryRegion {
                    guest_phys_addr: region.guest_phys_addr,
                    memory_size: region.size,
                    userspace_addr: region.userspace_addr,
                    mmap_offset: region.mmap_offset,
                },
                fd: region.file.as_fd(),
            })
            .collect();
        if let Err(err) = self.frontend.set_mem_table(&regions) {
            return Err(self.failed("SET_MEM_TABLE", err));
        }
        drop(regions);

        let mut started = Vec::new();
        for (queue, addr) in to_start {
            let kick = borrow_eventfd(&queue_kicks[usize::from(queue.index)]);
            let result = start_queue(
                self.frontend.as_mut(),
                &queue,
                &addr,
                kick,
                borrow_eventfd(call_fd),
            );
            if let Err((during, err)) = result {
                let err = self.failed(during, err);
                if matches!(err, VhostUserDeviceError::BackendRefused { .. }) {
                    // Like QEMU: stop what already runs (this queue may be half set up), so
                    // the backend holds no live ring of a device that failed to start.
                    started.push(StartedQueue {
                        index: queue.index,
                        size: queue.size,
                        addr,
                    });
                    self.state = BackendState::Running {
                        acked_features,
                        queues: started,
                    };
                    // Its own failure is logged and recorded in the state.
                    let _ = self.stop();
                }
                return Err(err);
            }
            debug!(
                queue = queue.index,
                size = queue.size,
                "vhost-user device: queue started"
            );
            started.push(StartedQueue {
                index: queue.index,
                size: queue.size,
                addr,
            });
        }
        info!(
            device_type = self.kind.device_type,
            queues = ?started.iter().map(|q| q.index).collect::<Vec<_>>(),
            "vhost-user device: backend serves the queues"
        );
        self.state = BackendState::Running {
            acked_features,
            queues: started,
        };
        Ok(())
    }

    /// A failure while stopping rings. Unlike elsewhere, a refusal does not leave the
    /// connection usable: a backend that will not stop a ring may go on using guest memory the
    /// driver is about to reuse, so we stop talking to it.
    fn stop_failed(&mut self, during: &'static str, source: FrontendError) -> VhostUserDeviceError {
        let err = self.failed(during, source);
        if matches!(self.state, BackendState::Running { .. }) {
            self.state = BackendState::Broken { during };
        }
        err
    }

    fn stop(&mut self) -> Result<(), VhostUserDeviceError> {
        let started: Vec<u16> = match &self.state {
            BackendState::Running { queues, .. } => queues.iter().map(|q| q.index).collect(),
            // Nothing started (or nobody to tell): nothing to stop.
            _ => return Ok(()),
        };
        let mut last_bases = Vec::new();
        for queue in started {
            let index = u32::from(queue);
            // QEMU's order: stop fetching new requests first, then GET_VRING_BASE, which the
            // backend answers once the ring is stopped, with where it stopped.
            if let Err(err) = self.frontend.set_vring_enable(index, false) {
                return Err(self.stop_failed("SET_VRING_ENABLE", err));
            }
            match self.frontend.get_vring_base(index) {
                // A split ring's position is a 16-bit index; anything larger is not one, and
                // must never be handed back in SET_VRING_BASE when the ring restarts.
                Ok(base) if base <= u32::from(u16::MAX) => last_bases.push((queue, base)),
                Ok(base) => {
                    let err = FrontendError::Protocol {
                        message: "GET_VRING_BASE",
                        detail: format!("queue {queue}: base {base:#x} is not a 16-bit ring index"),
                    };
                    return Err(self.stop_failed("GET_VRING_BASE", err));
                }
                Err(err) => return Err(self.stop_failed("GET_VRING_BASE", err)),
            }
        }
        debug!(?last_bases, "vhost-user device: queues stopped");
        self.state = BackendState::Stopped { last_bases };
        Ok(())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.options.queue_size; usize::from(self.options.num_queues)]
    }

    fn device_features(&self) -> u64 {
        self.offered_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= self.config.len() {
            return;
        }
        let available = &self.config[start..];
        let len = data.len().min(available.len());
        data[..len].copy_from_slice(&available[..len]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // No feature we offer makes the config space writable.
        debug!(
            offset,
            len = data.len(),
            "vhost-user device: config space write ignored"
        );
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
        queue_kicks: &[EventFd],
        call: &EventFd,
    ) -> Result<(), DeviceError> {
        self.frontend
            .set_sequence_deadline(Some(Instant::now() + CONTROL_SEQUENCE_BUDGET));
        let result = self.start(acked_features, queues, queue_kicks, call);
        self.frontend.set_sequence_deadline(None);
        result.map_err(Into::into)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.frontend
            .set_sequence_deadline(Some(Instant::now() + CONTROL_SEQUENCE_BUDGET));
        let result = self.stop();
        self.frontend.set_sequence_deadline(None);
        result.map_err(Into::into)
    }
}

/// `vmm_sys_util`'s EventFd predates `AsFd`; borrow its descriptor by hand.
fn borrow_eventfd(eventfd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd keeps its descriptor open for as long as it lives, and the borrow
    // cannot outlive the EventFd.
    unsafe { BorrowedFd::borrow_raw(eventfd.as_raw_fd()) }
}

/// The SET_VRING_* series for one queue; on failure, which message failed.
fn start_queue(
    frontend: &mut dyn VhostUserFrontend,
    queue: &QueueConfig,
    addr: &VringAddr,
    kick: BorrowedFd<'_>,
    call: BorrowedFd<'_>,
) -> Result<(), (&'static str, FrontendError)> {
    let index = u32::from(queue.index);
    let during = |message: &'static str| move |err| (message, err);
    frontend
        .set_vring_num(index, u32::from(queue.size))
        .map_err(during("SET_VRING_NUM"))?;
    // Base 0: a fresh ring; the driver starts its indices at 0.
    frontend
        .set_vring_base(index, 0)
        .map_err(during("SET_VRING_BASE"))?;
    frontend
        .set_vring_addr(addr)
        .map_err(during("SET_VRING_ADDR"))?;
    frontend
        .set_vring_kick(index, kick)
        .map_err(during("SET_VRING_KICK"))?;
    frontend
        .set_vring_call(index, call)
        .map_err(during("SET_VRING_CALL"))?;
    // With PROTOCOL_FEATURES negotiated a ring starts disabled until enabled explicitly.
    frontend
        .set_vring_enable(index, true)
        .map_err(during("SET_VRING_ENABLE"))?;
    Ok(())
}

/// Names the message in a failed handshake step.
fn call<T>(
    result: Result<T, FrontendError>,
    during: &'static str,
) -> Result<T, VhostUserDeviceError> {
    result.map_err(|source| classify(during, source))
}

/// Peer gone (a reconnect may help), peer said no (the request was wrong), or peer wrong
/// (a reply we cannot trust: the connection is over). Every variant is decided here, so a new
/// one cannot fall into a class by accident.
fn classify(during: &'static str, source: FrontendError) -> VhostUserDeviceError {
    match source {
        // The socket closed or never connected: nobody is there to answer.
        FrontendError::PeerGone { .. } | FrontendError::Connect { .. } => {
            VhostUserDeviceError::BackendGone { during, source }
        }
        FrontendError::BackendFailed { .. } => {
            VhostUserDeviceError::BackendRefused { during, source }
        }
        FrontendError::MissingFeature { feature } => VhostUserDeviceError::MissingFeature(feature),
        // A reply that breaks the protocol, silence past the deadline, a socket error other
        // than hang-up, or a request we could not even form: this connection is not trusted.
        FrontendError::Protocol { .. }
        | FrontendError::TimedOut { .. }
        | FrontendError::Io(..)
        | FrontendError::InvalidRequest { .. } => {
            VhostUserDeviceError::BackendBroken { during, source }
        }
    }
}
