//! The virtual CPU a guest sees: its CPUID and the MSRs a guest reads to decide how far to trust
//! its CPU. The same model on every x86 host, Intel and AMD (Hygon counts as AMD).
//!
//! How it is built (in the manner of Firecracker's and Cloud Hypervisor's CPUID normalization):
//!
//! 1. Start from `KVM_GET_SUPPORTED_CPUID`: what this KVM can virtualize on this host. Left as it
//!    is, it describes the *host's* package (a guest with more vCPUs than the host package has
//!    cores sees several packages with cores missing), offers features this VMM does not back
//!    (nested virtualization, SGX, SEV), and on AMD promises an invariant TSC that Linux then
//!    checks against MSR_K7_HWCR and finds wrong (`[Firmware Bug]: TSC doesn't count with P0
//!    frequency!`).
//! 2. Apply one table of changes, [`cpuid::LEAF_RULES`] and [`cpuid::REGISTER_RULES`]: each row
//!    names the leaf, the register and bits, what we put there and why. `vmm cpuid --explain`
//!    prints the table; `vmm cpuid` prints the result for one vCPU with every change marked.
//! 3. Write the MSRs of [`msr::boot_msrs`] (MTRR default type, Intel's MISC_ENABLE, AMD's HWCR).
//!
//! The topology is one package of `count` cores with one thread each; vCPU `i` has APIC ID `i`
//! (KVM's default), so the core field of an APIC ID is `core_bits` wide.
//!
//! Everything here is a pure function of KVM's table and a few host facts ([`HostCaps`]), so the
//! unit tests run it on tables captured from real Intel and AMD hosts (`testdata/`) on any machine.
//!
//! A fact about PVM hosts worth knowing: KVM's PVM backend runs guest ring-3 code natively, and
//! a CPUID executed there is not intercepted: it returns the *host's* values, not this model.
//! Guest kernels (ring 0) see this model; the test guest therefore reads CPUID in its ring-0
//! boot stub when it reports what it sees (`resources/guest`, test `cpuid`).

pub mod cpuid;
pub mod msr;
pub mod report;
pub mod table;

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

#[derive(Debug, thiserror::Error)]
pub enum CpuModelError {
    #[error("KVM ioctl {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("the CPUID table has {0} entries, more than KVM takes")]
    TooManyEntries(usize),
    #[error("KVM refused MSR {name} ({index:#x}) = {value:#x}")]
    MsrRefused {
        name: &'static str,
        index: u32,
        value: u64,
    },
}

/// The CPU vendor named by leaf 0 of KVM's table. Decides which topology leaves apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    Intel,
    Amd,
    /// Hygon Dhyana: AMD's Zen design under another name; treated as AMD.
    Hygon,
    /// Any other vendor string: only the vendor-independent rules apply.
    Other([u8; 12]),
}

impl Vendor {
    /// The vendor of a CPUID table: leaf 0 EBX, EDX, ECX spell it.
    pub fn of(entries: &[kvm_cpuid_entry2]) -> Vendor {
        let Some(l0) = entries.iter().find(|e| e.function == 0) else {
            return Vendor::Other([0; 12]);
        };
        let mut s = [0u8; 12];
        s[0..4].copy_from_slice(&l0.ebx.to_le_bytes());
        s[4..8].copy_from_slice(&l0.edx.to_le_bytes());
        s[8..12].copy_from_slice(&l0.ecx.to_le_bytes());
        match &s {
            b"GenuineIntel" => Vendor::Intel,
            b"AuthenticAMD" => Vendor::Amd,
            b"HygonGenuine" => Vendor::Hygon,
            _ => Vendor::Other(s),
        }
    }

    /// AMD's leaf layout (0x80000008 core count, 0x8000001D/E topology extensions, HWCR).
    pub fn is_amd_like(self) -> bool {
        matches!(self, Vendor::Amd | Vendor::Hygon)
    }

    pub fn name(self) -> String {
        match self {
            Vendor::Intel => "GenuineIntel".into(),
            Vendor::Amd => "AuthenticAMD".into(),
            Vendor::Hygon => "HygonGenuine".into(),
            Vendor::Other(s) => String::from_utf8_lossy(&s).escape_debug().to_string(),
        }
    }
}

/// Where one vCPU sits: one package of `count` cores, one thread per core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuTopology {
    /// This vCPU's index, which is also its APIC ID.
    pub id: u32,
    /// vCPUs in the VM (all in one package).
    pub count: u32,
}

