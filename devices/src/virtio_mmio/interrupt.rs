//! The InterruptStatus register, kept honest while the backend raises interrupts by itself.
//!
//! # Why this needs care
//!
//! On the data path a vhost-user backend writes its call eventfd, which KVM (irqfd) turns
//! straight into a guest interrupt: the transport never hears about it. But Linux's virtio-mmio
//! interrupt handler (`vm_interrupt`) first reads InterruptStatus, writes the same value to
//! InterruptACK, and only then looks at the queues; when it reads 0 it returns IRQ_NONE, and
//! after enough of those the kernel disables the interrupt line ("nobody cared"). So the
//! transport must report "used buffer" (bit 0) whenever the backend has published used buffers
//! the driver has not yet been told about, without the backend telling the transport.
//!
//! # The design
//!
//! The used ring itself records that: the backend publishes by advancing the used ring's `idx`
//! (in guest memory, which the transport can read). For each active queue we remember the `idx`
//! the driver has acknowledged. Bit 0 reads as set when any queue's current `idx` differs from
//! its acknowledged value.
//!
//! The acknowledged value is the `idx` *seen when the status was read*, not at ACK time: the
//! driver acknowledges what it was shown. Used buffers published between the read and the ACK
//! stay unacknowledged, so the interrupt the backend raised for them finds bit 0 set. (The
//! driver may already have consumed them, because it walks the used ring after the ACK; then
//! that later interrupt finds nothing new in the ring — one harmless, rare spurious interrupt,
//! as with any edge-triggered device. Reporting 0 for an interrupt that did carry news is the
//! failure we must avoid, and this order cannot produce it.)
//!
//! Bit 1 (configuration change) is raised by the transport itself, so it is a plain flag.

use std::sync::atomic::Ordering;

use tracing::warn;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::QueueConfig;
use super::registers::{INT_CONFIG_CHANGE, INT_USED_BUFFER};

/// What the transport knows about one active queue's used ring.
#[derive(Debug)]
struct UsedRingWatch {
    queue_index: u16,
    /// Guest physical address of `used->idx`.
    idx_addr: GuestAddress,
    /// The `idx` the driver has acknowledged (InterruptACK with bit 0).
    acknowledged: u16,
    /// The `idx` shown at the last InterruptStatus read: what the next ACK acknowledges.
    shown: Option<u16>,
}

/// State behind the InterruptStatus / InterruptACK registers.
#[derive(Debug, Default)]
pub(super) struct InterruptStatus {
    config_changed: bool,
    used_rings: Vec<UsedRingWatch>,
}

impl InterruptStatus {
    /// Starts watching the used rings of the ready queues (at DRIVER_OK). What is already in a
    /// ring at that moment counts as acknowledged: on a fresh start the ring is empty.
    pub(super) fn watch_queues(&mut self, queues: &[QueueConfig], memory: &GuestMemoryMmap) {
        self.used_rings = queues
            .iter()
            .filter(|queue| queue.ready)
            .filter_map(|queue| {
                let idx_addr = GuestAddress(queue.used_idx_addr()?);
                let acknowledged = read_used_idx(memory, queue.index, idx_addr).unwrap_or(0);
                Some(UsedRingWatch {
                    queue_index: queue.index,
                    idx_addr,
                    acknowledged,
                    shown: None,
                })
            })
            .collect();
    }

    /// The value of InterruptStatus; remembers what it showed for the next ACK.
    pub(super) fn read(&mut self, memory: &GuestMemoryMmap) -> u32 {
        let mut status = 0;
        for ring in &mut self.used_rings {
            // An unreadable ring shows nothing new (the address was checked at activation,
            // so this only happens if guest memory changed under us).
            let current =
                read_used_idx(memory, ring.queue_index, ring.idx_addr).unwrap_or(ring.acknowledged);
            ring.shown = Some(current);
            if current != ring.acknowledged {
                status |= INT_USED_BUFFER;
            }
        }
        if self.config_changed {
            status |= INT_CONFIG_CHANGE;
        }
        status
    }

