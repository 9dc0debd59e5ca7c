//! virtio-blk requests from a hostile guest: the fuzz input becomes a split virtqueue (descriptor
//! table, avail ring, and the bytes the descriptors point at) in a small two-region guest memory,
//! and every available chain goes through what the backend's queue worker does with it:
//! `BlkRequest::parse`, `BlkRequest::execute` against a small disk image, `add_used`.
//!
//! Properties checked, per request:
//! - no panic (ASan: no out-of-bounds access, in our code or below it);
//! - a written status byte is one of OK / IOERR / UNSUPP, is really in guest memory at the status
//!   address when `execute` returns, and a request that was refused at parse time never says OK;
//! - the used length is 0 without a status byte, and otherwise at least 1 and never more than the
//!   chain's device-writable bytes;
//! - the disk never changes size, the bytes past its last whole sector (not part of the disk)
//!   never change, and a read-only disk never changes at all.
#![no_main]

use std::os::unix::fs::FileExt;

use devices::blk::disk::{Disk, SECTOR_SIZE};
use devices::blk::request::{BlkRequest, RequestError};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: 64 KiB at 0, then a 4 KiB hole, then 4 KiB. A buffer that spans the hole or runs
/// off the end must fail cleanly.
const LOW_RAM: (u64, usize) = (0, 0x10000);
const HIGH_RAM: (u64, usize) = (0x11000, 0x1000);
/// Addresses the "near memory" descriptor mode produces: all of RAM, the hole, and a bit beyond.
const NEAR_SPAN: u64 = 0x12000 + 0x100;
/// The rings sit at fixed places; everything from DATA on is fuzz bytes.
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const DATA: u64 = 0x300;
/// Largest ring built here (16 descriptors fill DESC_TABLE..AVAIL_RING exactly).
const MAX_RING_LOG2: u32 = 4;

const DISK_SECTORS: u64 = 16;
/// Bytes after the last whole sector: never exposed to the guest, so never written.
const DISK_TAIL: usize = 100;
const TAIL_CANARY: u8 = 0xa5;

const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPP: u8 = 2;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

/// A descriptor address: mostly near the start of the fuzz bytes (where the fuzzer can place a
/// header or an indirect table) or anywhere near guest RAM; sometimes any 64-bit value.
fn address(u: &mut Unstructured<'_>) -> Result<u64> {
    let raw: u64 = u.arbitrary()?;
    Ok(match u.int_in_range(0..=3)? {
        0 => raw,
        1 => raw % NEAR_SPAN,
        _ => DATA + raw % 0x1000,
    })
}

