//! A hostile guest driver against the virtio-mmio transport: the fuzz input is a sequence of
//! register reads and writes (any offset, any width, any value), writes to guest memory (a used
//! ring index moving under the transport's feet), config-change notifications, and now and then
//! a whole well-formed driver bring-up with fuzz-chosen features and queue addresses (so the
//! activated states are reached often).
//!
//! The device behind the transport is one of two, chosen by the first input byte:
//! - `CheckingDevice`, a fake `VirtioDevice` that asserts the transport keeps its side of the
//!   trait: `activate` only once per reset, with acked features the device offered (VERSION_1
//!   among them), one entry per queue and per kick fd, and ready queues that are valid split rings
//!   inside guest memory; `reset` only after an `activate`; config accesses inside the config
//!   space.
//! - `VhostUserDevice` over `ScriptedBackend`, a fake `VhostUserFrontend` whose every answer comes
//!   from the input (success, a refusal, "backend gone", a protocol error): the device's handling of
//!   backend replies. It asserts that after the device was told the connection is gone or broken
//!   it is never used again, and that ring messages only name queues and sizes the device has.
//!
//! Properties checked besides those: no panic, no out-of-bounds access (ASan), and the status
//! register never shows a step without the ones before it (DRIVER_OK needs FEATURES_OK needs
//! DRIVER needs ACKNOWLEDGE).
#![no_main]

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;

