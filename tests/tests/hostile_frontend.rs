//! Hostile frontends over a raw unix socket against the real `vmm blk-backend` process: each
//! misbehaves, then the backend must still be alive, serve a fresh well-behaved frontend (the
//! test guest's `blk-write-verify` through `vmm run --blk socket=...`) and hold exactly the fds it
//! held before (/proc/PID/fd). The same raw frontend also kills the backend mid-I/O and restarts
//! it, to check inflight recovery with a real SIGKILL.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{run_guest_with_blk_socket, vmm_bin, zero_image, ChildGuard, TempDir};
use vhost_frontend::wire::{
    recv_message, send_message, Header, InflightDescription, InflightRegion, MemoryRegion,
    MemoryTable, Request, U64Payload, VringAddr, VringFdIndex, VringState,
};

/// Every bounded wait: long enough for a loaded machine, short enough to fail loudly on a hang.
const T: Duration = Duration::from_secs(60);
/// Where the raw frontend claims guest RAM lives in its address space.
const VA: u64 = 0x7f00_0000_0000;
const RAM: u64 = 1 << 20;
const FULL: u64 = 0xffff_ffff_ffff_fffe;

/// `vmm blk-backend` with its logs on (VMM_LOG=info) and listening.
fn backend(dir: &TempDir, socket: &Path) -> (ChildGuard, u32) {
    let image = zero_image(dir, "disk.img", 16 << 20);
    backend_on(dir, socket, &image, &[], "backend.log")
}

/// `vmm blk-backend` on `image` with `extra` arguments, logging (VMM_LOG=info) into `log`.
fn backend_on(
    dir: &TempDir,
    socket: &Path,
    image: &Path,
    extra: &[&str],
    log: &str,
) -> (ChildGuard, u32) {
    let mut c = Command::new(vmm_bin());
    c.args(["blk-backend", "--socket"])
        .arg(socket)
        .arg("--file")
        .arg(image)
        .args(extra)
        .env("VMM_LOG", "info");
    let mut g = ChildGuard::spawn(&mut c, "vmm blk-backend", dir.path(log));
    g.wait_for_listening_socket(socket, Duration::from_secs(10));
    let pid = g.pid();
    (g, pid)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("backend's /proc fd dir")
        .count()
}

