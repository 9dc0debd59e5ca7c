//! One virtio-blk request: parsed from a descriptor chain, then executed against the disk.
//!
//! A request chain is, in order (virtio 1.x §5.2.6):
//!   - readable bytes: a 16-byte header `{ le32 type, le32 reserved, le64 sector }`, then for
//!     OUT the data to write;
//!   - writable bytes: for IN the buffer to read into, for GET_ID the 20-byte id buffer;
//!   - the last writable byte: the status the device writes (OK, IOERR, UNSUPP).
//!
//! With VERSION_1 the split between descriptors is arbitrary (ANY_LAYOUT), so the parser treats
//! the readable and the writable descriptors as two byte streams. Everything in the chain comes
//! from the guest: a chain that is cut short, out of order, or points outside guest memory fails
//! that one request with IOERR when there is a status byte to say so. When there is none, the
//! request is completed with used length 0 and a log line: it cannot be answered any better.
//!
//! Parsing happens on the queue's dispatcher thread and yields plain guest addresses, so the
//! request can move to an I/O thread without borrowing the ring.

use std::ops::Deref;

use tracing::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{
    Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions,
};

use super::disk::{Disk, RangeError, DISK_ID_LEN};
use crate::vhost_user_server::memory_faults::thread_faults;

/// Size of the request header (struct virtio_blk_outhdr).
pub const REQUEST_HEADER_LEN: usize = 16;
/// Longest chain accepted. The chain iterator already stops at the ring size (or an indirect
/// table's size, up to 65535); this keeps the per-request descriptor list small whatever the guest
/// builds. Real drivers stay under seg_max + 2.
pub const MAX_CHAIN_DESCRIPTORS: usize = 4096;
/// Bytes moved per pread/pwrite: a bounce buffer of this size per I/O thread bounds the memory a
/// guest can make us allocate, whatever lengths its descriptors claim.
const COPY_CHUNK: usize = 64 * 1024;

/// A run of guest memory named by one descriptor, or by part of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuffer {
    pub addr: GuestAddress,
    pub len: u32,
}

/// The request types this device executes; everything else is answered UNSUPP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl RequestKind {
    fn from_type(request_type: u32) -> Self {
        match request_type {
            VIRTIO_BLK_T_IN => RequestKind::In,
            VIRTIO_BLK_T_OUT => RequestKind::Out,
            VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
            VIRTIO_BLK_T_GET_ID => RequestKind::GetId,
            other => RequestKind::Unsupported(other),
        }
    }
}

/// A well-formed request, reduced to what executing it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestBody {
    pub kind: RequestKind,
    pub sector: u64,
    /// Readable bytes after the header (the data of an OUT).
    pub readable_data: Vec<GuestBuffer>,
    /// Writable bytes before the status byte (the buffer of an IN or GET_ID).
    pub writable_data: Vec<GuestBuffer>,
}

