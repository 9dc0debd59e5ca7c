//! The virtio-blk backend through the protocol: a fake frontend (raw wire messages) drives a
//! `BlkBackend` over a socketpair or its listening socket, and the disk image and guest memory are
//! checked byte for byte. The server's behaviour against a device of its own is tested in
//! `vhost_user_server::tests`.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vhost_frontend::features::{
    bit_mask, has, PROTOCOL_INFLIGHT_SHMFD, VHOST_USER_F_PROTOCOL_FEATURES,
};
use vhost_frontend::wire::{
    recv_message, send_message, ConfigSpace, Header, InflightDescription, MemoryRegion,
    MemoryTable, Request, U64Payload, VringState, WireError, FLAG_NEED_REPLY, VERSION,
};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_RO, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{BlkBackend, BlkBackendConfig, BlkError, OFFERED_PROTOCOL_FEATURES};
use super::config::CONFIG_SPACE_SIZE;
use crate::test_util::{
    fds_referring_to, guest_memory, memfds_named, request_header, sealed_memfd, temp_path,
    wait_readable, TestRing, INFLIGHT_MEMFD_LOCK,
};
use crate::vhost_user_server::inflight_region::MEMFD_NAME;
use crate::vhost_user_server::test_frontend::{start_queue, wait_call, FakeFrontend, FRONTEND_VA};
use crate::vhost_user_server::ServeError;

fn disk_image(sectors: u64) -> PathBuf {
    let path = temp_path("disk.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(sectors * 512).unwrap();
    path
}

fn spawn(path: &Path, readonly: bool) -> (FakeFrontend, JoinHandle<Result<(), BlkError>>) {
    let (stream, handle) = BlkBackend::spawn_in_process(BlkBackendConfig {
        path: path.to_path_buf(),
        readonly,
        num_queues: 2,
        queue_size: 128,
        direct: false,
        engine: crate::blk::backend::IoEngine::default(),
    })
    .unwrap();
    (FakeFrontend { stream }, handle)
}

fn handshake(fe: &FakeFrontend) {
    let features = fe.get_u64(Request::GetFeatures);
    assert!(has(features, 32), "VERSION_1 offered");
    assert!(has(features, VHOST_USER_F_PROTOCOL_FEATURES));
    assert!(has(features, 29), "EVENT_IDX offered");
    // These tests' driver waits for an interrupt per request and keeps no used_event: it acks
    // everything but EVENT_IDX (queue_worker's tests cover EVENT_IDX).
    let features = features & !(1 << 29);
    fe.send(
        Request::SetFeatures,
        &U64Payload(features).encode(),
        &[],
        false,
    );
    let protocol = fe.get_u64(Request::GetProtocolFeatures);
    assert_eq!(protocol, OFFERED_PROTOCOL_FEATURES);
    fe.send(
        Request::SetProtocolFeatures,
        &U64Payload(protocol).encode(),
        &[],
        false,
    );
    assert_eq!(fe.acked(Request::SetOwner, &[], &[]), 0);
    assert_eq!(fe.get_u64(Request::GetQueueNum), 2);
}

/// write fails without touching the disk, and the session ends saying why.
#[test]
fn a_memory_fd_shrunk_under_the_session_ends_it_and_writes_nothing() {
    let path = disk_image(64);
    std::fs::write(&path, vec![0xeeu8; 64 * 512]).unwrap();
    let (fe, backend) = spawn(&path, false);
    handshake(&fe);
    let ram_size = 0x20_0000;
    let (mem, ram) = guest_memory(ram_size);
    let g = mem.guest().clone();
    let mut ring = TestRing::new(128, 0x1000);
    let (kick, _call) = start_queue(&fe, &ram, ram_size, &ring);
    g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 0), GuestAddress(0x10000))
        .unwrap();
    g.write_slice(&[0x5a; 4096], GuestAddress(0x10_0000))
        .unwrap();
    // The data page goes; the rings and the header stay. Then the request is published
    // (published first, the running ring could serve it before the shrink).
    ram.set_len(0x8_0000).unwrap();
    ring.add_chain(
        &g,
        &[
            (0x10000, 16, false),
            (0x10_0000, 4096, false),
            (0x12000, 1, true),
        ],
    );
    kick.write(1).unwrap();
    let end = backend.join().expect("backend thread");
    assert!(
        matches!(
            end,
            Err(BlkError::Serve(ServeError::MemoryVanished {
                region: 0,
                ..
            }))
        ),
        "{end:?}"
    );
    let disk = std::fs::read(&path).unwrap();
    assert!(disk.iter().all(|b| *b == 0xee), "the disk was written");
    // The frontend's end sees the connection closed.
    assert!(recv_message(&fe.stream).is_err());
}

