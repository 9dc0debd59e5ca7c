//! A frontend request, typed: what the backend decodes (the header, payload and fds of one message
//! turned into one value, with the payload size and the number of attached fds checked per request)
//! and what the frontend encodes, one definition.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::{
    bad_value, wrong_size, ConfigSpace, Header, InflightDescription, MemoryRegion, MemoryTable,
    ProtocolError, Request, SingleMemoryRegion, U64Payload, VringAddr, VringFdIndex, VringState,
    WireError,
};

/// One frontend->backend message. `F` is the fd type: a decoded message owns its fds (`OwnedFd`, the
/// default), so dropping it closes them and an error path in the backend cannot leak them; a sender
/// builds one with `BorrowedFd` to send fds it keeps, without a dup.
#[derive(Debug)]
pub enum FrontendMessage<F = OwnedFd> {
    GetFeatures,
    SetFeatures(u64),
    SetOwner,
    ResetOwner,
    /// One fd per region, in the same order.
    SetMemTable {
        table: MemoryTable,
        fds: Vec<F>,
    },
    SetVringNum(VringState),
    SetVringAddr(VringAddr),
    SetVringBase(VringState),
    GetVringBase(VringState),
    /// `fd` is `None` when the frontend set the "no fd" bit (the backend must poll).
    SetVringKick {
        index: u8,
        fd: Option<F>,
    },
    SetVringCall {
        index: u8,
        fd: Option<F>,
    },
    SetVringErr {
        index: u8,
        fd: Option<F>,
    },
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    GetQueueNum,
    SetVringEnable {
        index: u32,
        enable: bool,
    },
    GetConfig(ConfigSpace),
    SetConfig(ConfigSpace),
    /// The frontend fills `num_queues` and `queue_size`; the other fields are ignored.
    GetInflightFd(InflightDescription),
    SetInflightFd {
        description: InflightDescription,
        fd: F,
    },
    ResetDevice,
    GetMaxMemSlots,
    AddMemReg {
        region: MemoryRegion,
        fd: F,
    },
    RemMemReg(MemoryRegion),
    /// The virtio device status byte.
    SetStatus(u8),
    GetStatus,
    /// A request known by code that this crate does not model (log, postcopy, crypto, ...). Its fds
    /// were closed. A backend answers with a failure ack (if NEED_REPLY) or closes the connection.
    /// Encodes as the bare header: its payload was not kept.
    Unsupported(Request),
}

