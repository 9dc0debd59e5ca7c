//! The run itself: start the backend and the VMM, kill and restart the backend at random
//! moments, follow both logs, stop the guest once the kills are done.

use std::path::Path;
use std::time::{Duration, Instant};

use super::backend::{self, Backend};
use super::vmm_process::VmmProcess;
use super::{Error, Options};

/// How long a killed backend's recovery may take before it counts as a hang.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest has from boot to finding its disk.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest has, once told to stop, to finish its pass and verify.
const FINISH_TIMEOUT: Duration = Duration::from_secs(180);
/// Between a recovery and the next kill, and between a kill and the restart (ms).
const KILL_GAP_MS: (u64, u64) = (40, 250);
const RESTART_GAP_MS: (u64, u64) = (0, 60);
/// The guest's progress lines come this many completions apart (the plot's grain).
const PROGRESS_EVERY: u64 = 256;

pub struct Setup<'a> {
    pub dir: &'a Path,
    pub command: &'a str,
    pub socket: &'a Path,
    pub guest: &'a Path,
    pub blocks: u64,
    pub options: &'a Options,
}

/// One "back after" line of the VMM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recovery {
    pub ms: u64,
    pub resubmitted: u64,
    /// When the line came (seconds since the VMM started).
    pub at: f64,
}

/// What the run saw, before the disk is read.
#[derive(Debug, Default)]
pub struct Outcome {
    pub kills: u32,
    /// When each kill was sent (seconds since the VMM started).
    pub kill_times: Vec<f64>,
    /// How long after each kill the harness started the backend again (its random gap), ms:
    /// an outage minus this is what the backend's start and the reconnect took.
    pub restart_gaps_ms: Vec<u64>,
    pub recoveries: Vec<Recovery>,
    /// From the trace of SET_PROTOCOL_FEATURES (None: never negotiated).
    pub inflight_shmfd: Option<bool>,
    /// What SET_FEATURES and SET_PROTOCOL_FEATURES carried on the first connection, as the
    /// trace decodes them (`0x... (NAME NAME ...)`).
    pub features: Option<String>,
    pub protocol_features: Option<String>,
    /// (seconds since the VMM started, requests the guest had completed): from its progress
    /// lines, for the throughput plot and the progress line.
    pub progress: Vec<(f64, u64)>,
    /// Blocks per pass, and the requests of the passes already written.
    pub blocks: u64,
    completed_before_pass: u64,
    /// Passes the guest reported written.
    pub passes_written: u64,
    /// "PASS" or "FAIL: reason"; None: the guest printed no verdict.
    pub guest_verdict: Option<String>,
    /// The seed the guest verified (from its final line).
    pub verified_seed: Option<u64>,
    pub hangs: Vec<String>,
    /// The backend that could not be restarted, if one could not.
    pub restart_failure: Option<String>,
    pub duration: Duration,
    pub vmm_exit: Option<i32>,
    /// The VMM's last error line, if it printed one.
    pub vmm_error: Option<String>,
}

impl Outcome {
    /// The generations a block may hold at the end: the verified one, or when the guest did
    /// not get that far, the last pass written and the one under way (None: zeros, a block the
    /// first pass had not reached).
    pub fn accepted_seeds(&self, seed: u64) -> Vec<Option<u64>> {
        if let Some(s) = self.verified_seed {
            return vec![Some(s)];
        }
        match self.passes_written {
            0 => vec![Some(seed), None],
            n => vec![Some(seed.wrapping_add(n - 1)), Some(seed.wrapping_add(n))],
        }
    }

    fn take_stdout(&mut self, line: &str, at: f64) {
        if line.starts_with("blk-write-verify: pass ") && line.ends_with(" written") {
            self.passes_written += 1;
            self.completed_before_pass += self.blocks;
            self.progress.push((at, self.completed_before_pass));
        } else if let Some(done) =
            number_after(line, " progress=").filter(|_| line.starts_with("blk-write-verify: "))
        {
            self.progress.push((at, self.completed_before_pass + done));
        } else if let Some(rest) = line.strip_prefix("test-guest: blk-write-verify ") {
            self.guest_verdict = Some(rest.trim().to_string());
        } else if line.starts_with("blk-write-verify: blocks=") {
            self.verified_seed = number_after(line, " seed=");
        }
    }

    fn take_stderr(&mut self, line: &str, at: f64) {
        if line.contains("-> SET_PROTOCOL_FEATURES") {
            let on = line.contains("INFLIGHT_SHMFD");
            // Every connection negotiates; report "yes" only if all did.
            self.inflight_shmfd = Some(self.inflight_shmfd.unwrap_or(true) && on);
            if self.protocol_features.is_none() {
                self.protocol_features = traced_value(line, "protocol_features=");
            }
        } else if line.contains("-> SET_FEATURES ") {
            if self.features.is_none() {
                self.features = traced_value(line, "features=");
            }
        } else if line.contains("vhost-user backend back after ") {
            let ms = number_after(line, "back after ").unwrap_or(0);
            let resubmitted = line
                .rsplit_once("); ")
                .and_then(|(_, t)| number_after(t, ""))
                .unwrap_or(0);
            self.recoveries.push(Recovery {
                ms,
                resubmitted,
                at,
            });
        } else if line.starts_with("vmm: ") {
            self.vmm_error = Some(line.to_string());
        }
    }

