//! Inflight buffer and reconnect, against fake backends: what a returning backend is told, what
//! the record keeps while the backend is away, and which returning backends are refused.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::*;

const INFLIGHT: u64 = 1 << 12;
/// What our backend offers: MQ, REPLY_ACK, CONFIG and INFLIGHT_SHMFD.
const OURS_PROTOCOL: u64 = MQ | REPLY_ACK | CONFIG | INFLIGHT;
/// split, 2 queues of 256: 2 * align64(16 + 256 * 16).
const INFLIGHT_SIZE: u64 = 2 * 4160;

fn inflight_backend() -> Backend {
    Backend {
        protocol_features: OURS_PROTOCOL,
        inflight_size: INFLIGHT_SIZE,
        ..Backend::default()
    }
}

/// Hands out the fake backends a test queued, then fails like an absent socket.
struct FakeConnector(Arc<Mutex<Vec<Arc<Mutex<Backend>>>>>);

impl Connector for FakeConnector {
    fn connect(&mut self) -> Result<Box<dyn VhostUserFrontend + Send>, String> {
        let mut queued = self.0.lock().unwrap();
        if queued.is_empty() {
            return Err("connection refused".into());
        }
        Ok(Box::new(FakeFrontend(queued.remove(0))))
    }
}

struct Rig {
    device: VhostUserDevice,
    handle: ReconnectHandle,
    first: Arc<Mutex<Backend>>,
    returning: Arc<Mutex<Vec<Arc<Mutex<Backend>>>>>,
    ram: Arc<File>,
    kicks: Vec<EventFd>,
    call: EventFd,
}

/// A device on `first`, with reconnect through a connector the test feeds; guest RAM is a real
/// memfd, so the ring indices the device reads on a replay are what the test wrote.
fn rig(first: Backend, policy: ReconnectPolicy) -> Rig {
    let first = Arc::new(Mutex::new(first));
    let ram = Arc::new(memfd(RAM_OFFSET + RAM_SIZE));
    let returning = Arc::new(Mutex::new(Vec::new()));
    let device = VhostUserDevice::new(
        Box::new(FakeFrontend(first.clone())),
        DeviceKind::BLOCK,
        memory_table(&ram),
        OPTIONS,
    )
    .expect("handshake")
    .with_reconnect(
        "blk-test",
        Box::new(FakeConnector(returning.clone())),
        policy,
    );
    let handle = device.reconnect_handle();
    take_sent(&first);
    let (kicks, call) = eventfds(2);
    Rig {
        device,
        handle,
        first,
        returning,
        ram,
        kicks,
        call,
    }
}

impl Rig {
    fn start(&mut self, queues: &[QueueConfig]) {
        self.device
            .activate(VERSION_1, queues, &self.kicks, &self.call)
            .unwrap();
    }

    /// A backend that will answer the next connect.
    fn returns(&self, backend: Backend) -> Arc<Mutex<Backend>> {
        let backend = Arc::new(Mutex::new(backend));
        self.returning.lock().unwrap().push(backend.clone());
        backend
    }

    /// The guest-visible used->idx of the ring at `used_ring`.
    fn set_used_idx(&self, used_ring: u64, idx: u16) {
        self.ram
            .write_all_at(&idx.to_le_bytes(), RAM_OFFSET + used_ring + 2)
            .unwrap();
    }

    fn hang_up(&self) {
        assert!(self.handle.hung_up(0, "test hang-up"));
        assert!(matches!(
            self.device.state(),
            BackendState::Disconnected { .. }
        ));
    }
}

/// An eventfd's counter, read from fdinfo (a read(2) would block on 0, and would reset it).
fn eventfd_count(fd: &EventFd) -> u64 {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("eventfd-count:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap()
}

fn names(sent: &[Sent]) -> Vec<&'static str> {
    sent.iter().map(Sent::name).collect()
}

const HANDSHAKE: [&str; 6] = [
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "SET_OWNER",
    "GET_QUEUE_NUM",
    "GET_CONFIG",
];

const QUEUE_START: [&str; 6] = [
    "SET_VRING_NUM",
    "SET_VRING_BASE",
    "SET_VRING_ADDR",
    "SET_VRING_KICK",
    "SET_VRING_CALL",
    "SET_VRING_ENABLE",
];

