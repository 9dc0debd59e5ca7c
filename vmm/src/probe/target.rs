//! The backend under test as a process: is it still there, how many fds does it hold, how much
//! memory, is it capped, and (with `--restart`) bringing it back.
//!
//! Everything here reads `/proc/PID`: nothing the backend says about itself is trusted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use vhost_frontend::probe::{Answer, ProbeMessage, RawSession};
use vhost_frontend::Request;

/// A snapshot of the backend's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
}

/// Whether the backend still serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// A fresh connection got GET_FEATURES answered.
    Answers,
    /// The process the probe started ended, with this status (0 after its one frontend is how a
    /// one-session backend ends, not a failure).
    Exited(ExitStatus),
    /// The process is gone, and how it ended cannot be seen (it is not the probe's child).
    Died(String),
    /// It is there but a fresh connection got no answer in time (or no connection at all).
    Silent(String),
}

impl Liveness {
    /// What became of the backend, for evidence: "answers", "exited with status 1", ...
    pub fn describe(&self) -> String {
        match self {
            Liveness::Answers => "answers".into(),
            Liveness::Exited(status) => describe_exit(*status),
            Liveness::Died(why) | Liveness::Silent(why) => why.clone(),
        }
    }
}

pub struct Target {
    pub socket: PathBuf,
    pid: Option<u32>,
    restart: Option<String>,
    /// The backend the probe itself started (with `--restart`).
    child: Option<Child>,
    timeout: Duration,
    /// How many times the probe had to start the backend again.
    pub restarts: u32,
    /// The backend serves one frontend and exits (virtiofsd): seen after the first session,
    /// when the backend the probe started exited with status 0. Every check then gets a
    /// fresh backend, and no extra connection is made to ask whether it is alive (that would
    /// use up its one session).
    pub one_session: bool,
    /// A one-session backend has been started and not yet connected to.
    unused: bool,
}

