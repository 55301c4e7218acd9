//! A log-scale latency histogram in fixed memory, shared by the pipeline's counters, the sinks'
//! delivery counters and the metrics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::clock::Nanos;

/// A log-scale latency histogram with about 2% relative resolution, from 1 µs to ~400 s, in
/// fixed memory.
#[derive(Debug)]
pub struct Histogram {
    /// Counts per bucket; bucket `i` holds values around `1.02^i` microseconds.
    buckets: Vec<AtomicU64>,
    /// Sum of every value recorded, nanoseconds.
    sum_nanos: AtomicU64,
    /// Largest value recorded, nanoseconds (quantiles never report more).
    max_nanos: AtomicU64,
}

const BUCKETS: usize = 1000;
const GROWTH: f64 = 1.02;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
            max_nanos: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one value.
    pub fn record(&self, n: Nanos) {
        let us = (n as f64 / 1e3).max(1.0);
        let i = ((us.ln() / GROWTH.ln()) as usize).min(BUCKETS - 1);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(n, Relaxed);
        self.max_nanos.fetch_max(n, Relaxed);
    }

    /// Sum of every value recorded, seconds.
    pub fn sum_s(&self) -> f64 {
        self.sum_nanos.load(Relaxed) as f64 / 1e9
    }

    /// Cumulative counts at each upper bound (seconds, ascending): how many values were at most
    /// that bound, to the histogram's 2% resolution (a bucket counts below a bound when its lower
    /// edge is). For Prometheus histograms.
    pub fn cumulative(&self, bounds_s: &[f64]) -> Vec<(f64, u64)> {
        let mut out = Vec::with_capacity(bounds_s.len());
        let mut seen = 0;
        let mut i = 0;
        for &b in bounds_s {
            let limit_us = b * 1e6;
            while i < BUCKETS && GROWTH.powi(i as i32) <= limit_us {
                seen += self.buckets[i].load(Relaxed);
                i += 1;
            }
            out.push((b, seen));
        }
        out
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The `q`-quantile (0..=1) in milliseconds (bucket midpoint, but never above the largest
    /// value recorded), or `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= rank {
                let lo = GROWTH.powi(i as i32);
                let max_ms = self.max_nanos.load(Relaxed) as f64 / 1e6;
                return Some((lo * (1.0 + GROWTH) / 2.0 / 1e3).min(max_ms));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_within_resolution() {
        let h = Histogram::default();
        for ms in 1..=100u64 {
            h.record(ms * 1_000_000);
        }
        assert!((h.sum_s() - 5.05).abs() < 1e-9);
        assert_eq!(
            h.quantile_ms(1.0),
            Some(100.0),
            "never above the largest value"
        );
        let c = h.cumulative(&[0.0105, 0.05, 1.0]);
        assert_eq!(c, vec![(0.0105, 10), (0.05, 50), (1.0, 100)]);
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((p50 - 50.0).abs() / 50.0 < 0.03, "{p50}");
        assert!((p99 - 99.0).abs() / 99.0 < 0.03, "{p99}");
        assert_eq!(h.count(), 100);
        assert_eq!(Histogram::default().quantile_ms(0.5), None);
    }
}