    /// InterruptACK: the driver handled the bits in `acknowledged_bits`.
    pub(super) fn acknowledge(&mut self, acknowledged_bits: u32, memory: &GuestMemoryMmap) {
        if acknowledged_bits & INT_USED_BUFFER != 0 {
            for ring in &mut self.used_rings {
                // A driver that ACKs without reading the status first acknowledges what is
                // in the ring now.
                let shown = match ring.shown.take() {
                    Some(shown) => Some(shown),
                    None => read_used_idx(memory, ring.queue_index, ring.idx_addr),
                };
                if let Some(shown) = shown {
                    ring.acknowledged = shown;
                }
            }
        }
        if acknowledged_bits & INT_CONFIG_CHANGE != 0 {
            self.config_changed = false;
        }
    }

    /// Sets bit 1; the caller raises the interrupt.
    pub(super) fn raise_config_change(&mut self) {
        self.config_changed = true;
    }

    /// Device reset: no queue is active, nothing is pending.
    pub(super) fn reset(&mut self) {
        *self = Self::default();
    }
}

fn read_used_idx(
    memory: &GuestMemoryMmap,
    queue_index: u16,
    idx_addr: GuestAddress,
) -> Option<u16> {
    // Acquire pairs with the backend's release of used->idx after it wrote the used elements.
    match memory.load::<u16>(idx_addr, Ordering::Acquire) {
        Ok(raw) => Some(u16::from_le(raw)),
        Err(err) => {
            warn!(queue = queue_index, addr = idx_addr.0, %err, "cannot read used->idx");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USED_RING: u64 = 0x3000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("anonymous memory")
    }

    fn publish_used(memory: &GuestMemoryMmap, idx: u16) {
        memory
            .write_obj(idx.to_le(), GuestAddress(USED_RING + 2))
            .expect("used->idx is in memory");
    }

    fn watching_one_queue(memory: &GuestMemoryMmap) -> InterruptStatus {
        let mut status = InterruptStatus::default();
        let queue = QueueConfig {
            index: 0,
            size: 16,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: USED_RING,
            ready: true,
        };
        status.watch_queues(&[queue], memory);
        status
    }

    #[test]
    fn used_buffer_bit_follows_the_used_ring() {
        let memory = memory();
        let mut status = watching_one_queue(&memory);
        assert_eq!(status.read(&memory), 0, "empty ring: nothing to report");

        // The backend publishes two buffers and signals the irqfd: the transport never hears.
        publish_used(&memory, 2);
        let shown = status.read(&memory);
        assert_eq!(shown, INT_USED_BUFFER);
        status.acknowledge(shown, &memory);
        assert_eq!(status.read(&memory), 0, "acknowledged");
    }

    #[test]
    fn buffers_published_between_read_and_ack_stay_pending() {
        let memory = memory();
        let mut status = watching_one_queue(&memory);
        publish_used(&memory, 1);
        let shown = status.read(&memory);
        assert_eq!(shown, INT_USED_BUFFER);
        // The backend publishes again before the driver's ACK; its interrupt is in flight.
        publish_used(&memory, 2);
        status.acknowledge(shown, &memory);
        assert_eq!(
            status.read(&memory),
            INT_USED_BUFFER,
            "the second interrupt must not read 0"
        );
    }

    #[test]
    fn used_idx_wraps_around() {
        let memory = memory();
        publish_used(&memory, u16::MAX);
        let mut status = watching_one_queue(&memory);
        assert_eq!(status.read(&memory), 0);
        publish_used(&memory, 0);
        assert_eq!(status.read(&memory), INT_USED_BUFFER);
    }

    #[test]
    fn config_change_bit_is_kept_until_acknowledged() {
        let memory = memory();
        let mut status = watching_one_queue(&memory);
        status.raise_config_change();
        assert_eq!(status.read(&memory), INT_CONFIG_CHANGE);
        status.acknowledge(INT_USED_BUFFER, &memory);
        assert_eq!(status.read(&memory), INT_CONFIG_CHANGE, "ACK of bit 0 only");
        status.acknowledge(INT_CONFIG_CHANGE, &memory);
        assert_eq!(status.read(&memory), 0);
    }

    #[test]
    fn reset_forgets_everything() {
        let memory = memory();
        let mut status = watching_one_queue(&memory);
        status.raise_config_change();
        publish_used(&memory, 3);
        status.reset();
        assert_eq!(status.read(&memory), 0);
    }
}
