//! Times and durations as hookctl reads and prints them: RFC 3339 in UTC, and short
//! durations like `90s`, `10m`, `1h`.
//!
//! Pure functions with no clock of their own (the caller passes "now"), so every rule is a
//! table test. It never depends on a time zone database: offsets in input are applied, output
//! is always UTC.

use std::time::{Duration, SystemTime};

use prost_types::Timestamp;

/// Formats a protocol timestamp as RFC 3339 UTC to the second, e.g. `2026-05-01T12:00:00Z`.
pub fn format_timestamp(timestamp: &Timestamp) -> String {
    let days = timestamp.seconds.div_euclid(86_400);
    let second_of_day = timestamp.seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day % 3600 / 60,
        second_of_day % 60
    )
}

/// Formats an optional timestamp; an absent one is an empty string (tables) or `null` (JSON
/// callers check for `None` themselves).
pub fn format_optional(timestamp: Option<&Timestamp>) -> String {
    timestamp.map(format_timestamp).unwrap_or_default()
}

/// Parses a time given on the command line: RFC 3339 (`2026-05-01T12:00:00Z`,
/// `2026-05-01T14:00:00+02:00`, fractions allowed) or a duration before `now` (`2h`).
pub fn parse_time_at(text: &str, now: SystemTime) -> Result<Timestamp, String> {
    if let Ok(ago) = parse_duration(text) {
        let then = now.checked_sub(ago).ok_or_else(|| format!("{text} ago is before 1970"))?;
        return Ok(Timestamp::from(then));
    }
    parse_rfc3339(text).ok_or_else(|| {
        format!("{text:?} is neither an RFC 3339 time like 2026-05-01T12:00:00Z nor a duration ago like 2h")
    })
}

/// [`parse_time_at`] now: the value parser of `--since` and `--until`.
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    parse_time_at(text, SystemTime::now())
}

/// Parses `250ms`, `90s`, `10m`, `1h`, `2d` or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("{text:?} is not a duration like 250ms, 90s, 10m, 1h or 2d");
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| invalid())?;
    let seconds_per_unit = match unit {
        "ms" => return Ok(Duration::from_millis(value)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "" if value == 0 => 0,
        _ => return Err(invalid()),
    };
    value.checked_mul(seconds_per_unit).map(Duration::from_secs).ok_or_else(invalid)
}

/// Formats a duration the way [`parse_duration`] reads it, to the largest whole unit.
pub fn format_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if duration.subsec_nanos() != 0 || seconds == 0 {
        return format!("{}ms", duration.as_millis());
    }
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if seconds.is_multiple_of(size) {
            return format!("{}{unit}", seconds / size);
        }
    }
    format!("{seconds}s")
}

fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    let bytes = text.as_bytes();
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        part.bytes().all(|b| b.is_ascii_digit()).then(|| part.parse().ok())?
    };
    if bytes.len() < 20 || bytes[4] != b'-' || bytes[7] != b'-' || bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    if !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (number(0..4)?, number(5..7)?, number(8..10)?);
    let (hour, minute, second) = (number(11..13)?, number(14..16)?, number(17..19)?);
    // 60 would be a leap second: hookd's clock never shows one, so it is refused as a typo.
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0i32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        // Nanosecond precision at most: further digits are dropped.
        let kept = &fraction[..digits.min(9)];
        nanos = kept.parse::<i32>().ok()? * 10i32.pow(9 - u32::try_from(kept.len()).ok()?);
        rest = &fraction[digits..];
    }
    let offset_seconds = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [h1, h2, m1, m2];
            if !digits.iter().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let value = |tens: u8, ones: u8| i64::from(tens - b'0') * 10 + i64::from(ones - b'0');
            let (hours, minutes) = (value(*h1, *h2), value(*m1, *m2));
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = hours * 3600 + minutes * 60;
            if *sign == b'+' { offset } else { -offset }
        }
        _ => return None,
    };
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds;
    Some(Timestamp { seconds, nanos })
}

fn days_in_month(year: i64, month: i64) -> i64 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's days_from_civil / civil_from_days (proleptic Gregorian calendar), exact
// for every year a timestamp can hold.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp { seconds, nanos: 0 }
    }

    #[test]
    fn formats_utc_to_the_second() {
        let table = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_614_265_330, "2021-02-25T15:02:10Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
            (-1, "1969-12-31T23:59:59Z"),
        ];
        for (seconds, text) in table {
            assert_eq!(format_timestamp(&at(seconds)), text, "{seconds}");
            assert_eq!(parse_rfc3339(text), Some(at(seconds)), "{text}");
        }
    }

    #[test]
    fn parses_offsets_fractions_and_durations_ago() {
        let now = UNIX_EPOCH + Duration::from_secs(1_614_265_330);
        let table = [
            ("2021-02-25T15:02:10Z", Some(at(1_614_265_330))),
            ("2021-02-25t15:02:10z", Some(at(1_614_265_330))),
            ("2021-02-25 17:02:10+02:00", Some(at(1_614_265_330))),
            ("2021-02-25T10:02:10-05:00", Some(at(1_614_265_330))),
            ("2021-02-25T15:02:10.25Z", Some(Timestamp { seconds: 1_614_265_330, nanos: 250_000_000 })),
            ("1h", Some(at(1_614_265_330 - 3600))),
            ("0", Some(at(1_614_265_330))),
            ("2021-02-29T00:00:00Z", None),
            ("2021-02-25T24:00:00Z", None),
            ("2021-02-25T15:02:10", None),
            ("2021-02-25T15:02:10.Z", None),
            ("2021-02-25T15:02:10+2:00", None),
            ("yesterday", None),
            ("", None),
        ];
        for (text, expected) in table {
            assert_eq!(parse_time_at(text, now).ok(), expected, "{text:?}");
        }
    }

    #[test]
    fn durations_read_and_print_alike() {
        let table = [
            ("250ms", Some(Duration::from_millis(250))),
            ("90s", Some(Duration::from_secs(90))),
            ("10m", Some(Duration::from_secs(600))),
            ("1h", Some(Duration::from_secs(3600))),
            ("2d", Some(Duration::from_secs(172_800))),
            ("0", Some(Duration::ZERO)),
            ("5", None),
            ("1.5h", None),
            ("h", None),
            ("-1s", None),
        ];
        for (text, expected) in table {
            assert_eq!(parse_duration(text).ok(), expected, "{text:?}");
            if let Some(duration) = expected.filter(|d| !d.is_zero()) {
                assert_eq!(format_duration(duration), text);
            }
        }
    }
}
