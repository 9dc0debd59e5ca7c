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
    assert!(
        o.stdout.contains("Hello from the test guest"),
        "{}",
        o.describe()
    );
    assert!(
        o.stdout.contains("test-guest: hello PASS"),
        "{}",
        o.describe()
    );
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
    assert_eq!(
        o.stderr.trim().lines().count(),
        1,
        "one-line message: {}",
        o.describe()
    );
}

#[test]
fn compute_reports_a_rate() {
    let o = run("compute", &[]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    let line = o
        .stdout
        .lines()
        .find(|l| l.starts_with("compute:") && l.contains("iterations_per_sec="))
        .unwrap_or_else(|| panic!("{}", o.describe()));
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
    assert!(
        o.stdout.contains("Hello from the test guest"),
        "{}",
        o.describe()
    );
}

#[test]
fn unknown_test_is_a_guest_side_failure() {
    let o = run("no-such-test", &[]);
    assert_eq!(o.code(), Some(2), "{}", o.describe());
}

/// The same guest with its PVH note renamed boots through the plain ELF64 entry: long mode,
/// our identity page tables, boot_params in rsi (the guest reads its command line from there).
#[test]
fn plain_elf64_entry_without_pvh_note() {
    require_kvm();
    let mut elf = std::fs::read(guest_elf()).unwrap();
    // ELF note header: namesz=4, descsz, type=18 (XEN_ELFNOTE_PHYS32_ENTRY), name "Xen\0".
    let pos = (0..elf.len() - 16)
        .find(|&i| {
            elf[i..i + 4] == 4u32.to_le_bytes()
                && elf[i + 8..i + 12] == 18u32.to_le_bytes()
                && &elf[i + 12..i + 16] == b"Xen\0"
        })
        .expect("the test guest carries a PVH note");
    elf[pos + 8..pos + 12].copy_from_slice(&0x7fu32.to_le_bytes());
    let d = integration_tests::TempDir::new("elf64");
    let k = d.path("guest-no-pvh.elf");
    std::fs::write(&k, &elf).unwrap();
    let o = vmm_run(&["--kernel", k.to_str().unwrap(), "--cmdline", "hello"], T);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains("Hello from the test guest"),
        "{}",
        o.describe()
    );
    let o = vmm_run(&["--kernel", k.to_str().unwrap(), "--cmdline", "exit=9"], T);
    assert_eq!(o.code(), Some(9), "{}", o.describe());
}

/// With a terminal on stdin (`script` provides one), the console is character-at-a-time with no
/// local echo while the guest runs, and the terminal is restored afterwards, also when vmm is
/// ended by Ctrl-C (SIGINT).
#[test]
fn console_is_raw_while_the_guest_runs_and_restored_after() {
    require_kvm();
    let vmm = integration_tests::vmm_bin();
    let run = format!(
        "{} run --kernel {} --cmdline compute > /dev/null",
        vmm.display(),
        guest_elf().display()
    );
    let tokens = |out: &str, tag: &str| -> Vec<String> {
        let line = out
            .lines()
            .find(|l| l.contains(tag))
            .unwrap_or_else(|| panic!("no {tag} in {out}"));
        line.split_whitespace().map(str::to_string).collect()
    };
    let script = |shell: &str| {
        let mut c = std::process::Command::new("script");
        c.args(["-qec", shell, "/dev/null"]);
        integration_tests::run_with_timeout(&mut c, T)
    };

    let o = script(&format!(
        "(until pgrep -x -P $$ vmm > /dev/null; do sleep 0.05; done; sleep 0.3; echo DURING: $(stty -a < /dev/tty)) & {run}; echo AFTER: $(stty -a)"
    ));
    let during = tokens(&o.stdout, "DURING:");
    assert!(
        during.contains(&"-icanon".into()) && during.contains(&"-echo".into()),
        "{}",
        o.describe()
    );
    let after = tokens(&o.stdout, "AFTER:");
    assert!(
        after.contains(&"icanon".into()) && after.contains(&"echo".into()),
        "{}",
        o.describe()
    );

    let o = script(&format!(
        "(until p=$(pgrep -x -P $$ vmm); do sleep 0.05; done; sleep 0.3; kill -INT $p) & {run}; echo RC=$? AFTER: $(stty -a)"
    ));
    let after = tokens(&o.stdout, "AFTER:");
    assert!(after.contains(&"RC=130".into()), "{}", o.describe());
    assert!(
        after.contains(&"icanon".into()) && after.contains(&"echo".into()),
        "{}",
        o.describe()
    );
}
