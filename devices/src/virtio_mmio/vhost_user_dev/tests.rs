//! The device against a fake backend that records every request, so each test can assert the
//! exact message sequence a real backend would receive.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Mutex};

use vhost_frontend::connection::{InflightBuffer, MemoryRegionFd};
use vhost_frontend::wire::{InflightDescription, MemoryRegion, VringAddr};

use super::*;
use crate::virtio_mmio::registers::{self as reg, status};
use crate::virtio_mmio::MmioTransport;

const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const EVENT_IDX: u64 = 1 << 29;
const INDIRECT_DESC: u64 = 1 << 28;
const RING_PACKED: u64 = 1 << 34;
const BLK_SEG_MAX: u64 = 1 << 2;
const BLK_FLUSH: u64 = 1 << 9;
const BLK_CONFIG_WCE: u64 = 1 << 11;
/// What qemu-storage-daemon's vhost-user-blk export offers (notes §4).
const QSD_FEATURES: u64 = 0x1_7500_7e46;
const QSD_PROTOCOL: u64 = 0x8f2b;
const MQ: u64 = 1 << 0;
const REPLY_ACK: u64 = 1 << 3;
const CONFIG: u64 = 1 << 9;

const RAM_GPA: u64 = 0;
const RAM_SIZE: u64 = 0x10_0000;
const RAM_HVA: u64 = 0x7f12_3400_0000;
const RAM_OFFSET: u64 = 0x2000;

/// One request as the backend would see it; fds by their number in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    GetFeatures,
    SetFeatures(u64),
    GetProtocolFeatures,
    SetProtocolFeatures(u64),
    SetOwner,
    GetQueueNum,
    GetConfig {
        offset: u32,
        size: u32,
    },
    SetMemTable(Vec<(MemoryRegion, RawFd)>),
    SetVringNum {
        index: u32,
        num: u32,
    },
    SetVringBase {
        index: u32,
        base: u32,
    },
    SetVringAddr(VringAddr),
    /// `eventfd`: which eventfd ([`eventfd_id`]): the device sends its own duplicates.
    SetVringKick {
        index: u32,
        eventfd: u64,
    },
    SetVringCall {
        index: u32,
        eventfd: u64,
    },
    SetVringEnable {
        index: u32,
        enable: bool,
    },
    GetVringBase {
        index: u32,
    },
    GetInflightFd {
        num_queues: u16,
        queue_size: u16,
    },
    /// `eventfd`-like identity of the buffer: its inode.
    SetInflightFd {
        mmap_size: u64,
        inode: u64,
    },
    /// A request this device must never send.
    Unexpected(&'static str),
}

impl Sent {
    fn name(&self) -> &'static str {
        match self {
            Sent::GetFeatures => "GET_FEATURES",
            Sent::SetFeatures(_) => "SET_FEATURES",
            Sent::GetProtocolFeatures => "GET_PROTOCOL_FEATURES",
            Sent::SetProtocolFeatures(_) => "SET_PROTOCOL_FEATURES",
            Sent::SetOwner => "SET_OWNER",
            Sent::GetQueueNum => "GET_QUEUE_NUM",
            Sent::GetConfig { .. } => "GET_CONFIG",
            Sent::SetMemTable(_) => "SET_MEM_TABLE",
            Sent::SetVringNum { .. } => "SET_VRING_NUM",
            Sent::SetVringBase { .. } => "SET_VRING_BASE",
            Sent::SetVringAddr(_) => "SET_VRING_ADDR",
            Sent::SetVringKick { .. } => "SET_VRING_KICK",
            Sent::SetVringCall { .. } => "SET_VRING_CALL",
            Sent::SetVringEnable { .. } => "SET_VRING_ENABLE",
            Sent::GetVringBase { .. } => "GET_VRING_BASE",
            Sent::GetInflightFd { .. } => "GET_INFLIGHT_FD",
            Sent::SetInflightFd { .. } => "SET_INFLIGHT_FD",
            Sent::Unexpected(name) => name,
        }
    }
}

/// How the fake backend fails a request.
#[derive(Clone, Copy, Debug)]
enum Failure {
    PeerGone,
    Protocol,
    /// REPLY_ACK with a non-zero status.
    Refused,
}