    /// Guest requests per second between the last two progress samples.
    fn current_rate(&self) -> Option<f64> {
        let [.., (t0, n0), (t1, n1)] = self.progress[..] else {
            return None;
        };
        (t1 > t0).then(|| n1.saturating_sub(n0) as f64 / (t1 - t0))
    }
}

/// What follows `key` in a trace line, to the line's end (`0x1209 (MQ REPLY_ACK ...)`).
/// Without the trace's ` fds=N` tail.
fn traced_value(line: &str, key: &str) -> Option<String> {
    let (_, value) = line.split_once(key)?;
    let value = value.trim();
    let value = value.rsplit_once(" fds=").map_or(value, |(v, _)| v);
    Some(value.to_string())
}

/// The decimal number right after `prefix` in `line`.
pub fn number_after(line: &str, prefix: &str) -> Option<u64> {
    let (_, tail) = line.split_once(prefix)?;
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// A xorshift64, so `--seed` replays the same kill moments.
struct Rng(u64);

impl Rng {
    fn millis(&mut self, (lo, hi): (u64, u64)) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(lo + self.0 % (hi - lo + 1))
    }
}

struct Run {
    vmm: VmmProcess,
    outcome: Outcome,
    /// When the VMM was started: time zero of the timeline.
    t0: Instant,
}

impl Run {
    /// Reads what both logs gained; false once the VMM has exited (its logs read to the end).
    fn poll(&mut self) -> bool {
        let exited = self.vmm.exited();
        let at = self.t0.elapsed().as_secs_f64();
        for line in self.vmm.stdout.new_lines() {
            self.outcome.take_stdout(&line, at);
        }
        for line in self.vmm.stderr.new_lines() {
            self.outcome.take_stderr(&line, at);
        }
        match exited {
            Some(code) => {
                self.outcome.vmm_exit = code;
                false
            }
            None => true,
        }
    }