#[test]
fn the_inflight_buffer_is_fetched_once_set_on_every_start_and_dropped_at_reset() {
    let mut rig = rig(inflight_backend(), ReconnectPolicy::DEFAULT);
    assert_eq!(rig.device.protocol_features(), OURS_PROTOCOL);
    rig.start(&[queue(0, 0x1_0000)]);
    let sent = take_sent(&rig.first);
    // QEMU's order: features, then the inflight buffer, then memory and rings.
    assert_eq!(
        names(&sent)[..4],
        [
            "SET_FEATURES",
            "GET_INFLIGHT_FD",
            "SET_INFLIGHT_FD",
            "SET_MEM_TABLE"
        ]
    );
    assert_eq!(
        sent[1],
        Sent::GetInflightFd {
            num_queues: 2,
            queue_size: 256
        }
    );
    let Sent::SetInflightFd { mmap_size, inode } = sent[2] else {
        panic!("{sent:?}")
    };
    assert_eq!(mmap_size, INFLIGHT_SIZE);
    assert!(rig.device.holds_inflight_buffer());

    // A reset drops the buffer: the next start asks for a fresh one.
    rig.device.reset().unwrap();
    assert!(!rig.device.holds_inflight_buffer());
    take_sent(&rig.first);
    rig.start(&[queue(0, 0x1_0000)]);
    let sent = take_sent(&rig.first);
    assert_eq!(names(&sent)[1..3], ["GET_INFLIGHT_FD", "SET_INFLIGHT_FD"]);
    let Sent::SetInflightFd { inode: fresh, .. } = sent[2] else {
        panic!("{sent:?}")
    };
    assert_ne!(fresh, inode, "a new buffer after the reset");
}

#[test]
fn a_backend_that_keeps_no_inflight_buffer_is_used_without_one() {
    let mut rig = rig(
        Backend {
            protocol_features: OURS_PROTOCOL,
            inflight_size: 0,
            ..Backend::default()
        },
        ReconnectPolicy::DEFAULT,
    );
    rig.start(&[queue(0, 0x1_0000)]);
    let sent = names(&take_sent(&rig.first));
    assert_eq!(
        sent[..3],
        ["SET_FEATURES", "GET_INFLIGHT_FD", "SET_MEM_TABLE"]
    );
    assert!(!sent.contains(&"SET_INFLIGHT_FD"));
    assert!(!rig.device.holds_inflight_buffer());
}

#[test]
fn a_returning_backend_gets_the_record_again_with_used_idx_as_ring_base() {
    let mut rig = rig(inflight_backend(), ReconnectPolicy::DEFAULT);
    rig.start(&[queue(0, 0x1_0000), queue(1, 0x2_0000)]);
    let first = take_sent(&rig.first);
    let Sent::SetInflightFd { inode, .. } = first[2] else {
        panic!("{first:?}")
    };
    rig.set_used_idx(0x1_2000, 41);
    rig.set_used_idx(0x2_2000, 0xffff);
    assert_eq!(eventfd_count(&rig.kicks[0]), 0);

    rig.hang_up();
    assert_eq!(
        rig.handle.watch_fd().map(|(_, g)| g),
        None,
        "nothing to watch"
    );
    let second = rig.returns(inflight_backend());
    assert_eq!(rig.handle.attempt(), Attempt::Connected);
    assert!(matches!(rig.device.state(), BackendState::Running { .. }));

    let sent = take_sent(&second);
    let mut expected: Vec<&str> = HANDSHAKE.to_vec();
    // No GET_INFLIGHT_FD: the buffer is kept; the same one is handed over again.
    expected.extend(["SET_FEATURES", "SET_INFLIGHT_FD", "SET_MEM_TABLE"]);
    expected.extend(QUEUE_START);
    expected.extend(QUEUE_START);
    assert_eq!(names(&sent), expected);
    assert!(sent.contains(&Sent::SetInflightFd {
        mmap_size: INFLIGHT_SIZE,
        inode
    }));
    // The base is the used index the guest sees (the backend adds what it resubmits).
    assert!(sent.contains(&Sent::SetVringBase { index: 0, base: 41 }));
    assert!(sent.contains(&Sent::SetVringBase {
        index: 1,
        base: 0xffff
    }));
    assert!(sent.contains(&Sent::SetProtocolFeatures(OURS_PROTOCOL)));
    // Each queue is kicked, so what the guest queued meanwhile is looked at.
    assert_eq!(eventfd_count(&rig.kicks[0]), 1);
    assert_eq!(eventfd_count(&rig.kicks[1]), 1);
    assert!(
        take_sent(&rig.first).is_empty(),
        "the old backend hears nothing"
    );

    // The new connection is generation 1: a late hang-up of generation 0 changes nothing.
    assert!(!rig.handle.hung_up(0, "late"));
    assert!(matches!(rig.device.state(), BackendState::Running { .. }));
    // And a reset now goes to the new backend.
    rig.device.reset().unwrap();
    assert_eq!(
        names(&take_sent(&second)),
        [
            "SET_VRING_ENABLE",
            "GET_VRING_BASE",
            "SET_VRING_ENABLE",
            "GET_VRING_BASE"
        ]
    );
}

