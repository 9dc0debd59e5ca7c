//! Feature bits: the virtio bits a vhost-user backend offers in GET_FEATURES, and the vhost-user
//! protocol bits it offers in GET_PROTOCOL_FEATURES. Names are kept next to the numbers so traces can
//! print `VERSION_1 PROTOCOL_FEATURES ...` instead of a bare hex mask.

/// Virtio: the device accepts notifications while the queue is empty (legacy).
pub const VIRTIO_F_NOTIFY_ON_EMPTY: u32 = 24;
/// vhost: the backend can log dirty pages (live migration).
pub const VHOST_F_LOG_ALL: u32 = 26;
/// Virtio: no assumptions about descriptor layout (legacy).
pub const VIRTIO_F_ANY_LAYOUT: u32 = 27;
/// Virtio: indirect descriptor tables.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// Virtio: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// vhost-user: the backend speaks GET/SET_PROTOCOL_FEATURES. Without it only the 2014 base protocol exists.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Virtio 1.0 ("modern") device. Required by this project: no legacy layouts.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Virtio: the device accesses memory through a platform IOMMU.
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Virtio: packed virtqueue layout.
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// Virtio: buffers are used in the order they were made available.
pub const VIRTIO_F_IN_ORDER: u32 = 35;
/// Virtio: memory ordering as on real hardware.
pub const VIRTIO_F_ORDER_PLATFORM: u32 = 36;
/// Virtio: single root I/O virtualisation.
pub const VIRTIO_F_SR_IOV: u32 = 37;
/// Virtio: the driver passes extra data in notifications.
pub const VIRTIO_F_NOTIFICATION_DATA: u32 = 38;
/// Virtio: the driver uses the notification config data.
pub const VIRTIO_F_NOTIF_CONFIG_DATA: u32 = 39;
/// Virtio: individual queues can be reset.
pub const VIRTIO_F_RING_RESET: u32 = 40;

/// Protocol bit: multiple queues (GET_QUEUE_NUM).
pub const PROTOCOL_MQ: u32 = 0;
/// Protocol bit: dirty log passed as shared memory.
pub const PROTOCOL_LOG_SHMFD: u32 = 1;
/// Protocol bit: SEND_RARP (net migration).
pub const PROTOCOL_RARP: u32 = 2;
/// Protocol bit: the frontend may set NEED_REPLY and the backend then acks with a u64 status.
pub const PROTOCOL_REPLY_ACK: u32 = 3;
/// Protocol bit: NET_SET_MTU.
pub const PROTOCOL_MTU: u32 = 4;
/// Protocol bit: a second socket for backend-initiated requests (SET_BACKEND_REQ_FD).
pub const PROTOCOL_BACKEND_REQ: u32 = 5;
/// Protocol bit: SET_VRING_ENDIAN.
pub const PROTOCOL_CROSS_ENDIAN: u32 = 6;
/// Protocol bit: crypto sessions.
pub const PROTOCOL_CRYPTO_SESSION: u32 = 7;
/// Protocol bit: postcopy live migration (userfaultfd).
pub const PROTOCOL_PAGEFAULT: u32 = 8;
/// Protocol bit: GET_CONFIG / SET_CONFIG (device config space lives in the backend).
pub const PROTOCOL_CONFIG: u32 = 9;
/// Protocol bit: the backend may pass fds on the backend request channel.
pub const PROTOCOL_BACKEND_SEND_FD: u32 = 10;
/// Protocol bit: host notifiers (doorbell pages mapped into the guest).
pub const PROTOCOL_HOST_NOTIFIER: u32 = 11;
/// Protocol bit: GET/SET_INFLIGHT_FD, the shared region that survives a backend crash.
pub const PROTOCOL_INFLIGHT_SHMFD: u32 = 12;
/// Protocol bit: RESET_DEVICE.
pub const PROTOCOL_RESET_DEVICE: u32 = 13;
/// Protocol bit: kicks and calls sent as messages instead of eventfds.
pub const PROTOCOL_INBAND_NOTIFICATIONS: u32 = 14;
/// Protocol bit: GET_MAX_MEM_SLOTS, ADD_MEM_REG, REM_MEM_REG.
pub const PROTOCOL_CONFIGURE_MEM_SLOTS: u32 = 15;
/// Protocol bit: SET_STATUS / GET_STATUS.
pub const PROTOCOL_STATUS: u32 = 16;
/// Protocol bit: Xen mmap of guest memory.
pub const PROTOCOL_XEN_MMAP: u32 = 17;
/// Protocol bit: shared objects (virtio-gpu/dmabuf).
pub const PROTOCOL_SHARED_OBJECT: u32 = 18;
/// Protocol bit: device state transfer (SET_DEVICE_STATE_FD).
pub const PROTOCOL_DEVICE_STATE: u32 = 19;

