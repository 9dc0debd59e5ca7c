//! The virtio-mmio version 2 register layout (virtio spec 1.2, §4.2.2) and device status bits.
//!
//! Every register is 32 bits wide at a 4-byte aligned offset; the device-specific configuration
//! space starts at 0x100 and may be accessed with any width.

/// "virt" in little-endian ASCII: the first thing a driver checks.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Version 2 is the modern (non-legacy) virtio-mmio interface; version 1 is legacy-only.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id: "VHUM" (vhost-user mmio) in little-endian ASCII. Drivers do not interpret it;
/// it only tells a curious reader of `/sys/bus/virtio/devices/*/vendor` who made the device.
pub const VENDOR_ID: u32 = 0x4d55_4856;

/// Size of one device's MMIO window: 0x100 bytes of registers plus up to 0x100 of config space.
pub const MMIO_WINDOW_SIZE: u64 = 0x200;

// Register offsets. R = driver reads, W = driver writes.
pub const MAGIC_VALUE_OFFSET: u64 = 0x000; // R
pub const VERSION: u64 = 0x004; // R
pub const DEVICE_ID: u64 = 0x008; // R
pub const VENDOR_ID_OFFSET: u64 = 0x00c; // R
pub const DEVICE_FEATURES: u64 = 0x010; // R: 32 feature bits selected by DEVICE_FEATURES_SEL
pub const DEVICE_FEATURES_SEL: u64 = 0x014; // W
pub const DRIVER_FEATURES: u64 = 0x020; // W: 32 feature bits selected by DRIVER_FEATURES_SEL
pub const DRIVER_FEATURES_SEL: u64 = 0x024; // W
pub const QUEUE_SEL: u64 = 0x030; // W: which queue the QUEUE_* registers below address
pub const QUEUE_NUM_MAX: u64 = 0x034; // R: 0 means "no such queue"
pub const QUEUE_NUM: u64 = 0x038; // W: queue size the driver chose
pub const QUEUE_READY: u64 = 0x044; // RW
/// The doorbell. The VMM registers a KVM ioeventfd here (datamatch = queue index), so on the data
/// path these writes never reach the transport; the transport handles the ones that do anyway.
pub const QUEUE_NOTIFY: u64 = 0x050; // W
pub const INTERRUPT_STATUS: u64 = 0x060; // R
pub const INTERRUPT_ACK: u64 = 0x064; // W
pub const STATUS: u64 = 0x070; // RW
pub const QUEUE_DESC_LOW: u64 = 0x080; // W
pub const QUEUE_DESC_HIGH: u64 = 0x084; // W
pub const QUEUE_DRIVER_LOW: u64 = 0x090; // W: the avail ring
pub const QUEUE_DRIVER_HIGH: u64 = 0x094; // W
pub const QUEUE_DEVICE_LOW: u64 = 0x0a0; // W: the used ring
pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4; // W
/// Shared memory regions (§4.2.2): the driver selects a region id, then reads its length and
/// base. No device here has one, and the spec says a missing region reads length -1 (Linux
/// takes 0 for a region that exists and is empty).
pub const SHM_SEL: u64 = 0x0ac; // W
pub const SHM_LEN_LOW: u64 = 0x0b0; // R
pub const SHM_LEN_HIGH: u64 = 0x0b4; // R
pub const SHM_BASE_LOW: u64 = 0x0b8; // R
pub const SHM_BASE_HIGH: u64 = 0x0bc; // R
pub const CONFIG_GENERATION: u64 = 0x0fc; // R
pub const CONFIG_SPACE: u64 = 0x100; // RW, any width

/// InterruptStatus bit 0: the device used a buffer in at least one queue.
pub const INT_USED_BUFFER: u32 = 1 << 0;
/// InterruptStatus bit 1: the device configuration changed.
pub const INT_CONFIG_CHANGE: u32 = 1 << 1;

/// Device status bits (virtio spec §2.1), set by the driver in this order.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and the device is live: queues may be used.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete; the device refuses it by not keeping this bit set.
    pub const FEATURES_OK: u32 = 8;
    /// Set by the *device*: an error it cannot recover from; the driver must reset it.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Human-readable register name for logs.
pub fn register_name(offset: u64) -> &'static str {
    match offset {
        MAGIC_VALUE_OFFSET => "MagicValue",
        VERSION => "Version",
        DEVICE_ID => "DeviceID",
        VENDOR_ID_OFFSET => "VendorID",
        DEVICE_FEATURES => "DeviceFeatures",
        DEVICE_FEATURES_SEL => "DeviceFeaturesSel",
        DRIVER_FEATURES => "DriverFeatures",
        DRIVER_FEATURES_SEL => "DriverFeaturesSel",
        QUEUE_SEL => "QueueSel",
        QUEUE_NUM_MAX => "QueueNumMax",
        QUEUE_NUM => "QueueNum",
        QUEUE_READY => "QueueReady",
        QUEUE_NOTIFY => "QueueNotify",
        INTERRUPT_STATUS => "InterruptStatus",
        INTERRUPT_ACK => "InterruptACK",
        STATUS => "Status",
        QUEUE_DESC_LOW => "QueueDescLow",
        QUEUE_DESC_HIGH => "QueueDescHigh",
        QUEUE_DRIVER_LOW => "QueueDriverLow",
        QUEUE_DRIVER_HIGH => "QueueDriverHigh",
        QUEUE_DEVICE_LOW => "QueueDeviceLow",
        QUEUE_DEVICE_HIGH => "QueueDeviceHigh",
        SHM_SEL => "SHMSel",
        SHM_LEN_LOW => "SHMLenLow",
        SHM_LEN_HIGH => "SHMLenHigh",
        SHM_BASE_LOW => "SHMBaseLow",
        SHM_BASE_HIGH => "SHMBaseHigh",
        CONFIG_GENERATION => "ConfigGeneration",
        _ => "unknown",
    }
}
