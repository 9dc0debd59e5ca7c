//! The vhost-user wire format, the one definition both sides use.
//!
//! Every vhost-user message is a 12-byte header followed by `header.size` bytes of payload, with up to
//! [`MAX_FDS`] file descriptors riding along as `SCM_RIGHTS` ancillary data (memory regions, eventfds,
//! the inflight memfd). All integers are little-endian (in practice: host order on x86/arm).
//!
//! ```text
//!  0        4        8        12                12 + size
//!  +--------+--------+--------+--------------------+
//!  | request| flags  | size   | payload ...        |   (+ fds as SCM_RIGHTS)
//!  +--------+--------+--------+--------------------+
//!  flags: bits 0-1 version (always 1), bit 2 REPLY, bit 3 NEED_REPLY, others reserved (must be 0)
//! ```
//!
//! This module and its children `payload`, `message` (requests, [`FrontendMessage`]) and `reply`
//! (replies, [`BackendReply`]) do no I/O: they turn bytes into typed values (with exact-size and
//! range checks) and back, so the backend, the frontend and the fuzz targets share them. Both message
//! types have `encode` and `decode`, tested to round-trip, so what one side sends is by construction
//! what the other side's decoder accepts. [`inflight`] is the layout of the shared inflight region
//! (GET/SET_INFLIGHT_FD) and a checked, read-only view of it. [`socket`] moves the bytes and fds over
//! a `UnixStream`.

pub mod inflight;
mod message;
mod payload;
mod reply;
pub mod socket;

pub use inflight::{InflightError, InflightLayout, InflightRegion, PackedInflightRegion};
pub use message::FrontendMessage;
pub use payload::{
    ConfigSpace, InflightDescription, MemoryRegion, MemoryTable, SingleMemoryRegion, U64Payload,
    VringAddr, VringFdIndex, VringState, MAX_CONFIG_SIZE, MAX_MEMORY_REGIONS, MAX_QUEUES,
    MAX_QUEUE_SIZE, VHOST_VRING_F_LOG,
};
pub use reply::{BackendReply, ReplyKind};
pub use socket::{recv_message, recv_message_by, send_message, send_message_by};

/// Bytes in a message header.
pub const HEADER_SIZE: usize = 12;
/// The only protocol version there is; it lives in flag bits 0-1.
pub const VERSION: u32 = 0x1;
/// Mask of the version bits in `Header::flags`.
pub const VERSION_MASK: u32 = 0x3;
/// Flag: this message is a reply.
pub const FLAG_REPLY: u32 = 0x4;
/// Flag: the frontend asks for a u64 ack (needs the REPLY_ACK protocol feature).
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest payload we accept. The largest real message (a full memory table, or a 256-byte config
/// space) is under 300 bytes; the bound keeps a hostile `size` from making us allocate much.
pub const MAX_PAYLOAD_SIZE: usize = 4096;
/// Most fds one message may carry: one per memory region of a full SET_MEM_TABLE
/// (VHOST_MEMORY_BASELINE_NREGIONS in QEMU).
pub const MAX_FDS: usize = 8;

/// How the peer went away. Kept apart from protocol errors: a reconnect can cure this, not that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerGone {
    #[error("connection closed (EOF) between messages")]
    Closed,
    #[error("connection closed in the middle of a message")]
    ClosedMidMessage,
    #[error("connection reset by peer (ECONNRESET)")]
    Reset,
    #[error("broken pipe (EPIPE): the peer closed its end")]
    BrokenPipe,
}

/// The peer sent something that breaks the protocol. After one of these the byte stream cannot be
/// trusted any more; the connection should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown request code {0}")]
    UnknownRequest(u32),
    #[error("header flags {flags:#x}: version bits must be 1")]
    BadVersion { flags: u32 },
    #[error("header flags {flags:#x}: reserved bits are set")]
    ReservedFlags { flags: u32 },
    #[error("payload size {size} exceeds the limit of {max} bytes")]
    PayloadTooLarge { size: u64, max: usize },
    #[error("{what}: {got} bytes, expected {expected}")]
    WrongSize {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: {got} fds attached, expected {expected}")]
    WrongFdCount {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("more than {max} fds attached to one message")]
    TooManyFds { max: usize },
    #[error("ancillary data truncated (MSG_CTRUNC): the peer attached more fds than a message may carry")]
    ControlTruncated,
    #[error("unexpected ancillary data (level {level}, type {kind})")]
    UnexpectedControl { level: i32, kind: i32 },
    #[error("{what}: {detail}")]
    BadValue { what: &'static str, detail: String },
    /// A reply whose header names another request than the one it should answer.
    #[error("reply carries request code {code} ({})", request_name(*.code))]
    ReplyToOtherRequest { code: u32 },
    /// A message read where a reply was due, without the REPLY flag.
    #[error("REPLY flag missing (flags {flags:#x})")]
    ReplyFlagMissing { flags: u32 },
    /// A reply with another number of fds than its kind carries.
    #[error("{got} fds attached to the reply, expected {expected}")]
    WrongReplyFdCount { expected: usize, got: usize },
}

/// The spec name of a wire code, for error text.
fn request_name(code: u32) -> &'static str {
    Request::from_code(code)
        .map(Request::name)
        .unwrap_or("an unknown request")
}

