//! The link to the backend: the current connection, where the conversation stands, and the
//! **replay record**: everything a backend must be told again when it comes back.
//!
//! The record is kept apart from the connection on purpose. A backend that dies takes its
//! connection with it, not what the driver set up: features, rings, eventfds and the inflight
//! buffer stay here, and a returning backend gets all of it again ([`Link::bring_up`] with
//! [`RingBase::UsedIdx`]). Only a device reset by the driver clears the record.
//!
//! Start, in QEMU's order (hw/virtio/vhost.c):
//!
//! ```text
//!  SET_FEATURES                 the backend must know the ring layout first
//!  GET_INFLIGHT_FD              only while no buffer is held (first start, or after a reset)
//!  SET_INFLIGHT_FD              every start and every replay, always the same fd
//!  SET_MEM_TABLE
//!  per queue: SET_VRING_NUM, SET_VRING_BASE (0 fresh; used->idx on a replay), SET_VRING_ADDR,
//!             SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ENABLE 1
//! ```

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Instant;

use tracing::{debug, info, warn};
use vhost_frontend::connection::{
    describe_inflight_bytes, read_inflight_region, FrontendError, InflightBuffer, MemoryRegionFd,
    VhostUserFrontend,
};
use vhost_frontend::features::{self, PROTOCOL_INFLIGHT_SHMFD, VHOST_USER_F_PROTOCOL_FEATURES};
use vhost_frontend::wire::inflight::InflightRegion;
use vhost_frontend::wire::{MemoryRegion, VringAddr};
use vmm_sys_util::eventfd::EventFd;

use super::{
    classify, error_chain, BackendState, MemoryTable, StartedQueue, VhostUserDeviceError,
    VhostUserDeviceOptions,
};

/// What the driver set up at DRIVER_OK, kept until it resets the device.
#[derive(Debug)]
pub(super) struct DriverSetup {
    pub acked_features: u64,
    pub queues: Vec<RecordedQueue>,
    /// Our own handle on the transport's interrupt eventfd (SET_VRING_CALL).
    pub call: EventFd,
}

/// One queue the driver made ready.
#[derive(Debug)]
pub(super) struct RecordedQueue {
    pub index: u16,
    pub size: u16,
    /// As sent in SET_VRING_ADDR (VMM virtual addresses).
    pub addr: VringAddr,
    /// Guest physical addresses of the avail and used rings' `idx` fields.
    pub avail_idx_gpa: u64,
    pub used_idx_gpa: u64,
    /// Our own handle on the queue's ioeventfd (SET_VRING_KICK): a kick the guest makes while
    /// the backend is away waits in its counter.
    pub kick: EventFd,
}

/// Everything to replay to a returning backend.
#[derive(Debug, Default)]
pub(super) struct ReplayRecord {
    pub driver: Option<DriverSetup>,
    /// From GET_INFLIGHT_FD; survives disconnects, dropped at device reset.
    pub inflight: Option<InflightBuffer>,
}

/// Where ring bases come from when the queues are (re)started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RingBase {
    /// A fresh start: the driver starts its indices at 0.
    Zero,
    /// A returning backend: the used ring's idx as the guest sees it (QEMU's choice when
    /// GET_VRING_BASE cannot be asked of a dead backend). A backend with inflight tracking adds
    /// the requests it resubmits; one without re-reads the avail ring from there.
    UsedIdx,
}

/// The current connection, its state, and the record.
pub(super) struct Link {
    pub frontend: Box<dyn VhostUserFrontend + Send>,
    /// Bumped with every new connection, so a hang-up seen on an old one changes nothing.
    pub generation: u64,
    pub state: BackendState,
    pub record: ReplayRecord,
    pub memory: MemoryTable,
    /// Since when, and why, the backend is away.
    pub outage: Option<Outage>,
}

/// A backend that went away: when and why, for the one line logged when it is back.
#[derive(Debug, Clone)]
pub(super) struct Outage {
    pub since: Instant,
    pub cause: String,
    pub attempts: u32,
}

