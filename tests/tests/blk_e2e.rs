//! virtio-blk end to end: our VMM and the test guest's `blk-write-verify` against every kind of
//! backend we have (the in-process fallback, our standalone `vmm blk-backend` process,
//! qemu-storage-daemon), in both completion modes (polling the used ring, interrupts). The guest
//! checks what it reads back; after each run the host checks the image file itself: the pattern in
//! the written blocks and zeros everywhere else.

use std::path::Path;
use std::time::Duration;

use integration_tests::{
    check_image, guest_elf, require_kvm, spawn_blk_backend, spawn_qemu_storage_daemon, vmm_run,
    zero_image, Outcome, TempDir, WrittenRange,
};

const T: Duration = Duration::from_secs(60);
const IMAGE_BYTES: u64 = 16 << 20;

#[derive(Clone, Copy, PartialEq)]
enum Completion {
    Poll,
    Irq,
}

/// Boots the guest with `blk_args` (each a `--blk` value) and runs `blk-write-verify` on device
/// `disk`; returns what the host should find afterwards on that device's image.
fn write_verify(
    blk_args: &[String],
    disk: usize,
    range: WrittenRange,
    mode: Completion,
) -> Outcome {
    require_kvm();
    let k = guest_elf();
    let mut cmdline = format!(
        "blk-write-verify blocks={} start={} seed={} disk={disk}",
        range.blocks, range.start, range.seed
    );
    if mode == Completion::Irq {
        cmdline.push_str(" irq");
    }
    let mut args = vec![
        "--kernel".to_string(),
        k.to_str().unwrap().to_string(),
        "--cmdline".into(),
        cmdline,
    ];
    for b in blk_args {
        args.push("--blk".into());
        args.push(b.clone());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    vmm_run(&args, T)
}

/// The guest passed, said what it did, in the mode asked, and vmm printed nothing on stderr.
fn assert_guest_passed(o: &Outcome, range: WrittenRange, mode: Completion) {
    assert!(!o.timed_out, "hung: {}", o.describe());
    assert_eq!(o.code(), Some(0), "{}", o.describe());
    assert!(
        o.stdout.contains("test-guest: blk-write-verify PASS"),
        "{}",
        o.describe()
    );
    let summary = format!(
        "blk-write-verify: blocks={n} start={s} seed={seed} written={n} verified={n}",
        n = range.blocks,
        s = range.start,
        seed = range.seed
    );
    assert!(
        o.stdout.contains(&summary),
        "expected '{summary}': {}",
        o.describe()
    );
    let want_mode = if mode == Completion::Irq {
        "completion=irq"
    } else {
        "completion=poll"
    };
    assert!(
        o.stdout.contains(want_mode),
        "expected {want_mode}: {}",
        o.describe()
    );
    if mode == Completion::Irq {
        let irqs: u64 = o
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("blk-write-verify: interrupts="))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no interrupt count: {}", o.describe()));
        assert!(
            irqs > 0,
            "irq mode completed without interrupts: {}",
            o.describe()
        );
    }
    assert!(
        o.stderr.trim().is_empty(),
        "vmm wrote to stderr on success: {}",
        o.describe()
    );
}

fn assert_image(image: &Path, ranges: &[WrittenRange]) {
    if let Err(e) = check_image(image, ranges) {
        panic!("{}: {e}", image.display());
    }
}

/// A poll run, then an irq run on a different range of the same image, each checked on the host.
fn poll_then_irq(blk: &str, image: &Path) {
    let first = WrittenRange {
        start: 0,
        blocks: 64,
        seed: 11,
    };
    let o = write_verify(&[blk.to_string()], 0, first, Completion::Poll);
    assert_guest_passed(&o, first, Completion::Poll);
    assert_image(image, &[first]);

    let second = WrittenRange {
        start: 1000,
        blocks: 64,
        seed: 12,
    };
    let o = write_verify(&[blk.to_string()], 0, second, Completion::Irq);
    assert_guest_passed(&o, second, Completion::Irq);
    assert_image(image, &[first, second]);
}

