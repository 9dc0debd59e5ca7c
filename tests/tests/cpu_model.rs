//! The CPU the guest sees is the CPU `vmm cpuid` describes: the test guest reads CPUID in ring 0
//! (as a guest kernel does) for `--cpus 1/2/4` and the host compares vendor, hypervisor leaves,
//! topology and every raw register with the model.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use integration_tests::{guest_elf, host_is_pvm, require_kvm, run_with_timeout, vmm_bin, vmm_run};

/// The host CPU's vendor string, as Linux reports it.
fn host_vendor() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").expect("read /proc/cpuinfo");
    info.lines()
        .find_map(|l| l.strip_prefix("vendor_id"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_string())
        .expect("vendor_id in /proc/cpuinfo")
}

type Regs = [u32; 4];

/// `vmm cpuid --cpus N`: (leaf, subleaf) -> registers, and whether the subleaf is significant.
fn model(cpus: u32) -> HashMap<(u32, u32), (Regs, bool)> {
    let o = run_with_timeout(
        Command::new(vmm_bin()).args(["cpuid", "--cpus", &cpus.to_string()]),
        Duration::from_secs(30),
    );
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    let hex = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    let mut m = HashMap::new();
    for line in o.stdout.lines().filter(|l| !l.starts_with('#')) {
        // Each entry line is a one-character change mark and a space, then the entry.
        let f: Vec<&str> = line.get(2..).unwrap_or("").split_whitespace().collect();
        if f.len() < 7 || !f[0].starts_with("0x") {
            continue;
        }
        let regs = [hex(f[3]), hex(f[4]), hex(f[5]), hex(f[6])];
        m.insert((hex(f[0]), hex(f[1])), (regs, hex(f[2]) & 1 == 1));
    }
    assert!(m.contains_key(&(1, 0)), "no leaf 1 in:\n{}", o.stdout);
    m
}

struct GuestView {
    kv: HashMap<String, String>,
    raw: Vec<((u32, u32), Regs)>,
}

impl GuestView {
    fn get(&self, key: &str) -> &str {
        self.kv
            .get(key)
            .unwrap_or_else(|| panic!("the guest did not report {key}: {:?}", self.kv))
    }
    fn num(&self, key: &str) -> u64 {
        let v = self.get(key);
        match v.strip_prefix("0x") {
            Some(h) => u64::from_str_radix(h, 16).unwrap(),
            None => v.parse().unwrap(),
        }
    }
}

