//! Debian's stock kernel under `vmm`.
//!
//! On a hardware-KVM host the kernel boots to our initramfs. On PVM hosts (kvm_pvm) guest ring-0
//! code is instruction-emulated at about a million instructions per second and a non-PVM Linux
//! cannot reach user space, so here we check what early boot proves about our VMM: the banner,
//! the command line we passed, our E820 map and our ACPI tables (listed without warnings).
//! The full-boot tests are marked ignored on PVM hosts, with the reason, so the runner's
//! summary counts them as ignored rather than passed (tests/build.rs).

use std::process::Command;
use std::time::Duration;

use integration_tests::{host_is_pvm, linux_asset, require_kvm, run_until, vmm_bin};

/// Kernel parameters that steer a non-PVM kernel around instructions PVM's emulator lacks
/// (README, "PVM hosts"); harmless on hardware KVM.
const PVM_SAFE: &str =
    "noxsave clearcpuid=308,151 nofsgsbase nopku lpj=1000000 tsc=reliable no_timer_check";

fn vmm(kernel: &str, cmdline: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(vmm_bin());
    c.args([
        "run",
        "--kernel",
        kernel,
        "--mem",
        "512M",
        "--cmdline",
        cmdline,
    ])
    .args(extra);
    c
}

#[test]
fn vmlinux_pvh_early_boot_sees_our_cmdline_e820_and_acpi() {
    require_kvm();
    let k = linux_asset("vmlinux");
    let cmdline = format!("earlyprintk=serial,ttyS0,115200 console=ttyS0 {PVM_SAFE} vmmtest=early");
    let want_cmdline = format!("Command line: {cmdline}");
    let wanted: Vec<String> = vec![
        "Linux version 6.1".into(),
        want_cmdline,
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".into(),
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved".into(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable".into(),
        "ACPI: RSDP 0x00000000000E0000".into(),
        "ACPI: XSDT 0x".into(),
        "ACPI: FACP 0x".into(),
        "ACPI: DSDT 0x".into(),
        "ACPI: APIC 0x".into(),
    ];
    let mut seen = vec![false; wanted.len()];
    let (lines, done, elapsed) = run_until(
        &mut vmm(k.to_str().unwrap(), &cmdline, &[]),
        Duration::from_secs(300),
        |l| {
            for (i, w) in wanted.iter().enumerate() {
                if l.contains(w.as_str()) {
                    seen[i] = true;
                }
            }
            seen.iter().all(|s| *s)
        },
    );
    let log = lines.join("\n");
    assert!(
        done,
        "missing {:?} after {elapsed:?}:\n{log}",
        wanted
            .iter()
            .zip(&seen)
            .filter(|(_, s)| !**s)
            .map(|(w, _)| w)
            .collect::<Vec<_>>()
    );
    for bad in [
        "ACPI BIOS Warning",
        "ACPI Warning",
        "ACPI Error",
        "Incorrect checksum",
        "Firmware Bug",
        "invalid length",
        "WARNING:",
        "[Firmware Bug]",
        "[Firmware Warn]",
        "[Firmware Info]",
        "BIOS bug",
        "unchecked MSR access",
    ] {
        assert!(!log.contains(bad), "kernel complained ({bad}):\n{log}");
    }
    // No line of the E820 map beyond ours.
    let e820 = lines.iter().filter(|l| l.contains("BIOS-e820:")).count();
    assert_eq!(e820, 3, "{log}");
    eprintln!("vmlinux (PVH) early boot to the ACPI table list took {elapsed:.1?}");
}

