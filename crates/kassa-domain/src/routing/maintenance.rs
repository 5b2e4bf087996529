//! Maintenance windows: a provider gets no traffic during one, is drained
//! before it starts and ramps back after it ends.
//!
//! The core sees concrete UTC intervals. Recurring windows with a time zone
//! are expanded into intervals at the edge (the service holds the time zone
//! database), so this stays a pure function of `now`.

use crate::time::Timestamp;
use serde::{Deserialize, Serialize};

/// One window, `[start_ms, end_ms)` in Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceWindow {
    pub start_ms: i64,
    pub end_ms: i64,
    pub reason: String,
}

/// How traffic is drained before and ramped after a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaintenanceConfig {
    pub drain_ms: i64,
    pub ramp_ms: i64,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig { drain_ms: 60_000, ramp_ms: 60_000 }
    }
}

/// Where a provider is relative to its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum MaintenanceStatus {
    None,
    /// A window starts soon: the share falls linearly to zero at its start.
    Draining {
        starts_ms: i64,
    },
    InMaintenance {
        ends_ms: i64,
    },
    /// A window ended: the share climbs linearly back to all traffic.
    Ramping {
        ended_ms: i64,
    },
}

impl MaintenanceStatus {
    pub fn name(&self) -> &'static str {
        match self {
            MaintenanceStatus::None => "none",
            MaintenanceStatus::Draining { .. } => "draining",
            MaintenanceStatus::InMaintenance { .. } => "in_maintenance",
            MaintenanceStatus::Ramping { .. } => "ramping",
        }
    }
}

/// The share of traffic (basis points) the windows leave a provider at `now`,
/// and why. With overlapping windows the smallest share wins.
pub fn maintenance_share(
    windows: &[MaintenanceWindow],
    config: MaintenanceConfig,
    now: Timestamp,
) -> (u32, MaintenanceStatus) {
    let now = now.unix_ms();
    let mut best = (10_000u32, MaintenanceStatus::None);
    for window in windows {
        let (share, status) = if now >= window.start_ms && now < window.end_ms {
            (0, MaintenanceStatus::InMaintenance { ends_ms: window.end_ms })
        } else if now < window.start_ms && now >= window.start_ms - config.drain_ms {
            let left = window.start_ms - now;
            (
                (left * 10_000 / config.drain_ms.max(1)) as u32,
                MaintenanceStatus::Draining { starts_ms: window.start_ms },
            )
        } else if now >= window.end_ms && now < window.end_ms + config.ramp_ms {
            let since = now - window.end_ms;
            ((since * 10_000 / config.ramp_ms.max(1)) as u32, MaintenanceStatus::Ramping { ended_ms: window.end_ms })
        } else {
            continue;
        };
        // Draining or ramping always leaves a sliver: zero means "in maintenance" to routing.
        let share = if matches!(status, MaintenanceStatus::InMaintenance { .. }) { share } else { share.max(1) };
        if share < best.0 || (share == best.0 && best.1 == MaintenanceStatus::None) {
            best = (share, status);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(start_ms: i64, end_ms: i64) -> MaintenanceWindow {
        MaintenanceWindow { start_ms, end_ms, reason: "upgrade".into() }
    }

    #[test]
    fn drains_before_blocks_during_ramps_after() {
        let config = MaintenanceConfig { drain_ms: 1_000, ramp_ms: 2_000 };
        let windows = [window(10_000, 20_000)];
        let share = |ms| maintenance_share(&windows, config, Timestamp::from_unix_ms(ms));
        assert_eq!(share(8_999), (10_000, MaintenanceStatus::None));
        assert_eq!(share(9_000), (10_000, MaintenanceStatus::Draining { starts_ms: 10_000 }));
        assert_eq!(share(9_500), (5_000, MaintenanceStatus::Draining { starts_ms: 10_000 }));
        assert_eq!(share(10_000), (0, MaintenanceStatus::InMaintenance { ends_ms: 20_000 }));
        assert_eq!(share(19_999), (0, MaintenanceStatus::InMaintenance { ends_ms: 20_000 }));
        assert_eq!(share(20_000), (1, MaintenanceStatus::Ramping { ended_ms: 20_000 }), "never zero once ended");
        assert_eq!(share(9_999), (10, MaintenanceStatus::Draining { starts_ms: 10_000 }));
        assert_eq!(share(21_000), (5_000, MaintenanceStatus::Ramping { ended_ms: 20_000 }));
        assert_eq!(share(22_000), (10_000, MaintenanceStatus::None));
    }

    #[test]
    fn overlapping_windows_take_the_smallest_share() {
        let config = MaintenanceConfig { drain_ms: 1_000, ramp_ms: 1_000 };
        let windows = [window(0, 5_000), window(5_500, 9_000)];
        // At 5 250 the first ramps (25%) and the second drains (25%); at 5 400, 40% vs 10%.
        let (share, status) = maintenance_share(&windows, config, Timestamp::from_unix_ms(5_400));
        assert_eq!((share, status), (1_000, MaintenanceStatus::Draining { starts_ms: 5_500 }));
    }
}
