//! The block tests: `blk-write-verify` (write a pattern, read it back, check
//! every byte) and `blk-bench` (random 4 KiB reads or writes, timed).

use crate::outcome::{Failure, Outcome};
use crate::time::{self, Instant};
use crate::virtio::blk::{find_block_devices, BlkDevice, BlkError, Op, Setup, MAX_SLOTS};
use test_guest::cmdline::{Config, MmioDevice, ReadWrite};
use test_guest::pattern::{check_block, fill_block, xorshift64};

impl From<BlkError> for Failure {
    fn from(error: BlkError) -> Self {
        Failure::new(format_args!("{error}"))
    }
}

/// The device `disk=N` names (default: the first virtio-blk device) and its
/// position on the command line.
fn choose_disk(config: &Config) -> Result<(usize, MmioDevice), Failure> {
    let wanted = config.options.disk.unwrap_or(0);
    let mut seen = 0;
    let mut chosen = None;
    find_block_devices(config.devices(), |index, device| {
        if seen == wanted {
            chosen = Some((index, *device));
        }
        seen += 1;
    });
    match chosen {
        Some(found) => Ok(found),
        None if config.devices().is_empty() => {
            crate::fail!("no virtio_mmio.device= entry on the command line")
        }
        None => crate::fail!(
            "no virtio-blk device #{wanted}: {seen} found among {} virtio-mmio windows",
            config.devices().len()
        ),
    }
}

fn open_disk(test: &str, config: &Config) -> Result<BlkDevice, Failure> {
    let (index, device) = choose_disk(config)?;
    let setup = Setup {
        irq: config.options.irq,
        event_idx: !config.options.no_event_idx,
        indirect: !config.options.no_indirect,
    };
    let disk = BlkDevice::open(&device, index, setup)?;
    println!(
        "{test}: virtio-blk at {:#x} gsi={} capacity={} sectors queue_size={} features={:#x} completion={} event_idx={} indirect={}",
        disk.base(),
        device.gsi,
        disk.capacity_sectors(),
        disk.queue_size(),
        disk.features(),
        if config.options.irq { "irq" } else { "poll" },
        u8::from(disk.event_idx()),
        u8::from(disk.indirect())
    );
    Ok(disk)
}

/// Notifications both ways and the ring features that shape them.
fn print_counters(test: &str, disk: &BlkDevice) {
    println!(
        "{test}: kicks={} interrupts={} event_idx={} indirect={}",
        disk.kicks(),
        disk.interrupts(),
        u8::from(disk.event_idx()),
        u8::from(disk.indirect())
    );
}

fn queue_depth(disk: &BlkDevice, qd: u16) -> Result<usize, Failure> {
    let depth = usize::from(qd);
    if depth > disk.slots() {
        crate::fail!(
            "qd={qd} exceeds what the queue holds ({} requests)",
            disk.slots()
        );
    }
    Ok(depth)
}

/// Run requests 0..total with at most `depth` in flight. `prepare` fills slot
/// `slot` for request `i` and says what to submit; `finish` checks a request
/// once the device completed it. Each round waits for one completion, takes
/// every other one already in the used ring, then refills every free slot and
/// notifies the device (at most) once for the whole batch. `progress`: the
/// prefix of progress lines and how many completions apart they come (None:
/// silent, as the timed bench loop is), so a test that disturbs the backend
/// mid-run can see that I/O is under way.
fn pipeline(
    disk: &mut BlkDevice,
    progress: Option<(&str, u64)>,
    total: u64,
    depth: usize,
    mut prepare: impl FnMut(&mut BlkDevice, usize, u64) -> (Op, u64),
    mut finish: impl FnMut(&mut BlkDevice, usize, u64) -> Outcome,
) -> Outcome {
    let mut request_in_slot = [0u64; MAX_SLOTS];
    let mut free_slots = [0usize; MAX_SLOTS];
    for (i, slot) in free_slots.iter_mut().enumerate() {
        *slot = i;
    }
    let mut free = depth;
    let (mut submitted, mut completed) = (0, 0);
    while completed < total {
        let mut pushed = false;
        while submitted < total && free > 0 {
            free -= 1;
            let slot = free_slots[free];
            let (op, block) = prepare(disk, slot, submitted);
            disk.push(slot, op, block)?;
            request_in_slot[slot] = submitted;
            submitted += 1;
            pushed = true;
        }
        if pushed {
            disk.kick(); // one notification (at most) for the whole batch
        }
        let mut done = Some(disk.complete()?);
        while let Some(slot) = done {
            finish(disk, slot, request_in_slot[slot])?;
            free_slots[free] = slot;
            free += 1;
            completed += 1;
            if let Some((prefix, every)) = progress {
                if completed.is_multiple_of(every) && completed < total {
                    println!("{prefix} progress={completed}/{total}");
                }
            }
            done = disk.try_complete()?;
        }
    }
    Ok(())
}

