//! Surviving a frontend that shrinks the file behind guest memory.
//!
//! We map each SET_MEM_TABLE region MAP_SHARED from the frontend's fd and checked its size then.
//! Nothing stops the frontend from `ftruncate`-ing the fd afterwards (QEMU's memfds are not
//! sealed, nor is a plain shared file): the next load or store of ours in a page past the new
//! end raises SIGBUS, whose default action kills this process and with it every later
//! frontend's service.
//!
//! So, for every mapping of an fd that is not sealed against shrinking:
//!
//! 1. The mapping is registered here (address range, plus the session socket).
//! 2. A process-wide SIGBUS handler looks up the faulting address. Inside a registered range it
//!    maps a private zero page over the vanished page (`mmap(MAP_FIXED)`, a plain syscall, safe
//!    in a signal handler), counts the fault on the range and on the faulting thread, and shuts
//!    the session socket down; then it returns and the access completes, reading zeros.
//!    Outside every range it hands the signal on to whoever had it before (Rust's stack
//!    overflow handler, then the default action): a real bug still crashes.
//! 3. The request path never trusts what it read during a fault: [`thread_faults`] is compared
//!    before and after a copy from guest memory, and a request that saw a fault fails with
//!    IOERR instead of writing zeros to the disk. The shut-down socket ends the session, and the
//!    session reports why ([`FaultGuard::faults`]).
//!
//! What an honest frontend pays: nothing on the data path but one thread-local read per copied
//! chunk; the handler runs only on a fault. A memfd sealed with F_SEAL_SHRINK (as `vmm run`'s
//! guest RAM is) cannot shrink, so it is not registered at all.
//!
//! A registration is dropped before its mapping is unmapped (field order in `MappedMemory`), so
//! the handler never "repairs" an address that has since been reused for something else.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{compiler_fence, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Mappings guarded at once in this process: 8 regions for each of many sessions and devices.
pub const MAX_GUARDED_RANGES: usize = 256;

const FREE: u32 = 0;
/// Being filled in or torn down by `register`/`Drop`; the handler skips it.
const CHANGING: u32 = 1;
const ACTIVE: u32 = 2;
/// A handler is using it; `Drop` waits.
const IN_HANDLER: u32 = 3;

struct Slot {
    state: AtomicU32,
    start: AtomicUsize,
    len: AtomicUsize,
    /// Socket to shut down on a fault, or -1. Owned by the `FaultGuard`, which outlives its use.
    session: AtomicI32,
    faults: AtomicU64,
    /// The first faulting address, for the session's error message.
    first_fault: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    state: AtomicU32::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    session: AtomicI32::new(-1),
    faults: AtomicU64::new(0),
    first_fault: AtomicUsize::new(0),
};

static SLOTS: [Slot; MAX_GUARDED_RANGES] = [EMPTY_SLOT; MAX_GUARDED_RANGES];
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(4096);
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
/// The SIGBUS action before ours, to hand foreign faults on to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

thread_local! {
    /// Guest-memory faults taken on this thread (const-initialised, no destructor: safe to touch
    /// from the signal handler). An atomic plus compiler fences, because the handler changes it
    /// between two instructions of the code that reads it: the compiler must not cache it.
    static THREAD_FAULTS: AtomicU64 = const { AtomicU64::new(0) };
}

/// Guest-memory faults this thread has taken so far. Compare before and after an access.
pub fn thread_faults() -> u64 {
    compiler_fence(Ordering::SeqCst);
    let n = THREAD_FAULTS.with(|c| c.load(Ordering::Relaxed));
    compiler_fence(Ordering::SeqCst);
    n
}

#[derive(Debug, thiserror::Error)]
pub enum FaultGuardError {
    #[error("more than {MAX_GUARDED_RANGES} unsealed guest memory mappings at once")]
    TooMany,
    #[error("cannot install the SIGBUS handler: {0}")]
    Install(std::io::Error),
    #[error("cannot duplicate the session socket: {0}")]
    Dup(std::io::Error),
}