#[test]
fn while_the_backend_is_away_the_driver_may_start_and_reset_the_device() {
    let mut rig = rig(inflight_backend(), ReconnectPolicy::DEFAULT);
    rig.hang_up();
    // A start while away: nothing is sent, nothing fails; the record keeps it.
    rig.start(&[queue(0, 0x1_0000)]);
    assert!(take_sent(&rig.first).is_empty());
    let second = rig.returns(inflight_backend());
    assert_eq!(rig.handle.attempt(), Attempt::Connected);
    let sent = take_sent(&second);
    // Never started before, so no buffer was held: GET, then SET.
    assert_eq!(
        names(&sent)[HANDSHAKE.len()..HANDSHAKE.len() + 4],
        [
            "SET_FEATURES",
            "GET_INFLIGHT_FD",
            "SET_INFLIGHT_FD",
            "SET_MEM_TABLE"
        ]
    );
    assert!(sent.contains(&Sent::SetVringBase { index: 0, base: 0 }));

    // Away again, and the driver resets meanwhile: the record (and the buffer) are forgotten,
    // so the returning backend only gets the handshake.
    assert!(rig.handle.hung_up(1, "again"));
    rig.device.reset().unwrap();
    assert!(!rig.device.holds_inflight_buffer());
    let third = rig.returns(inflight_backend());
    assert_eq!(rig.handle.attempt(), Attempt::Connected);
    assert_eq!(names(&take_sent(&third)), HANDSHAKE);
    assert_eq!(rig.device.state(), BackendState::Negotiated);
}

#[test]
fn a_backend_that_comes_back_as_another_device_is_refused_saying_what_changed() {
    let refused = |changed: Backend, expect: &str| {
        let mut rig = rig(inflight_backend(), ReconnectPolicy::DEFAULT);
        rig.start(&[queue(0, 0x1_0000)]);
        rig.hang_up();
        rig.returns(changed);
        let Attempt::GaveUp(reason) = rig.handle.attempt() else {
            panic!("expected a refusal")
        };
        assert!(reason.contains(expect), "{reason}");
        assert!(matches!(rig.device.state(), BackendState::Refused { .. }));
        // Refused for good: no more attempts, and the driver cannot restart it either.
        assert_eq!(rig.handle.attempt(), Attempt::NotNeeded);
        assert!(rig
            .device
            .activate(VERSION_1, &[queue(0, 0x1_0000)], &rig.kicks, &rig.call)
            .is_err());
    };
    let mut bigger: Vec<u8> = (0..60).collect();
    bigger[0..8].copy_from_slice(&4096u64.to_le_bytes());
    let original = u64::from_le_bytes((0..8).collect::<Vec<u8>>().try_into().unwrap());
    refused(
        Backend {
            config: bigger,
            ..inflight_backend()
        },
        &format!("capacity is 4096 sectors, not {original}"),
    );
    refused(
        Backend {
            features: QSD_FEATURES & !BLK_FLUSH,
            ..inflight_backend()
        },
        "no longer offers",
    );
    refused(
        Backend {
            queue_num: 2,
            ..inflight_backend()
        },
        "serves 2 queues, not 4",
    );
    refused(
        Backend {
            protocol_features: MQ | REPLY_ACK | CONFIG,
            ..inflight_backend()
        },
        "no longer offers protocol features",
    );
}

#[test]
fn attempts_go_on_while_nobody_answers_and_a_late_backend_is_taken() {
    let mut rig = rig(inflight_backend(), ReconnectPolicy::DEFAULT);
    rig.start(&[queue(0, 0x1_0000)]);
    rig.hang_up();
    for _ in 0..3 {
        assert!(matches!(rig.handle.attempt(), Attempt::Failed(_)));
    }
    // One that hangs up in the middle of the handshake is just another failed attempt.
    rig.returns(Backend {
        fail_on: Some(("GET_CONFIG", Failure::PeerGone)),
        ..inflight_backend()
    });
    assert!(matches!(rig.handle.attempt(), Attempt::Failed(_)));
    assert!(matches!(
        rig.device.state(),
        BackendState::Disconnected { .. }
    ));
    rig.returns(inflight_backend());
    assert_eq!(rig.handle.attempt(), Attempt::Connected);
}

#[test]
fn with_reconnect_off_a_backend_gone_stays_gone() {
    let mut rig = rig(inflight_backend(), ReconnectPolicy::Off);
    rig.start(&[queue(0, 0x1_0000)]);
    rig.hang_up();
    rig.returns(inflight_backend());
    assert!(matches!(rig.handle.attempt(), Attempt::GaveUp(_)));
    assert_eq!(ReconnectPolicy::Off.delay(0), None);
}

#[test]
fn backoff_starts_at_once_doubles_and_stays_under_its_cap() {
    let policy = ReconnectPolicy::DEFAULT;
    let delays: Vec<_> = (0..12).map(|a| policy.delay(a).unwrap()).collect();
    assert_eq!(delays[0], std::time::Duration::ZERO);
    assert_eq!(delays[1], std::time::Duration::from_millis(1));
    assert_eq!(delays[2], std::time::Duration::from_millis(2));
    assert_eq!(delays[11], std::time::Duration::from_millis(250));
    assert_eq!(
        policy.delay(u32::MAX),
        Some(std::time::Duration::from_millis(250))
    );
    let every = ReconnectPolicy::every(std::time::Duration::from_millis(20));
    assert_eq!(every.delay(5), Some(std::time::Duration::from_millis(20)));
}
