//! Guest RAM as the backend must see it: for SET_MEM_TABLE, and to translate ring addresses.
//!
//! vhost-user has the backend map guest RAM itself: each region travels as a file descriptor
//! (our guest RAM is one shared memfd) plus where it sits in three address spaces: guest
//! physical, the VMM's own virtual addresses, and the offset into the file. Vring addresses in
//! SET_VRING_ADDR are *VMM virtual addresses* (a historical choice of the protocol), so the
//! frontend translates the guest physical addresses the driver wrote through this table.

use std::fs::File;
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Most regions one SET_MEM_TABLE message carries (VHOST_MEMORY_MAX_NREGIONS).
pub use vhost_frontend::wire::MAX_MEMORY_REGIONS;

/// One region of guest RAM shared with the backend.
#[derive(Clone, Debug)]
pub struct GuestRegion {
    /// The file backing the region; the backend maps it MAP_SHARED.
    pub file: Arc<File>,
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Where the VMM mapped the region in its own address space.
    pub userspace_addr: u64,
    /// Offset of the region's first byte in `file`.
    pub mmap_offset: u64,
}

/// Why a memory table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MemoryTableError {
    #[error("guest memory has no regions")]
    Empty,
    #[error(
        "guest memory has {0} regions; one SET_MEM_TABLE carries at most {MAX_MEMORY_REGIONS}"
    )]
    TooManyRegions(usize),
    #[error("guest region at {guest_phys_addr:#x} is not backed by a file; a backend cannot map it (guest RAM must be a shared memfd)")]
    NotShareable { guest_phys_addr: u64 },
    #[error(
        "guest region at {guest_phys_addr:#x} has size {size:#x}: empty or wraps the address space"
    )]
    BadRegion { guest_phys_addr: u64, size: u64 },
    #[error("guest regions at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
}

/// A validated list of guest RAM regions.
#[derive(Clone, Debug)]
pub struct MemoryTable {
    regions: Vec<GuestRegion>,
}