use devices::virtio_mmio::registers::{self as reg, status};
use devices::virtio_mmio::{
    DeviceError, DeviceKind, MemoryTable, MmioTransport, QueueConfig, VhostUserDevice,
    VhostUserDeviceOptions, VirtioDevice, VIRTIO_F_VERSION_1,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use vhost_frontend::features::{bit_mask, PROTOCOL_CONFIG, PROTOCOL_MQ, PROTOCOL_REPLY_ACK};
use vhost_frontend::wire::{InflightDescription, VringAddr};
use vhost_frontend::{FrontendError, InflightBuffer, MemoryRegionFd, VhostUserFrontend};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM: 64 KiB at 0, a 4 KiB hole, 4 KiB more; one memfd behind both (a vhost-user device
/// can only hand file-backed RAM to its backend).
const LOW_RAM: (u64, usize) = (0, 0x10000);
const HIGH_RAM: (u64, usize) = (0x11000, 0x1000);
/// Addresses that land in RAM, the hole, or just past the end.
const NEAR_SPAN: u64 = 0x12000 + 0x200;
const MAX_OPS: usize = 256;
const CONFIG_SPACE_SIZE: u64 = reg::MMIO_WINDOW_SIZE - reg::CONFIG_SPACE;

const REGISTERS: &[u64] = &[
    reg::MAGIC_VALUE_OFFSET,
    reg::VERSION,
    reg::DEVICE_ID,
    reg::VENDOR_ID_OFFSET,
    reg::DEVICE_FEATURES,
    reg::DEVICE_FEATURES_SEL,
    reg::DRIVER_FEATURES,
    reg::DRIVER_FEATURES_SEL,
    reg::QUEUE_SEL,
    reg::QUEUE_NUM_MAX,
    reg::QUEUE_NUM,
    reg::QUEUE_READY,
    reg::QUEUE_NOTIFY,
    reg::INTERRUPT_STATUS,
    reg::INTERRUPT_ACK,
    reg::STATUS,
    reg::QUEUE_DESC_LOW,
    reg::QUEUE_DESC_HIGH,
    reg::QUEUE_DRIVER_LOW,
    reg::QUEUE_DRIVER_HIGH,
    reg::QUEUE_DEVICE_LOW,
    reg::QUEUE_DEVICE_HIGH,
    reg::CONFIG_GENERATION,
    reg::CONFIG_SPACE,
];

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn guest_memory() -> GuestMemoryMmap {
    let file = fuzz_support::memfd(c"fuzz-guest-ram", (LOW_RAM.1 + HIGH_RAM.1) as u64);
    let low = FileOffset::new(file.try_clone().expect("dup memfd"), 0);
    let high = FileOffset::new(file, LOW_RAM.1 as u64);
    GuestMemoryMmap::from_ranges_with_files([
        (GuestAddress(LOW_RAM.0), LOW_RAM.1, Some(low)),
        (GuestAddress(HIGH_RAM.0), HIGH_RAM.1, Some(high)),
    ])
    .expect("guest memory")
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let memory = guest_memory();
    let device: Box<dyn VirtioDevice> = if u.arbitrary()? {
        Box::new(CheckingDevice::new(u, memory.clone())?)
    } else {
        match vhost_user_device(u, &memory)? {
            Some(device) => Box::new(device),
            None => return Ok(()), // The handshake failed: an error, as it should be.
        }
    };
    let Ok(mut transport) = MmioTransport::new(device, memory.clone()) else {
        return Ok(());
    };
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        match u.int_in_range(0..=15)? {
            0..=5 => {
                let (offset, width) = (offset(u)?, width(u)?);
                let mut data = vec![0u8; width];
                transport.read(offset, &mut data);
                if offset == reg::MAGIC_VALUE_OFFSET && width == 4 {
                    assert_eq!(data, reg::MAGIC_VALUE.to_le_bytes());
                }
            }
            6..=11 => {
                let (offset, width) = (offset(u)?, width(u)?);
                let value = u.bytes(width)?;
                transport.write(offset, value);
            }
            12 => {
                // The backend (or the guest) moves a used ring index, or anything else.
                let at = GuestAddress(u.arbitrary::<u64>()? % NEAR_SPAN);
                let _ = memory.write_obj(u.arbitrary::<u16>()?, at);
            }
            13 => {
                let _ = transport.notify_config_change();
            }
            14 => bring_up(u, &mut transport)?,
            _ => transport.write(reg::STATUS, &0u32.to_le_bytes()),
        }
        check_status(transport.status());
    }
    Ok(())
}

/// Each status step needs the ones before it, whatever the driver wrote.
fn check_status(value: u32) {
    let steps = [
        (status::DRIVER_OK, status::FEATURES_OK),
        (status::FEATURES_OK, status::DRIVER),
        (status::DRIVER, status::ACKNOWLEDGE),
    ];
    for (bit, needs) in steps {
        assert!(
            value & bit == 0 || value & needs != 0,
            "status {value:#x} has bit {bit:#x} without {needs:#x}"
        );
    }
}

fn offset(u: &mut Unstructured<'_>) -> Result<u64> {
    Ok(match u.int_in_range(0..=7)? {
        0 => u.arbitrary()?,
        1 => u.arbitrary::<u64>()? % (reg::MMIO_WINDOW_SIZE + 0x40),
        2 => reg::CONFIG_SPACE + u.arbitrary::<u64>()? % (CONFIG_SPACE_SIZE + 0x10),
        _ => *u.choose(REGISTERS)?,
    })
}

fn width(u: &mut Unstructured<'_>) -> Result<usize> {
    Ok(match u.int_in_range(0..=7)? {
        0 => u.int_in_range(0..=16)?,
        1 => 1,
        2 => 2,
        3 => 8,
        _ => 4,
    })
}

/// An address for a ring part: mostly aligned inside RAM, sometimes near it, sometimes anything.
fn ring_address(u: &mut Unstructured<'_>) -> Result<u64> {
    let raw: u64 = u.arbitrary()?;
    Ok(match u.int_in_range(0..=7)? {
        0 => raw,
        1 => raw % NEAR_SPAN,
        _ => (raw % LOW_RAM.1 as u64) & !0xf,
    })
}

fn write32(transport: &mut MmioTransport, offset: u64, value: u32) {
    transport.write(offset, &value.to_le_bytes());
}

fn read32(transport: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    transport.read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// What a Linux driver does from reset to DRIVER_OK, with fuzz-chosen features and queues.
fn bring_up(u: &mut Unstructured<'_>, t: &mut MmioTransport) -> Result<()> {
    write32(t, reg::STATUS, 0);
    write32(t, reg::STATUS, status::ACKNOWLEDGE);
    write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    let mut offered = 0u64;
    for sel in 0..2u32 {
        write32(t, reg::DEVICE_FEATURES_SEL, sel);
        offered |= u64::from(read32(t, reg::DEVICE_FEATURES)) << (32 * sel);
    }
    // Mostly a subset of what is offered (VERSION_1 kept); sometimes anything.
    let accepted = if u.ratio(7, 8)? {
        offered & (u.arbitrary::<u64>()? | VIRTIO_F_VERSION_1)
    } else {
        u.arbitrary()?
    };
    for sel in 0..2u32 {
        write32(t, reg::DRIVER_FEATURES_SEL, sel);
        write32(t, reg::DRIVER_FEATURES, (accepted >> (32 * sel)) as u32);
    }
    let features_ok = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    write32(t, reg::STATUS, features_ok);
    for queue in 0..u.int_in_range(0..=4u32)? {
        write32(t, reg::QUEUE_SEL, queue);
        let max = read32(t, reg::QUEUE_NUM_MAX);
        let size = if u.ratio(7, 8)? && max != 0 {
            1 << u.int_in_range(0..=max.trailing_zeros())?
        } else {
            u.arbitrary()?
        };
        write32(t, reg::QUEUE_NUM, size);
        for (low, high) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH),
        ] {
            let addr = ring_address(u)?;
            write32(t, low, addr as u32);
            write32(t, high, (addr >> 32) as u32);
        }
        write32(t, reg::QUEUE_READY, 1);
    }
    write32(t, reg::STATUS, features_ok | status::DRIVER_OK);
    Ok(())
}

