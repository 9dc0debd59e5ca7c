//! Arbitrary bytes as a shared inflight region (what a hostile or crashing peer leaves in the
//! GET/SET_INFLIGHT_FD memfd), with arbitrary and with small fitting geometries, through both
//! layouts and every accessor.
//!
//! Properties checked:
//! - no panic, no out-of-bounds access (ASan), no unbounded loop (libFuzzer's -timeout);
//! - a region is accepted only when the bytes cover `region_size`, which is `None` exactly outside
//!   our limits; a queue view exists only for an index below num_queues;
//! - whatever the bytes say: `desc_num <= queue_size`, `entries()` yields exactly desc_num entries
//!   in index order, the counter order is sorted (counter, then desc) with unique descs and at most
//!   desc_num long, a last batch is at most desc_num long and stays inside the entries.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vhost_frontend::wire::inflight::{region_size, PackedQueue, SplitQueue};
use vhost_frontend::wire::{
    InflightError, InflightLayout, InflightRegion, PackedInflightRegion, MAX_QUEUES, MAX_QUEUE_SIZE,
};

fuzz_target!(|data: &[u8]| {
    let Some((params, bytes)) = data.split_first_chunk::<6>() else {
        return;
    };
    let raw_queues = u16::from_le_bytes([params[0], params[1]]);
    let raw_size = u16::from_le_bytes([params[2], params[3]]);
    let ring_used_idx = u16::from_le_bytes([params[4], params[5]]);
    // The raw geometry mostly exercises the refusals; a small one derived from it fits the input.
    let small_queues = raw_queues % 4 + 1;
    let small_size = raw_size % 64 + 1;
    for (num_queues, queue_size) in [(raw_queues, raw_size), (small_queues, small_size)] {
        check_split(bytes, num_queues, queue_size, ring_used_idx);
        check_packed(bytes, num_queues, queue_size);
    }
});

fn expect_acceptance<T>(
    result: &Result<T, InflightError>,
    bytes: &[u8],
    num_queues: u16,
    queue_size: u16,
    layout: InflightLayout,
) {
    let in_limits =
        (1..=MAX_QUEUES).contains(&num_queues) && (1..=MAX_QUEUE_SIZE).contains(&queue_size);
    let needed = region_size(num_queues, queue_size, layout);
    assert_eq!(needed.is_some(), in_limits);
    let fits = needed.is_some_and(|needed| bytes.len() as u64 >= needed);
    assert_eq!(result.is_ok(), fits, "{layout} {num_queues}x{queue_size}");
}

fn check_split(bytes: &[u8], num_queues: u16, queue_size: u16, ring_used_idx: u16) {
    let region = InflightRegion::new(bytes, num_queues, queue_size);
    expect_acceptance(
        &region,
        bytes,
        num_queues,
        queue_size,
        InflightLayout::Split,
    );
    let Ok(region) = region else {
        return;
    };
    assert!(region.queue(num_queues).is_err());
    for queue in region.queues().filter_map(Result::ok) {
        check_split_queue(&queue, queue_size, ring_used_idx);
    }
}

fn check_split_queue(queue: &SplitQueue<'_>, queue_size: u16, ring_used_idx: u16) {
    let header = queue.header();
    assert!(header.desc_num <= queue_size);
    let mut count = 0u16;
    for (i, entry) in queue.entries().enumerate() {
        assert_eq!(usize::from(entry.desc), i);
        count += 1;
    }
    assert_eq!(count, header.desc_num);
    assert!(queue.entry(header.desc_num).is_none());
    check_counter_order(&queue.inflight_descs_in_counter_order(), header.desc_num);
    assert!(queue.inflight_count() <= usize::from(header.desc_num));
    for used in [
        ring_used_idx,
        header.used_idx,
        header.used_idx.wrapping_add(1),
    ] {
        if let Ok(batch) = queue.last_batch(used) {
            assert!(batch.len() <= usize::from(header.desc_num));
            assert!(batch.iter().all(|&desc| desc < header.desc_num));
        }
    }
    assert!(queue
        .describe()
        .contains(&format!("desc_num {}", header.desc_num)));
}

fn check_packed(bytes: &[u8], num_queues: u16, queue_size: u16) {
    let region = PackedInflightRegion::new(bytes, num_queues, queue_size);
    expect_acceptance(
        &region,
        bytes,
        num_queues,
        queue_size,
        InflightLayout::Packed,
    );
    let Ok(region) = region else {
        return;
    };
    assert!(region.queue(num_queues).is_err());
    for queue in region.queues().filter_map(Result::ok) {
        check_packed_queue(&queue, queue_size);
    }
}

fn check_packed_queue(queue: &PackedQueue<'_>, queue_size: u16) {
    let header = queue.header();
    assert!(header.desc_num <= queue_size);
    assert!(header.used_idx < queue_size && header.old_used_idx < queue_size);
    assert!(header.free_head <= queue_size && header.old_free_head <= queue_size);
    assert!(header.used_wrap_counter <= 1 && header.old_used_wrap_counter <= 1);
    let mut count = 0u16;
    for (i, entry) in queue.entries().enumerate() {
        assert_eq!(usize::from(entry.desc), i);
        count += 1;
    }
    assert_eq!(count, header.desc_num);
    check_counter_order(&queue.inflight_descs_in_counter_order(), header.desc_num);
    let _ = queue.describe();
}

fn check_counter_order(order: &[(u16, u64)], desc_num: u16) {
    assert!(order.len() <= usize::from(desc_num));
    assert!(order.iter().all(|&(desc, _)| desc < desc_num));
    // Strictly increasing by (counter, desc): sorted, ties broken by index, no desc twice.
    assert!(order
        .windows(2)
        .all(|pair| (pair[0].1, pair[0].0) < (pair[1].1, pair[1].0)));
}