    /// Polls until `done` or the VMM exits (false) or `timeout` passes (false).
    fn wait_until(&mut self, timeout: Duration, done: impl Fn(&Outcome) -> bool) -> bool {
        let start = Instant::now();
        loop {
            let running = self.poll();
            if done(&self.outcome) {
                return true;
            }
            if !running || start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn sleep(&mut self, d: Duration) -> bool {
        !self.wait_until(d, |_| false) && self.vmm.exited().is_none()
    }
}

pub fn run(setup: &Setup) -> Result<Outcome, Error> {
    let options = setup.options;
    let started = Instant::now();
    let log = backend::log_path(setup.dir);
    let mut backend = Some(Backend::start(setup.command, &log, setup.socket)?);
    let cmdline = format!(
        "blk-write-verify blocks={} qd={} irq seed={} passes=1000000 stop-on-input progress={PROGRESS_EVERY}",
        setup.blocks, options.queue_depth, options.seed
    );
    let t0 = Instant::now();
    let vmm = VmmProcess::start(setup.dir, setup.guest, setup.socket, &cmdline)?;
    let mut run = Run {
        vmm,
        outcome: Outcome {
            blocks: setup.blocks,
            ..Outcome::default()
        },
        t0,
    };
    let stdout_path = setup.dir.join("vmm.stdout");
    let found_disk = || {
        std::fs::read_to_string(&stdout_path)
            .map(|s| s.contains("virtio-blk at"))
            .unwrap_or(false)
    };
    if !run.wait_until(BOOT_TIMEOUT, |_| found_disk()) {
        return Err(match run.vmm.exited() {
            Some(_) => Error::VmmDidNotStart(
                run.outcome
                    .vmm_error
                    .clone()
                    .or_else(|| run.outcome.guest_verdict.clone())
                    .unwrap_or_else(|| backend::last_line(&setup.dir.join("vmm.stderr"))),
            ),
            None => Error::GuestDidNotStart(BOOT_TIMEOUT.as_secs()),
        });
    }

    let mut rng = Rng(options.seed.max(1) ^ 0x005e_ed0f_c1a5);
    let mut last_ms = None;
    let kills_started = Instant::now();
    let time_left = || options.duration.is_none_or(|d| kills_started.elapsed() < d);
    while run.outcome.kills < options.kills && time_left() {
        if !run.sleep(rng.millis(KILL_GAP_MS)) {
            break; // the guest ended (it failed, or the VMM did)
        }
        if let Some(b) = backend.take() {
            b.kill();
        }
        run.outcome.kills += 1;
        run.outcome.kill_times.push(run.t0.elapsed().as_secs_f64());
        let kill = run.outcome.kills;
        let killed = Instant::now();
        run.sleep(rng.millis(RESTART_GAP_MS));
        run.outcome
            .restart_gaps_ms
            .push(killed.elapsed().as_millis() as u64);
        match Backend::start(setup.command, &log, setup.socket) {
            Ok(b) => backend = Some(b),
            Err(e) => {
                run.outcome.restart_failure = Some(format!("restart after kill {kill}: {e}"));
                break;
            }
        }
        let back = run.wait_until(RECOVERY_TIMEOUT, |o| o.recoveries.len() >= kill as usize);
        if !back {
            if run.vmm.exited().is_some() {
                break;
            }
            run.outcome.hangs.push(format!(
                "kill {kill}: the VMM did not report the backend back within {} s",
                RECOVERY_TIMEOUT.as_secs()
            ));
            break;
        }
        last_ms = run.outcome.recoveries.last().map(|r| r.ms);
        let of = match options.duration {
            Some(d) => format!(
                " in {:.0}/{} s",
                kills_started.elapsed().as_secs_f64(),
                d.as_secs()
            ),
            None => format!("/{}", options.kills),
        };
        let rate = run
            .outcome
            .current_rate()
            .map_or_else(|| "-".into(), |r| format!("{r:.0}"));
        eprint!(
            "\rreconnect-test: kills {kill}{of} recovered, last recovery {} ms, pass {}, {rate} guest requests/s   ",
            last_ms.unwrap_or(0),
            run.outcome.passes_written + 1
        );
    }
    if last_ms.is_some() {
        eprintln!();
    }

    if run.outcome.hangs.is_empty() && run.outcome.restart_failure.is_none() {
        // Stop now: the pass under way, which the last kills hit, is the one verified, and a
        // write of an earlier pass replayed into it leaves a stale block. Waiting for a pass to
        // end first would verify a pass no kill touched: a write acknowledged but never
        // written would go unseen.
        run.vmm.tell_guest_to_stop();
        let finished = run.wait_until(FINISH_TIMEOUT, |_| false);
        if !finished && run.vmm.exited().is_none() {
            run.outcome.hangs.push(format!(
                "the guest did not finish its last pass and verify within {} s",
                FINISH_TIMEOUT.as_secs()
            ));
        }
    }
    run.vmm.kill();
    run.poll();
    drop(backend);
    run.outcome.duration = started.elapsed();
    Ok(run.outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_vmms_and_the_guests_lines() {
        let mut o = Outcome::default();
        o.take_stderr("vhost-user[blk0] -> SET_PROTOCOL_FEATURES protocol_features=0x1209 (MQ REPLY_ACK CONFIG INFLIGHT_SHMFD)", 0.5);
        o.take_stderr("vhost-user[blk0] -> SET_FEATURES features=0x140000000 (VERSION_1 PROTOCOL_FEATURES) fds=0", 0.5);
        o.take_stderr(" WARN devices::x: blk0: vhost-user backend back after 213 ms (10 attempts; cause: hang-up on the socket); 15 requests resubmitted from the inflight region", 1.0);
        o.take_stderr(
            "blk0: vhost-user backend back after 7 ms (1 attempts; cause: x); no queue was running",
            2.0,
        );
        o.blocks = 16;
        o.take_stdout("blk-write-verify: write progress=8/16", 0.5);
        o.take_stdout("blk-write-verify: pass 1/1000000 written", 1.0);
        o.take_stdout("blk-write-verify: write progress=8/16", 1.5);
        o.take_stdout("blk-write-verify: pass 2/1000000 written", 2.0);
        o.take_stdout("blk-write-verify: read progress=8/16", 2.5);
        o.take_stdout("blk-write-verify: blocks=16 start=0 seed=8 written=16 verified=16 flushed=true passes=2", 3.0);
        o.take_stdout("test-guest: blk-write-verify PASS", 3.0);
        assert_eq!(
            o.progress,
            vec![(0.5, 8), (1.0, 16), (1.5, 24), (2.0, 32), (2.5, 40)]
        );
        assert_eq!(o.current_rate(), Some(16.0));
        assert_eq!(
            o.features.as_deref(),
            Some("0x140000000 (VERSION_1 PROTOCOL_FEATURES)")
        );
        assert_eq!(
            o.protocol_features.as_deref(),
            Some("0x1209 (MQ REPLY_ACK CONFIG INFLIGHT_SHMFD)")
        );
        assert_eq!(o.inflight_shmfd, Some(true));
        assert_eq!(
            o.recoveries,
            vec![
                Recovery {
                    ms: 213,
                    resubmitted: 15,
                    at: 1.0
                },
                Recovery {
                    ms: 7,
                    resubmitted: 0,
                    at: 2.0
                }
            ]
        );
        assert_eq!(o.passes_written, 2);
        assert_eq!(o.verified_seed, Some(8));
        assert_eq!(o.guest_verdict.as_deref(), Some("PASS"));
        assert_eq!(o.accepted_seeds(7), vec![Some(8)]);
        o.take_stderr("vhost-user[blk0] -> SET_PROTOCOL_FEATURES protocol_features=0x209 (MQ REPLY_ACK CONFIG)", 4.0);
        assert_eq!(o.inflight_shmfd, Some(false));
    }

    #[test]
    fn an_unfinished_guest_accepts_the_last_two_generations() {
        let o = Outcome {
            passes_written: 3,
            ..Outcome::default()
        };
        assert_eq!(o.accepted_seeds(10), vec![Some(12), Some(13)]);
    }
}
