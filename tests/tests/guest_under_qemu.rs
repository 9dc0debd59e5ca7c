//! The same test guest, unchanged, under QEMU 10's microvm: the benchmarks compare the two VMMs
//! on this guest, so it must behave the same under both (resources/guest/qemu-run), with the QEMU
//! `-cpu` model that works on this host (resources/lib/qemu-cpu).

use std::process::Command;
use std::time::Duration;

use integration_tests::{
    check_image, guest_elf, qemu_cpu, repo_root, require_kvm, run_with_timeout, zero_image,
    TempDir, WrittenRange,
};

fn qemu_run(args: &[&str]) -> integration_tests::Outcome {
    require_kvm();
    let mut c = Command::new(repo_root().join("resources/guest/qemu-run"));
    c.env("VMM_QEMU_CPU", qemu_cpu())
        .arg("--guest")
        .arg(guest_elf())
        .args(args);
    run_with_timeout(&mut c, Duration::from_secs(90))
}

#[test]
fn hello_exit_and_fault_under_qemu_microvm() {
    let o = qemu_run(&["--", "hello"]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains("Hello from the test guest"),
        "{}",
        o.describe()
    );
    let o = qemu_run(&["--", "exit=7"]);
    assert_eq!(o.code(), Some(7), "{}", o.describe());
    // qemu-run reports a guest that shut the machine down (triple fault) as 100.
    let o = qemu_run(&["--", "fault"]);
    assert_eq!(o.code(), Some(100), "{}", o.describe());
}

#[test]
fn blk_write_verify_under_qemu_microvm_and_qemu_storage_daemon() {
    let dir = TempDir::new("qemu-guest");
    let img = zero_image(&dir, "disk.img", 16 << 20);
    let o = qemu_run(&[
        "--disk",
        img.to_str().unwrap(),
        "--",
        "blk-write-verify",
        "blocks=32",
        "seed=11",
    ]);
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains("test-guest: blk-write-verify PASS"),
        "{}",
        o.describe()
    );
    check_image(
        &img,
        &[WrittenRange {
            start: 0,
            blocks: 32,
            seed: 11,
        }],
    )
    .unwrap();
}
