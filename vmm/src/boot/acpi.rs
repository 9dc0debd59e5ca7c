//! ACPI tables, built with acpi_tables: RSDP → XSDT → {FADT → DSDT, MADT}.
//! Hardware-reduced ACPI (no PM timer, no GPE blocks): power-off and reset go through one I/O
//! port named in the FADT's sleep-control and reset registers, which the VMM turns into exits.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_END, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_START, COM1_PORT, IOAPIC_START,
    LAPIC_START, SERIAL_GSI,
};

const OEM_ID: [u8; 6] = *b"VMMRS ";
const OEM_TABLE_ID: [u8; 8] = *b"VMMRSTBL";
const OEM_REVISION: u32 = 1;
/// SLP_TYP for S5 in our DSDT's \_S5_ package; the guest writes (SLP_TYP << 2) | SLP_EN.
pub const S5_SLEEP_TYPE: u8 = 5;
pub const SLEEP_ENABLE: u8 = 1 << 5;

/// A virtio-mmio device as the DSDT describes it ("LNRO0005" is what Linux's virtio_mmio binds to).
#[derive(Debug, Clone, Copy)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub size: u64,
    pub gsi: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables ({0} bytes) do not fit in the ACPI area")]
    TooLarge(u64),
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();

    // COM1: lets the guest's ACPI-enumerated serial driver find the UART.
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, SERIAL_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let (hid, uid, crs) = (
        aml::Name::new("_HID".into(), &com1_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &com1_crs),
    );
    aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);

    for (i, d) in devices.iter().enumerate() {
        let name = format!("_SB_.V{:03X}", i);
        let uid = i as u32;
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.size as u32);
        // Edge-triggered: the interrupt arrives through a KVM irqfd, a pulse, not a level.
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs_t = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let (hid, uid, crs) = (
            aml::Name::new("_HID".into(), &"LNRO0005"),
            aml::Name::new("_UID".into(), &uid),
            aml::Name::new("_CRS".into(), &crs_t),
        );
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(&mut body);
    }

    // \_S5_: the sleep type the guest writes to the sleep control register to power off.
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut body);

    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let port = |width| {
        GAS::new(
            AddressSpace::SystemIo,
            width,
            0,
            AccessSize::ByteAccess,
            ACPI_SLEEP_CONTROL_PORT as u64,
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    b.reset_reg = port(8);
    b.reset_value = ACPI_RESET_VALUE;
    b.sleep_control_reg = port(8);
    b.sleep_status_reg = port(8);
    let mut v = Vec::new();
    b.finalize().to_aml_bytes(&mut v);
    v
}

fn madt(cpus: u32) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..cpus {
        m.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    let mut v = Vec::new();
    m.to_aml_bytes(&mut v);
    v
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Writes all tables into the ACPI area and returns the RSDP's address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    cpus: u32,
    devices: &[MmioDeviceInfo],
) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = align16(rsdp_addr + Rsdp::len() as u64);
    // The XSDT holds two 8-byte pointers after its 36-byte header.
    let dsdt_addr = align16(xsdt_addr + 36 + 2 * 8);
    let dsdt = dsdt(devices);
    let fadt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align16(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let end = madt_addr + madt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge(end - ACPI_START));
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    for (addr, bytes) in [
        (rsdp_addr, &rsdp_bytes),
        (xsdt_addr, &xsdt_bytes),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Write)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        let devs = [MmioDeviceInfo {
            base: 0xd000_0000,
            size: 0x1000,
            gsi: 5,
        }];
        for t in [dsdt(&devs), fadt(0x1234), madt(4)] {
            assert!(
                checksum_ok(&t),
                "checksum of {:?}",
                std::str::from_utf8(&t[0..4])
            );
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.len());
        }
        let d = dsdt(&devs);
        assert!(
            d.windows(8).any(|w| w == b"LNRO0005"),
            "DSDT names the virtio-mmio device"
        );
        assert!(d.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn write_into_guest_memory() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 2, &[]).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