/// Why a request failed; everything but `Unsupported` is reported to the guest as IOERR.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("malformed chain: {0}")]
    Malformed(&'static str),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("write to a readonly disk")]
    ReadOnly,
    #[error("data buffer at {addr:#x} len {len} is not in guest memory")]
    BadBuffer { addr: u64, len: u32 },
    #[error("{0}")]
    Range(#[from] RangeError),
    #[error("guest memory access failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("disk I/O failed: {0}")]
    Disk(#[from] std::io::Error),
    #[error("guest memory vanished under the request (the frontend shrank its memory fd)")]
    MemoryVanished,
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A request taken off the avail ring.
#[derive(Debug)]
pub struct BlkRequest {
    /// Head descriptor index: what goes back into the used ring.
    pub head: u16,
    /// Where the status byte goes; `None` when the chain has no writable last byte in memory.
    pub status_addr: Option<GuestAddress>,
    pub body: Result<RequestBody, RequestError>,
}

/// What the used ring gets for a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    /// Bytes the device wrote into the chain's writable buffers (data + status).
    pub used_len: u32,
    /// The status byte written, if the chain had room for one.
    pub status: Option<u8>,
}

impl BlkRequest {
    /// Walks the chain (reading descriptors and the header from guest memory) and classifies it.
    pub fn parse<M>(chain: DescriptorChain<M>) -> Self
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mut descriptors = Vec::new();
        let mut cut_short = false;
        for desc in chain.clone() {
            if descriptors.len() == MAX_CHAIN_DESCRIPTORS {
                // Treated like a cut chain: the status byte is whatever the last kept
                // descriptor ends with, if it is writable.
                cut_short = true;
                break;
            }
            cut_short = desc.has_next();
            descriptors.push(GuestDescriptor {
                addr: desc.addr(),
                len: desc.len(),
                writable: desc.is_write_only(),
            });
        }
        // The iterator stops silently at a descriptor it cannot read (bad index, table outside
        // memory, broken indirect table, a loop): a last descriptor that still says NEXT means
        // the chain was cut there.
        let mem = chain.memory();

        let status_addr = descriptors
            .last()
            .filter(|d| d.writable && d.len > 0)
            .and_then(|d| d.addr.0.checked_add(u64::from(d.len) - 1))
            .map(GuestAddress)
            .filter(|&a| GuestMemory::check_range(mem, a, 1, Permissions::Write));

        let body = if cut_short {
            Err(RequestError::Malformed("descriptor chain is cut short"))
        } else {
            parse_body(mem, &descriptors)
        };
        BlkRequest {
            head,
            status_addr,
            body,
        }
    }

    /// Executes the request, writes its status byte, and says what to put in the used ring.
    pub fn execute(&self, mem: &GuestMemoryMmap, disk: &Disk) -> Completion {
        let Some(status_addr) = self.status_addr else {
            warn!(
                head = self.head,
                "virtio-blk request has no status byte; completing it with length 0 unexecuted"
            );
            return Completion {
                head: self.head,
                used_len: 0,
                status: None,
            };
        };
        let (status, data_written) = match self.body.as_ref() {
            Err(e) => {
                debug!(head = self.head, "virtio-blk request refused: {e}");
                (e.status(), 0)
            }
            Ok(body) => match execute_checked(body, mem, disk) {
                Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
                Err(e) => {
                    match e {
                        RequestError::Disk(_) => warn!(head = self.head, "virtio-blk: {e}"),
                        _ => debug!(head = self.head, "virtio-blk request failed: {e}"),
                    }
                    (e.status(), 0)
                }
            },
        };
        finish(mem, self.head, status_addr, status, data_written)
    }

    /// The disk transfer of an IN or OUT that passes every check [`execute`](Self::execute)
    /// makes before it moves bytes: a status byte, a well-formed body, a writable disk for OUT,
    /// a byte range inside the disk, data buffers inside guest memory. `None` for every other
    /// request, and for one that fails a check: `execute` runs (or refuses) those as usual.
    pub fn transfer(&self, mem: &GuestMemoryMmap, disk: &Disk) -> Option<Transfer<'_>> {
        let status_addr = self.status_addr?;
        let body = self.body.as_ref().ok()?;
        let (write, buffers) = match body.kind {
            RequestKind::In => (false, &body.writable_data),
            RequestKind::Out if !disk.is_readonly() => (true, &body.readable_data),
            _ => return None,
        };
        let len = total_len(buffers);
        let offset = disk.byte_range(body.sector, len).ok()?;
        check_buffers(mem, buffers).ok()?;
        Some(Transfer {
            status_addr,
            write,
            offset,
            buffers,
            len,
        })
    }
}

/// A checked read (IN) or write (OUT) of a request, for an engine that moves the bytes itself
/// (`uring_path`); see [`BlkRequest::transfer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer<'a> {
    pub status_addr: GuestAddress,
    /// OUT: the buffers go to the disk. IN: the disk goes into the buffers.
    pub write: bool,
    /// Byte offset on the disk (inside it: checked).
    pub offset: u64,
    /// The data buffers, each in guest memory (checked), possibly across adjacent regions.
    pub buffers: &'a [GuestBuffer],
    /// Their total length, a multiple of the sector size.
    pub len: u64,
}

/// Writes a finished request's status byte and says what the used ring gets: `data_written`
/// bytes of data in the chain's writable buffers plus the status byte (length 0 and no status
/// when the byte cannot be written).
pub fn finish(
    mem: &GuestMemoryMmap,
    head: u16,
    status_addr: GuestAddress,
    status: u8,
    data_written: u32,
) -> Completion {
    if let Err(e) = mem.write_obj(status, status_addr) {
        // The address was checked at parse time against this same memory; keep going anyway.
        warn!(head, "cannot write virtio-blk status byte: {e}");
        return Completion {
            head,
            used_len: 0,
            status: None,
        };
    }
    Completion {
        head,
        used_len: data_written.saturating_add(1),
        status: Some(status),
    }
}

