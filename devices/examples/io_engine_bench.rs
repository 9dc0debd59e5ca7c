//! Would an io_uring disk engine beat plain `pread`/`pwrite` for the virtio-blk backend here?
//!
//! 4 KiB random reads and random writes (4 KiB-aligned offsets from a xorshift) over a 256 MiB
//! file, with:
//!
//! - `sync`: `read_exact_at`/`write_all_at`, one request after another on one thread (what the
//!   backend's default `inline` engine does on the queue's thread);
//! - `4 threads`: the same on 4 threads sharing the file, each doing N/4 (the `threads` engine);
//! - `uring dN`: `devices::blk::uring::UringEngine` with batches of N: push N ops, submit once,
//!   reap them all (waiting if needed), repeat — a dispatcher that got N requests from a kick.
//!
//! each both buffered (the file is filled first, so reads hit the page cache) and with
//! `O_DIRECT`. Per mode: one warm-up run, then `--reps` runs (interleaved across modes, so drift
//! hits all of them alike); the median run by ops/s is reported, with the range.
//!
//! CPU per op is `getrusage(RUSAGE_SELF)` user+sys over the run. io_uring's io-wq workers
//! (`iou-wrk-*`) are threads of this process, so RUSAGE_SELF includes them; the `io-wq` column
//! shows their share (their per-thread CPU clocks, summed). Not counted anywhere: dirty-page
//! writeback by the kernel's flusher threads (each buffered write run is followed by an
//! untimed `fdatasync`, so every run starts with a clean cache) and interrupt work charged to
//! whatever happened to run.
//!
//! ```text
//! cargo build --release -p devices --example io_engine_bench
//! target/release/examples/io_engine_bench [--ops N] [--direct-ops N] [--reps R]
//!     [--path FILE] [--no-buffered] [--no-direct]
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::Instant;

use devices::blk::uring::{UringEngine, UringOp};

const BLOCK: usize = 4096;
const FILE_SIZE: u64 = 256 << 20;
const BLOCKS: u64 = FILE_SIZE / BLOCK as u64;
const THREADS: usize = 4;
const DEPTHS: [u32; 3] = [1, 8, 32];

/// One 4 KiB buffer, 4 KiB-aligned (as O_DIRECT needs).
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

impl Block {
    fn new() -> Self {
        Block([0xA5; BLOCK])
    }
}

/// Each block of the file starts with its own index (little-endian u64): reads check it, so a
/// mode that moved no data, or the wrong data, cannot look fast. Writes write the same stamp.
///
/// # Safety
///
/// `buf` is the start of a `Block` the caller owns and that no I/O is using.
unsafe fn stamp(buf: *mut u8, block: u64) {
    // SAFETY: the caller's contract; a `Block` is aligned for, and larger than, a u64.
    unsafe { buf.cast::<u64>().write(block.to_le()) }
}

/// The stamp at the start of a block.
///
/// # Safety
///
/// `buf` is the start of a `Block` whose I/O has completed.
unsafe fn stamp_of(buf: *const u8) -> u64 {
    // SAFETY: the caller's contract; a `Block` is aligned for, and larger than, a u64.
    u64::from_le(unsafe { buf.cast::<u64>().read() })
}

fn stamp_slice(buf: &mut [u8], block: u64) {
    buf[..8].copy_from_slice(&block.to_le_bytes());
}

fn stamp_of_slice(buf: &[u8]) -> u64 {
    u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"))
}

fn bad_data(block: u64, found: u64) -> io::Error {
    io::Error::other(format!("block {block} read back stamp {found}"))
}

struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn block(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % BLOCKS
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Rw {
    Read,
    Write,
}

#[derive(Clone, Copy)]
enum Mode {
    Sync,
    Threads,
    Uring(u32),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Mode::Sync => "sync (1 thread)".into(),
            Mode::Threads => format!("{THREADS} threads"),
            Mode::Uring(d) => format!("uring d{d}"),
        }
    }
}

/// One run's cost.
#[derive(Clone, Copy)]
struct Sample {
    ops: u64,
    secs: f64,
    cpu_us: f64,
    iowq_us: f64,
}

