//! Attaching virtio devices whose queues a vhost-user backend serves: connect (or start the
//! in-process fallback), handshake, wrap in a virtio-mmio transport, and wire the data path
//! into KVM so that it never passes through this process:
//!   guest write to QueueNotify → KVM ioeventfd → backend's kick fd,
//!   backend's call fd → KVM irqfd → guest interrupt.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;

use std::path::PathBuf;

use devices::blk::backend::{BlkBackend, BlkBackendConfig, BlkError};
use devices::virtio_mmio::{
    error_chain as chain, Connector, DeviceKind, MemoryTable, MmioTransport, ReconnectPolicy,
    VhostUserDevice, VhostUserDeviceOptions, QUEUE_NOTIFY,
};
use vhost_frontend::connection::{
    connect_with_timeout, Frontend, VhostUserFrontend, CONNECT_TIMEOUT,
};
use vhost_frontend::trace::printable;

use crate::boot::acpi::MmioDeviceInfo;
use crate::config::BlkConfig;
use crate::device_manager::{DeviceManager, MmioDevice};
use crate::event_loop::{BackendWatch, EventLoopError};

/// Queue size we offer the guest for blk devices (QEMU's vhost-user-blk default is 128).
pub const BLK_QUEUE_SIZE: u16 = 256;
/// A backend that takes longer than this for one control exchange (the request sent and its whole
/// reply received: one deadline, not one per read) is treated as hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("blk device {index} ({what}): cannot start the in-process backend: {source}")]
    Fallback {
        index: usize,
        what: String,
        source: BlkError,
    },
    #[error("blk device {index}: cannot connect to vhost-user backend at {path}: {source}")]
    Connect {
        index: usize,
        path: String,
        source: std::io::Error,
    },
    #[error("blk device {index} ({what}): {detail}")]
    Device {
        index: usize,
        what: String,
        detail: String,
    },
    #[error("blk device {index}: KVM ioctl {ioctl} failed: {source}")]
    Kvm {
        index: usize,
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    DeviceManager(#[from] crate::device_manager::DeviceManagerError),
    #[error("blk device {index}: {source}")]
    EventLoop {
        index: usize,
        source: EventLoopError,
    },
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
}

/// Backends started in this process; they end when their connection closes.
pub type FallbackThreads = Vec<JoinHandle<Result<(), BlkError>>>;

/// What the blk devices leave to the VMM: the in-process backend threads, and for each device
/// the event loop's watch on its backend.
pub struct AttachedBlk {
    pub fallback_threads: FallbackThreads,
    pub watches: Vec<BackendWatch>,
}

/// Adds one virtio-blk device per `--blk`.
pub fn attach_blk_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    dm: &mut DeviceManager,
    blks: &[BlkConfig],
    trace: bool,
) -> Result<AttachedBlk, VirtioError> {
    let mut threads = Vec::new();
    let mut watches = Vec::new();
    for (index, blk) in blks.iter().enumerate() {
        let connector: Box<dyn Connector>;
        let policy: ReconnectPolicy;
        let socket_path: Option<&std::path::Path>;
        let (stream, what, queues): (UnixStream, String, u16) = match blk {
            BlkConfig::InProcess {
                path,
                readonly,
                queues,
                direct,
                engine,
            } => {
                let what = format!(
                    "in-process backend for {}",
                    printable(&path.to_string_lossy())
                );
                let cfg = BlkBackendConfig {
                    path: path.clone(),
                    readonly: *readonly,
                    num_queues: *queues,
                    queue_size: BLK_QUEUE_SIZE,
                    direct: *direct,
                    engine: *engine,
                };
                let (s, t) = BlkBackend::spawn_in_process(cfg.clone()).map_err(|source| {
                    VirtioError::Fallback {
                        index,
                        what: what.clone(),
                        source,
                    }
                })?;
                threads.push(t);
                connector = Box::new(InProcessConnector {
                    index,
                    cfg,
                    trace,
                    threads: Vec::new(),
                });
                // It goes away only if its thread ends; a new one then takes over.
                policy = ReconnectPolicy::DEFAULT;
                socket_path = None;
                (s, what, *queues)
            }
            BlkConfig::Socket {
                path,
                queues,
                reconnect,
            } => {
                // Escaped: the path goes into one error line, and must not make it two.
                let p = printable(&path.to_string_lossy()).into_owned();
                // Bounded: a backend whose listen backlog is full and that never accepts would
                // otherwise block vmm's start for ever.
                let s = connect_with_timeout(path, CONNECT_TIMEOUT).map_err(|source| {
                    VirtioError::Connect {
                        index,
                        path: p.clone(),
                        source,
                    }
                })?;
                connector = Box::new(SocketConnector {
                    index,
                    path: path.clone(),
                    trace,
                });
                policy = *reconnect;
                socket_path = Some(path);
                (s, format!("backend at {p}"), *queues)
            }
        };
        let info = dm.allocate()?;
        let (transport, device) =
            blk_transport(index, &what, stream, queues, mem, trace, connector, policy)?;
        wire_into_kvm(vm, index, &info, &transport)?;
        let transport = Arc::new(Mutex::new(transport));
        let watch = BackendWatch::new(device, Arc::clone(&transport), socket_path)
            .map_err(|source| VirtioError::EventLoop { index, source })?;
        watches.push(watch);
        dm.attach(info, transport);
    }
    Ok(AttachedBlk {
        fallback_threads: threads,
        watches,
    })
}