impl FrontendMessage {
    /// Decodes one received message. Refuses replies (a frontend never sends one), unknown request
    /// codes, payloads of the wrong size and any fd count other than what the request carries.
    /// On error every fd in `fds` is closed.
    pub fn decode(
        header: &Header,
        payload: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<FrontendMessage, WireError> {
        let request = header.request_kind()?;
        let name = request.name();
        if header.is_reply() {
            return Err(bad_value(name, "REPLY flag set on a frontend request"));
        }
        if header.size as usize != payload.len() {
            return Err(wrong_size(name, header.size as usize, payload.len()));
        }
        let mut fds = FdsOf { name, fds };
        use FrontendMessage as M;
        let message = match request {
            Request::GetFeatures => no_payload(name, payload, &mut fds, M::GetFeatures)?,
            Request::SetOwner => no_payload(name, payload, &mut fds, M::SetOwner)?,
            Request::ResetOwner => no_payload(name, payload, &mut fds, M::ResetOwner)?,
            Request::GetProtocolFeatures => {
                no_payload(name, payload, &mut fds, M::GetProtocolFeatures)?
            }
            Request::GetQueueNum => no_payload(name, payload, &mut fds, M::GetQueueNum)?,
            Request::ResetDevice => no_payload(name, payload, &mut fds, M::ResetDevice)?,
            Request::GetMaxMemSlots => no_payload(name, payload, &mut fds, M::GetMaxMemSlots)?,
            Request::GetStatus => no_payload(name, payload, &mut fds, M::GetStatus)?,
            Request::SetFeatures => {
                fds.take(0)?;
                M::SetFeatures(U64Payload::decode(payload)?.0)
            }
            Request::SetProtocolFeatures => {
                fds.take(0)?;
                M::SetProtocolFeatures(U64Payload::decode(payload)?.0)
            }
            Request::SetStatus => {
                fds.take(0)?;
                let status = U64Payload::decode(payload)?.0;
                let status = u8::try_from(status).map_err(|_| {
                    bad_value(
                        name,
                        format!("status {status:#x} does not fit the 8-bit device status"),
                    )
                })?;
                M::SetStatus(status)
            }
            Request::SetMemTable => {
                let table = MemoryTable::decode(payload)?;
                let fds = fds.take(table.regions.len())?;
                M::SetMemTable { table, fds }
            }
            Request::SetVringNum => {
                fds.take(0)?;
                M::SetVringNum(VringState::decode(payload)?)
            }
            Request::SetVringBase => {
                fds.take(0)?;
                M::SetVringBase(VringState::decode(payload)?)
            }
            Request::GetVringBase => {
                fds.take(0)?;
                M::GetVringBase(VringState::decode(payload)?)
            }
            Request::SetVringAddr => {
                fds.take(0)?;
                M::SetVringAddr(VringAddr::decode(payload)?)
            }
            Request::SetVringEnable => {
                fds.take(0)?;
                let state = VringState::decode(payload)?;
                let enable = match state.num {
                    0 => false,
                    1 => true,
                    other => {
                        return Err(bad_value(
                            name,
                            format!("enable must be 0 or 1, got {other}"),
                        ))
                    }
                };
                M::SetVringEnable {
                    index: state.index,
                    enable,
                }
            }
            Request::SetVringKick | Request::SetVringCall | Request::SetVringErr => {
                let which = VringFdIndex::decode(payload)?;
                let fd = fds.take(which.expected_fds())?.pop();
                match request {
                    Request::SetVringKick => M::SetVringKick {
                        index: which.index,
                        fd,
                    },
                    Request::SetVringCall => M::SetVringCall {
                        index: which.index,
                        fd,
                    },
                    _ => M::SetVringErr {
                        index: which.index,
                        fd,
                    },
                }
            }
            Request::GetConfig => {
                fds.take(0)?;
                M::GetConfig(ConfigSpace::decode(payload)?)
            }
            Request::SetConfig => {
                fds.take(0)?;
                M::SetConfig(ConfigSpace::decode(payload)?)
            }
            Request::GetInflightFd => {
                fds.take(0)?;
                M::GetInflightFd(InflightDescription::decode(payload)?)
            }
            Request::SetInflightFd => {
                let description = InflightDescription::decode(payload)?;
                let fd = fds.take_one()?;
                M::SetInflightFd { description, fd }
            }
            Request::AddMemReg => {
                let region = SingleMemoryRegion::decode(payload)?.0;
                let fd = fds.take_one()?;
                M::AddMemReg { region, fd }
            }
            Request::RemMemReg => {
                fds.take(0)?;
                M::RemMemReg(SingleMemoryRegion::decode(payload)?.0)
            }
            other => M::Unsupported(other),
        };
        Ok(message)
    }
}

impl<F: AsFd> FrontendMessage<F> {
    /// The message as header, payload and fds for [`super::send_message`], built with the payload
    /// encoders `decode` reads with (a test round-trips every variant). `need_reply` sets
    /// NEED_REPLY (only with REPLY_ACK negotiated). The fds are borrowed from `self`. Nothing is
    /// validated here: a sender checks what it was asked to send first (region sizes, counts).
    pub fn encode(&self, need_reply: bool) -> (Header, Vec<u8>, Vec<BorrowedFd<'_>>) {
        use FrontendMessage as M;
        let (payload, fds): (Vec<u8>, Vec<BorrowedFd<'_>>) = match self {
            M::GetFeatures
            | M::SetOwner
            | M::ResetOwner
            | M::GetProtocolFeatures
            | M::GetQueueNum
            | M::ResetDevice
            | M::GetMaxMemSlots
            | M::GetStatus
            | M::Unsupported(_) => (Vec::new(), Vec::new()),
            M::SetFeatures(bits) | M::SetProtocolFeatures(bits) => {
                (U64Payload(*bits).encode(), Vec::new())
            }
            M::SetStatus(status) => (U64Payload(u64::from(*status)).encode(), Vec::new()),
            M::SetMemTable { table, fds } => (table.encode(), fds.iter().map(F::as_fd).collect()),
            M::SetVringNum(state) | M::SetVringBase(state) | M::GetVringBase(state) => {
                (state.encode(), Vec::new())
            }
            M::SetVringAddr(addr) => (addr.encode(), Vec::new()),
            M::SetVringKick { index, fd }
            | M::SetVringCall { index, fd }
            | M::SetVringErr { index, fd } => {
                let which = VringFdIndex {
                    index: *index,
                    no_fd: fd.is_none(),
                };
                (which.encode(), fd.iter().map(F::as_fd).collect())
            }
            M::SetVringEnable { index, enable } => (
                VringState {
                    index: *index,
                    num: u32::from(*enable),
                }
                .encode(),
                Vec::new(),
            ),
            M::GetConfig(config) | M::SetConfig(config) => (config.encode(), Vec::new()),
            M::GetInflightFd(description) => (description.encode(), Vec::new()),
            M::SetInflightFd { description, fd } => (description.encode(), vec![fd.as_fd()]),
            M::AddMemReg { region, fd } => (SingleMemoryRegion(*region).encode(), vec![fd.as_fd()]),
            M::RemMemReg(region) => (SingleMemoryRegion(*region).encode(), Vec::new()),
        };
        let header = Header::for_request(self.request(), payload.len(), need_reply);
        (header, payload, fds)
    }
}

impl<F> FrontendMessage<F> {
    /// The request this message is.
    pub fn request(&self) -> Request {
        use FrontendMessage as M;
        match self {
            M::GetFeatures => Request::GetFeatures,
            M::SetFeatures(_) => Request::SetFeatures,
            M::SetOwner => Request::SetOwner,
            M::ResetOwner => Request::ResetOwner,
            M::SetMemTable { .. } => Request::SetMemTable,
            M::SetVringNum(_) => Request::SetVringNum,
            M::SetVringAddr(_) => Request::SetVringAddr,
            M::SetVringBase(_) => Request::SetVringBase,
            M::GetVringBase(_) => Request::GetVringBase,
            M::SetVringKick { .. } => Request::SetVringKick,
            M::SetVringCall { .. } => Request::SetVringCall,
            M::SetVringErr { .. } => Request::SetVringErr,
            M::GetProtocolFeatures => Request::GetProtocolFeatures,
            M::SetProtocolFeatures(_) => Request::SetProtocolFeatures,
            M::GetQueueNum => Request::GetQueueNum,
            M::SetVringEnable { .. } => Request::SetVringEnable,
            M::GetConfig(_) => Request::GetConfig,
            M::SetConfig(_) => Request::SetConfig,
            M::GetInflightFd(_) => Request::GetInflightFd,
            M::SetInflightFd { .. } => Request::SetInflightFd,
            M::ResetDevice => Request::ResetDevice,
            M::GetMaxMemSlots => Request::GetMaxMemSlots,
            M::AddMemReg { .. } => Request::AddMemReg,
            M::RemMemReg(_) => Request::RemMemReg,
            M::SetStatus(_) => Request::SetStatus,
            M::GetStatus => Request::GetStatus,
            M::Unsupported(request) => *request,
        }
    }
}

/// The fds that came with a message, handed out once the request says how many it carries.
struct FdsOf {
    name: &'static str,
    fds: Vec<OwnedFd>,
}

impl FdsOf {
    fn take(&mut self, expected: usize) -> Result<Vec<OwnedFd>, WireError> {
        if self.fds.len() != expected {
            // Returning drops `self.fds` with the caller's FdsOf: every fd is closed.
            return Err(ProtocolError::WrongFdCount {
                what: self.name,
                expected,
                got: self.fds.len(),
            }
            .into());
        }
        Ok(std::mem::take(&mut self.fds))
    }

