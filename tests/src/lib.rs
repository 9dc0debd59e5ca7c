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
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn must_exist(p: PathBuf, what: &str) -> PathBuf {
    assert!(
        p.exists(),
        "{what} not found at {} — run resources/setup first",
        p.display()
    );
    p
}

/// The `vmm` binary under test: $VMM_BIN, else target/release/vmm (resources/test builds it).
pub fn vmm_bin() -> PathBuf {
    let p = std::env::var_os("VMM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/vmm"));
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
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert!(
        ok,
        "/dev/kvm is missing or not accessible: these tests need KVM"
    );
}

/// True when /dev/kvm is the PVM backend: guest ring-0 code is emulated (~1 MIPS).
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The QEMU `-cpu` model that works with KVM on this host (resources/lib/qemu-cpu), probed once
/// per test binary unless VMM_QEMU_CPU is set (resources/test probes once per run). Panics with
/// QEMU's own complaint when no model works.
pub fn qemu_cpu() -> String {
    static CPU: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CPU.get_or_init(|| {
        let o = Command::new(repo_root().join("resources/lib/qemu-cpu"))
            .arg(guest_elf())
            .output()
            .expect("run resources/lib/qemu-cpu");
        let cpu = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let said = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && !cpu.is_empty(), "{said}");
        eprintln!("QEMU -cpu {cpu} ({})", said.trim());
        cpu
    })
    .clone()
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

/// The test guest under `vmm run` with `cmdline` and one virtio-blk device served by whatever
/// listens on `socket`.
pub fn run_guest_with_blk_socket(socket: &Path, cmdline: &str, timeout: Duration) -> Outcome {
    require_kvm();
    let kernel = guest_elf();
    let blk = format!("socket={}", socket.display());
    vmm_run(
        &[
            "--kernel",
            kernel.to_str().expect("guest path is UTF-8"),
            "--cmdline",
            cmdline,
            "--blk",
            &blk,
        ],
        timeout,
    )
}

