//! Recognising and loading the kernel image: bzImage (Linux boot protocol), ELF with a PVH note
//! (vmlinux with CONFIG_PVH, our test guest), or a plain ELF64 entered in long mode.
//!
//! We read the ELF headers ourselves first: the loader crate's errors ("Unable to read kernel
//! image") don't tell a user whether the file is truncated or simply too big for --mem.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::HIMEM_START;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("cannot open kernel {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("cannot read kernel {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{0} is not a kernel: neither an ELF file nor a bzImage (no \"HdrS\" boot header)")]
    NotAKernel(String),
    #[error("{0} is an ELF file but not x86-64 ELF64")]
    WrongElf(String),
    #[error("{path} is a truncated ELF: {what} needs bytes up to {needed} but the file has {len}")]
    Truncated {
        path: String,
        what: String,
        needed: u64,
        len: u64,
    },
    #[error("{path} does not fit in guest memory: it loads up to {end:#x} but RAM below the MMIO gap ends at {ram_end:#x} (raise --mem)")]
    TooBig {
        path: String,
        end: u64,
        ram_end: u64,
    },
    #[error("{path} loads at {addr:#x}, below 1 MiB where the boot structures live")]
    LoadsTooLow { path: String, addr: u64 },
    #[error("{path}: bzImage uses boot protocol {version:#x}; 2.06 or newer is needed")]
    OldBootProtocol { path: String, version: u16 },
    #[error("{path}: bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear: a 32-bit kernel)")]
    No64BitEntry { path: String },
    #[error("loading {path} failed: {err}")]
    Load {
        path: String,
        err: linux_loader::loader::Error,
    },
}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// 32-bit protected mode at the PVH entry, ebx = hvm_start_info.
    Pvh,
    /// 64-bit long mode, identity paging, rsi = boot_params (ELF without PVH note).
    Elf64,
    /// 64-bit entry of a bzImage (protected-mode part + 0x200), rsi = boot_params.
    BzImage,
}

#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub kind: EntryKind,
    pub entry: u64,
    /// First byte past the kernel: the initrd must go above it.
    pub end: u64,
    pub setup_header: Option<setup_header>,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";

fn read_at(f: &mut File, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(buf)
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}
fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Checks ELF64 program headers against the file length and guest RAM, returning the end of the
/// highest PT_LOAD segment.
fn check_elf(path: &str, f: &mut File, len: u64, ram_end: u64) -> Result<u64, KernelError> {
    let rd = |err| KernelError::Read {
        path: path.to_string(),
        err,
    };
    let truncated = |what: String, needed: u64| KernelError::Truncated {
        path: path.to_string(),
        what,
        needed,
        len,
    };
    if len < 64 {
        return Err(truncated("the ELF header".into(), 64));
    }
    let mut eh = [0u8; 64];
    read_at(f, 0, &mut eh).map_err(rd)?;
    // EI_CLASS 2 = ELF64, EI_DATA 1 = little endian, e_machine 0x3e = x86-64.
    if eh[4] != 2 || eh[5] != 1 || le16(&eh, 18) != 0x3e {
        return Err(KernelError::WrongElf(path.to_string()));
    }
    let phoff = le64(&eh, 32);
    let phentsize = le16(&eh, 54) as u64;
    let phnum = le16(&eh, 56) as u64;
    if phentsize != 56 {
        return Err(KernelError::WrongElf(path.to_string()));
    }
    let ph_end = phnum
        .checked_mul(56)
        .and_then(|n| n.checked_add(phoff))
        .unwrap_or(u64::MAX);
    if ph_end > len {
        return Err(truncated("the program header table".into(), ph_end));
    }
    let mut end = 0u64;
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        read_at(f, phoff + i * 56, &mut ph).map_err(rd)?;
        let p_type = u32::from_le_bytes(ph[0..4].try_into().expect("4 bytes"));
        let (offset, paddr, filesz, memsz) =
            (le64(&ph, 8), le64(&ph, 24), le64(&ph, 32), le64(&ph, 40));
        let file_end = offset.saturating_add(filesz);
        if file_end > len {
            return Err(truncated(format!("segment {i}"), file_end));
        }
        if p_type != 1 {
            continue; // only PT_LOAD occupies guest memory
        }
        if paddr < HIMEM_START {
            return Err(KernelError::LoadsTooLow {
                path: path.to_string(),
                addr: paddr,
            });
        }
        let seg_end = paddr.saturating_add(memsz);
        if seg_end > ram_end {
            return Err(KernelError::TooBig {
                path: path.to_string(),
                end: seg_end,
                ram_end,
            });
        }
        end = end.max(seg_end);
    }
    Ok(end)
}