fn inflight_backend_memfds() -> usize {
    memfds_named(MEMFD_NAME.to_str().unwrap())
}

#[test]
fn get_inflight_fd_hands_out_a_sealed_region_and_keeps_nothing() {
    let _lock = INFLIGHT_MEMFD_LOCK.lock().unwrap();
    let path = disk_image(8);
    let (fe, backend) = spawn(&path, false);
    handshake(&fe);
    for _ in 0..3 {
        // Repeated GETs: each a new region; none stays open in the backend.
        let (header, payload, fds) = fe.get_inflight(2, 128, false);
        assert!(header.is_reply());
        assert_eq!(header.request, Request::GetInflightFd.code());
        let reply = InflightDescription::decode(&payload).unwrap();
        assert_eq!(
            reply,
            InflightDescription {
                mmap_size: 2 * 2112,
                mmap_offset: 0,
                num_queues: 2,
                queue_size: 128,
            }
        );
        assert_eq!(fds.len(), 1, "exactly one fd");
        let file = std::fs::File::from(fds.into_iter().next().unwrap());
        assert_eq!(file.metadata().unwrap().len(), 2 * 2112);
        assert!(crate::vhost_user_server::memory_faults::sealed_against_shrinking(file.as_fd()));
        assert_eq!(fe.get_u64(Request::GetQueueNum), 2);
        assert_eq!(inflight_backend_memfds(), 1, "only the copy we received");
    }
    assert_eq!(inflight_backend_memfds(), 0);
    drop(fe);
    backend.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// Every hostile GET/SET value gets its failure reply (a GET: no buffer, mmap_size 0 and no fd;
/// a SET: a failure ack); the session stays usable, and no fd the backend created or received
/// stays open.
#[test]
fn hostile_inflight_messages_get_failure_acks_and_leak_no_fd() {
    let _lock = INFLIGHT_MEMFD_LOCK.lock().unwrap();
    let path = disk_image(64);
    let (fe, backend) = spawn(&path, false);
    handshake(&fe);
    for (queues, size) in [
        (0, 128),
        (3, 128),
        (u16::MAX, 128),
        (1, 0),
        (1, 100),
        (1, 256),
        (1, u16::MAX),
    ] {
        let (header, payload, fds) = fe.get_inflight(queues, size, true);
        assert_eq!(header.request, Request::GetInflightFd.code());
        assert_eq!(
            InflightDescription::decode(&payload).unwrap().mmap_size,
            0,
            "GET {queues}x{size}: no buffer"
        );
        assert!(fds.is_empty());
        assert_eq!(inflight_backend_memfds(), 0, "GET {queues}x{size}");
    }
    let good = InflightDescription {
        mmap_size: 2112,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 128,
    };
    let region = || sealed_memfd("fe-inflight", &[0u8; 8192]);
    let (sock, _peer) = UnixStream::pair().unwrap();
    let cases: Vec<(&str, InflightDescription, std::fs::File)> = vec![
        (
            "no queues",
            InflightDescription {
                num_queues: 0,
                ..good
            },
            region(),
        ),
        (
            "more queues than the device",
            InflightDescription {
                num_queues: 3,
                ..good
            },
            region(),
        ),
        (
            "65535 queues",
            InflightDescription {
                num_queues: u16::MAX,
                ..good
            },
            region(),
        ),
        (
            "queue size 0",
            InflightDescription {
                queue_size: 0,
                ..good
            },
            region(),
        ),
        (
            "queue size not a power of two",
            InflightDescription {
                queue_size: 96,
                ..good
            },
            region(),
        ),
        (
            "queue size 65535",
            InflightDescription {
                queue_size: u16::MAX,
                ..good
            },
            region(),
        ),
        (
            "mmap_size too small",
            InflightDescription {
                mmap_size: 2048,
                ..good
            },
            region(),
        ),
        (
            "offset + size overflows",
            InflightDescription {
                mmap_offset: 4096,
                mmap_size: u64::MAX,
                ..good
            },
            region(),
        ),
        (
            "offset past the file",
            InflightDescription {
                mmap_offset: 1 << 20,
                ..good
            },
            region(),
        ),
        (
            "an unsealed memfd",
            good,
            crate::test_util::memfd("fe-unsealed", 8192),
        ),
    ];
    for (what, description, file) in &cases {
        assert_ne!(fe.set_inflight(description, file), 0, "{what}");
        assert_eq!(
            fds_referring_to(file),
            1,
            "{what}: the received fd was kept"
        );
    }
    // Not a file at all: a socket.
    assert_ne!(fe.set_inflight(&good, &sock), 0, "a socket");
    assert_eq!(fds_referring_to(&sock), 1, "the received socket was kept");
    // The session is still usable: a good region, a ring, a request through both.
    let memfd = region();
    assert_eq!(fe.set_inflight(&good, &memfd), 0);
    assert_eq!(fds_referring_to(&memfd), 1, "mapped, and the fd closed");
    let ram_size = 0x20_0000;
    let (mem, ram) = guest_memory(ram_size);
    let g = mem.guest().clone();
    let mut ring = TestRing::new(128, 0x1000);
    let (kick, call) = start_queue(&fe, &ram, ram_size, &ring);
    g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 1), GuestAddress(0x10000))
        .unwrap();
    ring.add_chain(
        &g,
        &[
            (0x10000, 16, false),
            (0x11000, 512, false),
            (0x12000, 1, true),
        ],
    );
    kick.write(1).unwrap();
    wait_call(&call);
    assert_eq!(ring.used_idx(&g), 1);
    // Without NEED_REPLY a bad SET closes this connection.
    fe.send(
        Request::SetInflightFd,
        &InflightDescription {
            num_queues: 9,
            ..good
        }
        .encode(),
        &[memfd.as_fd()],
        false,
    );
    assert!(matches!(
        recv_message(&fe.stream),
        Err(WireError::PeerGone(_))
    ));
    assert!(matches!(
        backend.join().unwrap(),
        Err(BlkError::Serve(ServeError::Protocol(_)))
    ));
    assert_eq!(fds_referring_to(&memfd), 1);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn inflight_messages_need_the_protocol_feature() {
    let path = disk_image(8);
    let (fe, backend) = spawn(&path, false);
    let features = fe.get_u64(Request::GetFeatures);
    fe.send(
        Request::SetFeatures,
        &U64Payload(features).encode(),
        &[],
        false,
    );
    let without = OFFERED_PROTOCOL_FEATURES & !bit_mask(PROTOCOL_INFLIGHT_SHMFD);
    assert_eq!(
        fe.acked(
            Request::SetProtocolFeatures,
            &U64Payload(without).encode(),
            &[]
        ),
        0
    );
    let (_, payload, fds) = fe.get_inflight(1, 128, true);
    let reply = InflightDescription::decode(&payload).unwrap();
    assert_eq!((reply.mmap_size, fds.len()), (0, 0), "no buffer");
    let memfd = sealed_memfd("fe-inflight", &[0u8; 4096]);
    let description = InflightDescription {
        mmap_size: 2112,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 128,
    };
    assert_ne!(fe.set_inflight(&description, &memfd), 0);
    drop(fe);
    backend.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// Guest RAM with a 128-entry ring holding one request, head 0, not yet seen by any backend:
/// write 512 bytes of `byte` to sector `sector` (header at 0x10000, data at 0x11000, status at
/// 0x12000).
fn one_write_queued(
    sector: u64,
    byte: u8,
) -> (
    u64,
    crate::vhost_user_server::memory::MappedMemory,
    std::fs::File,
    TestRing,
) {
    let ram_size = 0x20_0000;
    let (mem, ram) = guest_memory(ram_size);
    let g = mem.guest().clone();
    let mut ring = TestRing::new(128, 0x1000);
    g.write_slice(
        &request_header(VIRTIO_BLK_T_OUT, sector),
        GuestAddress(0x10000),
    )
    .unwrap();
    g.write_slice(&[byte; 512], GuestAddress(0x11000)).unwrap();
    let head = ring.add_chain(
        &g,
        &[
            (0x10000, 16, false),
            (0x11000, 512, false),
            (0x12000, 1, true),
        ],
    );
    assert_eq!(head, 0);
    (ram_size, mem, ram, ring)
}

/// The restart case: a fresh backend gets SET_INFLIGHT_FD with no GET before it, on a region
/// a killed backend left with head 0 inflight, and SET_VRING_BASE 0 (the used idx, as QEMU
/// sends after a crash) while the avail ring already says 1. The request runs once: resubmitted
/// from the region, not popped again.
#[test]
fn a_restarted_backend_resubmits_what_the_region_records() {
    let path = disk_image(64);
    let (fe, backend) = spawn(&path, false);
    handshake(&fe);
    let (ram_size, mem, ram, ring) = one_write_queued(3, 0x3c);
    let g = mem.guest().clone();
    // The dead backend's record: version 1, desc_num 128, used_idx 0, desc 0 inflight.
    let mut bytes = vec![0u8; 4096];
    bytes[8..10].copy_from_slice(&1u16.to_le_bytes());
    bytes[10..12].copy_from_slice(&128u16.to_le_bytes());
    bytes[16] = 1;
    bytes[24..32].copy_from_slice(&5u64.to_le_bytes());
    let region = sealed_memfd("fe-inflight", &bytes);
    let description = InflightDescription {
        mmap_size: 4096,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 128,
    };
    assert_eq!(fe.set_inflight(&description, &region), 0);
    let (kick, call) = start_queue(&fe, &ram, ram_size, &ring);
    wait_call(&call);
    assert_eq!(ring.used_idx(&g), 1);
    assert_eq!(ring.used_elem(&g, 0), (0, 1));
    kick.write(1).unwrap();
    assert!(
        !wait_readable(&call, Duration::from_millis(100)),
        "ran twice"
    );
    assert_eq!(ring.used_idx(&g), 1);
    assert_eq!(g.read_obj::<u8>(GuestAddress(0x12000)).unwrap(), 0);
    assert_eq!(
        &std::fs::read(&path).unwrap()[3 * 512..4 * 512],
        &[0x3c; 512]
    );
    // GET_VRING_BASE reports where popping resumes: past the resubmitted request.
    fe.send(
        Request::GetVringBase,
        &VringState { index: 0, num: 0 }.encode(),
        &[],
        false,
    );
    let base = VringState::decode(&fe.recv_reply(Request::GetVringBase)).unwrap();
    assert_eq!(base.num, 1);
    drop(fe);
    backend.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// QEMU sizes the inflight region by its queue-size property (128 by default) while a
/// virtio-mmio driver may set up a larger ring. Such a ring is served, untracked (with a
/// warning): refusing it would hang the guest, and writing past the region is out of bounds.
#[test]
fn a_ring_larger_than_the_inflight_region_is_served_untracked() {
    let path = disk_image(64);
    let (fe, backend) = spawn(&path, false);
    handshake(&fe);
    let (ram_size, mem, ram, ring) = one_write_queued(2, 0x5e);
    let g = mem.guest().clone();
    // A fresh region of 16 entries per queue, for a ring of 128.
    let bytes = vec![0u8; 4096];
    let region = sealed_memfd("fe-small-inflight", &bytes);
    let description = InflightDescription {
        mmap_size: 4096,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 16,
    };
    assert_eq!(fe.set_inflight(&description, &region), 0);
    let (_kick, call) = start_queue(&fe, &ram, ram_size, &ring);
    wait_call(&call);
    assert_eq!(ring.used_idx(&g), 1);
    assert_eq!(
        &std::fs::read(&path).unwrap()[2 * 512..3 * 512],
        &[0x5e; 512]
    );
    // Not a byte of the region was written (no entry can be recorded for this ring).
    let mut now = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&region, &mut now, 0).unwrap();
    assert!(now.iter().all(|&b| b == 0), "the region was written");
    drop(fe);
    backend.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn fake_frontend_writes_and_reads_through_the_protocol() {
    let path = disk_image(64);
    let (fe, backend) = spawn(&path, false);
    handshake(&fe);

    let config = fe.recv_config(0, CONFIG_SPACE_SIZE as u32);
    assert_eq!(&config[0..8], &64u64.to_le_bytes(), "capacity in sectors");

    let ram_size = 0x20_0000;
    let (mem, ram) = guest_memory(ram_size);
    let g = mem.guest().clone();
    let mut ring = TestRing::new(128, 0x1000);
    let (kick, call) = start_queue(&fe, &ram, ram_size, &ring);

    // Write 1 KiB at sector 2.
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 253) as u8).collect();
    g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 2), GuestAddress(0x10000))
        .unwrap();
    g.write_slice(&pattern, GuestAddress(0x11000)).unwrap();
    ring.add_chain(
        &g,
        &[
            (0x10000, 16, false),
            (0x11000, 1024, false),
            (0x12000, 1, true),
        ],
    );
    kick.write(1).unwrap();
    wait_call(&call);
    assert_eq!(ring.used_idx(&g), 1);
    assert_eq!(
        g.read_obj::<u8>(GuestAddress(0x12000)).unwrap(),
        0,
        "status OK"
    );
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(
        &on_disk[1024..2048],
        &pattern[..],
        "the file holds the written bytes"
    );

    // Read it back into other buffers.
    g.write_slice(&request_header(VIRTIO_BLK_T_IN, 2), GuestAddress(0x13000))
        .unwrap();
    ring.add_chain(
        &g,
        &[
            (0x13000, 16, false),
            (0x14000, 1024, true),
            (0x15000, 1, true),
        ],
    );
    kick.write(1).unwrap();
    wait_call(&call);
    let mut read_back = vec![0u8; 1024];
    g.read_slice(&mut read_back, GuestAddress(0x14000)).unwrap();
    assert_eq!(read_back, pattern);
    assert_eq!(ring.used_elem(&g, 1).1, 1025);

    // GET_VRING_BASE stops the ring and says where.
    fe.send(
        Request::GetVringBase,
        &VringState { index: 0, num: 0 }.encode(),
        &[],
        false,
    );
    let base = VringState::decode(&fe.recv_reply(Request::GetVringBase)).unwrap();
    assert_eq!(base, VringState { index: 0, num: 2 });

    // A stopped ring serves nothing until it gets a (new) kick fd; then it resumes.
    g.write_slice(&request_header(VIRTIO_BLK_T_IN, 0), GuestAddress(0x16000))
        .unwrap();
    ring.add_chain(
        &g,
        &[
            (0x16000, 16, false),
            (0x17000, 512, true),
            (0x18000, 1, true),
        ],
    );
    kick.write(1).unwrap();
    assert!(
        !wait_readable(&call, Duration::from_millis(100)),
        "stopped ring must not run"
    );
    assert_eq!(fe.vring(Request::SetVringBase, 0, 2), 0);
    let new_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(fe.vring_fd(Request::SetVringKick, 0, &new_kick), 0);
    wait_call(&call);
    assert_eq!(ring.used_idx(&g), 3);

    // The kick fd replaced while the ring runs: the old one no longer wakes the ring.
    let third_kick = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(fe.vring_fd(Request::SetVringKick, 0, &third_kick), 0);
    // A (re)started ring looks at the avail ring once on its own thread; let that pass so
    // only a kick can make it look again.
    std::thread::sleep(Duration::from_millis(50));
    ring.add_chain(
        &g,
        &[
            (0x16000, 16, false),
            (0x17000, 512, true),
            (0x18000, 1, true),
        ],
    );
    new_kick.write(1).unwrap();
    assert!(
        !wait_readable(&call, Duration::from_millis(100)),
        "old kick fd still served"
    );
    third_kick.write(1).unwrap();
    wait_call(&call);
    assert_eq!(ring.used_idx(&g), 4);

    drop(fe);
    backend
        .join()
        .unwrap()
        .expect("a hang-up ends the session with Ok");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_messages_get_failure_acks_and_the_session_goes_on() {
    let path = disk_image(8);
    let (fe, backend) = spawn(&path, false);
    handshake(&fe);

    // Unknown request code with NEED_REPLY.
    let header = Header {
        request: 99,
        flags: VERSION | FLAG_NEED_REPLY,
        size: 0,
    };
    send_message(&fe.stream, &header, &[], &[]).unwrap();
    let (reply, payload, _) = recv_message(&fe.stream).unwrap();
    assert_eq!(
        (reply.request, U64Payload::decode(&payload).unwrap().0),
        (99, 1)
    );

    assert_ne!(
        fe.vring(Request::SetVringNum, 7, 128),
        0,
        "queue index out of range"
    );
    assert_ne!(
        fe.vring(Request::SetVringNum, 0, 100),
        0,
        "not a power of two"
    );
    assert_ne!(
        fe.vring(Request::SetVringNum, 0, 256),
        0,
        "beyond queue_size"
    );
    assert_ne!(
        fe.vring(Request::SetVringBase, 0, 70000),
        0,
        "base beyond u16"
    );
    assert_ne!(
        fe.acked(
            Request::SetProtocolFeatures,
            &U64Payload(1 << 20).encode(),
            &[]
        ),
        0,
        "GET_VRING_BASE_INFLIGHT was not offered"
    );
    assert_ne!(
        fe.acked(Request::SetFeatures, &U64Payload(1 << 34).encode(), &[]),
        0
    );
    // A kick "eventfd" that is a plain file.
    let not_an_eventfd = crate::test_util::memfd("kick", 8);
    assert_ne!(fe.vring_fd(Request::SetVringKick, 0, &not_an_eventfd), 0);
    // A memory region larger than its fd.
    let ram = crate::test_util::memfd("ram", 0x1000);
    let table = MemoryTable {
        regions: vec![MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 0x10_0000,
            userspace_addr: FRONTEND_VA,
            mmap_offset: 0,
        }],
    };
    assert_ne!(
        fe.acked(Request::SetMemTable, &table.encode(), &[ram.as_fd()]),
        0
    );
    // Wrong fd count for the table (decode error, framing intact).
    assert_ne!(fe.acked(Request::SetMemTable, &table.encode(), &[]), 0);
    // Messages this backend does not do.
    assert_ne!(
        fe.acked(Request::SetStatus, &U64Payload(0xf).encode(), &[]),
        0
    );
    // GET_CONFIG outside the space: an empty reply; inside: the bytes.
    assert!(fe.recv_config(90, 10).is_empty());
    assert_eq!(fe.recv_config(34, 2), 2u16.to_le_bytes());
    // SET_CONFIG without NEED_REPLY is refused quietly; the session goes on.
    fe.send(
        Request::SetConfig,
        &ConfigSpace {
            offset: 0,
            flags: 0,
            payload: vec![1],
        }
        .encode(),
        &[],
        false,
    );
    assert_eq!(fe.get_u64(Request::GetQueueNum), 2);

    // Without NEED_REPLY, a bad message ends the session.
    fe.send(
        Request::SetVringNum,
        &VringState { index: 9, num: 128 }.encode(),
        &[],
        false,
    );
    assert!(matches!(
        recv_message(&fe.stream),
        Err(WireError::PeerGone(_))
    ));
    assert!(matches!(
        backend.join().unwrap(),
        Err(BlkError::Serve(ServeError::Protocol(_)))
    ));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn readonly_backend_offers_the_ro_bit() {
    let path = disk_image(8);
    let (fe, backend) = spawn(&path, true);
    assert!(has(fe.get_u64(Request::GetFeatures), VIRTIO_BLK_F_RO));
    drop(fe);
    backend.join().unwrap().unwrap();
    let (fe, backend) = spawn(&path, false);
    assert!(!has(fe.get_u64(Request::GetFeatures), VIRTIO_BLK_F_RO));
    drop(fe);
    backend.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn open_refuses_bad_configurations() {
    let path = disk_image(8);
    let cfg = |num_queues, queue_size| BlkBackendConfig {
        path: path.clone(),
        readonly: false,
        num_queues,
        queue_size,
        direct: false,
        engine: crate::blk::backend::IoEngine::default(),
    };
    assert!(matches!(
        BlkBackend::open(cfg(0, 128)),
        Err(BlkError::InvalidConfig(_))
    ));
    assert!(matches!(
        BlkBackend::open(cfg(65, 128)),
        Err(BlkError::InvalidConfig(_))
    ));
    assert!(matches!(
        BlkBackend::open(cfg(1, 100)),
        Err(BlkError::InvalidConfig(_))
    ));
    assert!(BlkBackend::open(cfg(1, 128)).is_ok());
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        BlkBackend::open(cfg(1, 128)),
        Err(BlkError::OpenDisk { .. })
    ));
}

