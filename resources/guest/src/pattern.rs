//! The block pattern of `blk-write-verify`, as the test-guest contract defines
//! it (resources/guest/check-pattern.py checks the same bytes on the host).
//!
//! Block `b` (4096 bytes at byte offset b*4096):
//! - bytes 0..32: le u64 MAGIC, le u64 b, le u64 seed, le u64 seq (the order
//!   in which the block was written, from 0);
//! - bytes 32..4088: xorshift64 stream seeded with seed ^ (b * GOLDEN) (1 if
//!   that is 0), each step `s ^= s<<13; s ^= s>>7; s ^= s<<17`, emitting the 8
//!   bytes of s little-endian;
//! - bytes 4088..4096: le u64 FNV-1a-64 of bytes 0..4088.

pub const BLOCK_SIZE: usize = 4096;
/// "VMMBLK01" read as a little-endian u64.
pub const MAGIC: u64 = 0x3130_4B4C_424D_4D56;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const HEADER_LEN: usize = 32;
const CHECKSUM_AT: usize = BLOCK_SIZE - 8;

/// One step of xorshift64 (Marsaglia), also used for the bench's random
/// block numbers.
pub fn xorshift64(state: &mut u64) -> u64 {
    let mut s = *state;
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    *state = s;
    s
}

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn payload_seed(block: u64, seed: u64) -> u64 {
    match seed ^ block.wrapping_mul(GOLDEN) {
        0 => 1,
        s => s,
    }
}

fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// Write the pattern of `block` into `buf`.
pub fn fill_block(buf: &mut [u8; BLOCK_SIZE], block: u64, seed: u64, seq: u64) {
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&seed.to_le_bytes());
    buf[24..32].copy_from_slice(&seq.to_le_bytes());
    let mut state = payload_seed(block, seed);
    for chunk in buf[HEADER_LEN..CHECKSUM_AT].chunks_exact_mut(8) {
        chunk.copy_from_slice(&xorshift64(&mut state).to_le_bytes());
    }
    let sum = fnv1a64(&buf[..CHECKSUM_AT]);
    buf[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
}

/// Why a block read back does not hold the expected pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Magic {
        found: u64,
    },
    BlockNumber {
        found: u64,
    },
    Seed {
        found: u64,
    },
    Sequence {
        expected: u64,
        found: u64,
    },
    /// First payload byte offset that differs.
    Payload {
        offset: usize,
    },
    Checksum {
        expected: u64,
        found: u64,
    },
}

impl core::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Mismatch::Magic { found } => write!(f, "bad magic {found:#018x}"),
            Mismatch::BlockNumber { found } => write!(f, "header names block {found}"),
            Mismatch::Seed { found } => write!(f, "header names seed {found}"),
            Mismatch::Sequence { expected, found } => {
                write!(f, "sequence {found}, expected {expected}")
            }
            Mismatch::Payload { offset } => write!(f, "payload differs at byte {offset}"),
            Mismatch::Checksum { expected, found } => {
                write!(f, "checksum {found:#018x}, expected {expected:#018x}")
            }
        }
    }
}

