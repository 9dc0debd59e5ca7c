//! The `uring` I/O engine's dispatcher loop: one queue's reads, writes and flushes go to the
//! kernel through an io_uring ([`UringEngine`]), straight from and into guest memory.
//!
//! ```text
//!  guest kick ─► kick eventfd ───────┐
//!                                    ├─► dispatcher: pop, check, push ops ─► io_uring_enter
//!  io_uring ─► completion eventfd ───┘   reap, status bytes ─► one publish ─► used ring, call
//! ```
//!
//! Each round pops what the avail ring holds (heads left by an inflight recovery first, as the
//! inline engine does) and handles each request one of three ways:
//!
//! - **A read or write whose checks pass** ([`BlkRequest::transfer`]: status byte, read-only
//!   disk, byte range, buffers in guest memory) becomes one [`UringOp`] whose iovecs are the
//!   host addresses of its guest buffers: no bounce buffer, no copy in user space. A buffer that
//!   runs from one memory region into an adjacent one (the bounds check accepts that) becomes one
//!   iovec per region, since the two mappings need not be adjacent in our address space.
//! - **A flush** waits until every op before it has completed (io_uring does not order an fsync
//!   after writes still in flight), then becomes a [`UringOp::Flush`].
//! - **Everything else** runs synchronously through [`BlkRequest::execute`], exactly as the
//!   inline engine runs it: GET_ID, unsupported types, requests that fail a check (the status
//!   they get is `execute`'s), a flush on a read-only disk, and the rare read or write the engine
//!   cannot take as it is: more iovecs than the kernel accepts in one op (`UIO_MAXIOV`), or, on
//!   an image opened with O_DIRECT, a buffer not aligned to 512 bytes (`execute` moves those
//!   through its aligned bounce buffer).
//!
//! All pushed ops start with one `io_uring_enter`; then whatever has completed is reaped (reads
//! from the page cache complete during the submit itself): each op's status byte is written (OK,
//! or IOERR for any error or short result), and everything finished in the round reaches the
//! used ring in one [`publish_and_signal`] (inflight tracking around it, one used-index store, at
//! most one interrupt). An op that fails with `EFAULT` found guest memory gone under it (the
//! frontend truncated its memory fd; the kernel's copy faults where our own access would raise
//! SIGBUS): IOERR, as [`RequestError::MemoryVanished`] is for the other engines. An op error is
//! logged and answered, never a panic.
//!
//! With ops in flight the dispatcher sleeps in `poll()` on the completion, stop and kick
//! eventfds, with the driver's kicks off (requests it adds meanwhile are popped at the next
//! completion). With nothing in flight it does what `serve_kicks` does: spins a little, turns
//! kicks on, looks at the ring once more, then sleeps on the kick and stop eventfds.
//!
//! A queue holds at most `min(ring size, MAX_REQUESTS_IN_FLIGHT)` requests popped and not
//! published (the engine's depth), and iovec arrays within [`IN_FLIGHT_BOOKKEEPING_BUDGET`];
//! beyond either, requests wait in the avail ring.
//!
//! **Stop**: popping stops, every op in flight is waited for (reaped until the engine has none)
//! and published, and only then does the dispatcher return. The stop's caller may unmap guest
//! memory right after (a new memory table, the session's end), and the kernel must not write
//! into it then.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::queue_stats::QueueStats;
use super::queue_worker::{
    avail_idx_addr, new_request_within, pop_chain, publish_and_signal, readable_within,
    set_notifications, AdaptiveSpin, Fetch, QueueShared, Resubmission,
    IN_FLIGHT_BOOKKEEPING_BUDGET, MAX_REQUESTS_IN_FLIGHT,
};
use super::request::{self, BlkRequest, Completion, GuestBuffer, RequestError, RequestKind};
use super::uring::{UringEngine, UringOp};
use crate::vhost_user_server::peer_fd;

/// Iovecs one op may carry: the kernel's UIO_MAXIOV (more fails the op with EINVAL).
const MAX_IOVECS: usize = 1024;

/// O_DIRECT wants each buffer's address and length to be a multiple of the storage's logical
/// block: 512 bytes on the storage this backend supports (the inline engine's bounce buffer
/// moves sector multiples too).
const DIRECT_ALIGN: usize = 512;

