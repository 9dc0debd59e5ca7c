//! `vmm reconnect-test`, end to end: the harness passes our backend through 50 kills, catches a
//! backend that keeps no inflight record while completing out of order and each planted
//! recovery flaw of `flawed-blk-backend` (naming blocks), and refuses bad input with one line,
//! leaving no process and no temp directory behind.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{require_kvm, run_with_timeout, vmm_bin, Outcome};

fn our_backend(extra: &str) -> String {
    format!(
        "'{}' blk-backend --socket {{socket}} --file {{disk}} --delay-completions 50-1500{extra}",
        vmm_bin().display()
    )
}

/// A private TMPDIR per test, so "no temp directory left" is checkable.
fn tmpdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("reconnect-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create tmpdir");
    dir
}

fn reconnect_test(tmp: &PathBuf, args: &[&str], timeout: Duration) -> Outcome {
    let mut cmd = Command::new(vmm_bin());
    cmd.env("TMPDIR", tmp).arg("reconnect-test").args(args);
    run_with_timeout(&mut cmd, timeout)
}

/// Nothing left in TMPDIR, and no process whose command line names it.
fn assert_nothing_left(tmp: &PathBuf) {
    assert_nothing_left_named(tmp, "\u{0}never");
}

/// As [`assert_nothing_left`], and no process whose command line contains `also`.
fn assert_nothing_left_named(tmp: &PathBuf, also: &str) {
    let left: Vec<_> = std::fs::read_dir(tmp)
        .expect("read tmpdir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let needle = tmp.to_string_lossy().into_owned();
    let start = Instant::now();
    loop {
        let stray: Vec<String> = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&needle) || c.contains(also))
            .collect();
        if stray.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "stray processes: {stray:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(tmp);
}

/// The report (stdout) holds `text`; else fail with the whole run described.
fn assert_says(out: &Outcome, text: &str) {
    assert!(
        out.stdout.contains(text),
        "wanted {text:?}\n{}",
        out.describe()
    );
}

