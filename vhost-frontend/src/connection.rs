//! The frontend side of a vhost-user connection: the requests a VMM sends, and strict checking of
//! every reply.
//!
//! [`VhostUserFrontend`] is the interface device code talks to, so it can be unit-tested against a
//! fake; [`Frontend`] implements it over a `UnixStream`. Requests are built as
//! [`FrontendMessage`]s (the type the backend decodes) with the caller's fds borrowed, and every
//! reply goes through [`BackendReply::decode`] (the type the backend encodes): it is accepted only
//! if its request code matches, the REPLY flag is set, the size is exactly right and exactly the
//! expected fds came with it (extra fds are closed and are an error). After anything goes wrong
//! mid-exchange the byte stream can no longer be trusted, so the connection refuses further use: the
//! owner drops it and, for a backend that went away, reconnects.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::features::{
    bit_mask, has, PROTOCOL_MQ, PROTOCOL_REPLY_ACK, VHOST_USER_F_PROTOCOL_FEATURES,
    VIRTIO_F_VERSION_1,
};
use crate::trace::{describe_device_message, printable, Direction};
use crate::wire::{
    recv_message_by, send_message_by, BackendReply, ConfigSpace, FrontendMessage, Header,
    InflightDescription, MemoryRegion, MemoryTable, Request, VringAddr, VringFdIndex, VringState,
    WireError, MAX_CONFIG_SIZE, MAX_MEMORY_REGIONS,
};

pub use crate::wire::MAX_QUEUE_SIZE;

