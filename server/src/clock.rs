//! Wall-clock time in the forms the store and the API use. Nothing else reads the clock.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// A protobuf timestamp from milliseconds since the epoch.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).expect("under a second of nanoseconds fits i32"),
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The civil date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = u32::try_from(day_of_year - (153 * month_index + 2) / 5 + 1).expect("1 to 31");
    let month = u32::try_from(if month_index < 10 { month_index + 3 } else { month_index - 9 }).expect("1 to 12");
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

/// Milliseconds since the epoch as RFC 3339 in UTC, to the second: `2026-12-06T20:51:14Z`.
pub fn rfc3339(ms: u64) -> String {
    let seconds = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    let (days, in_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", in_day / 3600, in_day % 3600 / 60, in_day % 60)
}

/// Parses `YYYY-MM-DDTHH:MM[:SS[.fraction]][Z]` (a UTC time, as an HTML datetime-local field
/// or RFC 3339 gives it) into milliseconds since the epoch.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let text = text.trim().trim_end_matches('Z');
    let (date, time) = text.split_once(['T', ' '])?;
    let mut date = date.split('-');
    // Years a page can mean: the arithmetic below stays far from overflow.
    let year: i64 = date.next()?.parse().ok().filter(|y| (1970..=9999).contains(y))?;
    let month: u32 = date.next()?.parse().ok().filter(|m| (1..=12).contains(m))?;
    let day: u32 = date.next()?.parse().ok().filter(|d| (1..=31).contains(d))?;
    let mut time = time.split(':');
    let hour: i64 = time.next()?.parse().ok().filter(|h| (0..24).contains(h))?;
    let minute: i64 = time.next()?.parse().ok().filter(|m| (0..60).contains(m))?;
    let second: f64 = time.next().map_or(Some(0.0), |s| s.parse().ok())?;
    if !(0.0..61.0).contains(&second) || date.next().is_some() {
        return None;
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60;
    let ms = seconds.checked_mul(1000)? + (second * 1000.0) as i64;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_and_parse_as_rfc3339_in_utc() {
        let table = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400_000, "2000-02-29T00:00:00Z"),
            (1_614_265_330_000, "2021-02-25T15:02:10Z"),
            (1_796_590_274_000, "2026-12-06T20:51:14Z"),
        ];
        for (ms, text) in table {
            assert_eq!(rfc3339(ms), text);
            assert_eq!(parse_rfc3339(text), Some(ms), "{text}");
        }
        assert_eq!(parse_rfc3339("2026-12-06T20:51"), Some(1_796_590_260_000), "a datetime-local field");
        assert_eq!(parse_rfc3339("2026-12-06T20:51:14.5Z"), Some(1_796_590_274_500));
        let huge = "9223372036854775807-01-01T00:00";
        for bad in ["", "yesterday", "2026-13-01T00:00", "2026-12-06", "2026-12-06T25:00", "1969-12-31T23:59", huge] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