/// A fake device that checks what the transport hands it.
struct CheckingDevice {
    memory: GuestMemoryMmap,
    device_type: u32,
    max_sizes: Vec<u16>,
    features: u64,
    config: [u8; CONFIG_SPACE_SIZE as usize],
    /// Answers for activate and reset, in order; `true` means fail. Empty: succeed.
    failures: VecDeque<bool>,
    activated: bool,
}

impl CheckingDevice {
    fn new(u: &mut Unstructured<'_>, memory: GuestMemoryMmap) -> Result<Self> {
        let queues = u.int_in_range(1..=3)?;
        let mut max_sizes = Vec::with_capacity(queues);
        for _ in 0..queues {
            // Mostly valid maxima; sometimes one the transport must refuse at creation.
            max_sizes.push(if u.ratio(15, 16)? {
                1 << u.int_in_range(0..=8)?
            } else {
                u.arbitrary()?
            });
        }
        let features = u.arbitrary::<u64>()?
            | if u.ratio(15, 16)? {
                VIRTIO_F_VERSION_1
            } else {
                0
            };
        let mut config = [0u8; CONFIG_SPACE_SIZE as usize];
        u.fill_buffer(&mut config)?;
        let mut failures = VecDeque::new();
        for _ in 0..u.int_in_range(0..=4)? {
            failures.push_back(u.arbitrary()?);
        }
        Ok(CheckingDevice {
            memory,
            device_type: u.arbitrary()?,
            max_sizes,
            features,
            config,
            failures,
            activated: false,
        })
    }

    fn config_range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let end = offset.checked_add(len as u64).expect("config access wraps");
        assert!(
            end <= CONFIG_SPACE_SIZE,
            "config access {offset:#x}+{len} past the config space"
        );
        offset as usize..end as usize
    }

    fn next_answer(&mut self) -> Result<(), DeviceError> {
        match self.failures.pop_front() {
            Some(true) => Err(DeviceError::Backend("scripted failure".into())),
            _ => Ok(()),
        }
    }
}

impl VirtioDevice for CheckingDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.max_sizes.clone()
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let range = self.config_range(offset, data.len());
        data.copy_from_slice(&self.config[range]);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let range = self.config_range(offset, data.len());
        self.config[range].copy_from_slice(data);
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
        queue_kicks: &[EventFd],
        _call: &EventFd,
    ) -> Result<(), DeviceError> {
        assert!(!self.activated, "activate twice without a reset");
        self.activated = true;
        assert_eq!(
            acked_features & !self.features,
            0,
            "acked features never offered"
        );
        assert_ne!(
            acked_features & VIRTIO_F_VERSION_1,
            0,
            "activated without VERSION_1"
        );
        assert_eq!(queues.len(), self.max_sizes.len());
        assert_eq!(queue_kicks.len(), self.max_sizes.len());
        for (i, queue) in queues.iter().enumerate() {
            assert_eq!(usize::from(queue.index), i);
            if !queue.ready {
                continue;
            }
            let max = self.max_sizes[i];
            assert!(
                queue.size.is_power_of_two() && queue.size <= max,
                "ready queue {i} of size {} (max {max})",
                queue.size
            );
            for (addr, align, len) in [
                (
                    queue.desc_table,
                    QueueConfig::DESC_TABLE_ALIGN,
                    queue.desc_table_len(),
                ),
                (
                    queue.avail_ring,
                    QueueConfig::AVAIL_RING_ALIGN,
                    queue.avail_ring_len(),
                ),
                (
                    queue.used_ring,
                    QueueConfig::USED_RING_ALIGN,
                    queue.used_ring_len(),
                ),
            ] {
                assert_eq!(addr % align, 0, "ready queue {i}: {addr:#x} misaligned");
                assert!(
                    self.memory.check_range(GuestAddress(addr), len as usize),
                    "ready queue {i}: {addr:#x}+{len:#x} outside guest memory"
                );
            }
        }
        self.next_answer()
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        assert!(self.activated, "reset without an activate");
        self.activated = false;
        self.next_answer()
    }
}

