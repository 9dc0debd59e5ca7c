//! The inflight region itself (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): what GET_INFLIGHT_FD hands
//! out and SET_INFLIGHT_FD maps, and atomic access to each queue's part of it. The session
//! (`session`) calls it; what is written where, and how a ring recovers after a crash, is the
//! queue worker's business (`crate::blk::inflight`: `QueueTracker`, built on [`QueueRegion`]).
//!
//! ```text
//!  frontend                         server (this module)
//!  GET_INFLIGHT_FD(queues, size) ─► checked_region_size, new_region_memfd: sealed, zeroed memfd
//!                                   ──► reply + fd; nothing kept here
//!  SET_INFLIGHT_FD(fd, geometry) ─► InflightMap::map: checked, mapped MAP_SHARED, fd closed
//!  ring starts                   ─► InflightMap::queue(i): that queue's QueueRegion, to the device
//! ```
//!
//! Every value in a GET or SET comes from the peer: geometry is checked against the device's
//! queue count and ring limit ([`InflightLimits`]) before anything is sized from it, and a SET's
//! fd must be a regular file sealed against shrinking (see `crate::blk::inflight` for why a
//! region that shrinks under our stores is fatal).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vhost_frontend::wire::inflight::{
    queue_region_size, region_size, split_entry_offset, SplitQueue,
};
use vhost_frontend::wire::{InflightDescription, InflightLayout, MAX_QUEUE_SIZE};

use super::memory_faults::sealed_against_shrinking;

/// This backend offers split rings only (no VIRTIO_F_RING_PACKED), so regions use this layout.
pub const LAYOUT: InflightLayout = InflightLayout::Split;

/// The name our GET_INFLIGHT_FD memfds carry (visible in /proc/PID/fd of both sides).
pub const MEMFD_NAME: &CStr = c"vhost-blk-inflight";

/// Seals on the memfds we hand out: size fixed for good (the peer maps it too).
const MEMFD_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// What a GET or SET may ask for: at most the device's queues, rings at most its ring limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightLimits {
    /// The device's queue count (GET_QUEUE_NUM).
    pub device_queues: u16,
    /// The largest ring SET_VRING_NUM accepts (already at most [`MAX_QUEUE_SIZE`]).
    pub max_queue_size: u16,
}

/// Why a GET_INFLIGHT_FD or SET_INFLIGHT_FD was refused. Every value named here came from the
/// peer; nothing was allocated or mapped from it.
#[derive(Debug, thiserror::Error)]
pub enum InflightSetupError {
    #[error("num_queues {num_queues}: the device has 1 to {device_queues} queues")]
    QueueCount { num_queues: u16, device_queues: u16 },
    #[error("queue_size {queue_size} is not a power of two in 1..={limit}")]
    QueueSize { queue_size: u16, limit: u16 },
    #[error(
        "mmap_size {mmap_size} is smaller than the {needed} bytes {num_queues} queues of \
         {queue_size} entries need"
    )]
    TooSmall {
        mmap_size: u64,
        needed: u64,
        num_queues: u16,
        queue_size: u16,
    },
    #[error("mmap_offset {0:#x} is not page aligned")]
    UnalignedOffset(u64),
    #[error("mmap_offset {offset:#x} + mmap_size {size} overflows")]
    Overflow { offset: u64, size: u64 },
    #[error(
        "mmap_offset {offset:#x} + mmap_size {size} lies past the end of the {file_size}-byte fd"
    )]
    PastEnd {
        offset: u64,
        size: u64,
        file_size: u64,
    },
    #[error("the inflight fd is not a regular file or memfd")]
    NotAFile,
    #[error(
        "the inflight fd is not sealed against shrinking (F_SEAL_SHRINK); a region that can \
         shrink under our stores would kill the backend"
    )]
    NotSealed,
    #[error("cannot stat the inflight fd: {0}")]
    Stat(io::Error),
    #[error("cannot map the inflight region: {0}")]
    Map(io::Error),
}

