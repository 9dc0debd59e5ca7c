//! Bad virtio-blk input to `vmm run --blk` and `vmm blk-backend`: a clear one-line error, a
//! non-zero exit, never a panic or a hang.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use integration_tests::{
    guest_elf, require_kvm, run_with_timeout, vmm_bin, vmm_run, zero_image, ChildGuard, Outcome,
    TempDir,
};

const T: Duration = Duration::from_secs(30);

fn assert_clean_error(o: &Outcome, needles: &[&str]) {
    assert!(!o.timed_out, "hung: {}", o.describe());
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    let err = o.stderr.trim();
    assert!(!err.contains("panicked"), "{}", o.describe());
    assert_eq!(
        err.lines().count(),
        1,
        "one line expected: {}",
        o.describe()
    );
    assert!(err.starts_with("vmm: error: "), "{}", o.describe());
    for n in needles {
        assert!(err.contains(n), "expected '{n}' in: {err}");
    }
    assert!(
        o.stdout.trim().is_empty(),
        "the guest ran: {}",
        o.describe()
    );
}

fn run_hello_with_blk(blk: &str) -> Outcome {
    let k = guest_elf();
    vmm_run(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "hello",
            "--blk",
            blk,
        ],
        T,
    )
}

fn blk_backend(socket: &str, file: &str, extra: &[&str]) -> Outcome {
    let mut c = Command::new(vmm_bin());
    c.args(["blk-backend", "--socket", socket, "--file", file])
        .args(extra);
    run_with_timeout(&mut c, T)
}

/// `vmm blk-backend` run as user nobody (uid/gid 65534, no groups).
fn as_nobody(args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vmm_bin())
        .args(args);
    c
}

/// A root-owned 0644 image that nobody may read but not write, and a directory nobody may
/// create a socket in.
fn image_only_root_may_write(d: &TempDir) -> (String, std::path::PathBuf) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root to own the image");
    let img = zero_image(d, "root-owned.img", 4 << 20);
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o644)).unwrap();
    let sock_dir = d.path("nobody");
    std::fs::create_dir(&sock_dir).unwrap();
    std::fs::set_permissions(&sock_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    (img.to_str().unwrap().to_string(), sock_dir.join("blk.sock"))
}

#[test]
fn socket_that_does_not_exist() {
    require_kvm();
    let o = run_hello_with_blk("socket=/nonexistent/blk.sock");
    assert_clean_error(
        &o,
        &[
            "cannot connect to vhost-user backend at /nonexistent/blk.sock",
            "No such file or directory",
        ],
    );
}

#[test]
fn socket_nobody_listens_on() {
    require_kvm();
    let d = TempDir::new("blk-stale");
    let sock = d.path("stale.sock");
    // Bound and closed: the file stays, nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let o = run_hello_with_blk(&format!("socket={}", sock.display()));
    assert_clean_error(
        &o,
        &["cannot connect to vhost-user backend", "Connection refused"],
    );
}

#[test]
fn image_that_does_not_exist() {
    require_kvm();
    let o = run_hello_with_blk("path=/nonexistent/disk.img");
    assert_clean_error(
        &o,
        &[
            "cannot open disk image /nonexistent/disk.img",
            "No such file or directory",
        ],
    );
}

#[test]
fn blk_spec_syntax_errors() {
    for (spec, why) in [
        (
            "bogus",
            "expected path=FILE[,readonly][,queues=N][,direct=on|off][,engine=inline|threads|uring] or socket=PATH[,queues=N]",
        ),
        (
            "path=",
            "expected path=FILE[,readonly][,queues=N][,direct=on|off][,engine=inline|threads|uring] or socket=PATH[,queues=N]",
        ),
        (
            "file=/x.img",
            "expected path=FILE[,readonly][,queues=N][,direct=on|off][,engine=inline|threads|uring] or socket=PATH[,queues=N]",
        ),
        (
            "path=/x.img,readonly,extra",
            "expected path=FILE[,readonly][,queues=N][,direct=on|off][,engine=inline|threads|uring] or socket=PATH[,queues=N]",
        ),
        (
            "path=/a.img,socket=/b.sock",
            "give exactly one of path= or socket=",
        ),
        ("readonly", "give exactly one of path= or socket="),
        (
            "socket=/b.sock,readonly",
            "readonly is a property of the backend",
        ),
    ] {
        let o = run_hello_with_blk(spec);
        assert_clean_error(&o, &[&format!("invalid --blk '{spec}'"), why]);
    }
}

