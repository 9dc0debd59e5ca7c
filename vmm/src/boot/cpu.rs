//! The vCPU state at the kernel's first instruction: segments, control registers, paging, the
//! local APIC's LINT pins and FPU. (CPUID and MSRs: `crate::cpu_model`.)

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::EntryKind;
use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, PDPT_START, PD_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM vCPU ioctl {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("cannot write boot page tables or GDT: {0}")]
    Write(vm_memory::GuestMemoryError),
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT flags in the descriptor's own encoding: high nibble G/DB/L/AVL, low byte the access byte.
const CODE64: u16 = 0xa09b; // present, ring 0, exec/read, long mode, 4 KiB granular
const CODE32: u16 = 0xc09b; // present, ring 0, exec/read, 32-bit, 4 KiB granular
const DATA: u16 = 0xc093; // present, ring 0, read/write, 4 KiB granular
const TSS: u16 = 0x008b; // present, busy TSS, byte granular
/// The smallest TSS (PVH asks for limit 0x67); nothing in it is used before the kernel loads its own.
const TSS_LIMIT: u32 = 0x67;

/// GDT slots. The Linux 64-bit boot protocol requires CS = __BOOT_CS (0x10) and
/// DS/ES/SS = __BOOT_DS (0x18); the TSS goes where Linux's own boot GDT has it (0x20). Slot 1 stays
/// empty. PVH leaves selectors free, so it uses the same table.
const BOOT_CS_INDEX: u16 = 2;
const BOOT_DS_INDEX: u16 = 3;
const BOOT_TSS_INDEX: u16 = 4;
const GDT_ENTRIES: usize = 5;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