/// How long to wait before trying again a submission the kernel refused for now (EAGAIN,
/// EBUSY): the ops it did not take cannot complete, so their completion must not be awaited.
const RETRY_SUBMIT_AFTER: Duration = Duration::from_millis(1);

/// How long `drain` waits on the completion fd when waiting in the kernel fails.
const DRAIN_POLL: Duration = Duration::from_millis(10);

/// The io_uring for one queue, as deep as the queue may have requests in flight. `None` where
/// io_uring is unavailable (disabled by `kernel.io_uring_disabled`, refused by a seccomp filter,
/// an old kernel): the queue is then served by the inline engine, which the log says (a
/// warning the first time in this process, then at debug level, once per queue start).
pub(super) fn start_engine(shared: &QueueShared, queue_size: usize) -> Option<UringEngine> {
    // At most MAX_REQUESTS_IN_FLIGHT (256): within the engine's MAX_DEPTH and a u32.
    let depth = queue_size.clamp(1, MAX_REQUESTS_IN_FLIGHT) as u32;
    match UringEngine::new(shared.disk.file(), depth) {
        Ok(engine) => Some(engine),
        Err(e) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if WARNED.swap(true, Ordering::Relaxed) {
                debug!(
                    queue = shared.index,
                    "io_uring unavailable ({e}): the queue uses the inline I/O engine"
                );
            } else {
                warn!(
                    queue = shared.index,
                    "io_uring unavailable ({e}): the queue uses the inline I/O engine instead \
                     of uring (and so will every later queue that cannot build one)"
                );
            }
            None
        }
    }
}

/// Serves the queue through `engine` until it is stopped (or its ring broke and then it is
/// stopped); returns only once every op it started has completed and been published.
pub(super) fn serve(
    shared: &QueueShared,
    kick: &EventFd,
    stop: &EventFd,
    engine: UringEngine,
    resubmission: &mut Option<Resubmission>,
) {
    let direct = opened_with_o_direct(shared.disk.file());
    let mut path = UringPath {
        shared,
        ops: HashMap::with_capacity(engine.depth()),
        done: Vec::with_capacity(engine.depth()),
        engine,
        direct,
        next_token: 0,
        held_bytes: 0,
        submit_failed: false,
    };
    path.serve(kick, stop, resubmission);
    // Stopping: the guest memory the ops point into may be unmapped once we return.
    path.drain();
    path.publish();
    // The next backend (or this one after a restart) starts with kicks on.
    set_notifications(shared, true);
}

fn opened_with_o_direct(file: &std::fs::File) -> bool {
    // SAFETY: F_GETFL reads the status flags of a valid open fd; nothing else is touched.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Read,
    Write,
    Flush,
}

/// A request whose op is in the engine: what completing it needs.
#[derive(Debug)]
struct InFlight {
    head: u16,
    status_addr: GuestAddress,
    kind: OpKind,
    /// Bytes the op moves (0 for a flush).
    len: u64,
    /// Its bookkeeping bytes (this and its iovec array), against the queue's budget.
    cost: usize,
}

impl InFlight {
    /// Writes the status byte for the op's `result` and says what the used ring gets.
    fn complete(self, shared: &QueueShared, result: io::Result<u64>) -> Completion {
        let status = match result {
            Ok(moved) if moved == self.len => VIRTIO_BLK_S_OK,
            Ok(moved) => {
                warn!(
                    queue = shared.index,
                    head = self.head,
                    "virtio-blk: io_uring {:?} moved {moved} of {} bytes",
                    self.kind,
                    self.len
                );
                VIRTIO_BLK_S_IOERR
            }
            Err(e) => {
                // The buffers were checked to lie in guest memory: a fault on them means their
                // pages are gone (the frontend shrank its memory fd).
                let e = if e.raw_os_error() == Some(libc::EFAULT) {
                    RequestError::MemoryVanished
                } else {
                    RequestError::Disk(e)
                };
                warn!(queue = shared.index, head = self.head, "virtio-blk: {e}");
                VIRTIO_BLK_S_IOERR
            }
        };
        let data_written = if status == VIRTIO_BLK_S_OK && self.kind == OpKind::Read {
            // A chain holds less than 4 GiB in all; saturate as `execute` does.
            u32::try_from(self.len).unwrap_or(u32::MAX)
        } else {
            0
        };
        request::finish(
            &shared.mem,
            self.head,
            self.status_addr,
            status as u8,
            data_written,
        )
    }
}