#[test]
fn in_process_backend_poll_and_irq() {
    let d = TempDir::new("blk-inproc");
    let img = zero_image(&d, "disk.img", IMAGE_BYTES);
    poll_then_irq(&format!("path={}", img.display()), &img);
}

/// Our standalone backend process serves one VM after another: each VM connects, does its I/O and
/// leaves; the backend must keep running and accept the next.
#[test]
fn standalone_backend_poll_and_irq_serving_vms_one_after_the_other() {
    let d = TempDir::new("blk-standalone");
    let img = zero_image(&d, "disk.img", IMAGE_BYTES);
    let sock = d.path("blk.sock");
    let mut backend = spawn_blk_backend(&d, &sock, &img, &[]);
    let blk = format!("socket={}", sock.display());

    let first = WrittenRange {
        start: 0,
        blocks: 64,
        seed: 21,
    };
    let o = write_verify(std::slice::from_ref(&blk), 0, first, Completion::Poll);
    assert_guest_passed(&o, first, Completion::Poll);
    assert_image(&img, &[first]);
    backend.assert_running();

    let second = WrittenRange {
        start: 500,
        blocks: 64,
        seed: 22,
    };
    let o = write_verify(std::slice::from_ref(&blk), 0, second, Completion::Irq);
    assert_guest_passed(&o, second, Completion::Irq);
    assert_image(&img, &[first, second]);
    backend.assert_running();

    // A third VM still gets served after two have come and gone.
    let third = WrittenRange {
        start: 3000,
        blocks: 8,
        seed: 23,
    };
    let o = write_verify(&[blk], 0, third, Completion::Poll);
    assert_guest_passed(&o, third, Completion::Poll);
    assert_image(&img, &[first, second, third]);
    backend.assert_running();
}

#[test]
fn qemu_storage_daemon_poll_and_irq() {
    let d = TempDir::new("blk-qsd");
    let img = zero_image(&d, "disk.img", IMAGE_BYTES);
    let sock = d.path("qsd.sock");
    let mut qsd = spawn_qemu_storage_daemon(&d, &sock, &img);
    poll_then_irq(&format!("socket={}", sock.display()), &img);
    qsd.assert_running();
}

/// Two devices at once: an in-process one and one served by our standalone backend. `disk=N`
/// picks which one the guest writes; the other image must stay untouched.
#[test]
fn two_devices_each_written_only_when_picked() {
    let d = TempDir::new("blk-two");
    let first_img = zero_image(&d, "first.img", IMAGE_BYTES);
    let second_img = zero_image(&d, "second.img", 8 << 20);
    let sock = d.path("second.sock");
    let _backend = spawn_blk_backend(&d, &sock, &second_img, &[]);
    let blks = [
        format!("path={}", first_img.display()),
        format!("socket={}", sock.display()),
    ];

    let to_second = WrittenRange {
        start: 3,
        blocks: 32,
        seed: 31,
    };
    let o = write_verify(&blks, 1, to_second, Completion::Irq);
    assert_guest_passed(&o, to_second, Completion::Irq);
    // The guest must have picked the second device (8 MiB = 16384 sectors).
    assert!(
        o.stdout.contains("capacity=16384 sectors"),
        "{}",
        o.describe()
    );
    assert_image(&second_img, &[to_second]);
    assert_image(&first_img, &[]);

    let to_first = WrittenRange {
        start: 7,
        blocks: 32,
        seed: 32,
    };
    let o = write_verify(&blks, 0, to_first, Completion::Poll);
    assert_guest_passed(&o, to_first, Completion::Poll);
    assert!(
        o.stdout.contains("capacity=32768 sectors"),
        "{}",
        o.describe()
    );
    assert_image(&first_img, &[to_first]);
    assert_image(&second_img, &[to_second]);
}

