//! A fake vhost-user frontend for tests: raw wire messages over a socket, the smallest thing that
//! can drive a session (no `vhost_frontend::connection`, whose own checks would hide the
//! server's answers). Used by the server's tests and the blk backend's.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost_frontend::wire::{
    recv_message, send_message, ConfigSpace, Header, InflightDescription, MemoryRegion,
    MemoryTable, Request, U64Payload, VringAddr, VringFdIndex, VringState,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::test_util::{wait_readable, TestRing};

/// Where the fake frontend pretends guest RAM is mapped in its own address space.
pub const FRONTEND_VA: u64 = 0x7f12_3400_0000;

/// The smallest frontend that can drive the backend: raw wire messages over the socket.
pub struct FakeFrontend {
    pub stream: UnixStream,
}

impl FakeFrontend {
    pub fn send(&self, request: Request, payload: &[u8], fds: &[BorrowedFd<'_>], need_reply: bool) {
        let header = Header::for_request(request, payload.len(), need_reply);
        send_message(&self.stream, &header, payload, fds).expect("send");
    }

    pub fn recv_reply(&self, request: Request) -> Vec<u8> {
        let (header, payload, fds) = recv_message(&self.stream).expect("reply");
        assert_eq!(header.request, request.code(), "reply to the right request");
        assert!(header.is_reply());
        assert!(fds.is_empty());
        payload
    }

    pub fn get_u64(&self, request: Request) -> u64 {
        self.send(request, &[], &[], false);
        U64Payload::decode(&self.recv_reply(request)).unwrap().0
    }

    /// Sends with NEED_REPLY and returns the ack value (0 = success).
    pub fn acked(&self, request: Request, payload: &[u8], fds: &[BorrowedFd<'_>]) -> u64 {
        self.send(request, payload, fds, true);
        U64Payload::decode(&self.recv_reply(request)).unwrap().0
    }

    pub fn vring(&self, request: Request, index: u32, num: u32) -> u64 {
        self.acked(request, &VringState { index, num }.encode(), &[])
    }

    pub fn vring_fd(&self, request: Request, index: u8, fd: &impl AsRawFd) -> u64 {
        let payload = VringFdIndex {
            index,
            no_fd: false,
        }
        .encode();
        // SAFETY: `fd` is borrowed for this call, so the descriptor stays open while sent.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        self.acked(request, &payload, &[borrowed])
    }

    /// GET_INFLIGHT_FD; the raw reply (header, payload, fds).
    pub fn get_inflight(
        &self,
        num_queues: u16,
        queue_size: u16,
        need_reply: bool,
    ) -> (Header, Vec<u8>, Vec<OwnedFd>) {
        let asked = InflightDescription {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        self.send(Request::GetInflightFd, &asked.encode(), &[], need_reply);
        recv_message(&self.stream).expect("GET_INFLIGHT_FD reply")
    }

    pub fn set_inflight(&self, description: &InflightDescription, fd: &impl AsFd) -> u64 {
        self.acked(Request::SetInflightFd, &description.encode(), &[fd.as_fd()])
    }

    /// GET_CONFIG of a window: the bytes, or empty when the backend refused the window.
    pub fn recv_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.send(
            Request::GetConfig,
            &ConfigSpace::request(offset, size).unwrap().encode(),
            &[],
            false,
        );
        let reply = self.recv_reply(Request::GetConfig);
        if reply.is_empty() {
            return reply;
        }
        let space = ConfigSpace::decode(&reply).unwrap();
        assert_eq!((space.offset, space.size()), (offset, size));
        space.payload
    }
}

/// Sends the memory table and sets queue 0 up on `ring`; returns the kick and call eventfds.
pub fn start_queue(
    fe: &FakeFrontend,
    ram: &std::fs::File,
    ram_size: u64,
    ring: &TestRing,
) -> (EventFd, EventFd) {
    let table = MemoryTable {
        regions: vec![MemoryRegion {
            guest_phys_addr: 0,
            memory_size: ram_size,
            userspace_addr: FRONTEND_VA,
            mmap_offset: 0,
        }],
    };
    assert_eq!(
        fe.acked(Request::SetMemTable, &table.encode(), &[ram.as_fd()]),
        0
    );
    assert_eq!(fe.vring(Request::SetVringNum, 0, u32::from(ring.size)), 0);
    assert_eq!(fe.vring(Request::SetVringBase, 0, 0), 0);
    let addr = VringAddr {
        index: 0,
        flags: 0,
        desc_user_addr: FRONTEND_VA + ring.rings.desc_table.0,
        used_user_addr: FRONTEND_VA + ring.rings.used_ring.0,
        avail_user_addr: FRONTEND_VA + ring.rings.avail_ring.0,
        log_guest_addr: 0,
    };
    assert_eq!(fe.acked(Request::SetVringAddr, &addr.encode(), &[]), 0);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(fe.vring_fd(Request::SetVringKick, 0, &kick), 0);
    assert_eq!(fe.vring_fd(Request::SetVringCall, 0, &call), 0);
    assert_eq!(fe.vring(Request::SetVringEnable, 0, 1), 0);
    (kick, call)
}

/// Waits (bounded, failing loudly) for an interrupt, and consumes it.
pub fn wait_call(call: &EventFd) {
    assert!(
        wait_readable(call, Duration::from_secs(10)),
        "no interrupt from the backend"
    );
    call.read().unwrap();
}
