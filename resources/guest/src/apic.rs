//! Route a device's interrupt line to this CPU: IOAPIC redirection entry for
//! the GSI, and a software-enabled local APIC. Both are reached by MMIO from
//! ring 3 (their pages are user-accessible).

use crate::cpu::{mmio_read32, mmio_write32};

const IOAPIC_BASE: u64 = 0xfec0_0000;
const IOAPIC_SELECT: u64 = IOAPIC_BASE;
const IOAPIC_WINDOW: u64 = IOAPIC_BASE + 0x10;
const IOAPIC_VERSION_REG: u32 = 0x01;
const IOAPIC_REDIRECTION_BASE: u32 = 0x10;

const LAPIC_BASE: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = LAPIC_BASE + 0x20;
const LAPIC_TASK_PRIORITY: u64 = LAPIC_BASE + 0x80;
const LAPIC_SPURIOUS: u64 = LAPIC_BASE + 0xf0;
const LAPIC_SOFTWARE_ENABLE: u32 = 0x100;

#[derive(Clone, Copy, Debug)]
pub enum ApicError {
    /// The IOAPIC has fewer pins than the device's GSI needs.
    NoSuchPin { gsi: u32, pins: u32 },
}

impl core::fmt::Display for ApicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ApicError::NoSuchPin { gsi, pins } => {
                write!(f, "GSI {gsi} is beyond the IOAPIC's {pins} pins")
            }
        }
    }
}

fn ioapic_read(reg: u32) -> u32 {
    mmio_write32(IOAPIC_SELECT, reg);
    mmio_read32(IOAPIC_WINDOW)
}

fn ioapic_write(reg: u32, value: u32) {
    mmio_write32(IOAPIC_SELECT, reg);
    mmio_write32(IOAPIC_WINDOW, value);
}

/// Software-enable the local APIC (spurious vector `spurious_vector`) and
/// accept every priority.
pub fn enable_local_apic(spurious_vector: u8) {
    mmio_write32(LAPIC_TASK_PRIORITY, 0);
    mmio_write32(
        LAPIC_SPURIOUS,
        LAPIC_SOFTWARE_ENABLE | u32::from(spurious_vector),
    );
}

/// Deliver IOAPIC pin `gsi` as `vector` to this CPU: fixed delivery,
/// physical destination, edge-triggered, active high, unmasked.
pub fn route_gsi(gsi: u32, vector: u8) -> Result<(), ApicError> {
    let pins = ((ioapic_read(IOAPIC_VERSION_REG) >> 16) & 0xff) + 1;
    if gsi >= pins {
        return Err(ApicError::NoSuchPin { gsi, pins });
    }
    let apic_id = mmio_read32(LAPIC_ID) >> 24;
    let reg = IOAPIC_REDIRECTION_BASE + 2 * gsi;
    // Destination first, then the low half, whose write unmasks the pin.
    ioapic_write(reg + 1, apic_id << 24);
    ioapic_write(reg, u32::from(vector));
    Ok(())
}