/// A VhostUserDevice whose backend answers from the input; `None` when the handshake fails.
fn vhost_user_device(
    u: &mut Unstructured<'_>,
    memory: &GuestMemoryMmap,
) -> Result<Option<VhostUserDevice>> {
    let options = VhostUserDeviceOptions {
        num_queues: u.int_in_range(1..=3)?,
        queue_size: 1 << u.int_in_range(0..=8)?,
    };
    let mut script = VecDeque::new();
    for _ in 0..u.int_in_range(0..=40)? {
        script.push_back(Answer::arbitrary(u)?);
    }
    let backend = ScriptedBackend {
        script,
        options,
        given_up: None,
    };
    let table = MemoryTable::from_guest_memory(memory).expect("memfd-backed RAM has a table");
    Ok(VhostUserDevice::new(Box::new(backend), DeviceKind::BLOCK, table, options).ok())
}

/// How the scripted backend answers one request.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// What a healthy blk backend would say.
    Plausible,
    /// Success carrying this value (features, counts, ring base) instead of a plausible one.
    Value(u64),
    /// A REPLY_ACK failure: the connection stays usable.
    Refuse(u64),
    Gone,
    Broken,
    TimedOut,
}

impl Answer {
    fn arbitrary(u: &mut Unstructured<'_>) -> Result<Answer> {
        Ok(match u.int_in_range(0..=15)? {
            0..=8 => Answer::Plausible,
            9 | 10 => Answer::Value(u.arbitrary()?),
            11 | 12 => Answer::Refuse(u.int_in_range(1..=u64::MAX)?),
            13 => Answer::Gone,
            14 => Answer::Broken,
            _ => Answer::TimedOut,
        })
    }
}

/// A fake backend connection: answers come from the script (then plausible ones once it runs
/// out). Checks that the device stops talking to it once told it is gone or broken, and that
/// ring requests name queues and sizes the device has.
struct ScriptedBackend {
    script: VecDeque<Answer>,
    options: VhostUserDeviceOptions,
    /// Set when an answer ended the connection (anything but success or a refusal).
    given_up: Option<&'static str>,
}

impl ScriptedBackend {
    /// The answer to `message`: `Ok(None)` for a plausible success, `Ok(Some(v))` for a
    /// success carrying `v`.
    fn answer(&mut self, message: &'static str) -> Result<Option<u64>, FrontendError> {
        if let Some(earlier) = self.given_up {
            panic!("{message} sent on a connection that ended at {earlier}");
        }
        let answer = self.script.pop_front().unwrap_or(Answer::Plausible);
        let err = match answer {
            Answer::Plausible => return Ok(None),
            Answer::Value(v) => return Ok(Some(v)),
            Answer::Refuse(status) => return Err(FrontendError::BackendFailed { message, status }),
            Answer::Gone => FrontendError::PeerGone { during: message },
            Answer::Broken => FrontendError::Protocol {
                message,
                detail: "scripted".into(),
            },
            Answer::TimedOut => FrontendError::TimedOut { during: message },
        };
        self.given_up = Some(message);
        Err(err)
    }

    fn ack(&mut self, message: &'static str) -> Result<(), FrontendError> {
        self.answer(message).map(|_| ())
    }

    fn value(&mut self, message: &'static str, plausible: u64) -> Result<u64, FrontendError> {
        Ok(self.answer(message)?.unwrap_or(plausible))
    }

    fn check_queue(&self, message: &str, index: u32) {
        assert!(
            index < u32::from(self.options.num_queues),
            "{message} for queue {index}; the device has {}",
            self.options.num_queues
        );
    }
}

