//! [`ProbeMessage`]: one frontend message as the probe sends it. The well-formed ones are built
//! with the wire module's encoders (so they are exactly what a real frontend sends); the hostile
//! ones start from those and bend one thing: a header size that lies, a payload too long, fds
//! where none belong or too many of them.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::wire::{
    Header, InflightDescription, MemoryRegion, MemoryTable, Request, U64Payload, VringAddr,
    VringState, FLAG_NEED_REPLY, VERSION,
};

/// A message: header, payload and the fds that ride along (owned; closed when it is dropped).
/// `header.size` normally equals `payload.len()`; [`ProbeMessage::claiming_size`] makes it lie.
#[derive(Debug)]
pub struct ProbeMessage {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl ProbeMessage {
    /// `request` with `payload`; `need_reply` sets NEED_REPLY (a REPLY_ACK ack is due).
    pub fn new(request: Request, payload: Vec<u8>, need_reply: bool) -> ProbeMessage {
        ProbeMessage {
            header: Header::for_request(request, payload.len(), need_reply),
            payload,
            fds: Vec::new(),
        }
    }

    /// Any request code, also one the protocol does not define.
    pub fn raw_code(code: u32, payload: Vec<u8>, need_reply: bool) -> ProbeMessage {
        let flags = VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        ProbeMessage {
            header: Header {
                request: code,
                flags,
                size: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            },
            payload,
            fds: Vec::new(),
        }
    }

    /// The same message carrying `fds`.
    pub fn with_fds(mut self, fds: Vec<OwnedFd>) -> ProbeMessage {
        self.fds = fds;
        self
    }

    /// The same message with a header that claims `size` payload bytes, whatever follows.
    pub fn claiming_size(mut self, size: u32) -> ProbeMessage {
        self.header.size = size;
        self
    }

    /// A request without payload: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_OWNER.
    pub fn bare(request: Request, need_reply: bool) -> ProbeMessage {
        ProbeMessage::new(request, Vec::new(), need_reply)
    }

    /// SET_FEATURES, SET_PROTOCOL_FEATURES and the other u64 requests.
    pub fn u64(request: Request, value: u64, need_reply: bool) -> ProbeMessage {
        ProbeMessage::new(request, U64Payload(value).encode(), need_reply)
    }

    /// SET_VRING_NUM / SET_VRING_BASE / GET_VRING_BASE / SET_VRING_ENABLE.
    pub fn vring_state(request: Request, index: u32, num: u32, need_reply: bool) -> ProbeMessage {
        ProbeMessage::new(request, VringState { index, num }.encode(), need_reply)
    }

    /// SET_VRING_ADDR for queue `index` at these addresses (in the frontend's address space).
    pub fn vring_addr(
        index: u32,
        desc: u64,
        avail: u64,
        used: u64,
        need_reply: bool,
    ) -> ProbeMessage {
        let addr = VringAddr {
            index,
            flags: 0,
            desc_user_addr: desc,
            used_user_addr: used,
            avail_user_addr: avail,
            log_guest_addr: 0,
        };
        ProbeMessage::new(Request::SetVringAddr, addr.encode(), need_reply)
    }

    /// SET_VRING_KICK / CALL / ERR for queue `index` with `fd` (none: the NOFD bit, polling).
    pub fn vring_fd(
        request: Request,
        index: u8,
        fd: Option<OwnedFd>,
        need_reply: bool,
    ) -> ProbeMessage {
        // u64 payload: the queue index in bits 0-7, bit 8 set when no fd comes.
        let value = u64::from(index) | if fd.is_none() { 1 << 8 } else { 0 };
        ProbeMessage::u64(request, value, need_reply).with_fds(fd.into_iter().collect())
    }

    /// SET_MEM_TABLE: one region per fd.
    pub fn mem_table(
        regions: Vec<MemoryRegion>,
        fds: Vec<OwnedFd>,
        need_reply: bool,
    ) -> ProbeMessage {
        let payload = MemoryTable { regions }.encode();
        ProbeMessage::new(Request::SetMemTable, payload, need_reply).with_fds(fds)
    }

    /// GET_INFLIGHT_FD for `num_queues` rings of `queue_size` entries (the sizes are the asker's,
    /// as in QEMU: mmap_size and mmap_offset are sent as 0).
    pub fn get_inflight(num_queues: u16, queue_size: u16) -> ProbeMessage {
        let asked = InflightDescription {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        ProbeMessage::new(Request::GetInflightFd, asked.encode(), false)
    }

    /// SET_INFLIGHT_FD describing `description`, with `fds` attached (normally exactly one).
    pub fn set_inflight(
        description: InflightDescription,
        fds: Vec<OwnedFd>,
        need_reply: bool,
    ) -> ProbeMessage {
        ProbeMessage::new(Request::SetInflightFd, description.encode(), need_reply).with_fds(fds)
    }

    /// The request this message names, if the code is one the protocol defines.
    pub fn request(&self) -> Option<Request> {
        Request::from_code(self.header.request).ok()
    }

    /// A name for logs and evidence: `GET_INFLIGHT_FD` or `request 9999`.
    pub fn name(&self) -> String {
        match self.request() {
            Some(r) => r.name().to_string(),
            None => format!("request {}", self.header.request),
        }
    }

    /// Header and payload as they go on the wire.
    pub fn bytes(&self) -> Vec<u8> {
        let mut bytes = self.header.to_bytes();
        bytes.extend_from_slice(&self.payload);
        bytes
    }

    /// The fds, borrowed for one send.
    pub fn borrowed_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.fds.iter().map(AsFd::as_fd).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FrontendMessage, Header, HEADER_SIZE};

    /// What the probe builds as well-formed is what our own decoder accepts.
    #[test]
    fn the_well_formed_builders_decode_as_the_requests_they_name() {
        for m in [
            ProbeMessage::bare(Request::GetFeatures, false),
            ProbeMessage::u64(Request::SetFeatures, 1 << 32, false),
            ProbeMessage::vring_state(Request::SetVringNum, 0, 256, true),
            ProbeMessage::vring_addr(0, 0x1000, 0x2000, 0x3000, true),
            ProbeMessage::get_inflight(1, 256),
        ] {
            let bytes = m.bytes();
            let header = Header::decode(&bytes[..HEADER_SIZE]).unwrap();
            let decoded =
                FrontendMessage::decode(&header, &bytes[HEADER_SIZE..], Vec::new()).unwrap();
            assert_eq!(Some(decoded.request()), m.request(), "{}", m.name());
        }
    }

    #[test]
    fn a_lying_size_and_an_unknown_code_go_out_as_asked() {
        let m = ProbeMessage::u64(Request::SetFeatures, 0, false).claiming_size(0x7fff_ffff);
        assert_eq!(&m.bytes()[8..12], &0x7fff_ffffu32.to_le_bytes());
        assert_eq!(m.bytes().len(), HEADER_SIZE + 8);
        let unknown = ProbeMessage::raw_code(9999, vec![], true);
        assert_eq!(unknown.name(), "request 9999");
        assert!(unknown.header.need_reply());
    }
}
