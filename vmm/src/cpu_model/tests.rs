//! The model run on CPUID tables captured from real Intel and AMD hosts (`testdata/`, each with
//! its provenance), on any machine.

use kvm_bindings::kvm_cpuid_entry2;

use super::cpuid::{lookup, LEAF_RULES, REGISTER_RULES};
use super::msr::{HWCR_TSC_FREQ_SEL, MSR_IA32_MISC_ENABLE, MSR_K7_HWCR, MSR_MTRR_DEF_TYPE};
use super::*;

const AMD_PVM: &str = include_str!("testdata/amd-epyc-pvm.cpuid");
const AMD_GENOA: &str = include_str!("testdata/amd-genoa-kvm.cpuid");
const INTEL_SPR: &str = include_str!("testdata/intel-sapphire-rapids-kvm.cpuid");

fn tables() -> Vec<(&'static str, Vec<kvm_cpuid_entry2>)> {
    [
        ("amd-epyc-pvm", AMD_PVM),
        ("amd-genoa-kvm", AMD_GENOA),
        ("intel-sapphire-rapids-kvm", INTEL_SPR),
    ]
    .into_iter()
    .map(|(n, t)| (n, table::parse(t).unwrap_or_else(|e| panic!("{n}: {e}"))))
    .collect()
}

const CAPS: HostCaps = HostCaps {
    tsc_deadline_timer: true,
    hwcr_tsc_freq_sel: true,
};

fn get(m: &CpuModel, leaf: u32, sub: u32) -> kvm_cpuid_entry2 {
    *lookup(&m.cpuid, leaf, sub).unwrap_or_else(|| panic!("leaf {leaf:#x}.{sub} missing"))
}

/// Leaf 0x12 with something in it: edits the table's own entry, or adds one.
fn offer_sgx_leaf(t: &mut Vec<kvm_cpuid_entry2>) {
    match t.iter_mut().find(|e| e.function == 0x12 && e.index == 0) {
        Some(e) => e.eax = 3,
        None => t.push(kvm_cpuid_entry2 {
            function: 0x12,
            eax: 3,
            ..Default::default()
        }),
    }
}

fn topo(id: u32, count: u32) -> VcpuTopology {
    VcpuTopology { id, count }
}

#[test]
fn the_captured_tables_are_of_the_vendors_they_say() {
    let t = tables();
    assert_eq!(Vendor::of(&t[0].1), Vendor::Amd);
    assert_eq!(Vendor::of(&t[1].1), Vendor::Amd);
    assert_eq!(Vendor::of(&t[2].1), Vendor::Intel);
    let mut hygon = t[0].1.clone();
    let l0 = hygon.iter_mut().find(|e| e.function == 0).unwrap();
    let s = b"HygonGenuine";
    (l0.ebx, l0.edx, l0.ecx) = (
        u32::from_le_bytes(s[0..4].try_into().unwrap()),
        u32::from_le_bytes(s[4..8].try_into().unwrap()),
        u32::from_le_bytes(s[8..12].try_into().unwrap()),
    );
    assert_eq!(Vendor::of(&hygon), Vendor::Hygon);
    assert!(Vendor::Hygon.is_amd_like());
}

#[test]
fn leaf_1_and_the_hypervisor_leaves_on_every_vendor() {
    for (name, t) in tables() {
        for count in [1, 2, 3, 4, 64] {
            for id in [0, count - 1] {
                let m = build(&t, topo(id, count), CAPS);
                let l1 = get(&m, 1, 0);
                assert_eq!(l1.ebx >> 24, id, "{name}: APIC ID");
                assert_eq!((l1.ebx >> 16) & 0xff, count, "{name}: logical per package");
                let kvm_l1 = lookup(&t, 1, 0).unwrap();
                assert_eq!(l1.ebx & 0xffff, kvm_l1.ebx & 0xffff, "{name}: CLFLUSH kept");
                assert_eq!(l1.edx & (1 << 28) != 0, count > 1, "{name}: HTT");
                assert_ne!(l1.ecx & (1 << 31), 0, "{name}: hypervisor bit");
                assert_ne!(l1.ecx & (1 << 24), 0, "{name}: TSC deadline");
                let h = get(&m, 0x4000_0000, 0);
                let mut sig = Vec::new();
                for r in [h.ebx, h.ecx, h.edx] {
                    sig.extend_from_slice(&r.to_le_bytes());
                }
                assert_eq!(&sig, b"KVMKVMKVM\0\0\0", "{name}");
                assert!(h.eax >= 0x4000_0001, "{name}");
                let f = get(&m, 0x4000_0001, 0);
                assert_eq!(f.eax & 0x3_8000, 0, "{name}: features we do not back");
                assert_ne!(f.eax & 1, 0, "{name}: kvm-clock kept");
                assert_eq!(f.edx, 0, "{name}: no hints");
            }
        }
    }
}

