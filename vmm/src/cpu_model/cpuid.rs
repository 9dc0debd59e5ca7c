//! CPUID normalization: the table of every change we make to KVM's supported CPUID, and why.
//!
//! Rules edit only leaves that KVM's table has (a leaf this KVM does not offer stays absent); a
//! leaf rule runs before the register rules, so a rebuilt leaf is edited like any other.

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

use super::{Ctx, Vendor};

/// Which vendors a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendors {
    All,
    Intel,
    /// AMD and Hygon.
    AmdLike,
}

impl Vendors {
    pub fn matches(self, v: Vendor) -> bool {
        match self {
            Vendors::All => true,
            Vendors::Intel => v == Vendor::Intel,
            Vendors::AmdLike => v.is_amd_like(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Vendors::All => "all",
            Vendors::Intel => "Intel",
            Vendors::AmdLike => "AMD",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    pub fn name(self) -> &'static str {
        match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }

    pub fn get(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn get_mut(self, e: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        }
    }
}

/// Which subleaves of a leaf a rule edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// Every subleaf (or the only one).
    All,
    /// Subleaf n.
    Index(u32),
    /// The cache-description subleaves of leaf 4 / 0x8000001D: those whose cache type
    /// (EAX[4:0]) is not 0 ("no more caches").
    Caches,
}

impl Sub {
    fn matches(self, e: &kvm_cpuid_entry2) -> bool {
        match self {
            Sub::All => true,
            Sub::Index(i) => e.index == i,
            Sub::Caches => e.eax & 0x1f != 0,
        }
    }
}

/// What a register rule does to its register.
#[derive(Clone, Copy)]
pub enum Edit {
    /// Clear these bits.
    Clear(u32),
    /// Set bit n when the predicate holds, clear it otherwise.
    Bit(u8, fn(&Ctx) -> bool),
    /// Bits [lo, lo + width) become the value computed from the context and the entry as KVM
    /// gave it.
    Field {
        lo: u8,
        width: u8,
        value: fn(&Ctx, &kvm_cpuid_entry2) -> u32,
    },
    /// The whole register becomes this value.
    Value(fn(&Ctx) -> u32),
}

impl Edit {
    /// The bits it touches, as `[31:24]`, `[28]`, `&= !0x...`.
    pub fn bits(&self) -> String {
        match *self {
            Edit::Clear(m) => format!("&= !{m:#x}"),
            Edit::Bit(b, _) => format!("[{b}]"),
            Edit::Field { lo, width, .. } => format!("[{}:{lo}]", lo + width - 1),
            Edit::Value(_) => "[31:0]".into(),
        }
    }

