use std::sync::{Arc, Mutex};

use vm_memory::Bytes;

use super::*;
use crate::virtio_mmio::device::DeviceError;
use crate::virtio_mmio::registers::{INT_CONFIG_CHANGE, INT_USED_BUFFER};

const BLK_DEVICE_ID: u32 = 2;
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const OFFERED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX;
const MEMORY_SIZE: usize = 0x10_0000;

/// What the fake device was asked to do, shared with the test after the device is boxed.
#[derive(Default)]
struct Record {
    activations: Vec<(u64, Vec<QueueConfig>, usize)>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    fail_activation: bool,
    /// Where a backend that serves a request the moment it starts would publish used->idx = 1.
    complete_on_activation: Option<(GuestMemoryMmap, GuestAddress)>,
}

struct FakeDevice {
    record: Arc<Mutex<Record>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        BLK_DEVICE_ID
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256, 128]
    }
    fn device_features(&self) -> u64 {
        OFFERED
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config byte i reads as 0x10 + i.
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = 0x10 + offset as u8 + i as u8;
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.record
            .lock()
            .unwrap()
            .config_writes
            .push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
        queue_kicks: &[EventFd],
        _call: &EventFd,
    ) -> Result<(), DeviceError> {
        let mut record = self.record.lock().unwrap();
        record
            .activations
            .push((acked_features, queues.to_vec(), queue_kicks.len()));
        if record.fail_activation {
            return Err(DeviceError::NoQueueReady);
        }
        if let Some((memory, used_idx)) = &record.complete_on_activation {
            memory.write_obj(1u16.to_le(), *used_idx).unwrap();
        }
        Ok(())
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.record.lock().unwrap().resets += 1;
        Ok(())
    }
}

