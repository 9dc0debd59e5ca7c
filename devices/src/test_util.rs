//! Test helpers: memfd-backed guest memory and a split virtqueue built by hand, the way a
//! guest driver would lay it out (no vhost-user, no virtio-queue mock).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::vhost_user_server::memory::{MappedMemory, RegionLayout};
use crate::vhost_user_server::vring::RingAddresses;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// An anonymous in-memory file of `size` bytes.
pub fn memfd(name: &str, size: u64) -> File {
    let cname = CString::new(name).expect("test name has no NUL");
    // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).expect("memfd set_len");
    file
}

/// `size` bytes of guest memory at guest physical 0, backed by a memfd and mapped the way the
/// backend maps a SET_MEM_TABLE region. Returns the memory and the memfd.
pub fn guest_memory(size: u64) -> (MappedMemory, File) {
    let file = memfd("guest-ram", size);
    let layout = RegionLayout {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: 0x7f00_0000_0000,
        mmap_offset: 0,
    };
    let fd = file.try_clone().expect("dup memfd").into();
    let mem = MappedMemory::map(&[layout], vec![fd]).expect("map guest memory");
    (mem, file)
}

/// A split virtqueue at a fixed guest address, filled in the way a driver does.
pub struct TestRing {
    pub size: u16,
    pub rings: RingAddresses,
    next_free_desc: u16,
    avail_idx: u16,
    /// While set, `publish` writes avail entries but not the index; `publish_held` then makes
    /// them all visible at once (a driver publishing a batch).
    pub hold_avail_idx: bool,
}

/// One descriptor to put in a chain: (guest address, length, device-writable).
pub type DescSpec = (u64, u32, bool);

impl TestRing {
    /// Lays out the descriptor table at `base`, then the avail ring, then the used ring
    /// (4-byte aligned), exactly as the virtio spec sizes them.
    pub fn new(size: u16, base: u64) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestRing {
            size,
            rings: RingAddresses {
                desc_table: GuestAddress(desc),
                avail_ring: GuestAddress(avail),
                used_ring: GuestAddress(used),
            },
            next_free_desc: 0,
            avail_idx: 0,
            hold_avail_idx: false,
        }
    }

    /// Writes a raw descriptor into the table.
    pub fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = self.rings.desc_table.0 + 16 * u64::from(index);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(at))
            .expect("write descriptor");
    }

    /// Writes a chain into free descriptors and returns its head (does not publish it).
    pub fn write_chain(&mut self, mem: &GuestMemoryMmap, chain: &[DescSpec]) -> u16 {
        let head = self.next_free_desc;
        for (i, &(addr, len, writable)) in chain.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            let next = (index + 1) % self.size;
            if i + 1 < chain.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(mem, index, addr, len, flags, next);
        }
        self.next_free_desc = (head + chain.len() as u16) % self.size;
        head
    }

    /// Puts `head` in the avail ring and publishes the new avail index (release order).
    pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.rings.avail_ring.0 + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail entry");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        if !self.hold_avail_idx {
            self.publish_held(mem);
        }
    }

    /// Stores the avail index: every entry written so far becomes visible to the device.
    pub fn publish_held(&mut self, mem: &GuestMemoryMmap) {
        self.hold_avail_idx = false;
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(self.rings.avail_ring.0 + 2),
            Ordering::Release,
        )
        .expect("avail idx");
    }

    /// Writes and publishes a chain; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, chain: &[DescSpec]) -> u16 {
        let head = self.write_chain(mem, chain);
        self.publish(mem, head);
        head
    }

    /// Puts both rings at index `idx`, as after `idx` requests served (to test wrap-around).
    pub fn start_at(&mut self, mem: &GuestMemoryMmap, idx: u16) {
        self.avail_idx = idx;
        for ring in [self.rings.avail_ring, self.rings.used_ring] {
            mem.store(idx.to_le(), GuestAddress(ring.0 + 2), Ordering::Release)
                .expect("ring idx");
        }
    }

    /// Writes the driver's used_event (EVENT_IDX: "interrupt me once entry `event` is used").
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, event: u16) {
        let at = self.rings.avail_ring.0 + 4 + 2 * u64::from(self.size);
        mem.store(event.to_le(), GuestAddress(at), Ordering::Release)
            .expect("used_event");
    }

    /// The device's avail_event (EVENT_IDX: "kick me once you publish entry `avail_event`").
    pub fn avail_event(&self, mem: &GuestMemoryMmap) -> u16 {
        let at = self.rings.used_ring.0 + 4 + 8 * u64::from(self.size);
        u16::from_le(
            mem.load(GuestAddress(at), Ordering::Acquire)
                .expect("avail_event"),
        )
    }

    /// The used ring's flags (VRING_USED_F_NO_NOTIFY = 1: "do not kick me").
    pub fn used_flags(&self, mem: &GuestMemoryMmap) -> u16 {
        u16::from_le(
            mem.load(self.rings.used_ring, Ordering::Acquire)
                .expect("used flags"),
        )
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        let idx: u16 = mem
            .load(GuestAddress(self.rings.used_ring.0 + 2), Ordering::Acquire)
            .expect("used idx");
        u16::from_le(idx)
    }

    /// The (id, len) of used ring entry `n`.
    pub fn used_elem(&self, mem: &GuestMemoryMmap, n: u16) -> (u32, u32) {
        let at = self.rings.used_ring.0 + 4 + 8 * u64::from(n % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (u32::from_le(id), u32::from_le(len))
    }

    /// Waits until the used index reaches `count` (the device side runs on other threads).
    pub fn wait_used(&self, mem: &GuestMemoryMmap, count: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx(mem) != count {
            assert!(
                Instant::now() < deadline,
                "used idx stuck at {} (want {count})",
                self.used_idx(mem)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A virtio-blk request header.
pub fn request_header(request_type: u32, sector: u64) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&request_type.to_le_bytes());
    header[8..16].copy_from_slice(&sector.to_le_bytes());
    header
}

/// The chain at avail ring position `position`, popped the way the queue worker pops it.
pub fn pop_chain<'a>(
    mem: &'a GuestMemoryMmap,
    ring: &TestRing,
    position: u16,
) -> virtio_queue::DescriptorChain<&'a GuestMemoryMmap> {
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    let mut queue = Queue::new(ring.size).expect("queue size");
    queue
        .try_set_desc_table_address(ring.rings.desc_table)
        .expect("desc");
    queue
        .try_set_avail_ring_address(ring.rings.avail_ring)
        .expect("avail");
    queue
        .try_set_used_ring_address(ring.rings.used_ring)
        .expect("used");
    queue.set_ready(true);
    queue.set_next_avail(position);
    let mut iter = queue.iter(mem).expect("ring readable");
    iter.next().expect("a chain is available")
}