#[test]
#[cfg_attr(
    kvm_pvm_host,
    ignore = "needs hardware KVM: /dev/kvm here is PVM (kvm_pvm), guest ring-0 code is emulated at ~1 MIPS and a non-PVM Linux cannot reach user space (README, 'PVM hosts')"
)]
fn full_boot_to_initramfs_bzimage_and_pvh() {
    require_kvm();
    assert!(
        !host_is_pvm(),
        "this test binary was built on a hardware-KVM host but runs on a PVM one: rebuild it here"
    );
    let initrd = linux_asset("initramfs.cpio");
    for kernel in ["bzImage", "vmlinux"] {
        let k = linux_asset(kernel);
        let mut c = vmm(
            k.to_str().unwrap(),
            "console=ttyS0 vmmtest=boot",
            &["--initrd", initrd.to_str().unwrap()],
        );
        let (lines, done, elapsed) = run_until(&mut c, Duration::from_secs(120), |l| {
            l.contains("VMM-INIT: boot OK")
        });
        assert!(
            done,
            "{kernel}: no initramfs marker after {elapsed:?}:\n{}",
            lines.join("\n")
        );
        eprintln!("{kernel}: booted to /init in {elapsed:.1?}");

        // Linux's virtio_mmio finds our device through the DSDT (LNRO0005; Debian's kernel has no
        // CMDLINE_DEVICES), virtio_blk drives it, /init writes and reads /dev/vda.
        let dir = integration_tests::TempDir::new("fullboot-blk");
        let disk = dir.path("vda.img");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let blk = format!("path={}", disk.display());
        let mut c = vmm(
            k.to_str().unwrap(),
            "console=ttyS0 vmmtest=blk vmmblocks=256",
            &["--initrd", initrd.to_str().unwrap(), "--blk", &blk],
        );
        let (lines, done, elapsed) = run_until(&mut c, Duration::from_secs(120), |l| {
            l.contains("VMM-INIT: blk OK")
        });
        assert!(
            done,
            "{kernel}: no virtio-blk success after {elapsed:?}:\n{}",
            lines.join("\n")
        );
        let check = integration_tests::repo_root().join("resources/linux/check-pattern.py");
        let st = Command::new("python3")
            .arg(check)
            .arg(&disk)
            .arg("256")
            .status()
            .unwrap();
        assert!(
            st.success(),
            "{kernel}: the disk does not hold what /init wrote"
        );
        eprintln!("{kernel}: /dev/vda written and verified through vhost-user in {elapsed:.1?}");
    }
}

#[test]
fn bzimage_boot_protocol_reaches_the_decompressor() {
    require_kvm();
    let k = linux_asset("bzImage");
    // The decompressor's first words: it parsed our boot_params command line (nokaslr) and found
    // the UART from earlyprintk. KASLR's search is skipped because its loops crawl when emulated.
    let cmdline = "earlyprintk=serial,ttyS0,115200 console=ttyS0 nokaslr";
    let (lines, done, elapsed) = run_until(
        &mut vmm(k.to_str().unwrap(), cmdline, &[]),
        Duration::from_secs(120),
        |l| l.contains("KASLR disabled: 'nokaslr' on cmdline."),
    );
    assert!(
        done,
        "no decompressor output after {elapsed:?}:\n{}",
        lines.join("\n")
    );
    eprintln!("bzImage: decompressor's first output after {elapsed:.1?}");
}

/// Without the steering parameters, a non-PVM kernel on a PVM host reaches an instruction the
/// ring-0 emulator lacks: `vmm` must stop with the RIP, the bytes and a hint, never hang.
#[test]
#[cfg_attr(
    not(kvm_pvm_host),
    ignore = "PVM hosts only: hardware KVM runs this kernel natively, so no instruction emulation failure happens to report"
)]
fn emulation_failure_names_rip_bytes_and_cause() {
    require_kvm();
    assert!(
        host_is_pvm(),
        "this test binary was built on a PVM host but runs on hardware KVM: rebuild it here"
    );
    let k = linux_asset("vmlinux");
    let mut c = Command::new(vmm_bin());
    c.args([
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--mem",
        "512M",
        "--cmdline",
        "earlyprintk=serial,ttyS0,115200",
    ]);
    let o = integration_tests::run_with_timeout(&mut c, Duration::from_secs(180));
    assert!(!o.timed_out, "{}", o.describe());
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    let err = o.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{}", o.describe());
    assert!(
        err.contains("KVM internal error") && err.contains("rip=0x"),
        "{err}"
    );
    assert!(
        err.contains("instruction bytes [") && err.contains("likely cause:"),
        "{err}"
    );
    eprintln!("emulation failure reported after {:.1?}: {err}", o.elapsed);
}
