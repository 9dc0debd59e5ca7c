//! A hostile frontend shrinks its memory fd after SET_MEM_TABLE, then kicks a write: the real
//! `vmm blk-backend` process must survive (before the fix it died of SIGBUS, exit 135), fail the
//! write without writing anything, close that session, keep its fd count, and serve the next
//! frontend as if nothing happened.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use integration_tests::{
    guest_block_pattern, guest_elf, spawn_blk_backend, vmm_run, TempDir, WrittenRange,
};
use vhost_frontend::connection::{Frontend, MemoryRegionFd, VhostUserFrontend};
use vhost_frontend::wire::{MemoryRegion, VringAddr};

const RAM: u64 = 2 << 20;
/// Where the hostile frontend claims its RAM lives in its own address space.
const FRONTEND_VA: u64 = 0x7f00_0000_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x10000;
const STATUS: u64 = 0x12000;
/// The data page of the write: beyond the new end of the shrunk fd.
const DATA: u64 = 0x10_0000;
/// The block the hostile write aims at; it holds 0xee before and must after.
const TARGET_BLOCK: u64 = 100;

fn memfd(size: u64) -> std::fs::File {
    // SAFETY: a valid name; memfd_create has no other inputs. No MFD_ALLOW_SEALING: like QEMU's.
    let fd = unsafe { libc::memfd_create(c"hostile-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: just created, owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd has no memory inputs.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// One write request of one 4 KiB block, laid out in the memfd as a driver would.
fn lay_out_write(ram: &std::fs::File) {
    let w = |bytes: &[u8], at: u64| ram.write_all_at(bytes, at).unwrap();
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        d
    };
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    w(&desc(HEADER, 16, NEXT, 1), DESC);
    w(&desc(DATA, 4096, NEXT, 2), DESC + 16);
    w(&desc(STATUS, 1, WRITE, 0), DESC + 32);
    let mut header = Vec::new();
    header.extend_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&(TARGET_BLOCK * 8).to_le_bytes()); // sector
    w(&header, HEADER);
    w(&[0x5a; 4096], DATA);
    w(&[0xff], STATUS);
    // avail: flags 0, idx 0 (published later), ring[0] = head 0.
    w(&[0, 0, 0, 0, 0, 0], AVAIL);
}

/// avail.idx = 1: the request becomes visible to the backend.
fn publish(ram: &std::fs::File) {
    ram.write_all_at(&1u16.to_le_bytes(), AVAIL + 2).unwrap();
}

#[test]
fn a_frontend_that_shrinks_its_memory_fd_cannot_kill_the_backend() {
    let dir = TempDir::new("shrunk-memory");
    let image = dir.path("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image)
        .unwrap();
    file.set_len(16 << 20).unwrap();
    file.write_all_at(&[0xee; 4096], TARGET_BLOCK * 4096)
        .unwrap();
    let socket = dir.path("blk.sock");
    let mut backend = spawn_blk_backend(&dir, &socket, &image, &[]);
    let pid = backend.pid();
    let fds_before = fd_count(pid);

    {
        let mut fe = Frontend::connect(&socket).expect("connect");
        fe.set_reply_timeout(Some(Duration::from_secs(10))).unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features & ((1 << 32) | (1 << 30))).unwrap();
        let protocol = fe.get_protocol_features().unwrap();
        // MQ and REPLY_ACK: every request below waits for the backend to have done it.
        fe.set_protocol_features(protocol & 0b1001).unwrap();
        fe.set_owner().unwrap();
        let ram = memfd(RAM);
        lay_out_write(&ram);
        fe.set_mem_table(&[MemoryRegionFd {
            region: MemoryRegion {
                guest_phys_addr: 0,
                memory_size: RAM,
                userspace_addr: FRONTEND_VA,
                mmap_offset: 0,
            },
            fd: ram.as_fd(),
        }])
        .unwrap();
        fe.set_vring_num(0, 8).unwrap();
        fe.set_vring_base(0, 0).unwrap();
        fe.set_vring_addr(&VringAddr {
            index: 0,
            flags: 0,
            desc_user_addr: FRONTEND_VA + DESC,
            used_user_addr: FRONTEND_VA + USED,
            avail_user_addr: FRONTEND_VA + AVAIL,
            log_guest_addr: 0,
        })
        .unwrap();
        let kick = eventfd();
        let call = eventfd();
        fe.set_vring_kick(0, kick.as_fd()).unwrap();
        fe.set_vring_call(0, call.as_fd()).unwrap();
        fe.set_vring_enable(0, true).unwrap();

        // The hostile part: the data page vanishes, then the request is published and the
        // doorbell rings. (Published earlier, a started ring could serve it before the shrink.)
        ram.set_len(0x8_0000).unwrap();
        publish(&ram);
        let one = 1u64;
        // SAFETY: writing 8 bytes from a local to our own eventfd.
        let n = unsafe { libc::write(kick.as_fd().as_raw_fd(), (&one as *const u64).cast(), 8) };
        assert_eq!(n, 8);

        // The backend ends this session: the next request finds the connection closed.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if fe.get_queue_num().is_err() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the backend kept the session of a frontend whose memory vanished; its log:\n{}",
                backend.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    backend.assert_running();
    let log = backend.log();
    assert!(log.contains("shrank under the session"), "{log}");
    let mut block = vec![0u8; 4096];
    file.read_exact_at(&mut block, TARGET_BLOCK * 4096).unwrap();
    assert!(
        block.iter().all(|b| *b == 0xee),
        "the write from vanished memory reached the disk"
    );
    // Every fd of the session is closed again (a bounded wait: cleanup runs after the hang-up).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fd_count(pid) != fds_before {
        assert!(
            Instant::now() < deadline,
            "fd count {} after the session, {fds_before} before",
            fd_count(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The next, well-behaved frontend is served as usual.
    let blk = format!("socket={}", socket.display());
    let o = vmm_run(
        &[
            "--kernel",
            guest_elf().to_str().unwrap(),
            "--blk",
            &blk,
            "--cmdline",
            "blk-write-verify blocks=16 seed=5",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    backend.assert_running();
    let range = WrittenRange {
        start: 0,
        blocks: 16,
        seed: 5,
    };
    for i in 0..range.blocks {
        file.read_exact_at(&mut block, (range.start + i) * 4096)
            .unwrap();
        assert_eq!(block, guest_block_pattern(range.start + i, range.seed, i));
    }
    file.read_exact_at(&mut block, TARGET_BLOCK * 4096).unwrap();
    assert!(block.iter().all(|b| *b == 0xee));
}
