//! Typed message payloads. Each has `encode`/`to_bytes` and `decode`, and `decode` checks the exact
//! size first, then every field a peer could set to something harmful.

use super::{bad_value, le_u16, le_u32, le_u64, wrong_size, WireError};

/// Most regions one SET_MEM_TABLE may carry (each comes with its own fd). The one definition,
/// used by the frontend, the device and the backend.
pub const MAX_MEMORY_REGIONS: usize = super::MAX_FDS;
/// Largest ring a split virtqueue may have (virtio spec §2.7). The one definition, used by the
/// frontend, the virtio-mmio transport and the backend.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Most virtqueues one device may have on either side (the vring fd messages could carry an
/// 8-bit index; 64 is plenty and bounds what a peer can make us allocate).
pub const MAX_QUEUES: u16 = 64;
/// Largest device config space transfer (QEMU's VHOST_USER_MAX_CONFIG_SIZE).
pub const MAX_CONFIG_SIZE: usize = 256;
/// `VringAddr::flags` bit: the backend logs used-ring writes (dirty logging for migration).
pub const VHOST_VRING_F_LOG: u32 = 0x1;

/// A bare u64 payload: feature words, GET_QUEUE_NUM's count, the REPLY_ACK status, SET_STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct U64Payload(pub u64);

impl U64Payload {
    pub const SIZE: usize = 8;

    pub fn encode(&self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != Self::SIZE {
            return Err(wrong_size("u64 payload", Self::SIZE, bytes.len()));
        }
        Ok(U64Payload(le_u64(bytes)))
    }
}

/// `struct vhost_vring_state`: a queue index and a number (ring size for SET_VRING_NUM, the next
/// available index for SET/GET_VRING_BASE, 0/1 for SET_VRING_ENABLE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringState {
    pub index: u32,
    pub num: u32,
}

impl VringState {
    pub const SIZE: usize = 8;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.num.to_le_bytes());
        v
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != Self::SIZE {
            return Err(wrong_size("vring state", Self::SIZE, bytes.len()));
        }
        Ok(VringState {
            index: le_u32(&bytes[0..4]),
            num: le_u32(&bytes[4..8]),
        })
    }
}

/// `struct vhost_vring_addr`: where a queue's three parts live, as addresses in the *frontend's*
/// virtual address space (the backend translates them through the memory table's userspace_addr).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringAddr {
    pub index: u32,
    pub flags: u32,
    pub desc_user_addr: u64,
    pub used_user_addr: u64,
    pub avail_user_addr: u64,
    pub log_guest_addr: u64,
}

impl VringAddr {
    pub const SIZE: usize = 40;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.index.to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.desc_user_addr.to_le_bytes());
        v.extend_from_slice(&self.used_user_addr.to_le_bytes());
        v.extend_from_slice(&self.avail_user_addr.to_le_bytes());
        v.extend_from_slice(&self.log_guest_addr.to_le_bytes());
        v
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != Self::SIZE {
            return Err(wrong_size("vring address", Self::SIZE, bytes.len()));
        }
        let addr = VringAddr {
            index: le_u32(&bytes[0..4]),
            flags: le_u32(&bytes[4..8]),
            desc_user_addr: le_u64(&bytes[8..16]),
            used_user_addr: le_u64(&bytes[16..24]),
            avail_user_addr: le_u64(&bytes[24..32]),
            log_guest_addr: le_u64(&bytes[32..40]),
        };
        if addr.flags & !VHOST_VRING_F_LOG != 0 {
            return Err(bad_value(
                "vring address",
                format!("unknown flags {:#x}", addr.flags),
            ));
        }
        Ok(addr)
    }
}

/// The u64 payload of SET_VRING_KICK / SET_VRING_CALL / SET_VRING_ERR: bits 0-7 the queue index,
/// bit 8 "no fd attached" (the backend must then poll the ring instead of waiting on an eventfd).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VringFdIndex {
    pub index: u8,
    pub no_fd: bool,
}