impl Target {
    pub fn new(
        socket: PathBuf,
        pid: Option<u32>,
        restart: Option<String>,
        timeout: Duration,
    ) -> Target {
        Target {
            socket,
            pid,
            restart,
            child: None,
            timeout,
            restarts: 0,
            one_session: false,
            unused: false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The backend's fds and RSS, or `None` without a PID (or once it is gone).
    pub fn usage(&self) -> Option<Usage> {
        let pid = self.pid?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib = status_field_kib(&status, "VmRSS:")?;
        Some(Usage { fds, rss_kib })
    }

    /// Before a check: a reading the backend has settled on (four equal fd counts 50 ms apart,
    /// so the liveness connection just closed is no longer counted).
    pub fn stable_usage(&self) -> Option<Usage> {
        let mut last = self.usage()?;
        let mut same = 0;
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.usage()?;
            same = if now.fds == last.fds { same + 1 } else { 0 };
            last = now;
            if same == 3 {
                break;
            }
        }
        Some(last)
    }

    /// After a check: the fd count falls back to `before` within a second (a backend closes
    /// a session's fds as the session ends, just after we see it close). Returns the last count.
    pub fn settled_usage(&self, before: Usage) -> Option<Usage> {
        let start = Instant::now();
        loop {
            let now = self.usage()?;
            if now.fds <= before.fds || start.elapsed() > Duration::from_secs(1) {
                return Some(now);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How the backend's memory is capped, or `None` when nothing caps it: the advice the
    /// probe prints, since some hostile checks make a weak backend allocate gigabytes.
    pub fn memory_cap(&self) -> Option<Option<String>> {
        let pid = self.pid?;
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
        let address_space = limits
            .lines()
            .find(|l| l.starts_with("Max address space"))
            .and_then(|l| l.split_whitespace().nth(3))
            .filter(|soft| *soft != "unlimited")
            .map(|soft| format!("ulimit -v {} KiB", soft.parse::<u64>().unwrap_or(0) / 1024));
        if address_space.is_some() {
            return Some(address_space);
        }
        // cgroup v2: "0::/path"; memory.max of that group (or any parent) other than "max".
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let mut group = cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(PathBuf::from);
        while let Some(g) = group {
            let file = Path::new("/sys/fs/cgroup")
                .join(g.strip_prefix("/").unwrap_or(&g))
                .join("memory.max");
            if let Ok(max) = std::fs::read_to_string(&file) {
                let max = max.trim();
                if max != "max" {
                    return Some(Some(format!("cgroup memory.max {max} ({})", g.display())));
                }
            }
            group = g.parent().map(Path::to_path_buf);
        }
        Some(None)
    }

    /// Whether the backend answers a fresh connection (GET_FEATURES) within the timeout.
    pub fn liveness(&mut self) -> Liveness {
        if let Some(status) = self.child_exit() {
            return Liveness::Exited(status);
        }
        if let Some(pid) = self.pid {
            if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
                // Ours: wait for it, to say how it ended.
                if let Some(status) = self.child_exit_within(Duration::from_millis(500)) {
                    return Liveness::Exited(status);
                }
                return Liveness::Died(format!("is gone (process {pid})"));
            }
        }
        let deadline = Instant::now() + self.timeout;
        let session = loop {
            match RawSession::connect(&self.socket, self.timeout) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    // A backend that serves one frontend and then exits is gone by now.
                    if let Some(status) = self.child_exit() {
                        return Liveness::Exited(status);
                    }
                    return Liveness::Silent(format!("cannot connect: {e}"));
                }
            }
        };
        match session.call(&ProbeMessage::bare(Request::GetFeatures, false)) {
            Answer::Reply { .. } => Liveness::Answers,
            other => {
                if let Some(status) = self.child_exit_within(Duration::from_secs(1)) {
                    return Liveness::Exited(status);
                }
                Liveness::Silent(format!(
                    "a fresh connection's GET_FEATURES got {}",
                    other.describe()
                ))
            }
        }
    }

    /// For a one-session backend: one that has not served a frontend yet (the used one is
    /// waited for, 3 s, and started again). Marks it used. Nothing for other backends.
    pub fn fresh_session(&mut self) -> Result<(), String> {
        if !self.one_session {
            return Ok(());
        }
        if !std::mem::take(&mut self.unused) {
            let _ = self.child_exit_within(Duration::from_secs(3));
            self.restart()?;
            self.unused = false;
        }
        Ok(())
    }

    /// The backend's session was used outside `fresh_session` (the identity connection).
    pub fn mark_used(&mut self) {
        self.unused = false;
    }

    /// Whether the probe may start the backend itself.
    pub fn can_restart(&self) -> bool {
        self.restart.is_some()
    }

    /// Starts (again) the `--restart` command and waits until its socket accepts.
    pub fn restart(&mut self) -> Result<(), String> {
        let command = self.restart.clone().ok_or("no --restart command")?;
        if let Some(mut old) = self.child.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        // `exec`, so the PID is the backend's own and its /proc can be read.
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("--restart: cannot run sh: {e}"))?;
        self.pid = Some(child.id());
        self.child = Some(child);
        self.restarts += 1;
        let deadline = Instant::now() + self.timeout.max(Duration::from_secs(10));
        loop {
            if let Some(status) = self.child_exit() {
                return Err(format!(
                    "--restart: the backend {} before listening on {}",
                    describe_exit(status),
                    self.socket.display()
                ));
            }
            // The socket file, not a connection: a backend that serves one frontend would take
            // a test connection for its frontend and exit after it.
            if is_socket(&self.socket) {
                // Listening is not the end of start-up (DPDK opens more fds after it): let the
                // fd count settle, so the next check's "before" is the backend at rest.
                std::thread::sleep(Duration::from_millis(300));
                self.unused = true;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "--restart: nothing listens on {} after {:?}",
                    self.socket.display(),
                    deadline.elapsed()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the backend the probe started, if any.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the backend the probe started has exited (how), without waiting.
    pub fn child_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Whether the backend the probe started has exited, waiting up to `wait`.
    pub fn child_exit_within(&mut self, wait: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child_exit() {
                return Some(status);
            }
            if start.elapsed() > wait || self.child.is_none() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // The state follows the parenthesised name, which may itself hold spaces.
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

/// "exited with status 0", "was killed by signal 9 (SIGKILL)".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        _ => "ended".into(),
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL, e.g. the OOM killer",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_usage_and_limits_read_from_proc() {
        let me = Target::new(
            "/nonexistent".into(),
            Some(std::process::id()),
            None,
            Duration::from_millis(10),
        );
        let u = me.usage().unwrap();
        assert!(u.fds >= 3 && u.rss_kib > 0, "{u:?}");
        assert!(me.memory_cap().is_some());
        let none = Target::new("/x".into(), None, None, Duration::from_millis(10));
        assert_eq!(none.usage(), None);
    }

    #[test]
    fn a_restart_command_that_never_listens_is_reported() {
        let dir = std::env::temp_dir().join(format!("probe-target-{}", std::process::id()));
        let mut t = Target::new(
            dir.join("s.sock"),
            None,
            Some("false".into()),
            Duration::from_millis(100),
        );
        let err = t.restart().unwrap_err();
        assert!(err.contains("exited with status 1"), "{err}");
        assert!(matches!(t.liveness(), Liveness::Exited(s) if !s.success()));
    }

    #[test]
    fn status_fields_parse() {
        assert_eq!(
            status_field_kib("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS:"),
            Some(1234)
        );
        assert_eq!(status_field_kib("Name:\tx\n", "VmRSS:"), None);
    }
}
