//! The report: figures from the run and the disk check, as text or JSON, and the verdict.

use std::fmt::Write as _;

use super::kill_loop::Outcome;
use super::pattern::{DiskCheck, Wrong};
use super::Options;
use crate::json_text;

/// How many wrong blocks the report names.
const NAMED: usize = 8;

/// What the guest's FAIL line says happened, by the guest driver's own wording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestFailure {
    /// A request never completed (lost by the backend).
    Lost,
    /// A completion for a request that was not pending (completed twice).
    Repeated,
    /// A completion whose status byte the backend never wrote: the request was completed
    /// without being executed (typically a stale avail entry re-read after a restart).
    Unexecuted,
    /// A completion with an error status.
    IoError,
    /// A block read back wrong.
    WrongBlock,
    Other,
}

fn classify_guest(reason: &str) -> GuestFailure {
    if reason.contains("did not complete within") {
        GuestFailure::Lost
    } else if reason.contains("heads no pending request") {
        GuestFailure::Repeated
    } else if reason.contains("status byte never written") {
        GuestFailure::Unexecuted
    } else if reason.contains("failed: status") {
        GuestFailure::IoError
    } else if reason.contains("read back wrong") {
        GuestFailure::WrongBlock
    } else {
        GuestFailure::Other
    }
}

#[derive(Debug)]
pub struct Report {
    pub backend: String,
    /// What the backend's program printed for `--version`.
    pub backend_version: Option<String>,
    /// `--duration`: the kills went on for this long (then `kills_asked` is only a cap).
    pub duration_asked: Option<std::time::Duration>,
    pub seed: u64,
    pub queue_depth: u16,
    pub disk_size: u64,
    pub kills_asked: u32,
    pub outcome: Outcome,
    pub disk: DiskCheck,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Min, median, p99 and max of a sorted, non-empty list.
fn spread(sorted: &[u64]) -> [u64; 4] {
    [
        sorted[0],
        percentile(sorted, 50.0),
        percentile(sorted, 99.0),
        sorted[sorted.len() - 1],
    ]
}

fn spread_text(sorted: &[u64]) -> String {
    let [min, median, p99, max] = spread(sorted);
    format!("min {min} / median {median} / p99 {p99} / max {max}")
}

fn spread_json(sorted: &[u64]) -> String {
    let [min, median, p99, max] = spread(sorted);
    format!("{{\"min\": {min}, \"median\": {median}, \"p99\": {p99}, \"max\": {max}}}")
}

impl Report {
    pub fn new(
        options: &Options,
        backend_version: Option<String>,
        outcome: Outcome,
        disk: DiskCheck,
    ) -> Report {
        Report {
            backend: options.backend.clone(),
            backend_version,
            duration_asked: options.duration,
            seed: options.seed,
            queue_depth: options.queue_depth,
            disk_size: options.disk_size,
            kills_asked: options.kills,
            outcome,
            disk,
        }
    }

    fn guest_failure(&self) -> Option<GuestFailure> {
        match self.outcome.guest_verdict.as_deref() {
            Some("PASS") => None,
            Some(v) => Some(classify_guest(v)),
            None => Some(GuestFailure::Other),
        }
    }

    fn count(&self, what: GuestFailure) -> u64 {
        u64::from(self.guest_failure() == Some(what))
    }

    fn wrong(&self, pick: fn(&Wrong) -> bool) -> usize {
        self.disk.wrong.iter().filter(|w| pick(&w.wrong)).count()
    }

    fn recovery_ms(&self) -> Vec<u64> {
        let mut ms: Vec<u64> = self.outcome.recoveries.iter().map(|r| r.ms).collect();
        ms.sort_unstable();
        ms
    }

    /// Per recovery: its outage less the harness's own wait before restarting, i.e. the
    /// backend's start plus the reconnect (sorted).
    fn restart_to_back_ms(&self) -> Vec<u64> {
        let o = &self.outcome;
        let mut ms: Vec<u64> = o
            .recoveries
            .iter()
            .zip(&o.restart_gaps_ms)
            .map(|(r, gap)| r.ms.saturating_sub(*gap))
            .collect();
        ms.sort_unstable();
        ms
    }

    fn resubmitted(&self) -> Vec<u64> {
        self.outcome
            .recoveries
            .iter()
            .map(|r| r.resubmitted)
            .collect()
    }

    fn hangs(&self) -> Vec<String> {
        let mut hangs = self.outcome.hangs.clone();
        hangs.extend(self.outcome.restart_failure.clone());
        hangs
    }

    /// Nothing lost, nothing repeated, every kill recovered, the guest passed.
    pub fn passed(&self) -> bool {
        self.guest_failure().is_none()
            && self.disk.wrong.is_empty()
            && self.disk.dirty_tail_bytes == 0
            && self.hangs().is_empty()
            && self.enough_kills()
            && self.outcome.recoveries.len() == self.outcome.kills as usize
    }

    /// Every kill asked for was made; with `--duration`, at least one was.
    fn enough_kills(&self) -> bool {
        match self.duration_asked {
            Some(_) => self.outcome.kills > 0,
            None => self.outcome.kills == self.kills_asked,
        }
    }