impl VhostUserFrontend for ScriptedBackend {
    fn set_owner(&mut self) -> Result<(), FrontendError> {
        self.ack("SET_OWNER")
    }

    fn get_features(&mut self) -> Result<u64, FrontendError> {
        // VERSION_1, PROTOCOL_FEATURES (bit 30) and the blk bits.
        let plausible = VIRTIO_F_VERSION_1 | (1 << 30) | DeviceKind::BLOCK.device_features;
        self.value("GET_FEATURES", plausible)
    }

    fn set_features(&mut self, _features: u64) -> Result<(), FrontendError> {
        self.ack("SET_FEATURES")
    }

    fn get_protocol_features(&mut self) -> Result<u64, FrontendError> {
        let plausible =
            bit_mask(PROTOCOL_MQ) | bit_mask(PROTOCOL_REPLY_ACK) | bit_mask(PROTOCOL_CONFIG);
        self.value("GET_PROTOCOL_FEATURES", plausible)
    }

    fn set_protocol_features(&mut self, _features: u64) -> Result<(), FrontendError> {
        self.ack("SET_PROTOCOL_FEATURES")
    }

    fn get_queue_num(&mut self) -> Result<u64, FrontendError> {
        self.value("GET_QUEUE_NUM", 4)
    }

    fn get_max_mem_slots(&mut self) -> Result<u64, FrontendError> {
        self.value("GET_MAX_MEM_SLOTS", 8)
    }

    fn get_config(&mut self, _offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        // A scripted value stands for a reply of the wrong length.
        let len = match self.answer("GET_CONFIG")? {
            None => size as usize,
            Some(v) => (v % 512) as usize,
        };
        Ok(vec![0x5a; len])
    }

    fn set_config(&mut self, _offset: u32, _data: &[u8]) -> Result<(), FrontendError> {
        self.ack("SET_CONFIG")
    }

    fn set_mem_table(&mut self, regions: &[MemoryRegionFd<'_>]) -> Result<(), FrontendError> {
        assert!(
            !regions.is_empty() && regions.len() <= 8,
            "{} regions",
            regions.len()
        );
        self.ack("SET_MEM_TABLE")
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<(), FrontendError> {
        self.check_queue("SET_VRING_NUM", index);
        assert!(
            num.is_power_of_two() && num <= u32::from(self.options.queue_size),
            "SET_VRING_NUM {num} (max {})",
            self.options.queue_size
        );
        self.ack("SET_VRING_NUM")
    }

    fn set_vring_addr(&mut self, addr: &VringAddr) -> Result<(), FrontendError> {
        self.check_queue("SET_VRING_ADDR", addr.index);
        self.ack("SET_VRING_ADDR")
    }

    fn set_vring_base(&mut self, index: u32, _base: u32) -> Result<(), FrontendError> {
        self.check_queue("SET_VRING_BASE", index);
        self.ack("SET_VRING_BASE")
    }

    fn get_vring_base(&mut self, index: u32) -> Result<u32, FrontendError> {
        self.check_queue("GET_VRING_BASE", index);
        Ok(self.value("GET_VRING_BASE", 0)? as u32)
    }

    fn set_vring_kick(&mut self, index: u32, _fd: BorrowedFd<'_>) -> Result<(), FrontendError> {
        self.check_queue("SET_VRING_KICK", index);
        self.ack("SET_VRING_KICK")
    }

    fn set_vring_call(&mut self, index: u32, _fd: BorrowedFd<'_>) -> Result<(), FrontendError> {
        self.check_queue("SET_VRING_CALL", index);
        self.ack("SET_VRING_CALL")
    }

    fn set_vring_enable(&mut self, index: u32, _enable: bool) -> Result<(), FrontendError> {
        self.check_queue("SET_VRING_ENABLE", index);
        self.ack("SET_VRING_ENABLE")
    }

    fn get_inflight_fd(
        &mut self,
        _num_queues: u16,
        _queue_size: u16,
    ) -> Result<Option<InflightBuffer>, FrontendError> {
        self.ack("GET_INFLIGHT_FD").map(|()| None)
    }

    fn set_inflight_fd(
        &mut self,
        _description: &InflightDescription,
        _fd: BorrowedFd<'_>,
    ) -> Result<(), FrontendError> {
        self.ack("SET_INFLIGHT_FD")
    }
}