impl Sample {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

fn rusage_cpu_us() -> f64 {
    // SAFETY: all-zero is a valid rusage (plain integers), which getrusage fills in.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid rusage to write.
    let ret = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(ret, 0, "getrusage: {}", io::Error::last_os_error());
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// (tid, CPU ns) of this process's io-wq workers now alive.
fn iowq_cpu_ns() -> Vec<(i32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("iou-wrk") {
            continue;
        }
        // A thread's CPU-time clock (MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)); readable for
        // threads of the caller's own thread group, which io-wq workers are.
        let clock = (!tid << 3) | 6;
        // SAFETY: all-zero is a valid timespec, which clock_gettime fills in.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: `ts` is a valid timespec to write; a bad clock id only fails.
        if unsafe { libc::clock_gettime(clock, &mut ts) } == 0 {
            out.push((tid, ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64));
        }
    }
    out
}

/// Times one run: wall clock, process CPU and io-wq workers' CPU (workers that exit during the
/// run are missed there, though RUSAGE_SELF still has them).
struct Meter {
    start: Instant,
    cpu: f64,
    iowq: Vec<(i32, u64)>,
}

impl Meter {
    fn start() -> Self {
        let iowq = iowq_cpu_ns();
        let cpu = rusage_cpu_us();
        Meter {
            start: Instant::now(),
            cpu,
            iowq,
        }
    }

    fn stop(self, ops: u64) -> Sample {
        let secs = self.start.elapsed().as_secs_f64();
        let cpu_us = rusage_cpu_us() - self.cpu;
        let iowq_ns: u64 = iowq_cpu_ns()
            .into_iter()
            .map(|(tid, ns)| {
                let before = self.iowq.iter().find(|(t, _)| *t == tid).map_or(0, |x| x.1);
                ns.saturating_sub(before)
            })
            .sum();
        Sample {
            ops,
            secs,
            cpu_us,
            iowq_us: iowq_ns as f64 / 1e3,
        }
    }
}

/// `ops` requests one after another on this thread.
fn sync_loop(file: &File, rw: Rw, ops: u64, seed: u64) -> io::Result<()> {
    let mut buf = Box::new(Block::new());
    let mut rng = XorShift::new(seed);
    for _ in 0..ops {
        let block = rng.block();
        let offset = block * BLOCK as u64;
        match rw {
            Rw::Read => {
                file.read_exact_at(&mut buf.0, offset)?;
                let found = stamp_of_slice(&buf.0);
                if found != block {
                    return Err(bad_data(block, found));
                }
            }
            Rw::Write => {
                stamp_slice(&mut buf.0, block);
                file.write_all_at(&buf.0, offset)?;
            }
        }
    }
    Ok(())
}

fn run_sync(file: &File, rw: Rw, ops: u64, seed: u64) -> io::Result<Sample> {
    let meter = Meter::start();
    sync_loop(file, rw, ops, seed)?;
    Ok(meter.stop(ops))
}

fn run_threads(file: &File, rw: Rw, ops: u64, seed: u64) -> io::Result<Sample> {
    let each = ops / THREADS as u64;
    let meter = Meter::start();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS as u64)
            .map(|i| s.spawn(move || sync_loop(file, rw, each, seed.wrapping_add(i * 7919))))
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("worker panicked"))
    })?;
    Ok(meter.stop(each * THREADS as u64))
}

