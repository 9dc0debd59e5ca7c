//! The backend's view of one vring: what the frontend has told us so far (size, addresses, base,
//! eventfds, enabled) and whether a worker serves it right now.
//!
//! A ring runs when it has everything it needs: a memory table, a size, addresses, a kick fd, and
//! is enabled. Any message that changes one of those first pauses the worker (which drains its
//! in-flight requests and remembers the next avail index), applies the change, then resumes if the
//! ring is still complete. So the order of SET_VRING_* messages does not matter, a kick fd can be
//! replaced, and a ring can be stopped (GET_VRING_BASE) and started again.
//!
//! ```text
//!  session: SET_VRING_* ─► pause() ─► RingWorker::stop ─► next_avail kept
//!                          set_*()
//!                          resume() ─► complete & enabled? ─► VhostUserDevice::start_ring ─► worker
//! ```
//!
//! What "serving" means is the device's (`VhostUserDevice::start_ring`); this module only knows
//! the worker it got back can be stopped and says where it stopped.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;

use tracing::{info, warn};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::device::{RingSetup, RingWorker, VhostUserDevice};
use super::inflight_region::InflightMap;
use super::memory::MappedMemory;
use super::notifier::Notifier;
use super::peer_fd::escape_os_for_log;

/// The three ring addresses, already translated to guest physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddresses {
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
}

/// Ring addresses as the frontend sends them: in *its* virtual address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserRingAddresses {
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl UserRingAddresses {
    /// Translates through the memory table; every part must lie wholly inside one region.
    pub fn translate(&self, memory: &MappedMemory, size: u16) -> Option<RingAddresses> {
        let n = u64::from(size);
        // Split-ring sizes (virtio 1.x §2.7): 16 bytes per descriptor; avail and used have a
        // 4-byte header, an entry per descriptor (2 resp. 8 bytes) and a 2-byte event field.
        Some(RingAddresses {
            desc_table: memory.user_to_guest(self.desc_table, 16 * n)?,
            avail_ring: memory.user_to_guest(self.avail_ring, 6 + 2 * n)?,
            used_ring: memory.user_to_guest(self.used_ring, 6 + 8 * n)?,
        })
    }
}

/// What a vring needs from the session around it to start.
pub struct RunContext<'a> {
    pub memory: Option<&'a MappedMemory>,
    /// With VHOST_USER_F_PROTOCOL_FEATURES negotiated a ring starts disabled and waits for
    /// SET_VRING_ENABLE 1; without it, a ring is enabled as soon as it is started (spec).
    pub starts_disabled: bool,
    /// The SET_INFLIGHT_FD region, if the frontend gave one: every ring is then tracked in it.
    pub inflight: Option<&'a Arc<InflightMap>>,
    /// VIRTIO_RING_F_EVENT_IDX is among the acked virtio features.
    pub event_idx: bool,
}

/// One ring of a session; `W` is the device's running ring ([`VhostUserDevice::Ring`]).
#[derive(Debug)]
pub struct Vring<W: RingWorker> {
    index: u16,
    size: Option<u16>,
    addresses: Option<UserRingAddresses>,
    next_avail: u16,
    kick: Option<EventFd>,
    call: Arc<Notifier>,
    err: Arc<Notifier>,
    enabled: bool,
    worker: Option<W>,
}

impl<W: RingWorker> Drop for Vring<W> {
    /// The worker is stopped (its threads joined), and a `signal_detached` helper that a peer
    /// wedged on a full counter is released, so nothing of this ring outlives the session.
    fn drop(&mut self) {
        self.pause();
        self.call.unwedge();
        self.err.unwedge();
    }
}