/// What went wrong talking to the backend. Every variant names the vhost-user message involved.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// EOF, ECONNRESET or EPIPE: the backend process is gone. A reconnect may cure this.
    #[error("vhost-user backend went away during {during}")]
    PeerGone { during: &'static str },
    /// The backend broke the protocol (bad reply). The connection is closed by us.
    #[error("vhost-user backend broke the protocol in {message}: {detail}")]
    Protocol {
        message: &'static str,
        detail: String,
    },
    /// A socket error that is neither of the above.
    #[error("vhost-user socket error during {0}: {1}")]
    Io(&'static str, #[source] io::Error),
    /// The backend lacks a feature this frontend cannot work without.
    #[error("vhost-user backend does not offer {feature}")]
    MissingFeature { feature: &'static str },
    /// No reply arrived within the reply timeout.
    #[error("vhost-user backend did not answer {during} in time")]
    TimedOut { during: &'static str },
    /// The backend understood the request and refused it (REPLY_ACK status not 0).
    #[error("vhost-user backend refused {message} (status {status})")]
    BackendFailed { message: &'static str, status: u64 },
    /// The caller asked for something the protocol cannot express; nothing was sent.
    #[error("invalid {message} request: {detail}")]
    InvalidRequest {
        message: &'static str,
        detail: String,
    },
    /// Connecting to the backend's socket failed (`source` is `TimedOut` for a backend that did
    /// not take the connection within [`CONNECT_TIMEOUT`]).
    #[error("cannot connect to vhost-user socket {}: {source}", printable(&path.to_string_lossy()))]
    Connect { path: PathBuf, source: io::Error },
}

impl FrontendError {
    /// True when the backend went away (as opposed to misbehaving): the case reconnect handles.
    pub fn is_peer_gone(&self) -> bool {
        matches!(self, FrontendError::PeerGone { .. })
    }

    fn from_wire(message: &'static str, err: WireError) -> FrontendError {
        match err {
            WireError::PeerGone(how) => {
                tracing::debug!(target: "vhost", "{message}: {how}");
                FrontendError::PeerGone { during: message }
            }
            WireError::Protocol(e) => FrontendError::Protocol {
                message,
                detail: e.to_string(),
            },
            WireError::TimedOut => FrontendError::TimedOut { during: message },
            WireError::InvalidSend(detail) => FrontendError::InvalidRequest { message, detail },
            WireError::Io(e) => FrontendError::Io(message, e),
        }
    }

    fn protocol(message: &'static str, detail: impl Into<String>) -> FrontendError {
        FrontendError::Protocol {
            message,
            detail: detail.into(),
        }
    }
}

/// A request as the frontend sends it: the backend's own message type, with the caller's fds
/// borrowed (not dup'ed) for the one send.
type Outgoing<'a> = FrontendMessage<BorrowedFd<'a>>;

/// A memory region for SET_MEM_TABLE together with the fd that backs it (a memfd of guest RAM).
#[derive(Debug, Clone, Copy)]
pub struct MemoryRegionFd<'a> {
    pub region: MemoryRegion,
    pub fd: BorrowedFd<'a>,
}

/// The backend's inflight buffer from GET_INFLIGHT_FD: map `fd` at `description.mmap_offset` for
/// `description.mmap_size` bytes. Keep it across reconnects and hand it back with SET_INFLIGHT_FD.
#[derive(Debug)]
pub struct InflightBuffer {
    pub description: InflightDescription,
    pub fd: OwnedFd,
}

/// What the standard handshake ([`VhostUserFrontend::negotiate`]) agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Everything GET_FEATURES offered.
    pub backend_features: u64,
    /// Offered AND wanted, always including VERSION_1 and PROTOCOL_FEATURES. The guest may be
    /// offered these minus PROTOCOL_FEATURES (a vhost-user bit, not a virtio one); SET_FEATURES to the
    /// backend later carries the driver's choice plus PROTOCOL_FEATURES.
    pub virtio_features: u64,
    /// The protocol features sent in SET_PROTOCOL_FEATURES (offered AND wanted).
    pub protocol_features: u64,
    /// GET_QUEUE_NUM's answer when MQ was agreed (unchecked: the device bounds it by its own limit).
    pub queue_num: Option<u64>,
}

/// The requests a vhost-user frontend sends. Every `set_*` waits for the backend's ack when REPLY_ACK
/// was negotiated, so an error is reported on the message that caused it.
pub trait VhostUserFrontend {
    /// Bounds a whole sequence of exchanges (starting or stopping a device: hundreds of them):
    /// until it is cleared with `None`, every exchange must also end by `deadline`, besides its
    /// own reply timeout. Without it a backend answering each message just in time could hold
    /// the caller (a vCPU thread at DRIVER_OK) for as long as it likes. Default: no bound.
    fn set_sequence_deadline(&mut self, deadline: Option<Instant>) {
        let _ = deadline;
    }

    /// The connection's socket, for an event loop to watch for hang-up (EPOLLHUP/EPOLLRDHUP)
    /// while no exchange is under way: that is how a frontend learns, between two control
    /// messages, that its backend died. `None` when there is nothing to watch (a fake in tests).
    fn hangup_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// SET_OWNER: this connection now owns the backend's device (sent once, at start).
    fn set_owner(&mut self) -> Result<(), FrontendError>;
    /// GET_FEATURES: virtio feature bits the backend offers (plus PROTOCOL_FEATURES).
    fn get_features(&mut self) -> Result<u64, FrontendError>;
    /// SET_FEATURES: the bits the driver accepted, plus PROTOCOL_FEATURES if negotiated.
    fn set_features(&mut self, features: u64) -> Result<(), FrontendError>;
    /// GET_PROTOCOL_FEATURES.
    fn get_protocol_features(&mut self) -> Result<u64, FrontendError>;
    /// SET_PROTOCOL_FEATURES: must be a subset of what the backend offered.
    fn set_protocol_features(&mut self, features: u64) -> Result<(), FrontendError>;
    /// GET_QUEUE_NUM (needs MQ): how many queues the backend supports.
    fn get_queue_num(&mut self) -> Result<u64, FrontendError>;
    /// GET_MAX_MEM_SLOTS (needs CONFIGURE_MEM_SLOTS).
    fn get_max_mem_slots(&mut self) -> Result<u64, FrontendError>;
    /// GET_CONFIG (needs CONFIG): `size` bytes of device config space at `offset`; the reply must
    /// echo offset and size.
    fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError>;
    /// SET_CONFIG (needs CONFIG): a driver write to device config space.
    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError>;
    /// SET_MEM_TABLE: the whole guest memory layout, one fd per region (at most 8).
    fn set_mem_table(&mut self, regions: &[MemoryRegionFd<'_>]) -> Result<(), FrontendError>;
    /// SET_VRING_NUM: ring size of queue `index`.
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<(), FrontendError>;
    /// SET_VRING_ADDR: ring addresses of a queue, in the frontend's address space.
    fn set_vring_addr(&mut self, addr: &VringAddr) -> Result<(), FrontendError>;
    /// SET_VRING_BASE: where the backend resumes reading the available ring.
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<(), FrontendError>;
    /// GET_VRING_BASE: stops the queue and returns where the backend stopped.
    fn get_vring_base(&mut self, index: u32) -> Result<u32, FrontendError>;
    /// SET_VRING_KICK: the eventfd the guest's notifications arrive on (KVM ioeventfd).
    fn set_vring_kick(&mut self, index: u32, fd: BorrowedFd<'_>) -> Result<(), FrontendError>;
    /// SET_VRING_CALL: the eventfd the backend signals to interrupt the guest (KVM irqfd).
    fn set_vring_call(&mut self, index: u32, fd: BorrowedFd<'_>) -> Result<(), FrontendError>;
    /// SET_VRING_ENABLE: with PROTOCOL_FEATURES rings start disabled until enabled here.
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<(), FrontendError>;
    /// GET_INFLIGHT_FD (needs INFLIGHT_SHMFD): asks the backend for an inflight buffer sized for
    /// `num_queues` queues of `queue_size`. `None` when the backend replies mmap_size 0 ("keeps no
    /// inflight buffer", as QEMU reads it).
    fn get_inflight_fd(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightBuffer>, FrontendError>;
    /// SET_INFLIGHT_FD (needs INFLIGHT_SHMFD): hands the (kept) inflight buffer to the backend.
    fn set_inflight_fd(
        &mut self,
        description: &InflightDescription,
        fd: BorrowedFd<'_>,
    ) -> Result<(), FrontendError>;

    /// The standard handshake: GET_FEATURES (VERSION_1 and PROTOCOL_FEATURES required),
    /// GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES with offered AND wanted, SET_OWNER, and
    /// GET_QUEUE_NUM if MQ was agreed. SET_FEATURES is left to device start (it carries the guest
    /// driver's choice).
    fn negotiate(
        &mut self,
        wanted_virtio_features: u64,
        wanted_protocol_features: u64,
    ) -> Result<Negotiated, FrontendError> {
        let backend_features = self.get_features()?;
        if !has(backend_features, VIRTIO_F_VERSION_1) {
            return Err(FrontendError::MissingFeature {
                feature: "VIRTIO_F_VERSION_1 (bit 32) in its GET_FEATURES reply",
            });
        }
        if !has(backend_features, VHOST_USER_F_PROTOCOL_FEATURES) {
            return Err(FrontendError::MissingFeature {
                feature: "VHOST_USER_F_PROTOCOL_FEATURES (bit 30) in its GET_FEATURES reply",
            });
        }
        let required = bit_mask(VIRTIO_F_VERSION_1) | bit_mask(VHOST_USER_F_PROTOCOL_FEATURES);
        let virtio_features = backend_features & (wanted_virtio_features | required);

        let offered_protocol = self.get_protocol_features()?;
        // Never set a bit the backend did not offer: DPDK closes the connection if we do.
        let protocol_features = offered_protocol & wanted_protocol_features;
        self.set_protocol_features(protocol_features)?;
        self.set_owner()?;
        let queue_num = if has(protocol_features, PROTOCOL_MQ) {
            Some(self.get_queue_num()?)
        } else {
            None
        };
        Ok(Negotiated {
            backend_features,
            virtio_features,
            protocol_features,
            queue_num,
        })
    }
}

/// Upper bound for an inflight buffer of `num_queues` queues of `queue_size` entries: the larger
/// (packed) layout, 32-byte header plus 32 bytes per entry, rounded up to 64 bytes per queue.
/// Checked arithmetic; `None` only if it overflows u64 (it cannot for u16 inputs, but the bound must
/// not rely on that).
pub fn max_inflight_mmap_size(num_queues: u16, queue_size: u16) -> Option<u64> {
    let per_queue = u64::from(queue_size)
        .checked_mul(32)?
        .checked_add(32)?
        .checked_next_multiple_of(64)?;
    per_queue.checked_mul(u64::from(num_queues))
}

/// Checks that the inflight fd holds the bytes the reply describes. Whoever maps it as told (map
/// `mmap_size` bytes at `mmap_offset`; QEMU zeroes the buffer on reset) would otherwise take a
/// SIGBUS on the first touch past the end of a short file. A file the backend shrinks later is
/// beyond what a check now can prevent.
fn check_inflight_fd(fd: OwnedFd, reply: &InflightDescription) -> Result<OwnedFd, String> {
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat the inflight fd: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("the inflight fd is not a regular file (memfd)".into());
    }
    // The caller checked that this sum does not overflow.
    let end = reply.mmap_offset.saturating_add(reply.mmap_size);
    if end > meta.len() {
        return Err(format!(
            "mmap_offset {:#x} + mmap_size {} lies past the end of the {}-byte inflight fd",
            reply.mmap_offset,
            reply.mmap_size,
            meta.len()
        ));
    }
    Ok(file.into())
}

/// The inflight region behind `fd` as described, one line per queue (split layout: the only one
/// a frontend that never offers VIRTIO_F_RING_PACKED meets), or one line saying why not.
pub fn describe_inflight_region(
    description: &InflightDescription,
    fd: BorrowedFd<'_>,
) -> Vec<String> {
    match read_inflight_region(description, fd) {
        Ok(bytes) => describe_inflight_bytes(description, &bytes),
        Err(e) => vec![format!("inflight region unreadable: {e}")],
    }
}

/// A private copy of the inflight region behind `fd` (`pread` of `mmap_size` bytes at
/// `mmap_offset`, no mapping): decoding a copy means a backend writing the region meanwhile
/// cannot change a value between two reads.
pub fn read_inflight_region(
    description: &InflightDescription,
    fd: BorrowedFd<'_>,
) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let len = usize::try_from(description.mmap_size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "inflight region too large"))?;
    let mut bytes = vec![0u8; len];
    // A duplicate: the `File` closes its fd when dropped, and the caller's must stay open.
    let file = std::fs::File::from(fd.try_clone_to_owned()?);
    file.read_exact_at(&mut bytes, description.mmap_offset)?;
    Ok(bytes)
}

/// One line per queue for a copy of the region (see [`read_inflight_region`]).
pub fn describe_inflight_bytes(description: &InflightDescription, bytes: &[u8]) -> Vec<String> {
    match crate::wire::inflight::InflightRegion::new(
        bytes,
        description.num_queues,
        description.queue_size,
    ) {
        Ok(region) => region
            .queues()
            .map(|queue| match queue {
                Ok(queue) => queue.describe(),
                Err(e) => e.to_string(),
            })
            .collect(),
        Err(e) => vec![e.to_string()],
    }
}

/// How long [`connect_with_timeout`] waits, via [`Frontend::connect`] and `vmm run --blk socket=`,
/// for a backend to take a connection. A backend that is listening takes it at once, even before it
/// calls accept(); only a full listen backlog (a backend that never accepts) makes us wait.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects a unix stream socket to `path`, giving up after `timeout` with an `io::Error` of kind
/// `TimedOut`. The stream comes back blocking, with no socket timeouts set.
///
/// Not a non-blocking connect + poll: for AF_UNIX that does not work. A non-blocking connect to a
/// full backlog fails with EAGAIN at once (never EINPROGRESS), and poll on the unconnected socket
/// cannot wait for room in the listener's queue. The kernel's own bounded wait for exactly that
/// room is a blocking connect under SO_SNDTIMEO (unix_stream_connect waits sock_sndtimeo()), so we
/// use that, re-armed with what is left after an EINTR.
pub fn connect_with_timeout(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain data; all-zero is a valid empty address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte stays 0: the kernel reads sun_path as a NUL-terminated name.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a unix socket path must be 1 to {} bytes without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let addr_len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;

    // SAFETY: plain syscall; the result is checked before being owned.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket() just returned this fd and nothing else owns it; every error path drops it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let stream = UnixStream::from(fd);
    let deadline = Instant::now() + timeout;
    let timed_out = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer within {} s: the backend does not take connections (its listen backlog is full)",
                timeout.as_secs_f64()
            ),
        )
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Zero would mean "no timeout" to SO_SNDTIMEO.
        if left.is_zero() {
            return Err(timed_out());
        }
        stream.set_write_timeout(Some(left))?;
        // SAFETY: addr is a valid sockaddr_un of addr_len bytes (family, path, NUL), alive for the call.
        let r = unsafe {
            libc::connect(
                stream.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                addr_len,
            )
        };
        if r == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            // SO_SNDTIMEO ran out with the backlog still full.
            Some(libc::EAGAIN) => return Err(timed_out()),
            _ => return Err(err),
        }
    }
    // Reply bounds are the Frontend's (whole-message deadlines), not a per-call socket timeout.
    stream.set_write_timeout(None)?;
    Ok(stream)
}