/// Checks a GET/SET geometry against our limits; the region size it needs.
pub fn checked_region_size(
    num_queues: u16,
    queue_size: u16,
    limits: InflightLimits,
) -> Result<u64, InflightSetupError> {
    if num_queues == 0 || num_queues > limits.device_queues {
        return Err(InflightSetupError::QueueCount {
            num_queues,
            device_queues: limits.device_queues,
        });
    }
    let limit = limits.max_queue_size.min(MAX_QUEUE_SIZE);
    let bad_size = InflightSetupError::QueueSize { queue_size, limit };
    if !queue_size.is_power_of_two() || queue_size > limit {
        return Err(bad_size);
    }
    // Both are now inside the wire module's limits, so this is Some; checked arithmetic anyway.
    region_size(num_queues, queue_size, LAYOUT).ok_or(bad_size)
}

/// GET_INFLIGHT_FD: a new zero-filled (version 0, "fresh") region of `size` bytes in a memfd
/// sealed against any change of size. Nothing of it is kept here: the region is used only once
/// the frontend hands it back with SET_INFLIGHT_FD, so a repeated GET cannot leak a mapping or an
/// fd (CVE-2020-10726 class) and our fd is closed when the reply has been sent.
pub fn new_region_memfd(size: u64) -> io::Result<OwnedFd> {
    // SAFETY: MEMFD_NAME is NUL-terminated; memfd_create reads nothing else.
    let fd = unsafe {
        libc::memfd_create(
            MEMFD_NAME.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    // SAFETY: F_ADD_SEALS with an integer argument on an fd we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, MEMFD_SEALS) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file.into())
}

/// A SET_INFLIGHT_FD region, mapped MAP_SHARED: `num_queues` split queue regions of
/// `queue_size` entries each. Unmapped when the last holder (the session or a running queue
/// worker) lets go.
#[derive(Debug)]
pub struct InflightMap {
    base: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
    queue_region_len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value until Drop. It is only accessed
// through atomic loads and stores (QueueRegion), which may happen from any thread.
unsafe impl Send for InflightMap {}
// SAFETY: as above: every access through a shared reference is atomic.
unsafe impl Sync for InflightMap {}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned in `map`, unmapped only here, and no
        // QueueRegion outlives the Arc that owns this value.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

impl InflightMap {
    /// SET_INFLIGHT_FD: checks everything the frontend said against our limits and the fd, then
    /// maps just the bytes the geometry needs. Takes the fd by value: it is closed when this
    /// returns, on success (the mapping keeps the memory) and on every error (CVE-2022-0669 class).
    pub fn map(
        fd: OwnedFd,
        description: &InflightDescription,
        limits: InflightLimits,
    ) -> Result<Arc<Self>, InflightSetupError> {
        let InflightDescription {
            mmap_size,
            mmap_offset,
            num_queues,
            queue_size,
        } = *description;
        let needed = checked_region_size(num_queues, queue_size, limits)?;
        // DPDK never checks this: a region shorter than its queues would be written past its end.
        if mmap_size < needed {
            return Err(InflightSetupError::TooSmall {
                mmap_size,
                needed,
                num_queues,
                queue_size,
            });
        }
        if !mmap_offset.is_multiple_of(page_size()) {
            return Err(InflightSetupError::UnalignedOffset(mmap_offset));
        }
        let overflow = InflightSetupError::Overflow {
            offset: mmap_offset,
            size: mmap_size,
        };
        let end = mmap_offset.checked_add(mmap_size).ok_or(overflow)?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(InflightSetupError::Stat)?;
        // A pipe, socket or device would not hold its bytes; a memfd is a regular file.
        if !meta.file_type().is_file() {
            return Err(InflightSetupError::NotAFile);
        }
        if end > meta.len() {
            return Err(InflightSetupError::PastEnd {
                offset: mmap_offset,
                size: mmap_size,
                file_size: meta.len(),
            });
        }
        // See the module docs: a shrinking region would SIGBUS a completion.
        if !sealed_against_shrinking(file.as_fd()) {
            return Err(InflightSetupError::NotSealed);
        }
        let too_big = || InflightSetupError::Map(io::Error::from(io::ErrorKind::InvalidInput));
        let len = usize::try_from(needed).map_err(|_| too_big())?;
        let offset = libc::off_t::try_from(mmap_offset).map_err(|_| too_big())?;
        let per_queue = queue_region_size(queue_size, LAYOUT)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(too_big)?;
        // SAFETY: a new shared mapping of `len` bytes of our own fd at a page-aligned offset that
        // lies, with `len <= mmap_size`, inside the file (checked above); nothing else is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(InflightSetupError::Map(io::Error::last_os_error()));
        }
        let base = NonNull::new(addr.cast::<u8>()).ok_or_else(too_big)?;
        Ok(Arc::new(InflightMap {
            base,
            len,
            num_queues,
            queue_size,
            queue_region_len: per_queue,
        }))
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Entries per queue region (the SET's queue_size): the largest ring it can track.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `index`'s region, or `None` beyond the region's queues.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueRegion> {
        if index >= self.num_queues {
            return None;
        }
        let offset = usize::from(index).checked_mul(self.queue_region_len)?;
        // Always in bounds (len = num_queues * queue_region_len); checked all the same, since
        // every access relies on it.
        if offset.checked_add(self.queue_region_len)? > self.len {
            return None;
        }
        Some(QueueRegion {
            map: Arc::clone(self),
            index,
            offset,
        })
    }

    /// One trace line per queue: what the region says right now (decoded from private copies).
    pub fn describe_queues(self: &Arc<Self>) -> Vec<String> {
        (0..self.num_queues)
            .filter_map(|index| self.queue(index))
            .map(|queue| queue.describe())
            .collect()
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// One queue's part of a mapped region. Every access is atomic and bounds-checked against the
/// queue region; offsets are the wire module's constants.
#[derive(Debug, Clone)]
pub struct QueueRegion {
    map: Arc<InflightMap>,
    index: u16,
    /// Byte offset of this queue's region in the mapping (a multiple of 64).
    offset: usize,
}

impl QueueRegion {
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Entries this queue region holds.
    pub fn capacity(&self) -> u16 {
        self.map.queue_size
    }

    /// The address of the `size`-byte field at `at` in this queue region, if it lies inside it
    /// and is naturally aligned (the mapping is page aligned and queue regions 64-byte aligned,
    /// so the spec's C layout always is).
    fn field(&self, at: usize, size: usize) -> Option<*mut u8> {
        let end = at.checked_add(size)?;
        if end > self.map.queue_region_len || !at.is_multiple_of(size) {
            return None;
        }
        // Inside the mapping: offset + queue_region_len <= len (InflightMap::queue).
        Some(self.map.base.as_ptr().wrapping_add(self.offset + at))
    }

    pub(crate) fn store_u8(&self, at: usize, value: u8, order: Ordering) {
        let Some(p) = self.field(at, 1) else {
            debug_assert!(false, "inflight field {at} outside the queue region");
            return;
        };
        // SAFETY: `p` is inside the live mapping (held by `self.map`), and only ever accessed
        // atomically by this process; the other side's accesses are another process's.
        unsafe { AtomicU8::from_ptr(p) }.store(value, order);
    }

    pub(crate) fn store_u16(&self, at: usize, value: u16, order: Ordering) {
        let Some(p) = self.field(at, 2) else {
            debug_assert!(false, "inflight field {at} outside the queue region");
            return;
        };
        // SAFETY: as in store_u8; `field` checked 2-byte alignment.
        unsafe { AtomicU16::from_ptr(p.cast()) }.store(value.to_le(), order);
    }

    pub(crate) fn store_u64(&self, at: usize, value: u64, order: Ordering) {
        let Some(p) = self.field(at, 8) else {
            debug_assert!(false, "inflight field {at} outside the queue region");
            return;
        };
        // SAFETY: as in store_u8; `field` checked 8-byte alignment.
        unsafe { AtomicU64::from_ptr(p.cast()) }.store(value.to_le(), order);
    }

    /// A private copy of this queue region, read word by word with atomic loads: a peer writing
    /// meanwhile can make it inconsistent, never make us read outside it.
    pub fn snapshot(&self) -> Vec<u8> {
        let words = self.map.queue_region_len / 8;
        let mut copy = Vec::with_capacity(words * 8);
        for word in 0..words {
            let value = match self.field(word * 8, 8) {
                // SAFETY: as in store_u64.
                Some(p) => unsafe { AtomicU64::from_ptr(p.cast()) }.load(Ordering::Acquire),
                None => 0,
            };
            copy.extend_from_slice(&value.to_ne_bytes());
        }
        copy
    }

    /// The trace line for this queue (`SplitQueue::describe` of a snapshot), or why it does not
    /// decode.
    pub fn describe(&self) -> String {
        let copy = self.snapshot();
        match SplitQueue::decode(self.index, self.map.queue_size, &copy) {
            Ok(view) => view.describe(),
            Err(e) => format!("inflight queue {}: {e}", self.index),
        }
    }

    pub(crate) fn entry_field(desc: u16, field: usize) -> usize {
        split_entry_offset(desc) + field
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{fds_referring_to, memfd, sealed_memfd, temp_path};
    use std::os::unix::net::UnixStream;

    const LIMITS: InflightLimits = InflightLimits {
        device_queues: 2,
        max_queue_size: 128,
    };

    #[test]
    fn geometry_is_checked_against_the_device() {
        assert_eq!(checked_region_size(1, 128, LIMITS).unwrap(), 2112);
        assert_eq!(checked_region_size(2, 1, LIMITS).unwrap(), 2 * 64);
        for (queues, size) in [(0, 128), (3, 128), (u16::MAX, 128)] {
            assert!(matches!(
                checked_region_size(queues, size, LIMITS),
                Err(InflightSetupError::QueueCount { .. })
            ));
        }
        for size in [0, 100, 256, u16::MAX] {
            assert!(matches!(
                checked_region_size(1, size, LIMITS),
                Err(InflightSetupError::QueueSize { .. })
            ));
        }
        let huge = InflightLimits {
            device_queues: 64,
            max_queue_size: u16::MAX,
        };
        assert!(checked_region_size(64, 32768, huge).is_ok());
        assert!(checked_region_size(64, u16::MAX, huge).is_err());
    }

    #[test]
    fn a_new_region_memfd_is_zeroed_and_sealed() {
        let fd = new_region_memfd(2112).unwrap();
        let file = File::from(fd);
        assert_eq!(file.metadata().unwrap().len(), 2112);
        // SAFETY: F_GET_SEALS on an fd we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals, MEMFD_SEALS);
        assert!(file.set_len(64).is_err(), "it cannot shrink");
        let map = InflightMap::map(
            file.into(),
            &InflightDescription {
                mmap_size: 2112,
                mmap_offset: 0,
                num_queues: 1,
                queue_size: 128,
            },
            LIMITS,
        )
        .unwrap();
        let region = map.queue(0).unwrap();
        assert!(region.snapshot().iter().all(|&b| b == 0));
        assert!(map.queue(1).is_none());
    }

    /// Every refusal of `InflightMap::map`, each for its own reason (so no check hides behind a
    /// later one), each with the received fd closed afterwards.
    #[test]
    fn hostile_set_descriptions_are_refused_and_their_fds_closed() {
        use InflightSetupError as E;
        let good = InflightDescription {
            mmap_size: 2112,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 128,
        };
        let with = |change: fn(&mut InflightDescription)| {
            let mut d = good;
            change(&mut d);
            d
        };
        let sealed = || OwnedFd::from(sealed_memfd("hostile-set", &[0u8; 8192]));
        let file_path = temp_path("inflight-file");
        std::fs::write(&file_path, vec![0u8; 8192]).unwrap();
        let (sock, _peer) = UnixStream::pair().unwrap();
        let (pipe_read, _pipe_write) = {
            let mut fds = [0; 2];
            // SAFETY: pipe2 writes two fds into the array we pass.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: both fds were just created and are owned by nobody else.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        type Expect = fn(&InflightSetupError) -> bool;
        let cases: Vec<(&str, InflightDescription, OwnedFd, Expect)> = vec![
            ("no queues", with(|d| d.num_queues = 0), sealed(), |e| {
                matches!(e, E::QueueCount { .. })
            }),
            (
                "too many queues",
                with(|d| d.num_queues = 3),
                sealed(),
                |e| matches!(e, E::QueueCount { .. }),
            ),
            (
                "65535 queues",
                with(|d| d.num_queues = u16::MAX),
                sealed(),
                |e| matches!(e, E::QueueCount { .. }),
            ),
            ("queue size 0", with(|d| d.queue_size = 0), sealed(), |e| {
                matches!(e, E::QueueSize { .. })
            }),
            (
                "queue size 100",
                with(|d| d.queue_size = 100),
                sealed(),
                |e| matches!(e, E::QueueSize { .. }),
            ),
            (
                "queue size 65535",
                with(|d| d.queue_size = u16::MAX),
                sealed(),
                |e| matches!(e, E::QueueSize { .. }),
            ),
            (
                "mmap_size too small",
                with(|d| d.mmap_size = 2111),
                sealed(),
                |e| matches!(e, E::TooSmall { .. }),
            ),
            (
                "offset + size overflows",
                with(|d| {
                    d.mmap_offset = 4096;
                    d.mmap_size = u64::MAX;
                }),
                sealed(),
                |e| matches!(e, E::Overflow { .. }),
            ),
            (
                "offset past the file",
                with(|d| d.mmap_offset = 8192),
                sealed(),
                |e| matches!(e, E::PastEnd { .. }),
            ),
            (
                "unaligned offset",
                with(|d| d.mmap_offset = 64),
                sealed(),
                |e| matches!(e, E::UnalignedOffset(64)),
            ),
            ("a socket", good, sock.into(), |e| matches!(e, E::NotAFile)),
            ("a pipe", good, pipe_read, |e| matches!(e, E::NotAFile)),
            (
                "an unsealed memfd",
                good,
                memfd("unsealed", 8192).into(),
                |e| matches!(e, E::NotSealed),
            ),
            (
                "a regular file",
                good,
                File::open(&file_path).unwrap().into(),
                |e| matches!(e, E::NotSealed),
            ),
        ];
        for (what, description, fd, expected) in cases {
            let probe = fd.try_clone().unwrap();
            let before = fds_referring_to(&probe);
            match InflightMap::map(fd, &description, LIMITS) {
                Ok(_) => panic!("{what}: accepted"),
                Err(e) => assert!(expected(&e), "{what}: refused for another reason: {e}"),
            }
            assert_eq!(fds_referring_to(&probe), before - 1, "{what}: fd kept");
        }
        std::fs::remove_file(&file_path).unwrap();
        // The good one is accepted, its fd closed too (the mapping keeps the memory).
        let fd = sealed();
        let probe = fd.try_clone().unwrap();
        let map = InflightMap::map(fd, &good, LIMITS).unwrap();
        assert_eq!(fds_referring_to(&probe), 1);
        // A region larger than needed, at a page offset inside the file, is fine.
        let bigger = with(|d| {
            d.mmap_size = 4096;
            d.mmap_offset = 4096;
        });
        assert!(InflightMap::map(sealed(), &bigger, LIMITS).is_ok());
        drop(map);
    }
}