impl VringFdIndex {
    pub const SIZE: usize = 8;
    const INDEX_MASK: u64 = 0xff;
    const NO_FD: u64 = 0x100;

    /// Builds the payload for queue `index`; indexes above 255 cannot be expressed.
    pub fn new(index: u32, no_fd: bool) -> Result<Self, WireError> {
        let index = u8::try_from(index).map_err(|_| {
            WireError::InvalidSend(format!(
                "queue index {index} does not fit the 8-bit vring fd index"
            ))
        })?;
        Ok(VringFdIndex { index, no_fd })
    }

    /// How many fds must ride along with this payload.
    pub fn expected_fds(&self) -> usize {
        usize::from(!self.no_fd)
    }

    pub fn encode(&self) -> Vec<u8> {
        let word = u64::from(self.index) | if self.no_fd { Self::NO_FD } else { 0 };
        word.to_le_bytes().to_vec()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != Self::SIZE {
            return Err(wrong_size("vring fd index", Self::SIZE, bytes.len()));
        }
        let word = le_u64(bytes);
        if word & !(Self::INDEX_MASK | Self::NO_FD) != 0 {
            return Err(bad_value(
                "vring fd index",
                format!("reserved bits set in {word:#x}"),
            ));
        }
        Ok(VringFdIndex {
            index: (word & Self::INDEX_MASK) as u8,
            no_fd: word & Self::NO_FD != 0,
        })
    }
}

/// One region of guest memory: guest physical range, where the frontend has it mapped, and the
/// offset into the fd that comes with it (the backend mmaps fd at mmap_offset, memory_size bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub mmap_offset: u64,
}

