//! A backend reply, typed: what the frontend decodes and what the backend encodes, one definition.
//!
//! Which reply a request gets ([`ReplyKind`]), from the spec ("REPLY_ACK"):
//! - the requests with a reply of their own ([`Request::always_replies`]: the GET_* family) get it
//!   whether or not NEED_REPLY was set; NEED_REPLY adds nothing to them;
//! - every other request gets the REPLY_ACK u64 status, and only when it was sent with NEED_REPLY.
//!
//! So once a reply to `request` is due it has exactly one possible shape, and [`BackendReply::decode`]
//! needs only the request to know it; whether a reply is due at all is [`ReplyKind::expected`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{
    bad_value, wrong_size, ConfigSpace, Header, InflightDescription, ProtocolError, Request,
    U64Payload, VringState, WireError, FLAG_REPLY, VERSION,
};

/// The shape of the reply to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// The REPLY_ACK u64 status (0 success, anything else failure), no fds.
    Ack,
    /// A u64 value: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
    /// GET_STATUS. No fds.
    U64,
    /// GET_VRING_BASE: `struct vhost_vring_state`, no fds.
    VringState,
    /// GET_CONFIG: a config space, or an empty payload ("failed"), no fds.
    Config,
    /// GET_INFLIGHT_FD: the inflight description and its fd (none needed with mmap_size 0).
    Inflight,
}

impl ReplyKind {
    /// The reply `request` gets when sent with (or without) NEED_REPLY; `None`: no reply comes, and
    /// the sender must not wait for one (the next message read would be another request's).
    pub fn expected(request: Request, need_reply: bool) -> Option<ReplyKind> {
        (request.always_replies() || need_reply).then(|| ReplyKind::of(request))
    }

    /// The shape of a reply to `request`, given that one is due. Requests this crate does not model
    /// (log, postcopy, device state, ...) count as acked ones.
    pub fn of(request: Request) -> ReplyKind {
        match request {
            Request::GetFeatures
            | Request::GetProtocolFeatures
            | Request::GetQueueNum
            | Request::GetMaxMemSlots
            | Request::GetStatus => ReplyKind::U64,
            Request::GetVringBase => ReplyKind::VringState,
            Request::GetConfig => ReplyKind::Config,
            Request::GetInflightFd => ReplyKind::Inflight,
            _ => ReplyKind::Ack,
        }
    }
}

/// One backend->frontend reply. The inflight fd is owned: dropping the reply closes it.
#[derive(Debug)]
pub enum BackendReply {
    /// The REPLY_ACK status of `request`, one with no reply of its own (`ReplyKind::of` is `Ack`).
    /// 0 is success. For a GET_* request the answer to NEED_REPLY is its own reply, never this.
    Ack { request: Request, status: u64 },
    /// GET_FEATURES: virtio feature bits (plus VHOST_USER_F_PROTOCOL_FEATURES).
    Features(u64),
    /// GET_PROTOCOL_FEATURES.
    ProtocolFeatures(u64),
    /// GET_QUEUE_NUM.
    QueueNum(u64),
    /// GET_MAX_MEM_SLOTS.
    MaxMemSlots(u64),
    /// GET_STATUS: the virtio device status, in a u64 as on the wire (unchecked: the reader judges).
    Status(u64),
    /// GET_VRING_BASE: the queue and where the backend stopped.
    VringBase(VringState),
    /// GET_CONFIG: the window read. A `Config` with an empty `payload` is still 12 bytes on the wire.
    Config(ConfigSpace),
    /// GET_CONFIG answered with an empty payload: how libvhost-user (and our backend) says the read
    /// failed. Kept apart from a malformed reply so the frontend can tell which it got.
    ConfigFailed,
    /// GET_INFLIGHT_FD. With `mmap_size` != 0 `fd` is the buffer (decode guarantees `Some`). With
    /// `mmap_size` 0 ("backend keeps no inflight buffer", as QEMU reads it) an fd is optional and
    /// meaningless: decode keeps one that came (the reader drops it), a backend sends `None`.
    Inflight {
        description: InflightDescription,
        fd: Option<OwnedFd>,
    },
}

