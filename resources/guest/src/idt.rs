//! Fill the IDT (from ring 3: its page is user-writable like all memory) and
//! read the interrupt counters the ring-0 stubs maintain.

use crate::boot;

const KERNEL_CS: u16 = 0x08;
/// Present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
const INTERRUPT_GATE: u8 = 0x8e;

/// Device `i` (in command-line order) interrupts on vector IRQ_VECTOR_BASE + i.
pub const IRQ_VECTOR_BASE: u8 = 0x30;
pub const IRQ_VECTORS: usize = 16;
pub const SPURIOUS_VECTOR: u8 = 0xff;

fn set_gate(vector: u8, handler: u64, type_attr: u8) {
    let low = (handler & 0xffff)
        | (u64::from(KERNEL_CS) << 16)
        | (u64::from(type_attr) << 40)
        | ((handler >> 16) & 0xffff) << 48;
    let high = handler >> 32;
    let index = usize::from(vector) * 2;
    // SAFETY: idt_table is the 4 KiB table in boot.s; index+1 < 512. No
    // interrupt can use a gate while it is half written: IDT entries are only
    // written before interrupts are routed anywhere.
    unsafe {
        let table = core::ptr::addr_of_mut!(boot::idt_table) as *mut u64;
        core::ptr::write_volatile(table.add(index), low);
        core::ptr::write_volatile(table.add(index + 1), high);
    }
}

pub fn install() {
    // SAFETY: the stub tables are read-only data defined in boot.s.
    let (exceptions, irqs) = unsafe {
        (
            core::ptr::read(core::ptr::addr_of!(boot::exception_stubs)),
            core::ptr::read(core::ptr::addr_of!(boot::irq_stubs)),
        )
    };
    for (vector, &stub) in exceptions.iter().enumerate() {
        set_gate(vector as u8, stub, INTERRUPT_GATE);
    }
    for (i, &stub) in irqs.iter().enumerate() {
        set_gate(IRQ_VECTOR_BASE + i as u8, stub, INTERRUPT_GATE);
    }
    set_gate(
        SPURIOUS_VECTOR,
        boot::spurious_interrupt as *const () as u64,
        INTERRUPT_GATE,
    );
}

/// How many interrupts vector IRQ_VECTOR_BASE + index has taken.
pub fn irq_count(index: usize) -> u64 {
    assert!(index < IRQ_VECTORS);
    // SAFETY: irq_counts has IRQ_VECTORS entries; the ring-0 stub updates them
    // with single instructions, so a volatile read sees a whole value.
    unsafe {
        core::ptr::read_volatile((core::ptr::addr_of!(boot::irq_counts) as *const u64).add(index))
    }
}

/// The deliberate triple fault of the `fault` test.
pub fn triple_fault() {
    // SAFETY: clearing the IDT makes every gate not-present; the ud2 that
    // follows then faults during delivery (#UD -> #NP -> double fault ->
    // shutdown). Nothing is expected to run afterwards.
    unsafe {
        let table = core::ptr::addr_of_mut!(boot::idt_table) as *mut u64;
        for i in 0..512 {
            core::ptr::write_volatile(table.add(i), 0);
        }
        core::arch::asm!("ud2");
    }
}
