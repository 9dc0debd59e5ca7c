//! `flawed-blk-backend`: our vhost-user-blk backend with one known recovery bug planted back in
//! (`devices::blk::planted_flaw`), so a test can show that `vmm reconnect-test` catches it.
//!
//! ```text
//! flawed-blk-backend --flaw NAME|none --socket PATH --file DISK
//!                    [--delay-completions MIN_US-MAX_US] [--hold-batches-ms N]
//! ```
//! `--hold-batches-ms N` lets completions gather N ms into one batch and holds each published
//! batch open N ms (the window in which only a whole-batch rollback is right); with
//! `--flaw none` it shows that the window alone loses nothing. Test use only: it is built only with the test crate.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use devices::blk::planted_flaw::{PlantedFlaw, PlantedFlaws};
use devices::blk::queue_worker::CompletionDelay;
use devices::blk::{BlkBackend, BlkBackendConfig};

struct Args {
    flaw: Option<PlantedFlaw>,
    socket: PathBuf,
    file: PathBuf,
    delay: Option<CompletionDelay>,
    hold: Option<Duration>,
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut flaw, mut socket, mut file, mut delay, mut hold) = (None, None, None, None, None);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--flaw" => {
                let name = value()?;
                flaw = Some(match name.as_str() {
                    "none" => None,
                    n => Some(PlantedFlaw::from_name(n).ok_or_else(|| {
                        let names: Vec<_> = PlantedFlaw::ALL.iter().map(|f| f.name()).collect();
                        format!("--flaw {n}: not one of none, {}", names.join(", "))
                    })?),
                });
            }
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--file" => file = Some(PathBuf::from(value()?)),
            "--delay-completions" => {
                delay = Some(
                    value()?
                        .parse::<CompletionDelay>()
                        .map_err(|e| e.to_string())?,
                )
            }
            "--hold-batches-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|_| "--hold-batches-ms: not a number".to_string())?;
                hold = Some(Duration::from_millis(ms));
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        flaw: flaw.ok_or("--flaw NAME|none is required")?,
        socket: socket.ok_or("--socket is required")?,
        file: file.ok_or("--file is required")?,
        delay,
        hold,
    })
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("flawed-blk-backend: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = BlkBackendConfig {
        path: args.file,
        readonly: false,
        num_queues: 1,
        queue_size: 1024,
        direct: false,
        engine: Default::default(),
    };
    let served = BlkBackend::open(cfg).and_then(|b| {
        b.with_completion_delay(args.delay)
            .with_planted_flaws(PlantedFlaws::new(args.flaw, args.hold))
            .listen_on(&args.socket)
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flawed-blk-backend: {e}");
            ExitCode::FAILURE
        }
    }
}