fn guest_view(cpus: u32) -> GuestView {
    let o = vmm_run(
        &[
            "--kernel",
            guest_elf().to_str().unwrap(),
            "--cpus",
            &cpus.to_string(),
            "--cmdline",
            "cpuid",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    let mut kv = HashMap::new();
    let mut raw = Vec::new();
    for line in o.stdout.lines() {
        let Some(rest) = line.strip_prefix("cpuid: ") else {
            continue;
        };
        let pairs: HashMap<String, String> = rest
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if rest.starts_with("raw ") {
            let h = |k: &str| u32::from_str_radix(pairs[k].trim_start_matches("0x"), 16).unwrap();
            raw.push((
                (h("leaf"), h("sub")),
                [h("eax"), h("ebx"), h("ecx"), h("edx")],
            ));
        } else {
            kv.extend(pairs);
        }
    }
    assert!(!raw.is_empty(), "{}", o.describe());
    GuestView { kv, raw }
}

#[test]
fn the_guest_sees_the_model_topology_vendor_and_hypervisor_leaves() {
    require_kvm();
    let vendor = host_vendor();
    let pvm = host_is_pvm();
    for cpus in [1u32, 2, 4] {
        let m = model(cpus);
        let g = guest_view(cpus);
        let bits = u64::from(cpus.next_power_of_two().trailing_zeros());
        let n = u64::from(cpus);

        assert_eq!(g.get("vendor"), vendor, "--cpus {cpus}: vendor");
        assert_eq!(g.get("hv_signature"), "KVMKVMKVM", "--cpus {cpus}");
        assert!(g.num("hv_max_leaf") >= 0x4000_0001, "--cpus {cpus}");
        assert_eq!(g.num("apic_id"), 0, "--cpus {cpus}: BSP APIC ID");
        assert_eq!(g.num("logical_per_package"), n, "--cpus {cpus}");
        // Extended topology (0xB; 0x1F on Intel parts that have it), as Linux walks it.
        assert_eq!(g.num("smt_threads"), 1, "--cpus {cpus}");
        assert_eq!(g.num("package_logical"), n, "--cpus {cpus}");
        assert_eq!(g.num("core_shift"), bits, "--cpus {cpus}");
        assert_eq!(g.num("x2apic_id"), 0, "--cpus {cpus}");
        match vendor.as_str() {
            "GenuineIntel" => {
                assert_eq!(g.num("intel_l4_core_ids"), 1 << bits, "--cpus {cpus}")
            }
            "AuthenticAMD" | "HygonGenuine" => {
                assert_eq!(g.num("amd_cores"), n, "--cpus {cpus}");
                assert_eq!(g.num("amd_core_id_bits"), bits, "--cpus {cpus}");
                if g.num("topoext") == 1 {
                    assert_eq!(g.num("ext_apic_id"), 0, "--cpus {cpus}");
                    assert_eq!(g.num("threads_per_core"), 1, "--cpus {cpus}");
                    assert_eq!(g.num("nodes"), 1, "--cpus {cpus}");
                }
            }
            other => panic!("no expectations written for vendor {other}"),
        }

        // Every register the guest read equals the model's, bar what the CPU itself changes at
        // run time (leaf 1 ECX[27] OSXSAVE follows the guest's CR4).
        let mut compared = 0;
        for ((leaf, sub), got) in &g.raw {
            let want = m
                .get(&(*leaf, *sub))
                .filter(|(_, indexed)| *indexed)
                .or_else(|| m.get(&(*leaf, 0)).filter(|(_, indexed)| !*indexed));
            let Some((want, _)) = want else {
                continue; // beyond the model's leaves: the CPU's out-of-range answer
            };
            for (r, name) in ["eax", "ebx", "ecx", "edx"].iter().enumerate() {
                let mut mask = u32::MAX;
                if *leaf == 1 && *name == "ecx" {
                    mask &= !(1 << 27);
                }
                if pvm && *leaf == 1 && (*name == "ecx" || *name == "edx") {
                    // PVM answers a guest's leaf 1 feature words with the host CPU's own (guest
                    // user mode runs natively and sees those anyway), whatever KVM_SET_CPUID2 said.
                    if (got[r] ^ want[r]) & mask != 0 {
                        eprintln!(
                            "PVM host: leaf 1 {name} is the host CPU's {:#x}, not the model's {:#x} (not compared here)",
                            got[r], want[r]
                        );
                    }
                    continue;
                }
                assert_eq!(
                    got[r] & mask,
                    want[r] & mask,
                    "--cpus {cpus}: leaf {leaf:#x}.{sub} {name}: the guest sees {:#x}, the model says {:#x}",
                    got[r],
                    want[r]
                );
                compared += 1;
            }
        }
        assert!(compared >= 40, "only {compared} registers compared");
        if !pvm {
            assert_eq!(g.num("htt"), u64::from(cpus > 1), "--cpus {cpus}: HTT");
            assert_eq!(g.num("hypervisor_bit"), 1, "--cpus {cpus}");
        }
        eprintln!(
            "--cpus {cpus}: {vendor}, {compared} registers as modelled; ring 3 sees the model: {}",
            g.get("ring3_sees_model")
        );
    }
}

/// `vmm cpuid` without KVM access or with a bad vCPU fails with one line, never a panic.
#[test]
fn vmm_cpuid_rejects_a_vcpu_outside_the_vm() {
    let o = run_with_timeout(
        Command::new(vmm_bin()).args(["cpuid", "--cpus", "2", "--vcpu", "2"]),
        Duration::from_secs(30),
    );
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    assert_eq!(o.stderr.trim().lines().count(), 1, "{}", o.describe());
    assert!(o.stderr.contains("--vcpu 2"), "{}", o.describe());
}
