//! Counters of one queue's data path, logged when the queue stops: where the time goes.
//!
//! They answer "requests per kick, per wake-up, per used-ring publish, per interrupt" and "time
//! in disk I/O vs ring handling vs waiting" without a profiler (`perf` is not available on every
//! host this runs on). Each counter is touched by one thread at a time in the common case, so
//! relaxed atomics cost next to nothing; the clock is read only around waits and disk I/O.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// One queue's counters since it started.
#[derive(Debug)]
pub struct QueueStats {
    started: Instant,
    /// Requests that reached the used ring.
    pub requests: AtomicU64,
    /// Wake-ups by the kick eventfd (each is one or more guest notifications).
    pub kicks: AtomicU64,
    /// Times the dispatcher found new requests while spinning before it slept.
    pub spin_hits: AtomicU64,
    /// Times it spun and found nothing (then it slept).
    pub spin_misses: AtomicU64,
    /// Rounds of popping: each wake-up or spin hit that found the ring non-empty.
    pub rounds: AtomicU64,
    /// Batches published to the used ring (one used-index update each).
    pub publishes: AtomicU64,
    /// Interrupts signalled (writes to the call eventfd).
    pub interrupts: AtomicU64,
    /// Nanoseconds spent in disk I/O and copying (request execution).
    pub io_ns: AtomicU64,
    /// Nanoseconds the dispatcher slept in poll().
    pub sleep_ns: AtomicU64,
    /// Nanoseconds the dispatcher spun watching the avail index.
    pub spin_ns: AtomicU64,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            kicks: AtomicU64::new(0),
            spin_hits: AtomicU64::new(0),
            spin_misses: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            publishes: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
            io_ns: AtomicU64::new(0),
            sleep_ns: AtomicU64::new(0),
            spin_ns: AtomicU64::new(0),
        }
    }
}

impl QueueStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_elapsed(counter: &AtomicU64, since: Instant) {
        let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counter.fetch_add(ns, Ordering::Relaxed);
    }

    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// `requests/other` with one decimal, or `-` when nothing happened.
fn per(requests: u64, other: u64) -> String {
    if other == 0 {
        "-".to_string()
    } else {
        format!("{:.1}", requests as f64 / other as f64)
    }
}

/// One line: `requests=N kicks=K (R/kick) ... io=X% ring=Y% sleep=Z% spin=W%` of the queue's
/// lifetime. "ring" is what is left: popping, parsing, publishing, signalling and the dispatcher's
/// own overhead. With I/O threads, io time overlaps the dispatcher's and the shares pass 100 %.
impl fmt::Display for QueueStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let requests = Self::get(&self.requests);
        let kicks = Self::get(&self.kicks);
        let rounds = Self::get(&self.rounds);
        let publishes = Self::get(&self.publishes);
        let interrupts = Self::get(&self.interrupts);
        let total = u64::try_from(self.started.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        let io = Self::get(&self.io_ns);
        let sleep = Self::get(&self.sleep_ns);
        let spin = Self::get(&self.spin_ns);
        let ring = total.saturating_sub(io + sleep + spin);
        let pct = |ns: u64| 100.0 * ns as f64 / total as f64;
        write!(
            f,
            "requests={requests} kicks={kicks} ({}/kick) rounds={rounds} ({}/round) \
             spin_hits={} spin_misses={} publishes={publishes} ({}/publish) \
             interrupts={interrupts} ({}/interrupt) over {:.3} s: io={:.1}% ring={:.1}% \
             sleep={:.1}% spin={:.1}%",
            per(requests, kicks),
            per(requests, rounds),
            Self::get(&self.spin_hits),
            Self::get(&self.spin_misses),
            per(requests, publishes),
            per(requests, interrupts),
            total as f64 / 1e9,
            pct(io),
            pct(ring),
            pct(sleep),
            pct(spin),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_requests_per_event_and_dashes_when_none() {
        let stats = QueueStats::default();
        QueueStats::add(&stats.requests, 64);
        QueueStats::add(&stats.kicks, 2);
        QueueStats::add(&stats.publishes, 8);
        let line = stats.to_string();
        assert!(line.contains("requests=64 kicks=2 (32.0/kick)"), "{line}");
        assert!(line.contains("publishes=8 (8.0/publish)"), "{line}");
        assert!(line.contains("interrupts=0 (-/interrupt)"), "{line}");
    }
}