/// How Linux's `detect_extended_topology` reads leaf 0xB/0x1F: (threads per core, cores per
/// package, x2APIC ID), walking subleaves until a level of type 0.
fn linux_extended_topology(m: &CpuModel, leaf: u32) -> (u32, u32, u32) {
    let mut smt = None;
    let mut core = None;
    for sub in 0..8 {
        let e = get(m, leaf, sub);
        match (e.ecx >> 8) & 0xff {
            0 => break,
            1 => smt = Some(e.ebx & 0xffff),
            2 => core = Some(e.ebx & 0xffff),
            t => panic!("unexpected level type {t}"),
        }
        assert_eq!(e.ecx & 0xff, sub, "level number");
        assert_eq!(e.flags & 1, 1, "subleaf-indexed");
    }
    let threads = smt.expect("an SMT level");
    let logical = core.expect("a core level");
    (threads, logical / threads, get(m, leaf, 0).edx)
}

#[test]
fn intel_topology_leaves_follow_cpus() {
    let t = tables().remove(2).1;
    for count in [1, 2, 4, 6] {
        for id in 0..count {
            let m = build(&t, topo(id, count), CAPS);
            let bits = count.next_power_of_two().trailing_zeros();
            for leaf in [0xb, 0x1f] {
                assert_eq!(linux_extended_topology(&m, leaf), (1, count, id));
                assert_eq!(get(&m, leaf, 0).eax & 0x1f, 0, "SMT shift");
                assert_eq!(get(&m, leaf, 1).eax & 0x1f, bits, "core shift");
            }
            let mut levels = 0;
            for sub in 0..4 {
                let c = get(&m, 4, sub);
                if c.eax & 0x1f == 0 {
                    break;
                }
                levels += 1;
                assert_eq!(c.eax >> 26, (1 << bits) - 1, "core IDs per package");
                let sharing = (c.eax >> 14) & 0xfff;
                let level = (c.eax >> 5) & 7;
                let want = if level <= 2 { 0 } else { (1 << bits) - 1 };
                assert_eq!(sharing, want, "L{level} sharing");
            }
            assert_eq!(levels, 4, "L1d, L1i, L2, L3 described");
            // Leaf 1's package size agrees with the core level.
            assert_eq!((get(&m, 1, 0).ebx >> 16) & 0xff, count);
        }
    }
}

#[test]
fn amd_topology_leaves_follow_cpus() {
    for (name, t) in tables().into_iter().take(2) {
        for count in [1, 2, 4, 5] {
            for id in 0..count {
                let m = build(&t, topo(id, count), CAPS);
                let bits = count.next_power_of_two().trailing_zeros();
                let l8 = get(&m, 0x8000_0008, 0);
                assert_eq!(l8.ecx & 0xff, count - 1, "{name}: NC");
                assert_eq!((l8.ecx >> 12) & 0xf, bits, "{name}: ApicIdCoreIdSize");
                let e = get(&m, 0x8000_001e, 0);
                assert_eq!(e.eax, id, "{name}: extended APIC ID");
                assert_eq!(e.ebx & 0xff, id, "{name}: core ID");
                assert_eq!((e.ebx >> 8) & 0xff, 0, "{name}: one thread per core");
                assert_eq!(e.ecx & 0x7ff, 0, "{name}: node 0 of 1");
                let ext1 = get(&m, 0x8000_0001, 0);
                assert_eq!(ext1.ecx & 2 != 0, count > 1, "{name}: CmpLegacy");
                for sub in 0..4 {
                    let c = get(&m, 0x8000_001d, sub);
                    let level = (c.eax >> 5) & 7;
                    let want = if level <= 2 { 0 } else { count - 1 };
                    assert_eq!((c.eax >> 14) & 0xfff, want, "{name}: L{level} sharing");
                }
                // AMD Zen also has leaf 0xB; where KVM offers it, it agrees.
                if lookup(&t, 0xb, 0).is_some() {
                    assert_eq!(linux_extended_topology(&m, 0xb), (1, count, id), "{name}");
                }
            }
        }
    }
}

