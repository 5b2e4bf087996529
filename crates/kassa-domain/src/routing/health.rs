//! Live health of one provider: sliding windows of outcomes and latencies.
//!
//! A window is a ring of fixed-width time buckets; a bucket older than the
//! window is reused, so memory is fixed and nothing is ever scanned beyond
//! the ring. Latencies go into a fixed log-scale histogram: percentiles are
//! the upper bound of the bucket that holds the rank (never an average).

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// What a provider call came to, for health. A decline is a healthy answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeClass {
    Approved,
    Declined,
    /// An error answer, or a refused connection: the provider did not act.
    Error,
    /// No answer in time: the provider may have acted.
    Timeout,
}

impl OutcomeClass {
    fn index(self) -> usize {
        match self {
            OutcomeClass::Approved => 0,
            OutcomeClass::Declined => 1,
            OutcomeClass::Error => 2,
            OutcomeClass::Timeout => 3,
        }
    }

    /// Errors and timeouts count against a provider; answers do not.
    pub fn is_failure(self) -> bool {
        matches!(self, OutcomeClass::Error | OutcomeClass::Timeout)
    }
}

/// Upper bounds (ms) of the latency histogram's buckets; the last is open.
const LATENCY_BOUNDS_MS: [u32; 22] =
    [1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 1500, 2000, 3000, 5000];
const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Width and number of a window's buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowConfig {
    pub bucket_ms: i64,
    pub buckets: usize,
}

impl Default for WindowConfig {
    /// 30 seconds, in one-second buckets.
    fn default() -> Self {
        WindowConfig { bucket_ms: 1000, buckets: 30 }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Bucket {
    /// `now / bucket_ms` of the bucket's slot; a stale epoch means empty.
    epoch: i64,
    counts: [u32; 4],
    latency: [u32; LATENCY_BUCKETS],
}

/// A sliding window of one provider's outcomes and latencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthWindow {
    config: WindowConfig,
    buckets: Vec<Bucket>,
}

/// What a window says at one instant. Rates are basis points (1/100 of a percent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSnapshot {
    pub calls: u32,
    pub approved: u32,
    pub declined: u32,
    pub errors: u32,
    pub timeouts: u32,
    /// Share of calls the provider answered (approved or declined); `None` without calls.
    pub success_rate_bp: Option<u32>,
    /// Share of answers that were approvals.
    pub approval_rate_bp: Option<u32>,
    pub latency_p50_ms: Option<u32>,
    pub latency_p99_ms: Option<u32>,
}

impl HealthSnapshot {
    pub fn failures(&self) -> u32 {
        self.errors + self.timeouts
    }

    /// Share of calls that failed, in basis points; 0 without calls.
    pub fn failure_rate_bp(&self) -> u32 {
        if self.calls == 0 { 0 } else { rate_bp(self.failures(), self.calls) }
    }
}

fn rate_bp(part: u32, whole: u32) -> u32 {
    (u64::from(part) * 10_000 / u64::from(whole.max(1))) as u32
}

impl HealthWindow {
    pub fn new(config: WindowConfig) -> Self {
        let config = WindowConfig { bucket_ms: config.bucket_ms.max(1), buckets: config.buckets.max(1) };
        HealthWindow { config, buckets: vec![Bucket { epoch: i64::MIN, ..Bucket::default() }; config.buckets] }
    }

    pub fn config(&self) -> WindowConfig {
        self.config
    }

    fn slot(&mut self, now: Timestamp) -> &mut Bucket {
        let epoch = now.unix_ms().div_euclid(self.config.bucket_ms);
        let index = epoch.rem_euclid(self.config.buckets as i64) as usize;
        let bucket = &mut self.buckets[index];
        if bucket.epoch != epoch {
            *bucket = Bucket { epoch, ..Bucket::default() };
        }
        bucket
    }

    /// Count one call that ended at `now` after `latency_ms`.
    pub fn record(&mut self, now: Timestamp, class: OutcomeClass, latency_ms: u32) {
        let bucket = self.slot(now);
        bucket.counts[class.index()] = bucket.counts[class.index()].saturating_add(1);
        let at = LATENCY_BOUNDS_MS.iter().position(|&bound| latency_ms <= bound).unwrap_or(LATENCY_BUCKETS - 1);
        bucket.latency[at] = bucket.latency[at].saturating_add(1);
    }

