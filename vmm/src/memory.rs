//! Guest RAM: one memfd mapped MAP_SHARED. Sharing the memfd is what lets a vhost-user backend
//! map the very same pages (SET_MEM_TABLE sends this fd), so the data path needs no copies.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size guest RAM memfd to {0} bytes: {1}")]
    Truncate(u64, std::io::Error),
    #[error("cannot map guest RAM: {0}")]
    Map(String),
}

/// One contiguous piece of guest RAM and where it lives in the memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

pub struct GuestRam {
    memfd: File,
    mem: GuestMemoryMmap,
    regions: Vec<RamRegion>,
}

/// Splits `size` bytes of RAM around the MMIO gap below 4 GiB.
pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_GAP_START);
    let mut v = vec![RamRegion {
        guest_addr: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        v.push(RamRegion {
            guest_addr: MMIO_GAP_END,
            size: size - low,
            file_offset: low,
        });
    }
    v
}

impl GuestRam {
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        // SAFETY: the name is a valid NUL-terminated string; the return value is checked.
        let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(size)
            .map_err(|e| MemoryError::Truncate(size, e))?;
        let regions = ram_regions(size);
        let mut ranges = Vec::new();
        for r in &regions {
            let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
            ranges.push((
                GuestAddress(r.guest_addr),
                r.size as usize,
                Some(FileOffset::new(file, r.file_offset)),
            ));
        }
        // vm-memory maps file-backed regions MAP_SHARED, which is what a backend needs to see our writes.
        let mem = GuestMemoryMmap::from_ranges_with_files(
            ranges.iter().map(|(a, s, f)| (*a, *s, f.clone())),
        )
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(GuestRam {
            memfd,
            mem,
            regions,
        })
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Size of RAM below the MMIO gap: where boot structures, kernel and initrd go.
    pub fn low_ram_end(&self) -> u64 {
        self.regions[0].size
    }

    /// Host virtual address of each region, for KVM_SET_USER_MEMORY_REGION and SET_MEM_TABLE.
    pub fn host_addresses(&self) -> Vec<(RamRegion, u64)> {
        self.regions
            .iter()
            .zip(self.mem.iter())
            .map(|(r, m)| (*r, m.as_ptr() as u64))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn regions_split_around_the_gap() {
        assert_eq!(
            ram_regions(256 << 20),
            vec![RamRegion {
                guest_addr: 0,
                size: 256 << 20,
                file_offset: 0
            }]
        );
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].size, MMIO_GAP_START);
        assert_eq!(
            r[1],
            RamRegion {
                guest_addr: MMIO_GAP_END,
                size: (4 << 30) - MMIO_GAP_START,
                file_offset: MMIO_GAP_START
            }
        );
    }

    #[test]
    fn ram_is_shared_through_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().read_exact_at(&mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
