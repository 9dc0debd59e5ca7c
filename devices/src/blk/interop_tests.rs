//! The backend driven by an independent frontend: rust-vmm's `vhost` crate (`Frontend`), the
//! vhost-user implementation Cloud Hypervisor and others build on. It shares no code with our
//! wire module, so agreeing with it on every message is evidence that both follow the spec.

use std::os::fd::AsRawFd;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::{BlkBackend, BlkBackendConfig};
use crate::test_util::{guest_memory, request_header, temp_path, wait_readable, TestRing};

const FRONTEND_VA: u64 = 0x7f55_0000_0000;
const RAM_SIZE: u64 = 0x40_0000;

#[test]
fn rust_vmm_frontend_drives_a_write_and_a_read() {
    let path = temp_path("interop.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(128 * 512)
        .unwrap();
    let (stream, backend) = BlkBackend::spawn_in_process(BlkBackendConfig {
        path: path.clone(),
        readonly: false,
        num_queues: 1,
        queue_size: 256,
        direct: false,
        engine: crate::blk::backend::IoEngine::default(),
    })
    .unwrap();
    let mut frontend = Frontend::from_stream(stream, 1);

    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
    assert!(protocol.contains(VhostUserProtocolFeatures::CONFIG));
    // With REPLY_ACK acked, every later set_* waits for our ack and fails on a non-zero one.
    frontend.set_protocol_features(protocol).unwrap();
    frontend.set_owner().unwrap();
    assert_eq!(frontend.get_queue_num().unwrap(), 1);
    let (_, config) = frontend
        .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
        .unwrap();
    assert_eq!(config, 128u64.to_le_bytes(), "capacity");

    let (mem, ram) = guest_memory(RAM_SIZE);
    let g = mem.guest().clone();
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: RAM_SIZE,
            userspace_addr: FRONTEND_VA,
            mmap_offset: 0,
            mmap_handle: ram.as_raw_fd(),
        }])
        .unwrap();
    let mut ring = TestRing::new(256, 0x1000);
    frontend.set_vring_num(0, 256).unwrap();
    frontend.set_vring_base(0, 0).unwrap();
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 256,
                queue_size: 256,
                flags: 0,
                desc_table_addr: FRONTEND_VA + ring.rings.desc_table.0,
                used_ring_addr: FRONTEND_VA + ring.rings.used_ring.0,
                avail_ring_addr: FRONTEND_VA + ring.rings.avail_ring.0,
                log_addr: None,
            },
        )
        .unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let err = EventFd::new(EFD_NONBLOCK).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_err(0, &err).unwrap();
    frontend.set_vring_enable(0, true).unwrap();

    let wait_call = || {
        assert!(
            wait_readable(&call, Duration::from_secs(10)),
            "no interrupt"
        );
        call.read().unwrap();
    };

    // 8 KiB write at sector 10, then read back, then GET_ID.
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 13 % 241) as u8).collect();
    g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 10), GuestAddress(0x20000))
        .unwrap();
    g.write_slice(&pattern, GuestAddress(0x30000)).unwrap();
    ring.add_chain(
        &g,
        &[
            (0x20000, 16, false),
            (0x30000, 8192, false),
            (0x21000, 1, true),
        ],
    );
    kick.write(1).unwrap();
    wait_call();
    assert_eq!(g.read_obj::<u8>(GuestAddress(0x21000)).unwrap(), 0);
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[10 * 512..10 * 512 + 8192], &pattern[..]);

    g.write_slice(&request_header(VIRTIO_BLK_T_IN, 10), GuestAddress(0x22000))
        .unwrap();
    ring.add_chain(
        &g,
        &[
            (0x22000, 16, false),
            (0x40000, 8192, true),
            (0x23000, 1, true),
        ],
    );
    g.write_slice(
        &request_header(VIRTIO_BLK_T_GET_ID, 0),
        GuestAddress(0x24000),
    )
    .unwrap();
    ring.add_chain(
        &g,
        &[
            (0x24000, 16, false),
            (0x25000, 20, true),
            (0x26000, 1, true),
        ],
    );
    kick.write(1).unwrap();
    ring.wait_used(&g, 3);
    let mut read_back = vec![0u8; 8192];
    g.read_slice(&mut read_back, GuestAddress(0x40000)).unwrap();
    assert_eq!(read_back, pattern);
    let mut id = [0u8; 20];
    g.read_slice(&mut id, GuestAddress(0x25000)).unwrap();
    assert!(
        id.starts_with(b"vmm-blk-test-"),
        "id from the file name: {id:?}"
    );

    assert_eq!(frontend.get_vring_base(0).unwrap(), 3);
    assert!(err.read().is_err(), "no ring error was signalled");
    drop(frontend);
    backend.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// Our own frontend (vhost-frontend's `Frontend`, the one `vmm --blk` uses) against our backend,
