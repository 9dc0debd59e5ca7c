//! The virtio-mmio register file, version 2 ("modern"), virtio 1.x §4.2.2.
//! Registers are 32-bit, little-endian, at fixed offsets from the window base.

use crate::cpu::{mmio_read32, mmio_write32};

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const MODERN_VERSION: u32 = 2;

const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG: u64 = 0x100;

/// Device status bits (virtio 1.x §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// How many times to re-read a configuration field that keeps changing.
const CONFIG_READ_TRIES: u32 = 100;
/// How many reads of Status to wait for a reset to finish.
const RESET_POLLS: u32 = 1_000_000;

#[derive(Clone, Copy)]
pub struct Transport {
    base: u64,
}

/// What the identification registers say.
pub struct Identity {
    pub magic: u32,
    pub version: u32,
    pub device_id: u32,
}

impl Transport {
    /// `base` must be a virtio-mmio window from the command line; the page
    /// tables map the whole low 4 GiB for ring 3.
    pub fn new(base: u64) -> Self {
        Transport { base }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    fn read(&self, reg: u64) -> u32 {
        mmio_read32(self.base + reg)
    }

    fn write(&self, reg: u64, value: u32) {
        mmio_write32(self.base + reg, value)
    }

    pub fn identity(&self) -> Identity {
        Identity {
            magic: self.read(MAGIC_VALUE),
            version: self.read(VERSION),
            device_id: self.read(DEVICE_ID),
        }
    }

    pub fn status(&self) -> u32 {
        self.read(STATUS)
    }

    /// Set `bits` in addition to those already set.
    pub fn add_status(&self, bits: u32) {
        let current = self.status();
        self.write(STATUS, current | bits);
    }

    /// Write 0 to Status and wait until the device reads back 0 (a modern
    /// device may take a while to finish its reset). False: it never did.
    pub fn reset(&self) -> bool {
        self.write(STATUS, 0);
        (0..RESET_POLLS).any(|_| self.status() == 0)
    }

    pub fn device_features(&self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    pub fn set_driver_features(&self, features: u64) {
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, features as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (features >> 32) as u32);
    }

    pub fn select_queue(&self, index: u32) {
        self.write(QUEUE_SEL, index);
    }

    pub fn queue_num_max(&self) -> u32 {
        self.read(QUEUE_NUM_MAX)
    }

    pub fn queue_ready(&self) -> bool {
        self.read(QUEUE_READY) != 0
    }

    /// Give the selected queue its size and ring addresses, then enable it.
    pub fn activate_queue(&self, size: u16, desc: u64, driver: u64, device: u64) {
        self.write(QUEUE_NUM, u32::from(size));
        self.write(QUEUE_DESC_LOW, desc as u32);
        self.write(QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(QUEUE_DRIVER_LOW, driver as u32);
        self.write(QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
        self.write(QUEUE_DEVICE_LOW, device as u32);
        self.write(QUEUE_DEVICE_HIGH, (device >> 32) as u32);
        self.write(QUEUE_READY, 1);
    }

    pub fn notify(&self, queue: u32) {
        self.write(QUEUE_NOTIFY, queue);
    }

    /// Read and acknowledge the interrupt causes (bit 0: used buffer,
    /// bit 1: configuration change).
    pub fn acknowledge_interrupt(&self) -> u32 {
        let causes = self.read(INTERRUPT_STATUS);
        if causes != 0 {
            self.write(INTERRUPT_ACK, causes);
        }
        causes
    }

    /// Read a 64-bit configuration field consistently: retry while the
    /// device changes its configuration under us (ConfigGeneration moves).
    /// None if it never holds still.
    pub fn config_read64(&self, offset: u64) -> Option<u64> {
        (0..CONFIG_READ_TRIES).find_map(|_| {
            let before = self.read(CONFIG_GENERATION);
            let low = self.read(CONFIG + offset);
            let high = self.read(CONFIG + offset + 4);
            (self.read(CONFIG_GENERATION) == before)
                .then_some(u64::from(high) << 32 | u64::from(low))
        })
    }

    pub fn config_read32(&self, offset: u64) -> u32 {
        self.read(CONFIG + offset)
    }
}