fn segment(index: u16, flags: u16, limit: u32) -> kvm_segment {
    let access = flags & 0xff;
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: 0,
        // KVM wants the limit in bytes: a 4 KiB granular limit counts pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: (access & 0xf) as u8,
        present: ((access >> 7) & 1) as u8,
        dpl: ((access >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((access >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the boot GDT and (for the 64-bit entries) identity page tables for the first 4 GiB.
pub fn write_boot_structures(mem: &GuestMemoryMmap, kind: EntryKind) -> Result<(), CpuError> {
    let code = if kind == EntryKind::Pvh {
        CODE32
    } else {
        CODE64
    };
    let mut gdt = [0u64; GDT_ENTRIES];
    gdt[usize::from(BOOT_CS_INDEX)] = gdt_entry(code, 0, 0xfffff);
    gdt[usize::from(BOOT_DS_INDEX)] = gdt_entry(DATA, 0, 0xfffff);
    gdt[usize::from(BOOT_TSS_INDEX)] = gdt_entry(TSS, 0, TSS_LIMIT);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(CpuError::Write)?;
    }
    if kind != EntryKind::Pvh {
        mem.write_obj(PDPT_START | 0x03, GuestAddress(PML4_START))
            .map_err(CpuError::Write)?;
        for i in 0..4u64 {
            let pd = PD_START + i * 0x1000;
            mem.write_obj(pd | 0x03, GuestAddress(PDPT_START + i * 8))
                .map_err(CpuError::Write)?;
            for j in 0..512u64 {
                // 2 MiB page: present | writable | page size.
                let addr = ((i * 512 + j) << 21) | 0x83;
                mem.write_obj(addr, GuestAddress(pd + j * 8))
                    .map_err(CpuError::Write)?;
            }
        }
    }
    Ok(())
}

pub fn configure_sregs(vcpu: &VcpuFd, kind: EntryKind) -> Result<(), CpuError> {
    let mut s: kvm_sregs = vcpu
        .get_sregs()
        .map_err(|e| CpuError::Kvm("KVM_GET_SREGS", e))?;
    let (code_seg, data_seg, tss_seg) = boot_segments(kind);
    s.gdt.base = GDT_START;
    s.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cs = code_seg;
    s.ds = data_seg;
    s.es = data_seg;
    s.fs = data_seg;
    s.gs = data_seg;
    s.ss = data_seg;
    s.tr = tss_seg;
    match kind {
        EntryKind::Pvh => {
            // PVH: 32-bit protected mode, paging off.
            s.cr0 = X86_CR0_PE | X86_CR0_ET;
            s.cr4 = 0;
            s.efer = 0;
        }
        EntryKind::Elf64 | EntryKind::BzImage => {
            s.cr3 = PML4_START;
            s.cr4 |= X86_CR4_PAE;
            s.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            s.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&s)
        .map_err(|e| CpuError::Kvm("KVM_SET_SREGS", e))
}

/// CS, the data segment (DS, ES, FS, GS, SS) and TR as the GDT from `write_boot_structures` holds them.
fn boot_segments(kind: EntryKind) -> (kvm_segment, kvm_segment, kvm_segment) {
    let code = if kind == EntryKind::Pvh {
        CODE32
    } else {
        CODE64
    };
    (
        segment(BOOT_CS_INDEX, code, 0xfffff),
        segment(BOOT_DS_INDEX, DATA, 0xfffff),
        segment(BOOT_TSS_INDEX, TSS, TSS_LIMIT),
    )
}

pub fn configure_regs(vcpu: &VcpuFd, kind: EntryKind, entry: u64) -> Result<(), CpuError> {
    let mut r = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match kind {
        EntryKind::Pvh => r.rbx = PVH_INFO_START,
        _ => {
            r.rsp = BOOT_STACK_POINTER;
            r.rbp = BOOT_STACK_POINTER;
            r.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_regs(&r)
        .map_err(|e| CpuError::Kvm("KVM_SET_REGS", e))
}

pub fn configure_fpu(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| CpuError::Kvm("KVM_SET_FPU", e))
}

/// LINT0 as ExtINT (the legacy PIC's path) and LINT1 as NMI, as a PC firmware leaves them.
pub fn configure_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 7;
    const DELIVERY_NMI: u32 = 4;
    let mut l = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Kvm("KVM_GET_LAPIC", e))?;
    for (off, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| l.regs[off + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *b as _;
        }
    }
    vcpu.set_lapic(&l)
        .map_err(|e| CpuError::Kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architectural_encoding() {
        assert_eq!(gdt_entry(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let s = segment(1, CODE64, 0xfffff);
        assert_eq!(
            (s.l, s.db, s.dpl, s.present, s.type_, s.selector, s.limit),
            (1, 0, 0, 1, 0xb, 8, 0xffff_ffff)
        );
    }

    fn descriptor(mem: &GuestMemoryMmap, selector: u16) -> u64 {
        mem.read_obj(GuestAddress(GDT_START + u64::from(selector)))
            .unwrap()
    }

    #[test]
    fn linux_64bit_entry_finds_boot_cs_at_0x10_and_boot_ds_at_0x18() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem, EntryKind::BzImage).unwrap();
        // Documentation/arch/x86/boot.rst, 64-bit boot protocol: __BOOT_CS(0x10), __BOOT_DS(0x18).
        assert_eq!(descriptor(&mem, 0x10), gdt_entry(CODE64, 0, 0xfffff));
        assert_eq!(descriptor(&mem, 0x18), gdt_entry(DATA, 0, 0xfffff));
        let (cs, ds, tr) = boot_segments(EntryKind::BzImage);
        assert_eq!((cs.selector, ds.selector), (0x10, 0x18));
        // TR names a TSS descriptor (system segment, busy) of the size PVH asks for.
        let tss = descriptor(&mem, tr.selector);
        assert_eq!((tss >> 40) & 0x9f, 0x8b, "present, system, busy TSS");
        assert_eq!((tr.s, tr.type_, tr.limit), (0, 0xb, 0x67));
    }

    #[test]
    fn pvh_entry_gets_flat_32bit_segments() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_structures(&mem, EntryKind::Pvh).unwrap();
        let (cs, ds, _) = boot_segments(EntryKind::Pvh);
        assert_eq!(descriptor(&mem, cs.selector), gdt_entry(CODE32, 0, 0xfffff));
        assert_eq!(descriptor(&mem, ds.selector), gdt_entry(DATA, 0, 0xfffff));
        assert_eq!((cs.db, cs.l, cs.limit), (1, 0, 0xffff_ffff));
    }
}
