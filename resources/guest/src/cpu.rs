//! Port I/O and other single instructions. All of these run in ring 3: port
//! I/O is allowed by the TSS I/O permission bitmap (see boot.s).

use core::arch::asm;

/// The VMM's exit port: a byte written here ends the VM with that status.
const EXIT_PORT: u16 = 0xf4;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no effect on Rust-visible memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for outb.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc only reads the time-stamp counter (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, subleaf)
}

/// End the VM with `status` (0 pass, 1 fail, 2 bad command line, 3 exception).
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    // Ring 3 cannot `hlt`; if the VMM ignored the port, spin.
    loop {
        core::hint::spin_loop();
    }
}

/// 32-bit MMIO read. `addr` must be a device register the page tables map.
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: identity-mapped device window, naturally aligned register.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}
