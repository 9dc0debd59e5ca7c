//! The eventfds a frontend gives for a ring's interrupts (SET_VRING_CALL) and errors
//! (SET_VRING_ERR), as the ring's worker threads write them: replaceable while the ring runs,
//! and never written in a way that could block on a counter the peer controls (`peer_fd`).
//!
//! ```text
//!  session thread ── SET_VRING_CALL ──► Notifier::set (old fd released first)
//!  worker threads ── completion ──────► Notifier::signal        (never waits: peer_fd::signal)
//!  session thread ── ring not started ► Notifier::signal_detached (on a helper thread)
//!  whoever stops a worker ────────────► Notifier::unwedge (frees a writer the peer wedged)
//! ```

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread;

use tracing::warn;
use vmm_sys_util::eventfd::EventFd;

use super::peer_fd;

/// An eventfd the frontend gave us (call or err), replaceable while the queue runs: QEMU swaps
/// the call fd when the guest masks and unmasks the interrupt.
///
/// The fd is shared with the peer, which may make a write block (see `peer_fd`): so no lock is
/// held while writing (a writer sleeping in the residual window must not block `set`), and
/// whoever replaces or waits for a writer can [`Notifier::unwedge`] it.
#[derive(Debug, Default)]
pub struct Notifier {
    fd: RwLock<Option<Arc<EventFd>>>,
    /// A `signal_detached` helper thread is under way.
    helper_busy: Arc<AtomicBool>,
}

impl Notifier {
    /// Replaces the fd. A writer of ours still sleeping on the old one is released first.
    pub fn set(&self, fd: Option<EventFd>) {
        let old = std::mem::replace(
            &mut *self.fd.write().unwrap_or_else(PoisonError::into_inner),
            fd.map(Arc::new),
        );
        if let Some(old) = old {
            unwedge_fd(&old);
        }
    }

    pub fn is_set(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Arc<EventFd>> {
        self.fd
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Adds 1 to the eventfd, if one is set. A full counter already means "signalled", so that
    /// is not an error, and it is never waited on (`peer_fd::signal`).
    pub fn signal(&self) {
        if let Some(fd) = self.current() {
            signal_fd(&fd);
        }
    }

    /// `signal` for a thread that must never sleep, not even in `peer_fd`'s residual window (the
    /// session thread, which every later frontend waits for): the write runs on a helper
    /// thread, at most one per notifier. A helper still under way means a signal is pending.
    pub fn signal_detached(&self) {
        let Some(fd) = self.current() else { return };
        if self.helper_busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let busy = Arc::clone(&self.helper_busy);
        let spawned = thread::Builder::new()
            .name("blk-signal".into())
            .spawn(move || {
                signal_fd(&fd);
                busy.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            self.helper_busy.store(false, Ordering::Release);
            warn!("cannot spawn a thread to signal an eventfd: {e}");
        }
    }

    /// Releases a writer of ours sleeping on a full counter (drains it; see `peer_fd`).
    pub fn unwedge(&self) {
        if let Some(fd) = self.current() {
            unwedge_fd(&fd);
        }
    }
}

fn signal_fd(fd: &EventFd) {
    if let Err(e) = peer_fd::signal(fd) {
        warn!("cannot signal eventfd {}: {e}", fd.as_raw_fd());
    }
}

fn unwedge_fd(fd: &EventFd) {
    match peer_fd::unwedge(fd) {
        Ok(true) => warn!(
            "eventfd {} was full (only a misbehaving frontend fills it); drained it",
            fd.as_raw_fd()
        ),
        Ok(false) => {}
        Err(e) => warn!("cannot inspect eventfd {}: {e}", fd.as_raw_fd()),
    }
}
