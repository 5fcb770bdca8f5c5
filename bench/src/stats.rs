//! Latency samples and their percentiles, and the median of repeated reports.

use std::time::Duration;

use serde_json::Value;

/// Collected durations.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn push(&mut self, sample: Duration) {
        self.0.push(sample);
    }

    /// The `q`-quantile (0..=1) in milliseconds; 0 with no samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let mut sorted = self.0.clone();
        sorted.sort_unstable();
        let index = ((sorted.len() - 1) as f64 * q).round() as usize;
        sorted[index].as_secs_f64() * 1000.0
    }

    pub fn p50(&self) -> f64 {
        self.quantile_ms(0.50)
    }

    pub fn p99(&self) -> f64 {
        self.quantile_ms(0.99)
    }
}

/// Rounds for display and JSON: three significant decimals are plenty.
pub fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// The report whose every number is the median of that number across `reports` (the mean
/// of the middle two for an even count); anything else is taken from the first report.
/// Arrays are taken element by element, objects key by key.
pub fn median_of(reports: &[Value]) -> Value {
    let Some(first) = reports.first() else { return Value::Null };
    match first {
        Value::Number(_) => {
            let mut numbers: Vec<f64> = reports.iter().filter_map(Value::as_f64).collect();
            numbers.sort_by(f64::total_cmp);
            let middle = numbers.len() / 2;
            let median =
                if numbers.len() % 2 == 1 { numbers[middle] } else { (numbers[middle - 1] + numbers[middle]) / 2.0 };
            if reports.iter().all(Value::is_u64) {
                // Counts stay whole numbers.
                serde_json::json!(median.round() as u64)
            } else {
                serde_json::json!(round(median))
            }
        }
        Value::Object(fields) => Value::Object(
            fields
                .keys()
                .map(|key| {
                    let at: Vec<Value> = reports.iter().filter_map(|report| report.get(key).cloned()).collect();
                    (key.clone(), median_of(&at))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            (0..items.len())
                .map(|index| {
                    let at: Vec<Value> = reports.iter().filter_map(|report| report.get(index).cloned()).collect();
                    median_of(&at)
                })
                .collect(),
        ),
        _ => first.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_report_takes_each_number_across_rounds() {
        let rounds = [
            serde_json::json!({ "a": 1.0, "cases": [{ "x": 10 }], "plan": "full", "b": { "c": 5 } }),
            serde_json::json!({ "a": 3.0, "cases": [{ "x": 30 }], "plan": "full", "b": { "c": 1 } }),
            serde_json::json!({ "a": 2.0, "cases": [{ "x": 20 }], "plan": "full", "b": { "c": 9 } }),
        ];
        let median = median_of(&rounds);
        // Counts stay whole numbers.
        assert_eq!(median, serde_json::json!({ "a": 2.0, "cases": [{ "x": 20 }], "plan": "full", "b": { "c": 5 } }));
        assert_eq!(median_of(&rounds[..2])["a"], serde_json::json!(2.0), "the mean of the middle two");
        assert_eq!(median_of(&rounds[..1]), rounds[0], "one round is reported as it is");
    }

    #[test]
    fn quantiles() {
        let mut samples = Samples::default();
        for ms in 1..=100 {
            samples.push(Duration::from_millis(ms));
        }
        assert_eq!(samples.p50().round(), 51.0);
        assert_eq!(samples.p99().round(), 99.0);
        assert_eq!(Samples::default().p99(), 0.0);
    }
}
