//! The control path and the data path together, without KVM: a "driver" (this test) programs
//! an `MmioTransport` over a `VhostUserDevice` whose backend is real — our virtio-blk backend
//! on a socketpair, or qemu-storage-daemon on a unix socket — then does block I/O through a
//! split ring in memfd guest memory, kicking through QueueNotify and waiting on the call eventfd
//! exactly where KVM's ioeventfd and irqfd would sit.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use vhost_frontend::connection::Frontend;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use super::registers::{self as reg, status, INT_USED_BUFFER};
use super::{DeviceKind, MemoryTable, MmioTransport, VhostUserDevice, VhostUserDeviceOptions};
use crate::blk::{BlkBackend, BlkBackendConfig};

const RAM_SIZE: u64 = 0x40_0000;
const QUEUE_SIZE: u16 = 16;
const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
const HEADER: u64 = 0x2_0000;
const DATA: u64 = 0x2_1000;
const STATUS_BYTE: u64 = 0x2_2000;
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

fn memfd(name: &str, size: u64) -> File {
    let name = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid NUL-terminated name; the result is checked before use.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// Guest RAM the way the VMM makes it: one memfd mapped MAP_SHARED at guest physical 0.
fn guest_ram() -> GuestMemoryMmap {
    let file = memfd("guest-ram", RAM_SIZE);
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        RAM_SIZE as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap()
}

/// What a guest driver would do, register by register.
struct Driver {
    transport: MmioTransport,
    memory: GuestMemoryMmap,
    avail_idx: u16,
}

impl Driver {
    fn read(&mut self, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn add_status(&mut self, bit: u32) {
        let current = self.read(reg::STATUS);
        self.write(reg::STATUS, current | bit);
    }

    /// Probe as Linux's virtio_mmio + virtio_blk would: identity, features, one queue, DRIVER_OK.
    fn probe(&mut self) {
        assert_eq!(self.read(reg::MAGIC_VALUE_OFFSET), reg::MAGIC_VALUE);
        assert_eq!(self.read(reg::VERSION), 2);
        assert_eq!(self.read(reg::DEVICE_ID), 2, "virtio-blk");
        self.write(reg::STATUS, 0);
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        assert_eq!(high & 1, 1, "VERSION_1 offered");
        // Both backends offer EVENT_IDX, and the frontend passes it on: this driver uses it.
        assert_ne!(low & (1 << 29), 0, "EVENT_IDX offered");
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, low);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, high);
        self.add_status(status::FEATURES_OK);
        assert_ne!(
            self.read(reg::STATUS) & status::FEATURES_OK,
            0,
            "features accepted"
        );

        self.write(reg::QUEUE_SEL, 0);
        assert_eq!(self.read(reg::QUEUE_READY), 0);
        assert!(self.read(reg::QUEUE_NUM_MAX) >= u32::from(QUEUE_SIZE));
        self.write(reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
        self.write(reg::QUEUE_DESC_LOW, DESC as u32);
        self.write(reg::QUEUE_DESC_HIGH, 0);
        self.write(reg::QUEUE_DRIVER_LOW, AVAIL as u32);
        self.write(reg::QUEUE_DRIVER_HIGH, 0);
        self.write(reg::QUEUE_DEVICE_LOW, USED as u32);
        self.write(reg::QUEUE_DEVICE_HIGH, 0);
        self.write(reg::QUEUE_READY, 1);
        self.add_status(status::DRIVER_OK);
        assert_eq!(
            self.read(reg::STATUS) & status::DEVICE_NEEDS_RESET,
            0,
            "backend started"
        );
    }

    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = DESC + 16 * u64::from(index);
        self.memory
            .write_obj(addr.to_le(), GuestAddress(base))
            .unwrap();
        self.memory
            .write_obj(len.to_le(), GuestAddress(base + 8))
            .unwrap();
        self.memory
            .write_obj(flags.to_le(), GuestAddress(base + 12))
            .unwrap();
        self.memory
            .write_obj(next.to_le(), GuestAddress(base + 14))
            .unwrap();
    }

    /// One virtio-blk request (header, 512 data bytes, status), submitted and waited for the
    /// way an interrupt-driven driver does. Returns the status byte.
    fn block_request(&mut self, request_type: u32, sector: u64) -> u8 {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.memory
            .write_slice(&header, GuestAddress(HEADER))
            .unwrap();
        self.memory
            .write_obj(0xffu8, GuestAddress(STATUS_BYTE))
            .unwrap();
        let data_flags = if request_type == VIRTIO_BLK_T_IN {
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
        } else {
            VIRTQ_DESC_F_NEXT
        };
        self.write_desc(0, HEADER, 16, VIRTQ_DESC_F_NEXT, 1);
        self.write_desc(1, DATA, 512, data_flags, 2);
        self.write_desc(2, STATUS_BYTE, 1, VIRTQ_DESC_F_WRITE, 0);
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.memory
            .write_obj(0u16.to_le(), GuestAddress(AVAIL + 4 + 2 * slot))
            .unwrap();
        // EVENT_IDX (acked in `probe`): used_event, after the avail ring's entries, asks for an
        // interrupt once the entry at this request's position is used, as Linux's
        // virtqueue_enable_cb does before it waits.
        self.memory
            .write_obj(
                self.avail_idx.to_le(),
                GuestAddress(AVAIL + 4 + 2 * u64::from(QUEUE_SIZE)),
            )
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Publish the entry before the index (the backend reads with acquire).
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.memory
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();

        // QueueNotify: here the transport signals the kick eventfd (under KVM, the ioeventfd).
        self.write(reg::QUEUE_NOTIFY, 0);
        loop {
            wait_readable(
                self.transport.call_fd().as_raw_fd(),
                Duration::from_secs(10),
            );
            self.transport.call_fd().read().unwrap();
            let used_before: u16 = self.memory.read_obj(GuestAddress(USED + 2)).unwrap();
            // The interrupt handler: the status must say "used buffer" though the backend, not
            // the transport, raised the interrupt...
            let pending = self.read(reg::INTERRUPT_STATUS);
            self.write(reg::INTERRUPT_ACK, pending);
            if pending & INT_USED_BUFFER != 0 {
                break;
            }
            // ...and may say nothing only when the ring held no news (checked with an idx read
            // before the status, so a completion racing with the read cannot fool the check).
            // libvhost-user, behind qemu-storage-daemon, signals a call fd once on receiving it.
            assert_eq!(
                u16::from_le(used_before),
                self.avail_idx.wrapping_sub(1),
                "InterruptStatus read 0 although the backend had used our buffer"
            );
        }
        let used_idx: u16 = self.memory.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(u16::from_le(used_idx), self.avail_idx);
        let used_id: u32 = self.memory.read_obj(GuestAddress(USED + 4)).unwrap();
        assert_eq!(u32::from_le(used_id), 0, "head of our chain");
        assert_eq!(
            self.read(reg::INTERRUPT_STATUS) & INT_USED_BUFFER,
            0,
            "acknowledged"
        );
        self.memory.read_obj(GuestAddress(STATUS_BYTE)).unwrap()
    }
}

