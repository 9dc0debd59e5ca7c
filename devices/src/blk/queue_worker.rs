//! Serving one virtqueue: the data path of the backend.
//!
//! ```text
//!  guest kick ─► kick eventfd ─► dispatcher thread ──(parsed requests)──► I/O threads (pread/pwrite)
//!                                  pops chains under                        │
//!                                  the queue lock                            ▼
//!  guest irq ◄── call eventfd ◄──────────────────────────── add_used under the queue lock
//! ```
//!
//! A lone request on an idle queue is executed by the dispatcher itself (queue depth 1 then
//! costs no thread hand-off); batches go to the I/O threads. That is `IoEngine::Threads`; with
//! `IoEngine::Inline` the dispatcher runs every request itself, and with `IoEngine::Uring` it
//! hands them to an io_uring and publishes them as they complete (`uring_path`).
//!
//! Requests complete out of order: several I/O threads work on one queue, and each adds its
//! request to the used ring (under the lock that also guards popping) as soon as it is done,
//! then writes the call eventfd. Stopping a worker (GET_VRING_BASE, a replaced kick fd, a new
//! memory table, SET_VRING_ENABLE 0) stops popping first, then waits until every popped request
//! has reached the used ring, so the returned avail index tells exactly what was consumed.
//!
//! Inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, `inflight`): `pop_chain` is the
//! single place a head leaves the avail ring (it marks the head inflight) and `complete` the
//! single place it reaches the used ring (it links, publishes, then clears); both run under the
//! queue lock, so the region always tells which consumed heads have not been completed. A worker
//! started on a ring with a region first recovers it: heads a killed backend left inflight run
//! again, in fetch order, before any new chain is popped.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::Disk;
use super::inflight::{QueueTracker, RecoveryError, ResubmitParser, Rollback};
use super::planted_flaw::{PlantedFlaw, PlantedFlaws};
use super::queue_stats::QueueStats;
use super::request::{BlkRequest, Completion};
use super::uring_path;
use crate::vhost_user_server::notifier::Notifier;
use crate::vhost_user_server::peer_fd;
use crate::vhost_user_server::{RingSetup, RingWorker};

/// I/O threads per queue: enough for several requests in flight without a thread per request.
pub const IO_THREADS_PER_QUEUE: usize = 4;

/// Requests one queue may have popped and not yet completed.
///
/// With [`IN_FLIGHT_BOOKKEEPING_BUDGET`] this bounds what a guest can make a queue hold when the
/// I/O threads fall behind, whatever the ring size: a 32768-entry ring of 4096-descriptor chains
/// would otherwise be ~2 GiB of buffer lists. When either limit is reached the dispatcher stops
/// popping until a completion frees room: the requests wait in the avail ring, none is dropped
/// or failed.
pub const MAX_REQUESTS_IN_FLIGHT: usize = 256;

/// Bytes of per-request bookkeeping (the request and its parsed buffer lists) one queue may hold
/// in flight. A request is admitted whole while the queue is under budget, so the most a queue
/// holds is this plus one request (at most ~128 KiB: `MAX_CHAIN_DESCRIPTORS` buffers of 16 bytes,
/// twice for vector growth).
pub const IN_FLIGHT_BOOKKEEPING_BUDGET: usize = 1 << 20;

/// How often a stopping queue releases writers of ours that a peer wedged on a full call or err
/// counter (`peer_fd`'s residual window) while it waits for its threads.
const STOP_RESCUE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// A random wait in `min..=max` before each completion is published (a test option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompletionDelay {
    pub min: Duration,
    pub max: Duration,
}

/// A `--delay-completions` value that is not `MIN_US-MAX_US` with MIN <= MAX.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("completion delay {0:?} is not MIN_US-MAX_US (microseconds, MIN <= MAX)")]
pub struct CompletionDelayError(String);

impl FromStr for CompletionDelay {
    type Err = CompletionDelayError;

    /// `MIN_US-MAX_US`, e.g. `1000-20000` for 1 to 20 ms.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CompletionDelayError(s.to_string());
        let (min, max) = s.split_once('-').ok_or_else(err)?;
        let min: u64 = min.trim().parse().map_err(|_| err())?;
        let max: u64 = max.trim().parse().map_err(|_| err())?;
        if min > max {
            return Err(err());
        }
        Ok(CompletionDelay {
            min: Duration::from_micros(min),
            max: Duration::from_micros(max),
        })
    }
}

impl CompletionDelay {
    /// A delay in the range, from a per-thread xorshift state.
    fn pick(&self, state: &mut u64) -> Duration {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        let span = self.max.saturating_sub(self.min).as_micros();
        let span = u64::try_from(span).unwrap_or(u64::MAX);
        let extra = match span.checked_add(1) {
            Some(choices) => *state % choices,
            None => *state,
        };
        self.min.saturating_add(Duration::from_micros(extra))
    }
}

/// Who runs a queue's disk I/O (`vmm blk-backend --io-engine`, `--blk ...,engine=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// The queue's dispatcher thread runs every request it pops itself (pread/pwrite), a batch
    /// at a time, and publishes the batch at once. No thread hand-off: the fastest on a
    /// page-cached image and a small host, where the guest's vCPU and the backend share cores.
    #[default]
    Inline,
    /// Requests go to [`IO_THREADS_PER_QUEUE`] I/O threads and complete out of order (a lone
    /// request on an idle queue still runs inline). Overlaps requests that block on a device
    /// (O_DIRECT on a slow disk) at the price of two thread wake-ups per request.
    Threads,
    /// The dispatcher hands reads, writes and flushes to an io_uring (`uring_path`), with
    /// iovecs straight into guest memory, and publishes them as they complete: many requests in
    /// flight from one thread, no bounce copy. Meant for images opened with O_DIRECT (where it
    /// beats the others several times over at 8 or more requests in flight); on a page-cached
    /// image `inline` is faster. Where io_uring is unavailable the queue falls back to `inline`
    /// (with a warning).
    Uring,
}

/// An `--io-engine` value that is not `inline`, `threads` or `uring`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("I/O engine {0:?} is not one of: inline, threads, uring")]
pub struct IoEngineError(String);

impl FromStr for IoEngine {
    type Err = IoEngineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inline" => Ok(IoEngine::Inline),
            "threads" => Ok(IoEngine::Threads),
            "uring" => Ok(IoEngine::Uring),
            _ => Err(IoEngineError(s.to_string())),
        }
    }
}

impl std::fmt::Display for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoEngine::Inline => "inline",
            IoEngine::Threads => "threads",
            IoEngine::Uring => "uring",
        })
    }
}

/// How a queue is served, beyond its ring: the backend's options.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueueOptions {
    pub engine: IoEngine,
    /// The `--delay-completions` test option (see [`CompletionDelay`]); it implies
    /// [`IoEngine::Threads`] (a delay must not hold the dispatcher).
    pub completion_delay: Option<CompletionDelay>,
    /// Test builds only (`planted_flaw`).
    pub flaws: PlantedFlaws,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue {index}: ring size {size} is not a power of two in 1..=32768")]
    InvalidSize { index: u16, size: u16 },
    #[error("queue {index}: bad ring address: {source}")]
    BadRing {
        index: u16,
        source: virtio_queue::Error,
    },
    #[error("queue {index}: the rings do not lie in guest memory")]
    RingsNotInMemory { index: u16 },
    #[error("queue {index}: cannot create the stop eventfd or spawn a thread: {source}")]
    Os { index: u16, source: io::Error },
    /// The inflight region cannot be recovered for this ring (ring not started).
    #[error("queue {index}: inflight region refused: {source}")]
    Inflight { index: u16, source: RecoveryError },
}

/// The ring and its inflight record, changed together under the queue lock.
#[derive(Debug)]
struct Ring {
    queue: Queue,
    inflight: Option<QueueTracker>,
    /// The used index when we last decided whether to interrupt (EVENT_IDX's `old`: an
    /// interrupt is due when used_event lies in `signalled_used..next_used`). `None` until the
    /// first publish after a start: an earlier backend (killed, or stopped for a reconnect) may
    /// have published entries without signalling them, and a driver waiting for one of those
    /// would never be woken by `old..new` tests that start past them (Linux vhost's
    /// `signalled_used_valid`). The first publish therefore interrupts whenever the driver takes
    /// interrupts at all.
    signalled_used: Option<u16>,
    /// An empty batch with capacity, swapped with `QueueShared::finished` by the publisher, so
    /// steady-state publishing allocates nothing.
    spare_batch: Vec<Completion>,
}

/// Heads a killed backend left inflight, to run again before anything new is popped; only the
/// dispatcher uses it.
#[derive(Debug)]
pub(super) struct Resubmission {
    heads: VecDeque<u16>,
    parser: ResubmitParser,
    /// Planted flaw [`PlantedFlaw::AckResubmittedWithoutWriting`].
    ack_writes_without_writing: bool,
}

/// State shared by the dispatcher and the I/O threads of one queue.
#[derive(Debug)]
pub(super) struct QueueShared {
    pub(super) index: u16,
    /// Set before the stop eventfd is written: a guest that keeps the avail ring full must not
    /// keep the dispatcher from noticing the stop.
    pub(super) stopping: AtomicBool,
    /// Requests handed to the I/O threads and not completed yet.
    in_flight: AtomicUsize,
    /// Their bookkeeping bytes (`bookkeeping_bytes`), against `IN_FLIGHT_BOOKKEEPING_BUDGET`.
    in_flight_bytes: AtomicUsize,
    /// The most `in_flight_bytes` has been (what the budget test checks).
    peak_in_flight_bytes: AtomicUsize,
    /// The dispatcher stopped popping for want of room and waits on `room`.
    throttled: AtomicBool,
    /// Written by an I/O thread that frees room while the dispatcher is throttled. Our own fd.
    room: EventFd,
    /// Tests hold this for writing to make the I/O threads fall behind.
    #[cfg(test)]
    test_io_gate: std::sync::RwLock<()>,
    /// Tests make the worker "die" here, as if the process were SIGKILLed.
    #[cfg(test)]
    test_crash: tests::TestCrash,
    queue: Mutex<Ring>,
    /// Completions waiting to be published: whichever thread next holds the queue lock
    /// publishes all of them as one batch (one inflight batch, one interrupt).
    finished: Mutex<Vec<Completion>>,
    /// Test builds only (`planted_flaw`); empty otherwise.
    flaws: PlantedFlaws,
    pub(super) mem: Arc<GuestMemoryMmap>,
    pub(super) disk: Arc<Disk>,
    call: Arc<Notifier>,
    pub(super) err: Arc<Notifier>,
    completion_delay: Option<CompletionDelay>,
    engine: IoEngine,
    pub(super) stats: QueueStats,
}

/// A running queue: its dispatcher thread and I/O threads.
#[derive(Debug)]
pub struct QueueWorker {
    index: u16,
    started_at: u16,
    stop: EventFd,
    /// Written by the dispatcher when it has finished (its I/O threads joined).
    done: EventFd,
    dispatcher: Option<JoinHandle<()>>,
    shared: Arc<QueueShared>,
}

impl QueueWorker {
    /// Checks the ring against guest memory and starts serving it.
    pub fn start(
        setup: RingSetup,
        disk: Arc<Disk>,
        options: QueueOptions,
    ) -> Result<Self, QueueError> {
        let QueueOptions {
            engine,
            completion_delay,
            flaws,
        } = options;
        let engine = if completion_delay.is_some() {
            IoEngine::Threads
        } else {
            engine
        };
        let mem = Arc::clone(&setup.memory);
        let index = setup.index;
        let mut queue = build_queue(&setup, &mem)?;
        let signalled_used = None;
        let (inflight, resubmission) = if flaws.has(PlantedFlaw::IgnoreInflightRegion) {
            (None, None)
        } else {
            recover_inflight(&setup, &mut queue, &mem, flaws)?
        };
        let started_at = queue.next_avail();
        let os_err = |source| QueueError::Os { index, source };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(os_err)?;
        let stop_for_thread = stop.try_clone().map_err(os_err)?;
        let done = EventFd::new(EFD_NONBLOCK).map_err(os_err)?;
        let done_for_thread = done.try_clone().map_err(os_err)?;
        let shared = Arc::new(QueueShared {
            index,
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            in_flight_bytes: AtomicUsize::new(0),
            peak_in_flight_bytes: AtomicUsize::new(0),
            throttled: AtomicBool::new(false),
            room: EventFd::new(EFD_NONBLOCK).map_err(os_err)?,
            #[cfg(test)]
            test_io_gate: std::sync::RwLock::new(()),
            #[cfg(test)]
            test_crash: tests::TestCrash::default(),
            queue: Mutex::new(Ring {
                queue,
                inflight,
                signalled_used,
                spare_batch: Vec::new(),
            }),
            finished: Mutex::new(Vec::new()),
            flaws,
            mem,
            disk,
            call: setup.call,
            err: setup.err,
            completion_delay,
            engine,
            stats: QueueStats::default(),
        });
        wake_a_driver_left_waiting(&shared);
        let kick = setup.kick;
        let queue_size = usize::from(setup.size);
        let thread_shared = Arc::clone(&shared);
        let dispatcher = thread::Builder::new()
            .name(format!("blk-q{index}"))
            .spawn(move || {
                let _done = SignalOnDrop(done_for_thread);
                dispatch(
                    thread_shared,
                    kick,
                    stop_for_thread,
                    queue_size,
                    resubmission,
                )
            })
            .map_err(os_err)?;
        debug!(queue = index, %engine, event_idx = setup.event_idx, "virtio-blk queue started");
        Ok(QueueWorker {
            index,
            started_at,
            stop,
            done,
            dispatcher: Some(dispatcher),
            shared,
        })
    }