/// The fake backend's answers, and the log of what it was sent (shared with the test).
struct Backend {
    features: u64,
    protocol_features: u64,
    queue_num: u64,
    config: Vec<u8>,
    vring_bases: VecDeque<u32>,
    fail_on: Option<(&'static str, Failure)>,
    sent: Vec<Sent>,
    /// The sequence deadline the device set (`set_sequence_deadline`), and for each message
    /// sent, the deadline in force then.
    sequence_deadline: Option<std::time::Instant>,
    deadlines: Vec<Option<std::time::Instant>>,
    /// GET_INFLIGHT_FD answers with a memfd of this many bytes (0: "keeps no buffer").
    inflight_size: u64,
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            features: QSD_FEATURES,
            protocol_features: QSD_PROTOCOL,
            queue_num: 4,
            config: (0..60).collect(),
            vring_bases: VecDeque::new(),
            fail_on: None,
            sent: Vec::new(),
            sequence_deadline: None,
            deadlines: Vec::new(),
            inflight_size: 0,
        }
    }
}

struct FakeFrontend(Arc<Mutex<Backend>>);

impl FakeFrontend {
    /// Logs the request, then fails it if the test asked for that.
    fn record(&mut self, sent: Sent) -> Result<(), FrontendError> {
        let mut backend = self.0.lock().unwrap();
        let name = sent.name();
        backend.sent.push(sent);
        let deadline = backend.sequence_deadline;
        backend.deadlines.push(deadline);
        match backend.fail_on {
            Some((failing, how)) if failing == name => Err(fake_error(name, how)),
            _ => Ok(()),
        }
    }
}

fn fake_error(during: &'static str, how: Failure) -> FrontendError {
    match how {
        Failure::PeerGone => FrontendError::PeerGone { during },
        Failure::Protocol => FrontendError::Protocol {
            message: during,
            detail: "reply of the wrong size".into(),
        },
        Failure::Refused => FrontendError::BackendFailed {
            message: during,
            status: 1,
        },
    }
}