fn field(json: &str, key: &str) -> String {
    let pat = format!("\"{key}\": ");
    let rest = json
        .split_once(&pat)
        .unwrap_or_else(|| panic!("no {key} in {json}"))
        .1;
    rest.split([',', '\n'])
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

#[test]
fn our_backend_survives_50_kills() {
    require_kvm();
    let tmp = tmpdir("ours");
    let json = tmp.with_extension("json");
    let svg = tmp.with_extension("svg");
    let backend = our_backend("");
    let started = Instant::now();
    let out = reconnect_test(
        &tmp,
        &[
            "--backend",
            &backend,
            "--kills",
            "50",
            "--disk-size",
            "16M",
            "--seed",
            "5",
            "--json",
            json.to_str().expect("utf-8 path"),
            "--plot",
            svg.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(180),
    );
    eprintln!("took {:?}\n{}", started.elapsed(), out.stdout);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_says(&out, "kills:               50 of 50");
    assert_says(&out, "recoveries:          50");
    assert_says(&out, "INFLIGHT_SHMFD:      yes");
    assert_says(&out, "disk file:           0 wrong blocks");
    let report = std::fs::read_to_string(&json).expect("the JSON report");
    let _ = std::fs::remove_file(&json);
    assert_eq!(field(&report, "kills"), "50");
    assert_eq!(field(&report, "recoveries"), "50");
    assert_eq!(field(&report, "wrong_blocks"), "0");
    assert_eq!(field(&report, "inflight_shmfd"), "true");
    assert_eq!(field(&report, "passed"), "true");
    // The plot: 50 kill marks and the axes, as SVG text (plot.rs's tests check the drawing).
    let picture = std::fs::read_to_string(&svg).expect("the SVG plot");
    let _ = std::fs::remove_file(&svg);
    assert!(
        picture.starts_with("<svg") || picture.contains("<svg "),
        "not an SVG"
    );
    assert!(picture.contains("guest throughput: 50 kills, 50 recoveries"));
    assert!(picture.contains("recovery time (ms)"));
    assert_nothing_left(&tmp);
}

/// `--duration`: kills go on for the time given, then the guest verifies.
#[test]
fn a_duration_bounds_the_kills_by_time() {
    require_kvm();
    let tmp = tmpdir("duration");
    let json = tmp.with_extension("json");
    let backend = our_backend("");
    let out = reconnect_test(
        &tmp,
        &[
            "--backend",
            &backend,
            "--duration",
            "2",
            "--disk-size",
            "8M",
            "--json",
            json.to_str().expect("utf-8 path"),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let report = std::fs::read_to_string(&json).expect("the JSON report");
    let _ = std::fs::remove_file(&json);
    assert_eq!(field(&report, "duration_asked_s"), "2");
    assert_eq!(field(&report, "kills_asked"), "null");
    let kills: u32 = field(&report, "kills").parse().expect("a number");
    // Kills come 40-250 ms apart plus the restart: 2 s hold several, and far fewer than 100.
    assert!(
        (3..100).contains(&kills),
        "{kills} kills\n{}",
        out.describe()
    );
    assert_says(&out, &format!("kills:               {kills} in 2 s"));
    assert_eq!(field(&report, "recoveries"), kills.to_string());
    assert_nothing_left(&tmp);
}

/// Planted flaw: no inflight tracking while completions come out of order. What was completed
/// ahead of an older request is executed again, the older one is never executed: the harness
/// must see it (the guest's failure, wrong blocks, or a hang) and exit non-zero.
#[test]
fn a_backend_without_inflight_tracking_is_caught() {
    require_kvm();
    let tmp = tmpdir("noinflight");
    let backend = our_backend(" --no-inflight");
    let out = reconnect_test(
        &tmp,
        &[
            "--backend",
            &backend,
            "--kills",
            "50",
            "--disk-size",
            "16M",
            "--seed",
            "5",
        ],
        Duration::from_secs(180),
    );
    eprintln!("{}", out.stdout);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert_says(&out, "INFLIGHT_SHMFD:      no");
    assert_says(&out, "verdict:             FAIL");
    let caught = !out.stdout.contains("disk file:           0 wrong blocks")
        || !out.stdout.contains("hangs:               0")
        || !out.stdout.contains("guest:               PASS");
    assert!(caught, "{}", out.describe());
    assert_nothing_left(&tmp);
}

/// `flawed-blk-backend` (this crate's binary): our backend with one recovery bug planted back.
fn flawed_backend(flaw: &str, extra: &str) -> String {
    format!(
        "'{}' --flaw {flaw} --socket {{socket}} --file {{disk}} --delay-completions 50-1500{extra}",
        env!("CARGO_BIN_EXE_flawed-blk-backend")
    )
}

/// Runs the harness against `backend` (20 kills at queue depth 32) and returns its report.
fn run_against(tag: &str, backend: &str) -> (Outcome, PathBuf) {
    let tmp = tmpdir(tag);
    let out = reconnect_test(
        &tmp,
        &[
            "--backend",
            backend,
            "--kills",
            "20",
            "--queue-depth",
            "32",
            "--disk-size",
            "8M",
            "--seed",
            "11",
        ],
        Duration::from_secs(240),
    );
    eprintln!("{tag}:\n{}", out.stdout);
    (out, tmp)
}

/// The lines of the report that name a block: the guest's verdict or the disk check's list.
fn named_blocks(report: &str) -> Vec<&str> {
    report
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            (l.starts_with("guest:") && l.contains("block ")) || l.starts_with("block ")
        })
        .collect()
}

fn assert_caught(tag: &str, flaw: &str, extra: &str) -> String {
    let (out, tmp) = run_against(tag, &flawed_backend(flaw, extra));
    assert_eq!(out.code(), Some(1), "{flaw}: {}", out.describe());
    assert_says(&out, "verdict:             FAIL");
    // The frontend was told it is protected: the flaw hides behind a negotiated region.
    assert_says(&out, "INFLIGHT_SHMFD:      yes");
    assert!(
        !named_blocks(&out.stdout).is_empty(),
        "{flaw}: the report names no block\n{}",
        out.describe()
    );
    assert_nothing_left(&tmp);
    out.stdout
}

/// Planted flaw: resubmitted writes answered OK and never written. The verified pass was hit by
/// the last kills, so the disk check finds the blocks whose data never arrived.
#[test]
fn a_backend_that_acks_resubmitted_writes_without_writing_is_caught() {
    require_kvm();
    let report = assert_caught("ackonly", "ack-resubmitted-without-writing", "");
    assert!(
        !report.contains("disk file:           0 wrong blocks"),
        "{report}"
    );
}

/// Planted flaw: the region is negotiated but ignored, so a restart re-reads the avail ring
/// from SET_VRING_BASE while completions came out of order.
#[test]
fn a_backend_that_ignores_the_inflight_region_is_caught() {
    require_kvm();
    assert_caught("ignoreregion", "ignore-inflight-region", "");
}

/// Planted flaw: recovery rolls back only the head of the last batch. Batches are gathered for
/// 2 ms and held open 2 ms once published, so kills find multi-entry batches open; the control
/// below shows that this window alone, with a whole-batch rollback, loses nothing.
#[test]
fn a_backend_that_rolls_back_one_entry_of_the_last_batch_is_caught() {
    require_kvm();
    assert_caught("onlyhead", "roll-back-one-entry", " --hold-batches-ms 2");
}

#[test]
fn held_open_batches_with_a_whole_batch_rollback_lose_nothing() {
    require_kvm();
    let (out, tmp) = run_against("heldbatch", &flawed_backend("none", " --hold-batches-ms 2"));
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_says(&out, "kills:               20 of 20");
    assert_nothing_left(&tmp);
}

fn assert_refused(tag: &str, backend: &str, want: &str) {
    assert_refused_named(tag, backend, want, "\u{0}never");
}

fn assert_refused_named(tag: &str, backend: &str, want: &str, also: &str) {
    let tmp = tmpdir(tag);
    let started = Instant::now();
    let out = reconnect_test(
        &tmp,
        &["--backend", backend, "--kills", "3"],
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("vmm: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.describe());
    assert!(
        errors[0].contains(want),
        "wanted '{want}'\n{}",
        out.describe()
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_nothing_left_named(&tmp, also);
}

#[test]
fn a_command_without_a_placeholder_is_refused() {
    assert_refused("nosocket", "true --file {disk}", "no {socket} placeholder");
    assert_refused("nodisk", "true --socket {socket}", "no {disk} placeholder");
}

#[test]
fn a_backend_that_never_creates_its_socket_is_refused() {
    // `sleep` may be exec'd by the shell, so its own command line is looked for too.
    assert_refused_named(
        "silent",
        "sleep 3017 # {socket} {disk}",
        "the backend did not listen on",
        "sleep 3017",
    );
}

#[test]
fn a_backend_that_exits_at_once_is_refused() {
    assert_refused(
        "exits",
        "echo cannot open {disk} for {socket} >&2; exit 3",
        "the backend exited (exit status: 3) before listening on its socket; its last line: cannot open",
    );
}