/// Loads the kernel into guest memory. `ram_end` is the end of RAM below the MMIO gap.
pub fn load_kernel(
    path: &Path,
    mem: &GuestMemoryMmap,
    ram_end: u64,
) -> Result<LoadedKernel, KernelError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|err| KernelError::Open {
        path: p.clone(),
        err,
    })?;
    let len = f
        .metadata()
        .map_err(|err| KernelError::Read {
            path: p.clone(),
            err,
        })?
        .len();
    let mut magic = [0u8; 4];
    if len >= 4 {
        read_at(&mut f, 0, &mut magic).map_err(|err| KernelError::Read {
            path: p.clone(),
            err,
        })?;
    }
    let load_err = |err| KernelError::Load {
        path: p.clone(),
        err,
    };

    if magic == ELF_MAGIC {
        let end = check_elf(&p, &mut f, len, ram_end)?;
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        let (kind, entry) = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => (EntryKind::Pvh, a.0),
            _ => (EntryKind::Elf64, r.kernel_load.0),
        };
        return Ok(LoadedKernel {
            kind,
            entry,
            end,
            setup_header: None,
        });
    }

    // bzImage: "HdrS" at 0x202 marks the Linux boot protocol header.
    let mut hdr = [0u8; 0x240]; // through cmdline_size (0x238)
    if len < hdr.len() as u64
        || read_at(&mut f, 0, &mut hdr).is_err()
        || &hdr[0x202..0x206] != b"HdrS"
    {
        return Err(KernelError::NotAKernel(p));
    }
    let version = le16(&hdr, 0x206);
    if version < 0x206 {
        return Err(KernelError::OldBootProtocol { path: p, version });
    }
    // From protocol 2.12 xloadflags says whether the 64-bit entry (load address + 0x200) exists.
    const XLF_KERNEL_64: u16 = 1 << 0;
    if version >= 0x20c && le16(&hdr, 0x236) & XLF_KERNEL_64 == 0 {
        return Err(KernelError::No64BitEntry { path: p });
    }
    let setup_sects = match hdr[0x1f1] {
        0 => 4,
        n => n as u64,
    };
    let payload = len.saturating_sub((setup_sects + 1) * 512);
    if HIMEM_START + payload > ram_end {
        return Err(KernelError::TooBig {
            path: p,
            end: HIMEM_START + payload,
            ram_end,
        });
    }
    let r = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
    // The image we copied is only the start: the kernel decompresses itself elsewhere and needs
    // init_size bytes there before it reads the memory map, so nothing of ours may sit in it.
    let end = match r.setup_header {
        Some(h) => r.kernel_end.max(bzimage_runtime_end(&h, r.kernel_load.0)),
        None => r.kernel_end,
    };
    if end > ram_end {
        return Err(KernelError::TooBig {
            path: p,
            end,
            ram_end,
        });
    }
    Ok(LoadedKernel {
        kind: EntryKind::BzImage,
        // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
        entry: r.kernel_load.0 + 0x200,
        end,
        setup_header: r.setup_header,
    })
}

/// First byte past the memory a bzImage uses while it decompresses and boots: init_size bytes
/// from its "kernel runtime start address" (boot protocol: a relocatable kernel runs at its
/// load address rounded up to kernel_alignment, but never below pref_address; a fixed one at
/// pref_address). Linux's 64-bit decompressor computes the same. pref_address and init_size
/// exist from protocol 2.10 on; before that the header says nothing and the load end stands.
fn bzimage_runtime_end(h: &setup_header, load_addr: u64) -> u64 {
    let (version, pref_address, init_size) = (h.version, h.pref_address, h.init_size);
    if version < 0x20a {
        return load_addr;
    }
    let runtime_start = if h.relocatable_kernel != 0 {
        let align = u64::from(h.kernel_alignment).max(1);
        load_addr
            .max(pref_address)
            .checked_next_multiple_of(align)
            .unwrap_or(u64::MAX)
    } else {
        pref_address
    };
    runtime_start.saturating_add(u64::from(init_size))
}