    fn take_one(&mut self) -> Result<OwnedFd, WireError> {
        let mut fds = self.take(1)?;
        fds.pop()
            .ok_or(WireError::Protocol(ProtocolError::WrongFdCount {
                what: self.name,
                expected: 1,
                got: 0,
            }))
    }
}

fn no_payload(
    name: &'static str,
    payload: &[u8],
    fds: &mut FdsOf,
    message: FrontendMessage,
) -> Result<FrontendMessage, WireError> {
    fds.take(0)?;
    if !payload.is_empty() {
        return Err(wrong_size(name, 0, payload.len()));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{eventfd, FD_LOCK};
    use crate::wire::{MAX_CONFIG_SIZE, MAX_PAYLOAD_SIZE};

    fn decode(request: Request, payload: &[u8], fds: usize) -> Result<FrontendMessage, WireError> {
        let header = Header::for_request(request, payload.len(), false);
        FrontendMessage::decode(&header, payload, (0..fds).map(|_| eventfd()).collect())
    }

    fn fd_count_error(r: Result<FrontendMessage, WireError>) -> (usize, usize) {
        match r {
            Err(WireError::Protocol(ProtocolError::WrongFdCount { expected, got, .. })) => {
                (expected, got)
            }
            other => panic!("expected WrongFdCount, got {other:?}"),
        }
    }

    #[test]
    fn decodes_every_modelled_request() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let state = VringState { index: 0, num: 128 }.encode();
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 0x1000,
            userspace_addr: 0x1000,
            mmap_offset: 0,
        };
        let table = MemoryTable {
            regions: vec![region],
        }
        .encode();
        let inflight = InflightDescription {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 128,
        }
        .encode();
        let cases: Vec<(Request, Vec<u8>, usize)> = vec![
            (Request::GetFeatures, vec![], 0),
            (Request::SetFeatures, U64Payload(1 << 32).encode(), 0),
            (Request::SetOwner, vec![], 0),
            (Request::ResetOwner, vec![], 0),
            (Request::SetMemTable, table, 1),
            (Request::SetVringNum, state.clone(), 0),
            (Request::SetVringAddr, vec![0; 40], 0),
            (Request::SetVringBase, state.clone(), 0),
            (Request::GetVringBase, state.clone(), 0),
            (
                Request::SetVringKick,
                VringFdIndex {
                    index: 0,
                    no_fd: false,
                }
                .encode(),
                1,
            ),
            (
                Request::SetVringCall,
                VringFdIndex {
                    index: 0,
                    no_fd: true,
                }
                .encode(),
                0,
            ),
            (
                Request::SetVringErr,
                VringFdIndex {
                    index: 1,
                    no_fd: false,
                }
                .encode(),
                1,
            ),
            (Request::GetProtocolFeatures, vec![], 0),
            (Request::SetProtocolFeatures, U64Payload(8).encode(), 0),
            (Request::GetQueueNum, vec![], 0),
            (
                Request::SetVringEnable,
                VringState { index: 0, num: 1 }.encode(),
                0,
            ),
            (
                Request::GetConfig,
                ConfigSpace::request(0, 8).unwrap().encode(),
                0,
            ),
            (
                Request::SetConfig,
                ConfigSpace {
                    offset: 0,
                    flags: 0,
                    payload: vec![1],
                }
                .encode(),
                0,
            ),
            (Request::GetInflightFd, inflight.clone(), 0),
            (Request::SetInflightFd, inflight, 1),
            (Request::ResetDevice, vec![], 0),
            (Request::GetMaxMemSlots, vec![], 0),
            (Request::AddMemReg, SingleMemoryRegion(region).encode(), 1),
            (Request::RemMemReg, SingleMemoryRegion(region).encode(), 0),
            (Request::SetStatus, U64Payload(0xf).encode(), 0),
            (Request::GetStatus, vec![], 0),
            (Request::SendRarp, vec![0; 8], 0),
            (Request::SetLogFd, vec![], 1),
        ];
        for (request, payload, fds) in cases {
            let message =
                decode(request, &payload, fds).unwrap_or_else(|e| panic!("{request}: {e}"));
            assert_eq!(message.request(), request);
            // One fd more than the request carries is refused.
            if !matches!(message, FrontendMessage::Unsupported(_)) {
                assert_eq!(
                    fd_count_error(decode(request, &payload, fds + 1)),
                    (fds, fds + 1),
                    "{request}"
                );
            }
        }
    }

