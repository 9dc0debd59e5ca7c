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
//! costs no thread hand-off); batches go to the I/O threads.
//!
//! Requests complete out of order: several I/O threads work on one queue, and each adds its
//! request to the used ring (under the lock that also guards popping) as soon as it is done,
//! then writes the call eventfd. Stopping a worker (GET_VRING_BASE, a replaced kick fd, a new
//! memory table, SET_VRING_ENABLE 0) stops popping first, then waits until every popped request
//! has reached the used ring, so the returned avail index tells exactly what was consumed.
//!
//! Where inflight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) plugs in later: `fetch_chains`
//! is the single place a head leaves the avail ring and `complete` the single place it reaches
//! the used ring; both run under the queue lock.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::{self, JoinHandle};

use tracing::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::Disk;
use super::request::{BlkRequest, Completion};

/// I/O threads per queue: enough for several requests in flight without a thread per request.
pub const IO_THREADS_PER_QUEUE: usize = 4;

/// An eventfd the frontend gave us (call or err), replaceable while the queue runs: QEMU swaps
/// the call fd when the guest masks and unmasks the interrupt.
#[derive(Debug, Default)]
pub struct Notifier {
    fd: RwLock<Option<EventFd>>,
}

impl Notifier {
    pub fn set(&self, fd: Option<EventFd>) {
        *self.fd.write().unwrap_or_else(PoisonError::into_inner) = fd;
    }

    pub fn is_set(&self) -> bool {
        self.fd
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// Writes 1 to the eventfd, if one is set. A full eventfd counter (EAGAIN) already means
    /// "signalled", so that is not an error.
    pub fn signal(&self) {
        let guard = self.fd.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(fd) = guard.as_ref() {
            if let Err(e) = fd.write(1) {
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn!("cannot signal eventfd {}: {e}", fd.as_raw_fd());
                }
            }
        }
    }
}

/// The three ring addresses, already translated to guest physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddresses {
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
}

/// Everything a queue needs to run.
#[derive(Debug)]
pub struct QueueSetup {
    pub index: u16,
    /// Ring size from SET_VRING_NUM (a power of two).
    pub size: u16,
    pub rings: RingAddresses,
    /// From SET_VRING_BASE: the first avail ring entry not yet consumed.
    pub next_avail: u16,
    /// The worker's own handle on the kick eventfd (the vring keeps the original, so a failed
    /// start or a stop never loses it).
    pub kick: EventFd,
    pub call: Arc<Notifier>,
    pub err: Arc<Notifier>,
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
}

/// State shared by the dispatcher and the I/O threads of one queue.
#[derive(Debug)]
struct QueueShared {
    index: u16,
    /// Set before the stop eventfd is written: a guest that keeps the avail ring full must not
    /// keep the dispatcher from noticing the stop.
    stopping: AtomicBool,
    /// Requests handed to the I/O threads and not completed yet.
    in_flight: AtomicUsize,
    queue: Mutex<Queue>,
    mem: Arc<GuestMemoryMmap>,
    disk: Arc<Disk>,
    call: Arc<Notifier>,
    err: Arc<Notifier>,
}

/// A running queue: its dispatcher thread and I/O threads.
#[derive(Debug)]
pub struct QueueWorker {
    index: u16,
    stop: EventFd,
    dispatcher: Option<JoinHandle<()>>,
    shared: Arc<QueueShared>,
}

impl QueueWorker {
    /// Checks the ring against guest memory and starts serving it.
    pub fn start(
        setup: QueueSetup,
        mem: Arc<GuestMemoryMmap>,
        disk: Arc<Disk>,
    ) -> Result<Self, QueueError> {
        let index = setup.index;
        let queue = build_queue(&setup, &mem)?;
        let os_err = |source| QueueError::Os { index, source };
        let stop = EventFd::new(EFD_NONBLOCK).map_err(os_err)?;
        let stop_for_thread = stop.try_clone().map_err(os_err)?;
        let shared = Arc::new(QueueShared {
            index,
            stopping: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            queue: Mutex::new(queue),
            mem,
            disk,
            call: setup.call,
            err: setup.err,
        });
        let kick = setup.kick;
        let queue_size = usize::from(setup.size);
        let thread_shared = Arc::clone(&shared);
        let dispatcher = thread::Builder::new()
            .name(format!("blk-q{index}"))
            .spawn(move || dispatch(thread_shared, kick, stop_for_thread, queue_size))
            .map_err(os_err)?;
        debug!(queue = index, "virtio-blk queue started");
        Ok(QueueWorker {
            index,
            stop,
            dispatcher: Some(dispatcher),
            shared,
        })
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
        if let Some(Err(_)) = self.dispatcher.take().map(JoinHandle::join) {
            error!(queue = self.index, "queue dispatcher thread panicked");
        }
        let next_avail = self
            .shared
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_avail();
        debug!(queue = self.index, next_avail, "virtio-blk queue stopped");
        next_avail
    }
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if self.dispatcher.is_some() {
            self.stop_inner();
        }
    }
}

