//! Reconnect: a backend that went away (hang-up, EPIPE, ECONNRESET, EOF) is a *state* of the
//! device, not an error the guest sees. While it is away the guest keeps running and its kicks
//! wait in the ioeventfds; when it is back, it is told everything again from the replay record.
//!
//! Who does what:
//! - the **device** ([`super::VhostUserDevice`], driven by vCPU threads) keeps working on the
//!   record: a driver that starts or resets the device while the backend is away changes the
//!   record, and nothing waits for the backend;
//! - the **event loop** (the VMM's, on `event-manager`) watches the connection for hang-up
//!   ([`ReconnectHandle::watch_fd`]), tells the device ([`ReconnectHandle::hung_up`]), and calls
//!   [`ReconnectHandle::attempt`] on its timer until the backend is back. Connecting happens
//!   outside the device's lock; only the handshake and the replay (bounded by
//!   [`super::CONTROL_SEQUENCE_BUDGET`]) hold it, so a vCPU touching the device waits at most
//!   that long, never for the backend to return.
//!
//! A returning backend must be the same device ([`super::handshake::Identity::differences`]);
//! one that is not is refused for good and the device asks the driver for a reset.

use std::fmt;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use vhost_frontend::connection::VhostUserFrontend;

use super::handshake::handshake;
use super::link::RingBase;
use super::{error_chain, BackendState, Shared, CONTROL_SEQUENCE_BUDGET};

/// Opens a new connection to the backend: a unix socket path, or a fresh in-process backend.
pub trait Connector: Send {
    /// A connected frontend, configured as the first one was (name, trace, reply timeout).
    fn connect(&mut self) -> Result<Box<dyn VhostUserFrontend + Send>, String>;
}

/// When to try again after a backend went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReconnectPolicy {
    /// Never: the device asks for a reset when its backend goes away.
    Off,
    /// Try at once, then after `initial`, doubling up to `max`, for ever.
    Backoff { initial: Duration, max: Duration },
}

impl ReconnectPolicy {
    /// The default: for ever, from 1 ms up to 250 ms between attempts. A restarted backend is
    /// found within a quarter of a second, and an absent one costs four connect() calls a second.
    pub const DEFAULT: ReconnectPolicy = ReconnectPolicy::Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(250),
    };

    /// A fixed interval (QEMU's `reconnect-ms`), for ever.
    pub fn every(interval: Duration) -> ReconnectPolicy {
        ReconnectPolicy::Backoff {
            initial: interval,
            max: interval,
        }
    }

    /// The wait before attempt number `attempt` (0 is the first, made at once), or `None` for
    /// no attempt at all.
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        match *self {
            ReconnectPolicy::Off => None,
            ReconnectPolicy::Backoff { .. } if attempt == 0 => Some(Duration::ZERO),
            ReconnectPolicy::Backoff { initial, max } => {
                let doublings = (attempt - 1).min(20);
                Some(initial.saturating_mul(1 << doublings).min(max))
            }
        }
    }
}

impl fmt::Display for ReconnectPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReconnectPolicy::Off => f.write_str("off"),
            ReconnectPolicy::Backoff { initial, max } if initial == max => {
                write!(f, "every {} ms, for ever", initial.as_millis())
            }
            ReconnectPolicy::Backoff { initial, max } => write!(
                f,
                "from {} ms to {} ms between attempts, for ever",
                initial.as_millis(),
                max.as_millis()
            ),
        }
    }
}

/// What one reconnect attempt came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The device is not waiting for a backend (connected, or given up on).
    NotNeeded,
    /// Connected and replayed: watch this connection now.
    Connected,
    /// Not there yet (or went away again): try later.
    Failed(String),
    /// A backend came back as a different device, or broke the protocol: no more attempts; the
    /// device needs a reset.
    GaveUp(String),
}

/// The event loop's handle on one device's link: what to watch, and how to bring it back.
#[derive(Clone)]
pub struct ReconnectHandle {
    pub(super) shared: Arc<Shared>,
}