/// A listener with a short handshake timeout on its own thread (left behind at the end).
fn listener(timeout: Duration) -> (PathBuf, PathBuf) {
    let path = disk_image(8);
    let socket = temp_path("blk.sock");
    let backend = BlkBackend::open(BlkBackendConfig {
        path: path.clone(),
        readonly: false,
        num_queues: 1,
        queue_size: 128,
        direct: false,
        engine: crate::blk::backend::IoEngine::default(),
    })
    .unwrap()
    .with_handshake_timeout(timeout);
    let socket_for_thread = socket.clone();
    thread::spawn(move || backend.listen_on(&socket_for_thread));
    (path, socket)
}

fn connect(socket: &Path) -> UnixStream {
    (0..500)
        .find_map(|_| {
            UnixStream::connect(socket)
                .map_err(|_| thread::sleep(Duration::from_millis(10)))
                .ok()
        })
        .expect("listener up")
}

/// Waits (bounded, failing loudly) until the backend closes `stream`.
fn assert_dropped(stream: &UnixStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut byte = [0u8; 1];
    match io::Read::read(&mut &*stream, &mut byte) {
        Ok(0) => {}
        other => panic!("the backend did not drop the client: {other:?}"),
    }
}

#[test]
fn a_silent_or_trickling_client_is_dropped_and_the_next_one_served() {
    let (path, socket) = listener(Duration::from_millis(300));
    let silent = connect(&socket);
    assert_dropped(&silent);
    // Half a header, then nothing: the deadline covers the whole message.
    let trickling = connect(&socket);
    io::Write::write_all(&mut &trickling, &[1, 0, 0]).unwrap();
    assert_dropped(&trickling);
    let fe = FakeFrontend {
        stream: connect(&socket),
    };
    assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&socket).unwrap();
}

