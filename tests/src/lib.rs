//! Shared helpers for the end-to-end tests: where the built artifacts are, and running `vmm`
//! (or QEMU) with a deadline, capturing what the guest printed.
//!
//! Tests that need /dev/kvm or an artifact fail loudly when it is missing: a test that silently
//! passes on a machine that cannot run it would hide a broken set-up.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn must_exist(p: PathBuf, what: &str) -> PathBuf {
    assert!(p.exists(), "{what} not found at {} — run resources/setup first", p.display());
    p
}

/// The `vmm` binary under test: $VMM_BIN, else target/release/vmm (resources/test builds it).
pub fn vmm_bin() -> PathBuf {
    let p = std::env::var_os("VMM_BIN").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/release/vmm"));
    must_exist(p, "the vmm binary")
}

pub fn guest_elf() -> PathBuf {
    must_exist(
        repo_root().join("resources/guest/target/x86_64-unknown-linux-gnu/release/test-guest"),
        "the test guest",
    )
}

pub fn linux_asset(name: &str) -> PathBuf {
    must_exist(repo_root().join("build/linux").join(name), "Linux asset")
}

pub fn require_kvm() {
    let ok = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    assert!(ok, "/dev/kvm is missing or not accessible: these tests need KVM");
}

/// True when /dev/kvm is the PVM backend: guest ring-0 code is emulated (~1 MIPS).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

pub struct Outcome {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Outcome {
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
    pub fn describe(&self) -> String {
        format!(
            "status={:?} timed_out={} elapsed={:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.timed_out, self.elapsed, self.stdout, self.stderr
        )
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Runs a command to completion or until `timeout`, then kills it.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// `vmm run` with the given arguments.
pub fn vmm_run(args: &[&str], timeout: Duration) -> Outcome {
    let mut c = Command::new(vmm_bin());
    c.arg("run").args(args);
    run_with_timeout(&mut c, timeout)
}

/// Runs a command, streaming its stdout line by line to `watch`, until `watch` returns true
/// (then the process is killed) or the timeout passes. Returns the lines seen and whether
/// `watch` was satisfied.
pub fn run_until(cmd: &mut Command, timeout: Duration, mut watch: impl FnMut(&str) -> bool) -> (Vec<String>, bool, Duration) {
    use std::io::BufRead;
    use std::sync::mpsc;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).split(b'\n') {
            let Ok(l) = line else { break };
            if tx.send(String::from_utf8_lossy(&l).trim_end().to_string()).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let mut done = false;
    while !done {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        match rx.recv_timeout(left) {
            Ok(l) => {
                done = watch(&l);
                lines.push(l);
            }
            Err(_) => break,
        }
    }
    let elapsed = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    (lines, done, elapsed)
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("vmm-test-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `blk-write-verify` block pattern (resources/guest/README.md): the host re-checks it.
pub fn guest_block_pattern(block: u64, seed: u64, seq: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    b.extend_from_slice(&0x3130_4B4C_424D_4D56u64.to_le_bytes());
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&seed.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    let mut s = seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    if s == 0 {
        s = 1;
    }
    while b.len() < 4088 {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        b.extend_from_slice(&s.to_le_bytes());
    }
    b.truncate(4088);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in &b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    b.extend_from_slice(&h.to_le_bytes());
    b
}
