//! Where things live in guest physical memory. One place, so the boot code, the ACPI tables and
//! the device manager agree (and a reader can see the whole map at once).
//!
//! ```text
//! 0x0000_0500  GDT used for the 64-bit and PVH entries
//! 0x0000_6000  PVH hvm_start_info, then its memory map
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_8ff0  initial stack (grows down) for the 64-bit entry
//! 0x0000_9000  PML4, PDPT, 4 PDs: identity map of the first 4 GiB (64-bit entry only)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  -- reserved (EBDA) --
//! 0x000e_0000  ACPI: RSDP (found by the BIOS-area scan too), XSDT, FADT, MADT, DSDT
//! 0x0010_0000  kernel (ELF segments or the bzImage protected-mode part)
//!   ...        initrd at the top of low RAM
//! 0xc000_0000  MMIO gap (RAM above it moves to 4 GiB)
//! 0xd000_0000  virtio-mmio windows, 4 KiB each
//! 0xfec0_0000  IOAPIC        0xfee0_0000  local APICs
//! 0x1_0000_0000 RAM beyond 3 GiB, if any
//! ```

pub const GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// Linux on x86 accepts 2048 bytes; we allow more for test kernels but keep it bounded.
pub const CMDLINE_MAX_SIZE: usize = 4096;
pub const EBDA_START: u64 = 0x9fc00;
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = 0x10_0000;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS (Intel) somewhere in the gap, out of the guest's way.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy IRQ of COM1, wired to the same GSI on the in-kernel IOAPIC.
pub const SERIAL_GSI: u32 = 4;
/// GSIs handed to virtio-mmio devices: 5.. up to the IOAPIC's 24 pins, skipping 8 (RTC) and 12.
pub const VIRTIO_GSIS: [u32; 14] = [5, 6, 7, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20];

/// I/O port a test kernel writes one byte to, ending the VM with that byte as exit status.
pub const EXIT_PORT: u16 = 0xf4;
/// ACPI hardware-reduced sleep control / reset register (one I/O port, as the FADT says).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const ACPI_RESET_VALUE: u8 = 0x01;
pub const COM1_PORT: u16 = 0x3f8;