#[test]
fn after_set_owner_an_idle_frontend_keeps_the_backend() {
    let (path, socket) = listener(Duration::from_millis(100));
    let fe = FakeFrontend {
        stream: connect(&socket),
    };
    assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
    fe.send(Request::SetOwner, &[], &[], false);
    // Idle for longer than the handshake timeout (no pass/fail on time: it must still
    // be served afterwards).
    thread::sleep(Duration::from_millis(300));
    assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&socket).unwrap();
}

#[test]
fn listener_serves_one_frontend_after_another() {
    let path = disk_image(8);
    let socket = temp_path("blk.sock");
    let cfg = BlkBackendConfig {
        path: path.clone(),
        readonly: false,
        num_queues: 1,
        queue_size: 128,
        direct: false,
        engine: crate::blk::backend::IoEngine::default(),
    };
    let socket_for_thread = socket.clone();
    // The listener runs for ever; the thread is left behind when the test ends.
    thread::spawn(move || BlkBackend::listen(cfg, &socket_for_thread));
    for _ in 0..2 {
        let stream = (0..500)
            .find_map(|_| {
                UnixStream::connect(&socket)
                    .map_err(|_| thread::sleep(Duration::from_millis(10)))
                    .ok()
            })
            .expect("listener up");
        let fe = FakeFrontend { stream };
        assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
    }
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&socket).unwrap();
}