/// A disk of `sectors` sectors backed by a memfd; returns the disk and the memfd to inspect it.
pub fn memfd_disk(sectors: u64, readonly: bool) -> (crate::blk::disk::Disk, File) {
    let file = memfd("disk", sectors * 512);
    let disk = crate::blk::disk::Disk::from_file(
        file.try_clone().expect("dup"),
        readonly,
        *b"test-disk-id-0123456",
    )
    .expect("disk");
    (disk, file)
}

/// A fresh path under the system temp dir (not created); unique per process and call.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::AtomicUsize;
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vmm-blk-test-{}-{n}-{name}", std::process::id()))
}

/// Waits up to `timeout` for `fd` to become readable.
pub fn wait_readable(fd: &impl std::os::fd::AsRawFd, timeout: Duration) -> bool {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd that outlives the call.
    let ret = unsafe { libc::poll(&mut pollfd, 1, ms) };
    ret == 1 && pollfd.revents & libc::POLLIN != 0
}

/// Tests that count the backend's own inflight memfds (`inflight::MEMFD_NAME`) hold this lock,
/// so another test's GET never shows up in their count.
pub static INFLIGHT_MEMFD_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How many of this process's fds refer to the same file as `fd` (same device and inode, as
/// stat through /proc/self/fd shows them), `fd` itself included. A backend thread that kept a
/// received copy of `fd` shows up here, whatever other tests open or close meanwhile.
pub fn fds_referring_to(fd: &impl std::os::fd::AsRawFd) -> usize {
    use std::os::unix::fs::MetadataExt;
    let id = |path: &std::path::Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let target = id(std::path::Path::new(&format!(
        "/proc/self/fd/{}",
        fd.as_raw_fd()
    )));
    assert!(target.is_some(), "fd {} is not open", fd.as_raw_fd());
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .filter(|entry| id(&entry.path()) == target)
        .count()
}

/// How many of this process's fds are memfds named `name`.
pub fn memfds_named(name: &str) -> usize {
    let prefix = format!("/memfd:{name} ");
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter(|link| link.to_string_lossy().starts_with(&prefix))
        .count()
}

/// A memfd holding `bytes`, sealed against shrinking and growing like every inflight memfd.
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> File {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let cname = CString::new(name).expect("test name has no NUL");
    // SAFETY: `cname` is a valid NUL-terminated string; memfd_create has no other inputs.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(bytes.len() as u64).expect("memfd set_len");
    file.write_all_at(bytes, 0).expect("memfd contents");
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    // SAFETY: F_ADD_SEALS with an integer argument on an fd we own.
    let added = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(added, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    file
}