    fn apply(&self, ctx: &Ctx, reg: Reg, e: &mut kvm_cpuid_entry2) {
        let orig = *e;
        let r = reg.get_mut(e);
        match *self {
            Edit::Clear(m) => *r &= !m,
            Edit::Bit(b, on) => {
                if on(ctx) {
                    *r |= 1 << b
                } else {
                    *r &= !(1 << b)
                }
            }
            Edit::Field { lo, width, value } => {
                let mask = (((1u64 << width) - 1) as u32) << lo;
                *r = (*r & !mask) | ((value(ctx, &orig) << lo) & mask);
            }
            Edit::Value(value) => *r = value(ctx),
        }
    }
}

/// One row of the table: a change to one register of one leaf.
pub struct RegisterRule {
    pub vendors: Vendors,
    pub leaf: u32,
    pub sub: Sub,
    pub reg: Reg,
    pub edit: Edit,
    /// What the bits now say.
    pub what: &'static str,
    /// Why we change them.
    pub why: &'static str,
}

/// What a leaf rule does to a whole leaf (all its subleaves).
#[derive(Clone, Copy)]
pub enum LeafEdit {
    /// Every register of every subleaf becomes 0: the feature is absent.
    Zero,
    /// The subleaves are replaced by these (KVM's describe the host).
    Rebuild(fn(&Ctx, u32) -> Vec<kvm_cpuid_entry2>),
}

pub struct LeafRule {
    pub vendors: Vendors,
    pub leaf: u32,
    pub edit: LeafEdit,
    pub what: &'static str,
    pub why: &'static str,
}

const fn bit(n: u32) -> u32 {
    1 << n
}

// Predicates and values the rules use; named so the table reads as a table.
fn several_cpus(c: &Ctx) -> bool {
    c.topo.count > 1
}
fn always(_: &Ctx) -> bool {
    true
}
fn has_pmu(c: &Ctx) -> bool {
    c.pmu_version > 0
}
fn tsc_deadline(c: &Ctx) -> bool {
    c.caps.tsc_deadline_timer
}
fn hwcr_backs_invariant_tsc(c: &Ctx) -> bool {
    c.caps.hwcr_tsc_freq_sel
}
fn vcpu_id(c: &Ctx, _: &kvm_cpuid_entry2) -> u32 {
    c.topo.id
}
fn vcpu_id_value(c: &Ctx) -> u32 {
    c.topo.id
}
fn logical_per_package(c: &Ctx, _: &kvm_cpuid_entry2) -> u32 {
    c.topo.count.min(255)
}
fn core_ids_minus_one(c: &Ctx, _: &kvm_cpuid_entry2) -> u32 {
    (1 << c.topo.core_bits()) - 1
}
fn cores_minus_one(c: &Ctx, _: &kvm_cpuid_entry2) -> u32 {
    c.topo.count - 1
}
fn core_bits(c: &Ctx, _: &kvm_cpuid_entry2) -> u32 {
    c.topo.core_bits()
}
fn zero(_: &Ctx, _: &kvm_cpuid_entry2) -> u32 {
    0
}
/// Cache level of a leaf 4 / 0x8000001D subleaf, EAX[7:5].
fn cache_level(e: &kvm_cpuid_entry2) -> u32 {
    (e.eax >> 5) & 7
}
/// Leaf 4 EAX[25:14]: addressable IDs sharing the cache - 1. L1 and L2 belong to one core (one
/// thread); L3 is shared by the package.
fn intel_cache_sharing(c: &Ctx, e: &kvm_cpuid_entry2) -> u32 {
    if cache_level(e) <= 2 {
        0
    } else {
        (1 << c.topo.core_bits()) - 1
    }
}
/// 0x8000001D EAX[25:14]: logical processors sharing the cache - 1 (a count, not a power of 2).
fn amd_cache_sharing(c: &Ctx, e: &kvm_cpuid_entry2) -> u32 {
    if cache_level(e) <= 2 {
        0
    } else {
        c.topo.count - 1
    }
}
fn kvm_signature_ebx(_: &Ctx) -> u32 {
    u32::from_le_bytes(*b"KVMK")
}
fn kvm_signature_ecx(_: &Ctx) -> u32 {
    u32::from_le_bytes(*b"VMKV")
}
fn kvm_signature_edx(_: &Ctx) -> u32 {
    u32::from_le_bytes(*b"M\0\0\0")
}
fn at_least_kvm_features_leaf(_: &Ctx, e: &kvm_cpuid_entry2) -> u32 {
    e.eax.max(0x4000_0001)
}
fn zero_value(_: &Ctx) -> u32 {
    0
}

/// Leaf 0xB / 0x1F (extended topology) for one package of `count` single-thread cores:
/// level 0 is SMT (1 thread, shift 0), level 1 is core (`count` cores, shift `core_bits`),
/// level 2 ends the list. EDX is the x2APIC ID at every level.
pub fn extended_topology(c: &Ctx, leaf: u32) -> Vec<kvm_cpuid_entry2> {
    const LEVEL_SMT: u32 = 1;
    const LEVEL_CORE: u32 = 2;
    let entry = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function: leaf,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: c.topo.id,
        ..Default::default()
    };
    vec![
        entry(0, 0, 1, LEVEL_SMT),
        entry(1, c.topo.core_bits(), c.topo.count, LEVEL_CORE),
        entry(2, 0, 0, 0),
    ]
}

/// Whole leaves we replace or empty.
pub const LEAF_RULES: &[LeafRule] = &[
    LeafRule {
        vendors: Vendors::All,
        leaf: 0xb,
        edit: LeafEdit::Rebuild(extended_topology),
        what: "SMT level: 1 thread (shift 0); core level: --cpus cores (shift core_bits); EDX = x2APIC ID",
        why: "KVM's copy describes the host's package; Linux sizes the package and numbers cores from it",
    },
    LeafRule {
        vendors: Vendors::All,
        leaf: 0x1f,
        edit: LeafEdit::Rebuild(extended_topology),
        what: "the same levels as leaf 0xB",
        why: "Linux prefers 0x1F over 0xB when it exists; the two must agree",
    },
    LeafRule {
        vendors: Vendors::Intel,
        leaf: 0x12,
        edit: LeafEdit::Zero,
        what: "no SGX enclave page cache",
        why: "SGX needs EPC sections the VMM would have to provide; we provide none",
    },
    LeafRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_000a,
        edit: LeafEdit::Zero,
        what: "no SVM revision or features",
        why: "nested virtualization is not offered (SVM is cleared in 0x80000001)",
    },
    LeafRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_001f,
        edit: LeafEdit::Zero,
        what: "no SME/SEV",
        why: "memory encryption needs VMM support (launch, C-bit in page tables) we do not have",
    },
];

