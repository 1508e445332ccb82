//! RFC 3339 timestamps, as the access service's `lastUpdate` carries them (RFC 3341 §6,
//! ACC-13, ACC-14, ACC-20): parsed to an instant so that two spellings of one moment compare
//! equal (`...13:02:00-08:00` is `...21:02:00Z`), and written in UTC with the offset `-00:00`,
//! which says "UTC, local offset unknown" and so does not reveal where the relay is (RFC 3341
//! §7). No clock here: the instant to write is given.

use std::fmt;

/// An instant, in nanoseconds since 1970-01-01T00:00:00Z (leap seconds folded into the
/// following second, as RFC 3339 §5.6 permits for comparison).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    unix_nanos: i128,
}

/// Why a text is not an RFC 3339 `date-time`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an RFC 3339 date-time: {0:?}")]
pub struct TimestampError(pub String);

const NANOS_PER_SECOND: i128 = 1_000_000_000;
const NANOS_PER_MILLI: i128 = 1_000_000;

impl Timestamp {
    /// The instant `unix_ms` milliseconds after the epoch.
    pub fn from_unix_millis(unix_ms: i64) -> Self {
        Self {
            unix_nanos: i128::from(unix_ms) * NANOS_PER_MILLI,
        }
    }

    /// Milliseconds since the epoch (sub-millisecond digits dropped).
    pub fn unix_millis(self) -> i64 {
        let millis = self.unix_nanos.div_euclid(NANOS_PER_MILLI);
        i64::try_from(millis).unwrap_or(if millis < 0 { i64::MIN } else { i64::MAX })
    }

    /// Parses `date-time` of RFC 3339 §5.6: `YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`,
    /// `T` and `Z` in either case, a second of 60 allowed (a leap second).
    pub fn parse(text: &str) -> Result<Self, TimestampError> {
        let bad = || TimestampError(text.to_owned());
        let b = text.as_bytes();
        let digits = |from: usize, len: usize| -> Result<i128, TimestampError> {
            let part = b.get(from..from + len).ok_or_else(bad)?;
            if !part.iter().all(u8::is_ascii_digit) {
                return Err(bad());
            }
            Ok(part
                .iter()
                .fold(0i128, |n, d| n * 10 + i128::from(d - b'0')))
        };
        let expect = |at: usize, what: &[u8]| -> Result<(), TimestampError> {
            match b.get(at) {
                Some(c) if what.contains(c) => Ok(()),
                _ => Err(bad()),
            }
        };
        let year = digits(0, 4)?;
        expect(4, b"-")?;
        let month = digits(5, 2)?;
        expect(7, b"-")?;
        let day = digits(8, 2)?;
        expect(10, b"Tt")?;
        let hour = digits(11, 2)?;
        expect(13, b":")?;
        let minute = digits(14, 2)?;
        expect(16, b":")?;
        let second = digits(17, 2)?;
        let mut at = 19;
        let mut nanos = 0i128;
        if b.get(at) == Some(&b'.') {
            at += 1;
            let start = at;
            while b.get(at).is_some_and(u8::is_ascii_digit) {
                // Digits past the ninth are below a nanosecond: read, not kept.
                if at - start < 9 {
                    nanos = nanos * 10 + i128::from(b[at] - b'0');
                }
                at += 1;
            }
            let kept = (at - start).min(9);
            if at == start {
                return Err(bad());
            }
            nanos *= 10i128.pow(9 - kept as u32);
        }
        let offset_minutes = match b.get(at) {
            Some(b'Z' | b'z') if at + 1 == b.len() => 0,
            Some(sign @ (b'+' | b'-')) if at + 6 == b.len() => {
                let hours = digits(at + 1, 2)?;
                expect(at + 3, b":")?;
                let minutes = digits(at + 4, 2)?;
                if hours > 23 || minutes > 59 {
                    return Err(bad());
                }
                let offset = hours * 60 + minutes;
                if *sign == b'-' {
                    -offset
                } else {
                    offset
                }
            }
            _ => return Err(bad()),
        };
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let month_days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return Err(bad()),
        };
        if day < 1 || day > month_days || hour > 23 || minute > 59 || second > 60 {
            return Err(bad());
        }
        let days = days_from_civil(year, month, day);
        let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
        Ok(Self {
            unix_nanos: seconds * NANOS_PER_SECOND + nanos,
        })
    }

    /// The timestamp one millisecond later: what a replaced entry gets when the clock has not
    /// moved since its previous `lastUpdate` (which the new one SHOULD differ from, ACC-14).
    pub fn next_milli(self) -> Self {
        Self {
            unix_nanos: self.unix_nanos + NANOS_PER_MILLI,
        }
    }
}