    /// Every request `decode` models (and one it does not), with and without NEED_REPLY, through a
    /// real socketpair: what `encode` sends, `decode` gives back equal, fds the same open files.
    #[test]
    fn every_request_round_trips_through_a_socket() {
        use crate::test_support::open_fd_count;
        use crate::wire::testing::{fd_identity, memfd};
        use crate::wire::{recv_message, send_message};
        use std::os::unix::net::UnixStream;
        use FrontendMessage as M;

        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let before = open_fd_count();
        {
            let region = MemoryRegion {
                guest_phys_addr: 0x10_0000,
                memory_size: 0x2000,
                userspace_addr: 0x7f00_0000_0000,
                mmap_offset: 0x1000,
            };
            let inflight = InflightDescription {
                mmap_size: 4224,
                mmap_offset: 0x40,
                num_queues: 2,
                queue_size: 128,
            };
            let addr = VringAddr {
                index: 1,
                flags: crate::wire::VHOST_VRING_F_LOG,
                desc_user_addr: 0x7f00_0000_1000,
                used_user_addr: 0x7f00_0000_3000,
                avail_user_addr: 0x7f00_0000_2000,
                log_guest_addr: 0x9000,
            };
            let state = VringState { index: 2, num: 256 };
            let messages: Vec<FrontendMessage> = vec![
                M::GetFeatures,
                M::SetFeatures(1 << 32 | 1 << 30),
                M::SetOwner,
                M::ResetOwner,
                M::SetMemTable {
                    table: MemoryTable {
                        regions: vec![
                            region,
                            MemoryRegion {
                                guest_phys_addr: 0,
                                ..region
                            },
                        ],
                    },
                    fds: vec![memfd(), memfd()],
                },
                M::SetMemTable {
                    table: MemoryTable::default(),
                    fds: vec![],
                },
                M::SetVringNum(state),
                M::SetVringAddr(addr),
                M::SetVringBase(state),
                M::GetVringBase(VringState { index: 3, num: 0 }),
                M::SetVringKick {
                    index: 255,
                    fd: Some(memfd()),
                },
                M::SetVringKick { index: 1, fd: None },
                M::SetVringCall {
                    index: 0,
                    fd: Some(memfd()),
                },
                M::SetVringErr { index: 7, fd: None },
                M::GetProtocolFeatures,
                M::SetProtocolFeatures(0x8f2b),
                M::GetQueueNum,
                M::SetVringEnable {
                    index: 1,
                    enable: true,
                },
                M::SetVringEnable {
                    index: 0,
                    enable: false,
                },
                M::GetConfig(ConfigSpace::request(0x14, 8).unwrap()),
                M::SetConfig(ConfigSpace {
                    offset: 4,
                    flags: ConfigSpace::FLAG_MIGRATION,
                    payload: vec![1, 2, 3],
                }),
                M::GetInflightFd(InflightDescription {
                    mmap_size: 0,
                    mmap_offset: 0,
                    ..inflight
                }),
                M::SetInflightFd {
                    description: inflight,
                    fd: memfd(),
                },
                M::ResetDevice,
                M::GetMaxMemSlots,
                M::AddMemReg {
                    region,
                    fd: memfd(),
                },
                M::RemMemReg(region),
                M::SetStatus(0xf),
                M::GetStatus,
                M::Unsupported(Request::SendRarp),
            ];
            // Coverage: every request that decode models (one that does not decodes an empty
            // payload to `Unsupported`) is among them, so a new variant needs a case here.
            for &request in Request::ALL {
                let modelled = !matches!(
                    FrontendMessage::decode(&Header::for_request(request, 0, false), &[], vec![]),
                    Ok(M::Unsupported(_))
                );
                assert!(
                    !modelled || messages.iter().any(|m| m.request() == request),
                    "{request} has no round-trip case"
                );
            }
            let (a, b) = UnixStream::pair().unwrap();
            for sent in &messages {
                for need_reply in [false, true] {
                    let (header, payload, fds) = sent.encode(need_reply);
                    assert_eq!(
                        header,
                        Header::for_request(sent.request(), payload.len(), need_reply)
                    );
                    send_message(&a, &header, &payload, &fds).unwrap();
                    let (h, p, received) = recv_message(&b).unwrap();
                    assert_eq!(h.need_reply(), need_reply);
                    let got = FrontendMessage::decode(&h, &p, received)
                        .unwrap_or_else(|e| panic!("{sent:?}: {e}"));
                    assert_eq!(got.request(), sent.request());
                    assert_eq!(fields(&got), fields(sent), "{sent:?} came back as {got:?}");
                }
            }
        }
        assert_eq!(open_fd_count(), before, "fds leaked");

        /// Every field: values as text, fds by identity (the same open file, not the same number).
        fn fields(m: &FrontendMessage) -> (String, Vec<Option<(u64, u64)>>) {
            let id = |fd: &OwnedFd| fd_identity(fd.as_fd());
            match m {
                M::SetMemTable { table, fds } => (
                    format!("{table:?}"),
                    fds.iter().map(|fd| Some(id(fd))).collect(),
                ),
                M::SetVringKick { index, fd }
                | M::SetVringCall { index, fd }
                | M::SetVringErr { index, fd } => (index.to_string(), vec![fd.as_ref().map(id)]),
                M::SetInflightFd { description, fd } => {
                    (format!("{description:?}"), vec![Some(id(fd))])
                }
                M::AddMemReg { region, fd } => (format!("{region:?}"), vec![Some(id(fd))]),
                // The rest carry no fds: their Debug text is all their fields.
                other => (format!("{other:?}"), vec![]),
            }
        }
    }

