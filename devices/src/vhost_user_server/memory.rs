//! Guest memory as the frontend hands it over in SET_MEM_TABLE: one fd per region, mapped here
//! MAP_SHARED so that what the guest writes is what this backend reads, and vice versa.
//!
//! A region carries three addresses for the same bytes: the guest physical address (what
//! descriptors hold), the frontend's own userspace address (what SET_VRING_ADDR holds), and the
//! offset inside the fd. Every one of them comes from the peer, so each sum is checked, regions
//! must not overlap in either address space, and a region must lie inside its fd: touching a
//! mapping past the end of the file would kill this process with SIGBUS.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::memory_faults::{sealed_against_shrinking, FaultGuard};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// Most regions one table may hold (VHOST_MEMORY_BASELINE_NREGIONS; we do not offer
/// CONFIGURE_MEM_SLOTS).
pub use vhost_frontend::wire::MAX_MEMORY_REGIONS;

/// One SET_MEM_TABLE entry, as sent by the frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionLayout {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub mmap_offset: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory table has {regions} regions but {fds} fds")]
    FdCountMismatch { regions: usize, fds: usize },
    #[error("memory table is empty")]
    Empty,
    #[error("memory table has {0} regions, at most {MAX_MEMORY_REGIONS} are supported")]
    TooManyRegions(usize),
    #[error("region {index} has size 0")]
    EmptyRegion { index: usize },
    #[error("region {index}: {what} + size overflows")]
    Overflow { index: usize, what: &'static str },
    #[error("region {index}: mmap_offset {offset:#x} is not page aligned")]
    UnalignedOffset { index: usize, offset: u64 },
    #[error("region {index} overlaps region {other} in {space}")]
    Overlap {
        index: usize,
        other: usize,
        space: &'static str,
    },
    #[error("region {index}: offset {offset:#x} + size {size:#x} lies past the end of its fd ({fd_size:#x} bytes)")]
    PastEndOfFd {
        index: usize,
        offset: u64,
        size: u64,
        fd_size: u64,
    },
    #[error("region {index}: cannot stat its fd: {source}")]
    Stat {
        index: usize,
        source: std::io::Error,
    },
    #[error("region {index}: mmap failed: {source}")]
    Mmap {
        index: usize,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot assemble guest memory: {0}")]
    Assemble(String),
    #[error("region {index}: cannot guard it against a shrinking fd: {source}")]
    Guard {
        index: usize,
        source: super::memory_faults::FaultGuardError,
    },
}

/// The frontend's memory, mapped, plus what is needed to translate its userspace addresses.
#[derive(Debug, Clone)]
pub struct MappedMemory {
    /// Declared before `guest`: a guard is dropped before its mapping can be unmapped.
    guards: Arc<Vec<(usize, FaultGuard)>>,
    guest: Arc<GuestMemoryMmap>,
    layouts: Vec<RegionLayout>,
}

impl MappedMemory {
    /// Validates the table and maps every region. Takes the fds by value: each is closed when
    /// this returns, on success (the mapping keeps the memory alive) and on every error path.
    pub fn map(layouts: &[RegionLayout], fds: Vec<OwnedFd>) -> Result<Self, MemoryError> {
        Self::map_for_session(layouts, fds, None)
    }

    /// As [`MappedMemory::map`], and every region whose fd is not sealed against shrinking is
    /// guarded against vanishing pages (`memory_faults`): a fault in it reads zeros, fails the
    /// request, and shuts `session` down.
    pub fn map_for_session(
        layouts: &[RegionLayout],
        fds: Vec<OwnedFd>,
        session: Option<BorrowedFd<'_>>,
    ) -> Result<Self, MemoryError> {
        if layouts.len() != fds.len() {
            return Err(MemoryError::FdCountMismatch {
                regions: layouts.len(),
                fds: fds.len(),
            });
        }
        if layouts.is_empty() {
            return Err(MemoryError::Empty);
        }
        if layouts.len() > MAX_MEMORY_REGIONS {
            return Err(MemoryError::TooManyRegions(layouts.len()));
        }
        check_layouts(layouts)?;

        let page_size = page_size();
        let mut regions = Vec::with_capacity(layouts.len());
        let mut guards = Vec::new();
        for (index, (layout, fd)) in layouts.iter().zip(fds).enumerate() {
            if !layout.mmap_offset.is_multiple_of(page_size) {
                return Err(MemoryError::UnalignedOffset {
                    index,
                    offset: layout.mmap_offset,
                });
            }
            let sealed = sealed_against_shrinking(fd.as_fd());
            let file = File::from(fd);
            let fd_size = file
                .metadata()
                .map_err(|source| MemoryError::Stat { index, source })?
                .len();
            // check_layouts proved that this sum does not overflow.
            let end = layout.mmap_offset + layout.memory_size;
            if end > fd_size {
                return Err(MemoryError::PastEndOfFd {
                    index,
                    offset: layout.mmap_offset,
                    size: layout.memory_size,
                    fd_size,
                });
            }
            let size = usize::try_from(layout.memory_size).map_err(|_| MemoryError::Overflow {
                index,
                what: "memory_size (usize)",
            })?;
            // MmapRegion::from_file maps PROT_READ|PROT_WRITE, MAP_SHARED|MAP_NORESERVE.
            let mapping = MmapRegion::from_file(FileOffset::new(file, layout.mmap_offset), size)
                .map_err(|source| MemoryError::Mmap { index, source })?;
            if !sealed {
                let guard = FaultGuard::register(mapping.as_ptr() as usize, size, session)
                    .map_err(|source| MemoryError::Guard { index, source })?;
                guards.push((index, guard));
            }
            let region = GuestRegionMmap::new(mapping, GuestAddress(layout.guest_phys_addr))
                .ok_or(MemoryError::Overflow {
                    index,
                    what: "guest_phys_addr",
                })?;
            regions.push(region);
        }
        regions.sort_by_key(|r| r.start_addr());
        let guest = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Assemble(e.to_string()))?;
        Ok(MappedMemory {
            guards: Arc::new(guards),
            guest: Arc::new(guest),
            layouts: layouts.to_vec(),
        })
    }

    /// The first region whose pages vanished under us (its fd shrank after SET_MEM_TABLE):
    /// (region index, faults taken, first faulting host address).
    pub fn vanished(&self) -> Option<(usize, u64, usize)> {
        self.guards.iter().find_map(|(index, g)| {
            let (faults, addr) = g.faults();
            (faults > 0).then_some((*index, faults, addr))
        })
    }

    /// How many regions are guarded (their fds were not sealed against shrinking).
    pub fn guarded_regions(&self) -> usize {
        self.guards.len()
    }

    /// Guest memory, shared with the queue workers (each in-flight request holds a reference,
    /// so a replaced table stays mapped until its last request completes).
    pub fn guest(&self) -> &Arc<GuestMemoryMmap> {
        &self.guest
    }

    /// Translates a frontend userspace address (SET_VRING_ADDR) to a guest physical address.
    /// The whole `len`-byte object must lie in one region.
    pub fn user_to_guest(&self, user_addr: u64, len: u64) -> Option<GuestAddress> {
        self.layouts.iter().find_map(|r| {
            let offset = user_addr.checked_sub(r.userspace_addr)?;
            let end = offset.checked_add(len)?;
            if end > r.memory_size {
                return None;
            }
            r.guest_phys_addr.checked_add(offset).map(GuestAddress)
        })
    }
}