    /// The avail index popping started at: SET_VRING_BASE's, or where inflight recovery put it.
    pub fn started_at(&self) -> u16 {
        self.started_at
    }

    /// Stops popping, waits for every popped request to complete, and returns the next avail
    /// index: where to resume (and what GET_VRING_BASE reports).
    pub fn stop(mut self) -> u16 {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> u16 {
        self.shared.stopping.store(true, Ordering::Release);
        if let Err(e) = self.stop.write(1) {
            error!(queue = self.index, "cannot signal the queue to stop: {e}");
        }
        // A thread of ours may sleep in a write to a call/err fd the peer filled between our
        // poll and our write (`peer_fd`); draining the full counter releases it.
        while !readable_within(&self.done, STOP_RESCUE_INTERVAL) {
            self.shared.call.unwedge();
            self.shared.err.unwedge();
        }
        if let Some(Err(_)) = self.dispatcher.take().map(JoinHandle::join) {
            error!(queue = self.index, "queue dispatcher thread panicked");
        }
        let next_avail = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queue
            .next_avail();
        info!(
            queue = self.index,
            next_avail, "virtio-blk queue stopped: {}", self.shared.stats
        );
        next_avail
    }
}

/// What the protocol server needs of a running queue (it stops it on GET_VRING_BASE and before
/// any change to the ring).
impl RingWorker for QueueWorker {
    fn started_at(&self) -> u16 {
        QueueWorker::started_at(self)
    }

    fn stop(self) -> u16 {
        QueueWorker::stop(self)
    }
}

/// Writes its eventfd (ours) when dropped, on unwinding too.
struct SignalOnDrop(EventFd);

impl Drop for SignalOnDrop {
    fn drop(&mut self) {
        let _ = self.0.write(1);
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if self.dispatcher.is_some() {
            self.stop_inner();
        }
    }
}

fn build_queue(setup: &RingSetup, mem: &GuestMemoryMmap) -> Result<Queue, QueueError> {
    let index = setup.index;
    let mut queue = Queue::new(setup.size).map_err(|_| QueueError::InvalidSize {
        index,
        size: setup.size,
    })?;
    let bad = |source| QueueError::BadRing { index, source };
    queue
        .try_set_desc_table_address(setup.rings.desc_table)
        .map_err(bad)?;
    queue
        .try_set_avail_ring_address(setup.rings.avail_ring)
        .map_err(bad)?;
    queue
        .try_set_used_ring_address(setup.rings.used_ring)
        .map_err(bad)?;
    queue.set_ready(true);
    queue.set_event_idx(setup.event_idx);
    if !queue.is_valid(mem) {
        return Err(QueueError::RingsNotInMemory { index });
    }
    queue.set_next_avail(setup.next_avail);
    // Every request consumed before this start has been completed (stop drains), so the used
    // ring's own index is where the next completion goes.
    let used_idx = queue.used_idx(mem, Ordering::Acquire).map_err(bad)?;
    queue.set_next_used(used_idx.0);
    Ok(queue)
}

/// With an inflight region: recovers it against the ring's used->idx (`inflight`), and starts
/// popping at `used->idx + resubmitted`, the first position a previous backend never consumed;
/// this overrides SET_VRING_BASE (as libvhost-user does), which after a crash is only the
/// frontend's guess (QEMU sends used->idx).
fn recover_inflight(
    setup: &RingSetup,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    flaws: PlantedFlaws,
) -> Result<(Option<QueueTracker>, Option<Resubmission>), QueueError> {
    let index = setup.index;
    let Some(region) = setup.inflight.clone() else {
        return Ok((None, None));
    };
    let refused = |source| QueueError::Inflight { index, source };
    let used_idx = queue.next_used();
    let rollback = if flaws.has(PlantedFlaw::RollBackOneEntry) {
        Rollback::OnlyTheHead
    } else {
        Rollback::WholeBatch
    };
    let (tracker, recovery) =
        QueueTracker::recover_with(region, setup.size, used_idx, rollback).map_err(refused)?;
    info!("{}", recovery.summary(index));
    // At most the ring size (distinct heads below it), so it fits a u16.
    let resubmitted = recovery.resubmit.len() as u16;
    let next_avail = used_idx.wrapping_add(resubmitted);
    if next_avail != setup.next_avail {
        info!(
            queue = index,
            "inflight recovery: resuming at avail index {next_avail} (used idx {used_idx} + \
             {resubmitted} resubmitted), not SET_VRING_BASE's {}",
            setup.next_avail
        );
    }
    queue.set_next_avail(next_avail);
    info!(target: "vhost", "{}", tracker.region().describe());
    let resubmission = if recovery.resubmit.is_empty() {
        None
    } else {
        let parser =
            ResubmitParser::new(mem, setup.rings.desc_table, setup.size, index).map_err(refused)?;
        Some(Resubmission {
            heads: recovery.resubmit.into(),
            parser,
            ack_writes_without_writing: flaws.has(PlantedFlaw::AckResubmittedWithoutWriting),
        })
    };
    Ok((Some(tracker), resubmission))
}

/// The dispatcher: waits for kicks, pops chains and runs them (`IoEngine::Inline`), hands
/// them to the I/O threads (`IoEngine::Threads`) or to an io_uring (`IoEngine::Uring`, see
/// `uring_path`). Returns when stopped, after the I/O threads or the io_uring have drained.
fn dispatch(
    shared: Arc<QueueShared>,
    kick: EventFd,
    stop: EventFd,
    queue_size: usize,
    mut resubmission: Option<Resubmission>,
) {
    if shared.engine == IoEngine::Uring {
        // None (logged) where io_uring is unavailable: the inline engine serves the queue then.
        if let Some(ring) = uring_path::start_engine(&shared, queue_size) {
            uring_path::serve(&shared, &kick, &stop, ring, &mut resubmission);
            drain_resubmission(&shared, None, &mut resubmission);
            return;
        }
    }
    if shared.engine != IoEngine::Threads {
        serve_kicks(&shared, &kick, &stop, None, &mut resubmission);
        drain_resubmission(&shared, None, &mut resubmission);
        return;
    }
    // In-flight requests never exceed MAX_REQUESTS_IN_FLIGHT, so neither does the channel.
    let (sender, receiver) = sync_channel::<Admitted>(queue_size.min(MAX_REQUESTS_IN_FLIGHT));
    let receiver = Arc::new(Mutex::new(receiver));
    let mut io_threads = Vec::with_capacity(IO_THREADS_PER_QUEUE);
    for n in 0..IO_THREADS_PER_QUEUE {
        let thread_shared = Arc::clone(&shared);
        let receiver = Arc::clone(&receiver);
        let spawned = thread::Builder::new()
            .name(format!("blk-q{}-io{n}", shared.index))
            .spawn(move || io_worker(thread_shared, receiver, io_thread_seed(n)));
        match spawned {
            Ok(handle) => io_threads.push(handle),
            Err(e) => error!(queue = shared.index, "cannot spawn I/O thread: {e}"),
        }
    }
    if io_threads.is_empty() {
        error!(
            queue = shared.index,
            "no I/O thread; the queue is not served"
        );
        shared.err.signal();
    } else {
        serve_kicks(&shared, &kick, &stop, Some(&sender), &mut resubmission);
        drain_resubmission(&shared, Some(&sender), &mut resubmission);
    }
    // Closing the channel lets each I/O thread finish what is queued, then exit.
    drop(sender);
    for handle in io_threads {
        let _ = handle.join();
    }
}

enum Wake {
    Kick,
    Room,
    Stop,
}

/// Where popping stands after `fetch_and_send` (or `uring_path`'s round).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fetch {
    /// The avail ring is empty (or we are stopping).
    Idle,
    /// The in-flight budget is used up: wait for `room`, not for kicks.
    Throttled,
    /// The ring is broken; nothing more is popped.
    Broken,
}

/// A request handed to the I/O threads, with the bookkeeping bytes it was admitted with.
type Admitted = (BlkRequest, usize);

/// The longest the dispatcher watches the avail index before it sleeps on the kick fd.
const SPIN_MAX: Duration = Duration::from_micros(20);
/// Where a spin window that grows again starts.
const SPIN_MIN: Duration = Duration::from_micros(2);
/// A sleep longer than this means the queue went idle: stop spinning until requests come
/// quickly again. (A sleep shorter than SPIN_MAX cannot be told from a busy queue here: the
/// kick's wake-up alone can take tens of microseconds on a loaded host.)
const IDLE_AFTER: Duration = Duration::from_millis(1);

/// How long to watch the avail ring before sleeping, adapted to what the last sleeps showed
/// (QEMU's AioContext polls the same way): a driver at queue depth 1 often publishes its next
/// request microseconds after our completion, and catching it by watching saves its kick (with
/// notifications off, it sends none) and our wake-up. A sleep longer than IDLE_AFTER shows the
/// queue went idle: the window drops to nothing, so an idle queue burns no CPU; it grows back,
/// doubling, with each wake-up that comes sooner.
#[derive(Debug)]
pub(super) struct AdaptiveSpin {
    window: Duration,
}

impl AdaptiveSpin {
    pub(super) fn new() -> Self {
        AdaptiveSpin { window: SPIN_MAX }
    }

    pub(super) fn window(&self) -> Duration {
        self.window
    }

    /// A sleep on the kick fd ended after `slept`.
    pub(super) fn slept(&mut self, slept: Duration) {
        self.window = if slept > IDLE_AFTER {
            Duration::ZERO
        } else {
            self.window.saturating_mul(2).clamp(SPIN_MIN, SPIN_MAX)
        };
    }
}

fn serve_kicks(
    shared: &QueueShared,
    kick: &EventFd,
    stop: &EventFd,
    sender: Option<&SyncSender<Admitted>>,
    resubmission: &mut Option<Resubmission>,
) {
    let mut kick_usable = true;
    let mut spin = AdaptiveSpin::new();
    // While we work, the driver need not kick us: notifications stay off until we are about to
    // sleep (used.flags NO_NOTIFY; with EVENT_IDX, an avail_event left behind does the same).
    set_notifications(shared, false);
    // The guest may have queued requests before the kick fd was (re)connected: look once first.
    let mut state = fetch_round(shared, sender, resubmission);
    let avail_idx_addr = avail_idx_addr(shared);
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            // Popping has stopped; the ring may still hold requests, so the checks below
            // would send us round again instead of to the stop fd.
            set_notifications(shared, true);
            return;
        }
        if state == Fetch::Idle {
            let window = spin.window();
            if !window.is_zero() {
                if let Some(addr) = avail_idx_addr {
                    let spun = Instant::now();
                    let hit = new_request_within(shared, addr, window);
                    QueueStats::add_elapsed(&shared.stats.spin_ns, spun);
                    if hit {
                        QueueStats::add(&shared.stats.spin_hits, 1);
                        state = fetch_round(shared, sender, resubmission);
                        continue;
                    }
                    QueueStats::add(&shared.stats.spin_misses, 1);
                }
            }
            // About to sleep: notifications on, then look once more, or a request published
            // before the driver saw them on would wait for a kick it never sends.
            if set_notifications(shared, true) {
                set_notifications(shared, false);
                state = fetch_round(shared, sender, resubmission);
                continue;
            }
        }
        // Throttled, a kick changes nothing: wait for room (the kick stays pending).
        let slept = Instant::now();
        let woke = wait(
            kick,
            stop,
            &shared.room,
            kick_usable && state != Fetch::Throttled,
        );
        QueueStats::add_elapsed(&shared.stats.sleep_ns, slept);
        if state == Fetch::Idle {
            spin.slept(slept.elapsed());
        }
        match woke {
            Ok(Wake::Stop) => {
                // The next backend (or this one after a restart) starts with kicks on.
                set_notifications(shared, true);
                return;
            }
            Ok(Wake::Room) => {
                let _ = shared.room.read();
                if state == Fetch::Throttled {
                    state = fetch_round(shared, sender, resubmission);
                }
            }
            Ok(Wake::Kick) => {
                QueueStats::add(&shared.stats.kicks, 1);
                // Reset the counter before scanning: a kick after this read wakes us again. The
                // fd is the peer's: the read must not depend on its O_NONBLOCK (`peer_fd`).
                if let Err(e) = peer_fd::drain(kick) {
                    warn!(
                        queue = shared.index,
                        "kick fd unreadable, waiting for stop: {e}"
                    );
                    kick_usable = false;
                    continue;
                }
                if state == Fetch::Idle {
                    set_notifications(shared, false);
                    state = fetch_round(shared, sender, resubmission);
                }
            }
            Err(e) => {
                error!(queue = shared.index, "poll failed, waiting for stop: {e}");
                kick_usable = false;
            }
        }
    }
}