/// The same VM on another host of the same CPU: KVM's table differs only in what describes the
/// host's package. The model must not.
#[test]
fn the_hosts_own_topology_does_not_leak_into_the_model() {
    for (name, t) in tables() {
        let amd = Vendor::of(&t).is_amd_like();
        let mut other_host = t.clone();
        for e in other_host.iter_mut() {
            let cache = e.eax & 0x1f != 0;
            match e.function {
                1 => e.ebx = (e.ebx & 0xffff) | (0x2f << 24) | (96 << 16),
                4 if cache && !amd => e.eax = (e.eax & 0x3fff) | (0x2f << 26) | (0x5f << 14),
                0x8000_001d if cache && amd => e.eax = (e.eax & 0xfc00_3fff) | (0x5f << 14),
                0xb | 0x1f => (e.eax, e.ebx, e.edx) = (7, 192, 0x55),
                0x8000_0008 if amd => e.ecx = (e.ecx & !0xf0ff) | (7 << 12) | 95,
                0x8000_001e if amd => (e.eax, e.ebx, e.ecx) = (0x55, 0x0155, 0x0301),
                _ => {}
            }
        }
        for (id, count) in [(0, 1), (1, 2), (3, 4)] {
            let a = build(&t, topo(id, count), CAPS);
            let b = build(&other_host, topo(id, count), CAPS);
            let (a, b) = (table::format(&a.cpuid), table::format(&b.cpuid));
            let diff = a.lines().zip(b.lines()).find(|(x, y)| x != y);
            assert_eq!(
                diff, None,
                "{name}: the model differs between the two hosts"
            );
            assert_eq!(a.lines().count(), b.lines().count(), "{name}");
        }
    }
}

#[test]
fn features_we_do_not_back_are_hidden() {
    for (name, mut t) in tables() {
        // Make sure each is really offered first: a host with nested virtualization and SGX.
        for e in t.iter_mut() {
            match (e.function, e.index) {
                (1, _) => e.ecx |= 1 << 5,
                (7, 0) => (e.ebx, e.ecx) = (e.ebx | 1 << 2, e.ecx | 1 << 30),
                (0x8000_0001, _) => e.ecx |= 1 << 2,
                (0x8000_000a, _) | (0x8000_001f, _) => e.eax = 0xffff_ffff,
                (0x4000_0001, _) => (e.eax, e.edx) = (e.eax | 0x3_8000, 1),
                _ => {}
            }
        }
        offer_sgx_leaf(&mut t);
        let m = build(&t, topo(0, 2), CAPS);
        let vendor = Vendor::of(&t);
        if vendor == Vendor::Intel {
            assert_eq!(get(&m, 1, 0).ecx & (1 << 5), 0, "{name}: VMX");
            assert_eq!(get(&m, 7, 0).ebx & (1 << 2), 0, "{name}: SGX");
            assert_eq!(get(&m, 7, 0).ecx & (1 << 30), 0, "{name}: SGX_LC");
            assert_eq!(get(&m, 0x12, 0).eax, 0, "{name}: SGX leaf");
        } else {
            assert_eq!(get(&m, 0x8000_0001, 0).ecx & (1 << 2), 0, "{name}: SVM");
            assert_eq!(get(&m, 0x8000_000a, 0).eax, 0, "{name}: SVM leaf");
            assert_eq!(get(&m, 0x8000_001f, 0).eax, 0, "{name}: SEV leaf");
        }
        assert_eq!(get(&m, 0x4000_0001, 0).eax & 0x3_8000, 0, "{name}");
        assert_eq!(get(&m, 0x4000_0001, 0).edx, 0, "{name}");
    }
}

#[test]
fn intel_pmu_capabilities_follow_the_pmu() {
    let mut t = tables().remove(2).1;
    for e in t.iter_mut().filter(|e| e.function == 1) {
        e.ecx |= 1 << 15; // PDCM offered
    }
    // Firecracker's capture has leaf 0xA zeroed: no PMU, so no PDCM.
    let m = build(&t, topo(0, 1), CAPS);
    assert_eq!(get(&m, 1, 0).ecx & (1 << 15), 0);
    for e in t.iter_mut().filter(|e| e.function == 0xa) {
        e.eax = 0x0830_0802; // version 2
    }
    let m = build(&t, topo(0, 1), CAPS);
    assert_ne!(get(&m, 1, 0).ecx & (1 << 15), 0);
}