/// Every register we change, per leaf. Order matters only within one register.
pub const REGISTER_RULES: &[RegisterRule] = &[
    // ---- Leaf 1: version and features ----
    RegisterRule {
        vendors: Vendors::All,
        leaf: 1,
        sub: Sub::All,
        reg: Reg::Ebx,
        edit: Edit::Field { lo: 24, width: 8, value: vcpu_id },
        what: "initial APIC ID = vCPU index",
        why: "KVM reports the host CPU's; every vCPU must see its own",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 1,
        sub: Sub::All,
        reg: Reg::Ebx,
        edit: Edit::Field { lo: 16, width: 8, value: logical_per_package },
        what: "logical processors per package = --cpus",
        why: "the host's package size is not ours",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 1,
        sub: Sub::All,
        reg: Reg::Edx,
        edit: Edit::Bit(28, several_cpus),
        what: "HTT: set iff --cpus > 1",
        why: "HTT says EBX[23:16] is valid (more than one logical processor per package)",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 1,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Bit(31, always),
        what: "hypervisor present",
        why: "guests read leaf 0x40000000 only when this bit is set",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 1,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Bit(24, tsc_deadline),
        what: "TSC-deadline timer iff KVM_CAP_TSC_DEADLINE_TIMER",
        why: "the in-kernel LAPIC implements it, but KVM leaves announcing it to the VMM",
    },
    RegisterRule {
        vendors: Vendors::Intel,
        leaf: 1,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Clear(bit(5)),
        what: "no VMX",
        why: "nested virtualization is not offered: it needs nested state and IA32_FEATURE_CONTROL set-up we do not do",
    },
    RegisterRule {
        vendors: Vendors::Intel,
        leaf: 1,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Bit(15, has_pmu),
        what: "PDCM (IA32_PERF_CAPABILITIES) only with a PMU",
        why: "without an architectural PMU (leaf 0xA version 0) there are no perf capabilities to read",
    },
    // ---- Leaf 4: Intel deterministic cache parameters ----
    RegisterRule {
        vendors: Vendors::Intel,
        leaf: 4,
        sub: Sub::Caches,
        reg: Reg::Eax,
        edit: Edit::Field { lo: 26, width: 6, value: core_ids_minus_one },
        what: "addressable core IDs per package - 1 = 2^core_bits - 1",
        why: "Linux counts cores per package from it; KVM reports the host's package",
    },
    RegisterRule {
        vendors: Vendors::Intel,
        leaf: 4,
        sub: Sub::Caches,
        reg: Reg::Eax,
        edit: Edit::Field { lo: 14, width: 12, value: intel_cache_sharing },
        what: "IDs sharing the cache - 1: 0 for L1/L2 (one thread per core), 2^core_bits - 1 for L3",
        why: "the host's sharing would put vCPUs in cache domains that do not exist",
    },
    // ---- Leaf 7: structured extended features ----
    RegisterRule {
        vendors: Vendors::Intel,
        leaf: 7,
        sub: Sub::Index(0),
        reg: Reg::Ebx,
        edit: Edit::Clear(bit(2)),
        what: "no SGX",
        why: "leaf 0x12 is emptied: no enclave page cache",
    },
    RegisterRule {
        vendors: Vendors::Intel,
        leaf: 7,
        sub: Sub::Index(0),
        reg: Reg::Ecx,
        edit: Edit::Clear(bit(30)),
        what: "no SGX launch control",
        why: "as SGX itself",
    },
    // ---- Hypervisor leaves ----
    RegisterRule {
        vendors: Vendors::All,
        leaf: 0x4000_0000,
        sub: Sub::All,
        reg: Reg::Eax,
        edit: Edit::Field { lo: 0, width: 32, value: at_least_kvm_features_leaf },
        what: "highest hypervisor leaf, at least 0x40000001",
        why: "the KVM features leaf below must be reachable",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 0x4000_0000,
        sub: Sub::All,
        reg: Reg::Ebx,
        edit: Edit::Value(kvm_signature_ebx),
        what: "\"KVMK\"",
        why: "signature \"KVMKVMKVM\\0\\0\\0\": Linux enables kvm-clock and KVM's paravirt features from it",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 0x4000_0000,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Value(kvm_signature_ecx),
        what: "\"VMKV\"",
        why: "signature, continued",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 0x4000_0000,
        sub: Sub::All,
        reg: Reg::Edx,
        edit: Edit::Value(kvm_signature_edx),
        what: "\"M\\0\\0\\0\"",
        why: "signature, continued",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 0x4000_0001,
        sub: Sub::All,
        reg: Reg::Eax,
        edit: Edit::Clear(bit(15) | bit(16) | bit(17)),
        what: "no MSI_EXT_DEST_ID, HC_MAP_GPA_RANGE, MIGRATION_CONTROL",
        why: "each needs the VMM: extended-destination MSI routing, KVM_EXIT_HYPERCALL handling, live migration; we have none",
    },
    RegisterRule {
        vendors: Vendors::All,
        leaf: 0x4000_0001,
        sub: Sub::All,
        reg: Reg::Edx,
        edit: Edit::Value(zero_value),
        what: "no hints (KVM_HINTS_REALTIME clear)",
        why: "vCPUs are ordinary threads, not pinned to dedicated host CPUs",
    },
    // ---- AMD extended leaves ----
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_0001,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Clear(bit(2)),
        what: "no SVM",
        why: "nested virtualization is not offered: it needs nested state we do not keep",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_0001,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Bit(1, several_cpus),
        what: "CmpLegacy: set iff --cpus > 1",
        why: "AMD's way to say leaf 1's logical count means cores, not hyper-threads",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_0007,
        sub: Sub::All,
        reg: Reg::Edx,
        edit: Edit::Bit(8, hwcr_backs_invariant_tsc),
        what: "invariant TSC only where HWCR.TscFreqSel can be set",
        why: "Linux checks an AMD invariant TSC against MSR_K7_HWCR bit 24 and reports a firmware bug if it is clear",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_0008,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Field { lo: 0, width: 8, value: cores_minus_one },
        what: "NC: cores per package - 1 = --cpus - 1",
        why: "Linux's AMD topology counts cores from it; KVM reports the host's",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_0008,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Field { lo: 12, width: 4, value: core_bits },
        what: "ApicIdCoreIdSize = core_bits",
        why: "the APIC ID bits that number cores, as the APIC IDs we hand out use them",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_001d,
        sub: Sub::Caches,
        reg: Reg::Eax,
        edit: Edit::Field { lo: 14, width: 12, value: amd_cache_sharing },
        what: "logical processors sharing the cache - 1: 0 for L1/L2, --cpus - 1 for L3",
        why: "Linux derives the LLC ID from it; the host's sharing is not ours",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_001e,
        sub: Sub::All,
        reg: Reg::Eax,
        edit: Edit::Value(vcpu_id_value),
        what: "extended APIC ID = vCPU index",
        why: "KVM leaves it to the VMM; it must match the APIC ID",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_001e,
        sub: Sub::All,
        reg: Reg::Ebx,
        edit: Edit::Field { lo: 0, width: 8, value: vcpu_id },
        what: "core ID = vCPU index",
        why: "one core per vCPU",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_001e,
        sub: Sub::All,
        reg: Reg::Ebx,
        edit: Edit::Field { lo: 8, width: 8, value: zero },
        what: "threads per core - 1 = 0",
        why: "one thread per core (Linux sets smp_num_siblings from it)",
    },
    RegisterRule {
        vendors: Vendors::AmdLike,
        leaf: 0x8000_001e,
        sub: Sub::All,
        reg: Reg::Ecx,
        edit: Edit::Field { lo: 0, width: 11, value: zero },
        what: "node ID 0, nodes per processor - 1 = 0",
        why: "one NUMA node",
    },
];

