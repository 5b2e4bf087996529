//! A circuit breaker per provider.
//!
//! ```text
//! Closed ─(failure rate ≥ threshold over ≥ min_calls)→ Open ─(open_ms)→ HalfOpen ─(probes_to_close successes)→ Ramping ─(ramp_ms)→ Closed
//!                                                        ▲                 │ any failure                          │ failure rate ≥ threshold
//!                                                        └─────────────────┴──────────────────────────────────────┘
//! ```
//!
//! The share of traffic a provider is offered follows the state: all of it
//! when closed, none when open, `probe_share_bp` when half-open, and a linear
//! ramp from the probe share to all of it while ramping — a provider that
//! just recovered is not handed every payment at once. Transitions happen only
//! in [`Breaker::tick`] and [`Breaker::on_result`], both given `now`.

use super::health::{HealthSnapshot, HealthWindow, OutcomeClass, WindowConfig};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// Thresholds. Rates and shares are basis points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Calls the window must hold before its failure rate can open the breaker.
    pub min_calls: u32,
    pub failure_rate_open_bp: u32,
    /// How long the breaker stays open before probing.
    pub open_ms: i64,
    /// Share of traffic offered while half-open.
    pub probe_share_bp: u32,
    /// Consecutive successful probes that end half-open.
    pub probes_to_close: u32,
    /// How long the share takes to climb from the probe share to all traffic.
    pub ramp_ms: i64,
    /// The window failure rates are measured over.
    pub window_ms: i64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            min_calls: 20,
            failure_rate_open_bp: 5_000,
            open_ms: 5_000,
            probe_share_bp: 1_000,
            probes_to_close: 5,
            ramp_ms: 20_000,
            window_ms: 10_000,
        }
    }
}

/// Where a breaker is. Times are Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open { since_ms: i64 },
    HalfOpen { since_ms: i64, successes: u32 },
    Ramping { since_ms: i64 },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
            BreakerState::Ramping { .. } => "ramping",
        }
    }
}