/// Checks every sum and refuses overlaps, in guest physical and in frontend userspace addresses
/// (an overlap in userspace addresses would make vring translation ambiguous).
fn check_layouts(layouts: &[RegionLayout]) -> Result<(), MemoryError> {
    let mut guest_ranges = Vec::with_capacity(layouts.len());
    let mut user_ranges = Vec::with_capacity(layouts.len());
    for (index, r) in layouts.iter().enumerate() {
        if r.memory_size == 0 {
            return Err(MemoryError::EmptyRegion { index });
        }
        let overflow = |what| MemoryError::Overflow { index, what };
        let guest_end = r
            .guest_phys_addr
            .checked_add(r.memory_size)
            .ok_or(overflow("guest_phys_addr"))?;
        let user_end = r
            .userspace_addr
            .checked_add(r.memory_size)
            .ok_or(overflow("userspace_addr"))?;
        r.mmap_offset
            .checked_add(r.memory_size)
            .ok_or(overflow("mmap_offset"))?;
        guest_ranges.push((r.guest_phys_addr, guest_end, index));
        user_ranges.push((r.userspace_addr, user_end, index));
    }
    refuse_overlaps(guest_ranges, "guest physical addresses")?;
    refuse_overlaps(user_ranges, "frontend userspace addresses")
}

