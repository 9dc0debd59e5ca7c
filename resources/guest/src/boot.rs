//! The ring-0 half of the guest lives in boot.s; this module includes it and
//! names the symbols the ring-3 Rust code uses.

core::arch::global_asm!(include_str!("boot.s"), options(att_syntax));

extern "C" {
    /// The 256-entry IDT, loaded (empty) by the boot code and filled by
    /// `idt::install` from ring 3.
    pub static mut idt_table: [u64; 512];
    /// Entry stubs of exceptions 0..31.
    pub static exception_stubs: [u64; 32];
    /// Entry stubs of device interrupt vectors 0x30..0x3f.
    pub static irq_stubs: [u64; 16];
    /// irq_counts[i] is incremented by the handler of vector 0x30+i.
    pub static mut irq_counts: [u64; 16];
    pub fn spurious_interrupt();
    /// (leaf, subleaf) pairs the ring-0 boot code ran CPUID for ...
    pub static cpuid_queries: [[u32; 2]; crate::tests::cpuid::QUERY_COUNT];
    /// ... and what it got: eax, ebx, ecx, edx.
    pub static cpuid_results: [[u32; 4]; crate::tests::cpuid::QUERY_COUNT];
}