impl BackendReply {
    /// Decodes the reply to `request` (the request it answers, as sent). Checks, in order: the
    /// header names `request`, the REPLY flag is set, `header.size` is the payload's length, and the
    /// payload size and fd count are exact for the reply's [`ReplyKind::of`] (for GET_INFLIGHT_FD the
    /// size first, since the fd count depends on `mmap_size`). A NEED_REPLY bit on a reply is
    /// ignored. Ranges that depend on what was asked (GET_CONFIG's window, GET_VRING_BASE's queue,
    /// the inflight size bound) are the caller's. On error every fd in `fds` is closed.
    pub fn decode(
        request: Request,
        header: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<BackendReply, WireError> {
        if header.request != request.code() {
            return Err(ProtocolError::ReplyToOtherRequest {
                code: header.request,
            }
            .into());
        }
        if !header.is_reply() {
            return Err(ProtocolError::ReplyFlagMissing {
                flags: header.flags,
            }
            .into());
        }
        if header.size as usize != payload.len() {
            return Err(wrong_size(
                request.name(),
                header.size as usize,
                payload.len(),
            ));
        }
        use BackendReply as R;
        // Keep in step with `ReplyKind::of` (a test checks every request).
        let reply = match request {
            Request::GetInflightFd => return decode_inflight(payload, fds),
            Request::GetFeatures => R::Features(u64_reply(payload, fds)?),
            Request::GetProtocolFeatures => R::ProtocolFeatures(u64_reply(payload, fds)?),
            Request::GetQueueNum => R::QueueNum(u64_reply(payload, fds)?),
            Request::GetMaxMemSlots => R::MaxMemSlots(u64_reply(payload, fds)?),
            Request::GetStatus => R::Status(u64_reply(payload, fds)?),
            Request::GetVringBase => {
                no_fds(fds)?;
                R::VringBase(VringState::decode(payload)?)
            }
            Request::GetConfig => {
                no_fds(fds)?;
                if payload.is_empty() {
                    R::ConfigFailed
                } else {
                    R::Config(ConfigSpace::decode(payload)?)
                }
            }
            _ => R::Ack {
                request,
                status: u64_reply(payload, fds)?,
            },
        };
        Ok(reply)
    }

    /// The reply as header, payload and fds for [`super::send_message`]; the fds are borrowed from
    /// `self`, so keep it alive until sent.
    pub fn encode(&self) -> (Header, Vec<u8>, Vec<BorrowedFd<'_>>) {
        use BackendReply as R;
        let (payload, fds) = match self {
            R::Ack { status: value, .. }
            | R::Features(value)
            | R::ProtocolFeatures(value)
            | R::QueueNum(value)
            | R::MaxMemSlots(value)
            | R::Status(value) => (U64Payload(*value).encode(), Vec::new()),
            R::VringBase(state) => (state.encode(), Vec::new()),
            R::Config(config) => (config.encode(), Vec::new()),
            R::ConfigFailed => (Vec::new(), Vec::new()),
            R::Inflight { description, fd } => {
                (description.encode(), fd.iter().map(AsFd::as_fd).collect())
            }
        };
        (
            Header::for_reply(self.request(), payload.len()),
            payload,
            fds,
        )
    }

    /// The REPLY_ACK reply to a request known only by its wire code (one whose decoding failed,
    /// e.g. an unknown code, so no `Request` exists to build an `Ack` from): header and payload, no
    /// fds; the same bytes an `Ack` encodes to.
    pub fn encode_ack_for_code(request_code: u32, status: u64) -> (Header, Vec<u8>) {
        let payload = U64Payload(status).encode();
        let header = Header {
            request: request_code,
            flags: VERSION | FLAG_REPLY,
            size: U64Payload::SIZE as u32,
        };
        (header, payload)
    }

    /// The request this reply answers.
    pub fn request(&self) -> Request {
        use BackendReply as R;
        match self {
            R::Ack { request, .. } => *request,
            R::Features(_) => Request::GetFeatures,
            R::ProtocolFeatures(_) => Request::GetProtocolFeatures,
            R::QueueNum(_) => Request::GetQueueNum,
            R::MaxMemSlots(_) => Request::GetMaxMemSlots,
            R::Status(_) => Request::GetStatus,
            R::VringBase(_) => Request::GetVringBase,
            R::Config(_) | R::ConfigFailed => Request::GetConfig,
            R::Inflight { .. } => Request::GetInflightFd,
        }
    }

    /// The reply's shape.
    pub fn kind(&self) -> ReplyKind {
        use BackendReply as R;
        match self {
            R::Ack { .. } => ReplyKind::Ack,
            R::Features(_)
            | R::ProtocolFeatures(_)
            | R::QueueNum(_)
            | R::MaxMemSlots(_)
            | R::Status(_) => ReplyKind::U64,
            R::VringBase(_) => ReplyKind::VringState,
            R::Config(_) | R::ConfigFailed => ReplyKind::Config,
            R::Inflight { .. } => ReplyKind::Inflight,
        }
    }
}

/// Refuses any fd (returning drops them: every fd that came is closed).
fn no_fds(fds: Vec<OwnedFd>) -> Result<(), WireError> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::WrongReplyFdCount {
            expected: 0,
            got: fds.len(),
        }
        .into())
    }
}