/// Ranges are half-open [start, end).
fn refuse_overlaps(
    mut ranges: Vec<(u64, u64, usize)>,
    space: &'static str,
) -> Result<(), MemoryError> {
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        let (_, prev_end, other) = pair[0];
        let (start, _, index) = pair[1];
        if start < prev_end {
            return Err(MemoryError::Overlap {
                index,
                other,
                space,
            });
        }
    }
    Ok(())
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; it has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::memfd;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn region(gpa: u64, size: u64, user: u64, offset: u64) -> RegionLayout {
        RegionLayout {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: user,
            mmap_offset: offset,
        }
    }

    #[test]
    fn two_regions_from_one_fd_share_bytes_with_the_fd() {
        let file = memfd("guest", 0x4000);
        let fd2 = file.try_clone().unwrap();
        let layouts = [
            region(0, 0x2000, 0x7f00_0000_0000, 0),
            region(0x1_0000_0000, 0x2000, 0x7f00_0000_2000, 0x2000),
        ];
        let mem = MappedMemory::map(&layouts, vec![file.try_clone().unwrap().into(), fd2.into()])
            .unwrap();
        mem.guest().write_slice(b"low", GuestAddress(0x10)).unwrap();
        mem.guest()
            .write_slice(b"high", GuestAddress(0x1_0000_0010))
            .unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0x2010).unwrap();
        assert_eq!(
            &buf, b"high",
            "MAP_SHARED: the fd sees what the guest wrote"
        );
        assert!(mem.guest().check_range(GuestAddress(0x1000), 0x1000));
        assert!(!mem.guest().check_range(GuestAddress(0x1800), 0x1000));
        assert_eq!(
            mem.user_to_guest(0x7f00_0000_2100, 16),
            Some(GuestAddress(0x1_0000_0100))
        );
        assert_eq!(mem.user_to_guest(0x7f00_0000_1ff8, 16), None, "straddles");
        assert_eq!(mem.user_to_guest(0x1000, 1), None);
        assert_eq!(mem.user_to_guest(u64::MAX, 2), None);
    }

    #[test]
    fn overlapping_regions_are_refused() {
        let fds = || -> Vec<OwnedFd> { vec![memfd("a", 0x4000).into(), memfd("b", 0x4000).into()] };
        let guest_overlap = [
            region(0, 0x2000, 0x10000, 0),
            region(0x1000, 0x1000, 0x20000, 0),
        ];
        assert!(matches!(
            MappedMemory::map(&guest_overlap, fds()),
            Err(MemoryError::Overlap { .. })
        ));
        let user_overlap = [
            region(0, 0x1000, 0x10000, 0),
            region(0x8000, 0x1000, 0x10800, 0),
        ];
        assert!(matches!(
            MappedMemory::map(&user_overlap, fds()),
            Err(MemoryError::Overlap { .. })
        ));
    }

    #[test]
    fn overflowing_and_oversized_regions_are_refused() {
        let one = || -> Vec<OwnedFd> { vec![memfd("a", 0x4000).into()] };
        assert!(matches!(
            MappedMemory::map(&[region(u64::MAX - 0xfff, 0x2000, 0, 0)], one()),
            Err(MemoryError::Overflow { .. })
        ));
        assert!(matches!(
            MappedMemory::map(&[region(0, 0x2000, u64::MAX, 0)], one()),
            Err(MemoryError::Overflow { .. })
        ));
        assert!(matches!(
            MappedMemory::map(&[region(0, 0x2000, 0, u64::MAX)], one()),
            Err(MemoryError::Overflow { .. })
        ));
        assert!(matches!(
            MappedMemory::map(&[region(0, 0x8000, 0, 0)], one()),
            Err(MemoryError::PastEndOfFd { .. })
        ));
        assert!(matches!(
            MappedMemory::map(&[region(0, 0x1000, 0, 0x100)], one()),
            Err(MemoryError::UnalignedOffset { .. })
        ));
        assert!(matches!(
            MappedMemory::map(&[region(0, 0, 0, 0)], one()),
            Err(MemoryError::EmptyRegion { .. })
        ));
        assert!(matches!(
            MappedMemory::map(&[region(0, 0x1000, 0, 0)], vec![]),
            Err(MemoryError::FdCountMismatch { .. })
        ));
    }
}
