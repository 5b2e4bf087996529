//! Time as plain data. The core never reads a clock: callers pass `now`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const fn from_unix_ms(ms: i64) -> Self {
        Timestamp(ms)
    }

    pub const fn unix_ms(self) -> i64 {
        self.0
    }

    /// The calendar date (proleptic Gregorian, UTC): (year, month 1–12, day 1–31).
    pub fn civil_date(self) -> (i64, u8, u8) {
        civil_from_days(self.0.div_euclid(86_400_000))
    }

    pub fn saturating_add_ms(self, ms: i64) -> Self {
        Timestamp(self.0.saturating_add(ms))
    }
}

/// Howard Hinnant's days-to-civil algorithm: exact for every i64 day count we
/// can meet, no tables, no floats.
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.civil_date();
        let ms_of_day = self.0.rem_euclid(86_400_000);
        write!(
            f,
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
            ms_of_day / 3_600_000,
            ms_of_day / 60_000 % 60,
            ms_of_day / 1000 % 60,
            ms_of_day % 1000
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(Timestamp(0).civil_date(), (1970, 1, 1));
        assert_eq!(Timestamp(951_782_400_000).civil_date(), (2000, 2, 29));
        assert_eq!(Timestamp(1_798_675_200_000).civil_date(), (2026, 12, 31));
        assert_eq!(Timestamp(-1).civil_date(), (1969, 12, 31));
        assert_eq!(format!("{:?}", Timestamp(1_764_115_200_123)), "2025-11-26T00:00:00.123Z");
    }
}