    #[test]
    fn fd_counts_follow_the_payload() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 0x1000,
            userspace_addr: 0x1000,
            mmap_offset: 0,
        };
        let two = MemoryTable {
            regions: vec![
                region,
                MemoryRegion {
                    guest_phys_addr: 0x1000,
                    ..region
                },
            ],
        }
        .encode();
        assert_eq!(
            fd_count_error(decode(Request::SetMemTable, &two, 1)),
            (2, 1)
        );
        match decode(Request::SetMemTable, &two, 2).unwrap() {
            FrontendMessage::SetMemTable { table, fds } => {
                assert_eq!((table.regions.len(), fds.len()), (2, 2))
            }
            other => panic!("{other:?}"),
        }
        let kick = VringFdIndex {
            index: 0,
            no_fd: false,
        }
        .encode();
        assert_eq!(
            fd_count_error(decode(Request::SetVringKick, &kick, 0)),
            (1, 0)
        );
        let polled = VringFdIndex {
            index: 0,
            no_fd: true,
        }
        .encode();
        assert_eq!(
            fd_count_error(decode(Request::SetVringCall, &polled, 1)),
            (0, 1)
        );
        let inflight = InflightDescription {
            mmap_size: 64,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 1,
        }
        .encode();
        assert_eq!(
            fd_count_error(decode(Request::SetInflightFd, &inflight, 0)),
            (1, 0)
        );
        assert_eq!(
            fd_count_error(decode(Request::SetInflightFd, &inflight, 2)),
            (1, 2)
        );
    }

    #[test]
    fn malformed_requests_are_typed_errors() {
        let _guard = FD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // Payload on a message that has none.
        assert!(matches!(
            decode(Request::GetFeatures, &[0; 8], 0),
            Err(WireError::Protocol(ProtocolError::WrongSize {
                expected: 0,
                got: 8,
                ..
            }))
        ));
        // Wrong payload size.
        assert!(matches!(
            decode(Request::SetVringNum, &[0; 4], 0),
            Err(WireError::Protocol(ProtocolError::WrongSize { .. }))
        ));
        assert!(matches!(
            decode(Request::GetInflightFd, &[0; 20], 0),
            Err(WireError::Protocol(ProtocolError::WrongSize {
                expected: 24,
                got: 20,
                ..
            }))
        ));
        // Enable other than 0/1, status beyond a byte.
        assert!(decode(
            Request::SetVringEnable,
            &VringState { index: 0, num: 2 }.encode(),
            0
        )
        .is_err());
        assert!(decode(Request::SetStatus, &U64Payload(0x100).encode(), 0).is_err());
        // A reply where a request belongs.
        let mut header = Header::for_reply(Request::GetFeatures, 0);
        assert!(FrontendMessage::decode(&header, &[], vec![]).is_err());
        // Unknown request code.
        header = Header {
            request: 99,
            flags: 1,
            size: 0,
        };
        assert!(matches!(
            FrontendMessage::decode(&header, &[], vec![eventfd()]),
            Err(WireError::Protocol(ProtocolError::UnknownRequest(99)))
        ));
        // Header size disagreeing with the payload handed in.
        header = Header::for_request(Request::SetFeatures, 8, false);
        assert!(FrontendMessage::decode(&header, &[0; 4], vec![]).is_err());
        // Config larger than the limit.
        let mut cfg = ConfigSpace::request(0, 0).unwrap().encode();
        cfg[4..8].copy_from_slice(&((MAX_CONFIG_SIZE + 1) as u32).to_le_bytes());
        cfg.resize(12 + MAX_CONFIG_SIZE + 1, 0);
        assert!(cfg.len() < MAX_PAYLOAD_SIZE);
        assert!(decode(Request::GetConfig, &cfg, 0).is_err());
    }
}