impl VcpuTopology {
    /// Width of the core field in an APIC ID: the bits needed for `count` distinct IDs.
    pub fn core_bits(&self) -> u32 {
        self.count.max(1).next_power_of_two().trailing_zeros()
    }
}

/// Facts about this host's KVM that the model depends on (probed once per vCPU by
/// `boot::cpu::configure_cpu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCaps {
    /// KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC has the TSC-deadline timer mode.
    pub tsc_deadline_timer: bool,
    /// KVM accepts MSR_K7_HWCR with TscFreqSel set (Linux 6.6+). Without it an AMD guest must not
    /// be promised an invariant TSC, or Linux reports a firmware bug.
    pub hwcr_tsc_freq_sel: bool,
}

/// What every rule may look at.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub vendor: Vendor,
    pub topo: VcpuTopology,
    pub caps: HostCaps,
    /// Intel architectural PMU version from leaf 0xA EAX[7:0] of KVM's table (0: no PMU).
    pub pmu_version: u32,
}

/// The vCPU as the guest will see it.
#[derive(Debug, Clone)]
pub struct CpuModel {
    pub vendor: Vendor,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<msr::BootMsr>,
}

/// Builds the model of vCPU `topo.id` from KVM's supported table.
pub fn build(supported: &[kvm_cpuid_entry2], topo: VcpuTopology, caps: HostCaps) -> CpuModel {
    let vendor = Vendor::of(supported);
    let pmu_version = supported
        .iter()
        .find(|e| e.function == 0xa && e.index == 0)
        .map(|e| e.eax & 0xff)
        .unwrap_or(0);
    let ctx = Ctx {
        vendor,
        topo,
        caps,
        pmu_version,
    };
    let cpuid = cpuid::normalize(supported, &ctx);
    let msrs = msr::boot_msrs(&ctx, &cpuid);
    CpuModel {
        vendor,
        cpuid,
        msrs,
    }
}

/// Writes one MSR; true when KVM took it.
fn set_msr(vcpu: &VcpuFd, index: u32, value: u64) -> Result<bool, CpuModelError> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data: value,
        ..Default::default()
    }])
    .map_err(|_| CpuModelError::TooManyEntries(1))?;
    // KVM_SET_MSRS returns how many entries it wrote: 0 when it refused the first.
    match vcpu.set_msrs(&msrs) {
        Ok(n) => Ok(n == 1),
        Err(e) => Err(CpuModelError::Kvm("KVM_SET_MSRS", e)),
    }
}

/// What this host's KVM backs, asked of KVM itself. The HWCR probe writes the value the model
/// will write again, so it leaves nothing behind that the model does not want.
pub fn probe_host_caps(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    vendor: Vendor,
) -> Result<HostCaps, CpuModelError> {
    let hwcr_tsc_freq_sel = if vendor.is_amd_like() {
        set_msr(vcpu, msr::MSR_K7_HWCR, msr::HWCR_TSC_FREQ_SEL)?
    } else {
        false
    };
    Ok(HostCaps {
        tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
        hwcr_tsc_freq_sel,
    })
}

/// KVM_GET_SUPPORTED_CPUID as a plain list.
pub fn supported_cpuid(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, CpuModelError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map(|c| c.as_slice().to_vec())
        .map_err(|e| CpuModelError::Kvm("KVM_GET_SUPPORTED_CPUID", e))
}

/// Builds vCPU `topo.id`'s model from `supported` (KVM_GET_SUPPORTED_CPUID, fetched once per
/// VM) and gives it to KVM: CPUID first, then the MSRs (every one must be taken; a refusal is
/// an error naming the MSR).
pub fn configure(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    supported: &[kvm_cpuid_entry2],
    topo: VcpuTopology,
) -> Result<CpuModel, CpuModelError> {
    let caps = probe_host_caps(kvm, vcpu, Vendor::of(supported))?;
    let model = build(supported, topo, caps);
    let cpuid = CpuId::from_entries(&model.cpuid)
        .map_err(|_| CpuModelError::TooManyEntries(model.cpuid.len()))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| CpuModelError::Kvm("KVM_SET_CPUID2", e))?;
    for m in &model.msrs {
        if !set_msr(vcpu, m.index, m.value)? {
            return Err(CpuModelError::MsrRefused {
                name: m.name,
                index: m.index,
                value: m.value,
            });
        }
    }
    tracing::debug!(
        vcpu = topo.id,
        vendor = %model.vendor.name(),
        entries = model.cpuid.len(),
        ?caps,
        "CPU model configured"
    );
    Ok(model)
}

#[cfg(test)]
mod tests;
