//! Guest RAM: one memfd mapped MAP_SHARED. Sharing the memfd is what lets a vhost-user backend
//! map the very same pages (SET_MEM_TABLE sends this fd), so the data path needs no copies.
//!
//! The memfd is sealed against resizing ([`RAM_SEALS`]) before anyone else sees it: a backend holds
//! the same file, and an ftruncate that shrank it would turn every guest access (and KVM's) past the
//! new end into a SIGBUS in this process.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    #[error("cannot size guest RAM memfd to {0} bytes: {1}")]
    Truncate(u64, std::io::Error),
    #[error("cannot seal the guest RAM memfd against resizing: {0}")]
    Seal(std::io::Error),
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

/// The seals on the guest RAM memfd: its size is fixed (no shrink, no grow), and F_SEAL_SEAL so the
/// set itself cannot change. Not F_SEAL_WRITE: guest RAM is written, by us and by the backend.
pub const RAM_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

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
        let fd = unsafe {
            libc::memfd_create(
                c"vmm-guest-ram".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd
            .set_len(size)
            .map_err(|e| MemoryError::Truncate(size, e))?;
        // Sealed before the first clone or mapping, so no copy of the fd exists without the seals.
        // SAFETY: fcntl on an fd we own, with an int argument; the return value is checked.
        if unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_ADD_SEALS, RAM_SEALS) } < 0 {
            return Err(MemoryError::Seal(std::io::Error::last_os_error()));
        }
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

    /// A backend gets (a dup of) this fd: it must not be able to resize guest RAM under the VM.
    #[test]
    fn ram_memfd_is_sealed_against_resizing() {
        let ram = GuestRam::new(4 << 20).unwrap();
        // SAFETY: fcntl on a live fd of ours, no argument.
        let seals = unsafe { libc::fcntl(ram.memfd().as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(seals, RAM_SEALS, "seals {seals:#x}");
        let dup = ram.memfd().try_clone().unwrap();
        for (file, what) in [(ram.memfd(), "memfd"), (&dup, "dup")] {
            for len in [0, 1 << 20, 8 << 20] {
                let err = file.set_len(len).unwrap_err();
                assert_eq!(
                    err.raw_os_error(),
                    Some(libc::EPERM),
                    "{what} to {len}: {err}"
                );
            }
            // SAFETY: fcntl on a live fd of ours, with an int argument.
            let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
            assert_eq!(r, -1, "{what}: the seal set changed");
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
            // Same size as it is: allowed (and a no-op).
            file.set_len(4 << 20).unwrap();
        }
        assert_eq!(ram.memfd().metadata().unwrap().len(), 4 << 20);
        // Still ordinary writable RAM.
        ram.memory().write_obj(1u8, GuestAddress(0)).unwrap();
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