#[derive(Debug, Clone, Copy)]
struct GuestDescriptor {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

fn parse_body<M: GuestMemory + ?Sized>(
    mem: &M,
    descriptors: &[GuestDescriptor],
) -> Result<RequestBody, RequestError> {
    let readable_count = descriptors.iter().take_while(|d| !d.writable).count();
    let (readable, writable) = descriptors.split_at(readable_count);
    if writable.iter().any(|d| !d.writable) {
        return Err(RequestError::Malformed(
            "readable descriptor after a writable one",
        ));
    }
    let Some((status_desc, writable_data)) = writable.split_last() else {
        return Err(RequestError::Malformed("no writable status descriptor"));
    };

    let mut header = [0u8; REQUEST_HEADER_LEN];
    let readable_data = read_prefix(mem, readable, &mut header)?;
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);

    let mut writable_data: Vec<GuestBuffer> = writable_data
        .iter()
        .map(|d| GuestBuffer {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    // The status descriptor may also carry data: everything but its last byte.
    if status_desc.len > 1 {
        writable_data.push(GuestBuffer {
            addr: status_desc.addr,
            len: status_desc.len - 1,
        });
    }
    Ok(RequestBody {
        kind: RequestKind::from_type(request_type),
        sector: u64::from_le_bytes(sector_bytes),
        readable_data,
        writable_data: writable_data.into_iter().filter(|b| b.len > 0).collect(),
    })
}

/// Fills `header` from the start of the readable stream and returns the rest of the stream.
fn read_prefix<M: GuestMemory + ?Sized>(
    mem: &M,
    readable: &[GuestDescriptor],
    header: &mut [u8],
) -> Result<Vec<GuestBuffer>, RequestError> {
    let mut filled = 0usize;
    let mut rest = Vec::new();
    for desc in readable {
        let want = header.len() - filled;
        let take = want.min(desc.len as usize);
        if take > 0 {
            mem.read_slice(&mut header[filled..filled + take], desc.addr)
                .map_err(|_| RequestError::Malformed("request header is not in guest memory"))?;
            filled += take;
        }
        let remaining = desc.len - take as u32;
        if remaining > 0 {
            let addr = desc
                .addr
                .0
                .checked_add(take as u64)
                .ok_or(RequestError::Malformed("descriptor address overflows"))?;
            rest.push(GuestBuffer {
                addr: GuestAddress(addr),
                len: remaining,
            });
        }
    }
    if filled < header.len() {
        return Err(RequestError::Malformed(
            "request header is shorter than 16 bytes",
        ));
    }
    Ok(rest)
}

/// `execute_body`, failed if any guest page it touched vanished (what it read or wrote there
/// was a stand-in zero page, not the guest's memory).
fn execute_checked(
    body: &RequestBody,
    mem: &GuestMemoryMmap,
    disk: &Disk,
) -> Result<u32, RequestError> {
    let faults = thread_faults();
    let result = execute_body(body, mem, disk);
    if thread_faults() != faults {
        return Err(RequestError::MemoryVanished);
    }
    result
}

/// Returns how many bytes were written into the chain's writable data buffers.
fn execute_body(
    body: &RequestBody,
    mem: &GuestMemoryMmap,
    disk: &Disk,
) -> Result<u32, RequestError> {
    match body.kind {
        RequestKind::In => {
            let len = total_len(&body.writable_data);
            let offset = disk.byte_range(body.sector, len)?;
            check_buffers(mem, &body.writable_data)?;
            copy_disk_to_guest(disk, offset, &body.writable_data, mem)?;
            Ok(u32::try_from(len).unwrap_or(u32::MAX))
        }
        RequestKind::Out => {
            if disk.is_readonly() {
                return Err(RequestError::ReadOnly);
            }
            let len = total_len(&body.readable_data);
            let offset = disk.byte_range(body.sector, len)?;
            check_buffers(mem, &body.readable_data)?;
            copy_guest_to_disk(mem, &body.readable_data, disk, offset)?;
            Ok(0)
        }
        RequestKind::Flush => {
            disk.flush()?;
            Ok(0)
        }
        RequestKind::GetId => {
            check_buffers(mem, &body.writable_data)?;
            write_to_buffers(mem, &body.writable_data, disk.id())
        }
        RequestKind::Unsupported(t) => Err(RequestError::Unsupported(t)),
    }
}

/// Sum of buffer lengths; cannot overflow a u64 (at most 65536 descriptors of < 4 GiB).
fn total_len(buffers: &[GuestBuffer]) -> u64 {
    buffers.iter().map(|b| u64::from(b.len)).sum()
}

fn check_buffers(mem: &GuestMemoryMmap, buffers: &[GuestBuffer]) -> Result<(), RequestError> {
    for b in buffers {
        if !GuestMemoryBackend::check_range(mem, b.addr, b.len as usize) {
            return Err(RequestError::BadBuffer {
                addr: b.addr.0,
                len: b.len,
            });
        }
    }
    Ok(())
}

/// The bounce buffer between guest memory and the disk: one per thread, reused by every request
/// it runs (no allocation or zeroing per request), aligned to 4 KiB so that an image opened with
/// O_DIRECT can be read and written through it.
#[repr(C, align(4096))]
struct Bounce([u8; COPY_CHUNK]);

thread_local! {
    static BOUNCE: std::cell::RefCell<Box<Bounce>> =
        std::cell::RefCell::new(Box::new(Bounce([0; COPY_CHUNK])));
}

/// Runs `f` with this thread's bounce buffer.
fn with_bounce<T>(f: impl FnOnce(&mut [u8; COPY_CHUNK]) -> T) -> T {
    BOUNCE.with(|bounce| f(&mut bounce.borrow_mut().0))
}

/// A position in a list of guest buffers, read or written as one byte stream: the disk side
/// moves whole COPY_CHUNK pieces of the request (sector multiples, as O_DIRECT needs), whatever
/// the guest's split into descriptors.
struct BufferCursor<'a> {
    buffers: &'a [GuestBuffer],
    index: usize,
    within: usize,
}

impl<'a> BufferCursor<'a> {
    fn new(buffers: &'a [GuestBuffer]) -> Self {
        BufferCursor {
            buffers,
            index: 0,
            within: 0,
        }
    }