    fn kills_text(&self) -> String {
        match (self.duration_asked, self.kills_asked) {
            (Some(d), u32::MAX) => format!("{} in {} s", self.outcome.kills, d.as_secs()),
            (Some(d), n) => format!("{} in {} s (at most {n})", self.outcome.kills, d.as_secs()),
            (None, n) => format!("{} of {n}", self.outcome.kills),
        }
    }

    /// The SVG of `--plot`: throughput over time with the kills and recoveries, and the
    /// recovery times' histogram.
    pub fn plot(&self, path: &std::path::Path) -> Result<(), String> {
        let o = &self.outcome;
        let timeline = super::plot::Timeline {
            progress: o.progress.clone(),
            kills: o.kill_times.clone(),
            recoveries: o.recoveries.iter().map(|r| (r.at, r.ms)).collect(),
        };
        let name = match self.backend_version.as_deref() {
            Some(v) => short_version(v),
            None => self.backend.chars().take(60).collect(),
        };
        let title = format!(
            "reconnect-test: {name} (queue depth {}, seed {}, {})",
            self.queue_depth,
            self.seed,
            if self.passed() { "PASS" } else { "FAIL" }
        );
        super::plot::write_svg(path, &title, &timeline)
    }

    fn named_blocks(&self) -> Vec<String> {
        self.disk
            .wrong
            .iter()
            .take(NAMED)
            .map(|w| format!("block {}: {}", w.block, w.wrong))
            .collect()
    }

    pub fn text(&self) -> String {
        let o = &self.outcome;
        let ms = self.recovery_ms();
        let resub = self.resubmitted();
        let mut t = String::new();
        let _ = writeln!(t, "reconnect-test report");
        let _ = writeln!(t, "  backend:             {}", self.backend);
        let _ = writeln!(
            t,
            "  backend version:     {}",
            self.backend_version
                .as_deref()
                .unwrap_or("(it printed none for --version)")
        );
        let _ = writeln!(
            t,
            "  run:                 seed {}, queue depth {}, disk {} bytes, {:.1} s, {} passes written",
            self.seed,
            self.queue_depth,
            self.disk_size,
            o.duration.as_secs_f64(),
            o.passes_written
        );
        let inflight = match o.inflight_shmfd {
            Some(true) => "yes",
            Some(false) => "no",
            None => "unknown (never negotiated)",
        };
        let unknown = "(never negotiated)";
        let _ = writeln!(
            t,
            "  features:            {}",
            o.features.as_deref().unwrap_or(unknown)
        );
        let _ = writeln!(
            t,
            "  protocol features:   {}",
            o.protocol_features.as_deref().unwrap_or(unknown)
        );
        let _ = writeln!(t, "  INFLIGHT_SHMFD:      {inflight}");
        let _ = writeln!(t, "  kills:               {}", self.kills_text());
        let _ = writeln!(t, "  recoveries:          {}", o.recoveries.len());
        if !ms.is_empty() {
            let _ = writeln!(
                t,
                "  recovery time (ms):  {} (kill to reconnected, as the VMM saw the outage)",
                spread_text(&ms)
            );
            let restart = self.restart_to_back_ms();
            let _ = writeln!(
                t,
                "  restart to back (ms): {} (less the harness's 0-60 ms wait before restarting)",
                spread_text(&restart)
            );
        }
        let _ = writeln!(
            t,
            "  requests resubmitted: {} in all; per kill {:?}",
            resub.iter().sum::<u64>(),
            resub
        );
        let _ = writeln!(
            t,
            "  guest:               {}",
            o.guest_verdict
                .as_deref()
                .unwrap_or("no verdict (it did not finish)")
        );
        let _ = writeln!(
            t,
            "  guest-visible I/O errors: {}; requests never completed: {}; completed twice: {}; completed unexecuted (no status written): {}",
            self.count(GuestFailure::IoError),
            self.count(GuestFailure::Lost),
            self.count(GuestFailure::Repeated),
            self.count(GuestFailure::Unexecuted)
        );
        let _ = writeln!(
            t,
            "  disk file:           {} wrong blocks (lost {}, stale/repeated {}, torn {}); {} non-zero bytes past the blocks",
            self.disk.wrong.len(),
            self.wrong(|w| matches!(w, Wrong::Lost)),
            self.wrong(|w| matches!(w, Wrong::Stale { .. })),
            self.wrong(|w| matches!(w, Wrong::Torn)),
            self.disk.dirty_tail_bytes
        );
        for b in self.named_blocks() {
            let _ = writeln!(t, "    {b}");
        }
        let hangs = self.hangs();
        let _ = writeln!(t, "  hangs:               {}", hangs.len());
        for h in &hangs {
            let _ = writeln!(t, "    {h}");
        }
        if let Some(e) = &o.vmm_error {
            let _ = writeln!(t, "  vmm said:            {e}");
        }
        let _ = writeln!(
            t,
            "  verdict:             {}",
            if self.passed() { "PASS" } else { "FAIL" }
        );
        t
    }

