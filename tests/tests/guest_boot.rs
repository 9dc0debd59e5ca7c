//! The test guest under `vmm run`: every exit path a test kernel can take.

use std::time::Duration;

use integration_tests::{guest_elf, require_kvm, vmm_run};

const T: Duration = Duration::from_secs(60);

fn run(cmdline: &str, extra: &[&str]) -> integration_tests::Outcome {
    require_kvm();
    let k = guest_elf();
    let mut args = vec!["--kernel", k.to_str().unwrap(), "--cmdline", cmdline];
    args.extend_from_slice(extra);
    vmm_run(&args, T)
}

#[test]
fn hello_prints_and_exits_zero() {
    let o = run("hello", &[]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(o.stdout.contains("Hello from the test guest"), "{}", o.describe());
    assert!(o.stdout.contains("test-guest: hello PASS"), "{}", o.describe());
}

#[test]
fn exit_port_value_becomes_the_exit_status() {
    for v in [7, 0, 42, 255] {
        let o = run(&format!("exit={v}"), &[]);
        assert_eq!(o.code(), Some(v), "exit={v}: {}", o.describe());
    }
}

#[test]
fn triple_fault_is_reported_and_fails() {
    let o = run("fault", &[]);
    assert_ne!(o.code(), Some(0), "{}", o.describe());
    assert!(!o.timed_out, "{}", o.describe());
    assert!(o.stderr.contains("triple fault"), "{}", o.describe());
    assert_eq!(o.stderr.trim().lines().count(), 1, "one-line message: {}", o.describe());
}

#[test]
fn compute_reports_a_rate() {
    let o = run("compute", &[]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    let line = o.stdout.lines().find(|l| l.starts_with("compute:") && l.contains("iterations_per_sec=")).unwrap_or_else(|| panic!("{}", o.describe()));
    let rate: f64 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("iterations_per_sec="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rate in {line}"));
    assert!(rate > 0.0, "{line}");
}

#[test]
fn several_vcpus_boot() {
    let o = run("hello", &["--cpus", "4", "--mem", "512M"]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(o.stdout.contains("Hello from the test guest"), "{}", o.describe());
}

#[test]
fn unknown_test_is_a_guest_side_failure() {
    let o = run("no-such-test", &[]);
    assert_eq!(o.code(), Some(2), "{}", o.describe());
}