/// Check that `buf` holds the pattern of `block` written as number `seq`.
pub fn check_block(
    buf: &[u8; BLOCK_SIZE],
    block: u64,
    seed: u64,
    seq: u64,
) -> Result<(), Mismatch> {
    let found = read_u64(buf, 0);
    if found != MAGIC {
        return Err(Mismatch::Magic { found });
    }
    let found = read_u64(buf, 8);
    if found != block {
        return Err(Mismatch::BlockNumber { found });
    }
    let found = read_u64(buf, 16);
    if found != seed {
        return Err(Mismatch::Seed { found });
    }
    let found = read_u64(buf, 24);
    if found != seq {
        return Err(Mismatch::Sequence {
            expected: seq,
            found,
        });
    }
    let mut state = payload_seed(block, seed);
    for (i, chunk) in buf[HEADER_LEN..CHECKSUM_AT].chunks_exact(8).enumerate() {
        let expected = xorshift64(&mut state).to_le_bytes();
        if let Some(j) = chunk.iter().zip(expected.iter()).position(|(a, b)| a != b) {
            return Err(Mismatch::Payload {
                offset: HEADER_LEN + i * 8 + j,
            });
        }
    }
    let expected = fnv1a64(&buf[..CHECKSUM_AT]);
    let found = read_u64(buf, CHECKSUM_AT);
    if found != expected {
        return Err(Mismatch::Checksum { expected, found });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn xorshift64_first_step_from_one() {
        let mut s = 1;
        // 1 ^ 1<<13 = 0x2001; ^ >>7 = 0x2001 ^ 0x40 = 0x2041; ^ <<17 = 0x2041 ^ 0x40820000.
        assert_eq!(xorshift64(&mut s), 0x4082_2041);
        assert_eq!(s, 0x4082_2041);
    }

    #[test]
    fn header_fields_are_little_endian() {
        let mut buf = [0u8; BLOCK_SIZE];
        fill_block(&mut buf, 7, 1, 3);
        assert_eq!(&buf[0..8], b"VMMBLK01");
        assert_eq!(read_u64(&buf, 8), 7);
        assert_eq!(read_u64(&buf, 16), 1);
        assert_eq!(read_u64(&buf, 24), 3);
        let mut state = payload_seed(7, 1);
        assert_eq!(read_u64(&buf, 32), xorshift64(&mut state));
    }

    #[test]
    fn filled_block_checks_and_each_corruption_is_named() {
        let mut buf = [0u8; BLOCK_SIZE];
        fill_block(&mut buf, 42, 9, 5);
        assert_eq!(check_block(&buf, 42, 9, 5), Ok(()));
        assert_eq!(
            check_block(&buf, 43, 9, 5),
            Err(Mismatch::BlockNumber { found: 42 })
        );
        assert_eq!(
            check_block(&buf, 42, 8, 5),
            Err(Mismatch::Seed { found: 9 })
        );
        assert_eq!(
            check_block(&buf, 42, 9, 6),
            Err(Mismatch::Sequence {
                expected: 6,
                found: 5
            })
        );
        let mut bad = buf;
        bad[1000] ^= 1;
        assert_eq!(
            check_block(&bad, 42, 9, 5),
            Err(Mismatch::Payload { offset: 1000 })
        );
        let mut bad = buf;
        bad[4095] ^= 1;
        assert!(matches!(
            check_block(&bad, 42, 9, 5),
            Err(Mismatch::Checksum { .. })
        ));
        let mut bad = buf;
        bad[0] = 0;
        assert!(matches!(
            check_block(&bad, 42, 9, 5),
            Err(Mismatch::Magic { .. })
        ));
    }

    /// Values computed by check-pattern.py, the host's independent
    /// implementation: the two must never drift apart.
    #[test]
    fn matches_the_host_checker() {
        let mut buf = [0u8; BLOCK_SIZE];
        fill_block(&mut buf, 0, 1, 0);
        assert_eq!(read_u64(&buf, 32), 0x4082_2041);
        assert_eq!(read_u64(&buf, 4080), 0xd4eb_461f_b50f_12a5);
        assert_eq!(read_u64(&buf, 4088), 0x79bb_fe82_1b58_82d7);
        fill_block(&mut buf, 12345, 0xdead_beef, 7);
        assert_eq!(read_u64(&buf, 32), 0xbb19_fc2b_72ab_169e);
        assert_eq!(read_u64(&buf, 4080), 0x3fbc_43af_769c_d15e);
        assert_eq!(read_u64(&buf, 4088), 0x89f4_0531_50e3_3eb9);
    }

    #[test]
    fn zero_payload_seed_becomes_one() {
        // seed == 0 and block == 0 make the xorshift state 0, which would
        // emit zeros forever; the contract replaces it with 1.
        assert_eq!(payload_seed(0, 0), 1);
        let mut buf = [0u8; BLOCK_SIZE];
        fill_block(&mut buf, 0, 0, 0);
        assert_eq!(read_u64(&buf, 32), 0x4082_2041);
    }
}