/// True when `fd` is a memfd sealed against shrinking: its pages cannot vanish.
pub fn sealed_against_shrinking(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: F_GET_SEALS reads the seals of a valid fd; on a non-memfd it fails with EINVAL.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

/// One guarded mapping; unregistered on drop.
#[derive(Debug)]
pub struct FaultGuard {
    slot: usize,
    _session: Option<OwnedFd>,
}

impl FaultGuard {
    /// Guards `[start, start + len)`. On a fault inside it, `session` (if any) is shut down.
    pub fn register(
        start: usize,
        len: usize,
        session: Option<BorrowedFd<'_>>,
    ) -> Result<FaultGuard, FaultGuardError> {
        install()?;
        let session = session
            .map(|s| s.try_clone_to_owned())
            .transpose()
            .map_err(FaultGuardError::Dup)?;
        for (i, slot) in SLOTS.iter().enumerate() {
            if slot
                .state
                .compare_exchange(FREE, CHANGING, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                slot.start.store(start, Ordering::Relaxed);
                slot.len.store(len, Ordering::Relaxed);
                let fd = session.as_ref().map_or(-1, |s| s.as_raw_fd());
                slot.session.store(fd, Ordering::Relaxed);
                slot.faults.store(0, Ordering::Relaxed);
                slot.first_fault.store(0, Ordering::Relaxed);
                slot.state.store(ACTIVE, Ordering::Release);
                return Ok(FaultGuard {
                    slot: i,
                    _session: session,
                });
            }
        }
        Err(FaultGuardError::TooMany)
    }

    /// Faults taken in this range so far, and the first faulting address.
    pub fn faults(&self) -> (u64, usize) {
        let slot = &SLOTS[self.slot];
        (
            slot.faults.load(Ordering::Acquire),
            slot.first_fault.load(Ordering::Acquire),
        )
    }
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        let slot = &SLOTS[self.slot];
        // Wait out a handler that is using the slot, then take it out of service.
        while slot
            .state
            .compare_exchange(ACTIVE, CHANGING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        slot.session.store(-1, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Release);
        // `_session` (the dup'ed socket) closes after this, when no handler can read it.
    }
}

fn install() -> Result<(), FaultGuardError> {
    // The outcome of the one attempt (an errno on failure), seen by every later caller too.
    let outcome = INSTALLED.get_or_init(|| {
        // SAFETY: sysconf reads a constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(p) = usize::try_from(page) {
            if p > 0 {
                PAGE_SIZE.store(p, Ordering::Relaxed);
            }
        }
        // SAFETY: an all-zero sigaction is a valid value to fill in; the handler has the
        // SA_SIGINFO signature, and `old` receives the previous action.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut old) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            let _ = PREVIOUS.set(old);
        }
        Ok(())
    });
    outcome.map_err(|errno| FaultGuardError::Install(std::io::Error::from_raw_os_error(errno)))
}

/// Takes `slot` for the handler if it is in service, waiting out another thread's handler
/// (which holds it for a few instructions). False if the slot is free or being changed.
fn acquire_for_handler(slot: &Slot) -> bool {
    loop {
        match slot
            .state
            .compare_exchange(ACTIVE, IN_HANDLER, Ordering::Acquire, Ordering::Relaxed)
        {
            Ok(_) => return true,
            Err(IN_HANDLER) => std::hint::spin_loop(),
            Err(_) => return false,
        }
    }
}

