//! `vmm probe`: a conformance and hostile-input checker for any vhost-user backend.
//!
//! The probe connects as a frontend and runs a battery of checks ([`checks`]), each on a fresh
//! connection so that one failure cannot hide the next, each reported on one line as PASS, FAIL
//! or N/A with the evidence:
//!
//! ```text
//!  for each check:  up? ─────► usage before ─► check (its own connection) ─► liveness ─► usage after
//!                   (restart)   (/proc fds, RSS)  (Outcome + evidence)         (died? silent?) (leak? growth?)
//!                   the liveness after one check stands for "up?" before the next
//! ```
//!
//! What the runner adds to every check's own verdict ([`Target`]): a backend that died or stops
//! answering fails that check (and, unless `--restart` can bring it back, the checks after it are
//! not run); with a PID (`--pid`, or the one `--restart` started), a check after which the
//! backend holds more fds than before, or whose RSS grew by more than the check's allowance,
//! fails too. Exit status 0 only when every applicable check passed, so it can gate a backend's CI.

mod checks;
mod context;
mod report;
mod rings;
mod target;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use checks::{Check, CHECKS};
pub use context::{Ctx, Identity};
pub use report::{CheckResult, Report};
use target::{Liveness, Target};

/// A check's own verdict, with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    Fail(String),
    NotApplicable(String),
    /// Not run: the backend was gone and nothing could bring it back.
    NotRun(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Pass(_) => "PASS",
            Outcome::Fail(_) => "FAIL",
            Outcome::NotApplicable(_) => "N/A",
            Outcome::NotRun(_) => "NOT RUN",
        }
    }

    pub fn evidence(&self) -> &str {
        match self {
            Outcome::Pass(e)
            | Outcome::Fail(e)
            | Outcome::NotApplicable(e)
            | Outcome::NotRun(e) => e,
        }
    }

    fn failed(self, why: String) -> Outcome {
        match self {
            Outcome::Fail(e) => Outcome::Fail(format!("{e}; {why}")),
            other => Outcome::Fail(format!("{why} (the check itself: {})", other.evidence())),
        }
    }
}

/// What `vmm probe` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub pid: Option<u32>,
    /// Check names (or group names) to run; empty: all.
    pub only: Vec<String>,
    /// Shell command that starts the backend (again), listening on `socket`.
    pub restart: Option<String>,
    /// Bound on every wait for an answer.
    pub timeout: Duration,
    /// Send the allocation bombs (GET_INFLIGHT_FD for 65535 queues of 32768 entries) even to a
    /// backend not known to be memory-capped.
    pub allow_huge: bool,
}

/// Runs the checks; the report (the caller prints it and picks the exit status).
pub fn run(options: &Options) -> Result<Report, String> {
    let selected = select(&options.only)?;
    let mut target = Target::new(
        options.socket.clone(),
        options.pid,
        options.restart.clone(),
        options.timeout,
    );
    // With --restart the probe starts the backend, unless something listens there already (no
    // message is sent to find out: a one-session backend would spend its session on it).
    if target.can_restart() && !options.socket.exists() {
        target.restart()?;
    }
    // Read now: a one-session backend's first process is gone after the identity session.
    let memory_cap = target.memory_cap();
    let identity = Identity::learn(&options.socket, options.timeout)
        .map_err(|e| format!("{}: {e}", options.socket.display()))?;
    // A backend of ours that exits cleanly after that one session serves one frontend per life.
    if let Some(status) = target.child_exit_within(Duration::from_secs(1)) {
        if !status.success() {
            return Err(format!(
                "the backend {} after answering who it is",
                target::describe_exit(status)
            ));
        }
        target.one_session = true;
        target.mark_used();
    }
    // Starts of the backend before the checks are not restarts.
    let started_before = target.restarts;
    let mut ctx = Ctx::new(target, identity, options.timeout, options.allow_huge);
    let started = Instant::now();
    let mut results = Vec::new();
    let mut down: Option<String> = None;
    let mut seen = None;
    for check in selected {
        let result = match &down {
            Some(why) => CheckResult::new(check, Outcome::NotRun(why.clone()), Duration::ZERO),
            None => {
                let (result, liveness) = run_one(&mut ctx, check, seen.take());
                // Gone for good (no --restart to bring it back): say so once, skip the rest.
                match &liveness {
                    Liveness::Answers => {}
                    _ if ctx.target.can_restart() => {}
                    gone => {
                        down = Some(format!(
                            "the backend no longer answers ({})",
                            gone.describe()
                        ))
                    }
                }
                seen = Some(liveness);
                result
            }
        };
        print_line(&result.line());
        results.push(result);
    }
    ctx.target.stop();
    Ok(Report {
        socket: options.socket.clone(),
        identity: ctx.identity.clone(),
        memory_cap,
        pid_given: options.pid.is_some() || options.restart.is_some(),
        restarts: ctx.target.restarts - started_before,
        results,
        elapsed: started.elapsed(),
    })
}

