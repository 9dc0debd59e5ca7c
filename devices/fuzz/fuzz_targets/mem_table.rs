//! SET_MEM_TABLE as the backend receives it: region layouts from the fuzz input (all four
//! addresses chosen by the peer), each with a memfd of a fuzz-chosen size (sometimes one fd too
//! many or too few), handed to `MappedMemory::map`.
//!
//! Properties checked:
//! - no panic, no out-of-bounds access (ASan);
//! - an accepted table is really usable: the first and last byte of every region can be read and
//!   written through the guest memory (a region past the end of its fd would raise SIGBUS here,
//!   which the fuzzer reports as a crash);
//! - every region's own userspace range translates to its guest range, and any translation
//!   `user_to_guest` gives lies entirely inside guest memory;
//! - every fd handed over is closed when `map` returns, on success and on every error.
#![no_main]

use std::os::fd::OwnedFd;

use devices::vhost_user_server::memory::{MappedMemory, RegionLayout, MAX_MEMORY_REGIONS};
use fuzz_support::{memfd, FdLeakCheck};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const PAGE: u64 = 4096;
/// Largest memfd the harness creates: regions stay small so each input stays fast.
const MAX_FD_PAGES: u64 = 4;

fuzz_target!(|data: &[u8]| {
    let leaks = FdLeakCheck::start();
    let _ = run(&mut Unstructured::new(data));
    leaks.assert_none_leaked("SET_MEM_TABLE");
});

/// A peer-chosen u64: mostly a small page-ish value (so tables that fit are common), sometimes
/// anything (overflow and overlap checks).
fn value(u: &mut Unstructured<'_>, small_limit: u64) -> Result<u64> {
    let raw: u64 = u.arbitrary()?;
    Ok(match u.int_in_range(0..=3)? {
        0 => raw,
        1 => raw % small_limit,
        _ => (raw % (small_limit / PAGE).max(1)) * PAGE,
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let regions = u.int_in_range(0..=MAX_MEMORY_REGIONS + 1)?;
    let mut layouts = Vec::with_capacity(regions);
    for _ in 0..regions {
        layouts.push(RegionLayout {
            guest_phys_addr: value(u, 1 << 20)?,
            memory_size: value(u, (MAX_FD_PAGES + 1) * PAGE)?,
            userspace_addr: value(u, 1 << 20)?,
            mmap_offset: value(u, MAX_FD_PAGES * PAGE)?,
        });
    }
    let fd_count = match u.int_in_range(0..=15)? {
        0 => regions.saturating_sub(1),
        1 => regions + 1,
        _ => regions,
    };
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(fd_count);
    for _ in 0..fd_count {
        let size = u.int_in_range(0..=MAX_FD_PAGES * PAGE)?;
        fds.push(memfd(c"fuzz-ram", size).into());
    }

    let Ok(memory) = MappedMemory::map(&layouts, fds) else {
        return Ok(());
    };
    let guest = memory.guest();
    for (i, layout) in layouts.iter().enumerate() {
        let first = GuestAddress(layout.guest_phys_addr);
        let last = GuestAddress(layout.guest_phys_addr + layout.memory_size - 1);
        for at in [first, last] {
            let byte: u8 = guest
                .read_obj(at)
                .unwrap_or_else(|e| panic!("region {i} accepted but {at:?} unreadable: {e}"));
            guest
                .write_obj(byte.wrapping_add(1), at)
                .unwrap_or_else(|e| panic!("region {i} accepted but {at:?} unwritable: {e}"));
        }
        assert_eq!(
            memory.user_to_guest(layout.userspace_addr, layout.memory_size),
            Some(first),
            "region {i} does not translate to itself"
        );
    }
    // Ring addresses a peer might send later (SET_VRING_ADDR) against this table.
    while !u.is_empty() {
        let user_addr = value(u, 1 << 20)?;
        let len = u.int_in_range(0..=2 * PAGE)?;
        if let Some(at) = memory.user_to_guest(user_addr, len) {
            assert!(
                len == 0 || guest.check_range(at, len as usize),
                "user {user_addr:#x}+{len:#x} translates to {at:?}, outside guest memory"
            );
        }
    }
    Ok(())
}