/// A frontend on `stream`, set up the same way for the first connection and every reconnect.
fn blk_frontend(index: usize, stream: UnixStream, trace: bool) -> Frontend {
    let mut frontend = Frontend::from_stream(stream, format!("blk{index}"));
    frontend.set_trace(trace);
    frontend.set_virtio_device_id(vhost_frontend::features::VIRTIO_ID_BLOCK);
    // Never fails (the Result is historical).
    let _ = frontend.set_reply_timeout(Some(REPLY_TIMEOUT));
    frontend
}

/// Reconnects to a backend listening on a unix socket.
struct SocketConnector {
    index: usize,
    path: PathBuf,
    trace: bool,
}

impl Connector for SocketConnector {
    fn connect(&mut self) -> Result<Box<dyn VhostUserFrontend + Send>, String> {
        let stream = connect_with_timeout(&self.path, CONNECT_TIMEOUT).map_err(|e| {
            format!(
                "cannot connect to {}: {e}",
                printable(&self.path.to_string_lossy())
            )
        })?;
        Ok(Box::new(blk_frontend(self.index, stream, self.trace)))
    }
}

/// Starts a fresh in-process backend (on a new socketpair) if the previous one ended.
struct InProcessConnector {
    index: usize,
    cfg: BlkBackendConfig,
    trace: bool,
    threads: FallbackThreads,
}

impl Connector for InProcessConnector {
    fn connect(&mut self) -> Result<Box<dyn VhostUserFrontend + Send>, String> {
        self.threads.retain(|t| !t.is_finished());
        let (stream, thread) = BlkBackend::spawn_in_process(self.cfg.clone())
            .map_err(|e| format!("cannot start the in-process backend: {e}"))?;
        self.threads.push(thread);
        Ok(Box::new(blk_frontend(self.index, stream, self.trace)))
    }
}

#[allow(clippy::too_many_arguments)]
fn blk_transport(
    index: usize,
    what: &str,
    stream: UnixStream,
    num_queues: u16,
    mem: &GuestMemoryMmap,
    trace: bool,
    connector: Box<dyn Connector>,
    policy: ReconnectPolicy,
) -> Result<(MmioTransport, devices::virtio_mmio::ReconnectHandle), VirtioError> {
    let dev_err = |detail: String| VirtioError::Device {
        index,
        what: what.to_string(),
        detail,
    };
    let frontend = blk_frontend(index, stream, trace);
    let table = MemoryTable::from_guest_memory(mem).map_err(|e| dev_err(chain(&e)))?;
    let opts = VhostUserDeviceOptions {
        num_queues,
        queue_size: BLK_QUEUE_SIZE,
    };
    let device = VhostUserDevice::new(Box::new(frontend), DeviceKind::BLOCK, table, opts)
        .map_err(|e| dev_err(chain(&e)))?
        .with_reconnect(format!("blk{index}"), connector, policy);
    let handle = device.reconnect_handle();
    let transport =
        MmioTransport::new(Box::new(device), mem.clone()).map_err(|e| dev_err(chain(&e)))?;
    Ok((transport, handle))
}

fn wire_into_kvm(
    vm: &VmFd,
    index: usize,
    info: &MmioDeviceInfo,
    t: &MmioTransport,
) -> Result<(), VirtioError> {
    let kvm_err = |ioctl, source| VirtioError::Kvm {
        index,
        ioctl,
        source,
    };
    for (q, kick) in t.queue_kick_fds().iter().enumerate() {
        // The driver writes the queue index to QueueNotify; datamatch routes it to that queue's fd.
        vm.register_ioevent(
            kick,
            &IoEventAddress::Mmio(info.base + QUEUE_NOTIFY),
            q as u32,
        )
        .map_err(|e| kvm_err("KVM_IOEVENTFD", e))?;
    }
    vm.register_irqfd(t.call_fd(), info.gsi)
        .map_err(|e| kvm_err("KVM_IRQFD", e))
}
