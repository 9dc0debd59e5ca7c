//! A guest the probe plays: 1 MiB of "guest RAM" in a memfd and one 8-entry split ring on
//! queue 0 holding one request, so that checks can get a backend to start a ring and touch
//! guest memory (then shrink that memory, or fill the eventfds, or hand it a hostile inflight
//! region) without a VM.
//!
//! ```text
//!  RAM (guest physical 0, at VA in the "frontend's" address space)
//!  0x1000 descriptor table (8 x 16)   0x1080 avail ring   0x10a0 used ring
//!  0x2000 request header (virtio-blk GET_ID)   0x3000 20-byte id buffer   0x3100 status byte
//! ```
//! The request is a virtio-blk GET_ID; other devices see three descriptors they may not
//! understand, which is fine: the checks judge survival, not what a device makes of them.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;

use vhost_frontend::probe::fds::{eventfd, memfd};
use vhost_frontend::probe::ProbeMessage;
use vhost_frontend::wire::MemoryRegion;
use vhost_frontend::Request;

use super::checks::setup_failed;
use super::context::Session;
use super::Outcome;

/// Where the probe claims its guest RAM lives in its own address space.
pub const VA: u64 = 0x7f00_0000_0000;
pub const RAM_SIZE: u64 = 1 << 20;
pub const RING_SIZE: u16 = 8;
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x1080;
pub const USED: u64 = 0x10a0;
pub const STATUS: u64 = 0x3100;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// VIRTIO_BLK_T_GET_ID.
const BLK_T_GET_ID: u32 = 8;

/// The probe's guest RAM with one request on queue 0's avail ring.
pub struct GuestRam {
    pub file: File,
}

impl GuestRam {
    /// RAM with the ring laid out; `sealed` makes it a memfd that cannot shrink.
    pub fn new(sealed: bool) -> Result<GuestRam, String> {
        let file = memfd(c"vmm-probe-ram", RAM_SIZE, sealed).map_err(|e| format!("memfd: {e}"))?;
        let ram = GuestRam { file };
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&BLK_T_GET_ID.to_le_bytes());
        ram.write(0x2000, &header)?;
        ram.descriptor(0, 0x2000, 16, F_NEXT, 1)?;
        ram.descriptor(1, 0x3000, 20, F_WRITE | F_NEXT, 2)?;
        ram.descriptor(2, STATUS, 1, F_WRITE, 0)?;
        ram.write(STATUS, &[0xff])?;
        // avail: flags 0, idx 1, ring[0] = head 0.
        ram.write(AVAIL + 4, &0u16.to_le_bytes())?;
        ram.write(AVAIL + 2, &1u16.to_le_bytes())?;
        Ok(ram)
    }

    pub fn write(&self, at: u64, bytes: &[u8]) -> Result<(), String> {
        self.file
            .write_all_at(bytes, at)
            .map_err(|e| format!("writing guest RAM at {at:#x}: {e}"))
    }

    pub fn read_u16(&self, at: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        self.file.read_exact_at(&mut b, at).ok()?;
        Some(u16::from_le_bytes(b))
    }

    fn descriptor(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) -> Result<(), String> {
        write_descriptor(&self.file, DESC, i, addr, len, flags, next)
    }

    /// SET_MEM_TABLE with this RAM as one region.
    pub fn mem_table(&self) -> Result<ProbeMessage, String> {
        let fd = OwnedFd::from(self.file.try_clone().map_err(|e| format!("dup: {e}"))?);
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: RAM_SIZE,
            userspace_addr: VA,
            mmap_offset: 0,
        };
        Ok(ProbeMessage::mem_table(vec![region], vec![fd], false))
    }

    /// Whether queue 0's used index reached 1 (the request completed).
    pub fn completed(&self) -> bool {
        self.read_u16(USED + 2) == Some(1)
    }
}

/// Descriptor `i` of the split-ring table at `table` in `ram`, as a driver writes it.
pub fn write_descriptor(
    ram: &File,
    table: u64,
    i: u64,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), String> {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    ram.write_all_at(&raw, table + 16 * i)
        .map_err(|e| format!("writing descriptor {i}: {e}"))
}

/// Guest RAM as `s`'s memory table, queue 0 configured on it (not started), and its eventfds;
/// `sealed` RAM cannot shrink. `Err`: the check's verdict (set-up failed).
pub fn ring_setup(s: &Session, sealed: bool) -> Result<(GuestRam, RingFds), Outcome> {
    let ram = GuestRam::new(sealed).map_err(setup_failed)?;
    let fds = RingFds::new().map_err(setup_failed)?;
    ram.mem_table()
        .and_then(|m| s.setup(m))
        .and_then(|()| configure_queue0(s))
        .map_err(setup_failed)?;
    Ok((ram, fds))
}

/// The eventfds of queue 0.
pub struct RingFds {
    pub kick: OwnedFd,
    pub call: OwnedFd,
    pub err: OwnedFd,
}

impl RingFds {
    pub fn new() -> Result<RingFds, String> {
        let e = || eventfd(true, 0).map_err(|e| format!("eventfd: {e}"));
        Ok(RingFds {
            kick: e()?,
            call: e()?,
            err: e()?,
        })
    }
}

/// Size, base and addresses of queue 0 (the ring is not started: no kick fd yet).
pub fn configure_queue0(s: &Session) -> Result<(), String> {
    configure_queue(s, RING_SIZE, 0, [DESC, AVAIL, USED])
}

/// Queue 0 with `size` entries from avail index `base`, its parts at these guest addresses.
pub fn configure_queue(s: &Session, size: u16, base: u32, at: [u64; 3]) -> Result<(), String> {
    let [desc, avail, used] = at;
    let num = ProbeMessage::vring_state(Request::SetVringNum, 0, u32::from(size), false);
    s.setup(num)?;
    s.setup(ProbeMessage::vring_state(
        Request::SetVringBase,
        0,
        base,
        false,
    ))?;
    s.setup(ProbeMessage::vring_addr(
        0,
        VA + desc,
        VA + avail,
        VA + used,
        false,
    ))
}

/// Hands over the call and err fds (dups; the caller keeps its own) and then the kick fd, and
/// enables the ring (`enable`: SET_VRING_ENABLE, which exists only with PROTOCOL_FEATURES): it
/// starts, and the backend reads the avail ring.
pub fn start_queue0(s: &Session, fds: &RingFds, enable: bool) -> Result<(), String> {
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("dup: {e}"));
    s.setup(ProbeMessage::vring_fd(
        Request::SetVringCall,
        0,
        Some(dup(&fds.call)?),
        false,
    ))?;
    s.setup(ProbeMessage::vring_fd(
        Request::SetVringErr,
        0,
        Some(dup(&fds.err)?),
        false,
    ))?;
    s.setup(ProbeMessage::vring_fd(
        Request::SetVringKick,
        0,
        Some(dup(&fds.kick)?),
        false,
    ))?;
    if enable {
        s.setup(ProbeMessage::vring_state(
            Request::SetVringEnable,
            0,
            1,
            false,
        ))?;
    }
    vhost_frontend::probe::fds::add_to_eventfd(&fds.kick, 1).map_err(|e| format!("kick: {e}"))
}