pub fn write_verify(config: &Config) -> Outcome {
    const TEST: &str = "blk-write-verify";
    let options = &config.options;
    let mut disk = open_disk(TEST, config)?;
    let depth = queue_depth(&disk, options.qd)?;
    let (start, blocks, seed) = (options.start, options.blocks, options.seed);
    match start.checked_add(blocks) {
        Some(end) if end <= disk.capacity_blocks() => {}
        _ => crate::fail!(
            "blocks {start}..{start}+{blocks} do not fit the disk ({} blocks of 4096 bytes)",
            disk.capacity_blocks()
        ),
    }

    // Write: request i writes block start+i as sequence number i; pass p uses seed + p, and the
    // last pass is what must be read back.
    let mut passes = options.passes;
    for pass in 0..passes {
        let pass_seed = seed.wrapping_add(pass);
        pipeline(
            &mut disk,
            Some(("blk-write-verify: write", options.progress)),
            blocks,
            depth,
            |disk, slot, i| {
                fill_block(disk.data(slot), start + i, pass_seed, i);
                (Op::Write, start + i)
            },
            |_, _, _| Ok(()),
        )?;
        if passes > 1 {
            println!("{TEST}: pass {}/{passes} written", pass + 1);
        }
        if options.stop_on_input && pass + 1 < passes && crate::serial::input_ready() {
            println!("{TEST}: stopped by input after pass {}", pass + 1);
            passes = pass + 1;
            break;
        }
    }
    let seed = seed.wrapping_add(passes - 1);
    if disk.can_flush() {
        pipeline(
            &mut disk,
            None,
            1,
            1,
            |_, _, _| (Op::Flush, 0),
            |_, _, _| Ok(()),
        )?;
    }

    let verified = read_back(&mut disk, depth, start, blocks, seed, options.progress)?;
    println!(
        "{TEST}: blocks={blocks} start={start} seed={seed} written={blocks} verified={verified} flushed={} passes={passes}",
        disk.can_flush()
    );
    if options.irq {
        println!("{TEST}: interrupts={}", disk.interrupts());
    }
    print_counters(TEST, &disk);
    if options.reset {
        // Status 0 resets the device: the VMM stops the backend's rings (GET_VRING_BASE) and the
        // bring-up below starts them afresh. What was written must still be there.
        disk.close()?;
        let mut disk = open_disk(TEST, config)?;
        let verified = read_back(&mut disk, depth, start, blocks, seed, options.progress)?;
        println!("{TEST}: after a device reset verified={verified}");
    }
    Ok(())
}

/// Reads blocks start..start+blocks back into a poisoned buffer (so stale memory cannot pass)
/// and checks each; returns how many matched.
fn read_back(
    disk: &mut BlkDevice,
    depth: usize,
    start: u64,
    blocks: u64,
    seed: u64,
    progress_every: u64,
) -> Result<u64, Failure> {
    let mut verified = 0;
    pipeline(
        disk,
        Some(("blk-write-verify: read", progress_every)),
        blocks,
        depth,
        |disk, slot, i| {
            disk.data(slot).fill(0xa5);
            (Op::Read, start + i)
        },
        |disk, slot, i| {
            let block = start + i;
            if let Err(mismatch) = check_block(disk.data(slot), block, seed, i) {
                crate::fail!("block {block} read back wrong: {mismatch}");
            }
            verified += 1;
            Ok(())
        },
    )?;
    Ok(verified)
}

pub fn bench(config: &Config) -> Outcome {
    const TEST: &str = "blk-bench";
    let options = &config.options;
    let Some((khz, source)) = time::calibrate() else {
        crate::fail!("cannot calibrate the TSC (no PIT, no CPUID frequency)");
    };
    println!("{TEST}: tsc_khz={khz} source={}", source.name());
    let mut disk = open_disk(TEST, config)?;
    let depth = queue_depth(&disk, options.qd)?;
    let capacity = disk.capacity_blocks();
    if capacity == 0 {
        crate::fail!("the disk is smaller than one 4096-byte block");
    }
    let op = match options.rw {
        ReadWrite::RandRead => Op::Read,
        ReadWrite::RandWrite => {
            for slot in 0..depth {
                disk.data(slot).fill(0x5a);
            }
            Op::Write
        }
    };
    let mut rng = options.seed.max(1);
    let started = Instant::now();
    pipeline(
        &mut disk,
        None,
        options.reqs,
        depth,
        |_, _, _| (op, xorshift64(&mut rng) % capacity),
        |_, _, _| Ok(()),
    )?;
    let us = started.elapsed_us().max(1);
    let iops = u128::from(options.reqs) * 1_000_000 / u128::from(us);
    println!(
        "{TEST}: rw={} bs=4096 qd={depth} reqs={} us={us} iops={iops}",
        options.rw.name(),
        options.reqs
    );
    print_counters(TEST, &disk);
    if options.irq {
        println!("{TEST}: interrupts={}", disk.interrupts());
    }
    if options.idle_ms > 0 {
        // The device stays set up with nothing to do: the host watches what the backend costs
        // meanwhile (a backend that busy-polls shows here).
        println!("{TEST}: idle ms={}", options.idle_ms);
        let idle = Instant::now();
        while idle.elapsed_ms() < options.idle_ms {
            core::hint::spin_loop();
        }
    }
    Ok(())
}