    /// Calls `f(guest address, n)` for successive runs of the buffers covering `len` bytes, and
    /// moves past them. check_buffers proved every buffer lies in memory, so no sum overflows.
    fn advance(
        &mut self,
        mut len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), RequestError>,
    ) -> Result<(), RequestError> {
        let mut done = 0;
        while len > 0 {
            let Some(b) = self.buffers.get(self.index) else {
                return Ok(()); // the caller never asks for more than the buffers hold
            };
            let room = b.len as usize - self.within;
            let n = room.min(len);
            if n > 0 {
                f(GuestAddress(b.addr.0 + self.within as u64), done, n)?;
            }
            done += n;
            len -= n;
            self.within += n;
            if self.within == b.len as usize {
                self.index += 1;
                self.within = 0;
            }
        }
        Ok(())
    }
}

fn copy_disk_to_guest(
    disk: &Disk,
    offset: u64,
    buffers: &[GuestBuffer],
    mem: &GuestMemoryMmap,
) -> Result<(), RequestError> {
    let total = total_len(buffers);
    let mut cursor = BufferCursor::new(buffers);
    with_bounce(|bounce| {
        let mut done = 0u64;
        while done < total {
            // At most COPY_CHUNK: fits a usize.
            let n = (total - done).min(COPY_CHUNK as u64) as usize;
            disk.read_exact_at(&mut bounce[..n], offset + done)?;
            cursor.advance(n, |addr, at, len| {
                mem.write_slice(&bounce[at..at + len], addr)?;
                Ok(())
            })?;
            done += n as u64;
        }
        Ok(())
    })
}

