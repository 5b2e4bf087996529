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

    /// Parse an RFC 3339 date-time with an offset (`2026-11-27T02:00:00Z`,
    /// `2026-11-27T03:00:00.5+01:00`). The error says what is wrong.
    pub fn parse_rfc3339(text: &str) -> Result<Timestamp, String> {
        let bad = |what: &str| format!("{text:?} is not an RFC 3339 date-time ({what}); e.g. 2026-11-27T02:00:00Z");
        let b = text.as_bytes();
        if !text.is_ascii() {
            return Err(bad("not ASCII"));
        }
        if b.len() < 20
            || b[4] != b'-'
            || b[7] != b'-'
            || !matches!(b[10], b'T' | b't')
            || b[13] != b':'
            || b[16] != b':'
        {
            return Err(bad("layout"));
        }
        let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
            let part = &text[range];
            if part.bytes().all(|c| c.is_ascii_digit()) {
                part.parse::<i64>().map_err(|_| bad("digits"))
            } else {
                Err(bad("digits"))
            }
        };
        let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month) || hour > 23 || minute > 59 || second > 59 {
            return Err(bad("a field is out of range"));
        }
        let days = days_from_civil(year, month, day);
        if civil_from_days(days) != (year, month as u8, day as u8) {
            return Err(bad("no such day"));
        }
        let mut rest = &text[19..];
        let mut millis = 0i64;
        if let Some(fraction) = rest.strip_prefix('.') {
            let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad("empty fraction"));
            }
            for (i, c) in fraction.bytes().take(3).enumerate() {
                if i < digits {
                    millis += i64::from(c - b'0') * [100, 10, 1][i];
                }
            }
            rest = &fraction[digits..];
        }
        let offset_ms = match rest {
            "Z" | "z" => 0,
            _ if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') && rest.as_bytes()[3] == b':' => {
                let h = num(text.len() - 5..text.len() - 3)?;
                let m = num(text.len() - 2..text.len())?;
                if h > 23 || m > 59 {
                    return Err(bad("offset out of range"));
                }
                let sign = if rest.starts_with('-') { -1 } else { 1 };
                sign * (h * 3_600_000 + m * 60_000)
            }
            _ => return Err(bad("offset: Z or ±HH:MM")),
        };
        let ms = days * 86_400_000 + hour * 3_600_000 + minute * 60_000 + second * 1000 + millis - offset_ms;
        Ok(Timestamp(ms))
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's inverse).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

    #[test]
    fn rfc3339_round_trips_and_refuses_nonsense() {
        for ms in [0, 951_782_400_000, 1_764_115_200_123, 1_798_675_199_999] {
            assert_eq!(Timestamp::parse_rfc3339(&Timestamp(ms).to_string()), Ok(Timestamp(ms)));
        }
        assert_eq!(
            Timestamp::parse_rfc3339("2026-11-27T03:00:00+01:00"),
            Timestamp::parse_rfc3339("2026-11-27T02:00:00Z")
        );
        assert_eq!(Timestamp::parse_rfc3339("1970-01-01T00:00:00.5Z"), Ok(Timestamp(500)));
        for bad in [
            "",
            "2026-02-30T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-27 02:00:00Z",
            "2026-11-27T02:00:00",
            "2026-11-27T24:00:00Z",
            "2026-11-27T02:00:00+1:00",
            "２０２6-11-27T02:00:00Z",
            "2026-11-27T02:00:00.Z",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_err(), "{bad:?}");
        }
    }
}