fn transport() -> (MmioTransport, Arc<Mutex<Record>>) {
    let record = Arc::new(Mutex::new(Record::default()));
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap();
    let device = Box::new(FakeDevice {
        record: record.clone(),
    });
    (MmioTransport::new(device, memory).unwrap(), record)
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0xffu8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn write_driver_features(t: &mut MmioTransport, features: u64) {
    write32(t, reg::DRIVER_FEATURES_SEL, 0);
    write32(t, reg::DRIVER_FEATURES, features as u32);
    write32(t, reg::DRIVER_FEATURES_SEL, 1);
    write32(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
}

/// Status written the way Linux does: read, OR in one bit, write back.
fn add_status(t: &mut MmioTransport, bit: u32) {
    let current = read32(t, reg::STATUS);
    write32(t, reg::STATUS, current | bit);
}

fn negotiate(t: &mut MmioTransport, features: u64) {
    add_status(t, status::ACKNOWLEDGE);
    add_status(t, status::DRIVER);
    write_driver_features(t, features);
    add_status(t, status::FEATURES_OK);
}

/// Queue `index` at 0x1000 * (index + 1) * 16 onwards: desc, avail, used 4 KiB apart.
fn queue_base(index: u32) -> u64 {
    0x1_0000 * (u64::from(index) + 1)
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32) {
    let base = queue_base(index);
    write32(t, reg::QUEUE_SEL, index);
    write32(t, reg::QUEUE_NUM, size);
    write32(t, reg::QUEUE_DESC_LOW, base as u32);
    write32(t, reg::QUEUE_DESC_HIGH, 0);
    write32(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    write32(t, reg::QUEUE_DRIVER_HIGH, 0);
    write32(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    write32(t, reg::QUEUE_DEVICE_HIGH, 0);
    write32(t, reg::QUEUE_READY, 1);
}

fn bring_up(t: &mut MmioTransport) {
    negotiate(t, OFFERED);
    setup_queue(t, 0, 128);
    add_status(t, status::DRIVER_OK);
}

#[test]
fn identity_registers() {
    let (mut t, _) = transport();
    assert_eq!(read32(&mut t, reg::MAGIC_VALUE_OFFSET), 0x7472_6976);
    assert_eq!(read32(&mut t, reg::VERSION), 2);
    assert_eq!(read32(&mut t, reg::DEVICE_ID), BLK_DEVICE_ID);
    assert_eq!(read32(&mut t, reg::VENDOR_ID_OFFSET), reg::VENDOR_ID);
    assert_eq!(t.queue_kick_fds().len(), 2);
}

#[test]
fn device_features_are_read_in_two_halves() {
    let (mut t, _) = transport();
    write32(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(
        read32(&mut t, reg::DEVICE_FEATURES),
        VIRTIO_BLK_F_SEG_MAX as u32
    );
    write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(
        read32(&mut t, reg::DEVICE_FEATURES),
        1,
        "bit 32 = VERSION_1"
    );
    write32(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(read32(&mut t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn features_ok_sticks_only_for_acceptable_features() {
    let (mut t, _) = transport();
    negotiate(&mut t, VIRTIO_BLK_F_SEG_MAX);
    assert_eq!(
        read32(&mut t, reg::STATUS) & status::FEATURES_OK,
        0,
        "legacy driver refused"
    );

    let (mut t, _) = transport();
    negotiate(&mut t, OFFERED | (1 << 5));
    assert_eq!(
        read32(&mut t, reg::STATUS) & status::FEATURES_OK,
        0,
        "unoffered bit refused"
    );

    let (mut t, record) = transport();
    negotiate(&mut t, OFFERED);
    assert_ne!(read32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    // Features are frozen once FEATURES_OK is set.
    write_driver_features(&mut t, VIRTIO_F_VERSION_1);
    add_status(&mut t, status::DRIVER_OK);
    assert_eq!(record.lock().unwrap().activations[0].0, OFFERED);
}

#[test]
fn status_bits_out_of_order_are_ignored() {
    let (mut t, record) = transport();
    write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
    assert_eq!(read32(&mut t, reg::STATUS), 0);
    write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(
        read32(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    // DRIVER_OK before FEATURES_OK: ignored, nothing activated.
    add_status(&mut t, status::DRIVER_OK);
    assert_eq!(
        read32(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    // Clearing a bit without a reset: ignored.
    write32(&mut t, reg::STATUS, status::ACKNOWLEDGE);
    assert_eq!(
        read32(&mut t, reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER
    );
    assert!(record.lock().unwrap().activations.is_empty());
}

#[test]
fn driver_ok_activates_with_the_queues_the_driver_wrote() {
    let (mut t, record) = transport();
    negotiate(&mut t, OFFERED);
    write32(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 256);
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
    setup_queue(&mut t, 0, 128);
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 1);
    write32(&mut t, reg::QUEUE_SEL, 2);
    assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 0, "no queue 2");
    add_status(&mut t, status::DRIVER_OK);

    let record = record.lock().unwrap();
    assert_eq!(record.activations.len(), 1);
    let (features, queues, kicks) = &record.activations[0];
    assert_eq!(*features, OFFERED);
    assert_eq!(*kicks, 2);
    assert_eq!(
        queues[0],
        QueueConfig {
            index: 0,
            size: 128,
            desc_table: 0x1_0000,
            avail_ring: 0x1_1000,
            used_ring: 0x1_2000,
            ready: true,
        }
    );
    assert_eq!(queues[1].index, 1);
    assert!(!queues[1].ready, "queue 1 was never set up");
    assert_eq!(
        t.status(),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
    );
}

#[test]
fn high_address_halves_are_kept() {
    let (mut t, _) = transport();
    write32(&mut t, reg::QUEUE_SEL, 1);
    write32(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
    write32(&mut t, reg::QUEUE_DESC_HIGH, 0x2);
    assert_eq!(t.queues[1].desc_table, 0x2_0000_1000);
    // ... and such a queue (outside guest memory) is refused.
    write32(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
}

#[test]
fn bad_queues_are_refused() {
    for (size, misalign) in [(0u32, 0u64), (100, 0), (512, 0), (128, 8)] {
        let (mut t, _) = transport();
        negotiate(&mut t, OFFERED);
        write32(&mut t, reg::QUEUE_SEL, 0);
        write32(&mut t, reg::QUEUE_NUM, size);
        write32(&mut t, reg::QUEUE_DESC_LOW, 0x1_0000 + misalign as u32);
        write32(&mut t, reg::QUEUE_DRIVER_LOW, 0x1_1000);
        write32(&mut t, reg::QUEUE_DEVICE_LOW, 0x1_2000);
        write32(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(
            read32(&mut t, reg::QUEUE_READY),
            0,
            "size {size} misalign {misalign}"
        );
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }
    // The used ring must fit entirely: a ring ending past the end of memory is refused.
    let (mut t, _) = transport();
    write32(&mut t, reg::QUEUE_SEL, 0);
    write32(&mut t, reg::QUEUE_NUM, 256);
    write32(&mut t, reg::QUEUE_DESC_LOW, 0x1_0000);
    write32(&mut t, reg::QUEUE_DRIVER_LOW, 0x1_1000);
    write32(&mut t, reg::QUEUE_DEVICE_LOW, (MEMORY_SIZE - 0x100) as u32);
    write32(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
}

#[test]
fn a_queue_can_be_unreadied_before_driver_ok_only() {
    let (mut t, _) = transport();
    negotiate(&mut t, OFFERED);
    setup_queue(&mut t, 0, 128);
    write32(&mut t, reg::QUEUE_READY, 0);
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
    write32(&mut t, reg::QUEUE_NUM, 64);
    assert_eq!(t.queues[0].size, 64, "not ready: setup may change again");
    write32(&mut t, reg::QUEUE_READY, 1);
    add_status(&mut t, status::DRIVER_OK);
    write32(&mut t, reg::QUEUE_READY, 0);
    assert_eq!(
        read32(&mut t, reg::QUEUE_READY),
        1,
        "live queue stays ready"
    );
}

#[test]
fn driver_ok_after_a_refused_queue_does_not_activate() {
    let (mut t, record) = transport();
    negotiate(&mut t, OFFERED);
    setup_queue(&mut t, 0, 100); // not a power of two: refused
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    add_status(&mut t, status::DRIVER_OK);
    assert!(record.lock().unwrap().activations.is_empty());
    write32(&mut t, reg::STATUS, 0);
    assert_eq!(record.lock().unwrap().resets, 0, "never activated");
    bring_up(&mut t);
    assert_eq!(
        record.lock().unwrap().activations.len(),
        1,
        "a reset clears the error"
    );
}

#[test]
fn live_queue_registers_cannot_change() {
    let (mut t, record) = transport();
    bring_up(&mut t);
    write32(&mut t, reg::QUEUE_SEL, 0);
    write32(&mut t, reg::QUEUE_DESC_LOW, 0x4_0000);
    write32(&mut t, reg::QUEUE_NUM, 16);
    assert_eq!(t.queues[0].desc_table, 0x1_0000);
    assert_eq!(t.queues[0].size, 128);
    assert_eq!(record.lock().unwrap().activations.len(), 1);
}

#[test]
fn failed_activation_asks_for_reset_and_interrupts() {
    let (mut t, record) = transport();
    record.lock().unwrap().fail_activation = true;
    bring_up(&mut t);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(
        t.call_fd().read().unwrap(),
        1,
        "config change interrupt raised"
    );
    assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), INT_CONFIG_CHANGE);
    assert_eq!(read32(&mut t, reg::CONFIG_GENERATION), 1);
    // The driver may write NEEDS_RESET back; it must not be able to clear it except by reset.
    let current = read32(&mut t, reg::STATUS);
    write32(&mut t, reg::STATUS, current | status::FAILED);
    assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    write32(&mut t, reg::STATUS, 0);
    assert_eq!(t.status(), 0);
    assert_eq!(
        record.lock().unwrap().resets,
        1,
        "reset lets the device undo a partial start"
    );
}

#[test]
fn reset_clears_the_register_file_and_resets_the_device() {
    let (mut t, record) = transport();
    write32(&mut t, reg::STATUS, 0);
    assert_eq!(
        record.lock().unwrap().resets,
        0,
        "never activated: nothing to undo"
    );

    bring_up(&mut t);
    write32(&mut t, reg::STATUS, 0);
    assert_eq!(record.lock().unwrap().resets, 1);
    assert_eq!(t.status(), 0);
    write32(&mut t, reg::QUEUE_SEL, 0);
    assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
    assert_eq!(t.queues[0].size, 256);
    assert_eq!(t.driver_features, 0);

    // A second life: negotiate and activate again.
    bring_up(&mut t);
    assert_eq!(record.lock().unwrap().activations.len(), 2);
}

#[test]
fn interrupt_status_reports_used_buffers_the_backend_published() {
    let (mut t, _) = transport();
    bring_up(&mut t);
    assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 0);
    // The backend writes used->idx = 1 behind the transport's back, then signals the irqfd.
    let used_idx = GuestAddress(queue_base(0) + 0x2000 + 2);
    t.memory.write_obj(1u16.to_le(), used_idx).unwrap();
    let shown = read32(&mut t, reg::INTERRUPT_STATUS);
    assert_eq!(shown, INT_USED_BUFFER);
    write32(&mut t, reg::INTERRUPT_ACK, shown);
    assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn a_buffer_used_during_activation_is_news() {
    let (mut t, record) = transport();
    let used_idx = GuestAddress(queue_base(0) + 0x2000 + 2);
    record.lock().unwrap().complete_on_activation = Some((t.memory.clone(), used_idx));
    bring_up(&mut t);
    assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), INT_USED_BUFFER);
}

#[test]
fn interrupt_status_after_reset_is_quiet() {
    let (mut t, _) = transport();
    bring_up(&mut t);
    let used_idx = GuestAddress(queue_base(0) + 0x2000 + 2);
    t.memory.write_obj(5u16.to_le(), used_idx).unwrap();
    write32(&mut t, reg::STATUS, 0);
    assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn config_change_interrupt() {
    let (mut t, _) = transport();
    bring_up(&mut t);
    t.notify_config_change().unwrap();
    assert_eq!(t.call_fd().read().unwrap(), 1);
    assert_eq!(read32(&mut t, reg::CONFIG_GENERATION), 1);
    let shown = read32(&mut t, reg::INTERRUPT_STATUS);
    assert_eq!(shown, INT_CONFIG_CHANGE);
    write32(&mut t, reg::INTERRUPT_ACK, shown);
    assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn queue_notify_that_reaches_the_transport_kicks_the_queue() {
    let (mut t, _) = transport();
    bring_up(&mut t);
    write32(&mut t, reg::QUEUE_NOTIFY, 1);
    assert_eq!(t.queue_kick_fds()[1].read().unwrap(), 1);
    assert!(
        t.queue_kick_fds()[0].read().is_err(),
        "queue 0 was not kicked (EAGAIN)"
    );
    write32(&mut t, reg::QUEUE_NOTIFY, 7); // no such queue: ignored
}

#[test]
fn register_accesses_must_be_32_bit_aligned() {
    let (mut t, _) = transport();
    let mut half = [0xffu8; 2];
    t.read(reg::MAGIC_VALUE_OFFSET, &mut half);
    assert_eq!(half, [0, 0]);
    let mut word = [0xffu8; 4];
    t.read(reg::MAGIC_VALUE_OFFSET + 1, &mut word);
    assert_eq!(word, [0; 4]);
    t.write(reg::STATUS, &[1u8]);
    assert_eq!(t.status(), 0, "byte write to Status ignored");
    let mut wide = [0xffu8; 8];
    t.read(reg::MAGIC_VALUE_OFFSET, &mut wide);
    assert_eq!(wide, [0; 8]);
}

#[test]
fn unknown_and_write_only_registers_read_zero() {
    let (mut t, _) = transport();
    for offset in [
        0x018,
        0x03c,
        reg::QUEUE_NUM,
        reg::QUEUE_NOTIFY,
        reg::QUEUE_DESC_LOW,
        0x0f8,
    ] {
        assert_eq!(read32(&mut t, offset), 0, "offset {offset:#x}");
    }
    write32(&mut t, 0x018, 0xdead); // ignored, no panic
    write32(&mut t, reg::MAGIC_VALUE_OFFSET, 0);
    assert_eq!(read32(&mut t, reg::MAGIC_VALUE_OFFSET), reg::MAGIC_VALUE);
}

#[test]
fn missing_shared_memory_regions_read_length_minus_one() {
    let (mut t, _) = transport();
    for id in [0, 1, 0xff] {
        write32(&mut t, reg::SHM_SEL, id);
        let len = u64::from(read32(&mut t, reg::SHM_LEN_LOW))
            | (u64::from(read32(&mut t, reg::SHM_LEN_HIGH)) << 32);
        // Linux's vm_get_shm_region: only a length of -1 means "no such region".
        assert_eq!(len, u64::MAX, "region {id}");
    }
}

#[test]
fn config_space_any_width() {
    let (mut t, record) = transport();
    let mut byte = [0u8; 1];
    t.read(reg::CONFIG_SPACE + 3, &mut byte);
    assert_eq!(byte, [0x13]);
    let mut quad = [0u8; 8];
    t.read(reg::CONFIG_SPACE, &mut quad);
    assert_eq!(quad, [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
    t.write(reg::CONFIG_SPACE + 4, &[0xaa, 0xbb]);
    assert_eq!(
        record.lock().unwrap().config_writes,
        vec![(4, vec![0xaa, 0xbb])]
    );
    // Past the window, or an odd width: zeros, nothing forwarded.
    let mut past = [0xffu8; 4];
    t.read(reg::MMIO_WINDOW_SIZE - 2, &mut past);
    assert_eq!(past, [0; 4]);
    let mut odd = [0xffu8; 3];
    t.read(reg::CONFIG_SPACE, &mut odd);
    assert_eq!(odd, [0; 3]);
    t.write(u64::MAX - 1, &[1, 2]);
    assert_eq!(record.lock().unwrap().config_writes.len(), 1);
}

#[test]
fn a_device_without_version_1_is_refused() {
    struct Legacy;
    impl VirtioDevice for Legacy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![128]
        }
        fn device_features(&self) -> u64 {
            VIRTIO_BLK_F_SEG_MAX
        }
        fn read_config(&self, _: u64, _: &mut [u8]) {}
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: u64,
            _: &[QueueConfig],
            _: &[EventFd],
            _: &EventFd,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) -> Result<(), DeviceError> {
            Ok(())
        }
    }
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    assert!(matches!(
        MmioTransport::new(Box::new(Legacy), memory),
        Err(TransportError::NotModern)
    ));
}