/// Where the driver's avail index lies (what the spin before a sleep watches).
pub(super) fn avail_idx_addr(shared: &QueueShared) -> Option<GuestAddress> {
    let ring = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    ring.queue.avail_ring().checked_add(2).map(GuestAddress)
}

/// Turns the driver's notifications (kicks) on or off. Turning them on returns whether the
/// avail ring already holds requests we have not popped (then the caller pops them instead of
/// sleeping). The flags and avail_event are hints in guest memory: a failure to write them
/// costs at most extra kicks, and when they cannot be read we look at the ring again.
pub(super) fn set_notifications(shared: &QueueShared, on: bool) -> bool {
    let mut ring = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    if on {
        ring.queue.enable_notification(&*shared.mem).unwrap_or(true)
    } else {
        let _ = ring.queue.disable_notification(&*shared.mem);
        false
    }
}

/// One round of popping: every available request, run inline or handed to the I/O threads.
fn fetch_round(
    shared: &QueueShared,
    sender: Option<&SyncSender<Admitted>>,
    resubmission: &mut Option<Resubmission>,
) -> Fetch {
    QueueStats::add(&shared.stats.rounds, 1);
    match sender {
        Some(sender) => fetch_and_send(shared, sender, resubmission),
        None => run_inline(shared, resubmission),
    }
}

/// Completions the inline engine collects before it publishes them: small enough that the
/// driver sees the first ones while the rest run (it refills the ring meanwhile), large enough
/// that a deep queue costs one used-index update and at most one interrupt per batch.
const INLINE_PUBLISH_BATCH: usize = 8;

/// `IoEngine::Inline`: pops and runs every available request (resubmitted heads first),
/// publishing them INLINE_PUBLISH_BATCH at a time and whatever is left when the ring is empty.
fn run_inline(shared: &QueueShared, resubmission: &mut Option<Resubmission>) -> Fetch {
    const UNUSED: Completion = Completion {
        head: 0,
        used_len: 0,
        status: None,
    };
    let mut batch = [UNUSED; INLINE_PUBLISH_BATCH];
    let mut held = 0;
    let mut outcome = Fetch::Idle;
    while !shared.stopping.load(Ordering::Acquire) {
        let request = if let Some(request) = resubmission.as_mut().and_then(Resubmission::next) {
            request
        } else {
            match pop_chain(shared) {
                Ok(Some((chain, _more))) => BlkRequest::parse(chain),
                Ok(None) => break,
                Err(e) => {
                    error!(
                        queue = shared.index,
                        "virtqueue is broken, no longer served: {e}"
                    );
                    shared.err.signal();
                    outcome = Fetch::Broken;
                    break;
                }
            }
        };
        batch[held] = execute_timed(shared, &request);
        held += 1;
        if held == INLINE_PUBLISH_BATCH {
            publish_and_signal(shared, &batch);
            held = 0;
        }
    }
    if held > 0 {
        publish_and_signal(shared, &batch[..held]);
    }
    outcome
}

/// Runs a request, counting the time in the queue's `io_ns`.
fn execute_timed(shared: &QueueShared, request: &BlkRequest) -> Completion {
    let started = Instant::now();
    let completion = request.execute(&shared.mem, &shared.disk);
    QueueStats::add_elapsed(&shared.stats.io_ns, started);
    completion
}

/// Spins up to `window` until the driver publishes an avail index we have not consumed.
pub(super) fn new_request_within(
    shared: &QueueShared,
    avail_idx_addr: GuestAddress,
    window: Duration,
) -> bool {
    let next_avail = shared
        .queue
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .queue
        .next_avail();
    let start = Instant::now();
    while !shared.stopping.load(Ordering::Acquire) && start.elapsed() < window {
        match shared.mem.load::<u16>(avail_idx_addr, Ordering::Acquire) {
            Ok(idx) if u16::from_le(idx) != next_avail => return true,
            Ok(_) => std::hint::spin_loop(),
            Err(_) => return false,
        }
    }
    false
}

/// Pops available chains and hands them on while the queue's in-flight budget has room; heads
/// left to resubmit by an inflight recovery go first. `Broken` when the guest published an
/// impossible avail index or head: the queue then stops serving and the err fd is written.
fn fetch_and_send(
    shared: &QueueShared,
    sender: &SyncSender<Admitted>,
    resubmission: &mut Option<Resubmission>,
) -> Fetch {
    while !shared.stopping.load(Ordering::Acquire) {
        if !shared.has_room() {
            // Dekker with `release`: either it sees `throttled` and writes `room`, or we see
            // the room it freed.
            shared.throttled.store(true, Ordering::SeqCst);
            if !shared.has_room() {
                return Fetch::Throttled;
            }
            shared.throttled.store(false, Ordering::SeqCst);
        }
        let (request, more) =
            if let Some(request) = resubmission.as_mut().and_then(Resubmission::next) {
                // Still marked inflight with its old counter; it completes like any other.
                (request, true)
            } else {
                match pop_chain(shared) {
                    Ok(Some((chain, more))) => (BlkRequest::parse(chain), more),
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
        // A lone request on an otherwise idle queue (queue depth 1) runs right here: handing
        // it to an I/O thread would cost two thread wake-ups for nothing to overlap with.
        // Several at once go to the I/O threads, so they overlap and may complete out of order
        // (always so with a completion delay, which must not hold the dispatcher).
        if !more
            && shared.in_flight.load(Ordering::Acquire) == 0
            && shared.completion_delay.is_none()
        {
            complete(shared, execute_timed(shared, &request));
            continue;
        }
        if !admit(shared, sender, request) {
            return Fetch::Idle;
        }
    }
    Fetch::Idle
}

/// Hands a request to the I/O threads, counting it against the queue's budget; `false` when
/// they are gone.
fn admit(shared: &QueueShared, sender: &SyncSender<Admitted>, request: BlkRequest) -> bool {
    let cost = bookkeeping_bytes(&request);
    shared.in_flight.fetch_add(1, Ordering::SeqCst);
    let held = shared.in_flight_bytes.fetch_add(cost, Ordering::SeqCst) + cost;
    shared
        .peak_in_flight_bytes
        .fetch_max(held, Ordering::Relaxed);
    if sender.send((request, cost)).is_err() {
        shared.release(cost);
        return false;
    }
    true
}

/// At stop: heads still waiting to be resubmitted were consumed (next_avail is already past
/// them), and a stop completes everything consumed before it returns (GET_VRING_BASE reports
/// it done), so they run now, within the same budget.
fn drain_resubmission(
    shared: &QueueShared,
    sender: Option<&SyncSender<Admitted>>,
    resubmission: &mut Option<Resubmission>,
) {
    let Some(pending) = resubmission.as_mut() else {
        return;
    };
    let Some(sender) = sender else {
        while let Some(request) = pending.next() {
            complete(shared, execute_timed(shared, &request));
        }
        return;
    };
    while let Some(request) = pending.next() {
        while !shared.has_room() {
            // As in fetch_and_send: `release` writes `room` when it sees `throttled`.
            shared.throttled.store(true, Ordering::SeqCst);
            if !shared.has_room() {
                readable_within(&shared.room, STOP_RESCUE_INTERVAL);
                let _ = shared.room.read();
            }
            shared.throttled.store(false, Ordering::SeqCst);
        }
        if !admit(shared, sender, request) {
            return;
        }
    }
}

/// What a request holds while in flight: itself and its buffer lists.
fn bookkeeping_bytes(request: &BlkRequest) -> usize {
    let buffers = request.body.as_ref().map_or(0, |body| {
        body.readable_data.capacity() + body.writable_data.capacity()
    });
    std::mem::size_of::<BlkRequest>()
        + buffers.saturating_mul(std::mem::size_of::<super::request::GuestBuffer>())
}

impl QueueShared {
    fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) < MAX_REQUESTS_IN_FLIGHT
            && self.in_flight_bytes.load(Ordering::SeqCst) < IN_FLIGHT_BOOKKEEPING_BUDGET
    }

    /// A request admitted with `cost` is done: give its room back, waking a throttled dispatcher.
    fn release(&self, cost: usize) {
        self.in_flight_bytes.fetch_sub(cost, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.throttled.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.room.write(1) {
                error!(queue = self.index, "cannot wake the dispatcher: {e}");
            }
        }
    }
}

impl Resubmission {
    /// The next request to run again, parsed from the descriptor table.
    pub(super) fn next(&mut self) -> Option<BlkRequest> {
        let head = self.heads.pop_front()?;
        let mut request = self.parser.parse(head);
        if self.ack_writes_without_writing {
            if let Ok(body) = request.body.as_mut() {
                if body.kind == super::request::RequestKind::Out {
                    // A write of no bytes: "done", and the disk keeps what it had.
                    body.readable_data.clear();
                }
            }
        }
        Some(request)
    }
}