/// A read-only device: the guest sees VIRTIO_BLK_F_RO, its write test fails (exit 1, a FAIL line)
/// and the image, which holds data from an earlier writable run, is byte for byte unchanged.
fn readonly_run(blk: &str, image: &Path) {
    let before = std::fs::read(image).unwrap();
    let o = write_verify(
        &[blk.to_string()],
        0,
        WrittenRange {
            start: 0,
            blocks: 16,
            seed: 99,
        },
        Completion::Poll,
    );
    assert!(!o.timed_out, "hung: {}", o.describe());
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    let last = o
        .stdout
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or_default();
    assert!(
        last.starts_with("test-guest: blk-write-verify FAIL: "),
        "last line: {last}\n{}",
        o.describe()
    );
    assert!(last.contains("read-only"), "{}", o.describe());
    assert!(
        std::fs::read(image).unwrap() == before,
        "the read-only image changed: {}",
        o.describe()
    );
}

fn prefilled_image(d: &TempDir) -> (std::path::PathBuf, WrittenRange) {
    let img = zero_image(d, "disk.img", IMAGE_BYTES);
    let range = WrittenRange {
        start: 0,
        blocks: 16,
        seed: 41,
    };
    let o = write_verify(
        &[format!("path={}", img.display())],
        0,
        range,
        Completion::Poll,
    );
    assert_guest_passed(&o, range, Completion::Poll);
    (img, range)
}

#[test]
fn readonly_in_process_device_refuses_writes() {
    let d = TempDir::new("blk-ro");
    let (img, range) = prefilled_image(&d);
    readonly_run(&format!("path={},readonly", img.display()), &img);
    assert_image(&img, &[range]);
}

#[test]
fn readonly_standalone_backend_refuses_writes() {
    let d = TempDir::new("blk-ro-standalone");
    let (img, range) = prefilled_image(&d);
    let sock = d.path("ro.sock");
    let mut backend = spawn_blk_backend(&d, &sock, &img, &["--readonly"]);
    readonly_run(&format!("socket={}", sock.display()), &img);
    assert_image(&img, &[range]);
    backend.assert_running();
}

/// `queues=4`: the backend serves four request queues (GET_QUEUE_NUM, config num_queues); the
/// test guest drives queue 0 and the others stay unstarted.
#[test]
fn multiqueue_device_serves_the_queue_the_driver_starts() {
    let d = TempDir::new("mq");
    let image = zero_image(&d, "mq.img", IMAGE_BYTES);
    let range = WrittenRange {
        start: 0,
        blocks: 32,
        seed: 21,
    };
    let socket = d.path("mq.sock");
    let _backend = spawn_blk_backend(&d, &socket, &image, &["--queues", "4"]);
    for blk in [
        format!("path={},queues=4", image.display()),
        format!("socket={},queues=4", socket.display()),
    ] {
        let o = write_verify(&[blk], 0, range, Completion::Irq);
        assert_guest_passed(&o, range, Completion::Irq);
        assert_image(&image, &[range]);
    }
    // Asking for more queues than the backend serves is a clear error naming both numbers.
    let o = vmm_run(
        &[
            "--kernel",
            guest_elf().to_str().unwrap(),
            "--blk",
            &format!("socket={},queues=8", socket.display()),
        ],
        T,
    );
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    assert!(
        o.stderr.contains("serves 4 queues; 8 were asked for"),
        "{}",
        o.describe()
    );
}