/// Repairs the page if `addr` lies in a guarded range; false if it is not ours.
fn repair(addr: usize) -> bool {
    for slot in SLOTS.iter() {
        // Ownership comes from our own compare-exchange: a later load could see IN_HANDLER set
        // by another thread's handler and take a slot that is not ours.
        if !acquire_for_handler(slot) {
            continue;
        }
        let start = slot.start.load(Ordering::Relaxed);
        let len = slot.len.load(Ordering::Relaxed);
        let ours = addr.checked_sub(start).is_some_and(|off| off < len);
        let mut repaired = false;
        if ours {
            let page = addr & !(PAGE_SIZE.load(Ordering::Relaxed) - 1);
            // SAFETY: `page` lies inside a mapping this process made and still owns (the guard
            // is dropped before it is unmapped); replacing it with a private zero page changes
            // only what later accesses read.
            let r = unsafe {
                libc::mmap(
                    page as *mut libc::c_void,
                    PAGE_SIZE.load(Ordering::Relaxed),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            repaired = r != libc::MAP_FAILED;
            if slot.faults.fetch_add(1, Ordering::AcqRel) == 0 {
                slot.first_fault.store(addr, Ordering::Release);
            }
            let fd = slot.session.load(Ordering::Relaxed);
            if fd >= 0 {
                // SAFETY: the guard owns `fd` and cannot close it while the slot is IN_HANDLER;
                // shutdown is a plain syscall.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
            THREAD_FAULTS.with(|c| c.fetch_add(1, Ordering::Relaxed));
            compiler_fence(Ordering::SeqCst);
        }
        slot.state.store(ACTIVE, Ordering::Release);
        if ours {
            return repaired;
        }
    }
    false
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if repair(addr) {
        return;
    }
    // Not a guest-memory page: the previous action decides (Rust's stack-overflow handler, or
    // the default, which ends the process when the access is retried).
    match PREVIOUS.get() {
        Some(old) if old.sa_flags & libc::SA_SIGINFO != 0 && old.sa_sigaction > 1 => {
            // SAFETY: the previous action was installed with this SA_SIGINFO signature.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(old.sa_sigaction) };
            f(sig, info, ctx);
        }
        Some(old) if old.sa_sigaction > 1 => {
            // SAFETY: the previous action was a plain one-argument handler.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(old.sa_sigaction) };
            f(sig);
        }
        _ => {
            // SAFETY: restoring the default action; the faulting access repeats and ends us.
            unsafe {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::memfd;
    use std::os::fd::AsFd;

    /// A shared mapping of `file` (as MappedMemory makes), unmapped on drop.
    struct Map(*mut u8, usize);
    impl Map {
        fn new(file: &std::fs::File, len: usize) -> Map {
            // SAFETY: a fresh shared mapping of a file we own; nothing else uses the range.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Map(p.cast(), len)
        }
        fn read(&self, off: usize) -> u8 {
            assert!(off < self.1);
            // SAFETY: inside the mapping.
            unsafe { std::ptr::read_volatile(self.0.add(off)) }
        }
    }
    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: our own mapping.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    #[test]
    fn a_shrunk_fd_reads_zeros_counts_the_fault_and_shuts_the_session_down() {
        let file = memfd("shrinks", 0x4000);
        std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 0x4000], 0).unwrap();
        let map = Map::new(&file, 0x4000);
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let guard = FaultGuard::register(map.0 as usize, map.1, Some(mine.as_fd())).unwrap();
        assert_eq!(map.read(0x3000), 7);
        file.set_len(0x1000).unwrap();
        let before = thread_faults();
        // Without the guard this read kills the test process with SIGBUS.
        assert_eq!(map.read(0x3000), 0, "a vanished page reads as zeros");
        assert_eq!(
            map.read(0x0800),
            7,
            "pages still inside the file are untouched"
        );
        assert_eq!(thread_faults(), before + 1);
        let (faults, first) = guard.faults();
        assert_eq!((faults, first), (1, map.0 as usize + 0x3000));
        // The session socket was shut down: the peer reads end-of-file.
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &theirs, &mut buf).unwrap(), 0);
        drop(guard);
    }

    #[test]
    fn sealed_memfds_need_no_guard_and_plain_files_do() {
        let name = c"sealed";
        // SAFETY: a valid name; memfd_create has no other inputs.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nobody else.
        let sealed = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        assert!(!sealed_against_shrinking(sealed.as_fd()));
        // SAFETY: adding seals to our own memfd.
        let added = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(added, 0);
        assert!(sealed_against_shrinking(sealed.as_fd()));
        assert!(!sealed_against_shrinking(memfd("unsealed", 4096).as_fd()));
    }
}