impl fmt::Display for Timestamp {
    /// `YYYY-MM-DDTHH:MM:SS.mmm-00:00` (UTC, milliseconds; ACC-20).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self.unix_nanos.div_euclid(NANOS_PER_MILLI);
        let seconds = millis.div_euclid(1000);
        let (days, in_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}-00:00",
            in_day / 3_600,
            in_day / 60 % 60,
            in_day % 60,
            millis.rem_euclid(1000)
        )
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i128, month: i128, day: i128) -> i128 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `days` after 1970-01-01 (inverse of [`days_from_civil`]).
fn civil_from_days(days: i128) -> (i128, i128, i128) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn acc_13_offsets_denote_the_same_instant() {
        let pacific = Timestamp::parse("2002-04-01T13:02:00-08:00").unwrap();
        let utc = Timestamp::parse("2002-04-01T21:02:00Z").unwrap();
        assert_eq!(pacific, utc);
        assert_eq!(
            Timestamp::parse("2002-04-01t21:02:00.000-00:00").unwrap(),
            utc
        );
        assert_ne!(Timestamp::parse("2002-04-01T21:02:00.001Z").unwrap(), utc);
    }

    #[test]
    fn acc_20_written_in_utc_with_the_unknown_offset() {
        let t = Timestamp::parse("2024-03-01T10:05:17.25+01:00").unwrap();
        assert_eq!(t.to_string(), "2024-03-01T09:05:17.250-00:00");
        assert_eq!(
            Timestamp::from_unix_millis(0).to_string(),
            "1970-01-01T00:00:00.000-00:00"
        );
        assert_eq!(
            Timestamp::from_unix_millis(951_782_400_000).to_string(),
            "2000-02-29T00:00:00.000-00:00"
        );
    }

    #[test]
    fn malformed_texts_are_refused() {
        for text in [
            "",
            "2024-03-01",
            "2024-03-01T10:05:17",
            "2024-03-01 10:05:17Z",
            "2024-13-01T10:05:17Z",
            "2023-02-29T10:05:17Z",
            "2024-03-01T24:00:00Z",
            "2024-03-01T10:05:17.Z",
            "2024-03-01T10:05:17+1:00",
            "2024-03-01T10:05:17+01:00x",
            "2024-03-01T10:05:17Zx",
            "２024-03-01T10:05:17Z",
        ] {
            assert!(Timestamp::parse(text).is_err(), "{text:?} parsed");
        }
        assert!(Timestamp::parse("2024-02-29T23:59:60Z").is_ok());
    }

    #[test]
    fn next_milli_differs() {
        let t = Timestamp::from_unix_millis(5);
        assert_eq!(t.next_milli().unix_millis(), 6);
        assert!(t.next_milli() > t);
    }

    proptest! {
        #[test]
        fn writing_then_parsing_is_the_identity(ms in -62_135_596_800_000i64..253_402_300_799_999) {
            let t = Timestamp::from_unix_millis(ms);
            let parsed = Timestamp::parse(&t.to_string()).unwrap();
            prop_assert_eq!(parsed, t);
            prop_assert_eq!(parsed.unix_millis(), ms);
        }
    }
}