/// with REPLY_ACK on, so every set_* is acknowledged one by one.
#[test]
fn our_frontend_drives_a_write_and_a_read() {
    use std::os::fd::AsFd;
    use vhost_frontend::features::{bit_mask, VIRTIO_F_VERSION_1};
    use vhost_frontend::wire::{MemoryRegion, VringAddr};
    use vhost_frontend::{Frontend as OurFrontend, MemoryRegionFd, VhostUserFrontend as _};

    let path = temp_path("own.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(32 * 512)
        .unwrap();
    let (stream, backend) = BlkBackend::spawn_in_process(BlkBackendConfig {
        path: path.clone(),
        readonly: false,
        num_queues: 2,
        queue_size: 128,
        direct: false,
        engine: crate::blk::backend::IoEngine::default(),
    })
    .unwrap();
    let mut frontend = OurFrontend::from_stream(stream, "blk-test");
    let negotiated = frontend.negotiate(u64::MAX, u64::MAX).unwrap();
    assert_eq!(negotiated.queue_num, Some(2));
    assert_eq!(
        negotiated.protocol_features,
        super::backend::OFFERED_PROTOCOL_FEATURES
    );
    assert_ne!(negotiated.virtio_features & bit_mask(VIRTIO_F_VERSION_1), 0);
    frontend.set_features(negotiated.virtio_features).unwrap();
    assert_eq!(frontend.get_config(0, 8).unwrap(), 32u64.to_le_bytes());

    let (mem, ram) = guest_memory(RAM_SIZE);
    let g = mem.guest().clone();
    frontend
        .set_mem_table(&[MemoryRegionFd {
            region: MemoryRegion {
                guest_phys_addr: 0,
                memory_size: RAM_SIZE,
                userspace_addr: FRONTEND_VA,
                mmap_offset: 0,
            },
            fd: ram.as_fd(),
        }])
        .unwrap();
    // Queue 1 this time, to exercise a queue other than 0.
    let mut ring = TestRing::new(128, 0x8000);
    frontend.set_vring_num(1, 128).unwrap();
    frontend.set_vring_base(1, 0).unwrap();
    frontend
        .set_vring_addr(&VringAddr {
            index: 1,
            flags: 0,
            desc_user_addr: FRONTEND_VA + ring.rings.desc_table.0,
            used_user_addr: FRONTEND_VA + ring.rings.used_ring.0,
            avail_user_addr: FRONTEND_VA + ring.rings.avail_ring.0,
            log_guest_addr: 0,
        })
        .unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    // SAFETY: both eventfds outlive the calls that borrow them.
    let (kick_fd, call_fd) = unsafe {
        (
            std::os::fd::BorrowedFd::borrow_raw(kick.as_raw_fd()),
            std::os::fd::BorrowedFd::borrow_raw(call.as_raw_fd()),
        )
    };
    frontend.set_vring_kick(1, kick_fd).unwrap();
    frontend.set_vring_call(1, call_fd).unwrap();
    frontend.set_vring_enable(1, true).unwrap();

    g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 31), GuestAddress(0x20000))
        .unwrap();
    g.write_slice(&[0xc3; 512], GuestAddress(0x30000)).unwrap();
    ring.add_chain(
        &g,
        &[
            (0x20000, 16, false),
            (0x30000, 512, false),
            (0x21000, 1, true),
        ],
    );
    g.write_slice(&request_header(VIRTIO_BLK_T_IN, 31), GuestAddress(0x22000))
        .unwrap();
    kick.write(1).unwrap();
    ring.wait_used(&g, 1);
    ring.add_chain(
        &g,
        &[
            (0x22000, 16, false),
            (0x40000, 512, true),
            (0x23000, 1, true),
        ],
    );
    kick.write(1).unwrap();
    ring.wait_used(&g, 2);
    assert!(wait_readable(&call, Duration::from_secs(1)));
    let mut sector = [0u8; 512];
    g.read_slice(&mut sector, GuestAddress(0x40000)).unwrap();
    assert_eq!(sector, [0xc3; 512]);
    assert_eq!(std::fs::read(&path).unwrap()[31 * 512..], [0xc3; 512]);

    // A bad request is reported on the message that caused it (REPLY_ACK).
    assert!(
        frontend.set_vring_num(1, 256).is_err(),
        "beyond our queue_size 128"
    );
    assert_eq!(frontend.get_vring_base(1).unwrap(), 2);
    drop(frontend);
    backend.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}
