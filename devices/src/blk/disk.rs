//! The raw disk image behind a virtio-blk device: one file, addressed in 512-byte sectors.
//!
//! Every request range is checked against the capacity measured when the file was opened, with
//! checked arithmetic, before any byte moves: the sector number and the length come from the guest.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// virtio-blk always counts in 512-byte sectors, whatever the block size it advertises.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the identifier a GET_ID request returns (VIRTIO_BLK_ID_BYTES).
pub const DISK_ID_LEN: usize = 20;

/// Why a request's byte range does not fit the disk.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RangeError {
    #[error("length {0} is not a multiple of the 512-byte sector")]
    UnalignedLength(u64),
    #[error("sector {sector} + {len} bytes overflows")]
    Overflow { sector: u64, len: u64 },
    #[error("sector {sector} + {len} bytes ends past the capacity of {capacity} sectors")]
    PastEnd {
        sector: u64,
        len: u64,
        capacity: u64,
    },
}

/// An opened disk image. Shared by every queue's I/O threads: all access is positional
/// (`pread`/`pwrite`), so no file offset is shared between threads.
#[derive(Debug)]
pub struct Disk {
    file: File,
    readonly: bool,
    capacity_sectors: u64,
    id: [u8; DISK_ID_LEN],
}

impl Disk {
    /// Opens `path` once, read-write unless `readonly`, with O_DIRECT when `direct` (requests
    /// then bypass the host page cache; the request layer moves data through a 4 KiB-aligned
    /// buffer in sector multiples, which is what O_DIRECT asks on 512-byte-sector storage).
    /// A trailing partial sector is not exposed.
    pub fn open(path: &Path, readonly: bool, direct: bool) -> io::Result<Self> {
        let mut options = OpenOptions::new();
        options.read(true).write(!readonly);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path).map_err(|e| {
            if direct && e.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    e.kind(),
                    format!("{e} (this file system does not support O_DIRECT; try without it)"),
                )
            } else {
                e
            }
        })?;
        Self::from_file(file, readonly, id_from_path(path))
    }

    /// Wraps an already opened image (its size is read now and fixes the capacity).
    pub fn from_file(file: File, readonly: bool, id: [u8; DISK_ID_LEN]) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Disk {
            file,
            readonly,
            capacity_sectors: len / SECTOR_SIZE,
            id,
        })
    }

    /// A writable disk of `capacity_sectors` over any file, whatever its size: tests use a
    /// pipe, whose reads stay in flight until the test feeds them.
    #[cfg(test)]
    pub(crate) fn with_capacity(file: File, capacity_sectors: u64) -> Self {
        Disk {
            file,
            readonly: false,
            capacity_sectors,
            id: [0; DISK_ID_LEN],
        }
    }

    /// Capacity in 512-byte sectors (the virtio-blk config space `capacity` field).
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// The image file, for an I/O engine that hands it to the kernel itself (`uring_path`).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The 20-byte identifier GET_ID returns (the image's file name, cut to 20 bytes, NUL padded).
    pub fn id(&self) -> &[u8; DISK_ID_LEN] {
        &self.id
    }

    /// Checks that `len` bytes starting at `sector` lie inside the disk; returns the byte offset.
    pub fn byte_range(&self, sector: u64, len: u64) -> Result<u64, RangeError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RangeError::UnalignedLength(len));
        }
        let overflow = RangeError::Overflow { sector, len };
        let end_sector = sector
            .checked_add(len / SECTOR_SIZE)
            .ok_or(overflow.clone())?;
        if end_sector > self.capacity_sectors {
            return Err(RangeError::PastEnd {
                sector,
                len,
                capacity: self.capacity_sectors,
            });
        }
        sector.checked_mul(SECTOR_SIZE).ok_or(overflow)
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.readonly {
            // The request layer refuses OUT on a readonly disk first; this is the backstop.
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    /// Makes completed writes durable (VIRTIO_BLK_T_FLUSH).
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }
}

fn id_from_path(path: &Path) -> [u8; DISK_ID_LEN] {
    let mut id = [0u8; DISK_ID_LEN];
    let name = path
        .file_name()
        .map(|n| n.as_encoded_bytes())
        .unwrap_or(b"virtio-blk");
    let n = name.len().min(DISK_ID_LEN);
    id[..n].copy_from_slice(&name[..n]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_with_sectors(sectors: u64) -> Disk {
        Disk {
            file: tempfile_like(),
            readonly: false,
            capacity_sectors: sectors,
            id: [0; DISK_ID_LEN],
        }
    }

    fn tempfile_like() -> File {
        // An anonymous in-memory file is enough: these tests only exercise range arithmetic.
        crate::test_util::memfd("disk-range", 0)
    }

    #[test]
    fn ranges_inside_the_disk_are_accepted() {
        let disk = disk_with_sectors(8);
        assert_eq!(disk.byte_range(0, 4096), Ok(0));
        assert_eq!(disk.byte_range(7, 512), Ok(7 * 512));
        assert_eq!(disk.byte_range(8, 0), Ok(8 * 512));
    }

    #[test]
    fn ranges_past_the_end_or_overflowing_are_refused() {
        let disk = disk_with_sectors(8);
        assert!(matches!(
            disk.byte_range(7, 1024),
            Err(RangeError::PastEnd { .. })
        ));
        assert!(matches!(
            disk.byte_range(u64::MAX, 512),
            Err(RangeError::Overflow { .. })
        ));
        assert!(matches!(
            disk.byte_range(0, 100),
            Err(RangeError::UnalignedLength(100))
        ));
    }

    #[test]
    fn overflowing_byte_offset_is_refused_even_with_a_huge_capacity() {
        let disk = disk_with_sectors(u64::MAX);
        assert!(matches!(
            disk.byte_range(u64::MAX / 2, 0),
            Err(RangeError::Overflow { .. })
        ));
    }

    #[test]
    fn id_is_the_file_name_cut_to_twenty_bytes() {
        let id = id_from_path(Path::new("/tmp/a-very-long-disk-image-name.raw"));
        assert_eq!(&id, b"a-very-long-disk-ima");
        let id = id_from_path(Path::new("disk.img"));
        assert_eq!(&id[..8], b"disk.img");
        assert!(id[8..].iter().all(|&b| b == 0));
    }
}