/// The dispatcher's state while it serves a queue through an io_uring.
struct UringPath<'a> {
    shared: &'a QueueShared,
    engine: UringEngine,
    /// The image was opened with O_DIRECT: ops need aligned buffers.
    direct: bool,
    /// The requests whose op is in the engine, by the op's token.
    ops: HashMap<u64, InFlight>,
    next_token: u64,
    /// `ops`' bookkeeping bytes, against IN_FLIGHT_BOOKKEEPING_BUDGET.
    held_bytes: usize,
    /// Completed requests (reaped, or run synchronously) not yet published.
    done: Vec<Completion>,
    /// The kernel refused (part of) the last submission: retry soon rather than wait for
    /// completions of ops it never started.
    submit_failed: bool,
}

impl UringPath<'_> {
    /// The loop of rounds and sleeps; returns when the queue is stopped (ops may be in flight).
    fn serve(&mut self, kick: &EventFd, stop: &EventFd, resubmission: &mut Option<Resubmission>) {
        let shared = self.shared;
        let mut kick_usable = true;
        // False once the ring is broken: nothing more is popped, what is in flight completes.
        let mut popping = true;
        let mut spin = AdaptiveSpin::new();
        let avail_idx_addr = avail_idx_addr(shared);
        // While we work, the driver need not kick us (as in `serve_kicks`).
        set_notifications(shared, false);
        loop {
            // The guest may have queued requests before the kick fd was (re)connected: the first
            // round looks without a kick.
            let fetch = if popping {
                self.fill(resubmission)
            } else {
                Fetch::Idle
            };
            if fetch == Fetch::Broken {
                popping = false;
            }
            self.submit();
            self.reap();
            self.publish();
            if shared.stopping.load(Ordering::Acquire) {
                return;
            }
            if fetch == Fetch::Throttled && self.has_room() {
                continue; // reaping made room
            }
            let idle = self.engine.in_flight() == 0;
            let ring_empty = popping && fetch == Fetch::Idle;
            if idle && ring_empty {
                let window = spin.window();
                if let (false, Some(addr)) = (window.is_zero(), avail_idx_addr) {
                    let spun = Instant::now();
                    let hit = new_request_within(shared, addr, window);
                    QueueStats::add_elapsed(&shared.stats.spin_ns, spun);
                    if hit {
                        QueueStats::add(&shared.stats.spin_hits, 1);
                        continue;
                    }
                    QueueStats::add(&shared.stats.spin_misses, 1);
                }
                // About to sleep with nothing in flight: kicks on, then look once more, or a
                // request published before the driver saw them on would wait for a kick it
                // never sends.
                if set_notifications(shared, true) {
                    set_notifications(shared, false);
                    continue;
                }
            }
            // Throttled, a kick changes nothing: wait for completions (the kick stays pending).
            let watch_kick = kick_usable && popping && fetch != Fetch::Throttled;
            let slept = Instant::now();
            let woke = wait(
                stop,
                (!idle).then(|| self.engine.completion_fd()),
                watch_kick.then_some(kick),
                self.submit_failed.then_some(RETRY_SUBMIT_AFTER),
            );
            QueueStats::add_elapsed(&shared.stats.sleep_ns, slept);
            if idle && ring_empty {
                spin.slept(slept.elapsed());
            }
            match woke {
                Ok(Woke { stop: true, .. }) => return,
                Ok(Woke { kick: true, .. }) => {
                    QueueStats::add(&shared.stats.kicks, 1);
                    // Reset the counter before the next round: a later kick wakes us again.
                    // The fd is the peer's: the read must not depend on its O_NONBLOCK.
                    if let Err(e) = peer_fd::drain(kick) {
                        warn!(
                            queue = shared.index,
                            "kick fd unreadable, serving completions until stop: {e}"
                        );
                        kick_usable = false;
                    } else if idle {
                        set_notifications(shared, false);
                    }
                }
                // Completions (reaped at the top of the next round) or a retry.
                Ok(_) => {}
                Err(e) => {
                    error!(
                        queue = shared.index,
                        "poll failed, serving completions until stop: {e}"
                    );
                    kick_usable = false;
                    // Do not spin on a failing poll; completions are looked at every round.
                    readable_within(stop, RETRY_SUBMIT_AFTER);
                }
            }
        }
    }

    /// Room for another request: the engine has a free slot, the completions waiting to be
    /// published and the ops in flight fit one publish, and the bookkeeping is under budget.
    fn has_room(&self) -> bool {
        self.engine.in_flight() + self.done.len() < self.engine.depth()
            && self.held_bytes < IN_FLIGHT_BOOKKEEPING_BUDGET
    }

    /// One round of popping: every available request (resubmitted heads first) is started or
    /// run, while there is room.
    fn fill(&mut self, resubmission: &mut Option<Resubmission>) -> Fetch {
        let shared = self.shared;
        QueueStats::add(&shared.stats.rounds, 1);
        while !shared.stopping.load(Ordering::Acquire) {
            if !self.has_room() {
                return Fetch::Throttled;
            }
            let request = if let Some(request) = resubmission.as_mut().and_then(Resubmission::next)
            {
                // Still marked inflight with its old counter; it completes like any other.
                request
            } else {
                match pop_chain(shared) {
                    Ok(Some((chain, _more))) => BlkRequest::parse(chain),
                    Ok(None) => return Fetch::Idle,
                    Err(e) => {
                        error!(
                            queue = shared.index,
                            "virtqueue is broken, no longer served: {e}"
                        );
                        shared.err.signal();
                        return Fetch::Broken;
                    }
                }
            };
            self.start(&request);
        }
        Fetch::Idle
    }

    /// Pushes the request's op to the engine, or runs it synchronously (see the module docs).
    fn start(&mut self, request: &BlkRequest) {
        let shared = self.shared;
        if let Some(transfer) = request.transfer(&shared.mem, &shared.disk) {
            if let Some(iovecs) = iovecs(&shared.mem, transfer.buffers, self.direct) {
                let offset = transfer.offset;
                let (kind, op) = if transfer.write {
                    (OpKind::Write, UringOp::Write { offset, iovecs })
                } else {
                    (OpKind::Read, UringOp::Read { offset, iovecs })
                };
                self.push(request, transfer.status_addr, kind, transfer.len, op);
                return;
            }
        } else if let Some(status_addr) = flush_status_addr(request, &shared.disk) {
            // Only once every write before it has completed: the kernel would run an fsync
            // alongside writes still in flight, not after them.
            self.drain();
            self.push(request, status_addr, OpKind::Flush, 0, UringOp::Flush);
            return;
        }
        self.run_sync(request);
    }

    fn push(
        &mut self,
        request: &BlkRequest,
        status_addr: GuestAddress,
        kind: OpKind,
        len: u64,
        op: UringOp,
    ) {
        let iovec_bytes = match &op {
            UringOp::Read { iovecs, .. } | UringOp::Write { iovecs, .. } => {
                iovecs.len() * std::mem::size_of::<libc::iovec>()
            }
            UringOp::Flush => 0,
        };
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        // SAFETY: the iovecs name guest memory only (`iovecs` built them from checked guest
        // buffers): mappings of the queue's `GuestMemoryMmap`, which `shared` keeps alive, and
        // to which this process holds no Rust reference (every access of ours is a volatile
        // copy through vm-memory). The guest may touch those bytes meanwhile, as it may during
        // any device access. They stay mapped until the op is reaped: the dispatcher reaps
        // every op before it returns (`serve` drains at stop), and a stop, which comes before
        // any unmapping of guest memory, waits for the dispatcher. Memory that vanishes (the
        // frontend truncating its fd) fails the op with EFAULT, which the contract tolerates.
        match unsafe { self.engine.push(token, op) } {
            Ok(()) => {
                let cost = std::mem::size_of::<InFlight>() + iovec_bytes;
                self.held_bytes += cost;
                let head = request.head;
                self.ops.insert(
                    token,
                    InFlight {
                        head,
                        status_addr,
                        kind,
                        len,
                        cost,
                    },
                );
            }
            // Cannot happen (`has_room` keeps a slot free, a flush comes after `drain`); the
            // request still gets its answer.
            Err(_) => self.run_sync(request),
        }
    }

    /// Runs the request as the inline engine does.
    fn run_sync(&mut self, request: &BlkRequest) {
        let started = Instant::now();
        self.done
            .push(request.execute(&self.shared.mem, &self.shared.disk));
        QueueStats::add_elapsed(&self.shared.stats.io_ns, started);
    }

    /// Starts everything pushed since the last submit.
    fn submit(&mut self) {
        let started = Instant::now();
        match self.engine.submit() {
            Ok(()) => self.submit_failed = false,
            Err(e) => self.submission_failed(&e),
        }
        QueueStats::add_elapsed(&self.shared.stats.io_ns, started);
    }

    fn submission_failed(&mut self, e: &io::Error) {
        // Logged once per run of failures: the dispatcher retries every RETRY_SUBMIT_AFTER.
        if !self.submit_failed {
            warn!(
                queue = self.shared.index,
                "io_uring submission failed, retrying: {e}"
            );
        }
        self.submit_failed = true;
    }

    /// Completes every op whose completion is waiting: status byte, then into `done`.
    fn reap(&mut self) {
        let started = Instant::now();
        let shared = self.shared;
        let UringPath {
            engine,
            ops,
            held_bytes,
            done,
            ..
        } = self;
        let reaped = engine.reap(|token, result| match ops.remove(&token) {
            Some(op) => {
                *held_bytes -= op.cost;
                done.push(op.complete(shared, result));
            }
            None => warn!(
                queue = shared.index,
                token, "io_uring completion for no request ignored"
            ),
        });
        // Ops that came back short and could not be resubmitted stay queued for the next
        // submit: make sure there is one.
        if let Err(e) = reaped {
            self.submission_failed(&e);
        }
        QueueStats::add_elapsed(&shared.stats.io_ns, started);
    }

    /// Waits for and reaps every op in flight.
    fn drain(&mut self) {
        while self.engine.in_flight() > 0 {
            // Submits whatever is queued, then blocks until a completion is posted.
            if let Err(e) = self.engine.wait_one() {
                warn!(
                    queue = self.shared.index,
                    in_flight = self.engine.in_flight(),
                    "waiting for io_uring completions failed, polling: {e}"
                );
                readable_within(self.engine.completion_fd(), DRAIN_POLL);
            }
            self.reap();
        }
    }

    /// Publishes the completions collected (at most the engine's depth: `has_room`) at once.
    fn publish(&mut self) {
        if self.done.is_empty() {
            return;
        }
        debug_assert!(self.done.len() <= MAX_REQUESTS_IN_FLIGHT);
        publish_and_signal(self.shared, &self.done);
        self.done.clear();
    }
}

