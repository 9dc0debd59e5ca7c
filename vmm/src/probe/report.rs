//! The probe's report: one line per check as it runs, a summary, and the same as JSON.

use std::path::PathBuf;
use std::time::Duration;

use super::checks::{identity::describe, Check};
use super::context::Identity;
use super::target::Usage;
use super::Outcome;
use crate::json_text;

/// One check's verdict, with the resources measured around it.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub name: &'static str,
    pub group: &'static str,
    pub outcome: Outcome,
    pub elapsed: Duration,
    /// fds and RSS before and after (with a PID that stayed the same).
    pub usage: Option<(Usage, Usage)>,
}

impl CheckResult {
    pub fn new(check: &'static Check, outcome: Outcome, elapsed: Duration) -> CheckResult {
        CheckResult {
            name: check.name,
            group: check.group,
            outcome,
            elapsed,
            usage: None,
        }
    }

    /// `FAIL inflight-huge: 65535 x 65535: ...`
    pub fn line(&self) -> String {
        let usage = match self.usage {
            Some((b, a)) => format!(
                " [fds {}->{}, rss {}->{} KiB]",
                b.fds, a.fds, b.rss_kib, a.rss_kib
            ),
            None => String::new(),
        };
        format!(
            "{:<7} {:<26} {}{usage}",
            self.outcome.label(),
            self.name,
            self.outcome.evidence()
        )
    }
}

pub struct Report {
    pub socket: PathBuf,
    pub identity: Identity,
    /// `None`: no PID to look at; `Some(None)`: uncapped; `Some(Some(how))`.
    pub memory_cap: Option<Option<String>>,
    pub pid_given: bool,
    /// Times the backend had to be started again after the first start.
    pub restarts: u32,
    pub results: Vec<CheckResult>,
    pub elapsed: Duration,
}

impl Report {
    fn count(&self, label: &str) -> usize {
        self.results
            .iter()
            .filter(|r| r.outcome.label() == label)
            .count()
    }

    /// Every applicable check passed.
    pub fn passed(&self) -> bool {
        self.results
            .iter()
            .all(|r| matches!(r.outcome, Outcome::Pass(_) | Outcome::NotApplicable(_)))
    }

    /// The lines printed after the checks.
    pub fn summary(&self) -> String {
        let mut lines = vec![format!(
            "probe {}: {} passed, {} failed, {} not applicable, {} not run, in {:.1} s{}",
            self.socket.display(),
            self.count("PASS"),
            self.count("FAIL"),
            self.count("N/A"),
            self.count("NOT RUN"),
            self.elapsed.as_secs_f64(),
            if self.restarts > 0 {
                format!(" ({} restart(s) of the backend)", self.restarts)
            } else {
                String::new()
            }
        )];
        lines.push(format!("identity: {}", describe(&self.identity)));
        match &self.memory_cap {
            Some(None) => lines.push(
                "advice: the backend runs without a memory cap; hostile sizes can make a weak \
                 backend allocate gigabytes. Run it under `ulimit -v` or a cgroup memory.max \
                 (inflight-huge was skipped for that reason unless --allow-huge)"
                    .into(),
            ),
            Some(Some(how)) => lines.push(format!("memory cap: {how}")),
            None if !self.pid_given => lines.push(
                "note: without --pid (or --restart) fd leaks and memory growth are not measured"
                    .into(),
            ),
            None => {}
        }
        lines.push(if self.passed() {
            "result: PASS (every applicable check passed)".into()
        } else {
            "result: FAIL".into()
        });
        lines.join("\n")
    }

    pub fn json(&self) -> String {
        let checks: Vec<String> = self
            .results
            .iter()
            .map(|r| {
                let usage = match r.usage {
                    Some((b, a)) => format!(
                        "{{\"fds_before\": {}, \"fds_after\": {}, \"rss_kib_before\": {}, \
                         \"rss_kib_after\": {}}}",
                        b.fds, a.fds, b.rss_kib, a.rss_kib
                    ),
                    None => "null".into(),
                };
                format!(
                    "    {{\"name\": {}, \"group\": {}, \"result\": {}, \"evidence\": {}, \
                     \"seconds\": {:.3}, \"usage\": {usage}}}",
                    json_text::string(r.name),
                    json_text::string(r.group),
                    json_text::string(r.outcome.label()),
                    json_text::string(r.outcome.evidence()),
                    r.elapsed.as_secs_f64()
                )
            })
            .collect();
        let id = &self.identity;
        let cap = match &self.memory_cap {
            Some(Some(how)) => json_text::string(how),
            Some(None) => "\"none\"".into(),
            None => "null".into(),
        };
        format!(
            "{{\n  \"socket\": {},\n  \"device\": {},\n  \"features\": {},\n  \
             \"protocol_features\": {},\n  \"queues\": {},\n  \"memory_cap\": {cap},\n  \
             \"passed\": {},\n  \"restarts\": {},\n  \"checks\": [\n{}\n  ]\n}}\n",
            json_text::string(&self.socket.display().to_string()),
            json_text::string(id.device.name()),
            id.features,
            id.protocol_features,
            id.queues,
            self.passed(),
            self.restarts,
            checks.join(",\n")
        )
    }
}