    /// Forget everything (a breaker starts counting afresh after it changes state).
    pub fn clear(&mut self) {
        for bucket in &mut self.buckets {
            *bucket = Bucket { epoch: i64::MIN, ..Bucket::default() };
        }
    }

    /// The window ending at `now`.
    pub fn snapshot(&self, now: Timestamp) -> HealthSnapshot {
        let newest = now.unix_ms().div_euclid(self.config.bucket_ms);
        let oldest = newest - self.config.buckets as i64 + 1;
        let mut counts = [0u32; 4];
        let mut latency = [0u32; LATENCY_BUCKETS];
        for bucket in self.buckets.iter().filter(|b| b.epoch >= oldest && b.epoch <= newest) {
            for (total, n) in counts.iter_mut().zip(bucket.counts) {
                *total = total.saturating_add(n);
            }
            for (total, n) in latency.iter_mut().zip(bucket.latency) {
                *total = total.saturating_add(n);
            }
        }
        let calls: u32 = counts.iter().fold(0u32, |a, &n| a.saturating_add(n));
        let answered = counts[0].saturating_add(counts[1]);
        let percentile = |per_mille: u64| -> Option<u32> {
            if calls == 0 {
                return None;
            }
            // The smallest bucket holding at least ceil(calls × p) samples.
            let rank = (u64::from(calls) * per_mille).div_ceil(1000).max(1);
            let mut seen = 0u64;
            for (i, &n) in latency.iter().enumerate() {
                seen += u64::from(n);
                if seen >= rank {
                    return Some(LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(u32::MAX));
                }
            }
            None
        };
        HealthSnapshot {
            calls,
            approved: counts[0],
            declined: counts[1],
            errors: counts[2],
            timeouts: counts[3],
            success_rate_bp: (calls > 0).then(|| rate_bp(answered, calls)),
            approval_rate_bp: (answered > 0).then(|| rate_bp(counts[0], answered)),
            latency_p50_ms: percentile(500),
            latency_p99_ms: percentile(990),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_ms(ms)
    }

    #[test]
    fn counts_and_rates_within_the_window() {
        let mut window = HealthWindow::new(WindowConfig { bucket_ms: 1000, buckets: 10 });
        for i in 0..8 {
            window.record(at(1_000 + i), OutcomeClass::Approved, 20);
        }
        window.record(at(2_000), OutcomeClass::Declined, 30);
        window.record(at(3_000), OutcomeClass::Error, 1);
        let snap = window.snapshot(at(5_000));
        assert_eq!((snap.calls, snap.approved, snap.declined, snap.errors, snap.timeouts), (10, 8, 1, 1, 0));
        assert_eq!(snap.success_rate_bp, Some(9_000));
        assert_eq!(snap.approval_rate_bp, Some(8_888));
        assert_eq!(snap.failure_rate_bp(), 1_000);
        assert_eq!(snap.latency_p50_ms, Some(20));
        assert_eq!(snap.latency_p99_ms, Some(30));
    }

    #[test]
    fn old_buckets_fall_out_and_slots_are_reused() {
        let mut window = HealthWindow::new(WindowConfig { bucket_ms: 1000, buckets: 3 });
        window.record(at(0), OutcomeClass::Timeout, 5000);
        assert_eq!(window.snapshot(at(2_999)).timeouts, 1);
        assert_eq!(window.snapshot(at(3_000)).calls, 0, "the bucket of second 0 left a 3 s window at 3 s");
        window.record(at(3_000), OutcomeClass::Approved, 10); // same slot as second 0
        let snap = window.snapshot(at(3_000));
        assert_eq!((snap.calls, snap.timeouts, snap.approved), (1, 0, 1));
    }

    #[test]
    fn empty_window_has_no_rates_or_percentiles() {
        let snap = HealthWindow::new(WindowConfig::default()).snapshot(at(0));
        assert_eq!(snap, HealthSnapshot::default());
        assert_eq!(snap.failure_rate_bp(), 0);
    }

    #[test]
    fn p99_sees_the_slow_tail() {
        let mut window = HealthWindow::new(WindowConfig::default());
        for _ in 0..98 {
            window.record(at(0), OutcomeClass::Approved, 10);
        }
        window.record(at(0), OutcomeClass::Approved, 900);
        window.record(at(0), OutcomeClass::Approved, 9000);
        let snap = window.snapshot(at(0));
        assert_eq!(snap.latency_p50_ms, Some(10));
        assert_eq!(snap.latency_p99_ms, Some(1000));
    }
}
