//! `vmm probe`, end to end: our backend passes every check (measured through its /proc fds and
//! RSS, under a memory cap); each defence reverted in `flawed-blk-backend` fails exactly the
//! check that hunts for it, while the same binary without the flaw passes it; bad input gets one
//! line and a non-zero exit. Two recovery flaws (planted for `vmm reconnect-test`) fail the
//! probe's inflight-resubmit too, without a VM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::{run_with_timeout, vmm_bin, zero_image, ChildGuard, Outcome, TempDir};

const T: Duration = Duration::from_secs(240);

fn flawed_backend_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flawed-blk-backend"))
}

/// `program args...` under a 4 GiB address-space cap (what the probe's docs ask of a target),
/// listening on `socket`.
fn capped_backend(dir: &TempDir, socket: &Path, program: &Path, args: &[&str]) -> ChildGuard {
    let image = zero_image(dir, "disk.img", 16 << 20);
    let line = format!(
        "ulimit -v 4194304; exec '{}' {} --socket '{}' --file '{}'",
        program.display(),
        args.join(" "),
        socket.display(),
        image.display()
    );
    let mut c = Command::new("sh");
    c.arg("-c").arg(line);
    let mut g = ChildGuard::spawn(&mut c, "backend", dir.path("backend.log"));
    g.wait_for_listening_socket(socket, Duration::from_secs(10));
    g
}

fn probe(args: &[&str]) -> Outcome {
    let mut c = Command::new(vmm_bin());
    c.arg("probe").args(args);
    run_with_timeout(&mut c, T)
}

/// The check's own line: `FAIL    inflight-queue-count  ...`.
fn line_of<'a>(o: &'a Outcome, check: &str) -> &'a str {
    o.stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(check))
        .unwrap_or_else(|| panic!("no line for {check}:\n{}", o.describe()))
}

#[test]
fn our_backend_passes_every_check() {
    let dir = TempDir::new("probe-ours");
    let socket = dir.path("blk.sock");
    let backend = capped_backend(&dir, &socket, &vmm_bin(), &["blk-backend"]);
    let json = dir.path("probe.json");
    let pid = backend.pid().to_string();
    let socket_arg = socket.to_string_lossy().into_owned();
    let json_arg = json.to_string_lossy().into_owned();
    let o = probe(&["--socket", &socket_arg, "--pid", &pid, "--json", &json_arg]);
    assert_eq!(
        o.code(),
        Some(0),
        "{}\nbackend log:\n{}",
        o.describe(),
        backend.log()
    );
    let list = probe(&["--list"]);
    let checks: Vec<&str> = list
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert!(checks.len() >= 25, "{}", list.describe());
    for check in &checks {
        let line = line_of(&o, check);
        // Every check applies to our backend, and each was measured (fds, RSS).
        assert!(line.starts_with("PASS "), "{line}");
        assert!(line.contains("[fds "), "{line}");
    }
    assert!(
        o.stdout.contains("memory cap: ulimit -v 4194304 KiB"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("result: PASS"), "{}", o.stdout);
    let json = std::fs::read_to_string(&json).expect("--json written");
    assert!(json.contains("\"passed\": true"), "{json}");
    assert_eq!(
        json.matches("\"result\": \"PASS\"").count(),
        checks.len(),
        "{json}"
    );
}

/// Each planted flaw reverts one defence; the probe check that hunts for that bug class must
/// fail on it (exit 1, naming the check), and pass on the same binary with `--flaw none`.
#[test]
fn each_reverted_defence_fails_its_check() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "unchecked-inflight-geometry",
            &["inflight-queue-count"],
            "answered with a",
        ),
        (
            "leak-refused-inflight-fd",
            &["inflight-set-too-small", "inflight-set-past-end"],
            "fd leak",
        ),
        (
            "accept-unoffered-protocol-bits",
            &["unoffered-protocol-bit"],
            "which it never offered",
        ),
        (
            "no-handshake-timeout",
            &["silent-client"],
            "held the backend",
        ),
        // Recovery flaws, caught without a VM by the hand-written region.
        (
            "ignore-inflight-region",
            &["inflight-resubmit"],
            "were not all resubmitted",
        ),
        (
            "ack-resubmitted-without-writing",
            &["inflight-resubmit"],
            "does not hold its data",
        ),
    ];
    for (flaw, checks, evidence) in cases {
        for planted in [*flaw, "none"] {
            let dir = TempDir::new(&format!("probe-flaw-{planted}"));
            let socket = dir.path("blk.sock");
            let backend =
                capped_backend(&dir, &socket, &flawed_backend_bin(), &["--flaw", planted]);
            let pid = backend.pid().to_string();
            let socket_arg = socket.to_string_lossy().into_owned();
            let only = checks.join(",");
            let o = probe(&["--socket", &socket_arg, "--pid", &pid, "--only", &only]);
            for check in *checks {
                let line = line_of(&o, check);
                if planted == "none" {
                    assert!(line.starts_with("PASS "), "{flaw} control: {line}");
                } else {
                    assert!(
                        line.starts_with("FAIL ") && line.contains(evidence),
                        "{flaw}: {line}"
                    );
                }
            }
            let want = if planted == "none" { 0 } else { 1 };
            assert_eq!(o.code(), Some(want), "{flaw}/{planted}: {}", o.describe());
        }
    }
}

/// `--restart`: the probe starts the backend itself and measures the PID it started.
#[test]
fn restart_starts_the_backend_and_measures_it() {
    let dir = TempDir::new("probe-restart");
    let socket = dir.path("blk.sock");
    let image = zero_image(&dir, "disk.img", 16 << 20);
    let command = format!(
        "'{}' blk-backend --socket '{}' --file '{}'",
        vmm_bin().display(),
        socket.display(),
        image.display()
    );
    let socket_arg = socket.to_string_lossy().into_owned();
    let o = probe(&[
        "--socket",
        &socket_arg,
        "--restart",
        &command,
        "--only",
        "identity,inflight-get-repeated",
    ]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(
        line_of(&o, "inflight-get-repeated").contains("[fds "),
        "{}",
        o.stdout
    );
    // Not capped: the advice is printed.
    assert!(
        o.stdout
            .contains("advice: the backend runs without a memory cap"),
        "{}",
        o.stdout
    );
}

#[test]
fn bad_input_gets_one_line_and_a_non_zero_exit() {
    let dir = TempDir::new("probe-bad");
    let nobody = dir.path("nobody.sock");
    let nobody = nobody.to_string_lossy().into_owned();
    for (args, says) in [
        (vec!["--socket", nobody.as_str()], "cannot connect"),
        (
            vec!["--socket", nobody.as_str(), "--only", "nonsense"],
            "--only nonsense: no such check",
        ),
        (
            vec!["--socket", nobody.as_str(), "--restart", "false"],
            "exited with status 1",
        ),
    ] {
        let o = probe(&args);
        assert_eq!(o.code(), Some(1), "{args:?}: {}", o.describe());
        assert!(o.stderr.contains(says), "{args:?}: {}", o.describe());
        assert_eq!(o.stderr.lines().count(), 1, "{args:?}: {}", o.describe());
        assert!(!o.stderr.contains("panicked"), "{}", o.describe());
    }
}
