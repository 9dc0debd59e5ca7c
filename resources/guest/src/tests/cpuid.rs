//! `cpuid`: report the CPU the VMM presents, as a guest kernel sees it.
//!
//! The values come from the ring-0 boot code (boot.s), which ran CPUID for
//! every (leaf, subleaf) of `QUERIES` before dropping to ring 3: on PVM
//! hosts a CPUID in ring 3 is not intercepted and returns the host's values.
//! Lines (all `key=value`, parsed by the host test):
//!
//! ```text
//! cpuid: raw leaf=0x1 sub=0x0 eax=.. ebx=.. ecx=.. edx=..   (one per query)
//! cpuid: vendor=AuthenticAMD max_leaf=0x10 max_ext_leaf=0x80000022
//! cpuid: hv_signature=KVMKVMKVM hv_max_leaf=0x40000001 kvm_features=0x..
//! cpuid: apic_id=0 logical_per_package=4 htt=1 hypervisor_bit=1
//! cpuid: xtopo_leaf=0xb smt_threads=1 package_logical=4 core_shift=2 x2apic_id=0
//! cpuid: intel_l4_core_ids=4                                 (Intel)
//! cpuid: amd_cores=4 amd_core_id_bits=2 ext_apic_id=0 core_id=0 threads_per_core=1 nodes=1   (AMD)
//! cpuid: ring3_leaf1_ebx=.. ring0_leaf1_ebx=.. ring3_sees_model=yes|no
//! ```

use crate::boot::{cpuid_queries, cpuid_results};
use crate::cpu::cpuid;
use crate::outcome::Outcome;

/// Entries in boot.s's cpuid_queries table.
pub const QUERY_COUNT: usize = 20;

/// What ring 0 saw for (leaf, subleaf), if it asked.
fn ring0(leaf: u32, sub: u32) -> Option<[u32; 4]> {
    // SAFETY: both tables are written once by the boot code before ring 3
    // starts and never again.
    let (queries, results) = unsafe { (&cpuid_queries, &cpuid_results) };
    queries
        .iter()
        .position(|q| *q == [leaf, sub])
        .map(|i| results[i])
}

fn regs(leaf: u32, sub: u32) -> [u32; 4] {
    ring0(leaf, sub).unwrap_or([0; 4])
}

fn text(words: &[u32]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (i, w) in words.iter().take(3).enumerate() {
        s[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    s
}

fn printable(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).unwrap_or("?")
}

pub fn run() -> Outcome {
    // SAFETY: as in ring0().
    let (queries, results) = unsafe { (&cpuid_queries, &cpuid_results) };
    for (q, r) in queries.iter().zip(results.iter()) {
        println!(
            "cpuid: raw leaf={:#x} sub={:#x} eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
            q[0], q[1], r[0], r[1], r[2], r[3]
        );
    }
    let l0 = regs(0, 0);
    let vendor = text(&[l0[1], l0[3], l0[2]]);
    let max_leaf = l0[0];
    let max_ext = regs(0x8000_0000, 0)[0];
    println!(
        "cpuid: vendor={} max_leaf={max_leaf:#x} max_ext_leaf={max_ext:#x}",
        printable(&vendor)
    );
    let amd = &vendor == b"AuthenticAMD" || &vendor == b"HygonGenuine";
    let intel = &vendor == b"GenuineIntel";

    let l1 = regs(1, 0);
    let hv = regs(0x4000_0000, 0);
    if l1[2] & (1 << 31) != 0 {
        let sig = text(&hv[1..4]);
        println!(
            "cpuid: hv_signature={} hv_max_leaf={:#x} kvm_features={:#x}",
            printable(&sig),
            hv[0],
            regs(0x4000_0001, 0)[0]
        );
    }
    println!(
        "cpuid: apic_id={} logical_per_package={} htt={} hypervisor_bit={}",
        l1[1] >> 24,
        (l1[1] >> 16) & 0xff,
        (l1[3] >> 28) & 1,
        l1[2] >> 31
    );

    // Extended topology, as Linux reads it: 0x1F if it exists, else 0xB.
    let xleaf = if max_leaf >= 0x1f && regs(0x1f, 0)[1] != 0 {
        Some(0x1f)
    } else if max_leaf >= 0xb && regs(0xb, 0)[1] != 0 {
        Some(0xb)
    } else {
        None
    };
    if let Some(leaf) = xleaf {
        let (mut smt, mut logical, mut shift) = (0, 0, 0);
        for sub in 0..3 {
            let r = regs(leaf, sub);
            match (r[2] >> 8) & 0xff {
                1 => smt = r[1] & 0xffff,
                2 => (logical, shift) = (r[1] & 0xffff, r[0] & 0x1f),
                _ => break,
            }
        }
        println!(
            "cpuid: xtopo_leaf={leaf:#x} smt_threads={smt} package_logical={logical} core_shift={shift} x2apic_id={}",
            regs(leaf, 0)[3]
        );
    }
    if intel && max_leaf >= 4 {
        println!("cpuid: intel_l4_core_ids={}", (regs(4, 0)[0] >> 26) + 1);
    }
    if amd && max_ext >= 0x8000_0008 {
        let l8 = regs(0x8000_0008, 0);
        let topoext = regs(0x8000_0001, 0)[2] & (1 << 22) != 0;
        let e = if topoext && max_ext >= 0x8000_001e {
            regs(0x8000_001e, 0)
        } else {
            [0; 4]
        };
        println!(
            "cpuid: amd_cores={} amd_core_id_bits={} topoext={} ext_apic_id={} core_id={} threads_per_core={} nodes={}",
            (l8[2] & 0xff) + 1,
            (l8[2] >> 12) & 0xf,
            u8::from(topoext),
            e[0],
            e[1] & 0xff,
            ((e[1] >> 8) & 0xff) + 1,
            ((e[2] >> 8) & 7) + 1
        );
    }
    let ring3 = cpuid(1, 0).ebx;
    println!(
        "cpuid: ring3_leaf1_ebx={ring3:#x} ring0_leaf1_ebx={:#x} ring3_sees_model={}",
        l1[1],
        if ring3 == l1[1] { "yes" } else { "no" }
    );
    Ok(())
}
