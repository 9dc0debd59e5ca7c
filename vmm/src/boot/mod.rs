//! Getting a kernel to its first instruction: load it, describe the machine to it (E820, command
//! line, initrd, ACPI), and set up the vCPU state its entry protocol expects.

pub mod acpi;
pub mod cpu;
pub mod kernel;
pub mod params;

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

pub use kernel::{EntryKind, LoadedKernel};

use crate::layout::{CMDLINE_MAX_SIZE, MMIO_GAP_START};
use crate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Params(#[from] params::ParamsError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("cannot read initrd {path}: {err}")]
    Initrd { path: String, err: std::io::Error },
}

/// Everything boot-related written into guest memory; returns where and how to enter.
pub fn prepare(
    ram: &GuestRam,
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &str,
    cpus: u32,
    mmio_devices: &[acpi::MmioDeviceInfo],
) -> Result<LoadedKernel, BootError> {
    let mem = ram.memory();
    let low_end = ram.low_ram_end();
    let mut k = kernel::load_kernel(kernel_path, mem, low_end)?;
    if let (EntryKind::BzImage, Some(h)) = (k.kind, k.setup_header) {
        // The bzImage decompresses in place and needs init_size bytes from its load address.
        k.end = k.end.max(crate::layout::HIMEM_START + h.init_size as u64);
    }

    let initrd = match initrd_path {
        None => None,
        Some(p) => {
            let ps = p.display().to_string();
            let data = std::fs::read(p).map_err(|err| BootError::Initrd {
                path: ps.clone(),
                err,
            })?;
            // A bzImage states the highest address its initrd may end at.
            let limit = match k.setup_header {
                Some(h) if h.initrd_addr_max != 0 => low_end.min(h.initrd_addr_max as u64 + 1),
                _ => low_end.min(MMIO_GAP_START),
            };
            let addr = params::place_initrd(data.len() as u64, k.end, limit)?;
            mem.write_slice(&data, GuestAddress(addr))
                .map_err(params::ParamsError::Write)?;
            Some((addr, data.len() as u64))
        }
    };

    params::write_cmdline(mem, cmdline, CMDLINE_MAX_SIZE)?;
    let e820 = params::e820_map(ram.regions());
    let rsdp = acpi::write_tables(mem, cpus, mmio_devices)?;
    match k.kind {
        EntryKind::Pvh => params::write_pvh_start_info(mem, initrd, &e820, rsdp)?,
        _ => params::write_zero_page(mem, &k, cmdline.len() + 1, initrd, &e820, rsdp)?,
    }
    cpu::write_boot_structures(mem, k.kind)?;
    Ok(k)
}
