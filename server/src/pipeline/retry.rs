//! The retry policy: when the next attempt of a failed delivery is due, if ever.
//!
//! Pure functions of the schedule, the attempt number, the answer and a jitter value, so
//! every rule is a table test. Nothing here reads the clock or a random source.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Spread of the jitter around each scheduled delay (±20 %).
const JITTER: f64 = 0.2;

/// Delays after each failed attempt: `1s,1s,2s` allows at most 4 attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl RetrySchedule {
    /// The default: from seconds to hours over about a day and a half.
    pub fn standard() -> Self {
        "5s,5m,30m,2h,5h,10h,10h".parse().expect("the default schedule parses")
    }

    /// Attempts allowed in all (the first one plus one per delay).
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX).saturating_add(1)
    }

    /// The longest delay of the schedule.
    pub fn max_delay(&self) -> Duration {
        self.0.iter().copied().max().unwrap_or(Duration::from_secs(1))
    }

    /// The first delay (the shortest back-off unit of this schedule).
    pub fn first_delay(&self) -> Duration {
        self.0.first().copied().unwrap_or(Duration::from_secs(1))
    }

    /// The delay before the attempt after `failed_attempt` (1-based), or `None` when that was
    /// the last one. `jitter` in [-1, 1] spreads the delay by ±20 %. A `retry_after` asked by
    /// the listener (429/503) is honoured within [scheduled, 2 × scheduled], without jitter.
    pub fn delay_after(&self, failed_attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Option<Duration> {
        let index = usize::try_from(failed_attempt.checked_sub(1)?).ok()?;
        let scheduled = *self.0.get(index)?;
        Some(match retry_after {
            Some(asked) => asked.clamp(scheduled, scheduled.saturating_mul(2)),
            None => scheduled.mul_f64(1.0 + JITTER * jitter.clamp(-1.0, 1.0)),
        })
    }
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self::standard()
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|d| format_duration(*d)).collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for RetrySchedule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let delays = text.split(',').map(|part| parse_duration(part.trim())).collect::<Result<Vec<_>, _>>()?;
        if delays.len() > 100 {
            return Err("a retry schedule has at most 100 delays".into());
        }
        Ok(Self(delays))
    }
}

/// Parses `250ms`, `5s`, `5m`, `2h` or `5d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration like 250ms, 5s, 5m, 2h or 5d"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?} needs a unit: ms, s, m, h or d")),
    };
    value.checked_mul(unit_ms).map(Duration::from_millis).ok_or_else(|| format!("{text:?} is too long"))
}

/// `5d`, `2h`, `250ms`: the largest whole unit.
pub fn format_duration(duration: Duration) -> String {
    let ms = duration.as_millis();
    for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// Whether an HTTP status counts as delivered: 2xx only (a redirect is a failure).
pub fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// Whether the listener's `Retry-After` is to be honoured for this status.
pub fn honours_retry_after(status: u16) -> bool {
    matches!(status, 429 | 503)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn durations_parse() {
        let cases = [("250ms", 250), ("5s", 5_000), ("5m", 300_000), ("2h", 7_200_000), ("5d", 432_000_000)];
        for (text, ms) in cases {
            assert_eq!(parse_duration(text), Ok(Duration::from_millis(ms)), "{text}");
        }
        for bad in ["", "5", "s", "5x", "-1s", "1.5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_schedule() {
        let schedule = RetrySchedule::standard();
        assert_eq!(schedule.max_attempts(), 8);
        assert_eq!(schedule.to_string(), "5s,5m,30m,2h,5h,10h,10h");
        let total: Duration = (1..8).map(|n| schedule.delay_after(n, None, 0.0).unwrap()).sum();
        assert_eq!(total, Duration::from_secs(5 + 300 + 1800 + 7200 + 18000 + 36000 + 36000), "about a day and a half");
    }

    #[test]
    fn delays_follow_the_schedule_then_stop() {
        let schedule: RetrySchedule = "1s,1s,2s".parse().unwrap();
        assert_eq!(schedule.max_attempts(), 4);
        let table = [(1, Some(secs(1))), (2, Some(secs(1))), (3, Some(secs(2))), (4, None), (0, None)];
        for (failed, expected) in table {
            assert_eq!(schedule.delay_after(failed, None, 0.0), expected, "after attempt {failed}");
        }
    }

    #[test]
    fn jitter_spreads_by_twenty_percent() {
        let schedule: RetrySchedule = "10s".parse().unwrap();
        let table = [(-1.0, 8_000), (-0.5, 9_000), (0.0, 10_000), (0.5, 11_000), (1.0, 12_000), (7.0, 12_000)];
        for (jitter, ms) in table {
            assert_eq!(schedule.delay_after(1, None, jitter), Some(Duration::from_millis(ms)), "jitter {jitter}");
        }
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let schedule: RetrySchedule = "10s".parse().unwrap();
        let table = [(secs(1), secs(10)), (secs(15), secs(15)), (secs(20), secs(20)), (secs(3600), secs(20))];
        for (asked, expected) in table {
            assert_eq!(schedule.delay_after(1, Some(asked), 0.9), Some(expected), "asked {asked:?}");
        }
        assert_eq!(schedule.delay_after(2, Some(secs(5)), 0.0), None, "never beyond the last attempt");
    }

    #[test]
    fn statuses() {
        for (status, success) in
            [(200, true), (204, true), (299, true), (301, false), (302, false), (404, false), (500, false)]
        {
            assert_eq!(is_success(status), success, "{status}");
        }
        assert!(honours_retry_after(429) && honours_retry_after(503) && !honours_retry_after(500));
    }

    #[test]
    fn bad_schedules_are_refused() {
        for bad in ["", "1s,,2s", "1s,x", "fast"] {
            assert!(bad.parse::<RetrySchedule>().is_err(), "{bad:?}");
        }
    }
}