/// The mask with only `bit` set, for building feature words: `bit_mask(VIRTIO_F_VERSION_1)`.
pub const fn bit_mask(bit: u32) -> u64 {
    1u64 << bit
}

/// True when `bit` is set in `features`.
pub const fn has(features: u64, bit: u32) -> bool {
    bit < 64 && features & (1u64 << bit) != 0
}

const VIRTIO_NAMES: &[(u32, &str)] = &[
    (VIRTIO_F_NOTIFY_ON_EMPTY, "NOTIFY_ON_EMPTY"),
    (VHOST_F_LOG_ALL, "LOG_ALL"),
    (VIRTIO_F_ANY_LAYOUT, "ANY_LAYOUT"),
    (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
    (VIRTIO_RING_F_EVENT_IDX, "EVENT_IDX"),
    (VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"),
    (VIRTIO_F_VERSION_1, "VERSION_1"),
    (VIRTIO_F_ACCESS_PLATFORM, "ACCESS_PLATFORM"),
    (VIRTIO_F_RING_PACKED, "RING_PACKED"),
    (VIRTIO_F_IN_ORDER, "IN_ORDER"),
    (VIRTIO_F_ORDER_PLATFORM, "ORDER_PLATFORM"),
    (VIRTIO_F_SR_IOV, "SR_IOV"),
    (VIRTIO_F_NOTIFICATION_DATA, "NOTIFICATION_DATA"),
    (VIRTIO_F_NOTIF_CONFIG_DATA, "NOTIF_CONFIG_DATA"),
    (VIRTIO_F_RING_RESET, "RING_RESET"),
];

const PROTOCOL_NAMES: &[(u32, &str)] = &[
    (PROTOCOL_MQ, "MQ"),
    (PROTOCOL_LOG_SHMFD, "LOG_SHMFD"),
    (PROTOCOL_RARP, "RARP"),
    (PROTOCOL_REPLY_ACK, "REPLY_ACK"),
    (PROTOCOL_MTU, "MTU"),
    (PROTOCOL_BACKEND_REQ, "BACKEND_REQ"),
    (PROTOCOL_CROSS_ENDIAN, "CROSS_ENDIAN"),
    (PROTOCOL_CRYPTO_SESSION, "CRYPTO_SESSION"),
    (PROTOCOL_PAGEFAULT, "PAGEFAULT"),
    (PROTOCOL_CONFIG, "CONFIG"),
    (PROTOCOL_BACKEND_SEND_FD, "BACKEND_SEND_FD"),
    (PROTOCOL_HOST_NOTIFIER, "HOST_NOTIFIER"),
    (PROTOCOL_INFLIGHT_SHMFD, "INFLIGHT_SHMFD"),
    (PROTOCOL_RESET_DEVICE, "RESET_DEVICE"),
    (PROTOCOL_INBAND_NOTIFICATIONS, "INBAND_NOTIFICATIONS"),
    (PROTOCOL_CONFIGURE_MEM_SLOTS, "CONFIGURE_MEM_SLOTS"),
    (PROTOCOL_STATUS, "STATUS"),
    (PROTOCOL_XEN_MMAP, "XEN_MMAP"),
    (PROTOCOL_SHARED_OBJECT, "SHARED_OBJECT"),
    (PROTOCOL_DEVICE_STATE, "DEVICE_STATE"),
];

/// Name of a virtio feature bit, or `None` for device-specific bits (0-23) and unknown bits.
pub fn virtio_feature_name(bit: u32) -> Option<&'static str> {
    VIRTIO_NAMES
        .iter()
        .find(|(b, _)| *b == bit)
        .map(|(_, n)| *n)
}

/// Name of a vhost-user protocol feature bit, or `None` for an unknown bit.
pub fn protocol_feature_name(bit: u32) -> Option<&'static str> {
    PROTOCOL_NAMES
        .iter()
        .find(|(b, _)| *b == bit)
        .map(|(_, n)| *n)
}

/// virtio device ID of a block device (virtio 1.2 §5): the one device type whose own feature bits
/// the trace names so far.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// virtio-blk's own feature bits (virtio 1.2 §5.2.3; bits 0, 3, 7, 8 are legacy-only or unused).
const BLK_NAMES: &[(u32, &str)] = &[
    (1, "SIZE_MAX"),
    (2, "SEG_MAX"),
    (4, "GEOMETRY"),
    (5, "RO"),
    (6, "BLK_SIZE"),
    (9, "FLUSH"),
    (10, "TOPOLOGY"),
    (11, "CONFIG_WCE"),
    (12, "MQ"),
    (13, "DISCARD"),
    (14, "WRITE_ZEROES"),
    (15, "LIFETIME"),
    (16, "SECURE_ERASE"),
    (17, "ZONED"),
];

