//! VIRTIO_F_EVENT_IDX suppression arithmetic (virtio 1.x §2.7.7, §2.7.10).
//!
//! With EVENT_IDX each side publishes the ring index at which it next wants to hear from the
//! other: the driver's `used_event` (after the available ring entries) and the device's
//! `avail_event` (after the used ring elements). The other side notifies only when its index
//! crosses that value.

/// Whether moving a ring index from `old` to `new` passes `event`, i.e. whether the entry at
/// index `event` is among those published in (old, new]: `old <= event < new` in the 16-bit
/// ring arithmetic (Linux's `vring_need_event`). `new == old` (nothing published) never needs
/// an event.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn without_wrap() {
        // Published entries 10..20 (old 10, new 20).
        assert!(need_event(10, 20, 10), "event == old");
        assert!(need_event(15, 20, 10));
        assert!(need_event(19, 20, 10), "event == new - 1");
        assert!(!need_event(20, 20, 10), "event == new is not yet reached");
        assert!(
            !need_event(9, 20, 10),
            "event before old was passed earlier"
        );
        assert!(!need_event(1000, 20, 10));
    }

    #[test]
    fn nothing_published_never_notifies() {
        for event in [0, 1, 9, 10, 11, 65535] {
            assert!(!need_event(event, 10, 10), "event {event}");
        }
        assert!(!need_event(65535, 65535, 65535));
        assert!(!need_event(0, 0, 0));
    }

    #[test]
    fn one_entry() {
        assert!(need_event(5, 6, 5));
        assert!(!need_event(6, 6, 5));
        assert!(!need_event(4, 6, 5));
        assert!(
            need_event(65535, 0, 65535),
            "the entry at 65535, new wrapped to 0"
        );
    }

    #[test]
    fn across_the_wrap() {
        // old near the top, new past zero: entries 65530..=65535 and 0..=3 published.
        let (old, new) = (65530u16, 4u16);
        assert!(need_event(65530, new, old), "event == old");
        assert!(need_event(65533, new, old), "event before the wrap");
        assert!(need_event(65535, new, old));
        assert!(need_event(0, new, old), "event just after the wrap");
        assert!(need_event(3, new, old), "event == new - 1 after the wrap");
        assert!(!need_event(4, new, old), "event == new");
        assert!(!need_event(5, new, old), "event after new");
        assert!(!need_event(65529, new, old), "event just before old");
        assert!(!need_event(30000, new, old));
    }

    #[test]
    fn event_behind_the_consumer_stays_quiet() {
        // A driver that polls keeps used_event at last_used - 1: whatever the device adds
        // from last_used on never crosses it.
        for last_used in [0u16, 1, 100, 65534, 65535] {
            let event = last_used.wrapping_sub(1);
            for added in 1..=256u16 {
                assert!(
                    !need_event(event, last_used.wrapping_add(added), last_used),
                    "last_used {last_used} added {added}"
                );
            }
        }
    }

    #[test]
    fn event_at_the_consumer_fires_on_the_next_entry() {
        // An interrupt-driven driver sets used_event = last_used: the next entry signals.
        for last_used in [0u16, 65535, 12345] {
            assert!(need_event(last_used, last_used.wrapping_add(1), last_used));
            assert!(need_event(last_used, last_used.wrapping_add(7), last_used));
        }
    }

    #[test]
    fn full_range_agrees_with_a_plain_definition() {
        // Brute force against "event is one of old, old+1, ..., new-1".
        for &old in &[0u16, 1, 200, 32767, 65280, 65535] {
            for span in [0u16, 1, 2, 255, 256, 1000] {
                let new = old.wrapping_add(span);
                for delta in 0..=1100u16 {
                    let event = old.wrapping_add(delta).wrapping_sub(50);
                    let passed = (0..span).any(|k| old.wrapping_add(k) == event);
                    assert_eq!(
                        need_event(event, new, old),
                        passed,
                        "event {event} new {new} old {old}"
                    );
                }
            }
        }
    }
}