fn copy_guest_to_disk(
    mem: &GuestMemoryMmap,
    buffers: &[GuestBuffer],
    disk: &Disk,
    offset: u64,
) -> Result<(), RequestError> {
    let total = total_len(buffers);
    let mut cursor = BufferCursor::new(buffers);
    with_bounce(|bounce| {
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(COPY_CHUNK as u64) as usize;
            let faults = thread_faults();
            cursor.advance(n, |addr, at, len| {
                mem.read_slice(&mut bounce[at..at + len], addr)?;
                Ok(())
            })?;
            // A page that vanished under the copy read as zeros: never write those to the disk.
            if thread_faults() != faults {
                return Err(RequestError::MemoryVanished);
            }
            disk.write_all_at(&bounce[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    })
}

/// Writes as much of `bytes` as the buffers hold; returns the count written.
fn write_to_buffers(
    mem: &GuestMemoryMmap,
    buffers: &[GuestBuffer],
    bytes: &[u8; DISK_ID_LEN],
) -> Result<u32, RequestError> {
    let mut written = 0usize;
    for b in buffers {
        if written == bytes.len() {
            break;
        }
        let n = (b.len as usize).min(bytes.len() - written);
        mem.write_slice(&bytes[written..written + n], b.addr)?;
        written += n;
    }
    Ok(written as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{
        guest_memory, memfd_disk, pop_chain, request_header, TestRing, VIRTQ_DESC_F_NEXT,
        VIRTQ_DESC_F_WRITE,
    };
    use std::os::unix::fs::FileExt;

    const HEADER: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    struct Fixture {
        mem: crate::vhost_user_server::memory::MappedMemory,
        ring: TestRing,
        disk: Disk,
        disk_file: std::fs::File,
        submitted: u16,
    }

    impl Fixture {
        fn new(readonly: bool) -> Self {
            let (mem, _ram) = guest_memory(0x100000);
            let (disk, disk_file) = memfd_disk(64, readonly);
            Fixture {
                mem,
                ring: TestRing::new(16, 0x1000),
                disk,
                disk_file,
                submitted: 0,
            }
        }

        fn g(&self) -> &GuestMemoryMmap {
            self.mem.guest()
        }

        /// Submits a chain and runs it through parse + execute.
        fn run(&mut self, chain: &[(u64, u32, bool)]) -> Completion {
            let mem = self.mem.guest().clone();
            self.ring.add_chain(&mem, chain);
            self.run_published()
        }

        fn run_published(&mut self) -> Completion {
            let mem = self.mem.guest().clone();
            let request = BlkRequest::parse(pop_chain(&mem, &self.ring, self.submitted));
            self.submitted += 1;
            request.execute(&mem, &self.disk)
        }

        fn header(&self, request_type: u32, sector: u64) {
            self.g()
                .write_slice(&request_header(request_type, sector), GuestAddress(HEADER))
                .unwrap();
        }

        fn status(&self) -> u8 {
            self.g().read_obj(GuestAddress(STATUS)).unwrap()
        }
    }

    /// A frontend that shrinks its memory fd under a write: the request fails, the disk keeps
    /// what it had (no zeros from the stand-in page), and this process lives (without the
    /// `memory_faults` guard the copy dies of SIGBUS).
    #[test]
    fn a_write_from_memory_that_vanished_fails_and_writes_nothing() {
        let (mem, ram) = guest_memory(0x100000);
        assert_eq!(mem.guarded_regions(), 1, "an unsealed memfd is guarded");
        let (disk, disk_file) = memfd_disk(64, false);
        disk_file.write_all_at(&[0xee; 4096], 0).unwrap();
        let mut ring = TestRing::new(16, 0x1000);
        let g = mem.guest().clone();
        g.write_slice(&request_header(VIRTIO_BLK_T_OUT, 0), GuestAddress(HEADER))
            .unwrap();
        let far = 0x80000u64; // a data page the shrink takes away
        g.write_slice(&[0x5a; 4096], GuestAddress(far)).unwrap();
        ring.add_chain(
            &g,
            &[(HEADER, 16, false), (far, 4096, false), (STATUS, 1, true)],
        );
        ram.set_len(0x40000).unwrap();
        let request = BlkRequest::parse(pop_chain(&g, &ring, 0));
        let c = request.execute(&g, &disk);
        assert_eq!(c.status, Some(IOERR));
        let mut on_disk = vec![0u8; 4096];
        disk_file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(on_disk.iter().all(|b| *b == 0xee), "the disk was written");
        let (region, faults, _) = mem.vanished().expect("the fault was recorded");
        assert_eq!(region, 0);
        assert!(faults >= 1);
    }

    #[test]
    fn write_then_read_round_trips_through_the_file() {
        let mut f = Fixture::new(false);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 % 251) as u8).collect();
        f.g().write_slice(&pattern, GuestAddress(DATA)).unwrap();
        f.header(VIRTIO_BLK_T_OUT, 3);
        // Data split over two descriptors.
        let c = f.run(&[
            (HEADER, 16, false),
            (DATA, 600, false),
            (DATA + 600, 424, false),
            (STATUS, 1, true),
        ]);
        assert_eq!(c.status, Some(OK));
        assert_eq!(c.used_len, 1);
        let mut on_disk = vec![0u8; 1024];
        f.disk_file.read_exact_at(&mut on_disk, 3 * 512).unwrap();
        assert_eq!(on_disk, pattern);

        f.header(VIRTIO_BLK_T_IN, 3);
        let c = f.run(&[
            (HEADER, 16, false),
            (DATA + 0x1000, 1024, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(c.status, Some(OK));
        assert_eq!(c.used_len, 1025);
        let mut read_back = vec![0u8; 1024];
        f.g()
            .read_slice(&mut read_back, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(read_back, pattern);
    }

    #[test]
    fn any_layout_split_header_and_status_sharing_the_data_descriptor() {
        let mut f = Fixture::new(false);
        f.disk_file.write_all_at(&[0xab; 512], 5 * 512).unwrap();
        f.header(VIRTIO_BLK_T_IN, 5);
        // Header in two halves; data and status in one writable descriptor of 513 bytes.
        let c = f.run(&[
            (HEADER, 8, false),
            (HEADER + 8, 8, false),
            (DATA, 513, true),
        ]);
        assert_eq!(c.status, Some(OK));
        assert_eq!(c.used_len, 513);
        let mut buf = [0u8; 513];
        f.g().read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0xab));
        assert_eq!(buf[512], OK);
    }

    #[test]
    fn flush_get_id_and_unknown_types() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        let c = f.run(&[(HEADER, 16, false), (STATUS, 1, true)]);
        assert_eq!((c.status, c.used_len), (Some(OK), 1));

        f.header(VIRTIO_BLK_T_GET_ID, 0);
        let c = f.run(&[(HEADER, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        assert_eq!((c.status, c.used_len), (Some(OK), 21));
        let mut id = [0u8; 20];
        f.g().read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"test-disk-id-0123456");

        // A short id buffer gets a truncated id.
        f.g().write_slice(&[0u8; 20], GuestAddress(DATA)).unwrap();
        let c = f.run(&[(HEADER, 16, false), (DATA, 4, true), (STATUS, 1, true)]);
        assert_eq!((c.status, c.used_len), (Some(OK), 5));
        f.g().read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..5], b"test\0");

        f.header(77, 0);
        let c = f.run(&[(HEADER, 16, false), (STATUS, 1, true)]);
        assert_eq!((c.status, c.used_len), (Some(UNSUPP), 1));
        assert_eq!(f.status(), UNSUPP);
    }

    #[test]
    fn sectors_out_of_range_fail_with_ioerr() {
        let mut f = Fixture::new(false);
        for (sector, len) in [
            (64u64, 512u32),
            (63, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512, 512),
            (0, 100),
        ] {
            f.header(VIRTIO_BLK_T_IN, sector);
            let c = f.run(&[(HEADER, 16, false), (DATA, len, true), (STATUS, 1, true)]);
            assert_eq!(c.status, Some(IOERR), "sector {sector} len {len}");
            assert_eq!(c.used_len, 1);
            f.header(VIRTIO_BLK_T_OUT, sector);
            let c = f.run(&[(HEADER, 16, false), (DATA, len, false), (STATUS, 1, true)]);
            assert_eq!(c.status, Some(IOERR), "sector {sector} len {len}");
        }
        // The last sector itself is fine.
        f.header(VIRTIO_BLK_T_OUT, 63);
        let c = f.run(&[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(c.status, Some(OK));
    }

    #[test]
    fn readonly_disk_refuses_writes_but_serves_reads_and_flushes() {
        let mut f = Fixture::new(true);
        f.g().write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        f.header(VIRTIO_BLK_T_OUT, 0);
        let c = f.run(&[(HEADER, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        assert_eq!(c.status, Some(IOERR));
        let mut sector = [0u8; 512];
        f.disk_file.read_exact_at(&mut sector, 0).unwrap();
        assert!(sector.iter().all(|&b| b == 0), "readonly disk was modified");

        f.header(VIRTIO_BLK_T_IN, 0);
        let c = f.run(&[(HEADER, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        assert_eq!(c.status, Some(OK));
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        let c = f.run(&[(HEADER, 16, false), (STATUS, 1, true)]);
        assert_eq!(c.status, Some(OK));
    }

    #[test]
    fn buffers_outside_guest_memory_fail_with_ioerr() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        // Data buffer past the end of guest memory (1 MiB).
        let c = f.run(&[
            (HEADER, 16, false),
            (0xff800, 0x1000, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(c.status, Some(IOERR));
        // A ~4 GiB descriptor: refused by bounds checks, not by allocating it.
        let c = f.run(&[
            (HEADER, 16, false),
            (DATA, u32::MAX - 32, true),
            (STATUS, 1, true),
        ]);
        assert_eq!(c.status, Some(IOERR));
        // A chain of more than 4 GiB in total is illegal; the chain iterator stops before the
        // status descriptor, so there is nothing to answer.
        let c = f.run(&[
            (HEADER, 16, false),
            (DATA, u32::MAX, true),
            (STATUS, 1, true),
        ]);
        assert_eq!((c.status, c.used_len), (None, 0));
        f.header(VIRTIO_BLK_T_OUT, 0);
        let c = f.run(&[
            (HEADER, 16, false),
            (u64::MAX - 10, 512, false),
            (STATUS, 1, true),
        ]);
        assert_eq!(c.status, Some(IOERR));
        // Header outside memory.
        let c = f.run(&[(0x4000_0000, 16, false), (STATUS, 1, true)]);
        assert_eq!(c.status, Some(IOERR));
        // Header too short.
        let c = f.run(&[(HEADER, 15, false), (STATUS, 1, true)]);
        assert_eq!(c.status, Some(IOERR));
    }

    #[test]
    fn chains_without_a_status_byte_complete_with_length_zero() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        let c = f.run(&[(HEADER, 16, false)]);
        assert_eq!((c.status, c.used_len), (None, 0));
        // Status byte outside guest memory.
        let c = f.run(&[(HEADER, 16, false), (0x4000_0000, 1, true)]);
        assert_eq!((c.status, c.used_len), (None, 0));
        // Zero-length last descriptor.
        let c = f.run(&[(HEADER, 16, false), (STATUS, 0, true)]);
        assert_eq!((c.status, c.used_len), (None, 0));
    }

    #[test]
    fn out_of_order_and_cut_chains_fail_with_ioerr() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_OUT, 0);
        // Readable data after a writable descriptor.
        let c = f.run(&[
            (HEADER, 16, false),
            (DATA, 8, true),
            (DATA, 512, false),
            (STATUS, 1, true),
        ]);
        assert_eq!(c.status, Some(IOERR));

        // The status descriptor claims a next descriptor beyond the table: the chain is cut.
        let g = f.g().clone();
        f.ring.write_desc(&g, 10, HEADER, 16, VIRTQ_DESC_F_NEXT, 11);
        f.ring.write_desc(
            &g,
            11,
            STATUS,
            1,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            999,
        );
        f.ring.publish(&g, 10);
        let c = f.run_published();
        assert_eq!((c.head, c.status), (10, Some(IOERR)));

        // A loop (12 -> 13 -> 12 ...) ends when the chain is longer than the ring, not never.
        f.ring.write_desc(&g, 12, HEADER, 16, VIRTQ_DESC_F_NEXT, 13);
        f.ring.write_desc(
            &g,
            13,
            STATUS,
            1,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            12,
        );
        f.ring.publish(&g, 12);
        let c = f.run_published();
        assert_eq!((c.head, c.status), (12, Some(IOERR)));

        // A head index beyond the ring: nothing to parse, nothing to answer.
        f.ring.publish(&g, 500);
        let c = f.run_published();
        assert_eq!((c.head, c.status, c.used_len), (500, None, 0));
    }
}