/// Name of a device-specific feature bit of device type `device_id`, if we know it.
pub fn device_feature_name(device_id: u32, bit: u32) -> Option<&'static str> {
    let names = match device_id {
        VIRTIO_ID_BLOCK => BLK_NAMES,
        _ => return None,
    };
    names.iter().find(|(b, _)| *b == bit).map(|(_, n)| *n)
}

/// As [`describe_virtio_features`], with the device's own bits named where `device_id` is a
/// device type we know (`SEG_MAX`, `BLK_SIZE`, `FLUSH`, ... for virtio-blk).
pub fn describe_device_features(device_id: Option<u32>, features: u64) -> String {
    describe(
        features,
        &|bit| {
            virtio_feature_name(bit).or_else(|| device_id.and_then(|d| device_feature_name(d, bit)))
        },
        "dev-bit",
    )
}

fn describe(features: u64, name_of: &dyn Fn(u32) -> Option<&'static str>, unnamed: &str) -> String {
    let mut parts = Vec::new();
    for bit in 0..64u32 {
        if has(features, bit) {
            match name_of(bit) {
                Some(name) => parts.push(name.to_string()),
                None => parts.push(format!("{unnamed}{bit}")),
            }
        }
    }
    parts.join(" ")
}

/// Space-separated names of the set virtio bits; device-specific bits print as `dev-bit<N>`.
/// Example: `describe_virtio_features(1 << 32 | 1 << 30 | 1 << 6)` is `"dev-bit6 PROTOCOL_FEATURES VERSION_1"`.
pub fn describe_virtio_features(features: u64) -> String {
    describe(features, &virtio_feature_name, "dev-bit")
}

/// Space-separated names of the set protocol bits; unknown bits print as `bit<N>`.
pub fn describe_protocol_features(features: u64) -> String {
    describe(features, &protocol_feature_name, "bit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_numbers_match_the_spec() {
        assert_eq!(bit_mask(VIRTIO_F_VERSION_1), 0x1_0000_0000);
        assert_eq!(bit_mask(VHOST_USER_F_PROTOCOL_FEATURES), 0x4000_0000);
        assert_eq!(bit_mask(PROTOCOL_INFLIGHT_SHMFD), 0x1000);
        assert_eq!(bit_mask(PROTOCOL_REPLY_ACK), 0x8);
    }

    #[test]
    fn describes_qemu_storage_daemon_offer() {
        // Measured offer of qemu-storage-daemon's vhost-user-blk export (notes §4).
        let text = describe_virtio_features(0x1_7500_7e46);
        assert!(text.contains("VERSION_1"), "{text}");
        assert!(text.contains("PROTOCOL_FEATURES"), "{text}");
        assert!(text.contains("EVENT_IDX"), "{text}");
        assert!(text.starts_with("dev-bit1 dev-bit2 dev-bit6"), "{text}");
        let proto = describe_protocol_features(0x8f2b);
        assert_eq!(
            proto,
            "MQ LOG_SHMFD REPLY_ACK BACKEND_REQ PAGEFAULT CONFIG BACKEND_SEND_FD HOST_NOTIFIER CONFIGURE_MEM_SLOTS"
        );
    }

    #[test]
    fn blk_bits_are_named_for_a_block_device() {
        // qemu-storage-daemon's offer again: with the device type known, no dev-bit is left.
        let text = describe_device_features(Some(VIRTIO_ID_BLOCK), 0x1_7500_7e46);
        assert!(
            text.starts_with(
                "SIZE_MAX SEG_MAX BLK_SIZE FLUSH TOPOLOGY CONFIG_WCE MQ DISCARD WRITE_ZEROES"
            ),
            "{text}"
        );
        assert!(!text.contains("dev-bit"), "{text}");
        assert_eq!(
            describe_device_features(Some(VIRTIO_ID_BLOCK), 1 << 20),
            "dev-bit20"
        );
        assert_eq!(describe_device_features(None, 1 << 2), "dev-bit2");
        assert_eq!(
            describe_device_features(Some(1), 1 << 2),
            "dev-bit2",
            "net: not named yet"
        );
    }

    #[test]
    fn unknown_bits_are_shown_not_dropped() {
        assert_eq!(describe_protocol_features(1 << 40), "bit40");
        assert_eq!(describe_virtio_features(0), "");
        assert!(!has(u64::MAX, 64));
    }
}
