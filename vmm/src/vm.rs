//! The builder that turns a `VmConfig` into a running VM: KVM, memory, in-kernel irqchip and PIT,
//! legacy I/O, devices, boot state, vCPU threads.

use std::io::{Read, Stdout, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use devices::serial::SerialPort;

use crate::boot::{self, cpu};
use crate::config::VmConfig;
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::exit::GuestExit;
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS, SERIAL_GSI};
use crate::legacy::LegacyIo;
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::Vcpu;
use crate::virtio;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}{hint}", hint = kvm_open_hint(.0))]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM ioctl {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    #[error("vCPU CPU model: {0}")]
    CpuModel(#[from] crate::cpu_model::CpuModelError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error(transparent)]
    Virtio(#[from] virtio::VirtioError),
    #[error(transparent)]
    EventLoop(#[from] crate::event_loop::EventLoopError),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
}

fn kvm_open_hint(e: &kvm_ioctls::Error) -> &'static str {
    match e.errno() {
        libc::ENOENT => " (no KVM on this host: is the kvm module loaded?)",
        libc::EACCES | libc::EPERM => {
            " (permission denied: run as root or join the group that owns /dev/kvm)"
        }
        _ => "",
    }
}

/// A built VM. The KVM handles, guest RAM (mapped, and registered with KVM and the backends)
/// and the in-process backend threads live as long as it does.
pub struct Vm {
    _kvm: Kvm,
    _vm: VmFd,
    _ram: GuestRam,
    vcpus: Vec<Vcpu<Stdout>>,
    io: Arc<Mutex<LegacyIo<Stdout>>>,
    _fallback_threads: virtio::FallbackThreads,
}

impl Vm {
    pub fn new(cfg: &VmConfig) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let vm = kvm
            .create_vm()
            .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;

        let ram = GuestRam::new(cfg.mem_bytes)?;
        for (slot, (r, host)) in ram.host_addresses().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: r.guest_addr,
                memory_size: r.size,
                userspace_addr: host,
            };
            // SAFETY: the mapping behind `host` belongs to `ram`, which the Vm keeps alive as long
            // as the VM fd exists; the region does not overlap another slot.
            unsafe { vm.set_user_memory_region(region) }
                .map_err(|e| VmError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        vm.register_irqfd(&serial_irq, SERIAL_GSI)
            .map_err(|e| VmError::Kvm("KVM_IRQFD (serial)", e))?;
        let io = Arc::new(Mutex::new(LegacyIo::new(SerialPort::new(
            serial_irq,
            std::io::stdout(),
        ))));

        let mut devices = DeviceManager::default();
        let blk =
            virtio::attach_blk_devices(&vm, ram.memory(), &mut devices, &cfg.blk, cfg.trace_vhost)?;
        crate::event_loop::spawn(blk.watches)?;
        let fallback_threads = blk.fallback_threads;
        let mut cmdline = cfg.cmdline.clone();
        let frag = devices.cmdline_fragment();
        if !frag.is_empty() {
            cmdline = format!("{cmdline} {frag}").trim().to_string();
        }
        let kernel = boot::prepare(
            &ram,
            &cfg.kernel,
            cfg.initrd.as_deref(),
            &cmdline,
            cfg.cpus,
            &devices.devices,
        )?;

        let bus = Arc::new(std::mem::take(&mut devices.bus));
        let supported_cpuid = crate::cpu_model::supported_cpuid(&kvm)?;
        let mut vcpus = Vec::new();
        for id in 0..cfg.cpus {
            let fd = vm
                .create_vcpu(id as u64)
                .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
            crate::cpu_model::configure(
                &kvm,
                &fd,
                &supported_cpuid,
                crate::cpu_model::VcpuTopology {
                    id,
                    count: cfg.cpus,
                },
            )?;
            cpu::configure_lapic(&fd)?;
            cpu::configure_fpu(&fd)?;
            // Application processors wait for INIT/SIPI from the BSP, as on real hardware.
            if id == 0 {
                cpu::configure_sregs(&fd, kernel.kind)?;
                cpu::configure_regs(&fd, kernel.kind, kernel.entry)?;
            }
            vcpus.push(Vcpu {
                id,
                fd,
                io: io.clone(),
                mmio: bus.clone(),
                mem: ram.memory().clone(),
            });
        }
        Ok(Vm {
            _kvm: kvm,
            _vm: vm,
            _ram: ram,
            vcpus,
            io,
            _fallback_threads: fallback_threads,
        })
    }

    /// Runs the vCPUs until the first one reports an exit; the caller exits the process, which
    /// ends the other vCPU threads (they may be parked in KVM_RUN waiting for a SIPI).
    pub fn run(self) -> Result<GuestExit, VmError> {
        let (tx, rx) = mpsc::channel();
        self.spawn_stdin_reader();
        let mut handles = Vec::new();
        for mut v in self.vcpus {
            let tx = tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{}", v.id))
                .spawn(move || {
                    let exit = v.run();
                    let _ = tx.send(exit);
                })
                .map_err(VmError::Thread)?;
            handles.push(h);
        }
        drop(tx);
        let exit = rx.recv().unwrap_or_else(|_| {
            GuestExit::VmmError("all vCPU threads ended without a reason".into())
        });
        if let Ok(mut io) = self.io.lock() {
            let _ = io.serial.writer_mut().flush();
        }
        Ok(exit)
    }

    /// Host stdin feeds the UART's receive FIFO, a few bytes at a time as the guest drains it.
    fn spawn_stdin_reader(&self) {
        let io = self.io.clone();
        let _ = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                let mut stdin = std::io::stdin();
                while let Ok(n) = stdin.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    let mut rest = &buf[..n];
                    while !rest.is_empty() {
                        let took = io
                            .lock()
                            .map(|mut io| io.serial.enqueue_input(rest))
                            .unwrap_or(0);
                        rest = &rest[took..];
                        if took == 0 {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                    }
                }
            });
    }
}