#[test]
fn backend_with_a_missing_image() {
    let d = TempDir::new("blk-backend-missing");
    let sock = d.path("blk.sock");
    let o = blk_backend(sock.to_str().unwrap(), "/nonexistent/disk.img", &[]);
    assert_clean_error(
        &o,
        &[
            "cannot open disk image /nonexistent/disk.img",
            "No such file or directory",
        ],
    );
    assert!(
        !sock.exists(),
        "a socket was created for a backend that cannot serve"
    );
}

#[test]
fn backend_without_write_access_needs_readonly() {
    let d = TempDir::new("blk-backend-perm");
    let (img, sock) = image_only_root_may_write(&d);
    let sock_s = sock.to_str().unwrap();
    let o = run_with_timeout(
        &mut as_nobody(&["blk-backend", "--socket", sock_s, "--file", &img]),
        T,
    );
    assert_clean_error(
        &o,
        &[
            &format!("cannot open disk image {img}"),
            "Permission denied",
        ],
    );
    assert!(
        !sock.exists(),
        "a socket was created for a backend that cannot serve"
    );
}

#[test]
fn backend_without_write_access_serves_readonly() {
    require_kvm();
    let d = TempDir::new("blk-backend-ro");
    let (img, sock) = image_only_root_may_write(&d);
    let sock_s = sock.to_str().unwrap();
    let mut cmd = as_nobody(&[
        "blk-backend",
        "--socket",
        sock_s,
        "--file",
        &img,
        "--readonly",
    ]);
    let mut backend =
        ChildGuard::spawn(&mut cmd, "vmm blk-backend as nobody", d.path("backend.log"));
    backend.wait_for_listening_socket(&sock, Duration::from_secs(10));
    // It serves: a VM completes the handshake with it, and the guest sees a read-only disk.
    let k = guest_elf();
    let blk = format!("socket={sock_s}");
    let o = vmm_run(
        &[
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "blk-write-verify blocks=1",
            "--blk",
            &blk,
        ],
        T,
    );
    assert_eq!(o.code(), Some(1), "{}", o.describe());
    assert!(
        o.stdout
            .contains("test-guest: blk-write-verify FAIL: the device is read-only"),
        "{}",
        o.describe()
    );
    backend.assert_running();
    assert!(
        backend.log().trim().is_empty(),
        "the backend printed: {}",
        backend.log()
    );
}

/// The OS error of an unopenable image or socket appears once in the one line (an error type
/// that prints its source and also returns it as `source()` must not make the chain repeat it).
#[test]
fn errors_state_their_cause_once() {
    require_kvm();
    let d = TempDir::new("blk-cause-once");
    let sock = d.path("blk.sock");
    let outcomes = [
        run_hello_with_blk("socket=/nonexistent/blk.sock"),
        run_hello_with_blk("path=/nonexistent/disk.img"),
        blk_backend(sock.to_str().unwrap(), "/nonexistent/disk.img", &[]),
    ];
    let mut problems = Vec::new();
    for o in &outcomes {
        let err = o.stderr.trim();
        if err.matches("(os error").count() != 1
            || err.matches("cannot open disk image").count() > 1
        {
            problems.push(err.to_string());
        }
    }
    assert!(
        problems.is_empty(),
        "causes repeated:\n{}",
        problems.join("\n")
    );
}
