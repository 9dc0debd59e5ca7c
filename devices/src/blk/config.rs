//! The virtio-blk configuration space and the virtio feature bits this device offers.
//!
//! The frontend reads the config space with GET_CONFIG and shows it to the guest unchanged, so its
//! layout is the one in the virtio spec (struct virtio_blk_config, little endian, packed, 96 bytes
//! with the secure-erase and zoned fields of virtio 1.2+). Fields whose feature is not offered stay 0.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

use super::disk::SECTOR_SIZE;
use super::request::MAX_CHAIN_DESCRIPTORS;

/// The largest seg_max offered: a request of seg_max segments is a chain of seg_max + 2
/// descriptors (header and status too), and the request parser takes chains up to
/// `MAX_CHAIN_DESCRIPTORS`. Promising more would have the guest build legal chains we cut.
pub const MAX_SEG_MAX: u32 = MAX_CHAIN_DESCRIPTORS as u32 - 2;

/// Size of the config space: the whole current struct virtio_blk_config. QEMU asks for exactly
/// this many bytes (sizeof in its headers), so a shorter space would make it refuse the device.
pub const CONFIG_SPACE_SIZE: usize = 96;

const CAPACITY_OFFSET: usize = 0;
const SEG_MAX_OFFSET: usize = 12;
const BLK_SIZE_OFFSET: usize = 20;
const NUM_QUEUES_OFFSET: usize = 34;

/// The virtio feature bits the device offers (the vhost-user bit is added by the backend).
pub fn offered_virtio_features(readonly: bool) -> u64 {
    let mut features = (1u64 << VIRTIO_F_VERSION_1)
        | (1u64 << VIRTIO_BLK_F_SEG_MAX)
        | (1u64 << VIRTIO_BLK_F_BLK_SIZE)
        | (1u64 << VIRTIO_BLK_F_FLUSH)
        | (1u64 << VIRTIO_BLK_F_MQ);
    if readonly {
        features |= 1u64 << VIRTIO_BLK_F_RO;
    }
    features
}

/// What the device reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Most data segments in one request (VIRTIO_BLK_F_SEG_MAX). Without indirect descriptors
    /// a request uses one descriptor per segment plus header and status, so ring size - 2, and
    /// never more than [`MAX_SEG_MAX`]. (A frontend exposing a smaller ring clamps it further.)
    pub seg_max: u32,
    /// Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: u32,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: u16,
}

/// A GET_CONFIG/SET_CONFIG window that does not lie inside the config space.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("config window offset {offset} size {size} is outside the {CONFIG_SPACE_SIZE}-byte virtio-blk config space")]
pub struct ConfigWindowError {
    pub offset: u32,
    pub size: u32,
}

impl BlkConfig {
    pub fn new(capacity_sectors: u64, queue_size: u16, num_queues: u16) -> Self {
        BlkConfig {
            capacity_sectors,
            seg_max: u32::from(queue_size.saturating_sub(2)).clamp(1, MAX_SEG_MAX),
            blk_size: SECTOR_SIZE as u32,
            num_queues,
        }
    }

    /// The whole config space, as the guest would read it.
    pub fn to_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut space = [0u8; CONFIG_SPACE_SIZE];
        put(
            &mut space,
            CAPACITY_OFFSET,
            &self.capacity_sectors.to_le_bytes(),
        );
        put(&mut space, SEG_MAX_OFFSET, &self.seg_max.to_le_bytes());
        put(&mut space, BLK_SIZE_OFFSET, &self.blk_size.to_le_bytes());
        put(
            &mut space,
            NUM_QUEUES_OFFSET,
            &self.num_queues.to_le_bytes(),
        );
        space
    }

    /// The bytes a GET_CONFIG for `offset`/`size` returns; both come from the peer.
    pub fn read_window(&self, offset: u32, size: u32) -> Result<Vec<u8>, ConfigWindowError> {
        let err = ConfigWindowError { offset, size };
        let start = usize::try_from(offset).map_err(|_| err.clone())?;
        let len = usize::try_from(size).map_err(|_| err.clone())?;
        let end = start.checked_add(len).ok_or(err.clone())?;
        let space = self.to_bytes();
        space.get(start..end).map(<[u8]>::to_vec).ok_or(err)
    }
}

fn put(space: &mut [u8; CONFIG_SPACE_SIZE], offset: usize, bytes: &[u8]) {
    space[offset..offset + bytes.len()].copy_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use virtio_bindings::virtio_blk::virtio_blk_config;

    #[test]
    fn layout_matches_the_linux_header() {
        assert_eq!(size_of::<virtio_blk_config>(), CONFIG_SPACE_SIZE);
        assert_eq!(offset_of!(virtio_blk_config, capacity), CAPACITY_OFFSET);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), SEG_MAX_OFFSET);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), BLK_SIZE_OFFSET);
        assert_eq!(offset_of!(virtio_blk_config, num_queues), NUM_QUEUES_OFFSET);
    }

    #[test]
    fn fields_are_little_endian_at_their_offsets() {
        let config = BlkConfig::new(0x1122_3344_5566_7788, 128, 3);
        let bytes = config.to_bytes();
        assert_eq!(&bytes[0..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[12..16], &126u32.to_le_bytes());
        assert_eq!(&bytes[20..24], &512u32.to_le_bytes());
        assert_eq!(&bytes[34..36], &3u16.to_le_bytes());
        assert!(bytes[36..].iter().all(|&b| b == 0));
    }

    #[test]
    fn seg_max_never_exceeds_the_chain_cap() {
        assert_eq!(BlkConfig::new(8, 1024, 1).seg_max, 1022);
        assert_eq!(BlkConfig::new(8, 4096, 1).seg_max, 4094);
        for size in [8192u16, 16384, 32768] {
            let seg_max = BlkConfig::new(8, size, 1).seg_max;
            assert!(
                seg_max as usize + 2 <= MAX_CHAIN_DESCRIPTORS,
                "queue size {size}: seg_max {seg_max}"
            );
        }
        assert_eq!(BlkConfig::new(8, 2, 1).seg_max, 1);
    }

    #[test]
    fn windows_inside_the_space_are_served() {
        let config = BlkConfig::new(8, 128, 1);
        assert_eq!(config.read_window(0, 8).unwrap(), 8u64.to_le_bytes());
        assert_eq!(config.read_window(0, 96).unwrap().len(), 96);
        assert_eq!(config.read_window(34, 2).unwrap(), 1u16.to_le_bytes());
        assert_eq!(config.read_window(96, 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn windows_outside_the_space_are_refused() {
        let config = BlkConfig::new(8, 128, 1);
        assert!(config.read_window(0, 97).is_err());
        assert!(config.read_window(95, 2).is_err());
        assert!(config.read_window(u32::MAX, u32::MAX).is_err());
    }

    #[test]
    fn readonly_adds_the_ro_bit_only() {
        let rw = offered_virtio_features(false);
        let ro = offered_virtio_features(true);
        assert_eq!(ro ^ rw, 1 << VIRTIO_BLK_F_RO);
        assert_ne!(rw & (1 << 32), 0, "VERSION_1 must be offered");
    }
}