/// Why the avail ring can no longer be served.
#[derive(Debug, thiserror::Error)]
pub(super) enum PopError {
    #[error("{0}")]
    Queue(#[from] virtio_queue::Error),
    /// The guest published a head that is not a descriptor of the ring (QEMU's "Guest says index
    /// N is available" also breaks the device). It could never reach the used ring, and inflight
    /// tracking could not record it, so it would shift every recovered avail position.
    #[error("the driver made head {head} available in a ring of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
}

/// Pops one chain (the single place a head leaves the avail ring) and marks it inflight, and
/// says whether another one is available behind it.
#[allow(clippy::type_complexity)]
pub(super) fn pop_chain(
    shared: &QueueShared,
) -> Result<Option<(DescriptorChain<Arc<GuestMemoryMmap>>, bool)>, PopError> {
    let mut guard = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let ring = &mut *guard;
    #[cfg(test)]
    if shared.test_crash.is_dead() {
        return Ok(None);
    }
    let Some(chain) = ring.queue.iter(Arc::clone(&shared.mem))?.next() else {
        return Ok(None);
    };
    let (head, size) = (chain.head_index(), ring.queue.size());
    if head >= size {
        return Err(PopError::HeadOutOfRange { head, size });
    }
    if let Some(tracker) = ring.inflight.as_mut() {
        tracker.mark_fetched(head);
    }
    #[cfg(test)]
    if shared.test_crash.dies_at(tests::CrashPoint::AfterFetch) {
        return Ok(None);
    }
    // Only a hint (lone request or not): an unreadable index counts as "more".
    let more = ring
        .queue
        .avail_idx(&*shared.mem, Ordering::Acquire)
        .map_or(true, |idx| idx.0 != ring.queue.next_avail());
    Ok(Some((chain, more)))
}

fn io_worker(shared: Arc<QueueShared>, receiver: Arc<Mutex<Receiver<Admitted>>>, seed: u64) {
    // Only the test option's random delays use it; any non-zero start will do.
    let mut delay_state = seed | 1;
    loop {
        let next = receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok((request, cost)) = next else { return };
        #[cfg(test)]
        drop(shared.test_io_gate.read());
        let completion = execute_timed(&shared, &request);
        if let Some(delay) = shared.completion_delay {
            thread::sleep(delay.pick(&mut delay_state));
        }
        complete(&shared, completion);
        drop(request);
        shared.release(cost);
    }
}

/// A seed for I/O thread `n`'s delay generator: different per thread and per run.
fn io_thread_seed(n: usize) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    now ^ ((n as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Publishes a request an I/O thread finished, together with every other completion waiting:
/// the request joins `finished`, and whoever gets the queue lock next publishes the whole list
/// as one batch. When several I/O threads finish at once, one of them publishes for all (one
/// inflight batch, one used-index update, at most one interrupt); the others find the list
/// empty. Either way the request is in the used ring before this returns, so a stop that waits
/// for `release` sees everything published.
fn complete(shared: &QueueShared, completion: Completion) {
    shared
        .finished
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(completion);
    if let Some(hold) = shared.flaws.hold_batches() {
        thread::sleep(hold); // let other completions join this batch (a test knob)
    }
    let mut guard = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let ring = &mut *guard;
    let mut batch = std::mem::take(&mut ring.spare_batch);
    std::mem::swap(
        &mut batch,
        &mut *shared
            .finished
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    if batch.is_empty() {
        // Another thread published ours along with its own.
        ring.spare_batch = batch;
        return;
    }
    let mut notify = false;
    for chunk in batch.chunks(MAX_REQUESTS_IN_FLIGHT) {
        notify |= publish(shared, ring, chunk);
    }
    batch.clear();
    ring.spare_batch = batch;
    drop(guard);
    signal_if(shared, notify);
}

/// Publishes `batch` (at most MAX_REQUESTS_IN_FLIGHT) under the queue lock and signals the
/// driver once if it wants an interrupt: the inline and uring engines' way to the used ring.
pub(super) fn publish_and_signal(shared: &QueueShared, batch: &[Completion]) {
    let mut guard = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let notify = publish(shared, &mut guard, batch);
    drop(guard);
    signal_if(shared, notify);
}

fn signal_if(shared: &QueueShared, notify: bool) {
    if notify {
        QueueStats::add(&shared.stats.interrupts, 1);
        shared.call.signal();
    }
    log_first_completion();
}

/// Puts `batch` into the used ring (the single place a head reaches it) under the queue lock,
/// with its inflight bookkeeping around it; says whether the driver wants an interrupt for it.
///
/// The entries are written first and the used index once, after them: the driver sees the
/// whole batch at once, and pays one cache-line transfer of the index for it, not one per
/// request. With inflight tracking the batch is linked and named in `last_batch_head` before,
/// and cleared after (the order `inflight` explains): a death at any point leaves a region
/// whose last batch is exactly what the used ring shows beyond the region's `used_idx`.
fn publish(shared: &QueueShared, ring: &mut Ring, batch: &[Completion]) -> bool {
    #[cfg(test)]
    if shared.test_crash.is_dead() {
        return false;
    }
    // The callers' batches hold at most MAX_REQUESTS_IN_FLIGHT: a fixed buffer, no allocation.
    let batch = &batch[..batch.len().min(MAX_REQUESTS_IN_FLIGHT)];
    let mut heads = [0u16; MAX_REQUESTS_IN_FLIGHT];
    let heads = &mut heads[..batch.len()];
    for (slot, completion) in heads.iter_mut().zip(batch) {
        *slot = completion.head;
    }
    if let Some(tracker) = &ring.inflight {
        tracker.begin_batch(heads);
    }
    #[cfg(test)]
    if shared.test_crash.dies_at(tests::CrashPoint::BeforePublish) {
        return false;
    }
    let mut written = write_used_entries(shared, &ring.queue, batch);
    // At most MAX_REQUESTS_IN_FLIGHT (256): fits a u16.
    let mut next_used = ring.queue.next_used().wrapping_add(written as u16);
    if written > 0 {
        // The entries before the index that announces them.
        std::sync::atomic::fence(Ordering::Release);
        let used_idx_addr = ring.queue.used_ring().checked_add(2).map(GuestAddress);
        let stored = used_idx_addr.is_some_and(|a| {
            shared
                .mem
                .store(next_used.to_le(), a, Ordering::Release)
                .is_ok()
        });
        if stored {
            ring.queue.set_next_used(next_used);
        } else {
            // The ring was checked against this memory at start; if it vanished, nothing is
            // published and the batch stays inflight for a later recovery to run again.
            warn!(queue = shared.index, "cannot update the used index");
            written = 0;
            next_used = ring.queue.next_used();
        }
    }
    #[cfg(test)]
    if shared.test_crash.dies_at(tests::CrashPoint::AfterPublish) {
        return false;
    }
    if let Some(hold) = shared.flaws.hold_batches() {
        thread::sleep(hold); // a kill now finds a published, unclosed batch (a test knob)
    }
    if let Some(tracker) = &ring.inflight {
        tracker.end_batch(&heads[..written], next_used);
    }
    if written == 0 {
        return false;
    }
    QueueStats::add(&shared.stats.publishes, 1);
    QueueStats::add(&shared.stats.requests, written as u64);
    let old = ring.signalled_used.replace(next_used);
    driver_wants_interrupt(&ring.queue, &shared.mem, old, next_used)
}

/// Writes the used-ring elements for `batch` from `next_used` on (not the index); returns how
/// many were written. A head outside the ring cannot get here (popping refuses it), but is
/// checked again: the slot arithmetic must never write outside the ring.
fn write_used_entries(shared: &QueueShared, queue: &Queue, batch: &[Completion]) -> usize {
    let size = queue.size();
    let mut position = queue.next_used();
    for (written, completion) in batch.iter().enumerate() {
        let slot = u64::from(position % size);
        let addr = queue
            .used_ring()
            .checked_add(4 + slot * 8)
            .map(GuestAddress);
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(completion.head).to_le_bytes());
        element[4..].copy_from_slice(&completion.used_len.to_le_bytes());
        let ok = completion.head < size
            && addr.is_some_and(|a| shared.mem.write_slice(&element, a).is_ok());
        if !ok {
            // This one and the rest stay inflight: a later recovery runs them again, which an
            // unpublished request needs.
            warn!(
                queue = shared.index,
                head = completion.head,
                "cannot add request to the used ring"
            );
            return written;
        }
        position = position.wrapping_add(1);
    }
    batch.len()
}

/// VIRTIO_RING_F_EVENT_IDX's test (virtio 1.x §2.7.7.2, Linux's `vring_need_event`): having
/// moved the used index from `old` to `new`, interrupt iff the driver's `event` (used_event)
/// lies in `old..new`, counted modulo 2^16.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Whether the driver wants an interrupt for the used entries `old..new` just published: with
/// EVENT_IDX, when its used_event lies among them (with `old` unknown, always); without, unless
/// it set VRING_AVAIL_F_NO_INTERRUPT. Both are hints in guest memory; when unreadable, interrupt.
fn driver_wants_interrupt(
    queue: &Queue,
    mem: &GuestMemoryMmap,
    old: Option<u16>,
    new: u16,
) -> bool {
    // The used index must be visible before we read the driver's wishes, or a driver that just
    // asked for an interrupt could miss this one (virtio 1.x §2.7.10).
    std::sync::atomic::fence(Ordering::SeqCst);
    if !queue.event_idx_enabled() {
        return !driver_suppresses_interrupts(queue, mem);
    }
    let Some(old) = old else {
        return true;
    };
    match used_event(queue, mem) {
        Some(event) => need_event(event, new, old),
        None => true,
    }
}

/// At start, with EVENT_IDX: a driver whose used_event names an entry already in the used ring
/// (within the last ring's worth) waits for an interrupt an earlier backend never sent (killed
/// between publishing and signalling). Nothing new may come to trigger one, so signal it now;
/// a spurious interrupt costs a driver one look at its used ring. A fresh ring (both indices 0)
/// gets none. Without EVENT_IDX the first publish signals (`Ring::signalled_used`).
fn wake_a_driver_left_waiting(shared: &QueueShared) {
    let ring = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    if !ring.queue.event_idx_enabled() {
        return;
    }
    let used_idx = ring.queue.next_used();
    let window_start = used_idx.wrapping_sub(ring.queue.size());
    let waiting = used_event(&ring.queue, &shared.mem)
        .is_some_and(|event| need_event(event, used_idx, window_start));
    drop(ring);
    if waiting {
        info!(
            queue = shared.index,
            "the driver waits for a completion already in the used ring: interrupting it"
        );
        QueueStats::add(&shared.stats.interrupts, 1);
        shared.call.signal();
    }
}

/// The driver's used_event (EVENT_IDX), if readable.
fn used_event(queue: &Queue, mem: &GuestMemoryMmap) -> Option<u16> {
    // used_event: after the avail ring's flags, idx and `size` entries.
    let used_event_addr = queue
        .avail_ring()
        .checked_add(4 + 2 * u64::from(queue.size()))
        .map(GuestAddress);
    match used_event_addr.map(|a| mem.load::<u16>(a, Ordering::Acquire)) {
        Some(Ok(event)) => Some(u16::from_le(event)),
        _ => None,
    }
}

/// When this backend opened its image (`BlkBackend::open`): the start of "restart to first
/// completed request", which `resources/bench reconnect` reads from the log.
pub(super) static BACKEND_STARTED: std::sync::OnceLock<std::time::Instant> =
    std::sync::OnceLock::new();

/// Logs, once per process, how long after the backend started the first request completed: for
/// a backend restarted under a running guest, what the guest waited for beyond the restart.
fn log_first_completion() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.load(Ordering::Relaxed) || DONE.swap(true, Ordering::Relaxed) {
        return;
    }
    if let Some(started) = BACKEND_STARTED.get() {
        info!(
            "first request completed {:.1} ms after the backend started",
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
}

/// VRING_AVAIL_F_NO_INTERRUPT: without EVENT_IDX, a driver that polls the used ring sets this
/// flag in the avail ring to say it wants no interrupt: an unwanted interrupt costs the guest an
/// exit and an interrupt delivery per request. It is a hint; when it cannot be read, notify.
fn driver_suppresses_interrupts(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    let flags_addr = GuestAddress(queue.avail_ring());
    match mem.load::<u16>(flags_addr, Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT != 0,
        Err(_) => false,
    }
}

/// Blocks until the stop fd, the room fd or (if usable) the kick fd is readable.
fn wait(kick: &EventFd, stop: &EventFd, room: &EventFd, kick_usable: bool) -> io::Result<Wake> {
    let pollfd = |fd: &EventFd| libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [pollfd(stop), pollfd(room), pollfd(kick)];
    let count: libc::nfds_t = if kick_usable { 3 } else { 2 };
    loop {
        // SAFETY: `fds` is a valid array of `count` (<= 3) pollfd structs that outlives the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), count, -1) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[0].revents != 0 {
            return Ok(Wake::Stop);
        }
        if fds[1].revents != 0 {
            return Ok(Wake::Room);
        }
        if fds[2].revents & libc::POLLIN != 0 {
            return Ok(Wake::Kick);
        }
        if fds[2].revents != 0 {
            return Err(io::Error::other(format!(
                "kick fd reported poll events {:#x}",
                fds[2].revents
            )));
        }
    }
}

/// Whether our own `fd` becomes readable within `timeout` (a poll error counts as readable, so
/// the caller goes on to its join rather than loop).
pub(super) fn readable_within(fd: &EventFd, timeout: std::time::Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: one valid pollfd, alive and exclusively borrowed for the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ret >= 0 {
            return ret > 0;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{guest_memory, memfd_disk, request_header, wait_readable, TestRing};
    use crate::vhost_user_server::inflight_region::{
        checked_region_size, new_region_memfd, InflightLimits, InflightMap, QueueRegion,
    };
    use vhost_frontend::wire::inflight::SplitQueue;
    use vhost_frontend::wire::InflightDescription;

    /// Where a test kills the worker: right after a head is marked inflight (before its I/O),
    /// after a batch is named but before the used ring moves, after the used ring moved but
    /// before the batch is cleared.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum CrashPoint {
        AfterFetch,
        BeforePublish,
        AfterPublish,
    }

    /// A simulated SIGKILL: once dead, the worker writes nothing more to the region or the rings
    /// (its I/O threads may still finish a pwrite, as a real kill after the I/O would leave).
    #[derive(Debug, Default)]
    pub(super) struct TestCrash {
        /// Die the (n+1)th time this point is reached.
        armed: Mutex<Option<(CrashPoint, usize)>>,
        dead: AtomicBool,
    }

    impl TestCrash {
        pub(super) fn is_dead(&self) -> bool {
            self.dead.load(Ordering::SeqCst)
        }

        pub(super) fn dies_at(&self, point: CrashPoint) -> bool {
            let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
            match armed.as_mut() {
                Some((at, 0)) if *at == point => {
                    *armed = None;
                    self.dead.store(true, Ordering::SeqCst);
                    true
                }
                Some((at, n)) if *at == point => {
                    *n -= 1;
                    false
                }
                _ => self.is_dead(),
            }
        }

        fn arm(&self, point: CrashPoint, after: usize) {
            *self.armed.lock().unwrap() = Some((point, after));
        }
    }
    use std::os::unix::fs::FileExt;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::Bytes;

    /// The engines every engine-independent behaviour is checked with.
    const ALL_ENGINES: [IoEngine; 3] = [IoEngine::Inline, IoEngine::Threads, IoEngine::Uring];

    struct Running {
        mem: crate::vhost_user_server::memory::MappedMemory,
        _ram: std::fs::File,
        ring: TestRing,
        disk: Arc<Disk>,
        disk_file: std::fs::File,
        kick: EventFd,
        call: EventFd,
        err: EventFd,
        call_notifier: Arc<Notifier>,
        err_notifier: Arc<Notifier>,
        /// The engine `start` uses: tests that hold the I/O threads at `test_io_gate` need
        /// `Threads`; the rest run with the default.
        engine: IoEngine,
        /// Whether the driver acked EVENT_IDX.
        event_idx: bool,
    }

    fn setup() -> Running {
        let (mem, ram) = guest_memory(0x200000);
        let (disk, disk_file) = memfd_disk(256, false);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let err = EventFd::new(EFD_NONBLOCK).unwrap();
        let call_notifier = Arc::new(Notifier::default());
        call_notifier.set(Some(call.try_clone().unwrap()));
        let err_notifier = Arc::new(Notifier::default());
        err_notifier.set(Some(err.try_clone().unwrap()));
        Running {
            mem,
            _ram: ram,
            ring: TestRing::new(128, 0x1000),
            disk: Arc::new(disk),
            disk_file,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call,
            err,
            call_notifier,
            err_notifier,
            engine: IoEngine::default(),
            event_idx: false,
        }
    }

    impl Running {
        /// A driver claiming 1000 new entries in a 128-entry ring: a broken ring.
        fn publish_impossible_avail_idx(&self) {
            self.mem
                .guest()
                .store(
                    1000u16.to_le(),
                    GuestAddress(self.ring.rings.avail_ring.0 + 2),
                    std::sync::atomic::Ordering::Release,
                )
                .unwrap();
        }

        fn start(&self, next_avail: u16) -> Result<QueueWorker, QueueError> {
            self.start_tracked(next_avail, None, None)
        }

        fn start_tracked(
            &self,
            next_avail: u16,
            inflight: Option<QueueRegion>,
            completion_delay: Option<CompletionDelay>,
        ) -> Result<QueueWorker, QueueError> {
            QueueWorker::start(
                RingSetup {
                    index: 0,
                    size: self.ring.size,
                    rings: self.ring.rings,
                    next_avail,
                    kick: self.kick.try_clone().unwrap(),
                    call: Arc::clone(&self.call_notifier),
                    err: Arc::clone(&self.err_notifier),
                    inflight,
                    memory: Arc::clone(self.mem.guest()),
                    event_idx: self.event_idx,
                },
                Arc::clone(&self.disk),
                QueueOptions {
                    engine: self.engine,
                    completion_delay,
                    flaws: PlantedFlaws::NONE,
                },
            )
        }

        /// What the guest reads in the used ring: heads of entries 0..count.
        fn used_heads(&self, count: u16) -> Vec<u32> {
            (0..count)
                .map(|i| self.ring.used_elem(self.mem.guest(), i).0)
                .collect()
        }

        /// Queues a one-sector write of `fill` to `sector`, using per-request buffers.
        fn submit_write(&mut self, n: u64, sector: u64, fill: u8) {
            let g = self.mem.guest().clone();
            let base = 0x100000 + n * 0x1000;
            g.write_slice(
                &request_header(VIRTIO_BLK_T_OUT, sector),
                GuestAddress(base),
            )
            .unwrap();
            g.write_slice(&[fill; 512], GuestAddress(base + 0x100))
                .unwrap();
            g.write_obj(0xffu8, GuestAddress(base + 0x400)).unwrap();
            self.ring.add_chain(
                &g,
                &[
                    (base, 16, false),
                    (base + 0x100, 512, false),
                    (base + 0x400, 1, true),
                ],
            );
        }

        /// Queues a read from `sector` into guest memory at `data`, split into descriptors of
        /// the lengths in `split`, with slot `n`'s header and status byte.
        fn submit_read(&mut self, n: u64, sector: u64, data: u64, split: &[u32]) {
            let g = self.mem.guest().clone();
            let base = 0x100000 + n * 0x1000;
            g.write_slice(&request_header(VIRTIO_BLK_T_IN, sector), GuestAddress(base))
                .unwrap();
            g.write_obj(0xffu8, GuestAddress(base + 0x400)).unwrap();
            let mut chain = vec![(base, 16, false)];
            let mut at = data;
            for &len in split {
                chain.push((at, len, true));
                at += u64::from(len);
            }
            chain.push((base + 0x400, 1, true));
            self.ring.add_chain(&g, &chain);
        }

        /// Queues a write of the `len` bytes at `data` (filled by the caller) to `sector`, with
        /// slot `n`'s header and status byte.
        fn submit_write_from(&mut self, n: u64, sector: u64, data: u64, len: u32) {
            let g = self.mem.guest().clone();
            let base = 0x100000 + n * 0x1000;
            g.write_slice(
                &request_header(VIRTIO_BLK_T_OUT, sector),
                GuestAddress(base),
            )
            .unwrap();
            g.write_obj(0xffu8, GuestAddress(base + 0x400)).unwrap();
            self.ring.add_chain(
                &g,
                &[
                    (base, 16, false),
                    (data, len, false),
                    (base + 0x400, 1, true),
                ],
            );
        }

        fn submit_flush(&mut self, n: u64) {
            use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;
            let g = self.mem.guest().clone();
            let base = 0x100000 + n * 0x1000;
            g.write_slice(&request_header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(base))
                .unwrap();
            g.write_obj(0xffu8, GuestAddress(base + 0x400)).unwrap();
            self.ring
                .add_chain(&g, &[(base, 16, false), (base + 0x400, 1, true)]);
        }

        fn status_of(&self, n: u64) -> u8 {
            self.mem
                .guest()
                .read_obj(GuestAddress(0x100000 + n * 0x1000 + 0x400))
                .unwrap()
        }
    }

    #[test]
    fn a_polling_driver_gets_no_interrupts_and_an_interrupt_driven_one_does() {
        let mut r = setup();
        // VRING_AVAIL_F_NO_INTERRUPT in the avail ring's flags: the driver polls.
        r.mem
            .guest()
            .write_obj(1u16.to_le(), r.ring.rings.avail_ring)
            .unwrap();
        let worker = r.start(0).unwrap();
        for n in 0..8u64 {
            r.submit_write(n, n, 7);
        }
        r.kick.write(1).unwrap();
        r.ring.wait_used(r.mem.guest(), 8);
        assert!(
            r.call.read().is_err(),
            "no interrupt for a driver that asked for none"
        );
        // The driver clears the flag: the next completions interrupt it again.
        r.mem
            .guest()
            .write_obj(0u16.to_le(), r.ring.rings.avail_ring)
            .unwrap();
        for n in 8..16u64 {
            r.submit_write(n, n, 7);
        }
        r.kick.write(1).unwrap();
        r.ring.wait_used(r.mem.guest(), 16);
        assert!(r.call.read().unwrap() >= 1, "interrupts are back");
        assert_eq!(worker.stop(), 16);
    }

    #[test]
    fn need_event_is_true_exactly_when_the_event_lies_in_old_to_new_modulo_2_16() {
        // Nothing published: never.
        assert!(!need_event(5, 5, 5));
        // One entry published (old 5 -> new 6): only an event at 5.
        assert!(need_event(5, 6, 5));
        assert!(!need_event(4, 6, 5));
        assert!(!need_event(6, 6, 5));
        // A batch 10..20: the first and the last entries, not one past either end.
        assert!(need_event(10, 20, 10));
        assert!(need_event(19, 20, 10));
        assert!(!need_event(9, 20, 10));
        assert!(!need_event(20, 20, 10));
        // Across the wrap: 65530..4 holds 65530..=65535 and 0..=3.
        for event in [65530, 65535, 0, 3] {
            assert!(need_event(event, 4, 65530), "{event}");
        }
        for event in [65529, 4, 5, 32768] {
            assert!(!need_event(event, 4, 65530), "{event}");
        }
        // A driver that keeps used_event one behind what it consumed (polling) gets none.
        assert!(!need_event(65535, 8, 0));
    }

    /// With EVENT_IDX the driver's used_event decides, across the 16-bit wrap: no interrupt
    /// while it lies behind, exactly one once a publish passes it.
    #[test]
    fn event_idx_interrupts_only_when_used_event_is_passed_across_the_wrap() {
        for engine in ALL_ENGINES {
            let mut r = setup();
            r.engine = engine;
            r.event_idx = true;
            let g = r.mem.guest().clone();
            let start = 65530u16;
            r.ring.start_at(&g, start);
            // A polling driver: used_event behind everything to come.
            r.ring.set_used_event(&g, start.wrapping_sub(1));
            let worker = r.start(start).unwrap();
            // After a start, the first publish interrupts whatever used_event says (it cannot
            // know what an earlier backend signalled): let that pass first.
            r.submit_write(0, 0, 9);
            r.kick.write(1).unwrap();
            r.ring.wait_used(&g, start.wrapping_add(1));
            r.ring.set_used_event(&g, start);
            std::thread::sleep(Duration::from_millis(20));
            let _ = r.call.read();
            for n in 1..8u64 {
                r.submit_write(n, n, 9);
            }
            r.kick.write(1).unwrap();
            r.ring.wait_used(&g, start.wrapping_add(8));
            std::thread::sleep(Duration::from_millis(20));
            assert!(r.call.read().is_err(), "{engine}: no interrupt asked for");
            // Now the driver waits for the entry at 65535 + 8 = 2 (past the wrap).
            let wanted = start.wrapping_add(8);
            r.ring.set_used_event(&g, wanted);
            for n in 8..16u64 {
                r.submit_write(n, n, 9);
            }
            r.kick.write(1).unwrap();
            r.ring.wait_used(&g, start.wrapping_add(16));
            assert!(
                wait_readable(&r.call, Duration::from_secs(10)),
                "{engine}: used_event {wanted} was passed"
            );
            assert_eq!(r.call.read().unwrap(), 1, "{engine}: one interrupt");
            // I/O threads complete out of order: compare the sets.
            let mut heads: Vec<u32> = (0..16u16)
                .map(|i| r.ring.used_elem(&g, start.wrapping_add(i)).0)
                .collect();
            heads.sort_unstable();
            assert_eq!(
                heads,
                (0..16).map(|i| i * 3).collect::<Vec<u32>>(),
                "{engine}"
            );
            for i in 0..16u64 {
                assert_eq!(r.status_of(i), 0, "{engine}: request {i}");
            }
            assert_eq!(worker.stop(), start.wrapping_add(16), "{engine}");
        }
    }

    /// A backend killed between publishing and signalling leaves a driver (EVENT_IDX, irq mode)
    /// waiting for an entry already in the used ring: the next backend interrupts it at start,
    /// and its first publish interrupts whatever used_event says (its `old` is unknown).
    #[test]
    fn a_restarted_queue_wakes_a_driver_the_dead_backend_never_signalled() {
        for engine in [IoEngine::Inline, IoEngine::Threads, IoEngine::Uring] {
            let mut r = setup();
            r.engine = engine;
            r.event_idx = true;
            let g = r.mem.guest().clone();
            // Entries 0..5 published by the dead backend; the driver consumed none and waits for
            // entry 0.
            r.ring.start_at(&g, 5);
            r.ring.set_used_event(&g, 0);
            let worker = r.start(5).unwrap();
            assert!(
                wait_readable(&r.call, Duration::from_secs(10)),
                "{engine}: woken at start"
            );
            r.call.read().unwrap();
            assert_eq!(worker.stop(), 5);
            // used_event far behind (0, outside 5..6): a test of old..new alone would say no.
            let worker = r.start(5).unwrap();
            r.ring.set_used_event(&g, 3);
            let _ = r.call.read();
            r.submit_write(0, 0, 1);
            r.kick.write(1).unwrap();
            r.ring.wait_used(&g, 6);
            assert!(
                wait_readable(&r.call, Duration::from_secs(10)),
                "{engine}: the first publish after a start interrupts"
            );
            assert_eq!(worker.stop(), 6);
        }
    }

    /// An idle queue asks for kicks again: with EVENT_IDX avail_event names the next entry,
    /// without it used.flags is clear; while it works, it asks for none.
    #[test]
    fn an_idle_queue_leaves_kicks_on() {
        for engine in ALL_ENGINES {
            for event_idx in [false, true] {
                let mut r = setup();
                r.engine = engine;
                r.event_idx = event_idx;
                let g = r.mem.guest().clone();
                let worker = r.start(0).unwrap();
                for n in 0..5u64 {
                    r.submit_write(n, n, 4);
                }
                r.kick.write(1).unwrap();
                r.ring.wait_used(&g, 5);
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let on = if event_idx {
                        r.ring.avail_event(&g) == 5
                    } else {
                        r.ring.used_flags(&g) == 0
                    };
                    if on {
                        break;
                    }
                    assert!(std::time::Instant::now() < deadline, "kicks stay off");
                    std::thread::sleep(Duration::from_millis(1));
                }
                // It sleeps on the kick fd now: a request and a kick are served.
                r.submit_write(5, 5, 4);
                r.kick.write(1).unwrap();
                r.ring.wait_used(&g, 6);
                assert_eq!(worker.stop(), 6);
                assert_eq!(r.ring.used_flags(&g), 0, "a stopped queue leaves kicks on");
            }
        }
    }

    /// The inline engine publishes what it finds a batch at a time: 20 requests waiting at start
    /// reach the used ring in 3 publishes (8 + 8 + 4), with one used-index update each.
    #[test]
    fn the_inline_engine_publishes_a_batch_at_a_time() {
        let mut r = setup();
        for n in 0..20u64 {
            r.submit_write(n, n, 6);
        }
        let worker = r.start(0).unwrap();
        r.ring.wait_used(r.mem.guest(), 20);
        let stats = &worker.shared.stats;
        assert_eq!(stats.requests.load(Ordering::Relaxed), 20);
        assert_eq!(stats.publishes.load(Ordering::Relaxed), 3);
        assert!(r.call.read().unwrap() >= 1);
        assert_eq!(worker.stop(), 20);
        assert_eq!(
            r.used_heads(20),
            (0..20).map(|n| n * 3).collect::<Vec<u32>>()
        );
    }

    #[test]
    fn io_engines_parse_and_print() {
        for engine in ALL_ENGINES {
            assert_eq!(engine.to_string().parse::<IoEngine>(), Ok(engine));
        }
        assert_eq!("uring".parse::<IoEngine>(), Ok(IoEngine::Uring));
        for bad in ["io_uring", "Uring", ""] {
            assert!(bad.parse::<IoEngine>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn many_requests_in_flight_all_complete_and_signal_the_call_fd() {
        for engine in ALL_ENGINES {
            let mut r = setup();
            r.engine = engine;
            let worker = r.start(0).unwrap();
            for n in 0..32u64 {
                r.submit_write(n, n, n as u8 + 1);
            }
            r.kick.write(1).unwrap();
            r.ring.wait_used(r.mem.guest(), 32);
            assert!(r.call.read().unwrap() >= 1, "call fd was signalled");
            let mut heads: Vec<u32> = (0..32)
                .map(|i| r.ring.used_elem(r.mem.guest(), i).0)
                .collect();
            heads.sort_unstable();
            let expected: Vec<u32> = (0..32).map(|n| n * 3).collect();
            assert_eq!(heads, expected, "every head completed exactly once");
            for n in 0..32u64 {
                assert_eq!(r.status_of(n), 0, "request {n}");
                let mut sector = [0u8; 512];
                r.disk_file.read_exact_at(&mut sector, n * 512).unwrap();
                assert!(sector.iter().all(|&b| b == n as u8 + 1), "sector {n}");
            }
            assert_eq!(worker.stop(), 32);
            assert!(r.err.read().is_err(), "err fd must stay quiet");
        }
    }

    #[test]
    fn a_stopped_queue_resumes_where_it_left_off() {
        for engine in ALL_ENGINES {
            let mut r = setup();
            r.engine = engine;
            r.submit_write(0, 10, 0x11);
            // Queued before the worker starts: served without a kick.
            let worker = r.start(0).unwrap();
            r.ring.wait_used(r.mem.guest(), 1);
            let next_avail = worker.stop();
            assert_eq!(next_avail, 1);

            // While stopped, nothing is served.
            r.submit_write(1, 11, 0x22);
            r.kick.write(1).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(r.ring.used_idx(r.mem.guest()), 1);

            let worker = r.start(next_avail).unwrap();
            r.ring.wait_used(r.mem.guest(), 2);
            assert_eq!(
                r.ring.used_elem(r.mem.guest(), 1).0,
                3,
                "second chain's head"
            );
            assert_eq!(r.status_of(1), 0);
            assert_eq!(worker.stop(), 2);
            let mut sector = [0u8; 512];
            r.disk_file.read_exact_at(&mut sector, 11 * 512).unwrap();
            assert!(sector.iter().all(|&b| b == 0x22));
        }
    }

    #[test]
    fn a_read_sees_the_write_before_it() {
        let mut r = setup();
        let worker = r.start(0).unwrap();
        r.submit_write(0, 7, 0x77);
        r.kick.write(1).unwrap();
        r.ring.wait_used(r.mem.guest(), 1);
        let g = r.mem.guest().clone();
        g.write_slice(&request_header(VIRTIO_BLK_T_IN, 7), GuestAddress(0x150000))
            .unwrap();
        r.ring.add_chain(
            &g,
            &[
                (0x150000, 16, false),
                (0x151000, 512, true),
                (0x152000, 1, true),
            ],
        );
        r.kick.write(1).unwrap();
        r.ring.wait_used(&g, 2);
        assert_eq!(r.ring.used_elem(&g, 1).1, 513);
        let mut data = [0u8; 512];
        g.read_slice(&mut data, GuestAddress(0x151000)).unwrap();
        assert!(data.iter().all(|&b| b == 0x77));
        drop(worker); // Drop stops the threads too.
    }

    #[test]
    fn an_impossible_avail_index_breaks_the_queue_and_signals_err() {
        for engine in ALL_ENGINES {
            let mut r = setup();
            r.engine = engine;
            let worker = r.start(0).unwrap();
            // The driver claims 1000 new entries in a 128-entry ring.
            r.publish_impossible_avail_idx();
            r.kick.write(1).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while r.err.read().is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "err fd never signalled"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(r.ring.used_idx(r.mem.guest()), 0);
            assert_eq!(worker.stop(), 0);
        }
    }

    #[test]
    fn rings_outside_memory_or_bad_sizes_are_refused_at_start() {
        let mut r = setup();
        r.ring.rings.used_ring = GuestAddress(0x1ff_fff0);
        assert!(matches!(
            r.start(0),
            Err(QueueError::RingsNotInMemory { .. })
        ));
        r.ring.rings.used_ring = GuestAddress(0x1001);
        assert!(matches!(r.start(0), Err(QueueError::BadRing { .. })));
        r.ring = TestRing::new(128, 0x1000);
        r.ring.size = 48;
        assert!(matches!(r.start(0), Err(QueueError::InvalidSize { .. })));
    }

    /// Stops `worker` on another thread and fails loudly if that hangs.
    fn stop_bounded(worker: QueueWorker) -> u16 {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(worker.stop());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("QueueWorker::stop hung")
    }

    /// A peer that cleared O_NONBLOCK on its call and err fds (the open file description is
    /// shared) and filled both counters: completions and a broken ring must not block on them.
    #[test]
    fn full_blocking_call_and_err_counters_never_block_the_queue() {
        const FULL: u64 = 0xffff_ffff_ffff_fffe;
        let mut r = setup();
        let call = EventFd::new(0).unwrap();
        let err = EventFd::new(0).unwrap();
        call.write(FULL).unwrap();
        err.write(FULL).unwrap();
        r.call_notifier.set(Some(call.try_clone().unwrap()));
        r.err_notifier.set(Some(err.try_clone().unwrap()));
        let worker = r.start(0).unwrap();
        for n in 0..8u64 {
            r.submit_write(n, n, 3);
        }
        r.kick.write(1).unwrap();
        r.ring.wait_used(r.mem.guest(), 8);
        // Then an impossible avail index: the dispatcher signals err.
        r.publish_impossible_avail_idx();
        r.kick.write(1).unwrap();
        assert_eq!(stop_bounded(worker), 8);
        assert_eq!(
            call.read().unwrap(),
            FULL,
            "nothing was added to a full counter"
        );
        assert_eq!(err.read().unwrap(), FULL);
    }

    /// The kick fd as a blocking eventfd whose counter the peer drains itself: the dispatcher's
    /// read after poll must not block, and stop still ends it.
    #[test]
    fn a_kick_fd_the_peer_drains_never_blocks_the_dispatcher() {
        let mut r = setup();
        r.kick = EventFd::new(0).unwrap();
        let worker = r.start(0).unwrap();
        for round in 0..200u64 {
            r.kick.write(1).unwrap();
            let _ = peer_fd::drain(&r.kick);
            if round == 100 {
                r.submit_write(0, 0, 9);
                r.kick.write(1).unwrap();
            }
        }
        r.ring.wait_used(r.mem.guest(), 1);
        assert_eq!(stop_bounded(worker), 1);
    }

    /// 128 legal requests of MAX_CHAIN_DESCRIPTORS descriptors each (seg_max + 2 for the
    /// largest seg_max offered, through one shared indirect table), with the I/O threads held:
    /// the queue stops popping at its budget, then serves every one once they run again.
    /// Every descriptor of `ring` is an indirect one pointing at the same table of
    /// MAX_CHAIN_DESCRIPTORS entries: a GET_ID request whose data is one byte per descriptor,
    /// the most bookkeeping one request can cost. Returns where the (shared) status byte is.
    fn every_head_points_at_the_longest_indirect_table(
        g: &GuestMemoryMmap,
        ring: &TestRing,
    ) -> u64 {
        use crate::blk::request::MAX_CHAIN_DESCRIPTORS;
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_GET_ID;
        const VIRTQ_DESC_F_INDIRECT: u16 = 4;
        let (table, header, data, status) =
            (0x1c_0000u64, 0x1d_0000u64, 0x1d_1000u64, 0x1d_2000u64);
        g.write_slice(
            &request_header(VIRTIO_BLK_T_GET_ID, 0),
            GuestAddress(header),
        )
        .unwrap();
        let n = MAX_CHAIN_DESCRIPTORS as u64;
        for i in 0..n {
            let (addr, len, flags) = match i {
                0 => (header, 16, 0),
                i if i == n - 1 => (status, 1, 2),
                i => (data + i, 1, 2),
            };
            let flags = if i + 1 < n { flags | 1 } else { flags };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&(len as u32).to_le_bytes());
            raw[12..14].copy_from_slice(&(flags as u16).to_le_bytes());
            raw[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
            g.write_slice(&raw, GuestAddress(table + 16 * i)).unwrap();
        }
        for head in 0..ring.size {
            ring.write_desc(g, head, table, (16 * n) as u32, VIRTQ_DESC_F_INDIRECT, 0);
        }
        status
    }

    #[test]
    fn in_flight_bookkeeping_stays_within_the_queue_budget() {
        use crate::blk::request::MAX_CHAIN_DESCRIPTORS;
        let r = setup();
        let g = r.mem.guest().clone();
        let mut ring = r.ring;
        let heads = ring.size;
        let status = every_head_points_at_the_longest_indirect_table(&g, &ring);
        let worker = QueueWorker::start(
            RingSetup {
                index: 0,
                size: ring.size,
                rings: ring.rings,
                next_avail: 0,
                kick: r.kick.try_clone().unwrap(),
                call: Arc::clone(&r.call_notifier),
                err: Arc::clone(&r.err_notifier),
                inflight: None,
                memory: Arc::clone(r.mem.guest()),
                event_idx: false,
            },
            Arc::clone(&r.disk),
            QueueOptions {
                engine: IoEngine::Threads,
                ..QueueOptions::default()
            },
        )
        .unwrap();
        let gate = worker.shared.test_io_gate.write().unwrap();
        for head in 0..heads {
            ring.publish(&g, head);
        }
        r.kick.write(1).unwrap();
        // Wait until the dispatcher has stopped popping (throttled) or popped everything.
        let popped = || worker.shared.queue.lock().unwrap().queue.next_avail();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !worker.shared.throttled.load(Ordering::SeqCst) && popped() != heads {
            assert!(std::time::Instant::now() < deadline, "dispatcher stuck");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let one_request =
            2 * MAX_CHAIN_DESCRIPTORS * std::mem::size_of::<super::super::request::GuestBuffer>()
                + std::mem::size_of::<BlkRequest>();
        let peak = worker.shared.peak_in_flight_bytes.load(Ordering::SeqCst);
        assert!(
            peak <= IN_FLIGHT_BOOKKEEPING_BUDGET + one_request,
            "{peak} bytes held by one queue (budget {IN_FLIGHT_BOOKKEEPING_BUDGET})"
        );
        assert!(popped() < heads, "every request was popped at once");
        assert!(ring.used_idx(&g) < heads);
        // The I/O threads run again: every request completes, none is dropped or failed.
        drop(gate);
        ring.wait_used(&g, heads);
        for i in 0..heads {
            assert_eq!(ring.used_elem(&g, i).1, 21, "20 id bytes and the status");
        }
        assert_eq!(
            g.read_obj::<u8>(GuestAddress(status)).unwrap(),
            0,
            "status OK"
        );
        let peak = worker.shared.peak_in_flight_bytes.load(Ordering::SeqCst);
        assert!(peak <= IN_FLIGHT_BOOKKEEPING_BUDGET + one_request, "{peak}");
        assert_eq!(stop_bounded(worker), heads);
    }

    #[test]
    fn notifier_replaced_while_running() {
        let mut r = setup();
        let worker = r.start(0).unwrap();
        let new_call = EventFd::new(EFD_NONBLOCK).unwrap();
        r.call_notifier.set(Some(new_call.try_clone().unwrap()));
        r.submit_write(0, 0, 1);
        r.kick.write(1).unwrap();
        r.ring.wait_used(r.mem.guest(), 1);
        let _ = worker.stop();
        assert!(new_call.read().unwrap() >= 1);
        assert!(r.call.read().is_err(), "the old call fd is no longer used");
    }

    /// A fresh inflight region for one queue of `size` entries, from a GET memfd, and the memfd
    /// (to map it again, as a restarted backend would).
    fn inflight_region(size: u16) -> (QueueRegion, std::fs::File) {
        let limits = InflightLimits {
            device_queues: 1,
            max_queue_size: size,
        };
        let bytes = checked_region_size(1, size, limits).unwrap();
        let file = std::fs::File::from(new_region_memfd(bytes).unwrap());
        (map_again(&file, size), file)
    }

    fn map_again(file: &std::fs::File, size: u16) -> QueueRegion {
        let limits = InflightLimits {
            device_queues: 1,
            max_queue_size: size,
        };
        let description = InflightDescription {
            mmap_size: file.metadata().unwrap().len(),
            mmap_offset: 0,
            num_queues: 1,
            queue_size: size,
        };
        let fd = file.try_clone().unwrap().into();
        InflightMap::map(fd, &description, limits)
            .unwrap()
            .queue(0)
            .unwrap()
    }

    fn snapshot(region: &QueueRegion) -> Vec<u8> {
        region.snapshot()
    }

    /// Requests held in their I/O threads are marked inflight in fetch order; once they complete
    /// every mark is cleared and the region's used_idx is the ring's.
    #[test]
    fn tracked_requests_are_marked_while_in_flight_and_cleared_when_done() {
        let mut r = setup();
        r.engine = IoEngine::Threads;
        let (region, _memfd) = inflight_region(r.ring.size);
        let worker = r.start_tracked(0, Some(region.clone()), None).unwrap();
        // The requests come after the gate closed, all at once (no lone one to run inline):
        // none may complete before the check below.
        let gate = worker.shared.test_io_gate.write().unwrap();
        r.ring.hold_avail_idx = true;
        for n in 0..8u64 {
            r.submit_write(n, n, 5);
        }
        r.ring.publish_held(r.mem.guest());
        r.kick.write(1).unwrap();
        let popped = || worker.shared.queue.lock().unwrap().queue.next_avail();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while popped() != 8 {
            assert!(std::time::Instant::now() < deadline, "not all popped");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let copy = snapshot(&region);
        let view = SplitQueue::decode(0, r.ring.size, &copy).unwrap();
        assert_eq!(view.header().version, 1);
        assert_eq!(view.header().desc_num, r.ring.size);
        let expected: Vec<(u16, u64)> = (0..8u16).map(|n| (n * 3, u64::from(n))).collect();
        assert_eq!(view.inflight_descs_in_counter_order(), expected);
        drop(gate);
        r.ring.wait_used(r.mem.guest(), 8);
        assert_eq!(stop_bounded(worker), 8);
        let copy = snapshot(&region);
        let view = SplitQueue::decode(0, r.ring.size, &copy).unwrap();
        assert_eq!(view.inflight_count(), 0);
        assert_eq!(view.header().used_idx, 8);
        let last = r.ring.used_elem(r.mem.guest(), 7).0 as u16;
        assert_eq!(
            view.header().last_batch_head,
            last,
            "the last completion's head"
        );
    }

    /// The end-to-end property, without a real kill: a worker with delayed, out-of-order
    /// completions "dies" (writes nothing more) at each crash point with requests in flight; a
    /// new worker on a fresh mapping of the same region, started with SET_VRING_BASE = used idx
    /// as QEMU sends it, completes every request exactly once, new ones too.
    #[test]
    fn a_worker_killed_mid_flight_loses_and_repeats_nothing() {
        const BEFORE: u64 = 30;
        const AFTER: u64 = 10;
        let delay = Some("200-3000".parse::<CompletionDelay>().unwrap());
        for point in [
            CrashPoint::AfterFetch,
            CrashPoint::BeforePublish,
            CrashPoint::AfterPublish,
        ] {
            let mut r = setup();
            let (region, memfd) = inflight_region(r.ring.size);
            let worker = r.start_tracked(0, Some(region), delay).unwrap();
            worker.shared.test_crash.arm(point, 12);
            for n in 0..BEFORE {
                r.submit_write(n, n, n as u8 + 1);
            }
            r.kick.write(1).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !worker.shared.test_crash.is_dead() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{point:?}: never died"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // Its threads are gone too (a killed process has none); what it published stays.
            let _ = stop_bounded(worker);
            let seen_by_guest = r.ring.used_idx(r.mem.guest());
            assert!(
                seen_by_guest < BEFORE as u16,
                "{point:?}: nothing was in flight"
            );
            let dead_region = map_again(&memfd, r.ring.size);
            let copy = snapshot(&dead_region);
            let left = SplitQueue::decode(0, r.ring.size, &copy).unwrap();
            assert!(
                left.inflight_count() > 0,
                "{point:?}: nothing marked inflight"
            );
            // Only a death between publishing and clearing leaves a batch to roll back.
            let open_batch = left.header().used_idx != seen_by_guest;
            assert_eq!(open_batch, point == CrashPoint::AfterPublish, "{point:?}");
            // The guest goes on queueing while the backend is down.
            for n in BEFORE..BEFORE + AFTER {
                r.submit_write(n, n, n as u8 + 1);
            }
            let restarted = r
                .start_tracked(seen_by_guest, Some(map_again(&memfd, r.ring.size)), delay)
                .unwrap();
            r.kick.write(1).unwrap();
            assert_each_request_done_once(&r, restarted, &memfd, (BEFORE + AFTER) as u16, point);
        }
    }

    /// After a kill at `point` and a restart: requests 0..total (each writing `n + 1` to sector
    /// `n`) reach the used ring exactly once, OK and on disk, and the region ends clear.
    fn assert_each_request_done_once(
        r: &Running,
        restarted: QueueWorker,
        memfd: &std::fs::File,
        total: u16,
        point: CrashPoint,
    ) {
        r.ring.wait_used(r.mem.guest(), total);
        // Nothing more arrives: a repeat would push the used idx past the total.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(stop_bounded(restarted), total, "{point:?}");
        assert_eq!(r.ring.used_idx(r.mem.guest()), total, "{point:?}: a repeat");
        let mut heads = r.used_heads(total);
        heads.sort_unstable();
        let expected: Vec<u32> = (0..u32::from(total)).map(|n| n * 3).collect();
        assert_eq!(heads, expected, "{point:?}: every head exactly once");
        for n in 0..u64::from(total) {
            assert_eq!(r.status_of(n), 0, "{point:?}: request {n}");
            let mut sector = [0u8; 512];
            r.disk_file.read_exact_at(&mut sector, n * 512).unwrap();
            assert!(
                sector.iter().all(|&b| b == n as u8 + 1),
                "{point:?}: sector {n}"
            );
        }
        let copy = snapshot(&map_again(memfd, r.ring.size));
        let view = SplitQueue::decode(0, r.ring.size, &copy).unwrap();
        assert_eq!(view.inflight_count(), 0, "{point:?}");
        assert_eq!(view.header().used_idx, total, "{point:?}");
    }

    /// A region whose desc_num disagrees with the ring refuses the start; an untracked ring is
    /// unaffected by the check.
    #[test]
    fn a_mismatched_region_refuses_the_ring() {
        let r = setup();
        let (region, _memfd) = inflight_region(r.ring.size);
        // Stamped for a ring of 128 ...
        let worker = r.start_tracked(0, Some(region.clone()), None).unwrap();
        assert_eq!(stop_bounded(worker), 0);
        // ... then offered to a ring of 64.
        let mut small = setup();
        small.ring = TestRing::new(64, 0x1000);
        assert!(matches!(
            small.start_tracked(0, Some(region), None),
            Err(QueueError::Inflight { .. })
        ));
    }

    /// A head outside the ring can reach neither the used ring nor the region: the ring is
    /// broken (err fd), as QEMU breaks the device.
    #[test]
    fn a_head_outside_the_ring_breaks_it() {
        for engine in ALL_ENGINES {
            let mut r = setup();
            r.engine = engine;
            let g = r.mem.guest().clone();
            r.ring.publish(&g, 500);
            let worker = r.start(0).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while r.err.read().is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "err fd never signalled"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(r.ring.used_idx(&g), 0);
            assert_eq!(stop_bounded(worker), 1);
        }
    }

    #[test]
    fn completion_delays_parse_and_stay_in_range() {
        let d: CompletionDelay = "100-250".parse().unwrap();
        assert_eq!(
            (d.min, d.max),
            (Duration::from_micros(100), Duration::from_micros(250))
        );
        let mut state = 12345u64;
        for _ in 0..1000 {
            let picked = d.pick(&mut state);
            assert!(picked >= d.min && picked <= d.max, "{picked:?}");
        }
        let fixed: CompletionDelay = "7-7".parse().unwrap();
        assert_eq!(fixed.pick(&mut state), Duration::from_micros(7));
        let all: CompletionDelay = format!("0-{}", u64::MAX).parse().unwrap();
        let _ = all.pick(&mut state);
        for bad in ["", "5", "9-3", "a-b", "-1-5", "1-"] {
            assert!(bad.parse::<CompletionDelay>().is_err(), "{bad:?}");
        }
    }

    /// A stop (GET_VRING_BASE) while recovered heads still wait to be resubmitted (the queue is at
    /// its budget: 128 resubmitted requests of MAX_CHAIN_DESCRIPTORS descriptors each, I/O held)
    /// completes them all before it returns, as it does for popped ones.
    #[test]
    fn a_stop_during_resubmission_completes_every_recovered_request() {
        let mut r = setup();
        r.engine = IoEngine::Threads;
        let g = r.mem.guest().clone();
        let heads = r.ring.size;
        every_head_points_at_the_longest_indirect_table(&g, &r.ring);
        // What a killed backend left: every head consumed, none completed, all inflight.
        let (region, memfd) = inflight_region(heads);
        let stamped = r.start_tracked(0, Some(region.clone()), None).unwrap();
        assert_eq!(stop_bounded(stamped), 0);
        {
            let mut tracker = QueueTracker::recover(region.clone(), heads, 0).unwrap().0;
            (0..heads).for_each(|h| tracker.mark_fetched(h));
        }
        let worker = r
            .start_tracked(0, Some(map_again(&memfd, heads)), None)
            .unwrap();
        assert_eq!(worker.started_at(), heads);
        let shared = Arc::clone(&worker.shared);
        let gate = shared.test_io_gate.write().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !shared.throttled.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "never throttled");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(worker.stop());
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(gate);
        let next_avail = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("stop hung");
        assert_eq!(next_avail, heads);
        assert_eq!(
            r.ring.used_idx(&g),
            heads,
            "stopped with recovered requests undone"
        );
        let copy = snapshot(&region);
        let view = SplitQueue::decode(0, heads, &copy).unwrap();
        assert_eq!(view.inflight_count(), 0);
    }

    const IOERR: u8 = virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR as u8;

    /// Guest memory for the uring tests' read buffers: a page per request from here.
    const READ_BUFFERS: u64 = 0x180000;

    /// Writes then reads through the io_uring: the data lands on the disk and in guest memory,
    /// across descriptors split anywhere, with the used lengths `execute` gives.
    #[test]
    fn the_uring_engine_moves_data_between_guest_memory_and_the_disk() {
        let mut r = setup();
        r.engine = IoEngine::Uring;
        let g = r.mem.guest().clone();
        let worker = r.start(0).unwrap();
        for n in 0..32u64 {
            r.submit_write(n, n, n as u8 + 1);
        }
        r.kick.write(1).unwrap();
        r.ring.wait_used(&g, 32);
        for n in 0..32u64 {
            assert_eq!(r.status_of(n), 0, "write {n}");
            assert_eq!(
                r.ring.used_elem(&g, n as u16).1,
                1,
                "write {n}: status only"
            );
            let mut sector = [0u8; 512];
            r.disk_file.read_exact_at(&mut sector, n * 512).unwrap();
            assert!(sector.iter().all(|&b| b == n as u8 + 1), "sector {n}");
        }
        // Two sectors per read, in two uneven descriptors.
        for m in 0..16u64 {
            r.submit_read(32 + m, 2 * m, READ_BUFFERS + m * 0x1000, &[700, 324]);
        }
        r.kick.write(1).unwrap();
        r.ring.wait_used(&g, 48);
        for m in 0..16u64 {
            assert_eq!(r.status_of(32 + m), 0, "read {m}");
            let mut data = [0u8; 1024];
            g.read_slice(&mut data, GuestAddress(READ_BUFFERS + m * 0x1000))
                .unwrap();
            assert!(
                data[..512].iter().all(|&b| b == 2 * m as u8 + 1),
                "read {m}"
            );
            assert!(
                data[512..].iter().all(|&b| b == 2 * m as u8 + 2),
                "read {m}"
            );
        }
        let mut used_lens: Vec<u32> = (32..48u16).map(|i| r.ring.used_elem(&g, i).1).collect();
        used_lens.dedup();
        assert_eq!(used_lens, [1025], "data and status");
        assert_eq!(worker.stop(), 48);
        assert!(r.err.read().is_err());
    }

    /// A flush queued behind writes completes after all of them (it waits for the writes in
    /// flight before it goes to the kernel), and they are on the disk.
    #[test]
    fn a_uring_flush_completes_after_the_writes_before_it() {
        let mut r = setup();
        r.engine = IoEngine::Uring;
        let g = r.mem.guest().clone();
        let worker = r.start(0).unwrap();
        for n in 0..8u64 {
            r.submit_write(n, n, 0x40 + n as u8);
        }
        r.submit_flush(8);
        r.kick.write(1).unwrap();
        r.ring.wait_used(&g, 9);
        assert_eq!(r.status_of(8), 0, "flush OK");
        assert_eq!(r.ring.used_elem(&g, 8), (24, 1), "the flush is last");
        for n in 0..8u64 {
            assert_eq!(r.status_of(n), 0, "write {n}");
            let mut sector = [0u8; 512];
            r.disk_file.read_exact_at(&mut sector, n * 512).unwrap();
            assert!(sector.iter().all(|&b| b == 0x40 + n as u8), "sector {n}");
        }
        assert_eq!(worker.stop(), 9);
    }

    /// Requests that fail a check (a buffer outside guest memory, a sector past the end) get
    /// IOERR from `execute`; the ones around them go through the io_uring and complete.
    #[test]
    fn a_bad_request_among_uring_ones_fails_alone() {
        let mut r = setup();
        r.engine = IoEngine::Uring;
        let g = r.mem.guest().clone();
        r.disk_file.write_all_at(&[0x33; 512], 5 * 512).unwrap();
        let worker = r.start(0).unwrap();
        r.submit_write(0, 0, 0x11);
        // Guest memory is 2 MiB: this buffer runs past its end.
        r.submit_read(1, 0, 0x1ff000, &[0x2000]);
        r.submit_read(2, 5, READ_BUFFERS, &[512]);
        // The disk has 256 sectors.
        r.submit_write(3, 256, 0x22);
        r.submit_write(4, 1, 0x44);
        r.kick.write(1).unwrap();
        r.ring.wait_used(&g, 5);
        let statuses: Vec<u8> = (0..5).map(|n| r.status_of(n)).collect();
        assert_eq!(statuses, [0, IOERR, 0, IOERR, 0]);
        let mut data = [0u8; 512];
        g.read_slice(&mut data, GuestAddress(READ_BUFFERS)).unwrap();
        assert!(data.iter().all(|&b| b == 0x33));
        let mut sector = [0u8; 512];
        r.disk_file.read_exact_at(&mut sector, 512).unwrap();
        assert!(sector.iter().all(|&b| b == 0x44));
        assert_eq!(worker.stop(), 5);
        assert!(
            r.err.read().is_err(),
            "a failed request is not a broken ring"
        );
    }

    /// A pipe as (read end, write end).
    fn pipe() -> (std::fs::File, std::fs::File) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: `fds` is an array of two ints for pipe2 to fill.
        let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    /// A stop while reads are really in flight in the kernel (the "disk" is a pipe: a read
    /// completes when the test writes to it) returns only once they have completed and reached
    /// the used ring; the inflight region marks them until then, and is clear after.
    #[test]
    fn a_uring_stop_waits_for_the_ops_in_flight_and_publishes_them() {
        use std::io::Write;
        let mut r = setup();
        r.engine = IoEngine::Uring;
        let g = r.mem.guest().clone();
        let (reader, mut writer) = pipe();
        r.disk = Arc::new(Disk::with_capacity(reader, 256));
        let (region, _memfd) = inflight_region(r.ring.size);
        let worker = r.start_tracked(0, Some(region.clone()), None).unwrap();
        for n in 0..8u64 {
            r.submit_read(n, n, READ_BUFFERS + n * 0x1000, &[512]);
        }
        r.kick.write(1).unwrap();
        let shared = Arc::clone(&worker.shared);
        let popped = || shared.queue.lock().unwrap().queue.next_avail();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while popped() != 8 {
            assert!(std::time::Instant::now() < deadline, "not all popped");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(worker.stop());
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "stop returned with reads in flight"
        );
        assert_eq!(r.ring.used_idx(&g), 0);
        let copy = snapshot(&region);
        let view = SplitQueue::decode(0, r.ring.size, &copy).unwrap();
        let fetched: Vec<(u16, u64)> = (0..8u16).map(|n| (n * 3, u64::from(n))).collect();
        assert_eq!(view.inflight_descs_in_counter_order(), fetched);
        writer.write_all(&[0x5a; 8 * 512]).unwrap();
        let next_avail = rx.recv_timeout(Duration::from_secs(10)).expect("stop hung");
        assert_eq!(next_avail, 8);
        assert_eq!(r.ring.used_idx(&g), 8, "stopped before publishing");
        for n in 0..8u64 {
            assert_eq!(r.status_of(n), 0, "read {n}");
            let mut data = [0u8; 512];
            g.read_slice(&mut data, GuestAddress(READ_BUFFERS + n * 0x1000))
                .unwrap();
            assert!(data.iter().all(|&b| b == 0x5a), "read {n}");
        }
        let copy = snapshot(&region);
        let view = SplitQueue::decode(0, r.ring.size, &copy).unwrap();
        assert_eq!(view.inflight_count(), 0);
        assert_eq!(view.header().used_idx, 8);
    }

    /// Guest memory the frontend truncated away under an op: the kernel's copy fails with
    /// EFAULT (where ours would fault), the request gets IOERR, a write puts nothing on the
    /// disk, and requests in the memory that is left complete.
    #[test]
    fn uring_ops_on_vanished_guest_memory_fail_with_ioerr() {
        let mut r = setup();
        r.engine = IoEngine::Uring;
        let g = r.mem.guest().clone();
        r.disk_file.write_all_at(&[0xee; 1024], 0).unwrap();
        let vanished = 0x1c0000;
        g.write_slice(&[0x5a; 512], GuestAddress(vanished)).unwrap();
        let worker = r.start(0).unwrap();
        // The rings and the requests' headers and status bytes stay; the data page goes.
        r._ram.set_len(0x180000).unwrap();
        r.submit_read(0, 0, vanished, &[512]);
        r.submit_write_from(1, 1, vanished, 512);
        r.submit_write(2, 2, 0x77);
        r.kick.write(1).unwrap();
        r.ring.wait_used(&g, 3);
        let statuses: Vec<u8> = (0..3).map(|n| r.status_of(n)).collect();
        assert_eq!(statuses, [IOERR, IOERR, 0]);
        assert_eq!(r.ring.used_elem(&g, 0).1, 1, "no data for a failed read");
        let mut on_disk = [0u8; 1024];
        r.disk_file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0xee), "the disk was written");
        r.disk_file
            .read_exact_at(&mut on_disk[..512], 1024)
            .unwrap();
        assert!(on_disk[..512].iter().all(|&b| b == 0x77));
        assert_eq!(worker.stop(), 3);
    }

    /// On an image opened with O_DIRECT, aligned buffers go to the io_uring and unaligned ones
    /// (data 256 bytes into a page) through `execute`'s aligned bounce buffer: both work.
    #[test]
    fn a_uring_queue_on_an_o_direct_image_serves_aligned_and_unaligned_buffers() {
        let path = std::path::Path::new("/var/tmp")
            .join(format!("uring-path-direct-{}.img", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(256 * 512).unwrap();
        let opened = Disk::open(&path, false, true);
        let _ = std::fs::remove_file(&path);
        let disk = match opened {
            Ok(disk) => disk,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("not run: /var/tmp has no O_DIRECT ({e})");
                return;
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        };
        let mut r = setup();
        r.engine = IoEngine::Uring;
        r.disk = Arc::new(disk);
        r.disk_file = file;
        let g = r.mem.guest().clone();
        let worker = r.start(0).unwrap();
        // Aligned: a page of its own for each (8 sectors).
        for m in 0..4u64 {
            let data = READ_BUFFERS + m * 0x1000;
            g.write_slice(&[0xa0 + m as u8; 4096], GuestAddress(data))
                .unwrap();
            r.submit_write_from(m, 8 * m, data, 4096);
        }
        // Unaligned: submit_write's data lies at +0x100 in its slot.
        r.submit_write(4, 100, 0xbb);
        r.kick.write(1).unwrap();
        r.ring.wait_used(&g, 5);
        assert_eq!((0..5).map(|n| r.status_of(n)).collect::<Vec<_>>(), [0; 5]);
        // Read everything back, aligned and not.
        for m in 0..4u64 {
            r.submit_read(5 + m, 8 * m, 0x1c0000 + m * 0x1000, &[4096]);
        }
        r.submit_read(9, 100, 0x1c4010, &[512]);
        r.kick.write(1).unwrap();
        r.ring.wait_used(&g, 10);
        assert_eq!((5..10).map(|n| r.status_of(n)).collect::<Vec<_>>(), [0; 5]);
        for m in 0..4u64 {
            let mut data = [0u8; 4096];
            g.read_slice(&mut data, GuestAddress(0x1c0000 + m * 0x1000))
                .unwrap();
            assert!(data.iter().all(|&b| b == 0xa0 + m as u8), "block {m}");
        }
        let mut data = [0u8; 512];
        g.read_slice(&mut data, GuestAddress(0x1c4010)).unwrap();
        assert!(data.iter().all(|&b| b == 0xbb));
        let mut on_disk = [0u8; 512];
        r.disk_file.read_exact_at(&mut on_disk, 100 * 512).unwrap();
        assert!(on_disk.iter().all(|&b| b == 0xbb));
        assert_eq!(worker.stop(), 10);
    }

    /// A uring worker "dies" at each crash point with requests in flight; a restarted uring
    /// worker (SET_VRING_BASE = used idx, as QEMU sends it) runs the resubmitted heads first and
    /// completes every request exactly once, new ones too.
    #[test]
    fn a_uring_worker_killed_mid_flight_loses_and_repeats_nothing() {
        const BEFORE: u64 = 20;
        const AFTER: u64 = 10;
        for (point, after) in [
            (CrashPoint::AfterFetch, 5),
            (CrashPoint::BeforePublish, 0),
            (CrashPoint::AfterPublish, 0),
        ] {
            let mut r = setup();
            r.engine = IoEngine::Uring;
            let (region, memfd) = inflight_region(r.ring.size);
            let worker = r.start_tracked(0, Some(region), None).unwrap();
            worker.shared.test_crash.arm(point, after);
            for n in 0..BEFORE {
                r.submit_write(n, n, n as u8 + 1);
            }
            r.kick.write(1).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !worker.shared.test_crash.is_dead() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{point:?}: never died"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = stop_bounded(worker);
            let seen_by_guest = r.ring.used_idx(r.mem.guest());
            for n in BEFORE..BEFORE + AFTER {
                r.submit_write(n, n, n as u8 + 1);
            }
            let restarted = r
                .start_tracked(seen_by_guest, Some(map_again(&memfd, r.ring.size)), None)
                .unwrap();
            r.kick.write(1).unwrap();
            assert_each_request_done_once(&r, restarted, &memfd, (BEFORE + AFTER) as u16, point);
        }
    }
}