/// The backend's fd count comes back to `expected` within a second. Not a single read: the
/// backend closes its copy of an fd it sent just after sendmsg returns, which may be after we
/// received the reply.
fn assert_fd_count_settles(pid: u32, expected: usize, what: &str) {
    let start = Instant::now();
    while fd_count(pid) != expected {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{what}: the backend holds {} fds, expected {expected}",
            fd_count(pid)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// After the hostile session: the backend is alive, its fd count is back to `baseline`, and a
/// VM through it writes and verifies its blocks.
fn assert_backend_recovers(g: &mut ChildGuard, pid: u32, baseline: usize, socket: &Path) {
    let start = Instant::now();
    while fd_count(pid) != baseline {
        g.assert_running();
        assert!(
            start.elapsed() < T,
            "backend holds {} fds, {baseline} before the hostile frontend; log:\n{}",
            fd_count(pid),
            g.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = run_guest_with_blk_socket(
        socket,
        "blk-write-verify blocks=16 start=0 seed=7 disk=0",
        T,
    );
    assert!(
        !o.timed_out,
        "hung: {}\nbackend log:\n{}",
        o.describe(),
        g.log()
    );
    assert_eq!(
        o.code(),
        Some(0),
        "{}\nbackend log:\n{}",
        o.describe(),
        g.log()
    );
    assert!(
        o.stdout.contains("blk-write-verify PASS"),
        "{}",
        o.describe()
    );
    g.assert_running();
    let start = Instant::now();
    while fd_count(pid) != baseline {
        assert!(start.elapsed() < T, "fds leaked by the good session");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw frontend: vhost-user messages built with the wire module's encoders.
struct Raw(UnixStream);

impl Raw {
    fn connect(socket: &Path) -> Raw {
        let s = UnixStream::connect(socket).expect("connect");
        // A reply that never comes is a wedged backend: fail loudly instead of hanging.
        s.set_read_timeout(Some(T)).unwrap();
        Raw(s)
    }

    fn send(&self, request: Request, payload: &[u8], fds: &[BorrowedFd<'_>], need_reply: bool) {
        let header = Header::for_request(request, payload.len(), need_reply);
        send_message(&self.0, &header, payload, fds).expect("send");
    }

    fn reply(&self, request: Request) -> Vec<u8> {
        let (header, payload, _) = recv_message(&self.0)
            .unwrap_or_else(|e| panic!("no reply to {} (backend wedged?): {e}", request.name()));
        assert_eq!(header.request, request.code());
        payload
    }

    fn get_u64(&self, request: Request) -> u64 {
        self.send(request, &[], &[], false);
        U64Payload::decode(&self.reply(request)).unwrap().0
    }

    /// Sends with NEED_REPLY; returns the ack (0 = success).
    fn acked(&self, request: Request, payload: &[u8], fds: &[BorrowedFd<'_>]) -> u64 {
        self.send(request, payload, fds, true);
        U64Payload::decode(&self.reply(request)).unwrap().0
    }

    fn vring(&self, request: Request, index: u32, num: u32) -> u64 {
        self.acked(request, &VringState { index, num }.encode(), &[])
    }

    fn vring_fd(&self, request: Request, fd: BorrowedFd<'_>) -> u64 {
        let payload = VringFdIndex {
            index: 0,
            no_fd: false,
        }
        .encode();
        self.acked(request, &payload, &[fd])
    }

    fn handshake(&self) {
        let features = self.get_u64(Request::GetFeatures);
        self.send(
            Request::SetFeatures,
            &U64Payload(features).encode(),
            &[],
            false,
        );
        let protocol = self.get_u64(Request::GetProtocolFeatures);
        self.send(
            Request::SetProtocolFeatures,
            &U64Payload(protocol).encode(),
            &[],
            false,
        );
        assert_eq!(self.acked(Request::SetOwner, &[], &[]), 0);
    }

    /// GET_INFLIGHT_FD with NEED_REPLY: the reply payload and its fds.
    fn get_inflight(&self, num_queues: u16, queue_size: u16) -> (Vec<u8>, Vec<OwnedFd>) {
        let asked = InflightDescription {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        self.send(Request::GetInflightFd, &asked.encode(), &[], true);
        let (header, payload, fds) = recv_message(&self.0).expect("GET_INFLIGHT_FD reply");
        assert_eq!(header.request, Request::GetInflightFd.code());
        (payload, fds)
    }

    fn set_inflight(&self, description: &InflightDescription, fd: BorrowedFd<'_>) -> u64 {
        self.acked(Request::SetInflightFd, &description.encode(), &[fd])
    }

    fn ring_addr(&self, desc: u64, avail: u64, used: u64) -> u64 {
        let addr = VringAddr {
            index: 0,
            flags: 0,
            desc_user_addr: VA + desc,
            used_user_addr: VA + used,
            avail_user_addr: VA + avail,
            log_guest_addr: 0,
        };
        self.acked(Request::SetVringAddr, &addr.encode(), &[])
    }
}

fn memfd(size: u64) -> File {
    memfd_with(size, libc::MFD_CLOEXEC)
}

/// A memfd of `size` bytes sealed against any change of size, as inflight memfds are.
fn sealed_memfd(size: u64) -> File {
    let file = memfd_with(size, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING);
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
    // SAFETY: F_ADD_SEALS with an integer argument on an fd we own.
    let added = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(added, 0, "F_ADD_SEALS");
    file
}

fn memfd_with(size: u64, flags: libc::c_uint) -> File {
    let name = CString::new("hostile-ram").unwrap();
    // SAFETY: a valid NUL-terminated name; memfd_create has no other inputs.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: the fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// A blocking eventfd (what a peer that cleared O_NONBLOCK on the shared description leaves).
fn blocking_eventfd(initial: u64) -> OwnedFd {
    // SAFETY: eventfd with integer arguments; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if initial > 0 {
        let bytes = initial.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an fd we own.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), 8) };
        assert_eq!(n, 8);
    }
    fd
}

fn clear_nonblock(fd: &OwnedFd) {
    // SAFETY: fcntl with integer arguments on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0);
    // SAFETY: as above.
    assert!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } >= 0);
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Descriptor `i` of the split-ring descriptor table at `table`, as a driver writes it.
fn write_descriptor(ram: &File, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write_all_at(&raw, table + 16 * i).unwrap();
}

fn read_u16(ram: &File, at: u64) -> u16 {
    let mut b = [0u8; 2];
    ram.read_exact_at(&mut b, at).unwrap();
    u16::from_le_bytes(b)
}

#[test]
fn a_silent_client_is_dropped_and_the_next_frontend_served() {
    let dir = TempDir::new("hostile-silent");
    let socket = dir.path("blk.sock");
    let (mut g, pid) = backend(&dir, &socket);
    let baseline = fd_count(pid);
    // Connects and says nothing: dropped after the handshake timeout (10 s).
    let silent = UnixStream::connect(&socket).unwrap();
    silent.set_read_timeout(Some(T)).unwrap();
    let mut byte = [0u8; 1];
    match std::io::Read::read(&mut &silent, &mut byte) {
        Ok(0) => {}
        other => panic!("the silent client was not dropped: {other:?}\n{}", g.log()),
    }
    assert!(
        g.log().contains("did not complete the handshake"),
        "{}",
        g.log()
    );
    drop(silent);
    assert_backend_recovers(&mut g, pid, baseline, &socket);
}

/// The peer clears O_NONBLOCK on its call and err eventfds (the open file description is shared
/// with the backend) and fills their counters: a completion (call fd, I/O thread), a ring that
/// cannot start (err fd, session thread) and stopping the ring must all go on.
#[test]
fn full_eventfds_on_a_shared_description_do_not_wedge_the_backend() {
    let dir = TempDir::new("hostile-eventfd");
    let socket = dir.path("blk.sock");
    let (mut g, pid) = backend(&dir, &socket);
    let baseline = fd_count(pid);
    {
        let fe = Raw::connect(&socket);
        fe.handshake();
        let ram = memfd(RAM);
        let table = MemoryTable {
            regions: vec![MemoryRegion {
                guest_phys_addr: 0,
                memory_size: RAM,
                userspace_addr: VA,
                mmap_offset: 0,
            }],
        };
        assert_eq!(
            fe.acked(Request::SetMemTable, &table.encode(), &[ram.as_fd()]),
            0
        );
        // An 8-entry ring at 0x1000 with one GET_ID request (header, 20-byte id, status).
        let (desc, avail, used) = (0x1000u64, 0x1080u64, 0x10a0u64);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&8u32.to_le_bytes()); // VIRTIO_BLK_T_GET_ID
        ram.write_all_at(&header, 0x2000).unwrap();
        write_descriptor(&ram, desc, 0, 0x2000, 16, VIRTQ_DESC_F_NEXT, 1);
        let writable_next = VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT;
        write_descriptor(&ram, desc, 1, 0x3000, 20, writable_next, 2);
        write_descriptor(&ram, desc, 2, 0x3100, 1, VIRTQ_DESC_F_WRITE, 0);
        ram.write_all_at(&0xffu8.to_le_bytes(), 0x3100).unwrap();
        ram.write_all_at(&0u16.to_le_bytes(), avail + 4).unwrap();
        ram.write_all_at(&1u16.to_le_bytes(), avail + 2).unwrap();

        assert_eq!(fe.vring(Request::SetVringNum, 0, 8), 0);
        assert_eq!(fe.vring(Request::SetVringBase, 0, 0), 0);
        assert_eq!(fe.ring_addr(desc, avail, used), 0);
        let call = blocking_eventfd(0);
        let err = blocking_eventfd(0);
        let kick = blocking_eventfd(0);
        assert_eq!(fe.vring_fd(Request::SetVringCall, call.as_fd()), 0);
        assert_eq!(fe.vring_fd(Request::SetVringErr, err.as_fd()), 0);
        // After the backend had its chance to set O_NONBLOCK: clear it, fill the counters.
        clear_nonblock(&call);
        clear_nonblock(&err);
        clear_nonblock(&kick);
        let full = FULL.to_ne_bytes();
        for fd in [&call, &err] {
            // SAFETY: writes 8 bytes from a live buffer to an fd we own.
            let n = unsafe { libc::write(fd.as_raw_fd(), full.as_ptr().cast(), 8) };
            assert_eq!(n, 8);
        }
        assert_eq!(fe.vring_fd(Request::SetVringKick, kick.as_fd()), 0);
        assert_eq!(fe.vring(Request::SetVringEnable, 0, 1), 0);
        // The request completes although its call fd cannot take the interrupt.
        let start = Instant::now();
        while read_u16(&ram, used + 2) != 1 {
            assert!(start.elapsed() < T, "request never completed\n{}", g.log());
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut status = [0u8; 1];
        ram.read_exact_at(&mut status, 0x3100).unwrap();
        assert_eq!(status[0], 0, "GET_ID status OK");

        // The peer drains its own kick fd while kicking: the dispatcher's read must not block.
        // (Our own drain must not block either: the backend may have emptied the counter first,
        // so it reads with RWF_NOWAIT, whatever the description's flags.)
        for _ in 0..100 {
            let one = 1u64.to_ne_bytes();
            let mut buf = [0u8; 8];
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: 8-byte transfers between live buffers and an fd we own; one valid iovec.
            unsafe {
                libc::write(kick.as_raw_fd(), one.as_ptr().cast(), 8);
                libc::preadv2(kick.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT);
            }
        }
        // A descriptor table that runs past the end of memory: the ring cannot start, which
        // the session thread reports on the (full, blocking) err fd.
        assert_eq!(fe.ring_addr(RAM - 16, avail, used), 0);
        // Still answering, and the ring stops (its worker is joined).
        let reply = {
            fe.send(
                Request::GetVringBase,
                &VringState { index: 0, num: 0 }.encode(),
                &[],
                false,
            );
            fe.reply(Request::GetVringBase)
        };
        assert_eq!(
            VringState::decode(&reply).unwrap(),
            VringState { index: 0, num: 1 }
        );
        assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
    }
    assert_backend_recovers(&mut g, pid, baseline, &socket);
}

/// A kick "eventfd" that is a regular file named to forge a log line: refused, and the name is
/// escaped in the backend's log.
#[test]
fn a_file_name_cannot_forge_a_backend_log_line() {
    let dir = TempDir::new("hostile-log");
    let socket = dir.path("blk.sock");
    let (mut g, pid) = backend(&dir, &socket);
    let baseline = fd_count(pid);
    {
        let fe = Raw::connect(&socket);
        fe.handshake();
        let forged = dir.path("kick\nERROR forged: the disk is corrupt");
        let file = File::create(&forged).unwrap();
        assert_ne!(fe.vring_fd(Request::SetVringKick, file.as_fd()), 0);
        assert_eq!(fe.get_u64(Request::GetQueueNum), 1);
    }
    let log = g.wait_for_log("is not an eventfd", T);
    assert!(
        !log.lines().any(|l| l.starts_with("ERROR forged")),
        "a forged line:\n{log}"
    );
    assert!(log.contains("kick\\nERROR forged"), "{log}");
    assert_backend_recovers(&mut g, pid, baseline, &socket);
}

/// A frontend shrinks its (unsealed, like QEMU's) memory fd after SET_MEM_TABLE, then publishes
/// a write and kicks. Before the `memory_faults` guard the backend died of SIGBUS (exit 135);
/// now the write fails without reaching the disk, the session is closed, and the next frontend
/// is served.
#[test]
fn a_memory_fd_shrunk_under_the_session_cannot_kill_the_backend() {
    /// The block the hostile write aims at: 0xee before, and after.
    const TARGET_BLOCK: u64 = 100;
    let dir = TempDir::new("hostile-shrink");
    let socket = dir.path("blk.sock");
    let (mut g, pid) = backend(&dir, &socket);
    let image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path("disk.img"))
        .unwrap();
    image
        .write_all_at(&[0xee; 4096], TARGET_BLOCK * 4096)
        .unwrap();
    let target_untouched = || {
        let mut block = vec![0u8; 4096];
        image
            .read_exact_at(&mut block, TARGET_BLOCK * 4096)
            .unwrap();
        block.iter().all(|b| *b == 0xee)
    };
    let baseline = fd_count(pid);
    {
        let fe = Raw::connect(&socket);
        fe.handshake();
        let ram = memfd(RAM);
        let (desc, avail, used) = (0x1000u64, 0x1080u64, 0x10a0u64);
        // The data page lies beyond the end the fd will shrink to; rings and header do not.
        let (header_at, status_at, data_at, shrunk) = (0x2000, 0x3100, 0xc_0000, 0x8_0000);
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        header[8..16].copy_from_slice(&(TARGET_BLOCK * 8).to_le_bytes()); // sector
        ram.write_all_at(&header, header_at).unwrap();
        ram.write_all_at(&[0x5a; 4096], data_at).unwrap();
        write_descriptor(&ram, desc, 0, header_at, 16, VIRTQ_DESC_F_NEXT, 1);
        write_descriptor(&ram, desc, 1, data_at, 4096, VIRTQ_DESC_F_NEXT, 2);
        write_descriptor(&ram, desc, 2, status_at, 1, VIRTQ_DESC_F_WRITE, 0);
        let table = MemoryTable {
            regions: vec![MemoryRegion {
                guest_phys_addr: 0,
                memory_size: RAM,
                userspace_addr: VA,
                mmap_offset: 0,
            }],
        };
        assert_eq!(
            fe.acked(Request::SetMemTable, &table.encode(), &[ram.as_fd()]),
            0
        );
        assert_eq!(fe.vring(Request::SetVringNum, 0, 8), 0);
        assert_eq!(fe.vring(Request::SetVringBase, 0, 0), 0);
        assert_eq!(fe.ring_addr(desc, avail, used), 0);
        let kick = blocking_eventfd(0);
        let call = blocking_eventfd(0);
        assert_eq!(fe.vring_fd(Request::SetVringKick, kick.as_fd()), 0);
        assert_eq!(fe.vring_fd(Request::SetVringCall, call.as_fd()), 0);
        assert_eq!(fe.vring(Request::SetVringEnable, 0, 1), 0);

        // The hostile part: the data page vanishes, then the request is published and the
        // doorbell rings. (Published before the shrink, the running ring could serve it first.)
        ram.set_len(shrunk).unwrap();
        ram.write_all_at(&0u16.to_le_bytes(), avail + 4).unwrap();
        ram.write_all_at(&1u16.to_le_bytes(), avail + 2).unwrap();
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an fd we own.
        let n = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), 8) };
        assert_eq!(n, 8);

        // The backend ends this session: a request finds the connection closed.
        let start = Instant::now();
        loop {
            let header = Header::for_request(Request::GetQueueNum, 0, false);
            let gone =
                send_message(&fe.0, &header, &[], &[]).is_err() || recv_message(&fe.0).is_err();
            if gone {
                break;
            }
            assert!(
                start.elapsed() < T,
                "the backend kept the session of a frontend whose memory vanished; log:\n{}",
                g.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    g.assert_running();
    g.wait_for_log("shrank under the session", T);
    assert!(
        target_untouched(),
        "the write from vanished memory reached the disk"
    );
    assert_backend_recovers(&mut g, pid, baseline, &socket);
    assert!(target_untouched());
}

/// Hostile GET/SET_INFLIGHT_FD values against the real backend (1 queue, rings up to 1024): each
/// GET gets "no buffer", each SET a failure ack, the backend keeps its fd count through every one (no received fd or
/// memfd of its own left open: the CVE-2022-0669 and CVE-2020-10726 classes), allocates nothing
/// from the values (4096 x 32768 would be 2 GiB), closes the connection for a bad SET without
/// NEED_REPLY, and serves the next frontend.
#[test]
fn hostile_inflight_messages_are_refused_without_leaking_fds() {
    let dir = TempDir::new("hostile-inflight");
    let socket = dir.path("blk.sock");
    let (mut g, pid) = backend(&dir, &socket);
    let baseline = fd_count(pid);
    {
        let fe = Raw::connect(&socket);
        fe.handshake();
        let in_session = fd_count(pid);
        for (queues, size) in [
            (0, 128),
            (2, 128),
            (u16::MAX, u16::MAX),
            (4096, 32768),
            (1, 0),
            (1, 100),
            (1, 2048),
        ] {
            // A GET has a reply of its own, so its failure form is "no buffer" (mmap_size 0,
            // no fd), which QEMU reads as "carry on untracked"; never a u64 ack it would misread.
            let (payload, fds) = fe.get_inflight(queues, size);
            assert_eq!(
                (
                    InflightDescription::decode(&payload).unwrap().mmap_size,
                    fds.len()
                ),
                (0, 0),
                "GET {queues}x{size}: no buffer"
            );
            assert_fd_count_settles(pid, in_session, &format!("GET {queues}x{size}"));
        }
        // Repeated good GETs: each a new sealed region; none kept by the backend.
        for _ in 0..3 {
            let (payload, fds) = fe.get_inflight(1, 128);
            let reply = InflightDescription::decode(&payload).unwrap();
            assert_eq!(
                (reply.mmap_size, reply.mmap_offset, fds.len()),
                (2112, 0, 1)
            );
            assert_fd_count_settles(pid, in_session, "repeated GET");
        }
        let good = InflightDescription {
            mmap_size: 2112,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 128,
        };
        let sealed = sealed_memfd(8192);
        let unsealed = memfd(8192);
        let (sock, _peer) = UnixStream::pair().unwrap();
        let pipe = blocking_eventfd(0); // not a file either
        let hostile: [(&str, InflightDescription, BorrowedFd<'_>); 12] = [
            (
                "no queues",
                InflightDescription {
                    num_queues: 0,
                    ..good
                },
                sealed.as_fd(),
            ),
            (
                "2 queues",
                InflightDescription {
                    num_queues: 2,
                    ..good
                },
                sealed.as_fd(),
            ),
            (
                "65535 queues",
                InflightDescription {
                    num_queues: u16::MAX,
                    ..good
                },
                sealed.as_fd(),
            ),
            (
                "queue size 96",
                InflightDescription {
                    queue_size: 96,
                    ..good
                },
                sealed.as_fd(),
            ),
            (
                "queue size 65535",
                InflightDescription {
                    queue_size: u16::MAX,
                    ..good
                },
                sealed.as_fd(),
            ),
            (
                "mmap_size too small",
                InflightDescription {
                    mmap_size: 64,
                    ..good
                },
                sealed.as_fd(),
            ),
            (
                "offset + size overflows",
                InflightDescription {
                    mmap_offset: 4096,
                    mmap_size: u64::MAX,
                    ..good
                },
                sealed.as_fd(),
            ),
            (
                "offset past the file",
                InflightDescription {
                    mmap_offset: 1 << 30,
                    ..good
                },
                sealed.as_fd(),
            ),
            (
                "unaligned offset",
                InflightDescription {
                    mmap_offset: 100,
                    ..good
                },
                sealed.as_fd(),
            ),
            ("an unsealed memfd", good, unsealed.as_fd()),
            ("a socket", good, sock.as_fd()),
            ("an eventfd", good, pipe.as_fd()),
        ];
        for (what, description, fd) in hostile {
            assert_ne!(fe.set_inflight(&description, fd), 0, "{what}");
            assert_fd_count_settles(pid, in_session, &format!("{what}: an fd stayed open"));
        }
        // A good SET is accepted (and its fd closed too: the mapping is not an fd).
        assert_eq!(fe.set_inflight(&good, sealed.as_fd()), 0);
        assert_fd_count_settles(pid, in_session, "after the hostile messages");
        // Without NEED_REPLY, a bad SET ends this connection.
        let bad = InflightDescription {
            num_queues: 9,
            ..good
        };
        fe.send(
            Request::SetInflightFd,
            &bad.encode(),
            &[sealed.as_fd()],
            false,
        );
        assert!(recv_message(&fe.0).is_err(), "the session went on");
    }
    g.assert_running();
    assert_backend_recovers(&mut g, pid, baseline, &socket);
}

/// Inflight recovery with a real kill: 64 writes on a ring of 256, completions delayed
/// (`--delay-completions`) so they finish out of order, the backend SIGKILLed once a few have
/// completed, a new backend process started; the frontend hands it the same region (SET, no GET)
/// and SET_VRING_BASE = used idx, as QEMU does after a crash. Every write completes exactly once,
/// with its data on the disk.
#[test]
fn a_backend_killed_mid_io_recovers_every_request_after_restart() {
    const N: u64 = 64;
    const RING: u16 = 256;
    let (desc, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
    let header_at = |n: u64| 0x10000 + n * 0x100;
    let status_at = |n: u64| header_at(n) + 0x20;
    let data_at = |n: u64| 0x40000 + n * 0x1000;
    let block = |n: u64| -> Vec<u8> { (0..4096u64).map(|i| ((n * 31 + i) % 251) as u8).collect() };
    let dir = TempDir::new("inflight-kill");
    let socket = dir.path("blk.sock");
    let image = zero_image(&dir, "disk.img", 16 << 20);
    let delay = ["--delay-completions", "2000-20000"];
    let ram = memfd(RAM);
    for n in 0..N {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
        header[8..16].copy_from_slice(&(n * 8).to_le_bytes()); // block n
        ram.write_all_at(&header, header_at(n)).unwrap();
        ram.write_all_at(&block(n), data_at(n)).unwrap();
        ram.write_all_at(&[0xff], status_at(n)).unwrap();
        let d = 3 * n;
        write_descriptor(
            &ram,
            desc,
            d,
            header_at(n),
            16,
            VIRTQ_DESC_F_NEXT,
            (d + 1) as u16,
        );
        write_descriptor(
            &ram,
            desc,
            d + 1,
            data_at(n),
            4096,
            VIRTQ_DESC_F_NEXT,
            (d + 2) as u16,
        );
        write_descriptor(&ram, desc, d + 2, status_at(n), 1, VIRTQ_DESC_F_WRITE, 0);
        ram.write_all_at(&(d as u16).to_le_bytes(), avail + 4 + 2 * n)
            .unwrap();
    }
    let table = MemoryTable {
        regions: vec![MemoryRegion {
            guest_phys_addr: 0,
            memory_size: RAM,
            userspace_addr: VA,
            mmap_offset: 0,
        }],
    };
    // One session's set-up, in QEMU's order; returns the frontend and its kick fd.
    let start = |region: Option<(&InflightDescription, BorrowedFd<'_>)>, base: u16| {
        let fe = Raw::connect(&socket);
        fe.handshake();
        let (description, fd) = region.expect("a region");
        assert_eq!(fe.set_inflight(description, fd), 0);
        assert_eq!(
            fe.acked(Request::SetMemTable, &table.encode(), &[ram.as_fd()]),
            0
        );
        assert_eq!(fe.vring(Request::SetVringNum, 0, u32::from(RING)), 0);
        assert_eq!(fe.vring(Request::SetVringBase, 0, u32::from(base)), 0);
        assert_eq!(fe.ring_addr(desc, avail, used), 0);
        let kick = blocking_eventfd(0);
        let call = blocking_eventfd(0);
        assert_eq!(fe.vring_fd(Request::SetVringKick, kick.as_fd()), 0);
        assert_eq!(fe.vring_fd(Request::SetVringCall, call.as_fd()), 0);
        assert_eq!(fe.vring(Request::SetVringEnable, 0, 1), 0);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an fd we own.
        let written = unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), 8) };
        assert_eq!(written, 8);
        (fe, kick, call)
    };
    let used_idx = || read_u16(&ram, used + 2);

    // First backend: GET a region, publish everything, kill it once a few writes completed.
    let (mut first, first_pid) = backend_on(&dir, &socket, &image, &delay, "first.log");
    let fe = Raw::connect(&socket);
    fe.handshake();
    let (payload, mut fds) = fe.get_inflight(1, RING);
    let description = InflightDescription::decode(&payload).unwrap();
    assert_eq!(fds.len(), 1);
    let region_fd = fds.pop().unwrap();
    drop(fe);
    ram.write_all_at(&(N as u16).to_le_bytes(), avail + 2)
        .unwrap();
    let session = start(Some((&description, region_fd.as_fd())), 0);
    let t = Instant::now();
    while used_idx() < 8 {
        assert!(t.elapsed() < T, "no completions; log:\n{}", first.log());
        std::thread::sleep(Duration::from_millis(1));
    }
    // SAFETY: kill with integer arguments, on the child we started (not yet reaped).
    let killed = unsafe { libc::kill(first_pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed, 0);
    let t = Instant::now();
    while first.exited().is_none() {
        assert!(t.elapsed() < T, "the killed backend did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(session);
    let seen = used_idx();
    assert!(u64::from(seen) < N, "everything completed before the kill");
    let region_bytes = {
        let mut b = vec![0u8; description.mmap_size as usize];
        File::from(region_fd.try_clone().unwrap())
            .read_exact_at(&mut b, 0)
            .unwrap();
        b
    };
    let left = InflightRegion::new(&region_bytes, 1, RING)
        .unwrap()
        .queue(0)
        .unwrap();
    assert!(left.inflight_count() > 0, "nothing in flight at the kill");

    // Second backend: a new process, given the same region with SET only.
    let (mut second, _) = backend_on(&dir, &socket, &image, &delay, "second.log");
    let session = start(Some((&description, region_fd.as_fd())), seen);
    let t = Instant::now();
    while u64::from(used_idx()) < N {
        second.assert_running();
        assert!(
            t.elapsed() < T,
            "used idx stuck at {}; log:\n{}",
            used_idx(),
            second.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Nothing more arrives: a repeated request would push the used idx past N.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(u64::from(used_idx()), N, "a request completed twice");
    let mut heads: Vec<u32> = (0..N)
        .map(|i| {
            let mut id = [0u8; 4];
            ram.read_exact_at(&mut id, used + 4 + 8 * i).unwrap();
            u32::from_le_bytes(id)
        })
        .collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..N as u32).map(|n| 3 * n).collect::<Vec<_>>());
    let disk = File::open(&image).unwrap();
    for n in 0..N {
        let mut status = [0u8; 1];
        ram.read_exact_at(&mut status, status_at(n)).unwrap();
        assert_eq!(status[0], 0, "request {n} status");
        let mut got = vec![0u8; 4096];
        disk.read_exact_at(&mut got, n * 4096).unwrap();
        assert!(got == block(n), "block {n} on disk");
    }
    let log = second.log();
    assert!(log.contains("resubmitting"), "{log}");
    drop(session);
    second.assert_running();
}
