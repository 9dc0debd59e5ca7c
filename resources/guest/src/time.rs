//! Time from the TSC (readable natively in ring 3), calibrated once.
//!
//! The reference is the PIT (8254) channel 0, read back by latching its
//! count: program a free-running countdown at 1.193182 MHz and count TSC ticks
//! over 50 ms of PIT time, sampling often enough to follow the 16-bit
//! wrap-around. No interrupt is involved (IRQ 0 stays masked). Channel 2 via
//! port 0x61 is the classic alternative, but QEMU's KVM PIT leaves port 0x61 to
//! a speaker device that QEMU's microvm does not have. Where no PIT answers,
//! the TSC frequency comes from CPUID (the hypervisor timing leaf 0x40000010,
//! then leaves 0x15 and 0x16).

use crate::cpu::{cpuid, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

const PIT_HZ: u64 = 1_193_182;
const CALIBRATION_MS: u64 = 50;
const PIT_CHANNEL0: u16 = 0x40;
const PIT_CONTROL: u16 = 0x43;
/// Channel 0, lobyte/hibyte access, mode 2 (rate generator), binary.
const PIT_CH0_RATE_GENERATOR: u8 = 0b0011_0100;
/// Counter latch command for channel 0.
const PIT_CH0_LATCH: u8 = 0b0000_0000;
/// A PIT whose count does not move over this many reads is not there.
const PIT_STUCK_READS: u32 = 10_000;

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Pit,
    HypervisorLeaf,
    CpuidCrystal,
    CpuidBaseFrequency,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Pit => "pit",
            Source::HypervisorLeaf => "cpuid-0x40000010",
            Source::CpuidCrystal => "cpuid-0x15",
            Source::CpuidBaseFrequency => "cpuid-0x16",
        }
    }
}

fn pit_count() -> u16 {
    outb(PIT_CONTROL, PIT_CH0_LATCH);
    let low = inb(PIT_CHANNEL0);
    let high = inb(PIT_CHANNEL0);
    u16::from_le_bytes([low, high])
}

fn from_pit() -> Option<u64> {
    outb(PIT_CONTROL, PIT_CH0_RATE_GENERATOR);
    outb(PIT_CHANNEL0, 0); // reload value 0 means 65536
    outb(PIT_CHANNEL0, 0);
    let target = PIT_HZ * CALIBRATION_MS / 1000;
    let mut previous = pit_count();
    let start = rdtsc();
    let mut end = start;
    let mut elapsed: u64 = 0;
    let mut unchanged = 0;
    while elapsed < target {
        let count = pit_count();
        end = rdtsc();
        if count == previous {
            unchanged += 1;
            if unchanged == PIT_STUCK_READS {
                return None;
            }
            continue;
        }
        unchanged = 0;
        // The count runs down and wraps from 1 to 65536 (read as 0).
        elapsed += u64::from(previous.wrapping_sub(count));
        previous = count;
    }
    let khz = u128::from(end - start) * u128::from(PIT_HZ) / u128::from(elapsed) / 1000;
    // A "PIT" implying a TSC below 100 MHz is not a working one.
    (khz > 100_000).then_some(khz as u64)
}

fn from_cpuid() -> Option<(u64, Source)> {
    let hypervisor = cpuid(0x4000_0000, 0);
    if hypervisor.eax >= 0x4000_0010 {
        let khz = u64::from(cpuid(0x4000_0010, 0).eax);
        if khz != 0 {
            return Some((khz, Source::HypervisorLeaf));
        }
    }
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf >= 0x15 {
        let leaf = cpuid(0x15, 0);
        if leaf.eax != 0 && leaf.ebx != 0 && leaf.ecx != 0 {
            let khz = u64::from(leaf.ecx) * u64::from(leaf.ebx) / u64::from(leaf.eax) / 1000;
            return Some((khz, Source::CpuidCrystal));
        }
    }
    if max_leaf >= 0x16 {
        let mhz = u64::from(cpuid(0x16, 0).eax & 0xffff);
        if mhz != 0 {
            return Some((mhz * 1000, Source::CpuidBaseFrequency));
        }
    }
    None
}

/// Calibrate (once) and return the TSC rate in kHz and where it came from.
pub fn calibrate() -> Option<(u64, Source)> {
    let (khz, source) = match from_pit() {
        Some(khz) => (khz, Source::Pit),
        None => from_cpuid()?,
    };
    TSC_KHZ.store(khz, Ordering::Relaxed);
    Some((khz, source))
}

/// TSC ticks per millisecond; an assumed 3 GHz before calibration (only
/// timeouts use time then).
fn ticks_per_ms() -> u64 {
    match TSC_KHZ.load(Ordering::Relaxed) {
        0 => 3_000_000,
        khz => khz,
    }
}

/// A point in time, for measuring intervals.
#[derive(Clone, Copy)]
pub struct Instant(u64);

impl Instant {
    pub fn now() -> Self {
        Instant(rdtsc())
    }

    pub fn elapsed_us(self) -> u64 {
        let ticks = u128::from(rdtsc().wrapping_sub(self.0));
        (ticks * 1000 / u128::from(ticks_per_ms())) as u64
    }

    pub fn elapsed_ms(self) -> u64 {
        self.elapsed_us() / 1000
    }
}