/// A change of state, with the figures that caused it (an event for the health stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerTransition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub at_ms: i64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    /// Outcomes since the state was entered, within the window.
    window: HealthWindow,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        let bucket_ms = (config.window_ms / 10).max(1);
        Breaker {
            config,
            state: BreakerState::Closed,
            window: HealthWindow::new(WindowConfig { bucket_ms, buckets: 10 }),
        }
    }

    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// The share of traffic the provider is offered at `now`, in basis points.
    pub fn share_bp(&self, now: Timestamp) -> u32 {
        match self.state {
            BreakerState::Closed => 10_000,
            BreakerState::Open { .. } => 0,
            BreakerState::HalfOpen { .. } => self.config.probe_share_bp.min(10_000),
            BreakerState::Ramping { since_ms } => {
                let probe = i64::from(self.config.probe_share_bp.min(10_000));
                let elapsed = (now.unix_ms() - since_ms).clamp(0, self.config.ramp_ms.max(1));
                (probe + (10_000 - probe) * elapsed / self.config.ramp_ms.max(1)) as u32
            }
        }
    }

    /// When the breaker, left alone, will next offer traffic (for `Retry-After`).
    pub fn next_probe_ms(&self) -> Option<i64> {
        match self.state {
            BreakerState::Open { since_ms } => Some(since_ms + self.config.open_ms),
            _ => None,
        }
    }

    fn enter(&mut self, to: BreakerState, now: Timestamp, reason: String) -> BreakerTransition {
        let from = self.state;
        self.state = to;
        self.window.clear();
        BreakerTransition { from, to, at_ms: now.unix_ms(), reason }
    }

    /// Transitions that only need time to pass.
    pub fn tick(&mut self, now: Timestamp) -> Option<BreakerTransition> {
        let now_ms = now.unix_ms();
        match self.state {
            BreakerState::Open { since_ms } if now_ms >= since_ms + self.config.open_ms => Some(self.enter(
                BreakerState::HalfOpen { since_ms: now_ms, successes: 0 },
                now,
                format!("open for {} ms: probing", self.config.open_ms),
            )),
            BreakerState::Ramping { since_ms } if now_ms >= since_ms + self.config.ramp_ms => {
                Some(self.enter(BreakerState::Closed, now, "ramp complete".into()))
            }
            _ => None,
        }
    }

    fn trips(&self, snapshot: &HealthSnapshot) -> bool {
        snapshot.calls >= self.config.min_calls && snapshot.failure_rate_bp() >= self.config.failure_rate_open_bp
    }

    /// Count a call's outcome; may change state. Call [`Breaker::tick`] first
    /// so the outcome counts in the state time has moved the breaker to.
    pub fn on_result(&mut self, now: Timestamp, class: OutcomeClass) -> Option<BreakerTransition> {
        let now_ms = now.unix_ms();
        match self.state {
            BreakerState::Closed | BreakerState::Ramping { .. } => {
                self.window.record(now, class, 0);
                let snapshot = self.window.snapshot(now);
                self.trips(&snapshot).then(|| {
                    self.enter(
                        BreakerState::Open { since_ms: now_ms },
                        now,
                        format!(
                            "{} of {} calls failed ({} bp ≥ {} bp)",
                            snapshot.failures(),
                            snapshot.calls,
                            snapshot.failure_rate_bp(),
                            self.config.failure_rate_open_bp
                        ),
                    )
                })
            }
            BreakerState::Open { .. } => None, // a late answer from before it opened
            BreakerState::HalfOpen { since_ms, successes } => {
                if class.is_failure() {
                    Some(self.enter(BreakerState::Open { since_ms: now_ms }, now, "a probe failed".into()))
                } else if successes + 1 >= self.config.probes_to_close {
                    Some(self.enter(
                        BreakerState::Ramping { since_ms: now_ms },
                        now,
                        format!("{} probes succeeded: ramping up", successes + 1),
                    ))
                } else {
                    self.state = BreakerState::HalfOpen { since_ms, successes: successes + 1 };
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_unix_ms(ms)
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            min_calls: 10,
            failure_rate_open_bp: 5_000,
            open_ms: 1_000,
            probe_share_bp: 1_000,
            probes_to_close: 3,
            ramp_ms: 10_000,
            window_ms: 10_000,
        }
    }

    #[test]
    fn opens_only_with_enough_calls_and_failures() {
        let mut breaker = Breaker::new(config());
        for i in 0..9 {
            assert_eq!(breaker.on_result(at(i), OutcomeClass::Error), None, "fewer than min_calls never opens");
        }
        let transition = breaker.on_result(at(9), OutcomeClass::Error).expect("10 of 10 failed");
        assert_eq!(transition.to, BreakerState::Open { since_ms: 9 });
        assert_eq!(breaker.share_bp(at(10)), 0);
    }

    #[test]
    fn declines_are_answers_not_failures() {
        let mut breaker = Breaker::new(config());
        for i in 0..100 {
            assert_eq!(breaker.on_result(at(i), OutcomeClass::Declined), None);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn open_half_open_ramp_closed() {
        let mut breaker = Breaker::new(config());
        for i in 0..10 {
            breaker.on_result(at(i), OutcomeClass::Timeout);
        }
        assert_eq!(breaker.tick(at(500)), None, "stays open for open_ms");
        assert_eq!(breaker.next_probe_ms(), Some(1_009));
        let probing = breaker.tick(at(1_009)).expect("half-open after open_ms");
        assert_eq!(probing.to, BreakerState::HalfOpen { since_ms: 1_009, successes: 0 });
        assert_eq!(breaker.share_bp(at(1_010)), 1_000, "half-open offers the probe share");
        breaker.on_result(at(1_100), OutcomeClass::Approved);
        breaker.on_result(at(1_200), OutcomeClass::Declined);
        let ramping = breaker.on_result(at(1_300), OutcomeClass::Approved).expect("third probe closes");
        assert_eq!(ramping.to, BreakerState::Ramping { since_ms: 1_300 });
        assert_eq!(breaker.share_bp(at(1_300)), 1_000);
        assert_eq!(breaker.share_bp(at(6_300)), 5_500, "half way up the ramp");
        assert_eq!(breaker.tick(at(11_300)).map(|t| t.to), Some(BreakerState::Closed));
        assert_eq!(breaker.share_bp(at(11_300)), 10_000);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let mut breaker = Breaker::new(config());
        for i in 0..10 {
            breaker.on_result(at(i), OutcomeClass::Error);
        }
        breaker.tick(at(2_000));
        let reopened = breaker.on_result(at(2_001), OutcomeClass::Timeout).expect("probe failed");
        assert_eq!(reopened.to, BreakerState::Open { since_ms: 2_001 });
    }

    #[test]
    fn failures_while_ramping_reopen_and_old_failures_do_not_count() {
        let mut breaker = Breaker::new(config());
        for i in 0..10 {
            breaker.on_result(at(i), OutcomeClass::Error);
        }
        breaker.tick(at(1_009));
        for t in [1_010, 1_011, 1_012] {
            breaker.on_result(at(t), OutcomeClass::Approved);
        }
        assert!(matches!(breaker.state(), BreakerState::Ramping { .. }));
        // The 10 failures before it opened are forgotten: one more does not reopen.
        assert_eq!(breaker.on_result(at(1_020), OutcomeClass::Error), None);
        for t in 0..9 {
            breaker.on_result(at(1_030 + t), OutcomeClass::Error);
        }
        assert!(matches!(breaker.state(), BreakerState::Open { .. }));
    }
}