/// KVM's table with every rule applied, sorted by leaf and subleaf.
pub fn normalize(supported: &[kvm_cpuid_entry2], ctx: &Ctx) -> Vec<kvm_cpuid_entry2> {
    let mut entries = supported.to_vec();
    for rule in LEAF_RULES.iter().filter(|r| r.vendors.matches(ctx.vendor)) {
        if !entries.iter().any(|e| e.function == rule.leaf) {
            continue;
        }
        match rule.edit {
            LeafEdit::Zero => {
                for e in entries.iter_mut().filter(|e| e.function == rule.leaf) {
                    (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
                }
            }
            LeafEdit::Rebuild(build) => {
                entries.retain(|e| e.function != rule.leaf);
                entries.extend(build(ctx, rule.leaf));
            }
        }
    }
    for rule in REGISTER_RULES
        .iter()
        .filter(|r| r.vendors.matches(ctx.vendor))
    {
        for e in entries
            .iter_mut()
            .filter(|e| e.function == rule.leaf && rule.sub.matches(e))
        {
            rule.edit.apply(ctx, rule.reg, e);
        }
    }
    entries.sort_by_key(|e| (e.function, e.index));
    entries
}

/// The entry for (leaf, subleaf) as a guest's CPUID would find it (subleaf ignored where the
/// leaf does not use it).
pub fn lookup(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| {
        e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
    })
}