fn build_queue(setup: &QueueSetup, mem: &GuestMemoryMmap) -> Result<Queue, QueueError> {
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

/// The dispatcher: waits for kicks, pops chains, parses them and queues them to the I/O threads.
/// Returns when stopped, after the I/O threads have drained.
fn dispatch(shared: Arc<QueueShared>, kick: EventFd, stop: EventFd, queue_size: usize) {
    let (sender, receiver) = sync_channel::<BlkRequest>(queue_size);
    let receiver = Arc::new(Mutex::new(receiver));
    let mut io_threads = Vec::with_capacity(IO_THREADS_PER_QUEUE);
    for n in 0..IO_THREADS_PER_QUEUE {
        let thread_shared = Arc::clone(&shared);
        let receiver = Arc::clone(&receiver);
        let spawned = thread::Builder::new()
            .name(format!("blk-q{}-io{n}", shared.index))
            .spawn(move || io_worker(thread_shared, receiver));
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
        serve_kicks(&shared, &kick, &stop, &sender);
    }
    // Closing the channel lets each I/O thread finish what is queued, then exit.
    drop(sender);
    for handle in io_threads {
        let _ = handle.join();
    }
}

enum Wake {
    Kick,
    Stop,
}

fn serve_kicks(
    shared: &QueueShared,
    kick: &EventFd,
    stop: &EventFd,
    sender: &SyncSender<BlkRequest>,
) {
    let mut kick_usable = true;
    // The guest may have queued requests before the kick fd was (re)connected: look once first.
    let mut broken = !fetch_and_send(shared, sender);
    let avail_idx_addr = {
        let queue = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.avail_ring().checked_add(2).map(GuestAddress)
    };
    loop {
        // Before sleeping in poll(), watch the avail index for a few microseconds: a driver at
        // queue depth 1 often publishes its next request right after our completion, and
        // catching it here saves a sleep and a wake-up (QEMU's event loop polls the same way).
        if !broken
            && avail_idx_addr.is_some_and(|a| new_request_within(shared, a, POLL_BEFORE_SLEEP))
        {
            broken = !fetch_and_send(shared, sender);
            continue;
        }
        match wait(kick, stop, kick_usable) {
            Ok(Wake::Stop) => return,
            Ok(Wake::Kick) => {
                // Reset the counter before scanning: a kick after this read wakes us again.
                if let Err(e) = kick.read() {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        warn!(
                            queue = shared.index,
                            "kick fd unreadable, waiting for stop: {e}"
                        );
                        kick_usable = false;
                        continue;
                    }
                }
                if !broken {
                    broken = !fetch_and_send(shared, sender);
                }
            }
            Err(e) => {
                error!(queue = shared.index, "poll failed, waiting for stop: {e}");
                kick_usable = false;
            }
        }
    }
}

/// How long the dispatcher watches the avail ring before it sleeps on the kick fd.
const POLL_BEFORE_SLEEP: std::time::Duration = std::time::Duration::from_micros(20);

/// Spins up to `window` until the driver publishes an avail index we have not consumed.
fn new_request_within(
    shared: &QueueShared,
    avail_idx_addr: GuestAddress,
    window: std::time::Duration,
) -> bool {
    let next_avail = shared
        .queue
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .next_avail();
    let start = std::time::Instant::now();
    while !shared.stopping.load(Ordering::Acquire) && start.elapsed() < window {
        match shared.mem.load::<u16>(avail_idx_addr, Ordering::Acquire) {
            Ok(idx) if u16::from_le(idx) != next_avail => return true,
            Ok(_) => std::hint::spin_loop(),
            Err(_) => return false,
        }
    }
    false
}

/// Pops every available chain and hands it on. Returns false when the ring is broken (the guest
/// published an impossible avail index): the queue then stops serving and the err fd is written.
fn fetch_and_send(shared: &QueueShared, sender: &SyncSender<BlkRequest>) -> bool {
    while !shared.stopping.load(Ordering::Acquire) {
        let chains = match fetch_chains(shared) {
            Ok(chains) => chains,
            Err(e) => {
                error!(
                    queue = shared.index,
                    "virtqueue is broken, no longer served: {e}"
                );
                shared.err.signal();
                return false;
            }
        };
        if chains.is_empty() {
            return true;
        }
        let lone = chains.len() == 1;
        for chain in chains {
            let request = BlkRequest::parse(chain);
            // A lone request on an otherwise idle queue (queue depth 1) runs right here: handing
            // it to an I/O thread would cost two thread wake-ups for nothing to overlap with.
            // Several at once go to the I/O threads, so they overlap and may complete out of order.
            if lone && shared.in_flight.load(Ordering::Acquire) == 0 {
                complete(shared, request.execute(&shared.mem, &shared.disk));
                continue;
            }
            shared.in_flight.fetch_add(1, Ordering::AcqRel);
            if sender.send(request).is_err() {
                shared.in_flight.fetch_sub(1, Ordering::AcqRel);
                return true;
            }
        }
    }
    true
}

