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
//! The device's life is the explicit [`BackendState`]; what the driver set up lives apart from
//! it in the replay record (`link`), so a backend that goes away leaves the device
//! `Disconnected` with everything it needs to come back (`reconnect`): the guest sees nothing
//! but a pause. One that breaks the protocol leaves it `Broken`, one that comes back as a
//! different device leaves it `Refused`; either way the guest sees DEVICE_NEEDS_RESET, never a
//! VMM crash.
//!
//! - `handshake`: the re-runnable handshake and the backend's [`handshake::Identity`];
//! - `link`: the connection, its state and the replay record; start and stop in QEMU's order,
//!   with the inflight buffer (GET/SET_INFLIGHT_FD) when the backend offers INFLIGHT_SHMFD;
//! - `reconnect`: [`Connector`], [`ReconnectPolicy`] and the event loop's [`ReconnectHandle`].

mod handshake;
mod link;
mod memory_table;
mod reconnect;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info};
use vhost_frontend::connection::{FrontendError, VhostUserFrontend};
use vhost_frontend::features::{
    self, PROTOCOL_CONFIG, PROTOCOL_INFLIGHT_SHMFD, PROTOCOL_MQ, PROTOCOL_REPLY_ACK,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use vhost_frontend::wire::VringAddr;
use vmm_sys_util::eventfd::EventFd;

use handshake::{handshake, Identity};
use link::{DriverSetup, Link, RecordedQueue, ReplayRecord, RingBase};
pub use memory_table::{GuestRegion, MemoryTable, MemoryTableError, MAX_MEMORY_REGIONS};
pub use reconnect::{Attempt, Connector, ReconnectHandle, ReconnectPolicy};

use super::device::{DeviceError, QueueConfig, VirtioDevice, MAX_QUEUE_SIZE};
use super::error_chain;

/// Protocol features we use when the backend offers them.
/// MQ: the backend says how many queues it serves. REPLY_ACK: every set_* is confirmed, so a
/// refused SET_MEM_TABLE or SET_VRING_ADDR fails at activation, not silently later.
/// CONFIG: GET_CONFIG, the only way to learn the device's configuration space.
/// INFLIGHT_SHMFD: the backend records in-flight requests in a buffer we keep, so one that is
/// killed and restarted resubmits them (GET/SET_INFLIGHT_FD).
const WANTED_PROTOCOL_FEATURES: u64 = features::bit_mask(PROTOCOL_MQ)
    | features::bit_mask(PROTOCOL_REPLY_ACK)
    | features::bit_mask(PROTOCOL_CONFIG)
    | features::bit_mask(PROTOCOL_INFLIGHT_SHMFD);

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
    /// The backend went away during `during`. The replay record is kept; reconnect leaves
    /// this state.
    Disconnected { during: &'static str },
    /// The backend broke the protocol during `during`; we no longer talk to it.
    Broken { during: &'static str },
    /// A backend came back as a different device (or its replay failed): not used again.
    Refused { reason: String },
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
    #[error("cannot keep a handle on the {what} eventfd: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
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

/// What the device and the event loop's [`ReconnectHandle`] share.
struct Shared {
    /// For logs: `blk0`, ...
    name: String,
    kind: DeviceKind,
    options: VhostUserDeviceOptions,
    /// What the first backend showed; a returning one must show the same.
    identity: Identity,
    link: Mutex<Link>,
    /// Taken only to open a new connection, never together with `link` held (connecting may
    /// take a while; `link` is what vCPU threads wait on).
    connector: reconnect::SharedConnector,
    policy: ReconnectPolicy,
}

/// A virtio-mmio device served by a vhost-user backend.
pub struct VhostUserDevice {
    shared: Arc<Shared>,
}

impl VhostUserDevice {
    /// Performs the handshake with the backend behind `frontend`. Without
    /// [`VhostUserDevice::with_reconnect`] a backend that goes away leaves the device
    /// disconnected for good.
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
        let identity = handshake(frontend.as_mut(), &kind, &options, WANTED_PROTOCOL_FEATURES)?;
        info!(
            device_type = kind.device_type,
            features = %features::describe_device_features(Some(kind.device_type), identity.backend_features),
            protocol = %features::describe_protocol_features(identity.protocol_features),
            queues = options.num_queues,
            "vhost-user device: backend negotiated"
        );
        frontend.set_sequence_deadline(None);
        let link = Link {
            frontend,
            generation: 0,
            state: BackendState::Negotiated,
            record: ReplayRecord::default(),
            memory,
            outage: None,
        };
        Ok(VhostUserDevice {
            shared: Arc::new(Shared {
                name: format!("vhost-user device {}", kind.device_type),
                kind,
                options,
                identity,
                link: Mutex::new(link),
                connector: Mutex::new(None),
                policy: ReconnectPolicy::Off,
            }),
        })
    }

    /// Lets the device come back from a backend that went away: `connector` opens new
    /// connections, `policy` says when to try; the caller's event loop drives the attempts
    /// through [`VhostUserDevice::reconnect_handle`]. `name` names the device in logs.
    ///
    /// # Panics
    /// If a [`ReconnectHandle`] was taken before: it would never see the connector.
    pub fn with_reconnect(
        mut self,
        name: impl Into<String>,
        connector: Box<dyn Connector>,
        policy: ReconnectPolicy,
    ) -> Self {
        // A handle taken before this would keep a link that never reconnects: a caller's bug,
        // and one that must not pass silently.
        let shared = Arc::get_mut(&mut self.shared)
            .expect("VhostUserDevice::with_reconnect must come before reconnect_handle");
        shared.name = name.into();
        *shared
            .connector
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(connector);
        shared.policy = policy;
        self
    }

    /// For the event loop: what to watch, and how to bring the backend back.
    pub fn reconnect_handle(&self) -> ReconnectHandle {
        ReconnectHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Where the conversation with the backend stands.
    pub fn state(&self) -> BackendState {
        self.shared.lock().state.clone()
    }

    /// Protocol features in use with the backend.
    pub fn protocol_features(&self) -> u64 {
        self.shared.identity.protocol_features
    }

    /// Whether an inflight buffer is held (GET_INFLIGHT_FD answered with one).
    pub fn holds_inflight_buffer(&self) -> bool {
        self.shared.lock().record.inflight.is_some()
    }

    /// Features offered to the guest: VERSION_1, the split ring's INDIRECT_DESC and EVENT_IDX,
    /// and the device-specific bits we know, where the backend offers them. Never
    /// VHOST_USER_F_PROTOCOL_FEATURES (a vhost-user bit, not a virtio one), never PACKED (our
    /// inflight tracking and ring replay are for split rings). The ring bits change nothing
    /// here: the VMM never reads the rings, and the ring lengths it translates for the backend
    /// already include used_event and avail_event.
    fn offered_features(&self) -> u64 {
        let ring_features = features::bit_mask(VIRTIO_RING_F_INDIRECT_DESC)
            | features::bit_mask(VIRTIO_RING_F_EVENT_IDX);
        self.shared.identity.backend_features
            & (features::bit_mask(VIRTIO_F_VERSION_1)
                | ring_features
                | self.shared.kind.device_features)
    }

    /// Ring addresses for SET_VRING_ADDR: the driver's guest physical addresses translated to
    /// the VMM's virtual addresses, each part entirely inside one region.
    fn vring_addr(
        memory: &MemoryTable,
        queue: &QueueConfig,
    ) -> Result<VringAddr, VhostUserDeviceError> {
        let translate = |what: &str, addr: u64, len: u64| {
            memory
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

    /// Checks what the driver set up and keeps it, with our own handles on its eventfds.
    fn driver_setup(
        &self,
        memory: &MemoryTable,
        acked_features: u64,
        queues: &[QueueConfig],
        queue_kicks: &[EventFd],
        call_fd: &EventFd,
    ) -> Result<DriverSetup, VhostUserDeviceError> {
        let options = &self.shared.options;
        let mut recorded = Vec::new();
        for queue in queues.iter().filter(|q| q.ready) {
            let index = usize::from(queue.index);
            if index >= usize::from(options.num_queues) || index >= queue_kicks.len() {
                return Err(VhostUserDeviceError::BadQueue {
                    index: queue.index,
                    reason: "no such queue".into(),
                });
            }
            if queue.size == 0 || queue.size > options.queue_size || !queue.size.is_power_of_two() {
                return Err(VhostUserDeviceError::BadQueue {
                    index: queue.index,
                    reason: format!(
                        "size {} is not a power of two up to {}",
                        queue.size, options.queue_size
                    ),
                });
            }
            let addr = Self::vring_addr(memory, queue)?;
            let bad_ring = || VhostUserDeviceError::BadQueue {
                index: queue.index,
                reason: "ring address overflows".into(),
            };
            recorded.push(RecordedQueue {
                index: queue.index,
                size: queue.size,
                addr,
                avail_idx_gpa: queue.avail_ring.checked_add(2).ok_or_else(bad_ring)?,
                used_idx_gpa: queue.used_idx_addr().ok_or_else(bad_ring)?,
                kick: queue_kicks[index].try_clone().map_err(|source| {
                    VhostUserDeviceError::EventFd {
                        what: "kick",
                        source,
                    }
                })?,
            });
        }
        if recorded.is_empty() {
            return Err(VhostUserDeviceError::NoQueueReady);
        }
        Ok(DriverSetup {
            acked_features,
            queues: recorded,
            call: call_fd
                .try_clone()
                .map_err(|source| VhostUserDeviceError::EventFd {
                    what: "call",
                    source,
                })?,
        })
    }

    fn start(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
        queue_kicks: &[EventFd],
        call_fd: &EventFd,
    ) -> Result<(), VhostUserDeviceError> {
        let shared = Arc::clone(&self.shared);
        let mut link = shared.lock();
        match &link.state {
            BackendState::Negotiated | BackendState::Stopped { .. } => {}
            BackendState::Running { .. } => {
                return Err(VhostUserDeviceError::Unavailable("already running"))
            }
            BackendState::Disconnected { .. } if shared.policy == ReconnectPolicy::Off => {
                return Err(VhostUserDeviceError::Unavailable("disconnected"))
            }
            BackendState::Disconnected { .. } => {}
            BackendState::Broken { .. } => return Err(VhostUserDeviceError::Unavailable("broken")),
            BackendState::Refused { .. } => {
                return Err(VhostUserDeviceError::Unavailable("refused"))
            }
        }
        // Check everything the driver wrote before telling the backend anything, so a bad
        // queue leaves the backend untouched.
        let setup =
            self.driver_setup(&link.memory, acked_features, queues, queue_kicks, call_fd)?;
        if matches!(link.state, BackendState::Disconnected { .. }) {
            // The backend is away: what the driver set up waits in the record, and the
            // reconnect starts it. The driver sees a device that is slow to answer.
            info!(
                "{}: the driver started the device while its backend is away; the queues start when it is back",
                shared.name
            );
            link.record.driver = Some(setup);
            return Ok(());
        }
        let result = link.bring_up(
            shared.identity.protocol_features,
            &shared.options,
            &setup,
            RingBase::Zero,
        );
        let queue_list: Vec<u16> = setup.queues.iter().map(|q| q.index).collect();
        link.record.driver = Some(setup);
        match result {
            Ok(()) => {
                info!(
                    device_type = shared.kind.device_type,
                    queues = ?queue_list,
                    "vhost-user device: backend serves the queues"
                );
                Ok(())
            }
            // Gone mid-start, with reconnect on: the record holds the setup, the reconnect
            // replays it.
            Err(e)
                if matches!(link.state, BackendState::Disconnected { .. })
                    && shared.policy != ReconnectPolicy::Off =>
            {
                info!(
                    "{}: backend went away while the device started ({}); the queues start when it is back",
                    shared.name,
                    error_chain(&e)
                );
                Ok(())
            }
            Err(e) => {
                if !matches!(link.state, BackendState::Running { .. }) {
                    link.record.driver = None;
                }
                Err(e)
            }
        }
    }

    /// The driver reset the device: stop the rings the backend serves (if it is there to be
    /// told), and forget the record: the next start is fresh, with a fresh inflight buffer.
    fn stop(&mut self) -> Result<(), VhostUserDeviceError> {
        let mut link = self.shared.lock();
        let result = link.stop_rings();
        link.record = ReplayRecord::default();
        result
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.shared.kind.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let options = &self.shared.options;
        vec![options.queue_size; usize::from(options.num_queues)]
    }

    fn device_features(&self) -> u64 {
        self.offered_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let config = &self.shared.identity.config;
        if start >= config.len() {
            return;
        }
        let available = &config[start..];
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
        self.set_sequence_deadline(Some(Instant::now() + CONTROL_SEQUENCE_BUDGET));
        let result = self.start(acked_features, queues, queue_kicks, call);
        self.set_sequence_deadline(None);
        result.map_err(Into::into)
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.set_sequence_deadline(Some(Instant::now() + CONTROL_SEQUENCE_BUDGET));
        let result = self.stop();
        self.set_sequence_deadline(None);
        result.map_err(Into::into)
    }
}

impl VhostUserDevice {
    fn set_sequence_deadline(&self, deadline: Option<Instant>) {
        self.shared.lock().frontend.set_sequence_deadline(deadline);
    }
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