/// Runs a command, streaming its stdout line by line to `watch`, until `watch` returns true
/// (then the process is killed) or the timeout passes. Returns the lines seen and whether
/// `watch` was satisfied.
pub fn run_until(
    cmd: &mut Command,
    timeout: Duration,
    mut watch: impl FnMut(&str) -> bool,
) -> (Vec<String>, bool, Duration) {
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
            if tx
                .send(String::from_utf8_lossy(&l).trim_end().to_string())
                .is_err()
            {
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

// ---- Helpers for the virtio-blk tests: child processes that never outlive a test, sockets that
// ---- are really listening, and disk images checked byte for byte on the host.

/// A child process (a backend, a daemon) that is killed and reaped when dropped, so no test path,
/// panics included, leaves it running. Its stdout and stderr go to a log file.
pub struct ChildGuard {
    child: Child,
    what: String,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` with stdin from /dev/null and stdout+stderr into `log`.
    pub fn spawn(cmd: &mut Command, what: &str, log: PathBuf) -> ChildGuard {
        let out =
            std::fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup log fd");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        ChildGuard {
            child,
            what: what.to_string(),
            log,
        }
    }

    /// Its process id (for /proc/PID).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if it has exited (reaped), else None.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait on child")
    }

    /// Everything it has written so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default()
    }

    /// Waits (up to `timeout`) until its log holds `text`; panics with the log if it never does.
    /// For lines written after the effect a test sees: a session's closing reason is logged
    /// once its rings are drained, after the peer already saw the connection end.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(
                start.elapsed() < timeout,
                "{} never logged {text:?}; its output:\n{log}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics, with its log, unless it is still running.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.exited() {
            panic!(
                "{} exited ({s}) but should still be running; its output:\n{}",
                self.what,
                self.log()
            );
        }
    }

    /// Waits until `socket` is a unix socket in the listening state (as /proc/net/unix shows it), so
    /// a connect cannot race the bind/listen, and without connecting (a connection would be a
    /// frontend session to the backend). Panics if the child exits first or `timeout` passes.
    pub fn wait_for_listening_socket(&mut self, socket: &Path, timeout: Duration) {
        let start = Instant::now();
        loop {
            if unix_socket_is_listening(socket) {
                return;
            }
            if let Some(s) = self.exited() {
                panic!(
                    "{} exited ({s}) before listening on {}; its output:\n{}",
                    self.what,
                    socket.display(),
                    self.log()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "{} did not listen on {} within {timeout:?}; its output:\n{}",
                self.what,
                socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when /proc/net/unix lists `path` as a listening socket (flag __SO_ACCEPTCON, 0x10000).
pub fn unix_socket_is_listening(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.len() >= 8
            && cols[7] == want
            && u32::from_str_radix(cols[3], 16)
                .map(|flags| flags & 0x1_0000 != 0)
                .unwrap_or(false)
    })
}

/// `vmm blk-backend --socket SOCKET --file IMAGE EXTRA...`, started and listening.
pub fn spawn_blk_backend(dir: &TempDir, socket: &Path, image: &Path, extra: &[&str]) -> ChildGuard {
    let mut c = Command::new(vmm_bin());
    c.arg("blk-backend")
        .arg("--socket")
        .arg(socket)
        .arg("--file")
        .arg(image)
        .args(extra);
    let log = dir.path(&format!(
        "{}.backend.log",
        socket
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut g = ChildGuard::spawn(&mut c, "vmm blk-backend", log);
    g.wait_for_listening_socket(socket, Duration::from_secs(10));
    g
}

/// qemu-storage-daemon exporting `image` as a writable vhost-user-blk device on `socket`.
pub fn spawn_qemu_storage_daemon(dir: &TempDir, socket: &Path, image: &Path) -> ChildGuard {
    let mut c = Command::new("qemu-storage-daemon");
    c.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            image.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
    let mut g = ChildGuard::spawn(&mut c, "qemu-storage-daemon", dir.path("qsd.log"));
    g.wait_for_listening_socket(socket, Duration::from_secs(10));
    g
}

/// A sparse, all-zero disk image of `bytes` bytes.
pub fn zero_image(dir: &TempDir, name: &str, bytes: u64) -> PathBuf {
    let p = dir.path(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(bytes))
        .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    p
}

/// One `blk-write-verify` run as the host sees it afterwards: `blocks` blocks from `start`,
/// written with `seed` (block start+i carries seq i).
#[derive(Debug, Clone, Copy)]
pub struct WrittenRange {
    pub start: u64,
    pub blocks: u64,
    pub seed: u64,
}

/// Checks `image` byte for byte: every block of every range holds the guest's pattern, and every
/// other byte of the file is still zero (ranges must not overlap).
pub fn check_image(image: &Path, ranges: &[WrittenRange]) -> Result<(), String> {
    let data = std::fs::read(image).map_err(|e| format!("read {}: {e}", image.display()))?;
    let mut covered = vec![false; data.len().div_ceil(4096)];
    for r in ranges {
        for i in 0..r.blocks {
            let b = r.start + i;
            let off = (b * 4096) as usize;
            let found = data
                .get(off..off + 4096)
                .ok_or_else(|| format!("block {b} lies beyond the end of {}", image.display()))?;
            if found != guest_block_pattern(b, r.seed, i).as_slice() {
                let first = found
                    .iter()
                    .zip(guest_block_pattern(b, r.seed, i))
                    .position(|(a, w)| *a != w)
                    .unwrap_or(0);
                return Err(format!("block {b} (seed {}, seq {i}) does not hold the pattern: first difference at byte {first}", r.seed));
            }
            covered[b as usize] = true;
        }
    }
    for (b, chunk) in data.chunks(4096).enumerate() {
        if !covered[b] {
            if let Some(pos) = chunk.iter().position(|x| *x != 0) {
                return Err(format!(
                    "block {b} was never written by the guest but byte {pos} of it is {:#x}",
                    chunk[pos]
                ));
            }
        }
    }
    Ok(())
}

/// A unix listener at `path` that never accepts and whose backlog is full: listen(fd, 0), then
/// clients connected (non-blocking) until the kernel refuses one with EAGAIN. The next connect has
/// nowhere to go. Keep the returned clients alive as long as the listener must stay full.
pub fn full_backlog_listener(
    path: &Path,
) -> (std::os::unix::net::UnixListener, Vec<std::os::fd::OwnedFd>) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;

    let listener = std::os::unix::net::UnixListener::bind(path)
        .unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
    // SAFETY: plain syscall on a listening socket we own; listening again only sets the backlog.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    // SAFETY: sockaddr_un is plain data; all-zero is a valid empty address.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    assert!(bytes.len() < sun.sun_path.len(), "socket path too long");
    for (d, s) in sun.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let mut clients = Vec::new();
    loop {
        assert!(clients.len() < 64, "the backlog never filled");
        // SAFETY: plain syscall; the result is checked before being owned.
        let raw = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: socket() just returned this fd; nothing else owns it.
        let client = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sun is a valid NUL-terminated sockaddr_un, alive for the call.
        let r = unsafe {
            libc::connect(
                client.as_raw_fd(),
                (&sun as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "connect: {err}");
            return (listener, clients);
        }
        clients.push(client);
    }
}