impl Link {
    /// Remembers how a conversation with the backend failed, and turns it into our error.
    /// A refusal leaves the connection usable; anything else ends it.
    pub(super) fn failed(
        &mut self,
        during: &'static str,
        source: FrontendError,
    ) -> VhostUserDeviceError {
        let err = classify(during, source);
        match err {
            VhostUserDeviceError::BackendGone { .. } => {
                self.state = BackendState::Disconnected { during };
                self.outage.get_or_insert_with(|| Outage {
                    since: Instant::now(),
                    cause: error_chain(&err),
                    attempts: 0,
                });
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

    /// The connection went away while no exchange was under way (the event loop saw the hang-up).
    pub(super) fn hung_up(&mut self, cause: &str) {
        if matches!(
            self.state,
            BackendState::Disconnected { .. }
                | BackendState::Broken { .. }
                | BackendState::Refused { .. }
        ) {
            return;
        }
        self.state = BackendState::Disconnected {
            during: "idle (hang-up)",
        };
        self.outage = Some(Outage {
            since: Instant::now(),
            cause: cause.to_string(),
            attempts: 0,
        });
    }

    /// Starts the queues of `setup` on the current connection, in QEMU's order (module docs).
    /// On failure the state says what happened; a refusal mid-way stops what already runs.
    pub(super) fn bring_up(
        &mut self,
        protocol_features: u64,
        options: &VhostUserDeviceOptions,
        setup: &DriverSetup,
        base: RingBase,
    ) -> Result<(), VhostUserDeviceError> {
        // The backend must know the features first: they decide the ring layout it expects.
        let features = setup.acked_features | features::bit_mask(VHOST_USER_F_PROTOCOL_FEATURES);
        if let Err(err) = self.frontend.set_features(features) {
            return Err(self.failed("SET_FEATURES", err));
        }
        if features::has(protocol_features, PROTOCOL_INFLIGHT_SHMFD) {
            self.share_inflight_buffer(options)?;
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
        let sent = self.frontend.set_mem_table(&regions);
        drop(regions);
        if let Err(err) = sent {
            return Err(self.failed("SET_MEM_TABLE", err));
        }

        let mut started = Vec::new();
        for queue in &setup.queues {
            let ring_base = match base {
                RingBase::Zero => 0,
                RingBase::UsedIdx => self.memory.read_u16(queue.used_idx_gpa).map_err(|e| {
                    self.state = BackendState::Broken {
                        during: "reading the used ring",
                    };
                    VhostUserDeviceError::BadQueue {
                        index: queue.index,
                        reason: format!("cannot read the used ring's idx: {e}"),
                    }
                })?,
            };
            let result = start_queue(
                self.frontend.as_mut(),
                queue,
                u32::from(ring_base),
                borrow_eventfd(&queue.kick),
                borrow_eventfd(&setup.call),
            );
            if let Err((during, err)) = result {
                let err = self.failed(during, err);
                if matches!(err, VhostUserDeviceError::BackendRefused { .. }) {
                    // Like QEMU: stop what already runs (this queue may be half set up), so
                    // the backend holds no live ring of a device that failed to start.
                    started.push(started_queue(queue));
                    self.state = BackendState::Running {
                        acked_features: setup.acked_features,
                        queues: started,
                    };
                    // Its own failure is logged and recorded in the state.
                    let _ = self.stop_rings();
                }
                return Err(err);
            }
            debug!(
                queue = queue.index,
                size = queue.size,
                base = ring_base,
                "vhost-user device: queue started"
            );
            started.push(started_queue(queue));
        }
        self.state = BackendState::Running {
            acked_features: setup.acked_features,
            queues: started,
        };
        Ok(())
    }

    /// GET_INFLIGHT_FD if no buffer is held, then SET_INFLIGHT_FD with the one held. A backend
    /// that replies mmap_size 0 keeps no buffer: carry on without, as QEMU does.
    fn share_inflight_buffer(
        &mut self,
        options: &VhostUserDeviceOptions,
    ) -> Result<(), VhostUserDeviceError> {
        if self.record.inflight.is_none() {
            match self
                .frontend
                .get_inflight_fd(options.num_queues, options.queue_size)
            {
                Ok(Some(buffer)) => {
                    debug!(
                        mmap_size = buffer.description.mmap_size,
                        "vhost-user device: inflight buffer received"
                    );
                    self.record.inflight = Some(buffer);
                }
                Ok(None) => {
                    info!("vhost-user device: the backend keeps no inflight buffer (mmap_size 0); no inflight tracking");
                    return Ok(());
                }
                Err(err) => return Err(self.failed("GET_INFLIGHT_FD", err)),
            }
        }
        let Some(buffer) = &self.record.inflight else {
            return Ok(());
        };
        if let Err(err) = self
            .frontend
            .set_inflight_fd(&buffer.description, buffer.fd.as_fd())
        {
            return Err(self.failed("SET_INFLIGHT_FD", err));
        }
        Ok(())
    }

    /// Per started queue SET_VRING_ENABLE(0) then GET_VRING_BASE (QEMU's order: stop fetching
    /// first; the backend answers once the ring is stopped, with where it stopped).
    pub(super) fn stop_rings(&mut self) -> Result<(), VhostUserDeviceError> {
        let started: Vec<u16> = match &self.state {
            BackendState::Running { queues, .. } => queues.iter().map(|q| q.index).collect(),
            // Nothing started (or nobody to tell): nothing to stop.
            _ => return Ok(()),
        };
        let mut last_bases = Vec::new();
        for queue in started {
            let index = u32::from(queue);
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

    /// How many requests a returning backend will serve again, per the record: with an inflight
    /// buffer, the entries still marked inflight (minus a last batch that reached the used ring,
    /// which the backend rolls back); without one, what lies in the avail ring past used->idx
    /// (the backend re-reads it). `region` is [`Link::inflight_snapshot`]'s copy. `None` when the
    /// guest memory or the buffer cannot be read.
    pub(super) fn requests_to_resubmit(
        &self,
        region: Option<&[u8]>,
    ) -> Option<(u64, &'static str)> {
        let setup = self.record.driver.as_ref()?;
        let mut total = 0u64;
        if let Some(buffer) = &self.record.inflight {
            let d = &buffer.description;
            let region = InflightRegion::new(region?, d.num_queues, d.queue_size).ok()?;
            for queue in &setup.queues {
                let used = self.memory.read_u16(queue.used_idx_gpa).ok()?;
                let view = region.queue(queue.index).ok()?;
                let batch = view.last_batch(used).unwrap_or_default();
                let inflight = view
                    .inflight_descs_in_counter_order()
                    .iter()
                    .filter(|(desc, _)| !batch.contains(desc))
                    .count();
                total += inflight as u64;
            }
            Some((total, "from the inflight region"))
        } else {
            for queue in &setup.queues {
                let used = self.memory.read_u16(queue.used_idx_gpa).ok()?;
                let avail = self.memory.read_u16(queue.avail_idx_gpa).ok()?;
                total += u64::from(avail.wrapping_sub(used));
            }
            Some((total, "re-read from the avail ring (no inflight tracking)"))
        }
    }

    /// A private copy of the inflight buffer as it is now, if one is held and readable.
    pub(super) fn inflight_snapshot(&self) -> Option<Vec<u8>> {
        let buffer = self.record.inflight.as_ref()?;
        read_inflight_region(&buffer.description, buffer.fd.as_fd()).ok()
    }

    /// One line per queue describing `region` (a snapshot), for the log around a replay.
    pub(super) fn describe_inflight(&self, region: Option<&[u8]>) -> Vec<String> {
        match (&self.record.inflight, region) {
            (Some(buffer), Some(bytes)) => describe_inflight_bytes(&buffer.description, bytes),
            (Some(_), None) => vec!["inflight region unreadable".into()],
            (None, _) => Vec::new(),
        }
    }

    /// Kicks every recorded queue: requests the guest queued while the backend was away are
    /// looked at at once, whether or not a kick from then is still pending in the counter.
    pub(super) fn kick_recorded_queues(&self) {
        if let Some(setup) = &self.record.driver {
            for queue in &setup.queues {
                if let Err(e) = queue.kick.write(1) {
                    warn!(
                        queue = queue.index,
                        "cannot kick the queue after a reconnect: {e}"
                    );
                }
            }
        }
    }
}

fn started_queue(queue: &RecordedQueue) -> StartedQueue {
    StartedQueue {
        index: queue.index,
        size: queue.size,
        addr: queue.addr,
    }
}

/// `vmm_sys_util`'s EventFd predates `AsFd`; borrow its descriptor by hand.
pub(super) fn borrow_eventfd(eventfd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd keeps its descriptor open for as long as it lives, and the borrow
    // cannot outlive the EventFd.
    unsafe { BorrowedFd::borrow_raw(eventfd.as_raw_fd()) }
}

/// The SET_VRING_* series for one queue; on failure, which message failed.
fn start_queue(
    frontend: &mut dyn VhostUserFrontend,
    queue: &RecordedQueue,
    base: u32,
    kick: BorrowedFd<'_>,
    call: BorrowedFd<'_>,
) -> Result<(), (&'static str, FrontendError)> {
    let index = u32::from(queue.index);
    let during = |message: &'static str| move |err| (message, err);
    frontend
        .set_vring_num(index, u32::from(queue.size))
        .map_err(during("SET_VRING_NUM"))?;
    frontend
        .set_vring_base(index, base)
        .map_err(during("SET_VRING_BASE"))?;
    frontend
        .set_vring_addr(&queue.addr)
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
