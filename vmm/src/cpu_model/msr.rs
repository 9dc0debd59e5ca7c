//! The MSRs a guest reads at boot to decide how far to trust its CPU, set before the first
//! KVM_RUN. KVM's reset values are a bare CPU straight out of reset; a guest expects what
//! firmware leaves behind.

use kvm_bindings::kvm_cpuid_entry2;

use super::cpuid::lookup;
use super::Ctx;

pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_K7_HWCR: u32 = 0xc001_0015;

/// IA32_MISC_ENABLE: fast string operations enabled; no BTS, no PEBS (KVM's reset value has the
/// last two).
const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
const MISC_ENABLE_BTS_UNAVAIL: u64 = 1 << 11;
const MISC_ENABLE_PEBS_UNAVAIL: u64 = 1 << 12;
/// MTRRdefType: E (MTRRs on), default memory type write-back (6).
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;
/// HWCR bit 24, TscFreqSel: the TSC counts at the P0 frequency (all Zen parts hard-wire it).
pub const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// One MSR value with the reason we set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootMsr {
    pub index: u32,
    pub value: u64,
    pub name: &'static str,
    pub why: &'static str,
}

fn has(cpuid: &[kvm_cpuid_entry2], leaf: u32, reg_edx_bit: u32) -> bool {
    lookup(cpuid, leaf, 0).is_some_and(|e| e.edx & (1 << reg_edx_bit) != 0)
}

/// The MSRs for this model. `cpuid` is the normalized table: an MSR is only written where the
/// CPUID the guest sees announces it.
pub fn boot_msrs(ctx: &Ctx, cpuid: &[kvm_cpuid_entry2]) -> Vec<BootMsr> {
    let mut msrs = Vec::new();
    // Leaf 1 EDX[12]: MTRR.
    if has(cpuid, 1, 12) {
        msrs.push(BootMsr {
            index: MSR_MTRR_DEF_TYPE,
            value: MTRR_ENABLE | MTRR_TYPE_WRBACK,
            name: "MTRRdefType",
            why: "MTRRs on, all RAM write-back, as firmware leaves them; with the reset value (MTRRs off) Linux also turns PAT off",
        });
    }
    if ctx.vendor == super::Vendor::Intel {
        msrs.push(BootMsr {
            index: MSR_IA32_MISC_ENABLE,
            value: MISC_ENABLE_FAST_STRING | MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL,
            name: "IA32_MISC_ENABLE",
            why: "fast strings on, as firmware leaves them; Linux turns ERMS off when the bit is clear",
        });
    }
    // Leaf 0x80000007 EDX[8]: invariant TSC, kept only where HWCR can back it (cpuid rules).
    if ctx.vendor.is_amd_like() && has(cpuid, 0x8000_0007, 8) {
        msrs.push(BootMsr {
            index: MSR_K7_HWCR,
            value: HWCR_TSC_FREQ_SEL,
            name: "HWCR",
            why: "TscFreqSel: the TSC counts at P0 frequency, which an invariant TSC means; Linux reports a firmware bug when it is clear",
        });
    }
    msrs
}
