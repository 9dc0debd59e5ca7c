//! `vmm cpuid`: the model as text, for people and for capturing test data.

use std::fmt::Write;

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::Kvm;

use super::cpuid::{lookup, LeafEdit, Reg, LEAF_RULES, REGISTER_RULES};
use super::{build, probe_host_caps, supported_cpuid, table, CpuModelError, VcpuTopology, Vendor};

/// What the kernel module behind /dev/kvm is, for the provenance line.
fn kvm_flavour() -> &'static str {
    let has = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    if has("kvm_pvm") {
        "PVM (kvm_pvm)"
    } else if has("kvm_intel") {
        "hardware (kvm_intel)"
    } else if has("kvm_amd") {
        "hardware (kvm_amd)"
    } else {
        "unknown"
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn host_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Today's date (UTC) as YYYY-MM-DD, from the days since 1970 (the civil-from-days algorithm).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Family, model and stepping as Linux computes them from leaf 1 EAX.
pub fn family_model_stepping(entries: &[kvm_cpuid_entry2]) -> (u32, u32, u32) {
    let eax = lookup(entries, 1, 0).map(|e| e.eax).unwrap_or(0);
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let mut model = (eax >> 4) & 0xf;
    if base_family >= 6 {
        model |= ((eax >> 16) & 0xf) << 4;
    }
    (family, model, eax & 0xf)
}

/// `vmm cpuid --supported`: KVM's table with its provenance, in the format of `testdata/`.
pub fn supported(kvm: &Kvm) -> Result<String, CpuModelError> {
    let entries = supported_cpuid(kvm)?;
    let (f, m, s) = family_model_stepping(&entries);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# KVM_GET_SUPPORTED_CPUID, captured with `vmm cpuid --supported` on {}",
        today()
    );
    let _ = writeln!(
        out,
        "# host CPU: {} ({}, family {f:#x} model {m:#x} stepping {s})",
        host_model_name(),
        Vendor::of(&entries).name()
    );
    let _ = writeln!(
        out,
        "# host kernel: {}; /dev/kvm: {}",
        kernel_release(),
        kvm_flavour()
    );
    out.push_str(&table::format(&entries));
    Ok(out)
}

/// `vmm cpuid --explain`: the table of rules.
pub fn explain() -> String {
    let mut out = String::from("Whole leaves (applied first):\n");
    for r in LEAF_RULES {
        let what = match r.edit {
            LeafEdit::Zero => "zeroed",
            LeafEdit::Rebuild(_) => "rebuilt",
        };
        let _ = writeln!(
            out,
            "  {:<6} {:#010x} {what}: {}\n{:>20}why: {}",
            r.vendors.name(),
            r.leaf,
            r.what,
            "",
            r.why
        );
    }
    out.push_str("Registers:\n");
    for r in REGISTER_RULES {
        let sub = match r.sub {
            super::cpuid::Sub::All => String::new(),
            super::cpuid::Sub::Index(i) => format!(".{i}"),
            super::cpuid::Sub::Caches => ".caches".into(),
        };
        let _ = writeln!(
            out,
            "  {:<6} {:#010x}{sub:<7} {}{:<9} {}\n{:>20}why: {}",
            r.vendors.name(),
            r.leaf,
            r.reg.name(),
            r.edit.bits(),
            r.what,
            "",
            r.why
        );
    }
    out
}

/// `vmm cpuid [--cpus N] [--vcpu I]`: the table vCPU I of an N-vCPU VM gets, each register we
/// changed marked with KVM's value beside it, then the MSRs.
pub fn model(kvm: &Kvm, topo: VcpuTopology) -> Result<String, CpuModelError> {
    let supported = supported_cpuid(kvm)?;
    let vm = kvm
        .create_vm()
        .map_err(|e| CpuModelError::Kvm("KVM_CREATE_VM", e))?;
    let vcpu = vm
        .create_vcpu(u64::from(topo.id))
        .map_err(|e| CpuModelError::Kvm("KVM_CREATE_VCPU", e))?;
    let caps = probe_host_caps(kvm, &vcpu, Vendor::of(&supported))?;
    let m = build(&supported, topo, caps);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# vCPU {} of {}: vendor {}, {caps:?}",
        topo.id,
        topo.count,
        m.vendor.name()
    );
    let _ = writeln!(
        out,
        "# '*' marks an entry we changed; KVM's values follow it"
    );
    let _ = writeln!(out, "  {}", &table::HEADER[2..]);
    for e in &m.cpuid {
        let kvm_e = supported
            .iter()
            .find(|s| s.function == e.function && s.index == e.index);
        let changed: Vec<String> = [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx]
            .iter()
            .filter_map(|r| match kvm_e {
                Some(k) if r.get(k) != r.get(e) => Some(format!("{}={:#010x}", r.name(), r.get(k))),
                Some(_) => None,
                None => Some(format!("{}=(absent)", r.name())),
            })
            .collect();
        let mark = if changed.is_empty() { ' ' } else { '*' };
        let _ = write!(out, "{mark} {}", table::format_entry(e));
        if !changed.is_empty() {
            let _ = write!(out, "   KVM: {}", changed.join(" "));
        }
        out.push('\n');
    }
    out.push_str("# MSRs written before the first KVM_RUN\n");
    for msr in &m.msrs {
        let _ = writeln!(
            out,
            "  {:<16} {:#010x} = {:#x}: {}",
            msr.name, msr.index, msr.value, msr.why
        );
    }
    Ok(out)
}
