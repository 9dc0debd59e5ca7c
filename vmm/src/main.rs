//! `vmm`: parse the command line, build the VM, run it, map the outcome to an exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use devices::blk::backend::{CompletionDelay, IoEngine};
use devices::blk::{BlkBackend, BlkBackendConfig};
use vmm::config::{self, VmConfig};
use vmm::vm::Vm;

mod json_text;
mod probe;
mod reconnect_test;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A minimal KVM VMM whose virtio devices are served over vhost-user"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel: a bzImage, a vmlinux with a PVH note, or a test kernel (ELF64).
    Run {
        /// Kernel image (bzImage or ELF).
        #[arg(long)]
        kernel: PathBuf,
        /// Initial ramdisk.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Guest RAM, e.g. 256M or 1G.
        #[arg(long, default_value = "256M")]
        mem: String,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// A virtio-blk device: path=FILE[,readonly][,direct=on][,engine=inline|threads|uring]
        /// (in-process backend) or socket=PATH[,reconnect=off|MS] (external backend), each with
        /// an optional ,queues=N. Repeatable.
        #[arg(long = "blk", value_name = "SPEC")]
        blk: Vec<String>,
        /// Log every vhost-user message, decoded, on stderr.
        #[arg(long)]
        trace_vhost: bool,
    },
    /// Serve a raw disk image as a vhost-user-blk backend on a unix socket (one frontend at a
    /// time; keeps serving after a frontend leaves).
    BlkBackend {
        /// Unix socket to listen on (a stale socket file is replaced).
        #[arg(long)]
        socket: PathBuf,
        /// Raw disk image.
        #[arg(long)]
        file: PathBuf,
        /// Offer VIRTIO_BLK_F_RO and fail writes.
        #[arg(long)]
        readonly: bool,
        /// Request queues offered to the frontend.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Largest queue size accepted (a power of two).
        #[arg(long, default_value_t = 1024)]
        queue_size: u16,
        /// Test option: hold each finished request a random MIN_US..=MAX_US microseconds before
        /// completing it, so completions land out of order and a kill finds requests in flight
        /// (for inflight-recovery tests). Slows every request down; not for real use.
        #[arg(long, value_name = "MIN_US-MAX_US")]
        delay_completions: Option<CompletionDelay>,
        /// Do not offer inflight tracking (INFLIGHT_SHMFD): a backend killed then loses what it
        /// had in flight, as one without tracking would. For measuring what tracking costs.
        #[arg(long)]
        no_inflight: bool,
        /// Who runs each queue's disk I/O: `inline` (the queue's own thread, a batch at a time;
        /// fastest on a page-cached image), `threads` (a pool of 4 I/O threads per queue; may
        /// win when requests block on slow storage) or `uring` (the queue's thread keeps many
        /// requests in flight through io_uring, straight from guest memory; for --direct, where
        /// it wins at 8 or more requests in flight; falls back to inline without io_uring).
        #[arg(long, value_name = "inline|threads|uring", default_value_t = IoEngine::default())]
        io_engine: IoEngine,
        /// Open the image with O_DIRECT (bypass the host page cache).
        #[arg(long)]
        direct: bool,
    },
    /// Kill a vhost-user-blk backend at random moments while the embedded test guest writes
    /// and verifies, restart it each time, and report what it lost (exit 0: nothing).
    /// Check any vhost-user backend for conformance and for the bug classes of hostile input
    /// (inflight handlers, fd leaks, sizes, liveness); one line per check; exit 0 only when
    /// every applicable check passes.
    Probe {
        /// The backend's unix socket.
        #[arg(long, required_unless_present = "list")]
        socket: Option<PathBuf>,
        /// The backend's PID: fd and RSS are measured around each check (leaks fail it).
        #[arg(long)]
        pid: Option<u32>,
        /// Run only these checks or groups (repeatable, or comma-separated).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Also write the report as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Shell command that starts the backend listening on --socket; run when it is not
        /// there or has died (its PID is then measured as with --pid).
        #[arg(long, value_name = "COMMAND")]
        restart: Option<String>,
        /// Seconds to wait for any one answer.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
        timeout: u64,
        /// Send the allocation bombs (GET_INFLIGHT_FD for 65535 x 65535) even to a backend not
        /// known to be memory-capped.
        #[arg(long)]
        allow_huge: bool,
        /// List the checks and exit.
        #[arg(long)]
        list: bool,
    },
    ReconnectTest {
        /// The backend's shell command line, with {socket} and {disk} placeholders, e.g.
        /// 'vmm blk-backend --socket {socket} --file {disk}'.
        #[arg(long)]
        backend: String,
        /// SIGKILLs to deliver (default 20; with --duration: no limit but the time).
        #[arg(long)]
        kills: Option<u32>,
        /// Go on killing for this many seconds (then let the guest finish and verify).
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
        duration: Option<u64>,
        /// Requests the guest keeps in flight.
        #[arg(long, default_value_t = 16)]
        queue_depth: u16,
        /// Size of the disk the backend serves (sparse), e.g. 64M.
        #[arg(long, default_value = "64M")]
        disk_size: String,
        /// Seed of the kill moments and of the guest's pattern (default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// Also write the report as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
        /// Also draw guest throughput over time (kills and recoveries marked) and a histogram of
        /// recovery times as an SVG in FILE.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        /// Keep the temp directory (disk, logs) and print its path.
        #[arg(long)]
        keep: bool,
    },
    /// Show the virtual CPU `vmm run` gives its guests: the CPUID table (every change to KVM's
    /// marked) and the MSRs, or the rules behind it, or KVM's own table for capturing test data.
    Cpuid {
        /// vCPUs in the VM, as for `vmm run --cpus`.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Which vCPU to show (0-based).
        #[arg(long, default_value_t = 0)]
        vcpu: u32,
        /// Print KVM_GET_SUPPORTED_CPUID with its provenance, unchanged (the format of
        /// vmm/src/cpu_model/testdata).
        #[arg(long, conflicts_with = "explain")]
        supported: bool,
        /// Print the table of rules: every leaf and register we change, and why.
        #[arg(long)]
        explain: bool,
    },
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Command::Run {
            kernel,
            initrd,
            cmdline,
            mem,
            cpus,
            blk,
            trace_vhost,
        } => {
            let cfg = VmConfig {
                kernel,
                initrd,
                cmdline,
                mem_bytes: config::parse_mem_size(&mem)?,
                cpus: config::check_cpus(cpus)?,
                blk: blk
                    .iter()
                    .map(|s| config::parse_blk(s))
                    .collect::<Result<_, _>>()?,
                trace_vhost,
            };
            let vm = Vm::new(&cfg)?;
            let console = vmm::terminal::RawConsole::enable();
            let exit = vm.run();
            drop(console);
            let exit = exit?;
            if exit.is_failure() {
                eprintln!("vmm: {exit}");
            }
            Ok(exit.status() as u8)
        }
        Command::BlkBackend {
            socket,
            file,
            readonly,
            queues,
            queue_size,
            delay_completions,
            no_inflight,
            io_engine,
            direct,
        } => {
            let cfg = BlkBackendConfig {
                path: file,
                readonly,
                num_queues: queues,
                queue_size,
                direct,
                engine: io_engine,
            };
            BlkBackend::open(cfg)?
                .with_completion_delay(delay_completions)
                .with_inflight(!no_inflight)
                .listen_on(&socket)?;
            Ok(0)
        }
        Command::Probe {
            socket,
            pid,
            only,
            json,
            restart,
            timeout,
            allow_huge,
            list,
        } => {
            if list {
                for c in probe::CHECKS {
                    probe::print_line(&format!("{:<17} {:<26} {}", c.group, c.name, c.about));
                }
                return Ok(0);
            }
            let socket = socket.ok_or_else(|| anyhow::anyhow!("--socket is required"))?;
            if let Some(dir) = json.as_ref().and_then(|p| p.parent()) {
                if !dir.as_os_str().is_empty() && !dir.is_dir() {
                    anyhow::bail!("--json: directory {} does not exist", dir.display());
                }
            }
            let options = probe::Options {
                socket,
                pid,
                only,
                restart,
                timeout: std::time::Duration::from_secs(timeout),
                allow_huge,
            };
            let report = probe::run(&options).map_err(|e| anyhow::anyhow!("probe: {e}"))?;
            probe::print_line(&report.summary());
            if let Some(path) = json {
                std::fs::write(&path, report.json())
                    .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
            }
            Ok(if report.passed() { 0 } else { 1 })
        }
        Command::ReconnectTest {
            backend,
            kills,
            duration,
            queue_depth,
            disk_size,
            seed,
            json,
            plot,
            keep,
        } => {
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64 % 1_000_000_000)
                    .unwrap_or(1)
            });
            // A run takes minutes: refuse an output path that cannot be written before it.
            for (flag, path) in [("--json", &json), ("--plot", &plot)] {
                if let Some(path) = path {
                    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
                    if dir.is_some_and(|d| !d.is_dir()) {
                        anyhow::bail!("{flag} {}: its directory does not exist", path.display());
                    }
                }
            }
            eprintln!("reconnect-test: --seed {seed}");
            let options = reconnect_test::Options {
                backend,
                kills: kills.unwrap_or(if duration.is_some() { u32::MAX } else { 20 }),
                duration: duration.map(std::time::Duration::from_secs),
                queue_depth,
                disk_size: config::parse_mem_size(&disk_size)
                    .map_err(|e| anyhow::anyhow!("--disk-size {disk_size}: {e}"))?,
                seed,
                keep,
            };
            let report = reconnect_test::run(&options)?;
            print!("{}", report.text());
            if let Some(path) = json {
                std::fs::write(&path, report.json())
                    .map_err(|e| anyhow::anyhow!("write {}: {e}", path.display()))?;
            }
            if let Some(path) = plot {
                report.plot(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
                eprintln!("reconnect-test: plot written to {}", path.display());
            }
            Ok(if report.passed() { 0 } else { 1 })
        }
        Command::Cpuid {
            cpus,
            vcpu,
            supported,
            explain,
        } => {
            use vmm::cpu_model::{report, VcpuTopology};
            let count = config::check_cpus(cpus)?;
            if vcpu >= count {
                anyhow::bail!("--vcpu {vcpu} does not exist in a VM of {count} vCPUs");
            }
            let text = if explain {
                report::explain()
            } else {
                let kvm = kvm_ioctls::Kvm::new()
                    .map_err(|e| anyhow::anyhow!("cannot open /dev/kvm: {e}"))?;
                if supported {
                    report::supported(&kvm)?
                } else {
                    report::model(&kvm, VcpuTopology { id: vcpu, count })?
                }
            };
            print!("{text}");
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    // VMM_LOG=info (or debug, trace) turns on the library logs; errors always print.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!(
                "vmm: error: {}",
                devices::virtio_mmio::error_chain(e.as_ref())
            );
            ExitCode::from(1)
        }
    }
}
