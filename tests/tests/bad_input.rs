//! Bad input: a clear one-line error, a non-zero exit, never a panic or a hang.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use integration_tests::{
    guest_elf, require_kvm, run_with_timeout, vmm_bin, vmm_run, Outcome, TempDir,
};

const T: Duration = Duration::from_secs(30);

fn assert_clean_error(o: &Outcome, needle: &str) {
    assert!(!o.timed_out, "hung: {}", o.describe());
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    let err = o.stderr.trim();
    assert_eq!(
        err.lines().count(),
        1,
        "one line expected: {}",
        o.describe()
    );
    assert!(!err.contains("panicked"), "{}", o.describe());
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

/// A minimal ELF64 with one PT_LOAD of `memsz` bytes at 1 MiB and `file_len` bytes in the file.
fn tiny_elf(memsz: u64, truncate_to: Option<usize>) -> Vec<u8> {
    let mut e = vec![0u8; 64 + 56 + 16];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELF64
    e[5] = 1; // little endian
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut e[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
    ph[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    ph[32..40].copy_from_slice(&16u64.to_le_bytes()); // filesz
    ph[40..48].copy_from_slice(&memsz.to_le_bytes());
    if let Some(n) = truncate_to {
        e.truncate(n);
    }
    e
}

fn write(dir: &TempDir, name: &str, data: &[u8]) -> String {
    let p = dir.path(name);
    std::fs::File::create(&p).unwrap().write_all(data).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn missing_kernel_file() {
    require_kvm();
    let o = vmm_run(&["--kernel", "/nonexistent/kernel"], T);
    assert_clean_error(&o, "cannot open kernel /nonexistent/kernel");
}

#[test]
fn file_that_is_no_kernel() {
    require_kvm();
    let d = TempDir::new("nokernel");
    let k = write(
        &d,
        "notes.txt",
        &b"just some text, certainly not a kernel\n".repeat(40),
    );
    assert_clean_error(&vmm_run(&["--kernel", &k], T), "is not a kernel");
    let empty = write(&d, "empty", b"");
    assert_clean_error(&vmm_run(&["--kernel", &empty], T), "is not a kernel");
}

#[test]
fn truncated_elf() {
    require_kvm();
    let d = TempDir::new("trunc");
    // Our tiny ELF cut inside its segment.
    let k = write(&d, "cut.elf", &tiny_elf(16, Some(124)));
    assert_clean_error(&vmm_run(&["--kernel", &k], T), "truncated ELF");
    // The real test guest cut in half.
    let g = std::fs::read(guest_elf()).unwrap();
    let k2 = write(&d, "guest-half.elf", &g[..g.len() / 2]);
    assert_clean_error(&vmm_run(&["--kernel", &k2], T), "truncated ELF");
    // Only the first bytes of an ELF header.
    let k3 = write(&d, "hdr.elf", &g[..20]);
    assert_clean_error(&vmm_run(&["--kernel", &k3], T), "truncated ELF");
}

#[test]
fn memory_too_small_for_the_kernel() {
    require_kvm();
    let d = TempDir::new("small");
    let k = write(&d, "big.elf", &tiny_elf(64 << 20, None));
    assert_clean_error(
        &vmm_run(&["--kernel", &k, "--mem", "16M"], T),
        "does not fit in guest memory",
    );
    assert_clean_error(&vmm_run(&["--kernel", &k, "--mem", "1M"], T), "too small");
}

#[test]
fn zero_cpus() {
    let k = guest_elf();
    let o = vmm_run(&["--kernel", k.to_str().unwrap(), "--cpus", "0"], T);
    assert_clean_error(&o, "--cpus must be between 1 and");
}

#[test]
fn bad_memory_size() {
    let k = guest_elf();
    assert_clean_error(
        &vmm_run(&["--kernel", k.to_str().unwrap(), "--mem", "lots"], T),
        "invalid memory size",
    );
}

#[test]
fn initrd_that_does_not_fit() {
    require_kvm();
    let d = TempDir::new("initrd");
    let big = write(&d, "initrd.img", &vec![0u8; 24 << 20]);
    let k = guest_elf();
    let o = vmm_run(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            &big,
            "--mem",
            "16M",
        ],
        T,
    );
    assert_clean_error(&o, "initrd");
    assert!(o.stderr.contains("does not fit"), "{}", o.describe());
    let o = vmm_run(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        T,
    );
    assert_clean_error(&o, "cannot read initrd");
}

#[test]
fn no_access_to_dev_kvm() {
    // Run as an unprivileged user: /dev/kvm is root-only here, so opening it fails with EACCES.
    let vmm = vmm_bin();
    let k = guest_elf();
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&vmm)
        .args(["run", "--kernel"])
        .arg(&k);
    let meta = std::fs::metadata("/dev/kvm");
    use std::os::unix::fs::PermissionsExt;
    let world_accessible = meta
        .map(|m| m.permissions().mode() & 0o006 == 0o006)
        .unwrap_or(false);
    assert!(
        !world_accessible,
        "/dev/kvm is world-accessible here; this test needs it restricted to root"
    );
    let o = run_with_timeout(&mut c, T);
    assert_clean_error(&o, "cannot open /dev/kvm");
    assert!(o.stderr.contains("permission denied"), "{}", o.describe());
}
