//! An io_uring disk engine: the queue worker's dispatcher thread hands it whole batches of reads,
//! writes and flushes, and learns of their completion through one eventfd.
//!
//! # What io_uring gives this backend
//!
//! - **One syscall per batch.** A guest kick can make dozens of requests available. Each becomes
//!   one submission queue entry (SQE) written into memory shared with the kernel; one
//!   `io_uring_enter` then starts them all. No thread hand-off, no syscall per request.
//! - **Cached reads complete inline.** For a buffered file the kernel first tries every I/O
//!   without blocking. A read whose pages are in the page cache is copied during
//!   `io_uring_enter` itself, and its completion is already posted when [`UringEngine::submit`]
//!   returns. Only I/O that would block is handed to the kernel's own workers (or, for buffered
//!   reads, to a page-unlock callback), and completes later.
//! - **O_DIRECT I/O is truly asynchronous.** On a file opened with `O_DIRECT` (on a filesystem
//!   over a block device), a read or write goes straight to the block layer as a bio; the
//!   dispatcher is back in `poll()` while the device works, and any number of requests up to the
//!   engine's depth are in flight at once, with no thread per request anywhere.
//! - **Completions arrive on an eventfd.** The ring is registered with an eventfd
//!   ([`UringEngine::completion_fd`]) that the kernel signals whenever it posts a completion, so
//!   the dispatcher polls it next to its kick and stop eventfds.
//!
//! # The memory contract
//!
//! The kernel reads and writes the caller's buffers *after* [`UringEngine::push`] has returned,
//! at a time the caller does not control: during a later `io_uring_enter`, on a kernel worker
//! thread, or from a block device's completion. Two kinds of memory are involved:
//!
//! - **The iovec arrays** (the lists of `(address, length)` pairs). The engine owns them: each
//!   in-flight op keeps its array in a boxed slice in a slot of a slab that is indexed by the
//!   SQE's `user_data`, and the array is freed only once the op's completion has been reaped.
//!   The kernel also reads the array again when the engine resubmits the rest of a short op.
//! - **The buffers the iovecs point to** (guest memory). These are the caller's: they must stay
//!   mapped, and must not be reused for anything the kernel must not write, until the op's
//!   completion has been delivered by [`UringEngine::reap`] or the engine has been dropped. This
//!   is why `push` is an `unsafe fn`. Memory that simply disappears (the guest memory file is
//!   truncated, a region is unmapped) is not unsound by itself: the kernel's copy fails and the
//!   op completes with `EFAULT`, which the engine reports like any other error. What must not
//!   happen is that *something else* gets mapped at those addresses while the op is in flight.
//!
//! Dropping the engine waits for every op still in flight (submitting those only pushed), so that
//! no kernel write outlives the engine; see [`UringEngine`]'s `Drop`.
//!
//! # Completions
//!
//! Every op pushed gets exactly one completion through [`UringEngine::reap`]: `Ok(bytes)` with
//! the op's whole length (0 for a flush), or an error. Short reads and writes are continued
//! internally (the rest of the iovecs, at the advanced offset) until the op is done; a read that
//! reaches the end of the file before its end is an `UnexpectedEof` error. `EAGAIN`/`EINTR`
//! results are retried a bounded number of times. Completions come in any order: a flush does
//! not wait for writes pushed before it (the caller orders them, as virtio-blk requires anyway:
//! a driver sends FLUSH after the writes it covers have completed).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types, IoUring};
use tracing::{error, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The deepest engine [`UringEngine::new`] builds.
pub const MAX_DEPTH: u32 = 1024;

/// How many times one op is resubmitted after `EAGAIN`/`EINTR` (without progress in between)
/// before the error is reported: a file that keeps answering EAGAIN must not spin the
/// dispatcher.
const MAX_RETRIES: u32 = 16;

/// How many times `Drop` retries a failing wait before it gives up on the ops in flight.
const DROP_WAIT_ATTEMPTS: u32 = 100;

/// The fixed-file index of the disk image (the only file registered).
const DISK: types::Fixed = types::Fixed(0);

/// One I/O on the disk image.
///
/// The iovecs are host addresses (normally into mapped guest memory) and lengths. Their total is
/// what the op moves; there may be any number of them up to the kernel's `UIO_MAXIOV` (1024;
/// more fails the op with `EINVAL`), and zero-length ones are fine.
pub enum UringOp {
    /// Read `iovecs`' total length from the file at `offset` into the buffers.
    Read {
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    /// Write the buffers to the file at `offset`.
    Write {
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    /// Make the file's written data durable (`fdatasync`, as `Disk::flush`).
    Flush,
}

impl std::fmt::Debug for UringOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rw = |f: &mut std::fmt::Formatter<'_>, name, offset: &u64, iovecs: &[libc::iovec]| {
            f.debug_struct(name)
                .field("offset", offset)
                .field("iovecs", &iovecs.len())
                .field("bytes", &total_len(iovecs))
                .finish()
        };
        match self {
            UringOp::Read { offset, iovecs } => rw(f, "Read", offset, iovecs),
            UringOp::Write { offset, iovecs } => rw(f, "Write", offset, iovecs),
            UringOp::Flush => f.write_str("Flush"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
}

/// An op the engine holds from `push` until its completion is reaped.
struct Slot {
    token: u64,
    kind: Kind,
    /// File offset of the next byte to move.
    offset: u64,
    /// The op's iovec array. A boxed slice: its elements stay at one address for the slot's
    /// whole life (moving the `Slot` moves only the pointer), which is what the kernel needs.
    /// Spent iovecs are skipped through `first`; a partly spent one is trimmed in place.
    iovecs: Box<[libc::iovec]>,
    /// Index of the first iovec with bytes left.
    first: usize,
    /// Bytes moved so far.
    done: u64,
    /// Bytes the op moves in all.
    total: u64,
    /// EAGAIN/EINTR resubmissions since the last progress.
    retries: u32,
}

/// What a completion means for its op.
#[derive(Debug)]
enum Step {
    /// The op is finished: report this.
    Done(io::Result<u64>),
    /// Submit the (rest of the) op again.
    Again,
}

impl Slot {
    fn new(token: u64, op: UringOp) -> Self {
        let (kind, offset, iovecs) = match op {
            UringOp::Read { offset, iovecs } => (Kind::Read, offset, iovecs),
            UringOp::Write { offset, iovecs } => (Kind::Write, offset, iovecs),
            UringOp::Flush => (Kind::Flush, 0, Vec::new()),
        };
        let total = total_len(&iovecs);
        Slot {
            token,
            kind,
            offset,
            iovecs: iovecs.into_boxed_slice(),
            first: 0,
            done: 0,
            total,
            retries: 0,
        }
    }

    /// The op back, for a push that could not queue it (only before any SQE was built).
    fn into_op(self) -> UringOp {
        let iovecs = self.iovecs.into_vec();
        match self.kind {
            Kind::Read => UringOp::Read {
                offset: self.offset,
                iovecs,
            },
            Kind::Write => UringOp::Write {
                offset: self.offset,
                iovecs,
            },
            Kind::Flush => UringOp::Flush,
        }
    }

    /// Whether every byte offset the op touches is one the kernel takes as a position. The
    /// kernel reads an SQE offset as a signed `loff_t`, and -1 (`u64::MAX`) means "the file's
    /// current position": such an op would silently move the wrong bytes.
    fn offsets_valid(&self) -> bool {
        self.kind == Kind::Flush
            || self
                .offset
                .checked_add(self.total)
                .is_some_and(|end| i64::try_from(end).is_ok())
    }

    /// The SQE for what is left of the op, tagged with the slot's index.
    ///
    /// The entry points into `self.iovecs`, so it must only be pushed while this slot stays in
    /// the slab, untouched, until the completion of this entry is reaped.
    fn sqe(&self, index: usize) -> squeue::Entry {
        let rest = self.iovecs.get(self.first..).unwrap_or(&[]);
        // More than u32::MAX iovecs cannot be expressed; the kernel refuses anything over
        // UIO_MAXIOV with EINVAL anyway, so saturating keeps that answer.
        let count = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let entry = match self.kind {
            Kind::Read => opcode::Readv::new(DISK, rest.as_ptr(), count)
                .offset(self.offset)
                .build(),
            Kind::Write => opcode::Writev::new(DISK, rest.as_ptr(), count)
                .offset(self.offset)
                .build(),
            Kind::Flush => opcode::Fsync::new(DISK)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        };
        entry.user_data(index as u64)
    }

    /// Accounts one completion (`res`: bytes moved, or a negative errno) to the op.
    fn on_result(&mut self, res: i32) -> Step {
        if res < 0 {
            let errno = -res;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && self.retries < MAX_RETRIES {
                self.retries += 1;
                return Step::Again;
            }
            return Step::Done(Err(io::Error::from_raw_os_error(errno)));
        }
        if self.kind == Kind::Flush {
            return Step::Done(Ok(0));
        }
        let moved = u64::from(res.unsigned_abs());
        let left = self.total - self.done;
        if moved > left {
            return Step::Done(Err(io::Error::other(format!(
                "io_uring reported {moved} bytes for an op with {left} bytes left"
            ))));
        }
        self.done += moved;
        if moved == left {
            return Step::Done(Ok(self.done));
        }
        if moved == 0 {
            return Step::Done(Err(match self.kind {
                Kind::Read => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("end of file at offset {}", self.offset),
                ),
                _ => io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("write of 0 bytes at offset {}", self.offset),
                ),
            }));
        }
        // `offsets_valid` held at push and `moved <= left`, so this stays below i64::MAX.
        self.offset += moved;
        self.first = advance_iovecs(&mut self.iovecs, self.first, moved);
        self.retries = 0;
        Step::Again
    }
}

/// The sum of the iovecs' lengths (saturating: such a sum is refused by the kernel anyway).
fn total_len(iovecs: &[libc::iovec]) -> u64 {
    iovecs
        .iter()
        .fold(0u64, |sum, v| sum.saturating_add(v.iov_len as u64))
}

/// Consumes `moved` bytes from `iovecs[first..]`: whole iovecs are skipped, a partly consumed one
/// is trimmed in place (its base advanced, its length reduced). Returns the new `first`, the
/// index of the first iovec with bytes left (or `iovecs.len()` when all are spent).
///
/// Only addresses are computed; no memory is touched.
fn advance_iovecs(iovecs: &mut [libc::iovec], first: usize, moved: u64) -> usize {
    let mut left = moved;
    let mut index = first;
    while left > 0 {
        let Some(iov) = iovecs.get_mut(index) else {
            break;
        };
        let len = iov.iov_len as u64;
        if left >= len {
            left -= len;
            index += 1;
        } else {
            // `left < len <= usize::MAX`, so the cast is exact.
            let n = left as usize;
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(n).cast();
            iov.iov_len -= n;
            left = 0;
        }
    }
    index
}

/// Up to `depth` reads, writes and flushes in flight on one file through one io_uring.
///
/// Single-threaded by design (`&mut self` everywhere): the dispatcher pushes a batch, submits it,
/// polls [`completion_fd`](Self::completion_fd) and reaps.
///
/// # Drop
///
/// Dropping the engine first waits for every op still in flight (ops pushed and not yet
/// submitted are submitted, and waited for too): closing the ring does not stop the kernel
/// from finishing them, and it would then read iovec arrays the engine had freed and write into
/// memory the caller believes idle. Their results are discarded. Should waiting itself keep
/// failing, the engine logs it and leaks the iovec arrays rather than free them under the
/// kernel. So drop the engine *before* unmapping the memory its ops point into.
pub struct UringEngine {
    ring: IoUring,
    /// Registered with the ring: the kernel adds to it for each completion it posts.
    completions: EventFd,
    /// The ops in flight, by SQE `user_data`; `None` where the index is free.
    slots: Vec<Option<Slot>>,
    /// Indexes of the free slots.
    free: Vec<usize>,
    /// Slots of ops refused before reaching the kernel, with the errno to report at the next
    /// reap (the eventfd was signalled for them).
    refused: Vec<(usize, i32)>,
    /// Scratch for one pass over the completion queue: (user_data, result).
    cqes: Vec<(u64, i32)>,
}

// SAFETY: the only non-`Send` fields are the raw pointers in the iovec arrays (and the ring's
// own, which `IoUring` declares `Send`). The engine never dereferences the iovec pointers; it
// only hands them to the kernel, and which thread submits or reaps makes no difference to the
// kernel or to the memory they point to. Ops in flight when the submitting thread exits are
// cancelled by the kernel and complete with an error, which the engine reports.
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// Builds a ring for `file` with room for `depth` ops in flight.
    ///
    /// `depth` must be in `1..=MAX_DEPTH`; the submission queue is `depth` rounded up to a power
    /// of two, and the completion queue twice that, so completions can never overflow. The file
    /// is registered with the ring (the kernel keeps its own reference: `file` may be closed
    /// afterwards) and every SQE names it by fixed index (IOSQE_FIXED_FILE), which spares the
    /// kernel a file-table lookup per I/O.
    pub fn new(file: &File, depth: u32) -> io::Result<Self> {
        if !(1..=MAX_DEPTH).contains(&depth) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("io_uring depth {depth} is not in 1..={MAX_DEPTH}"),
            ));
        }
        // Forked children (the VMM spawns helper processes) get no access to the rings.
        let ring = IoUring::builder()
            .dontfork()
            .build(depth.next_power_of_two())?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        let completions = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(completions.as_raw_fd())?;
        let depth = depth as usize;
        Ok(UringEngine {
            ring,
            completions,
            slots: (0..depth).map(|_| None).collect(),
            // Popped from the end: slot 0 is used first.
            free: (0..depth).rev().collect(),
            refused: Vec::new(),
            cqes: Vec::with_capacity(depth),
        })
    }

    /// The eventfd that becomes readable when completions are waiting to be reaped. Poll it for
    /// `POLLIN`; [`reap`](Self::reap) drains it.
    pub fn completion_fd(&self) -> &EventFd {
        &self.completions
    }

    /// The most ops in flight at once (`depth` given to `new`).
    pub fn depth(&self) -> usize {
        self.slots.len()
    }

    /// Ops pushed whose completion has not been reaped yet (submitted or not).
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues `op`, to be started by the next [`submit`](Self::submit); `token` comes back with
    /// its completion. Returns the op when `depth` ops are already in flight.
    ///
    /// An op whose byte range does not fit a signed 64-bit file offset is not sent to the kernel;
    /// it completes (at the next reap, with the completion fd signalled) with `InvalidInput`.
    ///
    /// # Safety
    ///
    /// The kernel writes (for `Read`) or reads (for `Write`) every byte the iovecs name, at any
    /// time until this op's completion has been delivered by [`reap`](Self::reap) or the engine
    /// has been dropped. Until then the caller must ensure that each iovec names memory that may
    /// be accessed that way: memory that Rust code does not hold a reference to (for `Read`, none
    /// at all; for `Write`, no `&mut`) — guest memory mappings are the intended case — and that
    /// is neither freed nor replaced by another mapping. Memory that is merely unmapped (or a
    /// shared mapping whose file was truncated) with nothing mapped in its place is tolerated:
    /// the op fails with `EFAULT`.
    pub unsafe fn push(&mut self, token: u64, op: UringOp) -> Result<(), UringOp> {
        let Some(&index) = self.free.last() else {
            return Err(op);
        };
        let slot = Slot::new(token, op);
        if !slot.offsets_valid() {
            self.free.pop();
            self.refused.push((index, libc::EINVAL));
            self.slots[index] = Some(slot);
            // Make the refusal visible to a caller that waits for the completion fd.
            if let Err(e) = self.completions.write(1) {
                warn!("io_uring engine: signalling a refused op on the completion fd: {e}");
            }
            return Ok(());
        }
        let entry = slot.sqe(index);
        // SAFETY: the entry points to the slot's boxed iovec array. Moving the slot into the
        // slab below moves only the box's pointer, not the array; the array then stays there,
        // at the same address and unmodified, until this entry's completion is reaped (a slot
        // is only taken out, or changed for a resubmission, on reaping its completion, and
        // `Drop` waits for it). The kernel reads nothing before the next `io_uring_enter`. The
        // memory the iovecs name is the caller's contract (this function's `# Safety`). The
        // file is fixed file 0, registered in `new`.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            // Cannot happen (the queue holds at most one entry per slot), but never lose an op.
            return Err(slot.into_op());
        }
        self.free.pop();
        self.slots[index] = Some(slot);
        Ok(())
    }

    /// Starts everything pushed since the last submit, with one `io_uring_enter` (more only if
    /// the kernel takes the queue in parts). Ops served from the page cache may already be
    /// complete when this returns.
    ///
    /// On error, entries not taken by the kernel stay queued for the next `submit` (or
    /// `wait_one`); nothing is lost.
    pub fn submit(&mut self) -> io::Result<()> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        "io_uring_enter took none of the queued entries",
                    ))
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Calls `done(token, result)` for each op that has finished: `Ok(bytes)` (the op's whole
    /// length, 0 for a flush) or the error. Ops that came back short are resubmitted for the
    /// rest instead (with one `io_uring_enter` for all of them). Drains the completion fd
    /// first, so a completion posted during the reap makes it readable again. Returns how many
    /// ops completed.
    ///
    /// Every completion found is delivered even when the result is `Err`: the error only says
    /// that resubmitting the rest of short ops failed; those stay queued and go in with the next
    /// [`submit`](Self::submit) or [`wait_one`](Self::wait_one).
    pub fn reap(&mut self, done: impl FnMut(u64, io::Result<u64>)) -> io::Result<usize> {
        let (completed, resubmitted) = self.reap_inner(true, done);
        if resubmitted {
            self.submit()?;
        }
        Ok(completed)
    }

    /// Blocks until at least one completion is waiting (submitting whatever was pushed first),
    /// then returns; [`reap`](Self::reap) collects it. Returns at once when nothing is in flight
    /// or a completion is already waiting. For draining a queue at stop.
    pub fn wait_one(&mut self) -> io::Result<()> {
        if self.in_flight() == 0 || !self.refused.is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One pass over the refused ops and the completion queue. With `resubmit` false (at drop),
    /// an op that would need resubmitting is finished instead. Returns the ops completed and
    /// whether any entry was queued again.
    fn reap_inner(
        &mut self,
        resubmit: bool,
        mut done: impl FnMut(u64, io::Result<u64>),
    ) -> (usize, bool) {
        // Drain before reading the queue: a completion posted after this read signals again.
        // EAGAIN (counter already 0) is the common case and means nothing.
        let _ = self.completions.read();
        let mut completed = 0;
        for (index, errno) in std::mem::take(&mut self.refused) {
            if let Some(slot) = self.take_slot(index) {
                done(slot.token, Err(io::Error::from_raw_os_error(errno)));
                completed += 1;
            }
        }

        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        let mut resubmitted = false;
        for &(user_data, res) in &cqes {
            let index = usize::try_from(user_data).unwrap_or(usize::MAX);
            let Some(slot) = self.slots.get_mut(index).and_then(Option::as_mut) else {
                warn!("io_uring engine: completion for unknown user_data {user_data} ignored");
                continue;
            };
            let result = match slot.on_result(res) {
                Step::Done(result) => result,
                Step::Again if !resubmit => Err(io::Error::from_raw_os_error(libc::ECANCELED)),
                Step::Again => {
                    let entry = slot.sqe(index);
                    // SAFETY: as in `push`: the entry points to this slot's boxed iovec array,
                    // which stays in the slab untouched until this entry's completion is reaped;
                    // the kernel was done with the previous entry (its completion is this one).
                    // The memory the iovecs name is still covered by the caller's contract: the
                    // op's completion has not been delivered.
                    match unsafe { self.ring.submission().push(&entry) } {
                        Ok(()) => {
                            resubmitted = true;
                            continue;
                        }
                        // Cannot happen (at most one entry per slot is ever queued); fail the
                        // op rather than lose it.
                        Err(_) => Err(io::Error::other("io_uring submission queue full")),
                    }
                }
            };
            if let Some(slot) = self.take_slot(index) {
                done(slot.token, result);
                completed += 1;
            }
        }
        self.cqes = cqes;
        (completed, resubmitted)
    }

    fn take_slot(&mut self, index: usize) -> Option<Slot> {
        let slot = self.slots.get_mut(index)?.take()?;
        self.free.push(index);
        Some(slot)
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Refused ops never reached the kernel.
        for (index, _) in std::mem::take(&mut self.refused) {
            self.take_slot(index);
        }
        let mut failures = 0;
        while self.in_flight() > 0 {
            if let Err(e) = self.wait_one() {
                failures += 1;
                if failures >= DROP_WAIT_ATTEMPTS {
                    error!(
                        in_flight = self.in_flight(),
                        "io_uring engine dropped with ops in flight and waiting fails ({e}); \
                         leaking their iovec arrays"
                    );
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            self.reap_inner(false, |_, _| {});
        }
        // The ring (declared first) is closed next, then the eventfd; no op is left in flight.
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::test_util::memfd;

    const POLL_TIMEOUT_MS: i32 = 10_000;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    fn raw_iov(addr: *mut u8, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: addr.cast(),
            iov_len: len,
        }
    }

    /// A byte pattern that differs per op and per position.
    fn pattern(op: usize, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(31) ^ op.wrapping_mul(7)) as u8)
            .collect()
    }

    fn completion_fd_readable(engine: &UringEngine, timeout_ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: engine.completion_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, exclusively borrowed for the call.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        assert!(ret >= 0, "poll: {}", io::Error::last_os_error());
        ret == 1
    }

    /// Waits on the completion fd (as the dispatcher will) and reaps until nothing is in flight.
    fn reap_all(engine: &mut UringEngine) -> HashMap<u64, io::Result<u64>> {
        let mut results = HashMap::new();
        while engine.in_flight() > 0 {
            assert!(
                completion_fd_readable(engine, POLL_TIMEOUT_MS),
                "no completion within {POLL_TIMEOUT_MS} ms with {} in flight",
                engine.in_flight()
            );
            engine
                .reap(|token, result| {
                    assert!(
                        results.insert(token, result).is_none(),
                        "token {token} completed twice"
                    );
                })
                .expect("reap");
        }
        results
    }

    fn push(engine: &mut UringEngine, token: u64, op: UringOp) {
        // SAFETY: every test keeps the buffers its iovecs name alive, and untouched, until it
        // has reaped the op or dropped the engine.
        unsafe { engine.push(token, op) }.expect("room in the engine");
    }

    /// An anonymous mapping of `len` bytes with `prot`, unmapped on drop.
    struct Mapping {
        addr: *mut u8,
        len: usize,
    }

    impl Mapping {
        fn new(len: usize, prot: i32) -> Self {
            // SAFETY: a fresh anonymous private mapping; no existing memory is affected.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(
                addr,
                libc::MAP_FAILED,
                "mmap: {}",
                io::Error::last_os_error()
            );
            Mapping {
                addr: addr.cast(),
                len,
            }
        }

        fn shared_file(file: &File, len: usize) -> Self {
            // SAFETY: a fresh shared mapping of our own memfd; no existing memory is affected.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(
                addr,
                libc::MAP_FAILED,
                "mmap: {}",
                io::Error::last_os_error()
            );
            Mapping {
                addr: addr.cast(),
                len,
            }
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is readable and writable (callers only use this on such) and
            // `len` bytes long, and lives as long as `self`.
            unsafe { std::slice::from_raw_parts_mut(self.addr, self.len) }
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` created, which nothing else refers to.
            unsafe { libc::munmap(self.addr.cast(), self.len) };
        }
    }

    #[test]
    fn the_engine_can_be_built_on_one_thread_and_driven_on_another() {
        fn assert_send<T: Send>() {}
        assert_send::<UringEngine>();
        let file = memfd("uring-send", 4096);
        file.write_all_at(&pattern(4, 4096), 0).unwrap();
        let mut engine = UringEngine::new(&file, 1).expect("engine");
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            push(
                &mut engine,
                1,
                UringOp::Read {
                    offset: 0,
                    iovecs: vec![iov(&mut buf)],
                },
            );
            engine.submit().unwrap();
            assert_eq!(reap_all(&mut engine)[&1].as_ref().unwrap(), &4096);
            assert_eq!(buf, pattern(4, 4096));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn depth_outside_1_to_1024_is_refused() {
        let file = memfd("uring-depth", 4096);
        for depth in [0, MAX_DEPTH + 1, u32::MAX] {
            let err = UringEngine::new(&file, depth).err().expect("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "depth {depth}");
        }
        for depth in [1, 3, MAX_DEPTH] {
            let engine = UringEngine::new(&file, depth).expect("engine");
            assert_eq!(engine.depth(), depth as usize);
            assert_eq!(engine.in_flight(), 0);
        }
    }

    #[test]
    fn a_batch_of_multi_iovec_writes_reads_back() {
        const OPS: usize = 64;
        const OP_LEN: usize = 4096;
        let file = memfd("uring-batch", (OPS * OP_LEN) as u64);
        let mut engine = UringEngine::new(&file, OPS as u32).expect("engine");

        // Each write's data in three uneven pieces.
        let mut sources: Vec<Vec<u8>> = (0..OPS).map(|i| pattern(i, OP_LEN)).collect();
        for (i, src) in sources.iter_mut().enumerate() {
            let (a, rest) = src.split_at_mut(512);
            let (b, c) = rest.split_at_mut(1000);
            let iovecs = vec![iov(a), iov(b), iov(c)];
            let offset = (i * OP_LEN) as u64;
            push(&mut engine, i as u64, UringOp::Write { offset, iovecs });
        }
        assert_eq!(engine.in_flight(), OPS);
        engine.submit().expect("submit");
        let results = reap_all(&mut engine);
        assert_eq!(results.len(), OPS);
        for (token, result) in results {
            assert_eq!(result.expect("write"), OP_LEN as u64, "op {token}");
        }
        // What reached the file, read without the engine.
        for (i, src) in sources.iter().enumerate() {
            let mut check = vec![0u8; OP_LEN];
            file.read_exact_at(&mut check, (i * OP_LEN) as u64).unwrap();
            assert_eq!(&check, src, "file contents of op {i}");
        }

        // Read everything back in one batch, split differently (one empty iovec included).
        let mut sinks: Vec<Vec<u8>> = (0..OPS).map(|_| vec![0u8; OP_LEN]).collect();
        let mut empty = [0u8; 0];
        for (i, sink) in sinks.iter_mut().enumerate() {
            let (a, b) = sink.split_at_mut(100 + i);
            let iovecs = vec![iov(a), iov(&mut empty), iov(b)];
            let offset = (i * OP_LEN) as u64;
            push(
                &mut engine,
                1000 + i as u64,
                UringOp::Read { offset, iovecs },
            );
        }
        engine.submit().expect("submit");
        let results = reap_all(&mut engine);
        assert_eq!(results.len(), OPS);
        for (token, result) in results {
            assert_eq!(result.expect("read"), OP_LEN as u64, "op {token}");
        }
        assert_eq!(sinks, sources);
    }

    #[test]
    fn flush_completes_with_zero_bytes() {
        let file = memfd("uring-flush", 4096);
        let mut engine = UringEngine::new(&file, 2).expect("engine");
        let mut data = pattern(1, 4096);
        push(
            &mut engine,
            1,
            UringOp::Write {
                offset: 0,
                iovecs: vec![iov(&mut data)],
            },
        );
        engine.submit().unwrap();
        assert_eq!(reap_all(&mut engine)[&1].as_ref().unwrap(), &4096);
        push(&mut engine, 2, UringOp::Flush);
        engine.submit().unwrap();
        assert_eq!(reap_all(&mut engine)[&2].as_ref().unwrap(), &0);
    }

    #[test]
    fn reads_past_the_end_of_the_file_fail_with_unexpected_eof() {
        let file = memfd("uring-eof", 8192);
        let mut engine = UringEngine::new(&file, 4).expect("engine");
        let mut past = vec![0u8; 512];
        let mut straddling = vec![0u8; 1024];
        let mut inside = vec![0u8; 512];
        // Wholly past the end: the first result is 0.
        push(
            &mut engine,
            1,
            UringOp::Read {
                offset: 8192,
                iovecs: vec![iov(&mut past)],
            },
        );
        // Straddling the end: a short read of 512, then 0 on the resubmission.
        push(
            &mut engine,
            2,
            UringOp::Read {
                offset: 8192 - 512,
                iovecs: vec![iov(&mut straddling)],
            },
        );
        // A neighbour in the same batch is unaffected.
        push(
            &mut engine,
            3,
            UringOp::Read {
                offset: 0,
                iovecs: vec![iov(&mut inside)],
            },
        );
        engine.submit().unwrap();
        let results = reap_all(&mut engine);
        for token in [1, 2] {
            let err = results[&token].as_ref().expect_err("past EOF");
            assert_eq!(
                err.kind(),
                io::ErrorKind::UnexpectedEof,
                "op {token}: {err}"
            );
        }
        assert_eq!(results[&3].as_ref().unwrap(), &512);
    }

    #[test]
    fn buffers_with_no_accessible_memory_fail_with_efault() {
        // A PROT_NONE mapping rather than an unmapped hole: another test thread could map
        // something at a freed address while the op is in flight, and the kernel would write
        // into it. To the kernel's copy both are the same fault.
        let hole = Mapping::new(4096, libc::PROT_NONE);
        let file = memfd("uring-efault", 8192);
        file.write_all_at(&pattern(0, 8192), 0).unwrap();
        let mut engine = UringEngine::new(&file, 4).expect("engine");
        let mut good = vec![0u8; 512];
        push(
            &mut engine,
            1,
            UringOp::Read {
                offset: 0,
                iovecs: vec![raw_iov(hole.addr, 4096)],
            },
        );
        push(
            &mut engine,
            2,
            UringOp::Write {
                offset: 0,
                iovecs: vec![raw_iov(hole.addr, 4096)],
            },
        );
        // A good iovec then the hole: a short read of 512, then EFAULT on the resubmission.
        push(
            &mut engine,
            3,
            UringOp::Read {
                offset: 0,
                iovecs: vec![iov(&mut good), raw_iov(hole.addr, 4096)],
            },
        );
        engine.submit().unwrap();
        let results = reap_all(&mut engine);
        for token in [1, 2, 3] {
            let err = results[&token].as_ref().expect_err("EFAULT");
            assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "op {token}: {err}");
        }
        assert_eq!(good, pattern(0, 512), "the good part was read");
        // The write moved nothing.
        let mut check = vec![0u8; 4096];
        file.read_exact_at(&mut check, 0).unwrap();
        assert_eq!(check, pattern(0, 4096));
    }

    #[test]
    fn guest_memory_truncated_under_the_op_fails_with_efault() {
        // The way guest memory vanishes in this backend: the frontend shrinks its memory fd
        // under our shared mapping. Touching it from user space would be SIGBUS; the kernel's
        // copy gets EFAULT instead.
        let guest = memfd("uring-guest", 8192);
        let mapping = Mapping::shared_file(&guest, 8192);
        guest.set_len(0).unwrap();
        let disk = memfd("uring-disk", 8192);
        let mut engine = UringEngine::new(&disk, 2).expect("engine");
        push(
            &mut engine,
            1,
            UringOp::Read {
                offset: 0,
                iovecs: vec![raw_iov(mapping.addr, 8192)],
            },
        );
        push(
            &mut engine,
            2,
            UringOp::Write {
                offset: 0,
                iovecs: vec![raw_iov(mapping.addr, 8192)],
            },
        );
        engine.submit().unwrap();
        let results = reap_all(&mut engine);
        for token in [1, 2] {
            let err = results[&token].as_ref().expect_err("EFAULT");
            assert_eq!(err.raw_os_error(), Some(libc::EFAULT), "op {token}: {err}");
        }
    }

    #[test]
    fn push_beyond_depth_returns_the_op_and_in_flight_counts_until_reaped() {
        let file = memfd("uring-depth-limit", 4096);
        // Depth 3: the submission queue has 4 entries, but only 3 ops are taken.
        let mut engine = UringEngine::new(&file, 3).expect("engine");
        let mut bufs = [[0u8; 512]; 4];
        let [a, b, c, d] = &mut bufs;
        for (token, buf) in [a, b, c].into_iter().enumerate() {
            push(
                &mut engine,
                token as u64,
                UringOp::Read {
                    offset: 0,
                    iovecs: vec![iov(buf)],
                },
            );
            assert_eq!(engine.in_flight(), token + 1);
        }
        let fourth = UringOp::Read {
            offset: 512,
            iovecs: vec![iov(d)],
        };
        // SAFETY: refused, so never handed to the kernel.
        let back = unsafe { engine.push(9, fourth) }.expect_err("engine full");
        match &back {
            UringOp::Read { offset, iovecs } => {
                assert_eq!(*offset, 512);
                assert_eq!(iovecs.len(), 1);
                assert_eq!(iovecs[0].iov_base, d.as_mut_ptr().cast());
            }
            other => panic!("got back {other:?}"),
        }
        assert_eq!(engine.in_flight(), 3, "a refused push changes nothing");

        // Submitted but not reaped still counts.
        engine.submit().unwrap();
        assert_eq!(engine.in_flight(), 3);
        assert!(completion_fd_readable(&engine, POLL_TIMEOUT_MS));
        let results = reap_all(&mut engine);
        assert_eq!(results.len(), 3);
        assert_eq!(engine.in_flight(), 0);

        // Room again: the returned op goes in as it is.
        // SAFETY: `d` outlives the reap below.
        unsafe { engine.push(9, back) }.expect("room after reaping");
        engine.submit().unwrap();
        assert_eq!(reap_all(&mut engine)[&9].as_ref().unwrap(), &512);
    }

    #[test]
    fn an_offset_the_kernel_would_misread_is_refused() {
        let file = memfd("uring-offset", 4096);
        let mut engine = UringEngine::new(&file, 2).expect("engine");
        let mut buf = [0u8; 512];
        // u64::MAX is -1 to the kernel: "read at the current file position".
        push(
            &mut engine,
            1,
            UringOp::Read {
                offset: u64::MAX,
                iovecs: vec![iov(&mut buf)],
            },
        );
        assert_eq!(engine.in_flight(), 1);
        engine
            .wait_one()
            .expect("returns at once: the completion is waiting");
        let results = reap_all(&mut engine);
        let err = results[&1].as_ref().expect_err("refused");
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn a_write_to_a_file_opened_readonly_fails() {
        let path = std::env::temp_dir().join(format!("uring-ro-{}", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut engine = UringEngine::new(&file, 1).expect("engine");
        let mut buf = [1u8; 512];
        push(
            &mut engine,
            1,
            UringOp::Write {
                offset: 0,
                iovecs: vec![iov(&mut buf)],
            },
        );
        engine.submit().unwrap();
        let results = reap_all(&mut engine);
        let err = results[&1].as_ref().expect_err("EBADF");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

    /// A pipe as (read end, write end): a read on it returns what is there, so a test controls
    /// exactly when a read comes back short and when it completes.
    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is an array of two ints for pipe2 to fill.
        let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_short_read_is_resubmitted_for_the_rest() {
        use std::io::Write;
        let (reader, mut writer) = pipe();
        let mut engine = UringEngine::new(&reader, 2).expect("engine");
        let data = pattern(5, 300);
        let mut first = vec![0u8; 150];
        let mut second = vec![0u8; 150];
        writer.write_all(&data[..100]).unwrap();
        push(
            &mut engine,
            7,
            UringOp::Read {
                offset: 0,
                iovecs: vec![iov(&mut first), iov(&mut second)],
            },
        );
        engine.submit().unwrap();
        // The first result is 100 bytes: the engine resubmits instead of completing.
        engine.wait_one().unwrap();
        let completed = engine
            .reap(|token, result| panic!("op {token} completed early: {result:?}"))
            .unwrap();
        assert_eq!(completed, 0);
        assert_eq!(engine.in_flight(), 1);
        // The rest arrives in two writes: 90 bytes (the end of the first iovec and the start of
        // the second: another short read), then the last 110.
        writer.write_all(&data[100..190]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        writer.write_all(&data[190..]).unwrap();
        let results = reap_all(&mut engine);
        assert_eq!(results[&7].as_ref().unwrap(), &300);
        assert_eq!(first, data[..150]);
        assert_eq!(second, data[150..]);
    }

    #[test]
    fn dropping_with_ops_in_flight_waits_for_them() {
        use std::io::Write;
        let (reader, mut writer) = pipe();
        let mut engine = UringEngine::new(&reader, 4).expect("engine");
        let mut buf = vec![0u8; 8];
        push(
            &mut engine,
            1,
            UringOp::Read {
                offset: 0,
                iovecs: vec![iov(&mut buf)],
            },
        );
        engine.submit().unwrap();
        // Pushed and never submitted: drop submits it, and waits for it too.
        let mut unsubmitted = vec![0u8; 8];
        push(
            &mut engine,
            2,
            UringOp::Read {
                offset: 0,
                iovecs: vec![iov(&mut unsubmitted)],
            },
        );
        let delay = Duration::from_millis(200);
        let feeder = std::thread::spawn(move || {
            std::thread::sleep(delay);
            writer.write_all(b"abcdefgh").unwrap();
            std::thread::sleep(delay);
            writer.write_all(b"ijklmnop").unwrap();
        });
        let start = Instant::now();
        drop(engine);
        let waited = start.elapsed();
        feeder.join().unwrap();
        assert!(
            waited >= delay * 2 - Duration::from_millis(50),
            "drop waited only {waited:?}"
        );
        let mut got = [buf, unsubmitted].concat();
        got.sort_unstable();
        assert_eq!(
            got, b"abcdefghijklmnop",
            "both reads finished before drop returned"
        );
    }

    #[test]
    fn dropping_a_busy_engine_on_a_regular_file_is_clean() {
        let file = memfd("uring-drop", 64 * 4096);
        file.write_all_at(&pattern(3, 64 * 4096), 0).unwrap();
        let mut engine = UringEngine::new(&file, 64).expect("engine");
        let mut bufs: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 4096]).collect();
        for (i, buf) in bufs.iter_mut().enumerate() {
            let offset = (i * 4096) as u64;
            push(
                &mut engine,
                i as u64,
                UringOp::Read {
                    offset,
                    iovecs: vec![iov(buf)],
                },
            );
        }
        engine.submit().unwrap();
        drop(engine);
        assert_eq!(bufs.concat(), pattern(3, 64 * 4096));
    }

    /// A file under /var/tmp (a disk filesystem: tmpfs, where temp_dir may be, has no
    /// O_DIRECT), removed on drop.
    struct TempPath(std::path::PathBuf);

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn o_direct_batch_round_trips() {
        const OPS: usize = 32;
        const BLOCK: usize = 4096;
        let dir = std::path::Path::new("/var/tmp");
        let path = TempPath(dir.join(format!(
            "uring-direct-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )));
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path.0);
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let fs = filesystem_magic(dir);
                // ext2/3/4, XFS, btrfs: these support O_DIRECT, so EINVAL is a failure.
                let supports = [0xEF53, 0x5846_5342, 0x9123_683E];
                assert!(
                    !fs.is_some_and(|magic| supports.contains(&magic)),
                    "O_DIRECT open of {} failed with EINVAL on a filesystem that supports it \
                     (magic {fs:#x?})",
                    path.0.display()
                );
                eprintln!(
                    "o_direct_batch_round_trips: not run: {} (filesystem magic {fs:#x?}) has no \
                     O_DIRECT",
                    dir.display()
                );
                return;
            }
            Err(e) => panic!("open {}: {e}", path.0.display()),
        };
        let mut engine = UringEngine::new(&file, OPS as u32).expect("engine");
        // Page-aligned buffers: anonymous mappings.
        let mut src = Mapping::new(OPS * BLOCK, libc::PROT_READ | libc::PROT_WRITE);
        src.bytes().copy_from_slice(&pattern(9, OPS * BLOCK));
        let mut dst = Mapping::new(OPS * BLOCK, libc::PROT_READ | libc::PROT_WRITE);
        for i in 0..OPS {
            // Two aligned iovecs per op: the op's block from the first and second halves.
            let half = BLOCK / 2;
            let base = src.addr.wrapping_add(i * BLOCK);
            let iovecs = vec![raw_iov(base, half), raw_iov(base.wrapping_add(half), half)];
            let offset = (i * BLOCK) as u64;
            push(&mut engine, i as u64, UringOp::Write { offset, iovecs });
        }
        engine.submit().unwrap();
        for (token, result) in reap_all(&mut engine) {
            let written = result.unwrap_or_else(|e| panic!("O_DIRECT write {token}: {e}"));
            assert_eq!(written, BLOCK as u64);
        }
        push(&mut engine, 100, UringOp::Flush);
        engine.submit().unwrap();
        assert_eq!(reap_all(&mut engine)[&100].as_ref().unwrap(), &0);
        for i in 0..OPS {
            let base = dst.addr.wrapping_add(i * BLOCK);
            let iovecs = vec![raw_iov(base, BLOCK)];
            let offset = (i * BLOCK) as u64;
            push(&mut engine, i as u64, UringOp::Read { offset, iovecs });
        }
        engine.submit().unwrap();
        for (token, result) in reap_all(&mut engine) {
            let read = result.unwrap_or_else(|e| panic!("O_DIRECT read {token}: {e}"));
            assert_eq!(read, BLOCK as u64);
        }
        assert!(
            dst.bytes() == src.bytes(),
            "O_DIRECT data read back differs"
        );
    }

    fn filesystem_magic(path: &std::path::Path) -> Option<i64> {
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: all-zero is a valid statfs (plain integers), which statfs fills in.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `cpath` is NUL-terminated and `st` is a valid statfs to write.
        let ret = unsafe { libc::statfs(cpath.as_ptr(), &mut st) };
        (ret == 0).then_some(st.f_type as i64)
    }

    #[test]
    fn advance_iovecs_steps_through_partial_and_whole_buffers() {
        let mut buf = [0u8; 60];
        let base = buf.as_mut_ptr();
        let mut iovecs = [
            raw_iov(base, 10),
            raw_iov(base.wrapping_add(10), 0),
            raw_iov(base.wrapping_add(10), 20),
            raw_iov(base.wrapping_add(30), 30),
        ];
        let at = |v: &libc::iovec| (v.iov_base as usize - base as usize, v.iov_len);

        // Into the first iovec.
        let first = advance_iovecs(&mut iovecs, 0, 4);
        assert_eq!(first, 0);
        assert_eq!(at(&iovecs[0]), (4, 6));
        // Exactly to its end: the empty one that follows is not skipped yet (harmless).
        let first = advance_iovecs(&mut iovecs, first, 6);
        assert_eq!(first, 1);
        // Across the empty one and into the third.
        let first = advance_iovecs(&mut iovecs, first, 25);
        assert_eq!(first, 3);
        assert_eq!(at(&iovecs[3]), (35, 25));
        // Nothing moved: nothing changes.
        assert_eq!(advance_iovecs(&mut iovecs, first, 0), 3);
        assert_eq!(at(&iovecs[3]), (35, 25));
        // To the end, and past it (never more than is there).
        assert_eq!(advance_iovecs(&mut iovecs, first, 25), 4);
        assert_eq!(advance_iovecs(&mut iovecs, 4, 100), 4);
    }

    fn read_slot(buf: &mut [u8]) -> Slot {
        let (a, b) = buf.split_at_mut(100);
        Slot::new(
            1,
            UringOp::Read {
                offset: 4096,
                iovecs: vec![iov(a), iov(b)],
            },
        )
    }

    #[test]
    fn completion_results_map_to_steps() {
        let mut buf = [0u8; 300];
        let mut slot = read_slot(&mut buf);
        assert_eq!(slot.total, 300);

        // A short result advances offset and iovecs.
        assert!(matches!(slot.on_result(150), Step::Again));
        assert_eq!((slot.offset, slot.done, slot.first), (4096 + 150, 150, 1));
        assert_eq!(slot.iovecs[1].iov_len, 150);
        // EAGAIN/EINTR: again, a bounded number of times, then the error.
        for _ in 0..MAX_RETRIES {
            assert!(matches!(slot.on_result(-libc::EAGAIN), Step::Again));
        }
        match slot.on_result(-libc::EINTR) {
            Step::Done(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EINTR)),
            other => panic!("{other:?}"),
        }
        // The rest completes the op with its whole length.
        let mut slot = read_slot(&mut buf);
        assert!(matches!(slot.on_result(-libc::EAGAIN), Step::Again));
        assert!(matches!(slot.on_result(100), Step::Again));
        assert_eq!(slot.retries, 0, "progress resets the retry count");
        assert!(matches!(slot.on_result(200), Step::Done(Ok(300))));

        // Errors map to their errno; EFAULT is an error like any other.
        let mut slot = read_slot(&mut buf);
        match slot.on_result(-libc::EFAULT) {
            Step::Done(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EFAULT)),
            other => panic!("{other:?}"),
        }
        // More than asked for is the kernel's bug, reported, not a panic.
        let mut slot = read_slot(&mut buf);
        assert!(matches!(slot.on_result(301), Step::Done(Err(_))));
        // A write that moves nothing is WriteZero.
        let mut slot = Slot::new(
            2,
            UringOp::Write {
                offset: 0,
                iovecs: vec![iov(&mut buf)],
            },
        );
        match slot.on_result(0) {
            Step::Done(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::WriteZero),
            other => panic!("{other:?}"),
        }
        // Zero-length ops and flushes complete on their first result.
        let mut slot = Slot::new(
            3,
            UringOp::Read {
                offset: 0,
                iovecs: Vec::new(),
            },
        );
        assert!(matches!(slot.on_result(0), Step::Done(Ok(0))));
        let mut slot = Slot::new(4, UringOp::Flush);
        assert!(matches!(slot.on_result(0), Step::Done(Ok(0))));
    }
}
