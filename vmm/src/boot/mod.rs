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
    let k = kernel::load_kernel(kernel_path, mem, low_end)?;

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

    // A bzImage states how long a command line it reads (without the NUL); Linux silently cuts
    // a longer one, and the virtio_mmio.device= entries we append at the end would be lost.
    let cmdline_max = match k.setup_header {
        Some(h) => CMDLINE_MAX_SIZE.min(h.cmdline_size as usize + 1),
        None => CMDLINE_MAX_SIZE,
    };
    params::write_cmdline(mem, cmdline, cmdline_max)?;
    let e820 = params::e820_map(ram.regions());
    let rsdp = acpi::write_tables(mem, cpus, mmio_devices)?;
    match k.kind {
        EntryKind::Pvh => params::write_pvh_start_info(mem, initrd, &e820, rsdp)?,
        _ => params::write_zero_page(mem, &k, cmdline.len() + 1, initrd, &e820, rsdp)?,
    }
    cpu::write_boot_structures(mem, k.kind)?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    const MIB: u64 = 1 << 20;

    /// A bzImage with just the setup header a loader reads: one setup sector, a 4 KiB payload,
    /// and the decompression numbers of a relocatable kernel (runs at 16 MiB, needs 8 MiB).
    fn fake_bzimage() -> TempFile {
        fake_bzimage_with_xloadflags(1)
    }

    fn fake_bzimage_with_xloadflags(xloadflags: u16) -> TempFile {
        let mut img = vec![0u8; 1024 + 4096];
        let put = |img: &mut Vec<u8>, off: usize, bytes: &[u8]| {
            img[off..off + bytes.len()].copy_from_slice(bytes)
        };
        img[0x1f1] = 1; // setup_sects
        put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
        put(&mut img, 0x202, b"HdrS");
        put(&mut img, 0x206, &0x020fu16.to_le_bytes()); // protocol 2.15
        img[0x211] = 1; // loadflags: LOADED_HIGH
        put(&mut img, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        put(&mut img, 0x230, &(2 * MIB as u32).to_le_bytes()); // kernel_alignment
        img[0x234] = 1; // relocatable_kernel
        put(&mut img, 0x236, &xloadflags.to_le_bytes()); // 1 = XLF_KERNEL_64
        put(&mut img, 0x238, &2047u32.to_le_bytes()); // cmdline_size
        put(&mut img, 0x258, &(16 * MIB).to_le_bytes()); // pref_address
        put(&mut img, 0x260, &(8 * MIB as u32).to_le_bytes()); // init_size
        let f = TempFile::new().unwrap();
        f.as_file().write_all(&img).unwrap();
        f
    }

    fn initrd(size: u64) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        f
    }

    #[test]
    fn bzimage_initrd_stays_clear_of_where_the_kernel_decompresses() {
        let kernel = fake_bzimage();
        let ram = GuestRam::new(32 * MIB).unwrap();
        // The kernel runs at [16 MiB, 24 MiB): a 12 MiB initrd at the top of 32 MiB would start
        // at 20 MiB, inside it, so it cannot be placed.
        let rd = initrd(12 * MIB);
        let r = prepare(&ram, kernel.as_path(), Some(rd.as_path()), "", 1, &[]);
        assert!(
            matches!(
                r,
                Err(BootError::Params(params::ParamsError::InitrdTooBig { kernel_end, .. }))
                    if kernel_end == 24 * MIB
            ),
            "{r:?}"
        );
        // One that fits above 24 MiB is placed there.
        let rd = initrd(4 * MIB);
        let k = prepare(&ram, kernel.as_path(), Some(rd.as_path()), "", 1, &[]).unwrap();
        assert_eq!(k.end, 24 * MIB);
        let zero_page: linux_loader::loader::bootparam::boot_params = ram
            .memory()
            .read_obj(GuestAddress(crate::layout::ZERO_PAGE_START))
            .unwrap();
        let image = zero_page.hdr.ramdisk_image;
        assert_eq!(u64::from(image), 28 * MIB);
    }

    #[test]
    fn bzimage_command_line_is_bounded_by_the_kernels_cmdline_size() {
        let kernel = fake_bzimage();
        let ram = GuestRam::new(32 * MIB).unwrap();
        // The header says 2047 bytes; the kernel would cut a longer line without a word.
        let r = prepare(&ram, kernel.as_path(), None, &"x".repeat(2048), 1, &[]);
        assert!(
            matches!(
                r,
                Err(BootError::Params(params::ParamsError::CmdlineTooLong(
                    2048, 2047
                )))
            ),
            "{r:?}"
        );
        prepare(&ram, kernel.as_path(), None, &"x".repeat(2047), 1, &[]).unwrap();
    }

    #[test]
    fn bzimage_without_a_64bit_entry_is_refused() {
        let kernel = fake_bzimage_with_xloadflags(0);
        let ram = GuestRam::new(32 * MIB).unwrap();
        let r = prepare(&ram, kernel.as_path(), None, "", 1, &[]);
        assert!(
            matches!(
                r,
                Err(BootError::Kernel(kernel::KernelError::No64BitEntry { .. }))
            ),
            "{r:?}"
        );
    }

    #[test]
    fn bzimage_needing_more_than_ram_is_refused() {
        let kernel = fake_bzimage();
        // 16 MiB of RAM: the kernel would decompress to [16 MiB, 24 MiB), beyond the end.
        let ram = GuestRam::new(16 * MIB).unwrap();
        let r = prepare(&ram, kernel.as_path(), None, "", 1, &[]);
        assert!(
            matches!(
                r,
                Err(BootError::Kernel(kernel::KernelError::TooBig { end, .. })) if end == 24 * MIB
            ),
            "{r:?}"
        );
    }
}