fn run_uring(file: &File, rw: Rw, ops: u64, seed: u64, depth: u32) -> io::Result<Sample> {
    let d = depth as usize;
    // Declared before the engine, so dropped after it: the engine's drop waits for ops in
    // flight, which may still be using these buffers.
    let mut bufs: Vec<Block> = (0..d).map(|_| Block::new()).collect();
    let base = bufs.as_mut_ptr().cast::<u8>();
    let mut blocks = vec![0u64; d];
    let mut engine = UringEngine::new(file, depth)?;
    let mut rng = XorShift::new(seed);

    let meter = Meter::start();
    let mut left = ops;
    while left > 0 {
        let batch = left.min(d as u64) as usize;
        for (i, slot) in blocks.iter_mut().enumerate().take(batch) {
            let block = rng.block();
            *slot = block;
            let buf = base.wrapping_add(i * BLOCK);
            let offset = block * BLOCK as u64;
            let iovecs = vec![libc::iovec {
                iov_base: buf.cast(),
                iov_len: BLOCK,
            }];
            let op = match rw {
                Rw::Read => UringOp::Read { offset, iovecs },
                Rw::Write => {
                    // SAFETY: block `i` of `bufs`; no op is in flight on it (the previous
                    // batch was reaped in full).
                    unsafe { stamp(buf, block) };
                    UringOp::Write { offset, iovecs }
                }
            };
            // SAFETY: `buf` is block `i` of `bufs`, which outlives the engine (declared before
            // it) and which no Rust reference points into while the op is in flight: it is only
            // touched through `base` before the push and after the op's completion is reaped.
            unsafe { engine.push(i as u64, op) }
                .map_err(|_| io::Error::other("io_uring engine full"))?;
        }
        engine.submit()?;
        let mut done = 0;
        let mut failure = None;
        loop {
            done += engine.reap(|token, result| {
                let i = token as usize;
                let outcome = match result {
                    Ok(n) if n == BLOCK as u64 => match rw {
                        Rw::Write => Ok(()),
                        Rw::Read => {
                            // SAFETY: block `i` of `bufs`, whose op has just completed.
                            let found = unsafe { stamp_of(base.wrapping_add(i * BLOCK)) };
                            if found == blocks[i] {
                                Ok(())
                            } else {
                                Err(bad_data(blocks[i], found))
                            }
                        }
                    },
                    Ok(n) => Err(io::Error::other(format!("op moved {n} bytes"))),
                    Err(e) => Err(e),
                };
                if let Err(e) = outcome {
                    failure.get_or_insert(e);
                }
            })?;
            if done == batch {
                break;
            }
            engine.wait_one()?;
        }
        if let Some(e) = failure {
            return Err(e);
        }
        left -= batch as u64;
    }
    let sample = meter.stop(ops);
    drop(engine);
    drop(bufs);
    Ok(sample)
}

fn run(file: &File, rw: Rw, mode: Mode, ops: u64, seed: u64) -> io::Result<Sample> {
    let sample = match mode {
        Mode::Sync => run_sync(file, rw, ops, seed),
        Mode::Threads => run_threads(file, rw, ops, seed),
        Mode::Uring(depth) => run_uring(file, rw, ops, seed, depth),
    }?;
    if rw == Rw::Write {
        // Untimed: every run starts with no dirty pages of ours waiting for writeback.
        file.sync_data()?;
    }
    Ok(sample)
}

struct Args {
    ops: u64,
    direct_ops: u64,
    reps: usize,
    path: PathBuf,
    buffered: bool,
    direct: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        ops: 200_000,
        direct_ops: 20_000,
        reps: 3,
        path: PathBuf::from("/tmp/io_engine_bench.img"),
        buffered: true,
        direct: true,
    };
    let usage = "usage: io_engine_bench [--ops N] [--direct-ops N] [--reps R] [--path FILE] \
                 [--no-buffered] [--no-direct]";
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .unwrap_or_else(|| panic!("{name} needs a value\n{usage}"))
        };
        let number = |name: &str, v: String| -> u64 {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: not a number: {v}\n{usage}"))
        };
        match arg.as_str() {
            "--ops" => args.ops = number("--ops", value("--ops")),
            "--direct-ops" => args.direct_ops = number("--direct-ops", value("--direct-ops")),
            "--reps" => args.reps = number("--reps", value("--reps")) as usize,
            "--path" => args.path = PathBuf::from(value("--path")),
            "--no-buffered" => args.buffered = false,
            "--no-direct" => args.direct = false,
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}\n{usage}"),
        }
    }
    assert!(args.reps >= 1, "--reps must be at least 1");
    args
}

/// Creates and fills the file (every block stamped), syncs it, and reads it all back once so
/// the page cache holds all of it.
fn create_file(path: &PathBuf) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    let chunk_blocks = 256;
    let mut chunk = vec![0x5Au8; chunk_blocks * BLOCK];
    for first in (0..BLOCKS).step_by(chunk_blocks) {
        for b in 0..chunk_blocks {
            stamp_slice(&mut chunk[b * BLOCK..], first + b as u64);
        }
        file.write_all_at(&chunk, first * BLOCK as u64)?;
    }
    file.sync_all()?;
    for first in (0..BLOCKS).step_by(chunk_blocks) {
        file.read_exact_at(&mut chunk, first * BLOCK as u64)?;
    }
    Ok(file)
}

fn median_by_rate(samples: &mut [Sample]) -> Sample {
    samples.sort_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()));
    samples[samples.len() / 2]
}

