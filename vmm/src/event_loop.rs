//! The VMM's event loop (`event-manager`, on its own thread): what happens off the vCPU threads.
//!
//! Today that is watching vhost-user backends. Each device with reconnect gets a
//! [`BackendWatch`]: it watches the connection's socket for hang-up, and when the backend is gone
//! it drives reconnect attempts on a timer (the device's `ReconnectPolicy`). The vCPU threads
//! never wait for a backend to come back: the guest's kicks wait in the ioeventfds, and the
//! replay after a reconnect holds the device only for the handshake.
//!
//! ```text
//!   watching ──EPOLLHUP/RDHUP──► hung_up() ──► waiting ──timer──► attempt()
//!      ▲                                          ▲                  │
//!      └───────────── Connected ──────────────────┼──── Failed ◄─────┤
//!                                                 │                  │
//!                           DEVICE_NEEDS_RESET ◄──┴──── GaveUp ◄─────┘
//! ```

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use tracing::{debug, error, warn};
use vmm_sys_util::timerfd::TimerFd;

use devices::virtio_mmio::{Attempt, MmioTransport, ReconnectHandle};

/// Watches one vhost-user device's backend and brings it back.
pub struct BackendWatch {
    handle: ReconnectHandle,
    /// To ask the driver for a reset when the backend cannot come back.
    transport: Arc<Mutex<MmioTransport>>,
    /// A duplicate of the connection's socket, and the connection's generation.
    watched: Option<(OwnedFd, u64)>,
    timer: TimerFd,
    /// Attempts since the backend went away.
    attempts: u32,
    /// When it went away, and when to say again that it is still away.
    waiting_since: Instant,
    next_notice: Duration,
}

/// A backend away this long gets a warning, then again at each doubling.
const FIRST_NOTICE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the event loop: {0}")]
    Create(event_manager::Error),
    #[error("cannot create a timer: {0}")]
    Timer(vmm_sys_util::errno::Error),
    #[error("cannot start the event loop thread: {0}")]
    Thread(std::io::Error),
}

impl BackendWatch {
    pub fn new(
        handle: ReconnectHandle,
        transport: Arc<Mutex<MmioTransport>>,
    ) -> Result<Self, EventLoopError> {
        Ok(BackendWatch {
            handle,
            transport,
            watched: None,
            timer: TimerFd::new().map_err(EventLoopError::Timer)?,
            attempts: 0,
            waiting_since: Instant::now(),
            next_notice: FIRST_NOTICE,
        })
    }

    fn watch(&mut self, ops: &mut EventOps) {
        self.unwatch(ops);
        if let Some((fd, generation)) = self.handle.watch_fd() {
            let events = Events::new_raw(
                fd.as_raw_fd(),
                EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR,
            );
            match ops.add(events) {
                Ok(()) => self.watched = Some((fd, generation)),
                Err(e) => error!(
                    "{}: cannot watch the backend connection: {e}",
                    self.handle.name()
                ),
            }
        }
    }

    fn unwatch(&mut self, ops: &mut EventOps) {
        if let Some((fd, _)) = self.watched.take() {
            let _ = ops.remove(Events::empty_raw(fd.as_raw_fd()));
        }
    }

    /// Arms the timer for the next attempt, per the policy; `false` if there is none.
    fn schedule(&mut self) -> bool {
        let Some(delay) = self.handle.policy().delay(self.attempts) else {
            return false;
        };
        // A zero duration would disarm a timerfd.
        let delay = delay.max(Duration::from_micros(1));
        match self.timer.reset(delay, None) {
            Ok(()) => true,
            Err(e) => {
                error!(
                    "{}: cannot arm the reconnect timer: {e}",
                    self.handle.name()
                );
                false
            }
        }
    }

    fn give_up(&mut self, reason: &str) {
        warn!(
            "{}: the backend cannot come back ({reason}); the device needs a reset",
            self.handle.name()
        );
        match self.transport.lock() {
            Ok(mut transport) => transport.device_needs_reset(),
            Err(_) => error!("{}: the device's transport is poisoned", self.handle.name()),
        }
    }

    fn backend_gone(&mut self, generation: u64, cause: &str, ops: &mut EventOps) {
        self.unwatch(ops);
        if self.handle.hung_up(generation, cause) {
            self.attempts = 0;
            self.waiting_since = Instant::now();
            self.next_notice = FIRST_NOTICE;
            if !self.schedule() {
                self.give_up("reconnect=off");
            }
        } else {
            debug!("{}: hang-up of an old connection", self.handle.name());
        }
    }

    fn attempt(&mut self, ops: &mut EventOps) {
        let _ = self.timer.wait();
        match self.handle.attempt() {
            Attempt::Connected => {
                self.attempts = 0;
                self.watch(ops);
            }
            Attempt::NotNeeded => self.watch(ops),
            Attempt::Failed(why) => {
                self.attempts = self.attempts.saturating_add(1);
                // The first failures are expected (the backend is restarting); a long wait is
                // worth a warning now and then.
                let away = self.waiting_since.elapsed();
                if away >= self.next_notice {
                    self.next_notice = self.next_notice.saturating_mul(2);
                    warn!(
                        "{}: vhost-user backend away for {} s ({} attempts; last: {why}); the guest's requests wait",
                        self.handle.name(),
                        away.as_secs(),
                        self.attempts
                    );
                } else {
                    debug!(
                        attempt = self.attempts,
                        "{}: reconnect failed: {why}",
                        self.handle.name()
                    );
                }
                if !self.schedule() {
                    self.give_up("no more attempts");
                }
            }
            Attempt::GaveUp(why) => self.give_up(&why),
        }
    }
}

impl MutEventSubscriber for BackendWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            error!(
                "{}: cannot watch the reconnect timer: {e}",
                self.handle.name()
            );
        }
        self.watch(ops);
        // A vCPU may have found the backend gone before the loop started.
        if self.watched.is_none() && self.handle.is_waiting() && !self.schedule() {
            self.give_up("reconnect=off");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.timer.as_raw_fd() {
            self.attempt(ops);
            return;
        }
        let Some((fd, generation)) = &self.watched else {
            return;
        };
        if events.fd() != fd.as_raw_fd() {
            return;
        }
        let generation = *generation;
        let set = events.event_set();
        let cause = if set.contains(EventSet::ERROR) {
            "error on the socket"
        } else {
            "hang-up on the socket"
        };
        self.backend_gone(generation, cause, ops);
    }
}

/// Runs the loop on its own thread for the life of the process (it ends with it: the
/// loop holds nothing that needs an orderly shutdown, and a reconnect in progress is cancelled
/// by the process exiting).
pub fn spawn(watches: Vec<BackendWatch>) -> Result<(), EventLoopError> {
    if watches.is_empty() {
        return Ok(());
    }
    let mut manager: EventManager<Arc<Mutex<BackendWatch>>> =
        EventManager::new().map_err(EventLoopError::Create)?;
    for watch in watches {
        manager.add_subscriber(Arc::new(Mutex::new(watch)));
    }
    std::thread::Builder::new()
        .name("vmm-events".into())
        .spawn(move || loop {
            if let Err(e) = manager.run() {
                error!("event loop: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .map_err(EventLoopError::Thread)?;
    Ok(())
}
