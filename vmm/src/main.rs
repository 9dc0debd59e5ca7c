//! `vmm`: parse the command line, build the VM, run it, map the outcome to an exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use vmm::config::{self, VmConfig};
use vmm::vm::Vm;

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
        /// A virtio-blk device: path=FILE[,readonly] (in-process backend) or socket=PATH (external backend). Repeatable.
        #[arg(long = "blk", value_name = "SPEC")]
        blk: Vec<String>,
        /// Log every vhost-user message, decoded, on stderr.
        #[arg(long)]
        trace_vhost: bool,
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
            let exit = vm.run()?;
            if exit.is_failure() {
                eprintln!("vmm: {exit}");
            }
            Ok(exit.status() as u8)
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("VMM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