/// A bare u64 reply: no fds (checked first), exactly 8 bytes.
fn u64_reply(payload: &[u8], fds: Vec<OwnedFd>) -> Result<u64, WireError> {
    no_fds(fds)?;
    Ok(U64Payload::decode(payload)?.0)
}

fn decode_inflight(payload: &[u8], mut fds: Vec<OwnedFd>) -> Result<BackendReply, WireError> {
    let description = InflightDescription::decode(payload)?;
    if description.mmap_size == 0 {
        // No buffer: an fd sent along anyway is tolerated (the reader closes it), more are not.
        if fds.len() > 1 {
            return Err(bad_value(
                "inflight description",
                format!(
                    "{} fds with an empty buffer (mmap_size 0), at most 1",
                    fds.len()
                ),
            ));
        }
    } else if fds.len() != 1 {
        return Err(ProtocolError::WrongReplyFdCount {
            expected: 1,
            got: fds.len(),
        }
        .into());
    }
    Ok(BackendReply::Inflight {
        description,
        fd: fds.pop(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{eventfd, open_fd_count, FD_LOCK};
    use crate::wire::testing::{fd_identity, memfd};
    use crate::wire::{recv_message, send_message, FLAG_NEED_REPLY, MAX_CONFIG_SIZE};
    use std::os::unix::net::UnixStream;

    /// One of each variant (both inflight forms, with and without a stray fd), through a real
    /// socketpair: what `encode` sends, `decode` gives back equal, fds the same open files.
    #[test]
    fn every_reply_round_trips_through_a_socket() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        {
            let inflight = |mmap_size, fd| BackendReply::Inflight {
                description: InflightDescription {
                    mmap_size,
                    mmap_offset: 0x40,
                    num_queues: 2,
                    queue_size: 128,
                },
                fd,
            };
            let replies = vec![
                BackendReply::Ack {
                    request: Request::SetMemTable,
                    status: 0,
                },
                BackendReply::Ack {
                    request: Request::SetVringKick,
                    status: 1,
                },
                BackendReply::Ack {
                    request: Request::SetLogBase,
                    status: u64::MAX,
                },
                BackendReply::Features(0x1_7500_7e46),
                BackendReply::ProtocolFeatures(0x8f2b),
                BackendReply::QueueNum(4),
                BackendReply::MaxMemSlots(509),
                BackendReply::Status(0xf),
                BackendReply::VringBase(VringState { index: 3, num: 77 }),
                BackendReply::Config(ConfigSpace {
                    offset: 0x14,
                    flags: 0,
                    payload: vec![1, 2, 3, 4],
                }),
                BackendReply::Config(ConfigSpace {
                    offset: 0,
                    flags: ConfigSpace::FLAG_MIGRATION,
                    payload: vec![],
                }),
                BackendReply::Config(ConfigSpace {
                    offset: 0,
                    flags: 0,
                    payload: vec![0xaa; MAX_CONFIG_SIZE],
                }),
                BackendReply::ConfigFailed,
                inflight(4224, Some(memfd())),
                inflight(0, None),
                inflight(0, Some(memfd())),
            ];
            let mut kinds = std::collections::HashSet::new();
            let (a, b) = UnixStream::pair().unwrap();
            for sent in &replies {
                let (header, payload, fds) = sent.encode();
                assert_eq!(header, Header::for_reply(sent.request(), payload.len()));
                send_message(&a, &header, &payload, &fds).unwrap();
                let (h, p, received) = recv_message(&b).unwrap();
                let sent_ids: Vec<_> = fds.iter().map(|fd| fd_identity(*fd)).collect();
                let got_ids: Vec<_> = received.iter().map(|fd| fd_identity(fd.as_fd())).collect();
                assert_eq!(sent_ids, got_ids, "{sent:?}: not the same files");
                let got = BackendReply::decode(sent.request(), &h, &p, received)
                    .unwrap_or_else(|e| panic!("{sent:?}: {e}"));
                assert_same(sent, &got);
                kinds.insert(format!("{:?}", got.kind()));
            }
            assert_eq!(kinds.len(), 5, "every ReplyKind covered");
        }
        assert_eq!(open_fd_count(), before, "fds leaked");
    }

    /// Field by field; fds by identity (same open file).
    fn assert_same(sent: &BackendReply, got: &BackendReply) {
        use BackendReply as R;
        let same = match (sent, got) {
            (
                R::Ack { request, status },
                R::Ack {
                    request: r,
                    status: s,
                },
            ) => (request, status) == (r, s),
            (R::Features(a), R::Features(b))
            | (R::ProtocolFeatures(a), R::ProtocolFeatures(b))
            | (R::QueueNum(a), R::QueueNum(b))
            | (R::MaxMemSlots(a), R::MaxMemSlots(b))
            | (R::Status(a), R::Status(b)) => a == b,
            (R::VringBase(a), R::VringBase(b)) => a == b,
            (R::Config(a), R::Config(b)) => a == b,
            (R::ConfigFailed, R::ConfigFailed) => true,
            (
                R::Inflight { description, fd },
                R::Inflight {
                    description: d,
                    fd: f,
                },
            ) => {
                description == d
                    && fd.as_ref().map(|fd| fd_identity(fd.as_fd()))
                        == f.as_ref().map(|fd| fd_identity(fd.as_fd()))
            }
            _ => false,
        };
        assert!(same, "sent {sent:?}, decoded {got:?}");
    }

    /// What `decode` picks for each request is what `ReplyKind::of` says, and only the GET_*
    /// family has a reply of its own.
    #[test]
    fn reply_kinds_follow_the_request() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for &request in Request::ALL {
            let kind = ReplyKind::of(request);
            assert_eq!(
                kind != ReplyKind::Ack,
                request.always_replies(),
                "{request}"
            );
            assert_eq!(ReplyKind::expected(request, true), Some(kind));
            assert_eq!(
                ReplyKind::expected(request, false),
                request.always_replies().then_some(kind)
            );
            let (payload, fds) = match kind {
                ReplyKind::Ack | ReplyKind::U64 | ReplyKind::VringState => (vec![0; 8], vec![]),
                ReplyKind::Config => (ConfigSpace::request(0, 4).unwrap().encode(), vec![]),
                ReplyKind::Inflight => (
                    InflightDescription {
                        mmap_size: 64,
                        mmap_offset: 0,
                        num_queues: 1,
                        queue_size: 1,
                    }
                    .encode(),
                    vec![eventfd()],
                ),
            };
            let header = Header::for_reply(request, payload.len());
            let reply = BackendReply::decode(request, &header, &payload, fds)
                .unwrap_or_else(|e| panic!("{request}: {e}"));
            assert_eq!((reply.kind(), reply.request()), (kind, request));
        }
    }

    fn decode(
        request: Request,
        header: Header,
        payload: &[u8],
        fds: usize,
    ) -> Result<BackendReply, WireError> {
        BackendReply::decode(
            request,
            &header,
            payload,
            (0..fds).map(|_| eventfd()).collect(),
        )
    }

    fn reply_to(request: Request, payload: &[u8], fds: usize) -> Result<BackendReply, WireError> {
        decode(
            request,
            Header::for_reply(request, payload.len()),
            payload,
            fds,
        )
    }

    fn protocol_error(r: Result<BackendReply, WireError>) -> ProtocolError {
        match r {
            Err(WireError::Protocol(e)) => e,
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[test]
    fn header_checks_come_first_and_close_the_fds() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        let ack = U64Payload(0).encode();
        // Another request's reply, with fds: named, and the fds closed.
        let e = protocol_error(decode(
            Request::GetFeatures,
            Header::for_reply(Request::GetProtocolFeatures, 8),
            &ack,
            3,
        ));
        assert_eq!(e, ProtocolError::ReplyToOtherRequest { code: 15 });
        assert_eq!(
            e.to_string(),
            "reply carries request code 15 (GET_PROTOCOL_FEATURES)"
        );
        let unknown = Header {
            request: 999,
            ..Header::for_reply(Request::GetFeatures, 8)
        };
        let e = protocol_error(decode(Request::GetFeatures, unknown, &ack, 1));
        assert_eq!(
            e.to_string(),
            "reply carries request code 999 (an unknown request)"
        );
        // A request (no REPLY flag) where the reply belongs.
        let e = protocol_error(decode(
            Request::SetVringNum,
            Header::for_request(Request::SetVringNum, 8, true),
            &ack,
            1,
        ));
        assert_eq!(e.to_string(), "REPLY flag missing (flags 0x9)");
        // NEED_REPLY on a reply is not ours to judge.
        let mut flagged = Header::for_reply(Request::SetVringNum, 8);
        flagged.flags |= FLAG_NEED_REPLY;
        assert!(decode(Request::SetVringNum, flagged, &ack, 0).is_ok());
        // The header's size must be the payload handed in.
        let e = protocol_error(decode(
            Request::GetFeatures,
            Header::for_reply(Request::GetFeatures, 8),
            &ack[..4],
            0,
        ));
        assert!(matches!(
            e,
            ProtocolError::WrongSize {
                expected: 8,
                got: 4,
                ..
            }
        ));
        assert_eq!(open_fd_count(), before, "fds leaked");
    }

    #[test]
    fn payload_sizes_and_fd_counts_are_exact() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        let fd_error = |r| match protocol_error(r) {
            ProtocolError::WrongReplyFdCount { expected, got } => (expected, got),
            other => panic!("expected WrongReplyFdCount, got {other:?}"),
        };
        let size_error = |r| match protocol_error(r) {
            ProtocolError::WrongSize { expected, got, .. } => (expected, got),
            other => panic!("expected WrongSize, got {other:?}"),
        };
        for request in [
            Request::SetOwner,
            Request::GetFeatures,
            Request::GetStatus,
            Request::GetVringBase,
        ] {
            for len in [0, 7, 9, 16] {
                assert_eq!(size_error(reply_to(request, &vec![0; len], 0)), (8, len));
            }
            // The fd count is judged before the payload, and says so.
            assert_eq!(fd_error(reply_to(request, &[0; 8], 1)), (0, 1));
            assert_eq!(fd_error(reply_to(request, &[0; 3], 2)), (0, 2));
        }
        let e = protocol_error(reply_to(Request::GetFeatures, &[0; 8], 1));
        assert_eq!(e.to_string(), "1 fds attached to the reply, expected 0");

        let config = ConfigSpace::request(0, 8).unwrap().encode();
        assert_eq!(fd_error(reply_to(Request::GetConfig, &config, 1)), (0, 1));
        assert_eq!(fd_error(reply_to(Request::GetConfig, &[], 1)), (0, 1));
        assert!(matches!(
            reply_to(Request::GetConfig, &[], 0),
            Ok(BackendReply::ConfigFailed)
        ));
        assert_eq!(
            size_error(reply_to(Request::GetConfig, &config[..19], 0)),
            (20, 19)
        );
        assert_eq!(
            size_error(reply_to(Request::GetConfig, &config[..5], 0)),
            (12, 5)
        );
        assert!(matches!(
            reply_to(Request::GetConfig, &config, 0),
            Ok(BackendReply::Config(c)) if c.payload.len() == 8
        ));
        assert_eq!(open_fd_count(), before, "fds leaked");
    }

    /// GET_INFLIGHT_FD: exactly one fd with a buffer; with mmap_size 0 none or one (kept for the
    /// reader to close), never more; the 24-byte size before any of that.
    #[test]
    fn inflight_fd_rules() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        let payload = |mmap_size| {
            InflightDescription {
                mmap_size,
                mmap_offset: 0,
                num_queues: 1,
                queue_size: 128,
            }
            .encode()
        };
        let fd_of = |r: Result<BackendReply, WireError>| match r {
            Ok(BackendReply::Inflight { fd, .. }) => fd.is_some(),
            other => panic!("{other:?}"),
        };
        assert!(fd_of(reply_to(Request::GetInflightFd, &payload(2112), 1)));
        assert!(!fd_of(reply_to(Request::GetInflightFd, &payload(0), 0)));
        assert!(fd_of(reply_to(Request::GetInflightFd, &payload(0), 1)));
        for fds in [0, 2, 8] {
            let e = protocol_error(reply_to(Request::GetInflightFd, &payload(2112), fds));
            assert_eq!(
                e,
                ProtocolError::WrongReplyFdCount {
                    expected: 1,
                    got: fds
                }
            );
        }
        let e = protocol_error(reply_to(Request::GetInflightFd, &payload(0), 2));
        assert!(e.to_string().contains("2 fds with an empty buffer"), "{e}");
        // The 20-byte packed C struct, with its fd: a size error, fd closed.
        let e = protocol_error(reply_to(Request::GetInflightFd, &[0; 20], 1));
        assert!(matches!(
            e,
            ProtocolError::WrongSize {
                expected: 24,
                got: 20,
                ..
            }
        ));
        assert_eq!(open_fd_count(), before, "fds leaked");
    }

    #[test]
    fn an_ack_for_a_bare_code_is_an_ack() {
        let (header, payload) = BackendReply::encode_ack_for_code(4242, 1);
        assert_eq!(
            header,
            Header {
                request: 4242,
                flags: crate::wire::VERSION | crate::wire::FLAG_REPLY,
                size: 8
            }
        );
        assert_eq!(payload, 1u64.to_le_bytes());
        let ack = BackendReply::Ack {
            request: Request::SetVringAddr,
            status: 7,
        };
        let (h, p, fds) = ack.encode();
        assert_eq!((h, p, fds.len()), {
            let (h, p) = BackendReply::encode_ack_for_code(9, 7);
            (h, p, 0)
        });
    }
}
