//! What the kernel is told about the machine: the E820 memory map, the command line, the initrd,
//! and the ACPI RSDP, in the shape its entry expects (Linux boot_params or PVH hvm_start_info).

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::kernel::LoadedKernel;
use crate::layout::{
    CMDLINE_START, EBDA_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use crate::memory::RamRegion;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    #[error("cannot write boot parameters to guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
    #[error("initrd ({size} bytes) does not fit in guest memory: {avail} bytes free between the kernel end {kernel_end:#x} and {limit:#x} (raise --mem)")]
    InitrdTooBig {
        size: u64,
        avail: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("command line is {0} bytes; at most {1} are supported")]
    CmdlineTooLong(usize, usize),
    #[error("command line contains a NUL byte")]
    CmdlineNul,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The map every entry path reports: conventional memory, the reserved EBDA/BIOS hole (where our
/// ACPI tables live), RAM from 1 MiB, and RAM above the MMIO gap.
pub fn e820_map(regions: &[RamRegion]) -> Vec<E820Entry> {
    let low = regions[0].size;
    let mut v = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    if low > HIMEM_START {
        v.push(E820Entry {
            addr: HIMEM_START,
            size: low - HIMEM_START,
            kind: E820_RAM,
        });
    }
    for r in &regions[1..] {
        v.push(E820Entry {
            addr: r.guest_addr,
            size: r.size,
            kind: E820_RAM,
        });
    }
    v
}

/// Where the initrd goes: page-aligned at the top of low RAM (below `limit`), above the kernel.
pub fn place_initrd(size: u64, kernel_end: u64, limit: u64) -> Result<u64, ParamsError> {
    let too_big = || ParamsError::InitrdTooBig {
        size,
        avail: limit.saturating_sub(kernel_end),
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if start < kernel_end {
        return Err(too_big());
    }
    Ok(start)
}

pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max: usize) -> Result<(), ParamsError> {
    if cmdline.len() >= max {
        return Err(ParamsError::CmdlineTooLong(cmdline.len(), max - 1));
    }
    if cmdline.contains('\0') {
        return Err(ParamsError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(ParamsError::Write)
}

/// Linux boot_params for the 64-bit entry (bzImage or plain ELF).
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: u64,
) -> Result<(), ParamsError> {
    let mut p = boot_params::default();
    if let Some(h) = kernel.setup_header {
        p.hdr = h;
    }
    p.hdr.type_of_loader = 0xff; // "undefined" boot loader
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448; // "HdrS"
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if kernel.setup_header.is_none() {
        p.hdr.kernel_alignment = 0x0100_0000;
    }
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    p.acpi_rsdp_addr = rsdp;
    for (i, e) in e820.iter().enumerate().take(p.e820_table.len()) {
        p.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    p.e820_entries = e820.len().min(p.e820_table.len()) as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_START))
        .map_err(ParamsError::Write)
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// PVH hvm_start_info (version 1) plus its memory map and, with an initrd, one module entry.
/// Laid out by hand: the layout is the protocol, and here it is visible.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: u64,
) -> Result<(), ParamsError> {
    let w = |v: &[u8], a: u64| {
        mem.write_slice(v, GuestAddress(a))
            .map_err(ParamsError::Write)
    };
    let modlist = PVH_MEMMAP_START + 24 * e820.len() as u64;
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&XEN_HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&(initrd.is_some() as u32).to_le_bytes()); // nr_modules
    info.extend_from_slice(&(if initrd.is_some() { modlist } else { 0 }).to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&rsdp.to_le_bytes());
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // reserved
    w(&info, PVH_INFO_START)?;
    for (i, e) in e820.iter().enumerate() {
        let mut ent = Vec::with_capacity(24);
        ent.extend_from_slice(&e.addr.to_le_bytes());
        ent.extend_from_slice(&e.size.to_le_bytes());
        ent.extend_from_slice(&e.kind.to_le_bytes());
        ent.extend_from_slice(&0u32.to_le_bytes());
        w(&ent, PVH_MEMMAP_START + 24 * i as u64)?;
    }
    if let Some((addr, size)) = initrd {
        // hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
        let mut m = Vec::with_capacity(32);
        for v in [addr, size, 0, 0] {
            m.extend_from_slice(&v.to_le_bytes());
        }
        w(&m, modlist)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_regions;

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_hole() {
        let m = e820_map(&ram_regions(256 << 20));
        assert_eq!(
            m[0],
            E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820_RAM
            }
        );
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(
            m[2],
            E820Entry {
                addr: HIMEM_START,
                size: (256 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
        assert_eq!(e820_map(&ram_regions(4 << 30)).len(), 4);
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(
            place_initrd(0x1800, 0x200000, 0x1000_0000).unwrap(),
            0x1000_0000 - 0x2000
        );
        assert!(place_initrd(0x1000_0000, 0x200000, 0x1000_0000).is_err());
        assert!(place_initrd(u64::MAX, 0, 0x1000).is_err());
    }
}