/// One line on stdout; a closed pipe (`vmm probe | head`) is not worth a panic.
pub fn print_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// One check, framed by the liveness and resource measurements; also what became of the
/// backend after it. `seen`: its liveness after the previous check.
fn run_one(
    ctx: &mut Ctx,
    check: &'static Check,
    seen: Option<Liveness>,
) -> (CheckResult, Liveness) {
    let started = Instant::now();
    if let Err(why) = ctx.ensure_up(seen) {
        let result = CheckResult::new(check, Outcome::NotRun(why.clone()), started.elapsed());
        return (result, Liveness::Silent(why));
    }
    let pid_before = ctx.target.pid();
    let before = ctx.target.stable_usage();
    let mut outcome = (check.run)(ctx);
    // A one-session backend ends with the check's connection: how it ended is its liveness.
    let liveness = match ctx.target.one_session {
        true => match ctx.target.child_exit_within(Duration::from_secs(3)) {
            Some(status) => Liveness::Exited(status),
            None => ctx.target.liveness(),
        },
        false => ctx.target.liveness(),
    };
    match &liveness {
        Liveness::Answers => {}
        // A backend that serves one frontend and then exits cleanly (virtiofsd) has not failed.
        Liveness::Exited(status) if status.success() => {}
        Liveness::Exited(_) | Liveness::Died(_) => {
            outcome = outcome.failed(format!("the backend died: it {}", liveness.describe()))
        }
        Liveness::Silent(why) => {
            outcome = outcome.failed(format!("the backend stopped answering: {why}"))
        }
    }
    let mut usage = None;
    if let (Some(before), true) = (before, ctx.target.pid() == pid_before) {
        if let Some(after) = ctx.target.settled_usage(before) {
            usage = Some((before, after));
            if after.fds > before.fds {
                outcome = outcome.failed(format!(
                    "fd leak: the backend holds {} fds, {} before the check",
                    after.fds, before.fds
                ));
            }
            let grew = after.rss_kib.saturating_sub(before.rss_kib);
            if grew > check.rss_allowance_kib {
                outcome = outcome.failed(format!(
                    "memory: RSS grew by {} KiB ({} -> {} KiB), more than the {} KiB this check \
                     may cost",
                    grew, before.rss_kib, after.rss_kib, check.rss_allowance_kib
                ));
            }
        }
    }
    let mut result = CheckResult::new(check, outcome, started.elapsed());
    result.usage = usage;
    (result, liveness)
}

/// The checks named by `--only` (check names or group names), in catalogue order.
fn select(only: &[String]) -> Result<Vec<&'static Check>, String> {
    for name in only {
        if !CHECKS.iter().any(|c| c.name == name || c.group == name) {
            let names: Vec<&str> = CHECKS.iter().map(|c| c.name).collect();
            return Err(format!(
                "--only {name}: no such check or group (groups: identity, handshake, inflight, \
                 inflight-hostile, resources; checks: {})",
                names.join(", ")
            ));
        }
    }
    Ok(CHECKS
        .iter()
        .filter(|c| only.is_empty() || only.iter().any(|n| n == c.name || n == c.group))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_selects_by_name_or_group_and_refuses_unknown_names() {
        let by_group = select(&["inflight-hostile".into()]).unwrap();
        assert!(by_group.len() > 3);
        assert!(by_group.iter().all(|c| c.group == "inflight-hostile"));
        let one = select(&["trickle".into()]).unwrap();
        assert_eq!(one.len(), 1);
        let err = select(&["nonsense".into()]).unwrap_err();
        assert!(err.contains("--only nonsense"), "{err}");
        assert_eq!(select(&[]).unwrap().len(), CHECKS.len());
    }

    #[test]
    fn check_names_are_unique() {
        let mut names: Vec<&str> = CHECKS.iter().map(|c| c.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), CHECKS.len());
    }

    #[test]
    fn a_runner_failure_keeps_the_checks_own_evidence() {
        let o = Outcome::Pass("refused".into()).failed("fd leak".into());
        assert_eq!(
            o,
            Outcome::Fail("fd leak (the check itself: refused)".into())
        );
    }
}