impl VhostUserFrontend for FakeFrontend {
    fn set_sequence_deadline(&mut self, deadline: Option<std::time::Instant>) {
        self.0.lock().unwrap().sequence_deadline = deadline;
    }
    fn set_owner(&mut self) -> Result<(), FrontendError> {
        self.record(Sent::SetOwner)
    }
    fn get_features(&mut self) -> Result<u64, FrontendError> {
        self.record(Sent::GetFeatures)?;
        Ok(self.0.lock().unwrap().features)
    }
    fn set_features(&mut self, features: u64) -> Result<(), FrontendError> {
        self.record(Sent::SetFeatures(features))
    }
    fn get_protocol_features(&mut self) -> Result<u64, FrontendError> {
        self.record(Sent::GetProtocolFeatures)?;
        Ok(self.0.lock().unwrap().protocol_features)
    }
    fn set_protocol_features(&mut self, features: u64) -> Result<(), FrontendError> {
        self.record(Sent::SetProtocolFeatures(features))
    }
    fn get_queue_num(&mut self) -> Result<u64, FrontendError> {
        self.record(Sent::GetQueueNum)?;
        Ok(self.0.lock().unwrap().queue_num)
    }
    fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        self.record(Sent::GetConfig { offset, size })?;
        Ok(self.0.lock().unwrap().config.clone())
    }
    fn set_mem_table(&mut self, regions: &[MemoryRegionFd<'_>]) -> Result<(), FrontendError> {
        let table = regions
            .iter()
            .map(|r| (r.region, r.fd.as_raw_fd()))
            .collect();
        self.record(Sent::SetMemTable(table))
    }
    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<(), FrontendError> {
        self.record(Sent::SetVringNum { index, num })
    }
    fn set_vring_addr(&mut self, addr: &VringAddr) -> Result<(), FrontendError> {
        self.record(Sent::SetVringAddr(*addr))
    }
    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<(), FrontendError> {
        self.record(Sent::SetVringBase { index, base })
    }
    fn get_vring_base(&mut self, index: u32) -> Result<u32, FrontendError> {
        self.record(Sent::GetVringBase { index })?;
        Ok(self.0.lock().unwrap().vring_bases.pop_front().unwrap_or(0))
    }
    fn set_vring_kick(&mut self, index: u32, fd: BorrowedFd<'_>) -> Result<(), FrontendError> {
        self.record(Sent::SetVringKick {
            index,
            eventfd: eventfd_id(fd.as_raw_fd()),
        })
    }
    fn set_vring_call(&mut self, index: u32, fd: BorrowedFd<'_>) -> Result<(), FrontendError> {
        self.record(Sent::SetVringCall {
            index,
            eventfd: eventfd_id(fd.as_raw_fd()),
        })
    }
    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<(), FrontendError> {
        self.record(Sent::SetVringEnable { index, enable })
    }
    fn get_max_mem_slots(&mut self) -> Result<u64, FrontendError> {
        self.record(Sent::Unexpected("GET_MAX_MEM_SLOTS"))?;
        Ok(8)
    }
    fn set_config(&mut self, _offset: u32, _data: &[u8]) -> Result<(), FrontendError> {
        self.record(Sent::Unexpected("SET_CONFIG"))
    }
    fn get_inflight_fd(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightBuffer>, FrontendError> {
        self.record(Sent::GetInflightFd {
            num_queues,
            queue_size,
        })?;
        let size = self.0.lock().unwrap().inflight_size;
        if size == 0 {
            return Ok(None);
        }
        let file = memfd(size);
        Ok(Some(InflightBuffer {
            description: InflightDescription {
                mmap_size: size,
                mmap_offset: 0,
                num_queues,
                queue_size,
            },
            fd: file.into(),
        }))
    }
    fn set_inflight_fd(
        &mut self,
        description: &InflightDescription,
        fd: BorrowedFd<'_>,
    ) -> Result<(), FrontendError> {
        use std::os::unix::fs::MetadataExt;
        let file = File::from(fd.try_clone_to_owned().unwrap());
        self.record(Sent::SetInflightFd {
            mmap_size: description.mmap_size,
            inode: file.metadata().unwrap().ino(),
        })
    }
}

/// A memfd of `size` bytes (zeroed).
fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"vhost-user-dev-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

fn ram_file() -> Arc<File> {
    Arc::new(File::open("/dev/null").unwrap())
}

fn memory_table(file: &Arc<File>) -> MemoryTable {
    MemoryTable::new(vec![GuestRegion {
        file: file.clone(),
        guest_phys_addr: RAM_GPA,
        size: RAM_SIZE,
        userspace_addr: RAM_HVA,
        mmap_offset: RAM_OFFSET,
    }])
    .unwrap()
}

const OPTIONS: VhostUserDeviceOptions = VhostUserDeviceOptions {
    num_queues: 2,
    queue_size: 256,
};

fn device_with(
    backend: Backend,
) -> (
    Result<VhostUserDevice, VhostUserDeviceError>,
    Arc<Mutex<Backend>>,
    Arc<File>,
) {
    let backend = Arc::new(Mutex::new(backend));
    let file = ram_file();
    let device = VhostUserDevice::new(
        Box::new(FakeFrontend(backend.clone())),
        DeviceKind::BLOCK,
        memory_table(&file),
        OPTIONS,
    );
    (device, backend, file)
}

fn device() -> (VhostUserDevice, Arc<Mutex<Backend>>, Arc<File>) {
    let (device, backend, file) = device_with(Backend::default());
    (device.expect("handshake succeeds"), backend, file)
}

/// The requests sent since the last call.
fn take_sent(backend: &Arc<Mutex<Backend>>) -> Vec<Sent> {
    std::mem::take(&mut backend.lock().unwrap().sent)
}

fn queue(index: u16, base: u64) -> QueueConfig {
    QueueConfig {
        index,
        size: 128,
        desc_table: base,
        avail_ring: base + 0x1000,
        used_ring: base + 0x2000,
        ready: true,
    }
}

/// Which eventfd `fd` is (the kernel's `eventfd-id` in fdinfo), the same for every duplicate.
fn eventfd_id(fd: RawFd) -> u64 {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("eventfd-id:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("fd {fd} is not an eventfd: {info}"))
}

fn eventfds(n: usize) -> (Vec<EventFd>, EventFd) {
    let kicks = (0..n).map(|_| EventFd::new(0).unwrap()).collect();
    (kicks, EventFd::new(0).unwrap())
}

#[test]
fn handshake_message_sequence() {
    let (device, backend, _file) = device();
    assert_eq!(
        take_sent(&backend),
        vec![
            Sent::GetFeatures,
            Sent::GetProtocolFeatures,
            // Only what we want *and* the backend offers (0x8f2b has MQ, REPLY_ACK, CONFIG).
            Sent::SetProtocolFeatures(MQ | REPLY_ACK | CONFIG),
            Sent::SetOwner,
            Sent::GetQueueNum,
            Sent::GetConfig {
                offset: 0,
                size: 60
            },
        ]
    );
    assert_eq!(device.state(), BackendState::Negotiated);
    assert_eq!(device.device_type(), 2);
    assert_eq!(device.queue_max_sizes(), vec![256, 256]);
}

#[test]
fn guest_sees_version_1_split_ring_and_block_bits_only() {
    let (device, _backend, _file) = device();
    let offered = device.device_features();
    assert_ne!(offered & VERSION_1, 0);
    assert_ne!(offered & BLK_SEG_MAX, 0);
    assert_ne!(offered & BLK_FLUSH, 0);
    // The split ring's notification suppression and indirect tables pass through.
    assert_eq!(
        offered & (EVENT_IDX | INDIRECT_DESC),
        EVENT_IDX | INDIRECT_DESC
    );
    // QSD offers this vhost-user bit, the guest must not see it (nor PACKED, were it offered).
    assert_eq!(QSD_FEATURES & PROTOCOL_FEATURES, PROTOCOL_FEATURES);
    assert_eq!(
        offered & (PROTOCOL_FEATURES | RING_PACKED | BLK_CONFIG_WCE),
        0
    );
    assert_eq!(
        offered & !QSD_FEATURES,
        0,
        "nothing the backend did not offer"
    );
}

#[test]
fn backend_without_version_1_is_refused() {
    let (result, _, _) = device_with(Backend {
        features: PROTOCOL_FEATURES | BLK_SEG_MAX,
        ..Backend::default()
    });
    let err = result.err().expect("refused");
    assert!(
        matches!(err, VhostUserDeviceError::MissingFeature(what) if what.contains("VERSION_1")),
        "{err}"
    );
}

#[test]
fn backend_without_protocol_features_or_config_is_refused() {
    let (result, _, _) = device_with(Backend {
        features: VERSION_1,
        ..Backend::default()
    });
    assert!(matches!(
        result,
        Err(VhostUserDeviceError::MissingFeature(_))
    ));
    let (result, backend, _) = device_with(Backend {
        protocol_features: MQ | REPLY_ACK,
        ..Backend::default()
    });
    assert!(
        matches!(result, Err(VhostUserDeviceError::MissingFeature(what)) if what.contains("CONFIG"))
    );
    assert!(
        !take_sent(&backend).contains(&Sent::GetConfig {
            offset: 0,
            size: 60
        }),
        "refused before GET_CONFIG, which needs the feature"
    );
}

#[test]
fn protocol_bits_the_backend_did_not_offer_are_never_set() {
    let (result, backend, _) = device_with(Backend {
        // RESET_DEVICE (13): offered, not wanted.
        protocol_features: CONFIG | (1 << 13),
        queue_num: 1,
        ..Backend::default()
    });
    // No MQ: one queue only, and OPTIONS asks for two.
    assert!(matches!(
        result,
        Err(VhostUserDeviceError::TooFewQueues {
            backend: 1,
            wanted: 2
        })
    ));
    let sent = take_sent(&backend);
    assert!(sent.contains(&Sent::SetProtocolFeatures(CONFIG)));
    assert!(!sent.contains(&Sent::GetQueueNum), "GET_QUEUE_NUM needs MQ");
}

#[test]
fn too_few_backend_queues_are_refused() {
    let (result, _, _) = device_with(Backend {
        queue_num: 1,
        ..Backend::default()
    });
    assert!(matches!(
        result,
        Err(VhostUserDeviceError::TooFewQueues {
            backend: 1,
            wanted: 2
        })
    ));
}

#[test]
fn config_space_is_fetched_checked_and_patched() {
    let (device, _backend, _file) = device();
    let mut capacity = [0u8; 8];
    device.read_config(0, &mut capacity);
    assert_eq!(capacity, [0, 1, 2, 3, 4, 5, 6, 7]);
    let mut num_queues = [0u8; 2];
    device.read_config(34, &mut num_queues);
    assert_eq!(
        u16::from_le_bytes(num_queues),
        2,
        "the count we expose, not the backend's"
    );
    let mut past_end = [0xffu8; 4];
    device.read_config(58, &mut past_end);
    assert_eq!(past_end, [58, 59, 0, 0]);

    let (result, _, _) = device_with(Backend {
        config: vec![0; 12],
        ..Backend::default()
    });
    assert!(matches!(
        result,
        Err(VhostUserDeviceError::ConfigSize { asked: 60, got: 12 })
    ));
}

#[test]
fn handshake_failures_tell_gone_from_broken() {
    let (result, _, _) = device_with(Backend {
        fail_on: Some(("GET_FEATURES", Failure::PeerGone)),
        ..Backend::default()
    });
    assert!(matches!(
        result,
        Err(VhostUserDeviceError::BackendGone {
            during: "the handshake",
            source: FrontendError::PeerGone {
                during: "GET_FEATURES"
            },
        })
    ));
    let (result, _, _) = device_with(Backend {
        fail_on: Some(("GET_CONFIG", Failure::Protocol)),
        ..Backend::default()
    });
    assert!(matches!(
        result,
        Err(VhostUserDeviceError::BackendBroken {
            during: "GET_CONFIG",
            ..
        })
    ));
}

/// The handshake, a device start and a stop each run under one overall deadline
/// (CONTROL_SEQUENCE_BUDGET), cleared when they end.
#[test]
fn every_control_sequence_has_one_deadline_and_clears_it() {
    let before = std::time::Instant::now();
    let (mut device, backend, _file) = device();
    let check = |what: &str| {
        let mut b = backend.lock().unwrap();
        assert!(!b.deadlines.is_empty(), "{what}: nothing sent");
        let first = b.deadlines[0].unwrap_or_else(|| panic!("{what}: no deadline"));
        assert!(
            b.deadlines.iter().all(|d| *d == Some(first)),
            "{what}: one deadline for the whole sequence"
        );
        assert!(first <= std::time::Instant::now() + super::CONTROL_SEQUENCE_BUDGET);
        assert!(first >= before + super::CONTROL_SEQUENCE_BUDGET);
        assert_eq!(b.sequence_deadline, None, "{what}: cleared afterwards");
        b.deadlines.clear();
    };
    check("handshake");
    let (kicks, call) = eventfds(2);
    device
        .activate(VERSION_1, &[queue(0, 0x1_0000)], &kicks, &call)
        .unwrap();
    check("start");
    backend.lock().unwrap().vring_bases = VecDeque::from([3]);
    device.reset().unwrap();
    check("stop");
}

#[test]
fn activation_message_sequence() {
    let (mut device, backend, file) = device();
    take_sent(&backend);
    let (kicks, call) = eventfds(2);
    let mut unready = queue(1, 0x8_0000);
    unready.ready = false;
    let acked = VERSION_1 | BLK_SEG_MAX;
    device
        .activate(acked, &[queue(0, 0x1_0000), unready], &kicks, &call)
        .unwrap();

    let expected_region = MemoryRegion {
        guest_phys_addr: RAM_GPA,
        memory_size: RAM_SIZE,
        userspace_addr: RAM_HVA,
        mmap_offset: RAM_OFFSET,
    };
    assert_eq!(
        take_sent(&backend),
        vec![
            Sent::SetFeatures(acked | PROTOCOL_FEATURES),
            Sent::SetMemTable(vec![(expected_region, file.as_raw_fd())]),
            Sent::SetVringNum { index: 0, num: 128 },
            Sent::SetVringBase { index: 0, base: 0 },
            Sent::SetVringAddr(VringAddr {
                index: 0,
                flags: 0,
                desc_user_addr: RAM_HVA + 0x1_0000,
                used_user_addr: RAM_HVA + 0x1_2000,
                avail_user_addr: RAM_HVA + 0x1_1000,
                log_guest_addr: 0,
            }),
            Sent::SetVringKick {
                index: 0,
                eventfd: eventfd_id(kicks[0].as_raw_fd())
            },
            Sent::SetVringCall {
                index: 0,
                eventfd: eventfd_id(call.as_raw_fd())
            },
            Sent::SetVringEnable {
                index: 0,
                enable: true
            },
            // Queue 1 was not made ready by the driver: the backend never hears of it.
        ]
    );
    assert_eq!(
        device.state(),
        BackendState::Running {
            acked_features: acked,
            queues: vec![StartedQueue {
                index: 0,
                size: 128,
                addr: VringAddr {
                    index: 0,
                    flags: 0,
                    desc_user_addr: RAM_HVA + 0x1_0000,
                    used_user_addr: RAM_HVA + 0x1_2000,
                    avail_user_addr: RAM_HVA + 0x1_1000,
                    log_guest_addr: 0,
                },
            }],
        }
    );
}

#[test]
fn rings_outside_shared_memory_never_reach_the_backend() {
    let (mut device, backend, _file) = device();
    take_sent(&backend);
    let (kicks, call) = eventfds(2);
    // The used ring (0xff000 + 0x2000) lies past the end of the only region.
    let err = device
        .activate(VERSION_1, &[queue(0, RAM_SIZE - 0x1000)], &kicks, &call)
        .unwrap_err();
    assert!(
        matches!(err, DeviceError::BadQueue { index: 0, .. }),
        "{err}"
    );
    assert_eq!(take_sent(&backend), vec![]);
    assert_eq!(device.state(), BackendState::Negotiated, "still usable");

    let mut too_big = queue(0, 0x1_0000);
    too_big.size = 512;
    assert!(device
        .activate(VERSION_1, &[too_big], &kicks, &call)
        .is_err());
    let mut unready = queue(0, 0x1_0000);
    unready.ready = false;
    assert!(matches!(
        device.activate(VERSION_1, &[unready], &kicks, &call),
        Err(DeviceError::NoQueueReady)
    ));
    assert_eq!(take_sent(&backend), vec![]);
}

#[test]
fn reset_stops_started_queues_and_a_restart_is_fresh() {
    let (mut started, backend, _file) = device();
    let (kicks, call) = eventfds(2);
    started
        .activate(
            VERSION_1,
            &[queue(0, 0x1_0000), queue(1, 0x2_0000)],
            &kicks,
            &call,
        )
        .unwrap();
    take_sent(&backend);
    backend.lock().unwrap().vring_bases = VecDeque::from([7, 9]);

    started.reset().unwrap();
    assert_eq!(
        take_sent(&backend),
        vec![
            Sent::SetVringEnable {
                index: 0,
                enable: false
            },
            Sent::GetVringBase { index: 0 },
            Sent::SetVringEnable {
                index: 1,
                enable: false
            },
            Sent::GetVringBase { index: 1 },
        ]
    );
    assert_eq!(
        started.state(),
        BackendState::Stopped {
            last_bases: vec![(0, 7), (1, 9)]
        }
    );

    // The driver starts over: the whole series again, from ring base 0.
    started
        .activate(VERSION_1, &[queue(0, 0x3_0000)], &kicks, &call)
        .unwrap();
    let sent = take_sent(&backend);
    assert_eq!(sent[0], Sent::SetFeatures(VERSION_1 | PROTOCOL_FEATURES));
    assert!(sent.contains(&Sent::SetVringBase { index: 0, base: 0 }));
    assert_eq!(sent.len(), 8);

    // A reset of a device that never started tells the backend nothing.
    let (mut fresh, backend, _file) = device();
    take_sent(&backend);
    fresh.reset().unwrap();
    assert_eq!(take_sent(&backend), vec![]);
}

#[test]
fn backend_gone_during_activation_leaves_the_device_disconnected() {
    let (mut device, backend, _file) = device();
    backend.lock().unwrap().fail_on = Some(("SET_MEM_TABLE", Failure::PeerGone));
    let (kicks, call) = eventfds(2);
    let err = device
        .activate(VERSION_1, &[queue(0, 0x1_0000)], &kicks, &call)
        .unwrap_err();
    let DeviceError::Backend(source) = err else {
        panic!("expected a backend error, got {err}")
    };
    assert!(matches!(
        source.downcast_ref::<VhostUserDeviceError>(),
        Some(VhostUserDeviceError::BackendGone {
            during: "SET_MEM_TABLE",
            ..
        })
    ));
    assert_eq!(
        device.state(),
        BackendState::Disconnected {
            during: "SET_MEM_TABLE"
        }
    );

    // Nobody to talk to: later requests fail fast, without touching the connection.
    backend.lock().unwrap().fail_on = None;
    take_sent(&backend);
    assert!(device
        .activate(VERSION_1, &[queue(0, 0x1_0000)], &kicks, &call)
        .is_err());
    device.reset().unwrap();
    assert_eq!(take_sent(&backend), vec![]);
}

#[test]
fn backend_breaking_the_protocol_at_reset_leaves_the_device_broken() {
    let (mut device, backend, _file) = device();
    let (kicks, call) = eventfds(2);
    device
        .activate(VERSION_1, &[queue(0, 0x1_0000)], &kicks, &call)
        .unwrap();
    backend.lock().unwrap().fail_on = Some(("GET_VRING_BASE", Failure::Protocol));
    assert!(device.reset().is_err());
    assert_eq!(
        device.state(),
        BackendState::Broken {
            during: "GET_VRING_BASE"
        }
    );
}

#[test]
fn a_backend_refusing_to_stop_a_ring_is_not_trusted_again() {
    let (mut device, backend, _file) = device();
    let (kicks, call) = eventfds(2);
    device
        .activate(VERSION_1, &[queue(0, 0x1_0000)], &kicks, &call)
        .unwrap();
    backend.lock().unwrap().fail_on = Some(("SET_VRING_ENABLE", Failure::Refused));
    assert!(device.reset().is_err());
    assert_eq!(
        device.state(),
        BackendState::Broken {
            during: "SET_VRING_ENABLE"
        }
    );
}

#[test]
fn a_ring_base_beyond_16_bits_is_a_protocol_error() {
    let (mut device, backend, _file) = device();
    let (kicks, call) = eventfds(2);
    device
        .activate(VERSION_1, &[queue(0, 0x1_0000)], &kicks, &call)
        .unwrap();
    backend.lock().unwrap().vring_bases.push_back(0x1_0000);
    let err = device.reset().unwrap_err();
    let text = crate::virtio_mmio::error_chain(&err);
    assert!(text.contains("not a 16-bit ring index"), "{text}");
    assert_eq!(
        device.state(),
        BackendState::Broken {
            during: "GET_VRING_BASE"
        }
    );
}

#[test]
fn a_refusal_mid_start_stops_what_was_started() {
    let (mut device, backend, _file) = device();
    backend.lock().unwrap().fail_on = Some(("SET_VRING_ADDR", Failure::Refused));
    let (kicks, call) = eventfds(2);
    take_sent(&backend);
    let err = device
        .activate(VERSION_1, &[queue(0, 0x1_0000)], &kicks, &call)
        .unwrap_err();
    let DeviceError::Backend(source) = err else {
        panic!("expected a backend error, got {err}")
    };
    assert!(matches!(
        source.downcast_ref::<VhostUserDeviceError>(),
        Some(VhostUserDeviceError::BackendRefused {
            during: "SET_VRING_ADDR",
            ..
        })
    ));
    let names: Vec<_> = take_sent(&backend).iter().map(Sent::name).collect();
    assert_eq!(
        names,
        [
            "SET_FEATURES",
            "SET_MEM_TABLE",
            "SET_VRING_NUM",
            "SET_VRING_BASE",
            "SET_VRING_ADDR",
            // The unwind: the half-set-up queue is stopped again.
            "SET_VRING_ENABLE",
            "GET_VRING_BASE"
        ]
    );
    assert!(
        matches!(device.state(), BackendState::Stopped { .. }),
        "connection still usable"
    );
    backend.lock().unwrap().fail_on = None;
    device
        .activate(VERSION_1, &[queue(0, 0x1_0000)], &kicks, &call)
        .expect("a later start may succeed");
}

#[test]
fn the_real_connection_can_drive_a_device() {
    // The VMM boxes a vhost_frontend::connection::Frontend as `dyn VhostUserFrontend + Send`,
    // and the transport must be movable to the thread that handles MMIO exits.
    fn is_send<T: Send>() {}
    is_send::<vhost_frontend::connection::Frontend>();
    is_send::<MmioTransport>();
}

/// The whole control path: a driver programs the transport, the backend hears vhost-user.
#[test]
fn driver_ok_through_the_transport_starts_the_backend() {
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    let (device, backend, _file) = device();
    take_sent(&backend);
    let memory =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM_GPA), RAM_SIZE as usize)]).unwrap();
    let mut transport = MmioTransport::new(Box::new(device), memory).unwrap();
    let write =
        |t: &mut MmioTransport, offset: u64, value: u32| t.write(offset, &value.to_le_bytes());
    write(&mut transport, reg::STATUS, status::ACKNOWLEDGE);
    write(
        &mut transport,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER,
    );
    write(&mut transport, reg::DRIVER_FEATURES_SEL, 1);
    write(&mut transport, reg::DRIVER_FEATURES, 1); // VERSION_1
    let negotiated = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write(&mut transport, reg::STATUS, negotiated);
    write(&mut transport, reg::QUEUE_SEL, 0);
    write(&mut transport, reg::QUEUE_NUM, 128);
    write(&mut transport, reg::QUEUE_DESC_LOW, 0x1_0000);
    write(&mut transport, reg::QUEUE_DRIVER_LOW, 0x1_1000);
    write(&mut transport, reg::QUEUE_DEVICE_LOW, 0x1_2000);
    write(&mut transport, reg::QUEUE_READY, 1);
    assert!(take_sent(&backend).is_empty(), "nothing before DRIVER_OK");
    write(&mut transport, reg::STATUS, negotiated | status::DRIVER_OK);

    let sent = take_sent(&backend);
    let names: Vec<_> = sent.iter().map(Sent::name).collect();
    assert_eq!(
        names,
        [
            "SET_FEATURES",
            "SET_MEM_TABLE",
            "SET_VRING_NUM",
            "SET_VRING_BASE",
            "SET_VRING_ADDR",
            "SET_VRING_KICK",
            "SET_VRING_CALL",
            "SET_VRING_ENABLE"
        ]
    );
    assert!(sent.contains(&Sent::SetVringKick {
        index: 0,
        eventfd: eventfd_id(transport.queue_kick_fds()[0].as_raw_fd())
    }));
    assert!(sent.contains(&Sent::SetVringCall {
        index: 0,
        eventfd: eventfd_id(transport.call_fd().as_raw_fd())
    }));
    assert_eq!(transport.status() & status::DEVICE_NEEDS_RESET, 0);

    write(&mut transport, reg::STATUS, 0);
    let names: Vec<_> = take_sent(&backend).iter().map(Sent::name).collect();
    assert_eq!(names, ["SET_VRING_ENABLE", "GET_VRING_BASE"]);
}

#[test]
fn seg_max_is_clamped_to_the_ring_the_guest_gets() {
    let seg_max_of = |offered: u32| {
        let mut config: Vec<u8> = (0..60).collect();
        config[12..16].copy_from_slice(&offered.to_le_bytes());
        let (device, _, _) = device_with(Backend {
            config,
            ..Backend::default()
        });
        let mut field = [0u8; 4];
        device.expect("handshake").read_config(12, &mut field);
        u32::from_le_bytes(field)
    };
    // Our backend's default (--queue-size 1024) against the 256-entry ring we expose.
    assert_eq!(seg_max_of(1022), u32::from(OPTIONS.queue_size) - 2);
    assert_eq!(seg_max_of(u32::MAX), 254);
    assert_eq!(seg_max_of(126), 126, "a smaller promise is kept");
}

#[path = "reconnect_tests.rs"]
mod reconnect_tests;
