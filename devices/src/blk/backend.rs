//! The vhost-user-blk backend: a raw disk image as a virtio-blk device, served by the protocol
//! server (`crate::vhost_user_server`), which owns everything that is vhost-user and not blk.
//!
//! ```text
//!  vmm blk-backend ─► BlkBackend::listen_on ─► vhost_user_server::listen_on ─┐
//!  vmm run --blk path=  ─► BlkBackend::spawn_in_process ─► (thread) serve ───┤
//!                                                                            ▼
//!                      vhost_user_server::serve(&BlkBackend, ...) ── VhostUserDevice for BlkBackend:
//!                        GET_FEATURES ─────────────────► offered_virtio_features (+ INDIRECT_DESC)
//!                        GET_CONFIG / SET_CONFIG ──────► BlkConfig::read_window / read-only
//!                        a ring complete and enabled ──► QueueWorker::start (queue_worker: the
//!                                                        data path, disk I/O, inflight tracking)
//! ```
//!
//! What this file decides: the configuration (queues, ring limit, read-only), the config space
//! and feature bits, whether INFLIGHT_SHMFD is offered (`with_inflight`), and the test option
//! `with_completion_delay` each queue worker gets. The session, its NEED_REPLY policy and every
//! check on what the frontend sends are the server's (its module docs).

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::info;
use vhost_frontend::features::{
    bit_mask, PROTOCOL_CONFIG, PROTOCOL_INFLIGHT_SHMFD, PROTOCOL_MQ, PROTOCOL_REPLY_ACK,
    VIRTIO_ID_BLOCK, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

use super::config::{offered_virtio_features, BlkConfig};
use super::disk::Disk;
use super::planted_flaw::PlantedFlaws;
use super::queue_worker::{QueueError, QueueOptions, QueueWorker};
use crate::vhost_user_server::{self as server, RingSetup, ServeError, VhostUserDevice};

pub use super::queue_worker::{CompletionDelay, CompletionDelayError, IoEngine, IoEngineError};
pub use crate::vhost_user_server::HANDSHAKE_TIMEOUT;
pub use vhost_frontend::wire::{MAX_QUEUES, MAX_QUEUE_SIZE};

/// The protocol features offered (INFLIGHT_SHMFD only `with_inflight(true)`, the default).
pub const OFFERED_PROTOCOL_FEATURES: u64 = bit_mask(PROTOCOL_MQ)
    | bit_mask(PROTOCOL_REPLY_ACK)
    | bit_mask(PROTOCOL_CONFIG)
    | bit_mask(PROTOCOL_INFLIGHT_SHMFD);

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
    /// Open the image with O_DIRECT: requests bypass the host page cache (`--direct`,
    /// `--blk ...,direct=on`).
    pub direct: bool,
    /// Who runs each queue's disk I/O (`--io-engine`, `--blk ...,engine=`).
    pub engine: IoEngine,
}

#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error("invalid backend configuration: {0}")]
    InvalidConfig(String),
    #[error("cannot open disk image {path}: {source}")]
    OpenDisk { path: PathBuf, source: io::Error },
    #[error("cannot create the socket pair or thread: {0}")]
    Spawn(io::Error),
    /// What the protocol server reports: the frontend broke the protocol, the socket failed,
    /// the handshake timed out, guest memory vanished, the listener could not be set up.
    #[error(transparent)]
    Serve(#[from] ServeError),
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
    engine: IoEngine,
    /// Offer INFLIGHT_SHMFD (the default; `--no-inflight` measures what tracking costs).
    inflight: bool,
    /// Empty unless built with the `planted-flaws` feature and asked for.
    flaws: PlantedFlaws,
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
        let disk = Disk::open(&cfg.path, cfg.readonly, cfg.direct).map_err(|source| {
            BlkError::OpenDisk {
                path: cfg.path.clone(),
                source,
            }
        })?;
        let config = BlkConfig::new(disk.capacity_sectors(), cfg.queue_size, cfg.num_queues);
        info!(
            path = %cfg.path.display(),
            sectors = disk.capacity_sectors(),
            readonly = cfg.readonly,
            direct = cfg.direct,
            engine = %cfg.engine,
            "virtio-blk backend opened its image"
        );
        Ok(BlkBackend {
            disk: Arc::new(disk),
            config,
            num_queues: cfg.num_queues,
            queue_size: cfg.queue_size,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            completion_delay: None,
            engine: cfg.engine,
            inflight: true,
            flaws: PlantedFlaws::NONE,
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

    /// Plants known recovery bugs (`planted_flaw`): only for proving that tests catch them.
    #[cfg(feature = "planted-flaws")]
    pub fn with_planted_flaws(mut self, flaws: PlantedFlaws) -> Self {
        if flaws != PlantedFlaws::NONE {
            tracing::warn!("this backend carries planted flaws ({flaws:?}): a test build only");
        }
        self.flaws = flaws;
        self
    }

    /// The protocol features offered in GET_PROTOCOL_FEATURES.
    pub fn offered_protocol_features(&self) -> u64 {
        server::offered_protocol_features(self)
    }

    /// The virtio feature bits offered in GET_FEATURES.
    pub fn offered_features(&self) -> u64 {
        server::offered_features(self)
    }

    /// Serves one frontend until it hangs up (then `Ok`) or breaks the protocol (then `Err`, the
    /// connection closed). Every ring is stopped and drained before this returns.
    pub fn serve(&self, stream: UnixStream) -> Result<(), BlkError> {
        Ok(server::serve(self, stream, self.handshake_timeout)?)
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
    /// that has not sent SET_OWNER within the handshake timeout is dropped (server module docs).
    pub fn listen(cfg: BlkBackendConfig, socket_path: &Path) -> Result<(), BlkError> {
        BlkBackend::open(cfg)?.listen_on(socket_path)
    }

    /// [`BlkBackend::listen`] with this (opened, perhaps configured) backend.
    pub fn listen_on(&self, socket_path: &Path) -> Result<(), BlkError> {
        Ok(server::listen_on(
            self,
            socket_path,
            self.handshake_timeout,
        )?)
    }
}

impl VhostUserDevice for BlkBackend {
    const VIRTIO_ID: u32 = VIRTIO_ID_BLOCK;
    const TRACE_NAME: &'static str = "blk-backend";
    type Ring = QueueWorker;
    type RingError = QueueError;

    fn virtio_features(&self) -> u64 {
        offered_virtio_features(self.disk.is_readonly())
            | bit_mask(VIRTIO_RING_F_INDIRECT_DESC)
            | bit_mask(VIRTIO_RING_F_EVENT_IDX)
    }

    fn protocol_features(&self) -> u64 {
        if self.inflight {
            OFFERED_PROTOCOL_FEATURES
        } else {
            OFFERED_PROTOCOL_FEATURES & !bit_mask(PROTOCOL_INFLIGHT_SHMFD)
        }
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.queue_size
    }

    fn read_config(&self, offset: u32, size: u32) -> Result<Vec<u8>, String> {
        self.config
            .read_window(offset, size)
            .map_err(|e| e.to_string())
    }

    fn write_config(&self, _offset: u32, _bytes: &[u8]) -> Result<(), String> {
        Err("the virtio-blk config space is read-only here".into())
    }

    fn planted_flaws(&self) -> PlantedFlaws {
        self.flaws
    }

    fn start_ring(&self, ring: RingSetup) -> Result<QueueWorker, QueueError> {
        QueueWorker::start(
            ring,
            Arc::clone(&self.disk),
            QueueOptions {
                engine: self.engine,
                completion_delay: self.completion_delay,
                flaws: self.flaws,
            },
        )
    }
}