impl ReconnectHandle {
    /// The device's name in logs (e.g. `blk0`).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn policy(&self) -> ReconnectPolicy {
        self.shared.policy
    }

    /// A duplicate of the current connection's socket and that connection's generation, for the
    /// event loop to watch for hang-up; `None` when there is none to watch (not connected, or a
    /// frontend without a socket). The event loop owns the duplicate and drops it on hang-up.
    pub fn watch_fd(&self) -> Option<(OwnedFd, u64)> {
        let link = self.shared.lock();
        if matches!(
            link.state,
            BackendState::Disconnected { .. }
                | BackendState::Broken { .. }
                | BackendState::Refused { .. }
        ) {
            return None;
        }
        let fd = link.frontend.hangup_fd()?.try_clone_to_owned().ok()?;
        Some((fd, link.generation))
    }

    /// The connection of `generation` hung up. Returns true when the device now waits for its
    /// backend (the caller then schedules attempts); false for an older connection, or a device
    /// that was already given up on.
    pub fn hung_up(&self, generation: u64, cause: &str) -> bool {
        let mut link = self.shared.lock();
        if link.generation != generation {
            return matches!(link.state, BackendState::Disconnected { .. });
        }
        link.hung_up(cause);
        let waiting = matches!(link.state, BackendState::Disconnected { .. });
        if waiting {
            info!(
                "{}: vhost-user backend gone ({cause}); the guest's requests wait; reconnect: {}",
                self.shared.name, self.shared.policy
            );
        }
        waiting
    }

    /// Whether the device waits for its backend (a vCPU may have found it gone first).
    pub fn is_waiting(&self) -> bool {
        matches!(self.shared.lock().state, BackendState::Disconnected { .. })
    }

    /// One attempt: connect (without the device's lock), then handshake, check the identity,
    /// and replay the record (with it).
    pub fn attempt(&self) -> Attempt {
        if !self.is_waiting() {
            return Attempt::NotNeeded;
        }
        if self.shared.policy == ReconnectPolicy::Off {
            return Attempt::GaveUp("reconnect=off".into());
        }
        let connected = {
            let mut connector = self
                .shared
                .connector
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match connector.as_mut() {
                Some(connector) => connector.connect(),
                None => return Attempt::GaveUp("the device has no way to reconnect".into()),
            }
        };
        let mut link = self.shared.lock();
        if let Some(outage) = &mut link.outage {
            outage.attempts += 1;
        }
        let mut frontend = match connected {
            Ok(frontend) => frontend,
            Err(e) => return Attempt::Failed(e),
        };
        if !matches!(link.state, BackendState::Disconnected { .. }) {
            return Attempt::NotNeeded;
        }
        let shared = &self.shared;
        frontend.set_sequence_deadline(Some(Instant::now() + CONTROL_SEQUENCE_BUDGET));
        let identity = match handshake(
            frontend.as_mut(),
            &shared.kind,
            &shared.options,
            shared.identity.protocol_features,
        ) {
            Ok(identity) => identity,
            // Gone again, or not answering yet: the next attempt may do better.
            Err(e) => return Attempt::Failed(format!("handshake: {}", error_chain(&e))),
        };
        if let Some(changes) = shared.identity.differences(&identity, &shared.kind) {
            let reason = format!("the returning backend is not the same device: {changes}");
            warn!(
                "{}: {reason}; refused, the device needs a reset",
                shared.name
            );
            link.state = BackendState::Refused {
                reason: reason.clone(),
            };
            return Attempt::GaveUp(reason);
        }
        link.frontend = frontend;
        link.generation += 1;
        link.state = BackendState::Negotiated;
        // One copy of what the dead backend left, for the count and the log line alike.
        let region = link.inflight_snapshot();
        let resubmit = link.requests_to_resubmit(region.as_deref());
        let Some(setup) = link.record.driver.take() else {
            link.frontend.set_sequence_deadline(None);
            self.log_back(&mut link, None);
            return Attempt::Connected;
        };
        for line in link.describe_inflight(region.as_deref()) {
            info!("{}: inflight before recovery: {line}", shared.name);
        }
        let result = link.bring_up(
            shared.identity.protocol_features,
            &shared.options,
            &setup,
            RingBase::UsedIdx,
        );
        link.record.driver = Some(setup);
        link.frontend.set_sequence_deadline(None);
        match result {
            Ok(()) => {
                // Our backend recovers while it starts the rings, before it acks the last
                // SET_VRING_*: the region now shows the result.
                let after = link.inflight_snapshot();
                for line in link.describe_inflight(after.as_deref()) {
                    info!("{}: inflight after recovery: {line}", shared.name);
                }
                link.kick_recorded_queues();
                self.log_back(&mut link, resubmit);
                Attempt::Connected
            }
            Err(e) if matches!(link.state, BackendState::Disconnected { .. }) => {
                Attempt::Failed(format!("replay: {}", error_chain(&e)))
            }
            Err(e) => {
                let reason = format!("replaying the device state failed: {}", error_chain(&e));
                warn!("{}: {reason}; the device needs a reset", shared.name);
                if !matches!(link.state, BackendState::Broken { .. }) {
                    link.state = BackendState::Refused {
                        reason: reason.clone(),
                    };
                }
                Attempt::GaveUp(reason)
            }
        }
    }

    /// The one line per outage: device, cause, downtime, requests resubmitted.
    fn log_back(&self, link: &mut super::link::Link, resubmit: Option<(u64, &'static str)>) {
        let Some(outage) = link.outage.take() else {
            return;
        };
        let resubmitted = match resubmit {
            Some((n, how)) => format!("{n} requests resubmitted {how}"),
            None => "no queue was running".into(),
        };
        // Warning level: an outage is worth the operator's eye even when the guest never noticed.
        warn!(
            "{}: vhost-user backend back after {} ms ({} attempts; cause: {}); {resubmitted}",
            self.shared.name,
            outage.since.elapsed().as_millis(),
            outage.attempts,
            outage.cause
        );
    }
}

impl Shared {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, super::link::Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) type SharedConnector = Mutex<Option<Box<dyn Connector>>>;