/// Everything that can go wrong reading, writing or decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("peer went away: {0}")]
    PeerGone(PeerGone),
    #[error("peer broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("timed out waiting for the peer")]
    TimedOut,
    /// We were asked to send something the protocol cannot carry (a bug on our side, not the peer's).
    #[error("refusing to send: {0}")]
    InvalidSend(String),
    #[error("socket error: {0}")]
    Io(#[source] std::io::Error),
}

impl WireError {
    /// True when the peer went away (EOF, reset, broken pipe): a reconnect may help.
    pub fn is_peer_gone(&self) -> bool {
        matches!(self, WireError::PeerGone(_))
    }
}

/// Shorthand used by the decoders: a size mismatch.
pub(crate) fn wrong_size(what: &'static str, expected: usize, got: usize) -> WireError {
    WireError::Protocol(ProtocolError::WrongSize {
        what,
        expected,
        got,
    })
}

/// Shorthand used by the decoders: a field holds a value the protocol does not allow.
pub(crate) fn bad_value(what: &'static str, detail: impl Into<String>) -> WireError {
    WireError::Protocol(ProtocolError::BadValue {
        what,
        detail: detail.into(),
    })
}

macro_rules! requests {
    ($( $(#[$doc:meta])* $variant:ident = $code:literal, $name:literal; )*) => {
        /// Requests the frontend sends to the backend (the "front-end message types" of the spec).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum Request {
            $( $(#[$doc])* $variant = $code, )*
        }

        impl Request {
            /// Every request, in code order.
            pub const ALL: &'static [Request] = &[$(Request::$variant),*];

            /// The request for a wire code; an unknown code is a protocol error, not a panic.
            pub fn from_code(code: u32) -> Result<Request, ProtocolError> {
                match code {
                    $( $code => Ok(Request::$variant), )*
                    other => Err(ProtocolError::UnknownRequest(other)),
                }
            }

            /// The spec's name without the `VHOST_USER_` prefix, e.g. `SET_VRING_ADDR`.
            pub fn name(self) -> &'static str {
                match self {
                    $( Request::$variant => $name, )*
                }
            }
        }
    };
}

requests! {
    GetFeatures = 1, "GET_FEATURES";
    SetFeatures = 2, "SET_FEATURES";
    SetOwner = 3, "SET_OWNER";
    ResetOwner = 4, "RESET_OWNER";
    SetMemTable = 5, "SET_MEM_TABLE";
    SetLogBase = 6, "SET_LOG_BASE";
    SetLogFd = 7, "SET_LOG_FD";
    SetVringNum = 8, "SET_VRING_NUM";
    SetVringAddr = 9, "SET_VRING_ADDR";
    SetVringBase = 10, "SET_VRING_BASE";
    GetVringBase = 11, "GET_VRING_BASE";
    SetVringKick = 12, "SET_VRING_KICK";
    SetVringCall = 13, "SET_VRING_CALL";
    SetVringErr = 14, "SET_VRING_ERR";
    GetProtocolFeatures = 15, "GET_PROTOCOL_FEATURES";
    SetProtocolFeatures = 16, "SET_PROTOCOL_FEATURES";
    GetQueueNum = 17, "GET_QUEUE_NUM";
    SetVringEnable = 18, "SET_VRING_ENABLE";
    SendRarp = 19, "SEND_RARP";
    NetSetMtu = 20, "NET_SET_MTU";
    SetBackendReqFd = 21, "SET_BACKEND_REQ_FD";
    IotlbMsg = 22, "IOTLB_MSG";
    SetVringEndian = 23, "SET_VRING_ENDIAN";
    GetConfig = 24, "GET_CONFIG";
    SetConfig = 25, "SET_CONFIG";
    CreateCryptoSession = 26, "CREATE_CRYPTO_SESSION";
    CloseCryptoSession = 27, "CLOSE_CRYPTO_SESSION";
    PostcopyAdvise = 28, "POSTCOPY_ADVISE";
    PostcopyListen = 29, "POSTCOPY_LISTEN";
    PostcopyEnd = 30, "POSTCOPY_END";
    GetInflightFd = 31, "GET_INFLIGHT_FD";
    SetInflightFd = 32, "SET_INFLIGHT_FD";
    GpuSetSocket = 33, "GPU_SET_SOCKET";
    ResetDevice = 34, "RESET_DEVICE";
    VringKick = 35, "VRING_KICK";
    GetMaxMemSlots = 36, "GET_MAX_MEM_SLOTS";
    AddMemReg = 37, "ADD_MEM_REG";
    RemMemReg = 38, "REM_MEM_REG";
    SetStatus = 39, "SET_STATUS";
    GetStatus = 40, "GET_STATUS";
    GetSharedObject = 41, "GET_SHARED_OBJECT";
    SetDeviceStateFd = 42, "SET_DEVICE_STATE_FD";
    CheckDeviceState = 43, "CHECK_DEVICE_STATE";
}

impl Request {
    /// The wire code.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Requests the backend answers with a reply of their own whether or not NEED_REPLY is set.
    /// For these, NEED_REPLY adds nothing: the normal reply is the ack (spec, "REPLY_ACK").
    pub fn always_replies(self) -> bool {
        matches!(
            self,
            Request::GetFeatures
                | Request::GetProtocolFeatures
                | Request::GetQueueNum
                | Request::GetVringBase
                | Request::GetConfig
                | Request::GetInflightFd
                | Request::GetMaxMemSlots
                | Request::GetStatus
        )
    }
}

impl TryFrom<u32> for Request {
    type Error = ProtocolError;
    fn try_from(code: u32) -> Result<Self, Self::Error> {
        Request::from_code(code)
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The 12-byte message header. Fields are raw so a header with an unknown request code can still be
/// decoded (and its payload skipped or reported); use [`Header::request_kind`] for the typed code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    pub size: u32,
}

impl Header {
    /// A frontend request header. `need_reply` asks for a u64 ack (only valid with REPLY_ACK).
    /// A `payload_len` beyond u32 saturates; [`send_message`] then refuses it.
    pub fn for_request(request: Request, payload_len: usize, need_reply: bool) -> Header {
        let flags = VERSION | if need_reply { FLAG_NEED_REPLY } else { 0 };
        Header {
            request: request.code(),
            flags,
            size: saturating_u32(payload_len),
        }
    }

    /// The header of the backend's reply to `request`.
    pub fn for_reply(request: Request, payload_len: usize) -> Header {
        Header {
            request: request.code(),
            flags: VERSION | FLAG_REPLY,
            size: saturating_u32(payload_len),
        }
    }

    /// True when the REPLY flag is set.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// True when the sender asks for an ack.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// The typed request code.
    pub fn request_kind(&self) -> Result<Request, WireError> {
        Ok(Request::from_code(self.request)?)
    }

    /// The 12 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut bytes = [0u8; HEADER_SIZE];
        bytes[0..4].copy_from_slice(&self.request.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.flags.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.size.to_le_bytes());
        bytes
    }

    /// Same as [`Header::encode`], as a Vec.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.encode().to_vec()
    }

    /// Parses exactly 12 bytes and checks what can be checked without knowing the request:
    /// version 1, no reserved flag bits, payload size within [`MAX_PAYLOAD_SIZE`]. The request code
    /// is not checked here, so the caller can still name the offending message.
    pub fn decode(bytes: &[u8]) -> Result<Header, WireError> {
        let bytes: &[u8; HEADER_SIZE] = bytes
            .try_into()
            .map_err(|_| wrong_size("message header", HEADER_SIZE, bytes.len()))?;
        let header = Header {
            request: le_u32(&bytes[0..4]),
            flags: le_u32(&bytes[4..8]),
            size: le_u32(&bytes[8..12]),
        };
        if header.flags & VERSION_MASK != VERSION {
            return Err(ProtocolError::BadVersion {
                flags: header.flags,
            }
            .into());
        }
        if header.flags & !(VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY) != 0 {
            return Err(ProtocolError::ReservedFlags {
                flags: header.flags,
            }
            .into());
        }
        if header.size as usize > MAX_PAYLOAD_SIZE {
            return Err(ProtocolError::PayloadTooLarge {
                size: header.size.into(),
                max: MAX_PAYLOAD_SIZE,
            }
            .into());
        }
        Ok(header)
    }
}

fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// The slices below always have the right length (callers index fixed ranges of checked buffers);
// a copy into a fixed array keeps that without an unwrap.
pub(crate) fn le_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_le_bytes(a)
}

pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Fd helpers for the round-trip tests of `message` and `reply`.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;

    /// A fresh memfd: unlike eventfds (which share one anonymous inode) each has an inode of its
    /// own, so [`fd_identity`] tells them apart.
    pub(crate) fn memfd() -> OwnedFd {
        // SAFETY: the name is a valid C string; the result is checked before being owned.
        let fd = unsafe { libc::memfd_create(c"wire-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd is fresh and owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Which open file `fd` is (device and inode): the same for an fd and its copy passed over a
    /// socket.
    pub(crate) fn fd_identity(fd: BorrowedFd<'_>) -> (u64, u64) {
        let file = std::fs::File::from(fd.try_clone_to_owned().expect("dup"));
        let meta = file.metadata().expect("fstat");
        (meta.dev(), meta.ino())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_layout() {
        let h = Header::for_request(Request::SetVringAddr, 40, true);
        let bytes = h.encode();
        assert_eq!(bytes, [9, 0, 0, 0, 0x9, 0, 0, 0, 40, 0, 0, 0]);
        assert_eq!(Header::decode(&bytes).unwrap(), h);
        assert!(h.need_reply());
        assert!(!h.is_reply());
        let r = Header::for_reply(Request::GetFeatures, 8);
        assert_eq!(r.flags, 0x5);
        assert!(r.is_reply());
        assert_eq!(Header::decode(&r.to_bytes()).unwrap(), r);
    }

    #[test]
    fn header_needs_exactly_twelve_bytes() {
        let bytes = Header::for_request(Request::GetFeatures, 0, false).encode();
        for len in [0, 1, 11, 13] {
            let mut v = bytes.to_vec();
            v.resize(len, 0);
            match Header::decode(&v) {
                Err(WireError::Protocol(ProtocolError::WrongSize {
                    expected: 12, got, ..
                })) => assert_eq!(got, len),
                other => panic!("len {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn header_rejects_bad_version_reserved_flags_and_huge_size() {
        let mut h = Header::for_request(Request::GetFeatures, 0, false);
        for flags in [0x0, 0x2, 0x3] {
            h.flags = flags;
            assert!(matches!(
                Header::decode(&h.encode()),
                Err(WireError::Protocol(ProtocolError::BadVersion { .. }))
            ));
        }
        h.flags = VERSION | 0x10;
        assert!(matches!(
            Header::decode(&h.encode()),
            Err(WireError::Protocol(ProtocolError::ReservedFlags { .. }))
        ));
        h.flags = VERSION;
        h.size = MAX_PAYLOAD_SIZE as u32;
        assert!(Header::decode(&h.encode()).is_ok());
        h.size = MAX_PAYLOAD_SIZE as u32 + 1;
        assert!(matches!(
            Header::decode(&h.encode()),
            Err(WireError::Protocol(ProtocolError::PayloadTooLarge { .. }))
        ));
        h.size = u32::MAX;
        assert!(Header::decode(&h.encode()).is_err());
    }

    #[test]
    fn request_codes_match_the_spec_and_unknown_is_an_error() {
        assert_eq!(Request::GetFeatures.code(), 1);
        assert_eq!(Request::SetVringEnable.code(), 18);
        assert_eq!(Request::GetConfig.code(), 24);
        assert_eq!(Request::GetInflightFd.code(), 31);
        assert_eq!(Request::SetInflightFd.code(), 32);
        assert_eq!(Request::GetMaxMemSlots.code(), 36);
        assert_eq!(Request::CheckDeviceState.code(), 43);
        for (i, r) in Request::ALL.iter().enumerate() {
            assert_eq!(r.code() as usize, i + 1, "{r} out of order");
            assert_eq!(Request::from_code(r.code()), Ok(*r));
        }
        for code in [0, 44, 1000, u32::MAX] {
            assert_eq!(
                Request::from_code(code),
                Err(ProtocolError::UnknownRequest(code))
            );
        }
        let mut h = Header::for_request(Request::GetFeatures, 0, false);
        h.request = 77;
        let h = Header::decode(&h.encode()).unwrap();
        assert!(matches!(
            h.request_kind(),
            Err(WireError::Protocol(ProtocolError::UnknownRequest(77)))
        ));
    }

    #[test]
    fn the_get_messages_always_reply() {
        let replying: Vec<_> = Request::ALL
            .iter()
            .filter(|r| r.always_replies())
            .map(|r| r.name())
            .collect();
        assert_eq!(
            replying,
            [
                "GET_FEATURES",
                "GET_VRING_BASE",
                "GET_PROTOCOL_FEATURES",
                "GET_QUEUE_NUM",
                "GET_CONFIG",
                "GET_INFLIGHT_FD",
                "GET_MAX_MEM_SLOTS",
                "GET_STATUS"
            ]
        );
    }
}