#[test]
fn amd_invariant_tsc_comes_with_hwcr_tsc_freq_sel_or_not_at_all() {
    for (name, t) in tables().into_iter().take(2) {
        assert_ne!(
            lookup(&t, 0x8000_0007, 0).unwrap().edx & (1 << 8),
            0,
            "{name}: KVM offers it"
        );
        let m = build(&t, topo(0, 1), CAPS);
        assert_ne!(get(&m, 0x8000_0007, 0).edx & (1 << 8), 0, "{name}");
        let hwcr = m.msrs.iter().find(|x| x.index == MSR_K7_HWCR);
        assert_eq!(hwcr.map(|x| x.value), Some(HWCR_TSC_FREQ_SEL), "{name}");
        // A KVM that refuses TscFreqSel (before Linux 6.6): no invariant TSC, no HWCR write.
        let old_kvm = HostCaps {
            hwcr_tsc_freq_sel: false,
            ..CAPS
        };
        let m = build(&t, topo(0, 1), old_kvm);
        assert_eq!(get(&m, 0x8000_0007, 0).edx & (1 << 8), 0, "{name}");
        assert!(m.msrs.iter().all(|x| x.index != MSR_K7_HWCR), "{name}");
    }
}

#[test]
fn boot_msrs_per_vendor() {
    let t = tables();
    let indexes = |m: &CpuModel| m.msrs.iter().map(|x| x.index).collect::<Vec<_>>();
    let amd = build(&t[0].1, topo(0, 1), CAPS);
    assert_eq!(indexes(&amd), [MSR_MTRR_DEF_TYPE, MSR_K7_HWCR]);
    let intel = build(&t[2].1, topo(0, 1), CAPS);
    assert_eq!(indexes(&intel), [MSR_MTRR_DEF_TYPE, MSR_IA32_MISC_ENABLE]);
    let mtrr = intel.msrs[0].value;
    assert_eq!(
        (mtrr >> 11 & 1, mtrr & 0xff),
        (1, 6),
        "MTRRs on, default write-back"
    );
    assert_eq!(intel.msrs[1].value & 1, 1, "fast strings");
}

/// A rule that changes nothing on any captured table (even with the features it hides offered,
/// as `features_we_do_not_back_are_hidden` offers them) is dead code or a wrong leaf number.
#[test]
fn every_rule_changes_something_on_some_host() {
    let mut inputs = Vec::new();
    for (_, mut t) in tables() {
        inputs.push(t.clone());
        for e in t.iter_mut() {
            match (e.function, e.index) {
                (1, _) => e.ecx |= (1 << 5) | (1 << 15),
                (7, 0) => (e.ebx, e.ecx) = (e.ebx | 1 << 2, e.ecx | 1 << 30),
                (0x8000_0001, _) => e.ecx |= 1 << 2,
                (0x8000_000a, _) | (0x8000_001f, _) => e.eax = 1,
                (0x4000_0001, _) => (e.eax, e.edx) = (e.eax | 0x3_8000, 1),
                (0x4000_0000, _) => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
                // A host with four NUMA nodes per socket (EPYC in NPS4 mode).
                (0x8000_001e, _) => e.ecx = 0x0301,
                _ => {}
            }
        }
        offer_sgx_leaf(&mut t);
        inputs.push(t);
    }
    let caps = [
        CAPS,
        HostCaps {
            tsc_deadline_timer: false,
            hwcr_tsc_freq_sel: false,
        },
    ];
    let topos = [topo(0, 1), topo(3, 4), topo(2, 3)];
    let changed = |leaf: u32, pick: &dyn Fn(&kvm_cpuid_entry2) -> u32| {
        inputs.iter().any(|t| {
            caps.iter().any(|c| {
                topos.iter().any(|tp| {
                    let m = build(t, *tp, *c);
                    m.cpuid.iter().filter(|e| e.function == leaf).any(|e| {
                        t.iter()
                            .find(|k| k.function == leaf && k.index == e.index)
                            .is_none_or(|k| pick(k) != pick(e))
                    })
                })
            })
        })
    };
    for r in LEAF_RULES {
        assert!(
            changed(r.leaf, &|e| e.eax
                ^ e.ebx.rotate_left(8)
                ^ e.ecx.rotate_left(16)
                ^ e.edx.rotate_left(24)),
            "leaf rule {:#x} ({}) never changes anything",
            r.leaf,
            r.what
        );
    }
    for r in REGISTER_RULES {
        assert!(
            changed(r.leaf, &|e| r.reg.get(e)),
            "rule {:#x} {} {} ({}) never changes anything",
            r.leaf,
            r.reg.name(),
            r.edit.bits(),
            r.what
        );
    }
}

#[test]
fn core_bits_cover_every_apic_id() {
    for (count, bits) in [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (64, 6)] {
        assert_eq!(topo(0, count).core_bits(), bits, "{count}");
    }
}