/// Why a connection refuses further use.
#[derive(Debug, Clone)]
enum Broken {
    Gone,
    Failed(String),
}

/// A vhost-user connection to one backend.
#[derive(Debug)]
pub struct Frontend {
    stream: UnixStream,
    name: String,
    trace: bool,
    protocol_features: u64,
    broken: Option<Broken>,
    /// The bound for one whole exchange (request, reply, fds); `None`: wait for ever.
    reply_timeout: Option<Duration>,
    /// When the exchange in progress must be over (set by `guard`).
    deadline: Option<Instant>,
    /// virtio device type, for naming its feature bits in the trace.
    device_id: Option<u32>,
    /// The end of the sequence of exchanges in progress (`set_sequence_deadline`).
    sequence_deadline: Option<Instant>,
}

impl Frontend {
    /// Connects to a backend listening on `path` (giving up after [`CONNECT_TIMEOUT`]); the
    /// connection is named after the path in traces.
    pub fn connect(path: impl AsRef<Path>) -> Result<Frontend, FrontendError> {
        let path = path.as_ref();
        let stream = connect_with_timeout(path, CONNECT_TIMEOUT).map_err(|source| {
            FrontendError::Connect {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(Frontend::from_stream(stream, path.display().to_string()))
    }

    /// Wraps an already connected stream (one end of a socketpair for the in-process backend).
    pub fn from_stream(stream: UnixStream, name: impl Into<String>) -> Frontend {
        Frontend {
            stream,
            name: name.into(),
            trace: false,
            protocol_features: 0,
            broken: None,
            reply_timeout: None,
            deadline: None,
            device_id: None,
            sequence_deadline: None,
        }
    }

    /// The virtio device type behind this connection (e.g. `features::VIRTIO_ID_BLOCK`), so the
    /// trace names its own feature bits.
    pub fn set_virtio_device_id(&mut self, device_id: u32) {
        self.device_id = Some(device_id);
    }

    /// Prints one decoded line per message on stderr (`--trace-vhost`).
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on;
    }

    /// Bounds how long one exchange may take (`None`: wait forever): the request sent and its whole
    /// reply (header, payload, fds) received, within one deadline. A backend that stops answering,
    /// or trickles its reply a byte at a time, then gives `TimedOut` instead of hanging the VMM.
    /// Sends are under the same deadline: a backend that stops reading fills the socket buffer with
    /// requests that need no reply, and the next send would otherwise block for ever. (Not
    /// SO_RCVTIMEO/SO_SNDTIMEO: those bound each read or write, not the message.) Never fails; the
    /// `Result` is kept for callers.
    pub fn set_reply_timeout(&mut self, timeout: Option<Duration>) -> Result<(), FrontendError> {
        self.reply_timeout = timeout;
        Ok(())
    }

    /// The deadline of the exchange in progress, or a fresh one for a message sent outside one.
    fn message_deadline(&self) -> Option<Instant> {
        self.deadline
            .or_else(|| self.reply_timeout.map(|t| Instant::now() + t))
    }

    /// The connection's name (socket path, or what `from_stream` was given).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The protocol features agreed with SET_PROTOCOL_FEATURES (0 before).
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    /// False once an error made the connection unusable.
    pub fn is_usable(&self) -> bool {
        self.broken.is_none()
    }

    fn reply_ack_negotiated(&self) -> bool {
        has(self.protocol_features, PROTOCOL_REPLY_ACK)
    }

    fn check_usable(&self, message: &'static str) -> Result<(), FrontendError> {
        match &self.broken {
            None => Ok(()),
            Some(Broken::Gone) => Err(FrontendError::PeerGone { during: message }),
            Some(Broken::Failed(why)) => Err(FrontendError::protocol(
                message,
                format!("connection unusable after an earlier error: {why}"),
            )),
        }
    }

    /// Records that the connection is no longer usable. On anything but "peer gone" we also shut the
    /// socket down so the backend sees the end of the conversation.
    fn poison(&mut self, err: &FrontendError) {
        let broken = match err {
            FrontendError::PeerGone { .. } => Broken::Gone,
            // The request was refused whole, or never sent: the stream is still in step.
            FrontendError::BackendFailed { .. } | FrontendError::InvalidRequest { .. } => return,
            other => Broken::Failed(other.to_string()),
        };
        if matches!(broken, Broken::Failed(_)) {
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
        self.broken = Some(broken);
    }

    fn send(&mut self, message: &Outgoing<'_>, need_reply: bool) -> Result<(), FrontendError> {
        let (header, payload, fds) = message.encode(need_reply);
        self.emit_trace(Direction::ToBackend, &header, &payload, fds.len());
        send_message_by(
            &self.stream,
            &header,
            &payload,
            &fds,
            self.message_deadline(),
        )
        .map_err(|e| FrontendError::from_wire(message.request().name(), e))
    }

    /// Receives the reply to `request`. Every check (right code, REPLY flag, exact size, exactly the
    /// fds its kind carries, fds closed on error) is `BackendReply::decode`'s, so what we accept is
    /// by construction what the backend's encoder sends.
    fn recv_reply(&mut self, request: Request) -> Result<BackendReply, FrontendError> {
        let name = request.name();
        let (header, payload, fds) = recv_message_by(&self.stream, self.message_deadline())
            .map_err(|e| FrontendError::from_wire(name, e))?;
        self.emit_trace(Direction::FromBackend, &header, &payload, fds.len());
        BackendReply::decode(request, &header, &payload, fds)
            .map_err(|e| FrontendError::from_wire(name, e))
    }

    /// A request with a reply of its own (the GET_* family); callers run it inside `guard`. It
    /// replies with or without NEED_REPLY, so none is asked for.
    fn request_reply(&mut self, message: &Outgoing<'_>) -> Result<BackendReply, FrontendError> {
        self.send(message, false)?;
        self.recv_reply(message.request())
    }

    /// A request without a reply of its own; with REPLY_ACK we ask for and check the ack.
    fn request_ack(&mut self, message: &Outgoing<'_>) -> Result<(), FrontendError> {
        let request = message.request();
        let need_reply = self.reply_ack_negotiated();
        self.guard(request.name(), |this| {
            this.send(message, need_reply)?;
            if need_reply {
                match this.recv_reply(request)? {
                    BackendReply::Ack { status: 0, .. } => {}
                    BackendReply::Ack { status, .. } => {
                        return Err(FrontendError::BackendFailed {
                            message: request.name(),
                            status,
                        })
                    }
                    other => return Err(unexpected(request, &other)),
                }
            }
            Ok(())
        })
    }

    /// Runs one exchange: refuses if the connection is already broken, poisons it on failure.
    fn guard<T>(
        &mut self,
        message: &'static str,
        exchange: impl FnOnce(&mut Self) -> Result<T, FrontendError>,
    ) -> Result<T, FrontendError> {
        self.check_usable(message)?;
        // One deadline for the request and its whole reply, and never past the sequence's.
        let own = self.reply_timeout.map(|t| Instant::now() + t);
        self.deadline = match (own, self.sequence_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let result = exchange(self);
        self.deadline = None;
        if let Err(err) = &result {
            self.poison(err);
        }
        result
    }

    /// With the trace on: the inflight region decoded, one line per queue (version, desc_num,
    /// entries inflight, used_idx, last_batch_head). Read through the fd into a private copy
    /// (`pread`), so a backend writing the region meanwhile changes nothing under the decoder.
    fn trace_inflight_region(&self, description: &InflightDescription, fd: BorrowedFd<'_>) {
        if !self.trace {
            return;
        }
        for line in describe_inflight_region(description, fd) {
            eprintln!("vhost-user {}:   {line}", self.name);
        }
    }

    fn emit_trace(&self, direction: Direction, header: &Header, payload: &[u8], fds: usize) {
        let line =
            || describe_device_message(self.device_id, direction, &self.name, header, payload, fds);
        if self.trace {
            eprintln!("{}", line());
        } else {
            tracing::trace!(target: "vhost", "{}", line());
        }
    }

    /// One of the GET_* requests answered with a bare u64.
    fn get_u64(&mut self, message: Outgoing<'_>) -> Result<u64, FrontendError> {
        let request = message.request();
        self.guard(request.name(), |this| {
            match (request, this.request_reply(&message)?) {
                (Request::GetFeatures, BackendReply::Features(value))
                | (Request::GetProtocolFeatures, BackendReply::ProtocolFeatures(value))
                | (Request::GetQueueNum, BackendReply::QueueNum(value))
                | (Request::GetMaxMemSlots, BackendReply::MaxMemSlots(value)) => Ok(value),
                (_, other) => Err(unexpected(request, &other)),
            }
        })
    }
}

/// `BackendReply::decode` gives the variant of the request it was handed, so this is a bug of ours,
/// not the backend's; reported rather than a panic.
fn unexpected(request: Request, reply: &BackendReply) -> FrontendError {
    FrontendError::protocol(
        request.name(),
        format!(
            "internal error: decoded a {:?} reply of {}",
            reply.kind(),
            reply.request()
        ),
    )
}

fn invalid(message: &'static str, detail: impl Into<String>) -> FrontendError {
    FrontendError::InvalidRequest {
        message,
        detail: detail.into(),
    }
}

impl VhostUserFrontend for Frontend {
    fn hangup_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.stream.as_fd())
    }

    fn set_sequence_deadline(&mut self, deadline: Option<Instant>) {
        self.sequence_deadline = deadline;
    }

    fn set_owner(&mut self) -> Result<(), FrontendError> {
        self.request_ack(&Outgoing::SetOwner)
    }

    fn get_features(&mut self) -> Result<u64, FrontendError> {
        self.get_u64(Outgoing::GetFeatures)
    }

    fn set_features(&mut self, features: u64) -> Result<(), FrontendError> {
        self.request_ack(&Outgoing::SetFeatures(features))
    }

    fn get_protocol_features(&mut self) -> Result<u64, FrontendError> {
        self.get_u64(Outgoing::GetProtocolFeatures)
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<(), FrontendError> {
        // REPLY_ACK takes effect for the messages *after* this one, so it is sent with the old set.
        self.request_ack(&Outgoing::SetProtocolFeatures(features))?;
        self.protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64, FrontendError> {
        self.get_u64(Outgoing::GetQueueNum)
    }

    fn get_max_mem_slots(&mut self) -> Result<u64, FrontendError> {
        self.get_u64(Outgoing::GetMaxMemSlots)
    }

    fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        let name = Request::GetConfig.name();
        let request =
            ConfigSpace::request(offset, size).map_err(|e| FrontendError::from_wire(name, e))?;
        let request = Outgoing::GetConfig(request);
        self.guard(name, |this| {
            let reply = match this.request_reply(&request)? {
                BackendReply::Config(reply) => reply,
                // Still a broken exchange for us, as before the typed reply (the device cannot go on
                // without its config), but said for what it is.
                BackendReply::ConfigFailed => {
                    return Err(FrontendError::protocol(
                        name,
                        "empty reply (0 bytes: how libvhost-user says the read failed), \
                         expected a config space of 12 + size bytes",
                    ))
                }
                other => return Err(unexpected(Request::GetConfig, &other)),
            };
            if reply.offset != offset || reply.size() != size {
                return Err(FrontendError::protocol(
                    name,
                    format!(
                        "reply is for offset {:#x} size {}, asked for offset {offset:#x} size {size}",
                        reply.offset,
                        reply.size()
                    ),
                ));
            }
            Ok(reply.payload)
        })
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        let name = Request::SetConfig.name();
        if data.len() > MAX_CONFIG_SIZE {
            return Err(invalid(
                name,
                format!("{} bytes exceed {MAX_CONFIG_SIZE}", data.len()),
            ));
        }
        let config = ConfigSpace {
            offset,
            flags: ConfigSpace::FLAG_WRITABLE,
            payload: data.to_vec(),
        };
        self.request_ack(&Outgoing::SetConfig(config))
    }

    fn set_mem_table(&mut self, regions: &[MemoryRegionFd<'_>]) -> Result<(), FrontendError> {
        let name = Request::SetMemTable.name();
        if regions.len() > MAX_MEMORY_REGIONS {
            return Err(invalid(
                name,
                format!("{} regions, at most {MAX_MEMORY_REGIONS}", regions.len()),
            ));
        }
        let table = MemoryTable {
            regions: regions.iter().map(|r| r.region).collect(),
        };
        for region in &table.regions {
            region
                .validate()
                .map_err(|e| invalid(name, e.to_string()))?;
        }
        let fds = regions.iter().map(|r| r.fd).collect();
        self.request_ack(&Outgoing::SetMemTable { table, fds })
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<(), FrontendError> {
        self.request_ack(&Outgoing::SetVringNum(VringState { index, num }))
    }

    fn set_vring_addr(&mut self, addr: &VringAddr) -> Result<(), FrontendError> {
        self.request_ack(&Outgoing::SetVringAddr(*addr))
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<(), FrontendError> {
        self.request_ack(&Outgoing::SetVringBase(VringState { index, num: base }))
    }

    fn get_vring_base(&mut self, index: u32) -> Result<u32, FrontendError> {
        let name = Request::GetVringBase.name();
        let request = Outgoing::GetVringBase(VringState { index, num: 0 });
        self.guard(name, |this| {
            let state = match this.request_reply(&request)? {
                BackendReply::VringBase(state) => state,
                other => return Err(unexpected(Request::GetVringBase, &other)),
            };
            if state.index != index {
                return Err(FrontendError::protocol(
                    name,
                    format!("reply is for queue {}, asked for {index}", state.index),
                ));
            }
            Ok(state.num)
        })
    }

    fn set_vring_kick(&mut self, index: u32, fd: BorrowedFd<'_>) -> Result<(), FrontendError> {
        let name = Request::SetVringKick.name();
        let which =
            VringFdIndex::new(index, false).map_err(|e| FrontendError::from_wire(name, e))?;
        self.request_ack(&Outgoing::SetVringKick {
            index: which.index,
            fd: Some(fd),
        })
    }

    fn set_vring_call(&mut self, index: u32, fd: BorrowedFd<'_>) -> Result<(), FrontendError> {
        let name = Request::SetVringCall.name();
        let which =
            VringFdIndex::new(index, false).map_err(|e| FrontendError::from_wire(name, e))?;
        self.request_ack(&Outgoing::SetVringCall {
            index: which.index,
            fd: Some(fd),
        })
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<(), FrontendError> {
        self.request_ack(&Outgoing::SetVringEnable { index, enable })
    }

    fn get_inflight_fd(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightBuffer>, FrontendError> {
        let name = Request::GetInflightFd.name();
        if num_queues == 0 || queue_size == 0 || queue_size > MAX_QUEUE_SIZE {
            return Err(invalid(
                name,
                format!("{num_queues} queues of {queue_size} entries (need >= 1 queue, 1..={MAX_QUEUE_SIZE} entries)"),
            ));
        }
        let bound = max_inflight_mmap_size(num_queues, queue_size)
            .ok_or_else(|| invalid(name, "inflight size bound overflows"))?;
        let request = Outgoing::GetInflightFd(InflightDescription {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        });
        self.guard(name, |this| {
            // The fd count is the decoder's: exactly 1 with a buffer; with mmap_size 0 none or one.
            let (reply, fd) = match this.request_reply(&request)? {
                BackendReply::Inflight { description, fd } => (description, fd),
                other => return Err(unexpected(Request::GetInflightFd, &other)),
            };
            if reply.mmap_size == 0 {
                // "Backend keeps no inflight buffer". An fd sent along is closed here (dropped).
                return Ok(None);
            }
            let fd = fd.ok_or_else(|| FrontendError::protocol(name, "fd vanished"))?;
            if reply.mmap_size > bound {
                return Err(FrontendError::protocol(
                    name,
                    format!(
                        "mmap_size {} exceeds {bound}, the most {num_queues} queues of {queue_size} entries can need",
                        reply.mmap_size
                    ),
                ));
            }
            if reply.mmap_offset.checked_add(reply.mmap_size).is_none() {
                return Err(FrontendError::protocol(
                    name,
                    format!("mmap_offset {:#x} + mmap_size {} overflows", reply.mmap_offset, reply.mmap_size),
                ));
            }
            let fd = check_inflight_fd(fd, &reply).map_err(|detail| FrontendError::protocol(name, detail))?;
            let description = InflightDescription { num_queues, queue_size, ..reply };
            this.trace_inflight_region(&description, fd.as_fd());
            Ok(Some(InflightBuffer { description, fd }))
        })
    }

    fn set_inflight_fd(
        &mut self,
        description: &InflightDescription,
        fd: BorrowedFd<'_>,
    ) -> Result<(), FrontendError> {
        // What the backend is about to recover from (after a restart: what its predecessor left).
        self.trace_inflight_region(description, fd);
        self.request_ack(&Outgoing::SetInflightFd {
            description: *description,
            fd,
        })
    }
}

#[cfg(test)]
#[path = "connection_tests.rs"]
mod tests;