impl MemoryRegion {
    pub const SIZE: usize = 32;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        self.encode_into(&mut v);
        v
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    fn encode_into(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.guest_phys_addr.to_le_bytes());
        v.extend_from_slice(&self.memory_size.to_le_bytes());
        v.extend_from_slice(&self.userspace_addr.to_le_bytes());
        v.extend_from_slice(&self.mmap_offset.to_le_bytes());
    }

    /// Decodes and validates: non-empty, and no range wraps around the 64-bit address space (so
    /// `start + size` is safe everywhere later).
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != Self::SIZE {
            return Err(wrong_size("memory region", Self::SIZE, bytes.len()));
        }
        let region = MemoryRegion {
            guest_phys_addr: le_u64(&bytes[0..8]),
            memory_size: le_u64(&bytes[8..16]),
            userspace_addr: le_u64(&bytes[16..24]),
            mmap_offset: le_u64(&bytes[24..32]),
        };
        region.validate()?;
        Ok(region)
    }

    /// The checks `decode` applies, for regions built locally.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.memory_size == 0 {
            return Err(bad_value("memory region", "memory_size is 0"));
        }
        for (name, start) in [
            ("guest_phys_addr", self.guest_phys_addr),
            ("userspace_addr", self.userspace_addr),
            ("mmap_offset", self.mmap_offset),
        ] {
            if start.checked_add(self.memory_size).is_none() {
                return Err(bad_value(
                    "memory region",
                    format!(
                        "{name} {start:#x} + memory_size {:#x} overflows",
                        self.memory_size
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One past the last guest physical address (cannot overflow after `validate`).
    pub fn guest_end(&self) -> u64 {
        self.guest_phys_addr.saturating_add(self.memory_size)
    }
}

/// SET_MEM_TABLE: `u32 nregions, u32 padding`, then `nregions` regions; one fd per region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryTable {
    pub regions: Vec<MemoryRegion>,
}

impl MemoryTable {
    const PREFIX: usize = 8;

    /// Wire size of a table with `n` regions.
    pub fn wire_size(n: usize) -> usize {
        Self::PREFIX + n * MemoryRegion::SIZE
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::wire_size(self.regions.len()));
        v.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        for r in &self.regions {
            r.encode_into(&mut v);
        }
        v
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    /// Decodes and validates: at most [`MAX_MEMORY_REGIONS`], the size matches the count exactly,
    /// every region valid, and no two regions overlap in guest physical space.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() < Self::PREFIX {
            return Err(wrong_size("memory table", Self::PREFIX, bytes.len()));
        }
        let count = le_u32(&bytes[0..4]) as usize;
        if count > MAX_MEMORY_REGIONS {
            return Err(bad_value(
                "memory table",
                format!("{count} regions, at most {MAX_MEMORY_REGIONS} allowed"),
            ));
        }
        let expected = Self::wire_size(count);
        if bytes.len() != expected {
            return Err(wrong_size("memory table", expected, bytes.len()));
        }
        let regions = bytes[Self::PREFIX..]
            .chunks_exact(MemoryRegion::SIZE)
            .map(MemoryRegion::decode)
            .collect::<Result<Vec<_>, _>>()?;
        let table = MemoryTable { regions };
        table.check_no_overlap()?;
        Ok(table)
    }

    fn check_no_overlap(&self) -> Result<(), WireError> {
        for (i, a) in self.regions.iter().enumerate() {
            for b in &self.regions[i + 1..] {
                if a.guest_phys_addr < b.guest_end() && b.guest_phys_addr < a.guest_end() {
                    return Err(bad_value(
                        "memory table",
                        format!(
                            "regions at guest {:#x} and {:#x} overlap",
                            a.guest_phys_addr, b.guest_phys_addr
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// ADD_MEM_REG / REM_MEM_REG: `u64 padding` then one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleMemoryRegion(pub MemoryRegion);

impl SingleMemoryRegion {
    pub const SIZE: usize = 8 + MemoryRegion::SIZE;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&0u64.to_le_bytes());
        self.0.encode_into(&mut v);
        v
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != Self::SIZE {
            return Err(wrong_size("single memory region", Self::SIZE, bytes.len()));
        }
        Ok(SingleMemoryRegion(MemoryRegion::decode(&bytes[8..])?))
    }
}

/// GET_CONFIG / SET_CONFIG: `u32 offset, u32 size, u32 flags`, then `size` bytes of config space.
/// In a GET_CONFIG request the bytes are zeros; the reply carries the same offset and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSpace {
    pub offset: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
}

impl ConfigSpace {
    const PREFIX: usize = 12;
    /// `flags` value: an ordinary write from the driver.
    pub const FLAG_WRITABLE: u32 = 0;
    /// `flags` value: the write restores state during live migration.
    pub const FLAG_MIGRATION: u32 = 1;

    /// A GET_CONFIG request for `size` bytes at `offset` (the payload is `size` zero bytes).
    pub fn request(offset: u32, size: u32) -> Result<Self, WireError> {
        if size as usize > MAX_CONFIG_SIZE {
            return Err(WireError::InvalidSend(format!(
                "config size {size} exceeds {MAX_CONFIG_SIZE}"
            )));
        }
        Ok(ConfigSpace {
            offset,
            flags: Self::FLAG_WRITABLE,
            payload: vec![0; size as usize],
        })
    }

    /// The `size` field.
    pub fn size(&self) -> u32 {
        self.payload.len() as u32
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::PREFIX + self.payload.len());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.size().to_le_bytes());
        v.extend_from_slice(&self.flags.to_le_bytes());
        v.extend_from_slice(&self.payload);
        v
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() < Self::PREFIX {
            return Err(wrong_size("config space", Self::PREFIX, bytes.len()));
        }
        let offset = le_u32(&bytes[0..4]);
        let size = le_u32(&bytes[4..8]) as usize;
        let flags = le_u32(&bytes[8..12]);
        if size > MAX_CONFIG_SIZE {
            return Err(bad_value(
                "config space",
                format!("size {size} exceeds {MAX_CONFIG_SIZE}"),
            ));
        }
        if bytes.len() != Self::PREFIX + size {
            return Err(wrong_size("config space", Self::PREFIX + size, bytes.len()));
        }
        if offset.checked_add(size as u32).is_none() {
            return Err(bad_value(
                "config space",
                format!("offset {offset:#x} + size {size} overflows"),
            ));
        }
        if flags > Self::FLAG_MIGRATION {
            return Err(bad_value(
                "config space",
                format!("unknown flags {flags:#x}"),
            ));
        }
        Ok(ConfigSpace {
            offset,
            flags,
            payload: bytes[Self::PREFIX..].to_vec(),
        })
    }
}

/// GET_INFLIGHT_FD / SET_INFLIGHT_FD: `u64 mmap_size, u64 mmap_offset, u16 num_queues,
/// u16 queue_size` and 4 bytes of tail padding (the C struct is not packed): 24 bytes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightDescription {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl InflightDescription {
    pub const SIZE: usize = 24;

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(Self::SIZE);
        v.extend_from_slice(&self.mmap_size.to_le_bytes());
        v.extend_from_slice(&self.mmap_offset.to_le_bytes());
        v.extend_from_slice(&self.num_queues.to_le_bytes());
        v.extend_from_slice(&self.queue_size.to_le_bytes());
        v.extend_from_slice(&[0; 4]);
        v
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode()
    }

    /// Exact 24 bytes. The padding is ignored (C senders may leave it uninitialised). Ranges of
    /// the fields are checked by whoever knows the bounds (the frontend's own limits, the device's
    /// queue count), not here.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        if bytes.len() != Self::SIZE {
            return Err(wrong_size("inflight description", Self::SIZE, bytes.len()));
        }
        Ok(InflightDescription {
            mmap_size: le_u64(&bytes[0..8]),
            mmap_offset: le_u64(&bytes[8..16]),
            num_queues: le_u16(&bytes[16..18]),
            queue_size: le_u16(&bytes[18..20]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ProtocolError;

    fn assert_wrong_size<T: std::fmt::Debug>(r: Result<T, WireError>, expected: usize, got: usize) {
        match r {
            Err(WireError::Protocol(ProtocolError::WrongSize {
                expected: e,
                got: g,
                ..
            })) => {
                assert_eq!((e, g), (expected, got))
            }
            other => panic!("expected WrongSize({expected}, {got}), got {other:?}"),
        }
    }

    fn assert_bad_value<T: std::fmt::Debug>(r: Result<T, WireError>) {
        assert!(
            matches!(r, Err(WireError::Protocol(ProtocolError::BadValue { .. }))),
            "{r:?}"
        );
    }

    /// Every fixed-size payload: round trip, exact size, and a byte more or less is refused.
    #[test]
    fn fixed_size_payloads_round_trip_and_refuse_other_sizes() {
        fn check<T: PartialEq + std::fmt::Debug>(
            value: T,
            size: usize,
            encode: fn(&T) -> Vec<u8>,
            decode: fn(&[u8]) -> Result<T, WireError>,
        ) {
            let bytes = encode(&value);
            assert_eq!(bytes.len(), size);
            assert_eq!(decode(&bytes).unwrap(), value);
            let mut longer = bytes.clone();
            longer.push(0);
            assert_wrong_size(decode(&longer), size, size + 1);
            assert_wrong_size(decode(&bytes[..size - 1]), size, size - 1);
            assert_wrong_size(decode(&[]), size, 0);
        }
        check(
            U64Payload(0x1_7500_7e46),
            8,
            U64Payload::encode,
            U64Payload::decode,
        );
        check(
            VringState { index: 1, num: 256 },
            8,
            VringState::encode,
            VringState::decode,
        );
        let addr = VringAddr {
            index: 2,
            flags: VHOST_VRING_F_LOG,
            desc_user_addr: 0x7f00_0000_1000,
            used_user_addr: 0x7f00_0000_3000,
            avail_user_addr: 0x7f00_0000_2000,
            log_guest_addr: 0x9000,
        };
        check(addr, 40, VringAddr::encode, VringAddr::decode);
        check(
            VringFdIndex {
                index: 255,
                no_fd: true,
            },
            8,
            VringFdIndex::encode,
            VringFdIndex::decode,
        );
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 0x1000_0000,
            userspace_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
        };
        check(region, 32, MemoryRegion::encode, MemoryRegion::decode);
        check(
            SingleMemoryRegion(region),
            40,
            SingleMemoryRegion::encode,
            SingleMemoryRegion::decode,
        );
        let inflight = InflightDescription {
            mmap_size: 2112,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 128,
        };
        check(
            inflight,
            24,
            InflightDescription::encode,
            InflightDescription::decode,
        );
    }

    #[test]
    fn field_order_is_the_specs() {
        let addr = VringAddr {
            index: 1,
            flags: 0,
            desc_user_addr: 0x11,
            used_user_addr: 0x22,
            avail_user_addr: 0x33,
            log_guest_addr: 0x44,
        };
        let b = addr.encode();
        assert_eq!((b[8], b[16], b[24], b[32]), (0x11, 0x22, 0x33, 0x44));
        let d = InflightDescription {
            mmap_size: 1,
            mmap_offset: 2,
            num_queues: 3,
            queue_size: 4,
        }
        .encode();
        assert_eq!(
            d,
            [1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 4, 0, 0, 0, 0, 0]
        );
        // Padding from a C sender is ignored, not an error.
        let mut padded = d.clone();
        padded[20..24].copy_from_slice(&[0xaa; 4]);
        assert_eq!(InflightDescription::decode(&padded).unwrap().queue_size, 4);
    }

    #[test]
    fn vring_fd_index_bits() {
        assert_eq!(
            VringFdIndex::new(3, false).unwrap().encode(),
            3u64.to_le_bytes()
        );
        assert_eq!(
            VringFdIndex::new(3, true).unwrap().encode(),
            0x103u64.to_le_bytes()
        );
        assert_eq!(VringFdIndex::new(3, true).unwrap().expected_fds(), 0);
        assert_eq!(VringFdIndex::new(3, false).unwrap().expected_fds(), 1);
        assert!(matches!(
            VringFdIndex::new(256, false),
            Err(WireError::InvalidSend(_))
        ));
        assert_bad_value(VringFdIndex::decode(&0x200u64.to_le_bytes()));
        assert_bad_value(VringFdIndex::decode(&(1u64 << 63).to_le_bytes()));
    }

    #[test]
    fn vring_addr_refuses_unknown_flags() {
        let mut b = VringAddr {
            index: 0,
            flags: 0,
            desc_user_addr: 0,
            used_user_addr: 0,
            avail_user_addr: 0,
            log_guest_addr: 0,
        }
        .encode();
        b[4] = 0x2;
        assert_bad_value(VringAddr::decode(&b));
    }

    #[test]
    fn memory_region_refuses_empty_and_wrapping_ranges() {
        let ok = MemoryRegion {
            guest_phys_addr: 0x1000,
            memory_size: 0x1000,
            userspace_addr: 0x2000,
            mmap_offset: 0,
        };
        assert!(ok.validate().is_ok());
        assert_bad_value(MemoryRegion::decode(
            &MemoryRegion {
                memory_size: 0,
                ..ok
            }
            .encode(),
        ));
        assert_bad_value(MemoryRegion::decode(
            &MemoryRegion {
                guest_phys_addr: u64::MAX,
                ..ok
            }
            .encode(),
        ));
        assert_bad_value(MemoryRegion::decode(
            &MemoryRegion {
                userspace_addr: u64::MAX - 0xfff,
                ..ok
            }
            .encode(),
        ));
        assert_bad_value(MemoryRegion::decode(
            &MemoryRegion {
                mmap_offset: u64::MAX,
                ..ok
            }
            .encode(),
        ));
        // Ending exactly at 2^64 - 1 + 1 would wrap; ending one below is fine.
        assert!(MemoryRegion {
            userspace_addr: u64::MAX - 0x1000,
            ..ok
        }
        .validate()
        .is_ok());
    }

    fn region(gpa: u64, size: u64) -> MemoryRegion {
        MemoryRegion {
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: 0x7f00_0000_0000 + gpa,
            mmap_offset: 0,
        }
    }

    #[test]
    fn memory_table_round_trip_and_limits() {
        let table = MemoryTable {
            regions: vec![region(0, 0x1000), region(0x10_0000, 0x1000)],
        };
        let bytes = table.encode();
        assert_eq!(bytes.len(), 8 + 2 * 32);
        assert_eq!(MemoryTable::decode(&bytes).unwrap(), table);
        assert_eq!(
            MemoryTable::decode(&MemoryTable::default().encode())
                .unwrap()
                .regions
                .len(),
            0
        );

        // Count says 2, bytes hold 1 or 3 regions.
        assert_wrong_size(MemoryTable::decode(&bytes[..8 + 32]), 72, 40);
        let mut three = bytes.clone();
        three.extend_from_slice(&region(0x20_0000, 0x1000).encode());
        assert_wrong_size(MemoryTable::decode(&three), 72, 104);
        assert_wrong_size(MemoryTable::decode(&bytes[..7]), 8, 7);

        // More regions than fds could carry, even with a huge count (no allocation from it).
        let nine = MemoryTable {
            regions: (0..9).map(|i| region(i * 0x1000, 0x1000)).collect(),
        };
        assert_bad_value(MemoryTable::decode(&nine.encode()));
        let mut huge = bytes.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_bad_value(MemoryTable::decode(&huge));

        // Overlapping regions.
        let overlap = MemoryTable {
            regions: vec![region(0, 0x2000), region(0x1000, 0x1000)],
        };
        assert_bad_value(MemoryTable::decode(&overlap.encode()));
        // Touching is not overlapping.
        let touching = MemoryTable {
            regions: vec![region(0, 0x1000), region(0x1000, 0x1000)],
        };
        assert!(MemoryTable::decode(&touching.encode()).is_ok());
        // A bad region inside a table is reported.
        let bad = MemoryTable {
            regions: vec![region(0, 0)],
        };
        assert_bad_value(MemoryTable::decode(&bad.encode()));
    }

    #[test]
    fn config_space_round_trip_and_limits() {
        let cfg = ConfigSpace {
            offset: 0x14,
            flags: 0,
            payload: vec![1, 2, 3, 4],
        };
        let bytes = cfg.encode();
        assert_eq!(bytes.len(), 16);
        assert_eq!(ConfigSpace::decode(&bytes).unwrap(), cfg);
        assert_eq!(ConfigSpace::request(0, 60).unwrap().encode().len(), 72);
        assert!(ConfigSpace::request(0, 257).is_err());

        assert_wrong_size(ConfigSpace::decode(&bytes[..15]), 16, 15);
        assert_wrong_size(ConfigSpace::decode(&bytes[..11]), 12, 11);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_wrong_size(ConfigSpace::decode(&longer), 16, 17);

        let mut too_big = bytes.clone();
        too_big[4..8].copy_from_slice(&257u32.to_le_bytes());
        assert_bad_value(ConfigSpace::decode(&too_big));
        let full = ConfigSpace {
            offset: 0,
            flags: 1,
            payload: vec![7; MAX_CONFIG_SIZE],
        };
        assert_eq!(ConfigSpace::decode(&full.encode()).unwrap(), full);

        let wrapping = ConfigSpace {
            offset: u32::MAX,
            flags: 0,
            payload: vec![0; 4],
        };
        assert_bad_value(ConfigSpace::decode(&wrapping.encode()));
        let flags = ConfigSpace {
            offset: 0,
            flags: 2,
            payload: vec![],
        };
        assert_bad_value(ConfigSpace::decode(&flags.encode()));
    }
}