fn wait_readable(fd: i32, timeout: Duration) {
    let mut poll_fd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and its count.
    let ready = unsafe { libc::poll(&mut poll_fd, 1, timeout.as_millis() as i32) };
    assert_eq!(ready, 1, "no interrupt from the backend within {timeout:?}");
}

fn driver_for(frontend: Frontend) -> Driver {
    let memory = guest_ram();
    let table = MemoryTable::from_guest_memory(&memory).unwrap();
    let options = VhostUserDeviceOptions {
        num_queues: 1,
        queue_size: 128,
    };
    let device = VhostUserDevice::new(Box::new(frontend), DeviceKind::BLOCK, table, options)
        .expect("handshake with the backend");
    let transport = MmioTransport::new(Box::new(device), memory.clone()).unwrap();
    Driver {
        transport,
        memory,
        avail_idx: 0,
    }
}

/// Writes a sector, reads it back into cleared memory, and checks the image file.
fn write_then_read(driver: &mut Driver, disk: &File) {
    driver.probe();
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
    driver
        .memory
        .write_slice(&pattern, GuestAddress(DATA))
        .unwrap();
    assert_eq!(
        driver.block_request(VIRTIO_BLK_T_OUT, 3),
        0,
        "VIRTIO_BLK_S_OK"
    );
    let mut on_disk = vec![0u8; 512];
    disk.read_exact_at(&mut on_disk, 3 * 512).unwrap();
    assert_eq!(on_disk, pattern, "the backend wrote the image");

    driver
        .memory
        .write_slice(&[0u8; 512], GuestAddress(DATA))
        .unwrap();
    assert_eq!(driver.block_request(VIRTIO_BLK_T_IN, 3), 0);
    let mut read_back = vec![0u8; 512];
    driver
        .memory
        .read_slice(&mut read_back, GuestAddress(DATA))
        .unwrap();
    assert_eq!(read_back, pattern);

    // Reset: the backend stops the ring (GET_VRING_BASE); then a second life works too.
    driver.write(reg::STATUS, 0);
    assert_eq!(driver.read(reg::STATUS), 0);
}

#[test]
fn block_io_through_our_backend() {
    let disk = memfd("disk", 1 << 20);
    let path = PathBuf::from(format!("/proc/self/fd/{}", disk.as_raw_fd()));
    let cfg = BlkBackendConfig {
        path,
        readonly: false,
        num_queues: 1,
        queue_size: 128,
        direct: false,
        engine: crate::blk::backend::IoEngine::default(),
    };
    let (stream, backend_thread) = BlkBackend::spawn_in_process(cfg).unwrap();
    let mut driver = driver_for(Frontend::from_stream(stream, "blk-test"));
    write_then_read(&mut driver, &disk);

    // Second life after the reset: fresh rings from index 0.
    driver
        .memory
        .write_slice(&[0u8; 0x3000], GuestAddress(DESC))
        .unwrap();
    driver.avail_idx = 0;
    write_then_read(&mut driver, &disk);

    drop(driver); // closes the connection: the backend thread ends cleanly
    backend_thread
        .join()
        .unwrap()
        .expect("backend saw no protocol error");
}

/// The same against QEMU's backend (an independent implementation of the protocol), which
/// resources/setup installs (qemu-utils); the test fails plainly if it is missing.
#[test]
fn block_io_through_qemu_storage_daemon() {
    let dir = std::env::temp_dir().join(format!("vmm-qsd-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    let socket = dir.join("vhost.sock");
    let disk = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&image)
        .unwrap();
    disk.set_len(1 << 20).unwrap();
    let daemon = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=export,node-name=disk,writable=on,addr.type=unix,addr.path={}",
            socket.display()
        ))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon runs");
    // Killed however the test ends.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let daemon = Reap(daemon);
    let mut frontend = None;
    for _ in 0..100 {
        if let Ok(connected) = Frontend::connect(&socket) {
            frontend = Some(connected);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let frontend = frontend.expect("qemu-storage-daemon listens");
    let mut driver = driver_for(frontend);
    write_then_read(&mut driver, &disk);
    drop(driver);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