fn fetch_chains(
    shared: &QueueShared,
) -> Result<Vec<DescriptorChain<Arc<GuestMemoryMmap>>>, virtio_queue::Error> {
    let mut queue = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let chains = queue.iter(Arc::clone(&shared.mem))?.collect();
    Ok(chains)
}

fn io_worker(shared: Arc<QueueShared>, receiver: Arc<Mutex<Receiver<BlkRequest>>>) {
    loop {
        let next = receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(request) = next else { return };
        let completion = request.execute(&shared.mem, &shared.disk);
        complete(&shared, completion);
        shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn complete(shared: &QueueShared, completion: Completion) {
    let mut queue = shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
    if let Err(e) = queue.add_used(&*shared.mem, completion.head, completion.used_len) {
        warn!(
            queue = shared.index,
            head = completion.head,
            "cannot add request to the used ring: {e}"
        );
        return;
    }
    let notify = queue.needs_notification(&*shared.mem).unwrap_or(true)
        && !driver_suppresses_interrupts(&queue, &shared.mem);
    drop(queue);
    if notify {
        shared.call.signal();
    }
}

/// VRING_AVAIL_F_NO_INTERRUPT: without EVENT_IDX (which we do not offer), a driver that polls
/// the used ring sets this flag in the avail ring to say it wants no interrupt. virtio-queue's
/// `needs_notification` does not look at it, so we do: an unwanted interrupt costs the guest an
/// exit and an interrupt delivery per request. It is a hint; when it cannot be read, notify.
fn driver_suppresses_interrupts(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    // The used index written by add_used must be visible before we read the driver's flags,
    // or a driver that just cleared the flag could miss this completion (virtio spec 2.7.10).
    std::sync::atomic::fence(Ordering::SeqCst);
    let flags_addr = GuestAddress(queue.avail_ring());
    match mem.load::<u16>(flags_addr, Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT != 0,
        Err(_) => false,
    }
}

/// Blocks until the stop fd or (if usable) the kick fd is readable.
fn wait(kick: &EventFd, stop: &EventFd, kick_usable: bool) -> io::Result<Wake> {
    let mut fds = [
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let count: libc::nfds_t = if kick_usable { 2 } else { 1 };
    loop {
        // SAFETY: `fds` is a valid array of `count` (<= 2) pollfd structs that outlives the call.
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
        if fds[1].revents & libc::POLLIN != 0 {
            return Ok(Wake::Kick);
        }
        if fds[1].revents != 0 {
            return Err(io::Error::other(format!(
                "kick fd reported poll events {:#x}",
                fds[1].revents
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blk::test_util::{guest_memory, memfd_disk, request_header, TestRing};
    use std::os::unix::fs::FileExt;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use vm_memory::Bytes;

    struct Running {
        mem: crate::blk::memory::MappedMemory,
        _ram: std::fs::File,
        ring: TestRing,
        disk: Arc<Disk>,
        disk_file: std::fs::File,
        kick: EventFd,
        call: EventFd,
        err: EventFd,
        call_notifier: Arc<Notifier>,
        err_notifier: Arc<Notifier>,
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
        }
    }

    impl Running {
        fn start(&self, next_avail: u16) -> Result<QueueWorker, QueueError> {
            QueueWorker::start(
                QueueSetup {
                    index: 0,
                    size: self.ring.size,
                    rings: self.ring.rings,
                    next_avail,
                    kick: self.kick.try_clone().unwrap(),
                    call: Arc::clone(&self.call_notifier),
                    err: Arc::clone(&self.err_notifier),
                },
                Arc::clone(self.mem.guest()),
                Arc::clone(&self.disk),
            )
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
    fn many_requests_in_flight_all_complete_and_signal_the_call_fd() {
        let mut r = setup();
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

    #[test]
    fn a_stopped_queue_resumes_where_it_left_off() {
        let mut r = setup();
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
        let r = setup();
        let worker = r.start(0).unwrap();
        // The driver claims 1000 new entries in a 128-entry ring.
        r.mem
            .guest()
            .store(
                1000u16.to_le(),
                GuestAddress(r.ring.rings.avail_ring.0 + 2),
                std::sync::atomic::Ordering::Release,
            )
            .unwrap();
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
}