/// A deterministic stand-in for the `decode_message` fuzz target (which needs nightly): valid
/// messages, mutated at random, through every decoder. The property is "no panic".
#[cfg(test)]
mod mutation_tests {
    use super::*;
    use crate::trace::{describe_message, Direction};
    use crate::wire::HEADER_SIZE;

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn seeds() -> Vec<Vec<u8>> {
        let region = MemoryRegion {
            guest_phys_addr: 0,
            memory_size: 0x1000,
            userspace_addr: 0x1000,
            mmap_offset: 0,
        };
        let payloads: Vec<(Request, Vec<u8>)> = vec![
            (Request::GetFeatures, vec![]),
            (Request::SetFeatures, U64Payload(1 << 32).encode()),
            (
                Request::SetMemTable,
                MemoryTable {
                    regions: vec![region, region],
                }
                .encode(),
            ),
            (Request::SetVringAddr, vec![0; 40]),
            (
                Request::SetVringKick,
                VringFdIndex {
                    index: 1,
                    no_fd: true,
                }
                .encode(),
            ),
            (
                Request::SetVringEnable,
                VringState { index: 0, num: 1 }.encode(),
            ),
            (
                Request::GetConfig,
                ConfigSpace::request(0, 16)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .encode(),
            ),
            (
                Request::SetInflightFd,
                InflightDescription {
                    mmap_size: 64,
                    mmap_offset: 0,
                    num_queues: 1,
                    queue_size: 1,
                }
                .encode(),
            ),
            (Request::AddMemReg, SingleMemoryRegion(region).encode()),
            (Request::SetStatus, U64Payload(0xf).encode()),
        ];
        payloads
            .into_iter()
            .map(|(r, p)| {
                let mut bytes = Header::for_request(r, p.len(), false).to_bytes();
                bytes.extend_from_slice(&p);
                bytes
            })
            .collect()
    }

