//! The server against a device of its own: `EchoDevice`, a second device type as small as
//! [`VhostUserDevice`] allows (one queue, a writable 8-byte config space, rings that only record
//! how they were started). What the virtio-blk backend does through the server is tested in
//! `blk::backend_tests`.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vhost_frontend::features::{
    bit_mask, PROTOCOL_CONFIG, PROTOCOL_INFLIGHT_SHMFD, PROTOCOL_REPLY_ACK, PROTOCOL_STATUS,
    VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1,
};
use vhost_frontend::wire::{
    recv_message, send_message, BackendReply, ConfigSpace, Header, InflightDescription, Request,
    U64Payload, VringState, WireError, FLAG_NEED_REPLY, VERSION,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::test_frontend::{start_queue, FakeFrontend};
use super::vring::RingAddresses;
use super::{serve, RingSetup, RingWorker, ServeError, VhostUserDevice};
use crate::test_util::{guest_memory, TestRing};

/// What a stopped `EchoRing` claims to have consumed since it started.
const CONSUMED: u16 = 3;

/// How one ring start looked from the device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Start {
    index: u16,
    size: u16,
    next_avail: u16,
    rings: RingAddresses,
    /// Entries of the inflight region it got, if any.
    inflight_capacity: Option<u16>,
}

#[derive(Debug, Default)]
struct EchoDevice {
    config: Mutex<[u8; 8]>,
    starts: Mutex<Vec<Start>>,
}

/// A "running" ring: it consumes [`CONSUMED`] entries, as far as anyone can tell.
struct EchoRing {
    started_at: u16,
}

impl RingWorker for EchoRing {
    fn started_at(&self) -> u16 {
        self.started_at
    }

    fn stop(self) -> u16 {
        self.started_at.wrapping_add(CONSUMED)
    }
}

impl VhostUserDevice for EchoDevice {
    const VIRTIO_ID: u32 = 4;
    const TRACE_NAME: &'static str = "echo-device";
    type Ring = EchoRing;
    type RingError = String;

    fn virtio_features(&self) -> u64 {
        bit_mask(VIRTIO_F_VERSION_1)
    }

    /// STATUS too, which the server does not implement: it must not be offered.
    fn protocol_features(&self) -> u64 {
        bit_mask(PROTOCOL_REPLY_ACK)
            | bit_mask(PROTOCOL_CONFIG)
            | bit_mask(PROTOCOL_INFLIGHT_SHMFD)
            | bit_mask(PROTOCOL_STATUS)
    }

    fn num_queues(&self) -> u16 {
        1
    }

    fn max_queue_size(&self) -> u16 {
        64
    }

    fn read_config(&self, offset: u32, size: u32) -> Result<Vec<u8>, String> {
        let config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let window = usize::try_from(offset).ok().and_then(|start| {
            let end = start.checked_add(usize::try_from(size).ok()?)?;
            config.get(start..end)
        });
        window
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("window {offset}+{size} is outside the 8-byte space"))
    }

    fn write_config(&self, offset: u32, bytes: &[u8]) -> Result<(), String> {
        let mut config = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let start = usize::try_from(offset).map_err(|e| e.to_string())?;
        let end = start.checked_add(bytes.len()).ok_or("overflow")?;
        config
            .get_mut(start..end)
            .ok_or_else(|| "outside the 8-byte space".to_string())?
            .copy_from_slice(bytes);
        Ok(())
    }

    fn start_ring(&self, ring: RingSetup) -> Result<EchoRing, String> {
        self.starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Start {
                index: ring.index,
                size: ring.size,
                next_avail: ring.next_avail,
                rings: ring.rings,
                inflight_capacity: ring.inflight.as_ref().map(|region| region.capacity()),
            });
        Ok(EchoRing {
            started_at: ring.next_avail,
        })
    }
}