/// The status byte of a well-formed FLUSH on a writable disk (one the engine runs); `None` for
/// any other request.
fn flush_status_addr(request: &BlkRequest, disk: &super::disk::Disk) -> Option<GuestAddress> {
    let body = request.body.as_ref().ok()?;
    if body.kind != RequestKind::Flush || disk.is_readonly() {
        return None;
    }
    request.status_addr
}

/// The host addresses of `buffers` (checked to lie in guest memory) as iovecs, one per buffer
/// and region it touches: a buffer may run from one region into the next (adjacent in guest
/// physical memory, not necessarily in our address space). `None` when the engine cannot take
/// them as they are: more than MAX_IOVECS, or, for an O_DIRECT image (`direct`), a piece whose
/// address or length is not a multiple of DIRECT_ALIGN.
fn iovecs(
    mem: &GuestMemoryMmap,
    buffers: &[GuestBuffer],
    direct: bool,
) -> Option<Vec<libc::iovec>> {
    let mut iovecs = Vec::with_capacity(buffers.len());
    for buffer in buffers {
        for slice in GuestMemoryBackend::get_slices(mem, buffer.addr, buffer.len as usize) {
            let slice = slice.ok()?;
            let base = slice.ptr_guard_mut().as_ptr();
            if direct && !(base as usize | slice.len()).is_multiple_of(DIRECT_ALIGN) {
                return None;
            }
            if iovecs.len() == MAX_IOVECS {
                return None;
            }
            iovecs.push(libc::iovec {
                iov_base: base.cast(),
                iov_len: slice.len(),
            });
        }
    }
    Some(iovecs)
}