impl MemoryTable {
    /// Checks the regions: 1 to 8, none empty, none wrapping around, none overlapping.
    pub fn new(regions: Vec<GuestRegion>) -> Result<Self, MemoryTableError> {
        if regions.is_empty() {
            return Err(MemoryTableError::Empty);
        }
        if regions.len() > MAX_MEMORY_REGIONS {
            return Err(MemoryTableError::TooManyRegions(regions.len()));
        }
        for region in &regions {
            let bad = region.size == 0
                || region.guest_phys_addr.checked_add(region.size).is_none()
                || region.userspace_addr.checked_add(region.size).is_none()
                || region.mmap_offset.checked_add(region.size).is_none();
            if bad {
                return Err(MemoryTableError::BadRegion {
                    guest_phys_addr: region.guest_phys_addr,
                    size: region.size,
                });
            }
        }
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                // Ends cannot overflow: checked above.
                if a.guest_phys_addr < b.guest_phys_addr + b.size
                    && b.guest_phys_addr < a.guest_phys_addr + a.size
                {
                    return Err(MemoryTableError::Overlap(
                        a.guest_phys_addr,
                        b.guest_phys_addr,
                    ));
                }
            }
        }
        Ok(MemoryTable { regions })
    }

    /// The table of a `GuestMemoryMmap` whose regions are file-backed (as the VMM's memfd RAM
    /// is). Anonymous regions cannot be shared with a backend and are refused.
    pub fn from_guest_memory(memory: &GuestMemoryMmap) -> Result<Self, MemoryTableError> {
        let regions = memory
            .iter()
            .map(|region| {
                let guest_phys_addr = region.start_addr().0;
                let file_offset = region
                    .file_offset()
                    .ok_or(MemoryTableError::NotShareable { guest_phys_addr })?;
                Ok(GuestRegion {
                    file: file_offset.arc().clone(),
                    guest_phys_addr,
                    size: region.len(),
                    userspace_addr: region.as_ptr() as u64,
                    mmap_offset: file_offset.start(),
                })
            })
            .collect::<Result<Vec<_>, MemoryTableError>>()?;
        Self::new(regions)
    }

    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// Reads the little-endian u16 at guest physical `addr` (a ring index) through the region's
    /// file, not through a mapping: the frontend needs this only when a backend reconnects (the
    /// used ring's idx becomes the ring base), and `pread` on the shared memfd sees what the
    /// guest and the backend stored, without any `unsafe`.
    pub fn read_u16(&self, addr: u64) -> std::io::Result<u16> {
        use std::os::unix::fs::FileExt;
        let region = self
            .regions
            .iter()
            .find(|r| {
                addr >= r.guest_phys_addr
                    && addr
                        .checked_add(2)
                        .is_some_and(|end| end <= r.guest_phys_addr + r.size)
            })
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("guest address {addr:#x} is not in guest RAM"),
                )
            })?;
        let mut bytes = [0u8; 2];
        // Cannot overflow: `addr` lies in the region, whose offset + size was checked in `new`.
        region.file.read_exact_at(
            &mut bytes,
            region.mmap_offset + (addr - region.guest_phys_addr),
        )?;
        Ok(u16::from_le_bytes(bytes))
    }

    /// The VMM virtual address of guest physical `[addr, addr + len)`, which must lie inside
    /// one region (a ring split across regions would be split in the backend's view too).
    pub fn translate(&self, addr: u64, len: u64) -> Option<u64> {
        let end = addr.checked_add(len)?;
        self.regions.iter().find_map(|region| {
            let region_end = region.guest_phys_addr + region.size;
            (addr >= region.guest_phys_addr && end <= region_end)
                .then(|| region.userspace_addr + (addr - region.guest_phys_addr))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestAddress};

    fn file() -> Arc<File> {
        Arc::new(File::open("/dev/null").unwrap())
    }

    fn region(gpa: u64, size: u64, uva: u64) -> GuestRegion {
        GuestRegion {
            file: file(),
            guest_phys_addr: gpa,
            size,
            userspace_addr: uva,
            mmap_offset: 0,
        }
    }

    #[test]
    fn translates_inside_one_region_only() {
        let table = MemoryTable::new(vec![
            region(0, 0x1000, 0x7f00_0000_0000),
            region(0x1_0000, 0x1000, 0x7f00_1000_0000),
        ])
        .unwrap();
        assert_eq!(table.translate(0x10, 0x20), Some(0x7f00_0000_0010));
        assert_eq!(table.translate(0x1_0ff0, 0x10), Some(0x7f00_1000_0ff0));
        assert_eq!(
            table.translate(0xff0, 0x11),
            None,
            "runs past the region's end"
        );
        assert_eq!(table.translate(0x2000, 1), None, "in the hole");
        assert_eq!(table.translate(u64::MAX, 2), None, "wraps");
    }

    #[test]
    fn refuses_bad_tables() {
        assert!(matches!(
            MemoryTable::new(vec![]),
            Err(MemoryTableError::Empty)
        ));
        let nine = (0..9).map(|i| region(i * 0x1000, 0x1000, 0)).collect();
        assert!(matches!(
            MemoryTable::new(nine),
            Err(MemoryTableError::TooManyRegions(9))
        ));
        assert!(matches!(
            MemoryTable::new(vec![region(u64::MAX - 10, 0x1000, 0)]),
            Err(MemoryTableError::BadRegion { .. })
        ));
        assert!(matches!(
            MemoryTable::new(vec![region(0, 0, 0)]),
            Err(MemoryTableError::BadRegion { .. })
        ));
        assert!(matches!(
            MemoryTable::new(vec![region(0, 0x2000, 0), region(0x1000, 0x1000, 0)]),
            Err(MemoryTableError::Overlap(0, 0x1000))
        ));
    }

    #[test]
    fn from_guest_memory_needs_file_backed_regions() {
        let anonymous = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            MemoryTable::from_guest_memory(&anonymous),
            Err(MemoryTableError::NotShareable { guest_phys_addr: 0 })
        ));

        let backing = tempfile_of_size(0x3000);
        let memory = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0x10_0000),
            0x2000,
            Some(FileOffset::new(backing, 0x1000)),
        )])
        .unwrap();
        let table = MemoryTable::from_guest_memory(&memory).unwrap();
        let region = &table.regions()[0];
        assert_eq!(region.guest_phys_addr, 0x10_0000);
        assert_eq!(region.size, 0x2000);
        assert_eq!(region.mmap_offset, 0x1000);
        let host = memory.iter().next().unwrap().as_ptr() as u64;
        assert_eq!(region.userspace_addr, host);
        assert_eq!(table.translate(0x10_0010, 8), Some(host + 0x10));
    }

    /// An unlinked file of `size` bytes (memfd, as the VMM uses for guest RAM).
    fn tempfile_of_size(size: u64) -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked below.
        let fd = unsafe { libc::memfd_create(c"memory-table-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just created by memfd_create and is owned by nobody else.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        file
    }
}