    #[test]
    fn mutated_messages_never_panic() {
        let seeds = seeds();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut decoded_ok = 0;
        for _ in 0..50_000 {
            let mut bytes = seeds[rng.below(seeds.len())].clone();
            for _ in 0..=rng.below(4) {
                match rng.below(4) {
                    0 if !bytes.is_empty() => {
                        let i = rng.below(bytes.len());
                        bytes[i] = rng.next() as u8;
                    }
                    1 => bytes.truncate(rng.below(bytes.len() + 1)),
                    2 => bytes.extend((0..rng.below(40)).map(|_| rng.next() as u8)),
                    _ if bytes.len() >= 4 => {
                        // Interesting words: 0, all ones, just over the limits.
                        let word: u32 = [0, u32::MAX, 9, 257, 4097][rng.below(5)];
                        let i = rng.below(bytes.len() - 3);
                        bytes[i..i + 4].copy_from_slice(&word.to_le_bytes());
                    }
                    _ => {}
                }
            }
            let Some(head) = bytes.get(..HEADER_SIZE) else {
                assert!(Header::decode(&bytes).is_err());
                continue;
            };
            let payload = &bytes[HEADER_SIZE..];
            if let Ok(header) = Header::decode(head) {
                let payload = payload.get(..header.size as usize).unwrap_or(payload);
                if FrontendMessage::decode(&header, payload, Vec::new()).is_ok() {
                    decoded_ok += 1;
                }
                // The same bytes as the reply to each request (the code check is the first).
                if let Ok(request) = header.request_kind() {
                    let reply = Header {
                        flags: header.flags | crate::wire::FLAG_REPLY,
                        ..header
                    };
                    let _ = crate::wire::BackendReply::decode(request, &reply, payload, Vec::new());
                }
                let _ = describe_message(Direction::ToBackend, "", &header, payload, 0);
                let reply = Header {
                    flags: header.flags | crate::wire::FLAG_REPLY,
                    ..header
                };
                let _ = describe_message(Direction::FromBackend, "", &reply, payload, 0);
            }
        }
        // The mutations must leave some messages valid, or the test explores nothing past the header.
        assert!(decoded_ok > 1000, "only {decoded_ok} valid messages");
    }
}