/// What woke a sleeping dispatcher (several at once are possible).
#[derive(Debug, Default)]
struct Woke {
    stop: bool,
    kick: bool,
}

/// Blocks until the stop fd, the completion fd (if given), the kick fd (if given) is readable,
/// or `timeout` has passed.
fn wait(
    stop: &EventFd,
    completions: Option<&EventFd>,
    kick: Option<&EventFd>,
    timeout: Option<Duration>,
) -> io::Result<Woke> {
    let pollfd = |fd: Option<&EventFd>| libc::pollfd {
        // A negative fd is ignored by poll.
        fd: fd.map_or(-1, AsRawFd::as_raw_fd),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [pollfd(Some(stop)), pollfd(completions), pollfd(kick)];
    let timeout_ms = timeout.map_or(-1, |t| {
        libc::c_int::try_from(t.as_millis().max(1)).unwrap_or(libc::c_int::MAX)
    });
    loop {
        // SAFETY: `fds` is a valid array of 3 pollfd structs that outlives the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 3, timeout_ms) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let [stop, _, kick] = &fds;
        if kick.revents & !libc::POLLIN != 0 {
            return Err(io::Error::other(format!(
                "kick fd reported poll events {:#x}",
                kick.revents
            )));
        }
        return Ok(Woke {
            stop: stop.revents != 0,
            kick: kick.revents & libc::POLLIN != 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryRegion;

    fn buffer(addr: u64, len: u32) -> GuestBuffer {
        GuestBuffer {
            addr: GuestAddress(addr),
            len,
        }
    }

    /// Two regions adjacent in guest physical memory (separate anonymous mappings, so not
    /// adjacent in ours): a buffer across the boundary becomes two iovecs, one in each.
    #[test]
    fn a_buffer_across_two_regions_becomes_one_iovec_per_region() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
        ])
        .unwrap();
        let host = |addr: u64| mem.get_host_address(GuestAddress(addr)).unwrap() as usize;
        let regions: Vec<_> = mem.iter().map(|r| r.start_addr().0).collect();
        assert_eq!(regions, [0, 0x10000]);
        let got = iovecs(&mem, &[buffer(0xf000, 0x2000), buffer(0x400, 0x200)], true).unwrap();
        let got: Vec<(usize, usize)> = got
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_len))
            .collect();
        assert_eq!(
            got,
            [
                (host(0xf000), 0x1000),
                (host(0x10000), 0x1000),
                (host(0x400), 0x200)
            ]
        );
        // No buffers: no iovecs (a zero-length op, which completes with 0 bytes).
        assert_eq!(iovecs(&mem, &[], true).map(|v| v.len()), Some(0));
    }

    #[test]
    fn unaligned_buffers_for_o_direct_and_too_many_iovecs_are_left_to_execute() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x200000)]).unwrap();
        // 16 bytes into a page (header and data in one descriptor), or an odd length.
        for unaligned in [buffer(0x1010, 512), buffer(0x1000, 100)] {
            assert!(iovecs(&mem, &[unaligned], true).is_none(), "{unaligned:?}");
            assert_eq!(iovecs(&mem, &[unaligned], false).map(|v| v.len()), Some(1));
        }
        let many: Vec<GuestBuffer> = (0..MAX_IOVECS as u64 + 1)
            .map(|i| buffer(i * 512, 512))
            .collect();
        assert_eq!(
            iovecs(&mem, &many[..MAX_IOVECS], true).map(|v| v.len()),
            Some(MAX_IOVECS)
        );
        assert!(iovecs(&mem, &many, false).is_none());
        // Not in guest memory (the transfer check refuses this first): no iovecs either.
        assert!(iovecs(&mem, &[buffer(0x1ff000, 0x2000)], false).is_none());
    }
}
