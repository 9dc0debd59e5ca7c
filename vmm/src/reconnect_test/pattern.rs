//! The host's check of the disk file: the test guest's block pattern (resources/guest/src/pattern.rs,
//! the contract; resources/guest/check-pattern.py is the other host copy), reimplemented here
//! because the guest is its own no_std workspace. The test below pins the values the guest's own
//! test pins, so the copies cannot drift apart unnoticed.
//!
//! Block `b`: le u64 "VMMBLK01", b, seed, seq; a xorshift64 stream seeded with
//! `seed ^ b*0x9E3779B97F4A7C15` (1 if 0); the FNV-1a-64 of the first 4088 bytes.

use std::io::Read;
use std::path::Path;

pub const BLOCK_SIZE: usize = 4096;
const MAGIC: u64 = 0x3130_4B4C_424D_4D56;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
const CHECKSUM_AT: usize = BLOCK_SIZE - 8;

fn xorshift64(state: &mut u64) -> u64 {
    let mut s = *state;
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    *state = s;
    s
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

/// The bytes block `block` holds when written with `seed` as number `seq`.
pub fn block_pattern(block: u64, seed: u64, seq: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    for (i, v) in [MAGIC, block, seed, seq].iter().enumerate() {
        buf[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    let mut state = match seed ^ block.wrapping_mul(GOLDEN) {
        0 => 1,
        s => s,
    };
    for chunk in buf[32..CHECKSUM_AT].chunks_exact_mut(8) {
        chunk.copy_from_slice(&xorshift64(&mut state).to_le_bytes());
    }
    let sum = fnv1a64(&buf[..CHECKSUM_AT]);
    buf[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
    buf
}

/// What a block of the file holds, when it is not what it should.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wrong {
    /// All zeros: no write of any pass reached it.
    Lost,
    /// A whole, valid block of another generation (seed): the last write was lost or an older
    /// one replayed after it.
    Stale { seed: u64 },
    /// Anything else: a partial write, another block's data, garbage.
    Torn,
}

impl std::fmt::Display for Wrong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wrong::Lost => write!(f, "lost (zeros)"),
            Wrong::Stale { seed } => write!(f, "stale (holds generation seed={seed})"),
            Wrong::Torn => write!(f, "torn (neither a whole block nor zeros)"),
        }
    }
}

/// One wrong block: its number and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrongBlock {
    pub block: u64,
    pub wrong: Wrong,
}

/// Classifies `buf` (block `block`, written as number `block` of its pass), expected to hold
/// one of the generations in `accepted` (seeds); `None` in `accepted` stands for zeros (a block
/// the guest had not reached when it stopped).
fn classify(buf: &[u8], block: u64, accepted: &[Option<u64>]) -> Option<Wrong> {
    let zeros = buf.iter().all(|&b| b == 0);
    if accepted.iter().any(|a| match a {
        None => zeros,
        Some(seed) => buf == block_pattern(block, *seed, block).as_slice(),
    }) {
        return None;
    }
    if zeros {
        return Some(Wrong::Lost);
    }
    let seed = u64_at(buf, 16);
    if buf == block_pattern(block, seed, block).as_slice() {
        return Some(Wrong::Stale { seed });
    }
    Some(Wrong::Torn)
}

/// The file's verdict: blocks 0..blocks each hold one of the `accepted` generations, every
/// byte past them is zero.
#[derive(Debug, Default)]
pub struct DiskCheck {
    pub wrong: Vec<WrongBlock>,
    /// Non-zero bytes past the written blocks.
    pub dirty_tail_bytes: u64,
}

pub fn check_disk(
    path: &Path,
    blocks: u64,
    accepted: &[Option<u64>],
) -> std::io::Result<DiskCheck> {
    let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?);
    let mut check = DiskCheck::default();
    let mut buf = vec![0u8; BLOCK_SIZE];
    for block in 0..blocks {
        file.read_exact(&mut buf)?;
        if let Some(wrong) = classify(&buf, block, accepted) {
            check.wrong.push(WrongBlock { block, wrong });
        }
    }
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        check.dirty_tail_bytes += buf[..n].iter().filter(|&&b| b != 0).count() as u64;
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values resources/guest/src/pattern.rs `matches_the_host_checker` pins.
    #[test]
    fn matches_the_guests_pattern() {
        let buf = block_pattern(0, 1, 0);
        assert_eq!(&buf[0..8], b"VMMBLK01");
        assert_eq!(u64_at(&buf, 32), 0x4082_2041);
        assert_eq!(u64_at(&buf, 4080), 0xd4eb_461f_b50f_12a5);
        assert_eq!(u64_at(&buf, 4088), 0x79bb_fe82_1b58_82d7);
        let buf = block_pattern(12345, 0xdead_beef, 7);
        assert_eq!(u64_at(&buf, 32), 0xbb19_fc2b_72ab_169e);
        assert_eq!(u64_at(&buf, 4080), 0x3fbc_43af_769c_d15e);
        assert_eq!(u64_at(&buf, 4088), 0x89f4_0531_50e3_3eb9);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn classifies_lost_stale_and_torn_blocks() {
        assert_eq!(classify(&block_pattern(5, 9, 5), 5, &[Some(9)]), None);
        assert_eq!(
            classify(&block_pattern(5, 9, 5), 5, &[Some(8), Some(9)]),
            None
        );
        assert_eq!(
            classify(&[0u8; BLOCK_SIZE], 5, &[Some(9)]),
            Some(Wrong::Lost)
        );
        assert_eq!(classify(&[0u8; BLOCK_SIZE], 5, &[Some(9), None]), None);
        assert_eq!(
            classify(&block_pattern(5, 8, 5), 5, &[Some(9)]),
            Some(Wrong::Stale { seed: 8 })
        );
        let mut torn = block_pattern(5, 9, 5);
        torn[2048..].copy_from_slice(&block_pattern(5, 8, 5)[2048..]);
        assert_eq!(classify(&torn, 5, &[Some(9)]), Some(Wrong::Torn));
        assert_eq!(
            classify(&block_pattern(6, 9, 6), 5, &[Some(9)]),
            Some(Wrong::Torn)
        );
    }

    #[test]
    fn check_disk_names_wrong_blocks_and_a_dirty_tail() {
        let dir = std::env::temp_dir().join(format!("vmm-pattern-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk");
        let mut data = Vec::new();
        data.extend(block_pattern(0, 3, 0));
        data.extend(block_pattern(1, 2, 1));
        data.extend(vec![0u8; BLOCK_SIZE]);
        data.extend([0u8, 1, 0]);
        std::fs::write(&path, &data).unwrap();
        let check = check_disk(&path, 3, &[Some(3)]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            check.wrong,
            vec![
                WrongBlock {
                    block: 1,
                    wrong: Wrong::Stale { seed: 2 }
                },
                WrongBlock {
                    block: 2,
                    wrong: Wrong::Lost
                },
            ]
        );
        assert_eq!(check.dirty_tail_bytes, 1);
    }
}
