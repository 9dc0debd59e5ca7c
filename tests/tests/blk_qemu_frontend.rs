//! QEMU as the frontend of our standalone backend: resources/linux/qemu-blk-test boots Debian's
//! kernel under QEMU (TCG) with a vhost-user-blk device served by `vmm blk-backend`; Linux's own
//! virtio-blk driver writes and reads back a pattern, then the script checks the disk file on the
//! host. Both transports Linux can meet: virtio-pci (q35) and virtio-mmio found through ACPI
//! (microvm, the kernel entered through PVH as our VMM does it).

use std::process::Command;
use std::time::Duration;

use integration_tests::{linux_asset, repo_root, run_with_timeout, vmm_bin};

const BLOCKS: u32 = 256;

fn qemu_blk_test(machine: &str, kernel: &str) {
    // Fail loudly (not skip) when the assets from resources/setup are missing.
    linux_asset(kernel);
    linux_asset("initramfs.cpio");
    let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
    assert!(
        qemu.map(|o| o.status.success()).unwrap_or(false),
        "qemu-system-x86_64 is not installed: run resources/setup"
    );

    let backend = format!(
        "{} blk-backend --socket {{sock}} --file {{disk}}",
        vmm_bin().display()
    );
    let mut c = Command::new(repo_root().join("resources/linux/qemu-blk-test"));
    c.current_dir(repo_root())
        .args([
            "--machine",
            machine,
            "--blocks",
            &BLOCKS.to_string(),
            "--timeout",
            "150",
        ])
        .args(["--backend-cmd", &backend]);
    // The script bounds QEMU itself (--timeout) and cleans up its children; this is the backstop.
    let o = run_with_timeout(&mut c, Duration::from_secs(200));
    assert!(!o.timed_out, "qemu-blk-test hung: {}", o.describe());
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    let guest_ok = format!("VMM-INIT: blk OK wrote={BLOCKS} verified={BLOCKS}");
    assert!(
        o.stdout.contains(&guest_ok),
        "expected '{guest_ok}': {}",
        o.describe()
    );
    assert!(
        o.stdout.contains("check-pattern: OK"),
        "no host-side pattern check: {}",
        o.describe()
    );
    assert!(o.stdout.contains("qemu-blk-test: PASS"), "{}", o.describe());
    assert!(
        o.stdout.contains("vmm blk-backend"),
        "not our backend: {}",
        o.describe()
    );
}

#[test]
fn qemu_q35_virtio_pci_with_our_backend() {
    qemu_blk_test("q35", "bzImage");
}

#[test]
fn qemu_microvm_virtio_mmio_with_our_backend() {
    qemu_blk_test("microvm", "vmlinux");
}