    pub fn json(&self) -> String {
        let o = &self.outcome;
        let ms = self.recovery_ms();
        let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        let strings = |v: &[String]| {
            v.iter()
                .map(|s| json_text::string(s))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let per_kill: Vec<u64> = o.recoveries.iter().map(|r| r.ms).collect();
        let resub = self.resubmitted();
        let inflight = match o.inflight_shmfd {
            Some(b) => b.to_string(),
            None => "null".into(),
        };
        let restart = self.restart_to_back_ms();
        let mut fields = vec![
            ("backend", json_text::string(&self.backend)),
            (
                "backend_version",
                json_text::opt_string(self.backend_version.as_deref()),
            ),
            ("features", json_text::opt_string(o.features.as_deref())),
            (
                "protocol_features",
                json_text::opt_string(o.protocol_features.as_deref()),
            ),
            ("seed", self.seed.to_string()),
            ("queue_depth", self.queue_depth.to_string()),
            ("disk_size", self.disk_size.to_string()),
            ("duration_s", format!("{:.3}", o.duration.as_secs_f64())),
            ("passes_written", o.passes_written.to_string()),
            ("inflight_shmfd", inflight),
            (
                "kills_asked",
                if self.kills_asked == u32::MAX {
                    "null".into()
                } else {
                    self.kills_asked.to_string()
                },
            ),
            (
                "duration_asked_s",
                self.duration_asked
                    .map_or_else(|| "null".into(), |d| d.as_secs().to_string()),
            ),
            ("kills", o.kills.to_string()),
            ("recoveries", o.recoveries.len().to_string()),
            ("recovery_ms", format!("[{}]", list(&per_kill))),
        ];
        if !ms.is_empty() {
            fields.push(("recovery_ms_summary", spread_json(&ms)));
            fields.push(("restart_to_back_ms_summary", spread_json(&restart)));
        }
        fields.extend([
            ("resubmitted_total", resub.iter().sum::<u64>().to_string()),
            ("resubmitted_per_kill", format!("[{}]", list(&resub))),
            (
                "guest_verdict",
                o.guest_verdict
                    .as_deref()
                    .map(json_text::string)
                    .unwrap_or_else(|| "null".into()),
            ),
            (
                "guest_io_errors",
                self.count(GuestFailure::IoError).to_string(),
            ),
            (
                "requests_never_completed",
                self.count(GuestFailure::Lost).to_string(),
            ),
            (
                "requests_completed_twice",
                self.count(GuestFailure::Repeated).to_string(),
            ),
            (
                "requests_completed_unexecuted",
                self.count(GuestFailure::Unexecuted).to_string(),
            ),
            ("wrong_blocks", self.disk.wrong.len().to_string()),
            (
                "lost_blocks",
                self.wrong(|w| matches!(w, Wrong::Lost)).to_string(),
            ),
            (
                "stale_blocks",
                self.wrong(|w| matches!(w, Wrong::Stale { .. })).to_string(),
            ),
            (
                "torn_blocks",
                self.wrong(|w| matches!(w, Wrong::Torn)).to_string(),
            ),
            (
                "first_wrong_blocks",
                format!("[{}]", strings(&self.named_blocks())),
            ),
            ("dirty_tail_bytes", self.disk.dirty_tail_bytes.to_string()),
            ("hangs", format!("[{}]", strings(&self.hangs()))),
            ("passed", self.passed().to_string()),
        ]);
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("  \"{k}\": {v}"))
            .collect();
        format!("{{\n{}\n}}\n", body.join(",\n"))
    }
}

/// A version line short enough for a title: `qemu-storage-daemon version 10.0.2 (Debian ...)`
/// becomes `qemu-storage-daemon 10.0.2`.
fn short_version(line: &str) -> String {
    let line = line.split(" (").next().unwrap_or(line);
    let line = line.replacen(" version ", " ", 1);
    line.chars().take(60).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn version_lines_are_shortened_for_the_title() {
        assert_eq!(
            short_version("qemu-storage-daemon version 10.0.2 (Debian 1:10.0.2+ds-2)"),
            "qemu-storage-daemon 10.0.2"
        );
        assert_eq!(short_version("vmm 0.1.0"), "vmm 0.1.0");
    }

    #[test]
    fn guest_failures_are_classified_by_the_drivers_wording() {
        assert_eq!(
            classify_guest("FAIL: write of block 5 did not complete within 30000 ms"),
            GuestFailure::Lost
        );
        assert_eq!(
            classify_guest("FAIL: device returned descriptor 3, which heads no pending request"),
            GuestFailure::Repeated
        );
        assert_eq!(
            classify_guest(
                "FAIL: write of block 969 failed: status 255 (status byte never written)"
            ),
            GuestFailure::Unexecuted
        );
        assert_eq!(
            classify_guest("FAIL: write of block 5 failed: status 1 (VIRTIO_BLK_S_IOERR)"),
            GuestFailure::IoError
        );
        assert_eq!(
            classify_guest("FAIL: block 9 read back wrong: header names seed 3"),
            GuestFailure::WrongBlock
        );
    }
}
