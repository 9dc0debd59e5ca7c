//! Backend reconnect end to end: our VMM runs the test guest's `blk-write-verify` while the test
//! SIGKILLs the backend process at random moments and starts it again on the same socket. The
//! guest must see nothing: no I/O error, every block verifies, and the host file holds exactly the
//! last pass's pattern.
//!
//! - our standalone backend, with inflight tracking, at queue depth 32 and with completions
//!   delayed at random (`--delay-completions`) so that kills land with requests in flight and
//!   completed out of order: the backend's log must show that recovery resubmitted requests;
//! - qemu-storage-daemon, which offers no inflight tracking: at queue depth 1 what was in flight is
//!   exactly what lies in the avail ring past the used index, so the reconnect re-reads it
//!   (see README, "Backend reconnect", for what that cannot protect at higher depths);
//! - a backend that comes back as a different device (another image size) is refused, the VMM
//!   says what changed, and the guest's driver is asked for a reset.
//!
//! Kill moments are random; the seed is printed so a failure can be replayed
//! (`RECONNECT_TEST_SEED=N`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    check_image, guest_elf, require_kvm, spawn_blk_backend, spawn_qemu_storage_daemon, vmm_bin,
    zero_image, ChildGuard, TempDir, WrittenRange,
};

/// A small xorshift, seeded per run (printed) so a failing kill pattern can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock() -> Rng {
        let seed = std::env::var("RECONNECT_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            .max(1);
        eprintln!("reconnect test: RECONNECT_TEST_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// `vmm run` with the test guest and one blk device on `socket`, stdout and stderr in files.
struct Vmm {
    child: Child,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl Vmm {
    fn start(dir: &TempDir, socket: &Path, cmdline: &str) -> Vmm {
        require_kvm();
        let stdout = dir.path("vmm.stdout");
        let stderr = dir.path("vmm.stderr");
        let child = Command::new(vmm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(guest_elf())
            .arg("--cmdline")
            .arg(cmdline)
            .arg("--blk")
            .arg(format!("socket={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("vmm stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("vmm stderr file"))
            .spawn()
            .expect("start vmm");
        Vmm {
            child,
            stdout,
            stderr,
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for the exit status, killing the VMM after `timeout`.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for vmm") {
                return status.code();
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn describe(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- vmm stdout (tail) ---\n{}\n--- vmm stderr (tail) ---\n{}",
            tail(self.stdout()),
            tail(self.stderr())
        )
    }

    /// Waits until the guest has printed `needle`.
    fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.stdout().contains(needle) {
            assert!(
                self.running(),
                "vmm exited before the guest printed '{needle}'\n{}",
                self.describe()
            );
            assert!(
                start.elapsed() < timeout,
                "the guest did not print '{needle}' within {timeout:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILL, then reap: the process is gone, its socket left behind (stale).
fn kill_hard(backend: ChildGuard) {
    let pid = backend.pid() as libc::pid_t;
    // SAFETY: plain syscall on a child we own and have not reaped yet.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(backend); // reaps it
}

/// Kills the backend `kills` times while the guest runs, restarting it with `restart(n)` after a
/// short random pause and waiting for the VMM to be back on it before the next kill. Returns how
/// many kills were done before the guest finished.
fn kill_loop(
    vmm: &mut Vmm,
    mut backend: ChildGuard,
    kills: usize,
    rng: &mut Rng,
    mut restart: impl FnMut(usize) -> ChildGuard,
) -> (usize, ChildGuard) {
    let mut done = 0;
    while done < kills {
        std::thread::sleep(rng.millis(40, 250));
        if !vmm.running() {
            break;
        }
        kill_hard(backend);
        done += 1;
        std::thread::sleep(rng.millis(0, 60));
        backend = restart(done);
        // The next kill must find a connected backend, or two kills would be one outage.
        let start = Instant::now();
        while count(&vmm.stderr(), "vhost-user backend back after") < done && vmm.running() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the VMM did not reconnect after kill {done}\n{}",
                vmm.describe()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    (done, backend)
}

/// The number that ends right before `suffix` in `line` (panics, with the line, if none).
fn number_before(line: &str, suffix: &str) -> u64 {
    let head = line
        .split(suffix)
        .next()
        .filter(|_| line.contains(suffix))
        .unwrap_or_else(|| panic!("no '{suffix}' in: {line}"));
    let digits: String = head
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number before '{suffix}' in: {line}"))
}

/// The number that starts right after `prefix` in `line`.
fn number_after(line: &str, prefix: &str) -> u64 {
    let tail = line
        .split_once(prefix)
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no '{prefix}' in: {line}"));
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after '{prefix}' in: {line}"))
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

const KILLS: usize = 20;
const BLOCKS: u64 = 8192;
const PASSES: u64 = 3;
const SEED: u64 = 77;

#[test]
fn our_backend_killed_20_times_mid_io_loses_and_repeats_nothing() {
    let dir = TempDir::new("reconnect-ours");
    let image = zero_image(&dir, "disk.img", BLOCKS * 4096);
    let socket = dir.path("blk.sock");
    let spawn = |n: usize| {
        let log = dir.path(&format!("backend-{n}.log"));
        let mut c = Command::new(vmm_bin());
        c.env("VMM_LOG", "info")
            .arg("blk-backend")
            .arg("--socket")
            .arg(&socket)
            .arg("--file")
            .arg(&image)
            .args(["--delay-completions", "50-1500"]);
        let mut g = ChildGuard::spawn(&mut c, "vmm blk-backend", log);
        g.wait_for_listening_socket(&socket, Duration::from_secs(10));
        g
    };
    let mut rng = Rng::from_env_or_clock();
    let backend = spawn(0);
    let mut vmm = Vmm::start(
        &dir,
        &socket,
        &format!("blk-write-verify blocks={BLOCKS} qd=32 irq seed={SEED} passes={PASSES}"),
    );
    vmm.wait_for_stdout("virtio-blk at", Duration::from_secs(30));
    let (kills, _backend) = kill_loop(&mut vmm, backend, KILLS, &mut rng, spawn);
    let code = vmm.wait(Duration::from_secs(240));
    let stdout = vmm.stdout();
    let stderr = vmm.stderr();
    assert_eq!(
        kills,
        KILLS,
        "the guest finished after {kills} kills (make it write more)\n{}",
        vmm.describe()
    );
    assert_eq!(code, Some(0), "vmm failed\n{}", vmm.describe());
    assert!(
        stdout.contains("test-guest: blk-write-verify PASS"),
        "{}",
        vmm.describe()
    );
    let last_seed = SEED + PASSES - 1;
    let verified = format!("seed={last_seed} written={BLOCKS} verified={BLOCKS}");
    assert!(
        stdout.contains(&verified),
        "no '{verified}'\n{}",
        vmm.describe()
    );
    // One line per outage, each with its downtime and how many requests were resubmitted.
    let outages = count(&stderr, "vhost-user backend back after");
    assert_eq!(outages, kills, "one line per outage\n{}", vmm.describe());

    // The recovery path ran: kills landed with requests in flight, and each restarted backend
    // resubmitted them from the inflight region. Two independent counts must agree, kill by
    // kill: what the frontend read in the region before the replay, and what the backend says
    // it resubmitted ("resubmitting N requests").
    let frontend_counts: Vec<u64> = stderr
        .lines()
        .filter(|l| l.contains("vhost-user backend back after"))
        .map(|l| number_before(l, " requests resubmitted from the inflight region"))
        .collect();
    let backend_counts: Vec<u64> = (1..=kills)
        .map(|n| {
            let log =
                std::fs::read_to_string(dir.path(&format!("backend-{n}.log"))).unwrap_or_default();
            log.lines()
                .filter(|l| l.contains("inflight recovery: rolled back"))
                .map(|l| number_after(l, "resubmitting "))
                .sum()
        })
        .collect();
    eprintln!("reconnect test: {kills} kills; requests resubmitted per kill: {backend_counts:?}");
    assert_eq!(
        frontend_counts,
        backend_counts,
        "the frontend's and the backend's counts of resubmitted requests differ\n{}",
        vmm.describe()
    );
    assert!(
        backend_counts.iter().any(|&n| n > 0),
        "no restarted backend resubmitted anything: the kills never caught requests in flight\n{}",
        vmm.describe()
    );

    check_image(
        &image,
        &[WrittenRange {
            start: 0,
            blocks: BLOCKS,
            seed: last_seed,
        }],
    )
    .unwrap_or_else(|e| panic!("host image: {e}"));
}

#[test]
fn qemu_storage_daemon_killed_at_queue_depth_1_recovers_through_the_avail_ring() {
    const QSD_KILLS: usize = 5;
    const QSD_BLOCKS: u64 = 16384;
    let dir = TempDir::new("reconnect-qsd");
    let image = zero_image(&dir, "disk.img", QSD_BLOCKS * 4096);
    let socket = dir.path("qsd.sock");
    let mut rng = Rng::from_env_or_clock();
    let backend = spawn_qemu_storage_daemon(&dir, &socket, &image);
    let mut vmm = Vmm::start(
        &dir,
        &socket,
        &format!("blk-write-verify blocks={QSD_BLOCKS} qd=1 irq seed={SEED}"),
    );
    vmm.wait_for_stdout("virtio-blk at", Duration::from_secs(30));
    let (kills, _backend) = kill_loop(&mut vmm, backend, QSD_KILLS, &mut rng, |_| {
        spawn_qemu_storage_daemon(&dir, &socket, &image)
    });
    let code = vmm.wait(Duration::from_secs(240));
    assert_eq!(
        kills,
        QSD_KILLS,
        "the guest finished too early\n{}",
        vmm.describe()
    );
    assert_eq!(code, Some(0), "vmm failed\n{}", vmm.describe());
    let stdout = vmm.stdout();
    let verified = format!("seed={SEED} written={QSD_BLOCKS} verified={QSD_BLOCKS}");
    assert!(
        stdout.contains(&verified),
        "no '{verified}'\n{}",
        vmm.describe()
    );
    let stderr = vmm.stderr();
    assert_eq!(
        count(&stderr, "vhost-user backend back after"),
        kills,
        "{}",
        vmm.describe()
    );
    // Without inflight tracking the frontend can only count what lies past used->idx.
    assert!(
        stderr.contains("re-read from the avail ring (no inflight tracking)"),
        "{}",
        vmm.describe()
    );
    check_image(
        &image,
        &[WrittenRange {
            start: 0,
            blocks: QSD_BLOCKS,
            seed: SEED,
        }],
    )
    .unwrap_or_else(|e| panic!("host image: {e}"));
}

#[test]
fn a_backend_that_returns_with_another_disk_is_refused_saying_so() {
    let dir = TempDir::new("reconnect-refused");
    let image = zero_image(&dir, "disk.img", 8 << 20);
    let bigger = zero_image(&dir, "bigger.img", 16 << 20);
    let socket = dir.path("blk.sock");
    let backend = spawn_blk_backend(&dir, &socket, &image, &[]);
    let mut vmm = Vmm::start(
        &dir,
        &socket,
        "blk-write-verify blocks=2048 qd=4 irq passes=1000",
    );
    vmm.wait_for_stdout("blk-write-verify: pass 1/1000", Duration::from_secs(60));
    kill_hard(backend);
    let _other = spawn_blk_backend(&dir, &socket, &bigger, &[]);
    let start = Instant::now();
    let want = "the returning backend is not the same device: capacity is 32768 sectors, not 16384";
    while !vmm.stderr().contains(want) {
        assert!(vmm.running(), "vmm exited\n{}", vmm.describe());
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no refusal naming the capacity\n{}",
            vmm.describe()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        vmm.stderr().contains("the device needs a reset"),
        "{}",
        vmm.describe()
    );
    // The driver is told: DEVICE_NEEDS_RESET with a config interrupt. The test guest treats it as
    // the end of its test (a real driver would reset the device); it must not hang.
    vmm.wait(Duration::from_secs(30));
    assert!(
        vmm.stdout()
            .contains("FAIL: device set DEVICE_NEEDS_RESET while write of block"),
        "the guest did not see the device ask for a reset\n{}",
        vmm.describe()
    );
}
