//! One thread per vCPU running KVM_RUN, dispatching port and MMIO exits, and turning the exits
//! that end a VM into a `GuestExit` with a message a person can act on.

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device_manager::MmioBus;
use crate::exit::GuestExit;
use crate::legacy::LegacyIo;

pub struct Vcpu<W: Write + Send> {
    pub id: u32,
    pub fd: VcpuFd,
    pub io: Arc<Mutex<LegacyIo<W>>>,
    pub mmio: Arc<MmioBus>,
    pub mem: GuestMemoryMmap,
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

impl<W: Write + Send> Vcpu<W> {
    /// Runs until something ends the VM.
    pub fn run(&mut self) -> GuestExit {
        loop {
            let exit = match self.fd.run() {
                Ok(e) => e,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return GuestExit::VmmError(format!("KVM_RUN failed on vCPU {}: {e}", self.id))
                }
            };
            match exit {
                VcpuExit::IoOut(port, data) => {
                    let r = self.io.lock().map(|mut io| io.write(port, data));
                    match r {
                        Ok(Some(exit)) => return exit,
                        Ok(None) => {}
                        Err(_) => return GuestExit::VmmError("I/O port lock poisoned".into()),
                    }
                }
                VcpuExit::IoIn(port, data) => match self.io.lock() {
                    Ok(mut io) => io.read(port, data),
                    Err(_) => return GuestExit::VmmError("I/O port lock poisoned".into()),
                },
                VcpuExit::MmioRead(addr, data) => self.mmio.read(addr, data),
                VcpuExit::MmioWrite(addr, data) => self.mmio.write(addr, data),
                // With the in-kernel irqchip HLT stays in the kernel; if it exits, just resume.
                VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                VcpuExit::Shutdown => {
                    let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    return GuestExit::TripleFault { cpu: self.id, rip };
                }
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => return GuestExit::PowerOff,
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
                    return GuestExit::Reset {
                        how: "KVM system event",
                    }
                }
                VcpuExit::InternalError => {
                    return GuestExit::InternalError {
                        cpu: self.id,
                        detail: self.describe_internal_error(),
                    }
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    return GuestExit::InternalError {
                        cpu: self.id,
                        detail: format!(
                            "VM entry failed, hardware reason {reason:#x} (host cpu {cpu})"
                        ),
                    }
                }
                other => {
                    let what = format!("unexpected exit {other:?}");
                    return GuestExit::InternalError {
                        cpu: self.id,
                        detail: format!("{what} at {}", self.rip_and_bytes().0),
                    };
                }
            }
        }
    }

    /// "rip=0x... bytes=0f 01 ca ..." read through the guest's own page tables.
    fn rip_and_bytes(&self) -> (String, Vec<u8>) {
        let Ok(regs) = self.fd.get_regs() else {
            return ("rip=?".into(), vec![]);
        };
        let mut bytes = vec![0u8; 15];
        let phys = match self.fd.translate_gva(regs.rip) {
            Ok(t) if t.valid != 0 => Some(t.physical_address),
            _ => None,
        };
        let ok = phys
            .map(|p| self.mem.read_slice(&mut bytes, GuestAddress(p)).is_ok())
            .unwrap_or(false);
        if !ok {
            bytes.clear();
        }
        (format!("rip={:#x}", regs.rip), bytes)
    }

    fn describe_internal_error(&mut self) -> String {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member of the
        // kvm_run union; we only read it.
        let (suberror, ndata, data) = unsafe {
            let run = self.fd.get_kvm_run();
            let i = run.__bindgen_anon_1.internal;
            (i.suberror, i.ndata, i.data)
        };
        let (rip, mut bytes) = self.rip_and_bytes();
        // Newer kernels hand over the instruction bytes they failed on; prefer those.
        if suberror == KVM_INTERNAL_ERROR_EMULATION
            && ndata >= 2
            && data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0
        {
            let n = (data[1] as usize).min(15).min((ndata as usize - 2) * 8);
            bytes = data[2..]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .take(n)
                .collect();
        }
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let what = match suberror {
            1 => "instruction emulation failed",
            2 => "simultaneous exceptions",
            3 => "delivery event",
            _ => "internal error",
        };
        format!(
            "{what} (suberror {suberror}) at {rip}, instruction bytes [{}]; likely cause: {}",
            hex.join(" "),
            likely_cause(&bytes)
        )
    }
}

/// Instructions we know a software-emulating KVM (such as PVM's ring-0 emulator) cannot handle,
/// with the kernel parameter that steers Linux around them.
pub fn likely_cause(bytes: &[u8]) -> &'static str {
    // Skip legacy prefixes and REX.
    let mut i = 0;
    while i < bytes.len()
        && matches!(
            bytes[i],
            0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x2e | 0x3e | 0x26 | 0x36 | 0x64 | 0x65 | 0x40
                ..=0x4f
        )
    {
        i += 1;
    }
    let op = &bytes[i.min(bytes.len())..];
    let has = |p: u8| bytes[..i].contains(&p);
    match op {
        [0x0f, 0x01, 0xca, ..] | [0x0f, 0x01, 0xcb, ..] => {
            "CLAC/STAC (SMAP) not emulated by this KVM; boot Linux with clearcpuid=308 (or nosmap)"
        }
        [0x0f, 0xae, m, ..] if (m >> 3) & 7 == 5 && m >> 6 != 3 => "XRSTOR not emulated by this KVM; boot Linux with noxsave",
        [0x0f, 0xae, m, ..] if (m >> 3) & 7 == 4 && m >> 6 != 3 => "XSAVE not emulated by this KVM; boot Linux with noxsave",
        [0x0f, 0xb8, ..] if has(0xf3) => "POPCNT not emulated by this KVM; boot Linux with clearcpuid=151",
        [0x0f, 0xc7, m, ..] if (m >> 3) & 7 == 1 => "CMPXCHG8B/16B not emulated; hide CX16 (clearcpuid=141)",
        [0xcc, ..] => "INT3 not emulated by this KVM (Linux's int3 self-test hits it)",
        [0x9b, ..] => "FWAIT not emulated by this KVM",
        [] => "guest memory at RIP is not readable (bad RIP or page tables)",
        _ => "an instruction this KVM cannot emulate (on PVM hosts ring-0 guest code is emulated: see README)",
    }
}

#[cfg(test)]
mod tests {
    use super::likely_cause;

    #[test]
    fn known_instructions_get_a_hint() {
        assert!(likely_cause(&[0x0f, 0x01, 0xca]).contains("clearcpuid=308"));
        assert!(likely_cause(&[0x48, 0x0f, 0xae, 0x2f]).contains("noxsave"));
        assert!(likely_cause(&[0xf3, 0x48, 0x0f, 0xb8, 0xc0]).contains("POPCNT"));
        assert!(likely_cause(&[0xcc]).contains("INT3"));
        assert!(likely_cause(&[]).contains("not readable"));
        assert!(likely_cause(&[0x90]).contains("cannot emulate"));
    }
}