/// The driver resets the device (status 0) after verifying, brings it up again and reads
/// everything back: vmm stops the backend's ring (GET_VRING_BASE reports every request
/// consumed) and starts it afresh, against each kind of backend.
#[test]
fn device_reset_stops_and_restarts_the_rings() {
    require_kvm();
    let d = TempDir::new("reset");
    let range = WrittenRange {
        start: 0,
        blocks: 48,
        seed: 31,
    };
    let ours = zero_image(&d, "ours.img", IMAGE_BYTES);
    let qsd = zero_image(&d, "qsd.img", IMAGE_BYTES);
    let inproc = zero_image(&d, "inproc.img", IMAGE_BYTES);
    let ours_sock = d.path("ours.sock");
    let qsd_sock = d.path("qsd.sock");
    let _b1 = spawn_blk_backend(&d, &ours_sock, &ours, &[]);
    let _b2 = spawn_qemu_storage_daemon(&d, &qsd_sock, &qsd);
    for (blk, image) in [
        (format!("path={}", inproc.display()), &inproc),
        (format!("socket={}", ours_sock.display()), &ours),
        (format!("socket={}", qsd_sock.display()), &qsd),
    ] {
        for irq in ["", " irq"] {
            let cmdline = format!("blk-write-verify blocks=48 seed=31 reset{irq}");
            let k = guest_elf();
            let o = vmm_run(
                &[
                    "--kernel",
                    k.to_str().unwrap(),
                    "--cmdline",
                    &cmdline,
                    "--blk",
                    &blk,
                    "--trace-vhost",
                ],
                T,
            );
            assert_eq!(o.code(), Some(0), "{blk}{irq}: {}", o.describe());
            assert!(
                o.stdout
                    .contains("blk-write-verify: after a device reset verified=48"),
                "{}",
                o.describe()
            );
            // 48 writes + 1 flush + 48 reads were consumed before the reset.
            assert!(
                o.stderr.contains("<- GET_VRING_BASE reply idx=0 base=97"),
                "{blk}{irq}: {}",
                o.describe()
            );
            assert_image(image, &[range]);
        }
    }
}

/// Ring indices are 16-bit and wrap: 33000 blocks written, read back and flushed is over 66000
/// requests, so every index (avail, used, and with EVENT_IDX used_event and avail_event) passes
/// 65535 while 32 requests are in flight. Run against each engine of our backend (in-process
/// and standalone) and against qemu-storage-daemon, polling and with interrupts; the guest
/// reports whether EVENT_IDX and indirect descriptors were in use, and must have used both
/// (every backend here offers them).
#[test]
fn ring_indices_wrap_past_65535_with_event_idx_and_indirect_descriptors() {
    const BLOCKS: u64 = 33_000;
    let d = TempDir::new("blk-wrap");
    let img = zero_image(&d, "disk.img", BLOCKS * 4096);
    let sock = d.path("blk.sock");
    let mut backend = spawn_blk_backend(&d, &sock, &img, &["--io-engine", "threads"]);
    let qsd_img = zero_image(&d, "qsd.img", BLOCKS * 4096);
    let qsd_sock = d.path("qsd.sock");
    let mut qsd = spawn_qemu_storage_daemon(&d, &qsd_sock, &qsd_img);
    let setups = [
        (format!("path={}", img.display()), &img, Completion::Poll),
        (
            format!("path={},engine=threads", img.display()),
            &img,
            Completion::Irq,
        ),
        (format!("socket={}", sock.display()), &img, Completion::Poll),
        (
            format!("socket={}", qsd_sock.display()),
            &qsd_img,
            Completion::Irq,
        ),
    ];
    for (seed, (blk, image, mode)) in (40..).zip(setups) {
        require_kvm();
        let range = WrittenRange {
            start: 0,
            blocks: BLOCKS,
            seed,
        };
        let mut cmdline = format!("blk-write-verify blocks={BLOCKS} start=0 seed={seed} qd=32");
        if mode == Completion::Irq {
            cmdline.push_str(" irq");
        }
        let k = guest_elf();
        let o = vmm_run(
            &[
                "--kernel",
                k.to_str().unwrap(),
                "--cmdline",
                &cmdline,
                "--blk",
                &blk,
            ],
            Duration::from_secs(240),
        );
        assert_guest_passed(&o, range, mode);
        assert!(
            o.stdout.contains("event_idx=1 indirect=1"),
            "{blk}: the guest did not use EVENT_IDX and INDIRECT_DESC: {}",
            o.describe()
        );
        assert_image(image, &[range]);
    }
    backend.assert_running();
    qsd.assert_running();
}