impl EchoDevice {
    fn starts(&self) -> Vec<Start> {
        self.starts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// `serve` on its own thread with a fresh `EchoDevice`.
fn spawn_echo() -> (
    FakeFrontend,
    Arc<EchoDevice>,
    JoinHandle<Result<(), ServeError>>,
) {
    let device = Arc::new(EchoDevice::default());
    let (frontend_end, server_end) = UnixStream::pair().unwrap();
    let served = Arc::clone(&device);
    let session = thread::spawn(move || serve(&*served, server_end, Duration::from_secs(10)));
    (
        FakeFrontend {
            stream: frontend_end,
        },
        device,
        session,
    )
}

/// GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES (all offered, or `protocol` if given), SET_OWNER.
fn handshake(fe: &FakeFrontend, protocol: Option<u64>) {
    let features = fe.get_u64(Request::GetFeatures);
    fe.send(
        Request::SetFeatures,
        &U64Payload(features).encode(),
        &[],
        false,
    );
    let offered = fe.get_u64(Request::GetProtocolFeatures);
    let protocol = protocol.unwrap_or(offered);
    assert_eq!(
        fe.acked(
            Request::SetProtocolFeatures,
            &U64Payload(protocol).encode(),
            &[]
        ),
        0
    );
    assert_eq!(fe.acked(Request::SetOwner, &[], &[]), 0);
}

/// Sends `payload` as `request` and decodes the reply the way the frontend does
/// (`BackendReply::decode`), fds and all.
fn typed_reply(
    fe: &FakeFrontend,
    request: Request,
    payload: &[u8],
    need_reply: bool,
) -> BackendReply {
    fe.send(request, payload, &[], need_reply);
    let (header, payload, fds) = recv_message(&fe.stream).expect("a reply");
    BackendReply::decode(request, &header, &payload, fds).expect("a well-formed reply")
}

/// Everything the server asks of a device, answered by one that is not virtio-blk: feature and
/// protocol-feature negotiation, the queue count and ring limit, config space reads and writes,
/// rings started with what the frontend set up (base, translated addresses, inflight region) and
/// stopped with the index the device reports.
#[test]
fn a_second_device_type_is_served_by_the_same_server() {
    let (fe, device, session) = spawn_echo();
    assert_eq!(
        fe.get_u64(Request::GetFeatures),
        bit_mask(VIRTIO_F_VERSION_1) | bit_mask(VHOST_USER_F_PROTOCOL_FEATURES)
    );
    assert_eq!(
        fe.get_u64(Request::GetProtocolFeatures),
        bit_mask(PROTOCOL_REPLY_ACK)
            | bit_mask(PROTOCOL_CONFIG)
            | bit_mask(PROTOCOL_INFLIGHT_SHMFD),
        "STATUS is not the server's to offer"
    );
    handshake(&fe, None);
    assert_eq!(fe.get_u64(Request::GetQueueNum), 1);

    // The config space is the device's: written, read back; a window outside it fails.
    let write = ConfigSpace {
        offset: 2,
        flags: 0,
        payload: vec![7, 8],
    };
    assert_eq!(fe.acked(Request::SetConfig, &write.encode(), &[]), 0);
    assert_eq!(fe.recv_config(0, 8), [0, 0, 7, 8, 0, 0, 0, 0]);
    assert!(fe.recv_config(6, 4).is_empty());
    let outside = ConfigSpace {
        offset: 7,
        flags: 0,
        payload: vec![1, 2],
    };
    assert_ne!(fe.acked(Request::SetConfig, &outside.encode(), &[]), 0);

    // The ring limit is the device's.
    assert_ne!(fe.vring(Request::SetVringNum, 0, 128), 0);
    let ram_size = 0x10_0000;
    let (_mem, ram) = guest_memory(ram_size);
    let ring = TestRing::new(64, 0x1000);
    let (_kick, _call) = start_queue(&fe, &ram, ram_size, &ring);
    let first = Start {
        index: 0,
        size: 64,
        next_avail: 0,
        rings: ring.rings,
        inflight_capacity: None,
    };
    assert_eq!(device.starts(), std::slice::from_ref(&first));

    // A new base stops the ring (it reports 0 + CONSUMED) and starts it at the new one.
    assert_eq!(fe.vring(Request::SetVringBase, 0, 5), 0);
    let rebased = Start {
        next_avail: 5,
        ..first.clone()
    };
    assert_eq!(device.starts(), [first.clone(), rebased.clone()]);
    let base = typed_reply(
        &fe,
        Request::GetVringBase,
        &VringState { index: 0, num: 0 }.encode(),
        false,
    );
    assert!(
        matches!(base, BackendReply::VringBase(VringState { index: 0, num }) if num == u32::from(5 + CONSUMED)),
        "{base:?}"
    );

    // An inflight region: the next start gets this queue's part of it (after a new kick fd,
    // GET_VRING_BASE having stopped the ring).
    let BackendReply::Inflight {
        description,
        fd: Some(region),
    } = typed_reply(
        &fe,
        Request::GetInflightFd,
        &InflightDescription {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 64,
        }
        .encode(),
        false,
    )
    else {
        panic!("no inflight region");
    };
    assert_eq!(fe.set_inflight(&description, &region), 0);
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    assert_eq!(fe.vring_fd(Request::SetVringKick, 0, &kick), 0);
    let tracked = Start {
        next_avail: 5 + CONSUMED,
        inflight_capacity: Some(64),
        ..first.clone()
    };
    assert_eq!(device.starts(), [first, rebased, tracked]);

    drop(fe);
    session
        .join()
        .unwrap()
        .expect("a hang-up ends the session with Ok");
}

/// A GET_* that fails never gets the u64 failure ack (which the frontend would read as a value):
/// GET_CONFIG gets an empty payload (ConfigFailed), GET_INFLIGHT_FD mmap_size 0 and no fd ("no
/// buffer"), and the session goes on; a GET_* whose reply is a value has no failure form, so the
/// session ends instead.
#[test]
fn a_failed_get_gets_its_own_failure_form_or_ends_the_session() {
    let (fe, _device, session) = spawn_echo();
    // INFLIGHT_SHMFD left out: GET_INFLIGHT_FD is then a breach.
    handshake(
        &fe,
        Some(bit_mask(PROTOCOL_REPLY_ACK) | bit_mask(PROTOCOL_CONFIG)),
    );
    let asked = InflightDescription {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: 64,
    };
    match typed_reply(&fe, Request::GetInflightFd, &asked.encode(), true) {
        BackendReply::Inflight { description, fd } => {
            assert_eq!(
                (description.mmap_size, fd.is_none()),
                (0, true),
                "no buffer"
            );
        }
        other => panic!("GET_INFLIGHT_FD answered with {other:?}"),
    }
    // A window the device refuses, with and without NEED_REPLY; a payload that does not decode.
    for need_reply in [true, false] {
        let window = ConfigSpace::request(6, 4).unwrap().encode();
        let reply = typed_reply(&fe, Request::GetConfig, &window, need_reply);
        assert!(matches!(reply, BackendReply::ConfigFailed), "{reply:?}");
    }
    let reply = typed_reply(&fe, Request::GetConfig, &[1, 2, 3, 4, 5], true);
    assert!(matches!(reply, BackendReply::ConfigFailed), "{reply:?}");
    // The session goes on.
    assert_eq!(fe.get_u64(Request::GetQueueNum), 1);

    // GET_VRING_BASE of a queue the device does not have: no reply, the session ends.
    fe.send(
        Request::GetVringBase,
        &VringState { index: 7, num: 0 }.encode(),
        &[],
        true,
    );
    assert!(matches!(
        recv_message(&fe.stream),
        Err(WireError::PeerGone(_))
    ));
    match session.join().unwrap() {
        Err(ServeError::Protocol(reason)) => assert!(reason.contains("GET_VRING_BASE"), "{reason}"),
        other => panic!("{other:?}"),
    }

    // A GET_FEATURES that does not decode (a payload it does not take), with NEED_REPLY: the same.
    let (fe, _device, session) = spawn_echo();
    let header = Header {
        request: Request::GetFeatures.code(),
        flags: VERSION | FLAG_NEED_REPLY,
        size: 8,
    };
    send_message(&fe.stream, &header, &[0; 8], &[]).unwrap();
    assert!(matches!(
        recv_message(&fe.stream),
        Err(WireError::PeerGone(_))
    ));
    assert!(matches!(
        session.join().unwrap(),
        Err(ServeError::Protocol(_))
    ));
}
