//! The VMM's event loop (`event-manager`, on its own thread): what happens off the vCPU threads.
//!
//! Today that is watching vhost-user backends. Each device with reconnect gets a
//! [`BackendWatch`]: it watches the connection's socket for hang-up, and when the backend is gone
//! it drives reconnect attempts on a timer (the device's `ReconnectPolicy`). The vCPU threads
//! never wait for a backend to come back: the guest's kicks wait in the ioeventfds, and the
//! replay after a reconnect holds the device only for the handshake.
//!
//! A backend on a unix socket is also watched where it will reappear: an inotify watch on the
//! socket's directory makes the first attempt after a restart happen the moment the backend
//! creates its socket, instead of at the next backoff tick.
//!
//! ```text
//!   watching ──EPOLLHUP/RDHUP──► hung_up() ──► waiting ──timer──► attempt()
//!      ▲                                          ▲                  │
//!      └───────────── Connected ──────────────────┼──── Failed ◄─────┤
//!                                                 │                  │
//!                           DEVICE_NEEDS_RESET ◄──┴──── GaveUp ◄─────┘
//! ```

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
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
    /// Where a socket backend reappears, watched while it is away.
    socket_watch: Option<SocketWatch>,
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
    /// `socket`: the backend's unix socket path, if it has one (then its reappearance is watched).
    pub fn new(
        handle: ReconnectHandle,
        transport: Arc<Mutex<MmioTransport>>,
        socket: Option<&Path>,
    ) -> Result<Self, EventLoopError> {
        let socket_watch = socket.and_then(|path| match SocketWatch::new(path) {
            Ok(watch) => Some(watch),
            Err(e) => {
                warn!(
                    "{}: cannot watch {} for the backend's return ({e}); relying on the timer",
                    handle.name(),
                    path.display()
                );
                None
            }
        });
        Ok(BackendWatch {
            socket_watch,
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

    /// The socket's directory changed: if the backend's socket (re)appeared while we wait,
    /// try now, and start the backoff over (it may not listen yet).
    fn socket_event(&mut self) {
        let Some(watch) = &self.socket_watch else {
            return;
        };
        if watch.drain_names_socket() && self.handle.is_waiting() {
            debug!("{}: the backend's socket reappeared", self.handle.name());
            self.attempts = 0;
            self.schedule();
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
        if let Some(watch) = &self.socket_watch {
            if let Err(e) = ops.add(Events::new_raw(watch.fd.as_raw_fd(), EventSet::IN)) {
                error!(
                    "{}: cannot watch the socket directory: {e}",
                    self.handle.name()
                );
            }
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
        if self
            .socket_watch
            .as_ref()
            .is_some_and(|w| events.fd() == w.fd.as_raw_fd())
        {
            self.socket_event();
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

/// An inotify watch on a socket's directory, reporting when an entry of the socket's name is
/// created, moved in or changed (a restarted backend binds a new socket there).
struct SocketWatch {
    fd: OwnedFd,
    name: Vec<u8>,
}

impl SocketWatch {
    fn new(socket: &Path) -> std::io::Result<SocketWatch> {
        use std::os::unix::ffi::OsStrExt;
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name");
        let name = socket.file_name().ok_or_else(invalid)?.as_bytes().to_vec();
        let dir = match socket.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| invalid())?;
        // SAFETY: plain syscall; the result is checked before being owned.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mask = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ATTRIB;
        // SAFETY: `fd` is an inotify instance and `dir` a NUL-terminated path alive for the call.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), dir.as_ptr(), mask) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SocketWatch { fd, name })
    }

    /// Reads every pending event; true if one names the socket.
    fn drain_names_socket(&self) -> bool {
        const HEADER: usize = std::mem::size_of::<libc::inotify_event>();
        let mut named = false;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into our own buffer of the given length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else {
                return named; // EAGAIN: drained (or an error: nothing more to learn)
            };
            if n == 0 {
                return named;
            }
            let mut at = 0;
            while at + HEADER <= n {
                // Fields of struct inotify_event: wd i32, mask u32, cookie u32, len u32, name.
                let len_bytes = [buf[at + 12], buf[at + 13], buf[at + 14], buf[at + 15]];
                let len = u32::from_ne_bytes(len_bytes) as usize;
                let end = (at + HEADER).saturating_add(len).min(n);
                let raw_name = &buf[at + HEADER..end];
                let event_name = raw_name.split(|&b| b == 0).next().unwrap_or_default();
                named |= event_name == self.name.as_slice();
                at = end;
            }
        }
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