struct Row {
    io: &'static str,
    rw: Rw,
    mode: Mode,
    median: Sample,
    min_rate: f64,
    max_rate: f64,
}

/// Warm-up and `reps` interleaved runs of every mode for one kind of I/O.
fn measure(
    io: &'static str,
    file: &File,
    rw: Rw,
    ops: u64,
    reps: usize,
    rows: &mut Vec<Row>,
) -> io::Result<()> {
    let modes: Vec<Mode> = [Mode::Sync, Mode::Threads]
        .into_iter()
        .chain(DEPTHS.iter().map(|&d| Mode::Uring(d)))
        .collect();
    let rw_name = if rw == Rw::Read { "read" } else { "write" };
    eprintln!("{io} {rw_name}: warm-up");
    for &mode in &modes {
        run(file, rw, mode, ops, 1)?;
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); modes.len()];
    for rep in 0..reps {
        for (m, &mode) in modes.iter().enumerate() {
            let s = run(file, rw, mode, ops, 100 + rep as u64 * 31 + m as u64)?;
            eprintln!(
                "{io} {rw_name} rep {rep} {:>15}: {:>9.0} ops/s {:>6.2} CPU µs/op",
                mode.name(),
                s.ops_per_sec(),
                s.cpu_us / s.ops as f64
            );
            samples[m].push(s);
        }
    }
    for (mode, mut s) in modes.into_iter().zip(samples) {
        let rates: Vec<f64> = s.iter().map(Sample::ops_per_sec).collect();
        rows.push(Row {
            io,
            rw,
            mode,
            median: median_by_rate(&mut s),
            min_rate: rates.iter().copied().fold(f64::INFINITY, f64::min),
            max_rate: rates.iter().copied().fold(0.0, f64::max),
        });
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default()
}

fn main() -> io::Result<()> {
    let args = parse_args();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    eprintln!(
        "kernel {} cpus {}, load {}",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg().trim()
    );
    eprintln!("creating {} ({} MiB)", args.path.display(), FILE_SIZE >> 20);
    let file = create_file(&args.path)?;
    let mut rows = Vec::new();
    let mut notes = Vec::new();

    if args.buffered {
        for rw in [Rw::Read, Rw::Write] {
            measure("buffered", &file, rw, args.ops, args.reps, &mut rows)?;
        }
    }
    if args.direct {
        // Written back and out of the page cache: direct I/O then neither waits for writeback
        // nor has cached pages to invalidate.
        file.sync_all()?;
        // SAFETY: plain syscall on an open fd.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&args.path)
        {
            Ok(direct) => {
                for rw in [Rw::Read, Rw::Write] {
                    measure(
                        "O_DIRECT",
                        &direct,
                        rw,
                        args.direct_ops,
                        args.reps,
                        &mut rows,
                    )?;
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let note = format!(
                    "O_DIRECT: skipped, {} does not support O_DIRECT ({e})",
                    args.path.display()
                );
                eprintln!("{note}");
                notes.push(note);
            }
            Err(e) => return Err(e),
        }
    }
    drop(file);
    let _ = std::fs::remove_file(&args.path);

    println!();
    println!(
        "4 KiB random I/O over a {} MiB file; kernel {}; {} CPUs; median of {} runs \
         (ops/s range in brackets); load at end {}",
        FILE_SIZE >> 20,
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.reps,
        loadavg()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!("| I/O | op | engine | ops/s | vs sync | CPU µs/op | of which io-wq µs/op |");
    println!("|---|---|---|---:|---:|---:|---:|");
    for row in &rows {
        let sync_rate = rows
            .iter()
            .find(|r| r.io == row.io && r.rw == row.rw && matches!(r.mode, Mode::Sync))
            .map_or(f64::NAN, |r| r.median.ops_per_sec());
        let m = row.median;
        println!(
            "| {} | {} | {} | {:.0} [{:.0}–{:.0}] | {:.2}× | {:.2} | {:.2} |",
            row.io,
            if row.rw == Rw::Read { "read" } else { "write" },
            row.mode.name(),
            m.ops_per_sec(),
            row.min_rate,
            row.max_rate,
            m.ops_per_sec() / sync_rate,
            m.cpu_us / m.ops as f64,
            m.iowq_us / m.ops as f64,
        );
    }
    for note in notes {
        println!();
        println!("{note}");
    }
    Ok(())
}
