//! Figures from samples: rounding, nearest-rank percentiles, the count/mean/percentile
//! summary every latency in `bench/results.json` is given as, median and worst of a few
//! runs, signed seconds between two instants. Pure functions; no I/O.

use serde::{Deserialize, Serialize};
use std::time::Instant;

pub fn round(value: f64, decimals: i32) -> f64 {
    let factor = 10f64.powi(decimals);
    (value * factor).round() / factor
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], percent: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Count, mean and percentiles of some values (any unit).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Summary {
    pub count: usize,
    /// Absent when there is no value.
    #[serde(flatten)]
    pub figures: Option<Figures>,
}

/// The figures of a [`Summary`] with at least one value.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Figures {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Summary {
    pub fn p50(&self) -> Option<f64> {
        self.figures.as_ref().map(|f| f.p50)
    }

    pub fn p99(&self) -> Option<f64> {
        self.figures.as_ref().map(|f| f.p99)
    }

    pub fn mean(&self) -> Option<f64> {
        self.figures.as_ref().map(|f| f.mean)
    }
}

/// Count, mean and percentiles of `values`, rounded to `decimals`.
pub fn summary(mut values: Vec<f64>, decimals: i32) -> Summary {
    values.sort_by(|a, b| a.total_cmp(b));
    let Some(&max) = values.last() else {
        return Summary {
            count: 0,
            figures: None,
        };
    };
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    Summary {
        count: values.len(),
        figures: Some(Figures {
            mean: round(mean, decimals),
            p50: round(percentile(&values, 50.0), decimals),
            p90: round(percentile(&values, 90.0), decimals),
            p99: round(percentile(&values, 99.0), decimals),
            p999: round(percentile(&values, 99.9), decimals),
            max: round(max, decimals),
        }),
    }
}

/// Median and worst of some seconds.
pub fn median_and_worst(mut values: Vec<f64>) -> (Option<f64>, Option<f64>) {
    values.sort_by(|a, b| a.total_cmp(b));
    if values.is_empty() {
        return (None, None);
    }
    let middle = values.len() / 2;
    let median = if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    };
    (Some(round(median, 3)), values.last().map(|v| round(*v, 3)))
}

/// Seconds from `from` to `to` (negative when `to` came first), rounded to the ms.
pub fn seconds_between(from: Instant, to: Instant) -> f64 {
    let seconds = if to >= from {
        to.duration_since(from).as_secs_f64()
    } else {
        -from.duration_since(to).as_secs_f64()
    };
    round(seconds, 3)
}

/// `value` as text, `null` when absent (how the progress lines show a missing figure).
pub fn or_null<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "null".to_string(), |v| v.to_string())
}