impl<W: RingWorker> Vring<W> {
    pub fn new(index: u16) -> Self {
        Vring {
            index,
            size: None,
            addresses: None,
            next_avail: 0,
            kick: None,
            call: Arc::new(Notifier::default()),
            err: Arc::new(Notifier::default()),
            enabled: false,
            worker: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.worker.is_some()
    }

    /// Stops the worker, if any, keeping the avail index it reached.
    pub fn pause(&mut self) {
        if let Some(worker) = self.worker.take() {
            self.next_avail = worker.stop();
        }
    }

    /// Starts a worker if the ring is complete, enabled and not running yet. A ring the guest
    /// placed outside its memory is not a protocol error: it is logged, the err fd is written,
    /// and the ring stays stopped until the frontend changes something.
    pub fn resume<D>(&mut self, device: &D, ctx: &RunContext<'_>)
    where
        D: VhostUserDevice<Ring = W>,
    {
        if self.worker.is_some() || (ctx.starts_disabled && !self.enabled) {
            return;
        }
        let (Some(memory), Some(size), Some(addresses), Some(kick)) =
            (ctx.memory, self.size, self.addresses, self.kick.as_ref())
        else {
            return;
        };
        let Some(rings) = addresses.translate(memory, size) else {
            warn!(
                queue = self.index,
                "vring addresses {addresses:x?} (size {size}) are not inside the memory table; ring not started"
            );
            self.err.signal_detached();
            return;
        };
        // With a region, every ring it can cover is tracked. One it cannot (QEMU sizes the region
        // by its queue-size property, 128 by default, while a virtio-mmio driver may pick a larger
        // ring) is served without tracking, loudly: refusing it would hang the guest's I/O for
        // good, and recording heads past its end would write out of bounds.
        // Such a ring is then as safe across a backend crash as with a backend that offers no
        // INFLIGHT_SHMFD: right for requests completed in order, not beyond (README).
        let untracked = |why: String| {
            warn!(
                queue = self.index,
                "{why}: this ring is served WITHOUT inflight tracking (a backend crash may lose or \
                 repeat its requests); size the frontend's inflight region for the ring (QEMU: \
                 -device vhost-user-blk,queue-size=N)"
            );
            None
        };
        let inflight = match ctx.inflight {
            None => None,
            Some(map) => match map.queue(self.index) {
                Some(region) if region.capacity() >= size => Some(region),
                Some(region) => untracked(format!(
                    "ring of {size} entries, but the inflight region holds {} per queue",
                    region.capacity()
                )),
                None => untracked(format!(
                    "the inflight region covers {} queue(s), not this one",
                    map.num_queues()
                )),
            },
        };
        let kick = match kick.try_clone() {
            Ok(kick) => kick,
            Err(e) => {
                warn!(queue = self.index, "cannot duplicate the kick fd: {e}");
                self.err.signal_detached();
                return;
            }
        };
        let setup = RingSetup {
            index: self.index,
            size,
            rings,
            next_avail: self.next_avail,
            kick,
            call: Arc::clone(&self.call),
            err: Arc::clone(&self.err),
            inflight,
            memory: Arc::clone(memory.guest()),
            event_idx: ctx.event_idx,
        };
        match device.start_ring(setup) {
            Ok(worker) => {
                info!(
                    queue = self.index,
                    size,
                    next_avail = worker.started_at(),
                    "vring started"
                );
                self.worker = Some(worker);
            }
            Err(e) => {
                warn!("vring not started: {e}");
                self.err.signal_detached();
            }
        }
    }

    // Setters: the caller pauses the ring before and resumes it after (see `Vring` docs).

    pub fn set_size(&mut self, size: u16) {
        self.size = Some(size);
    }

    pub fn set_addresses(&mut self, addresses: UserRingAddresses) {
        self.addresses = Some(addresses);
    }

    pub fn set_next_avail(&mut self, next_avail: u16) {
        self.next_avail = next_avail;
    }

    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// `None`: the frontend set the "no fd" bit, asking us to poll the ring, which this backend
    /// does not do; the ring then waits for a kick fd.
    pub fn set_kick(&mut self, kick: Option<EventFd>) {
        if kick.is_none() {
            warn!(
                queue = self.index,
                "SET_VRING_KICK without an fd (polling mode) is not supported; ring stays stopped"
            );
        }
        self.kick = kick;
    }

    /// The ring is stopped (GET_VRING_BASE): it starts again only with a new kick fd.
    pub fn forget_kick(&mut self) {
        self.kick = None;
    }

    /// Replaced in place: a running worker picks the new fd up at its next completion.
    pub fn set_call(&self, call: Option<EventFd>) {
        self.call.set(call);
    }

    pub fn set_err(&self, err: Option<EventFd>) {
        self.err.set(err);
    }
}

/// Turns an fd from the frontend into an EventFd, refusing anything that is not an eventfd: a
/// pipe or a regular file would behave differently under poll/read/write (a file is always
/// readable, so a kick "file" would make the dispatcher spin).
///
/// The fd's flags are left as the peer set them: they live on the open file description it
/// shares with us, so it could clear an O_NONBLOCK of ours at any time. Every read and write of
/// these fds goes through `peer_fd`, which never depends on them.
pub fn eventfd_from_peer(fd: OwnedFd, what: &'static str) -> Result<EventFd, String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("{what}: cannot inspect the fd: {e}"))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        // The link names whatever the peer sent (a file it named itself): escaped.
        return Err(format!(
            "{what}: the fd is not an eventfd ({})",
            escape_os_for_log(link.as_os_str())
        ));
    }
    // SAFETY: the raw fd comes from an OwnedFd we give up here, so the EventFd is its only owner.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_eventfd_named_to_forge_log_lines_is_refused_on_one_line() {
        let path = crate::test_util::temp_path("kick\nERROR forged line");
        let file = std::fs::File::create(&path).unwrap();
        let err = eventfd_from_peer(OwnedFd::from(file), "SET_VRING_KICK").unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(!err.contains('\n'), "{err}");
        assert!(err.contains("kick\\nERROR forged line"), "{err}");
    }
}