/// A descriptor length: the shapes a request is made of (a 16-byte header, whole sectors, both
/// in one descriptor, a 1-byte status, a 20-byte id buffer), or anything up to a few sectors, or
/// any 32-bit value.
fn length(u: &mut Unstructured<'_>) -> Result<u32> {
    let raw: u32 = u.arbitrary()?;
    Ok(match u.int_in_range(0..=8)? {
        0 => raw,
        1 | 2 => raw % 0x1800,
        3 => 16,
        4 => 1,
        5 => 20,
        6 => 16 + 512 * (raw % 4),
        _ => 512 * (raw % 5),
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let ring_size: u16 = 1 << u.int_in_range(0..=MAX_RING_LOG2)?;
    let readonly: bool = u.arbitrary()?;
    let next_avail: u16 = u.arbitrary()?;

    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(LOW_RAM.0), LOW_RAM.1),
        (GuestAddress(HIGH_RAM.0), HIGH_RAM.1),
    ])
    .expect("guest memory");

    // The descriptor table: every entry from the input (addr, len, flags, next).
    for i in 0..u64::from(ring_size) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&address(u)?.to_le_bytes());
        raw[8..12].copy_from_slice(&length(u)?.to_le_bytes());
        raw[12..14].copy_from_slice(&u.arbitrary::<u16>()?.to_le_bytes());
        raw[14..16].copy_from_slice(&u.arbitrary::<u16>()?.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(DESC_TABLE + 16 * i))
            .expect("descriptor table is in RAM");
    }
    // The avail ring: flags, idx, ring[size]. idx mostly says "n new chains"; sometimes it is
    // anything (an impossible count must be refused by the queue, not crash the backend).
    let published: u16 = if u.ratio(1, 8)? {
        u.arbitrary()?
    } else {
        next_avail.wrapping_add(u.int_in_range(0..=ring_size)?)
    };
    let mut avail = vec![0u8; 4 + 2 * usize::from(ring_size)];
    avail[2..4].copy_from_slice(&published.to_le_bytes());
    for slot in avail[4..].chunks_exact_mut(2) {
        slot.copy_from_slice(&(u.arbitrary::<u16>()? % ring_size.saturating_mul(2)).to_le_bytes());
    }
    mem.write_slice(&avail, GuestAddress(AVAIL_RING))
        .expect("avail ring is in RAM");
    // What the descriptors point at: request headers, data, indirect tables.
    let rest = u.bytes(u.len().min(LOW_RAM.1 - DATA as usize))?;
    mem.write_slice(rest, GuestAddress(DATA))
        .expect("data is in RAM");

    let disk_file = fuzz_support::memfd(c"fuzz-disk", DISK_SECTORS * SECTOR_SIZE);
    let mut disk_bytes: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE).map(|i| i as u8).collect();
    disk_bytes.extend(std::iter::repeat_n(TAIL_CANARY, DISK_TAIL));
    disk_file.write_all_at(&disk_bytes, 0).expect("disk image");
    let disk = Disk::from_file(
        disk_file.try_clone().expect("dup disk fd"),
        readonly,
        *b"fuzz-disk-0123456789",
    )
    .expect("disk");
    assert_eq!(disk.capacity_sectors(), DISK_SECTORS);

    let mut queue = Queue::new(ring_size).expect("ring size");
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .expect("desc table address");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .expect("avail ring address");
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .expect("used ring address");
    queue.set_ready(true);
    queue.set_next_avail(next_avail);
    assert!(queue.is_valid(&mem));

    // Like the queue worker: pop every available chain, then parse and execute each.
    let chains: Vec<_> = match queue.iter(&mem) {
        Ok(iter) => iter.collect(),
        // The avail index claims more chains than the ring holds: the worker stops the queue.
        Err(_) => return Ok(()),
    };
    assert!(chains.len() <= usize::from(ring_size));
    for chain in chains {
        let writable_bytes: u64 = chain
            .clone()
            .filter(|d| d.is_write_only())
            .map(|d| u64::from(d.len()))
            .sum();
        let request = BlkRequest::parse(chain);
        let completion = request.execute(&mem, &disk);
        assert_eq!(completion.head, request.head);
        match completion.status {
            None => assert_eq!(completion.used_len, 0, "no status byte, yet a used length"),
            Some(status) => {
                assert!(
                    matches!(status, STATUS_OK | STATUS_IOERR | STATUS_UNSUPP),
                    "status byte {status}"
                );
                let at = request
                    .status_addr
                    .expect("a status without a status address");
                let written: u8 = mem.read_obj(at).expect("status address is in RAM");
                assert_eq!(written, status, "status byte in guest memory");
                assert!(completion.used_len >= 1);
                assert!(
                    u64::from(completion.used_len) <= writable_bytes,
                    "used length {} exceeds the chain's {writable_bytes} writable bytes",
                    completion.used_len
                );
                match &request.body {
                    Err(RequestError::Unsupported(_)) => assert_eq!(status, STATUS_UNSUPP),
                    Err(_) => assert_eq!(status, STATUS_IOERR),
                    Ok(_) => {}
                }
            }
        }
        // Errors here (a used ring the guest broke) are the worker's to log; no panic.
        let _ = queue.add_used(&mem, completion.head, completion.used_len);
    }

    let size = disk_file.metadata().expect("stat disk").len();
    assert_eq!(size, disk_bytes.len() as u64, "the disk image changed size");
    let mut after = vec![0u8; disk_bytes.len()];
    disk_file.read_exact_at(&mut after, 0).expect("read disk");
    let sectors = (DISK_SECTORS * SECTOR_SIZE) as usize;
    assert_eq!(
        after[sectors..],
        disk_bytes[sectors..],
        "bytes past the last sector were written"
    );
    if readonly {
        assert!(after == disk_bytes, "a read-only disk was modified");
    }
    Ok(())
}
