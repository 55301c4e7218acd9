//! Demand estimation: each flow's arrival rate over sliding windows, and how bursty it is.
//!
//! The estimator is fed the flow's cumulative count of arrived frames (every frame its sources
//! handed to poolpipe, whatever happened to it after) at a steady sampling interval, and keeps
//! the samples of the last [`HORIZON`]. From them:
//!
//! - the **rate** over a window: frames that arrived in it / its length;
//! - the **index of dispersion** over a window: variance / mean of the counts per sampling
//!   interval. A Poisson process has 1; a steady camera (one frame per interval, or a fixed
//!   number) has about 0; bursts (streams that pause and resume, frames released in clumps)
//!   give more than 1. Batching and re-planning read it as the burstiness of the demand.
//!
//! Pure state driven by the times passed in: tests and the simulator drive it like the runtime.

use std::collections::VecDeque;

use crate::clock::Nanos;

/// How far back samples are kept: the longest window.
pub const HORIZON: Nanos = 60_000_000_000;

/// The windows reported, in seconds.
pub const WINDOWS_S: [u64; 3] = [1, 10, 60];

/// One flow's arrivals.
#[derive(Debug, Clone, Default)]
pub struct Demand {
    /// `(time, cumulative arrivals)`, oldest first.
    samples: VecDeque<(Nanos, u64)>,
}

impl Demand {
    /// Records the cumulative count `total` at `now` (times must not go back). A count that
    /// went down (a stream moved to another flow) starts the estimate over.
    pub fn observe(&mut self, now: Nanos, total: u64) {
        if let Some((t, n)) = self.samples.back() {
            if now <= *t {
                return;
            }
            if total < *n {
                self.samples.clear();
            }
        }
        self.samples.push_back((now, total));
        // Keep one sample at or before the horizon, so that a full window has a start.
        while self.samples.len() > 2 && now - self.samples[1].0 >= HORIZON {
            self.samples.pop_front();
        }
    }

    /// The samples that span the last `window` (the first at or before its start, when there
    /// is one).
    fn span(&self, window: Nanos) -> impl Iterator<Item = &(Nanos, u64)> {
        let now = self.samples.back().map_or(0, |s| s.0);
        let start = now.saturating_sub(window);
        let first = self
            .samples
            .iter()
            .rposition(|(t, _)| *t <= start)
            .unwrap_or(0);
        self.samples.iter().skip(first)
    }

    /// Arrivals per second over the last `window` (over what has been observed when that is
    /// shorter); None before two samples.
    pub fn rate(&self, window: Nanos) -> Option<f64> {
        let mut s = self.span(window);
        let (t0, n0) = *s.next()?;
        let (t1, n1) = *self.samples.back()?;
        (t1 > t0).then(|| (n1 - n0) as f64 / ((t1 - t0) as f64 / 1e9))
    }

    /// Index of dispersion (variance / mean) of the arrivals per sampling interval over the last
    /// `window`; None with fewer than 5 intervals or no arrivals.
    pub fn dispersion(&self, window: Nanos) -> Option<f64> {
        let counts: Vec<f64> = self
            .span(window)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| (w[1].1 - w[0].1) as f64)
            .collect();
        if counts.len() < 5 {
            return None;
        }
        let n = counts.len() as f64;
        let mean = counts.iter().sum::<f64>() / n;
        if mean <= 0.0 {
            return None;
        }
        let var = counts.iter().map(|c| (c - mean).powi(2)).sum::<f64>() / (n - 1.0);
        Some(var / mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::arrivals::Rng;

    const MS: Nanos = 1_000_000;

    /// Feeds arrival times, sampled every 100 ms for `seconds`.
    fn feed(arrivals: &[Nanos], seconds: u64) -> Demand {
        let mut d = Demand::default();
        let mut i = 0;
        for k in 0..=(seconds * 10) {
            let now = k * 100 * MS;
            while i < arrivals.len() && arrivals[i] <= now {
                i += 1;
            }
            d.observe(now, i as u64);
        }
        d
    }

    fn poisson(rate: f64, seconds: u64, seed: u64) -> Vec<Nanos> {
        let mut rng = Rng(seed);
        let mut t = 0;
        let mut out = Vec::new();
        while t < seconds * 1_000 * MS {
            t += rng.exp(rate / 1e9);
            out.push(t);
        }
        out
    }

    #[test]
    fn a_poisson_stream_has_its_rate_and_a_dispersion_near_one() {
        let d = feed(&poisson(50.0, 60, 1), 60);
        let r = d.rate(10_000 * MS).unwrap();
        assert!((r - 50.0).abs() < 50.0 * 0.1, "{r}");
        let r60 = d.rate(60_000 * MS).unwrap();
        assert!((r60 - 50.0).abs() < 50.0 * 0.05, "{r60}");
        let iod = d.dispersion(60_000 * MS).unwrap();
        assert!((0.8..1.2).contains(&iod), "{iod}");
    }

    #[test]
    fn a_steady_camera_has_no_dispersion_and_bursts_have_much() {
        // 20 fps, evenly spaced: two frames per 100 ms interval.
        let steady: Vec<Nanos> = (0..1200).map(|i| i * 50 * MS + MS).collect();
        let d = feed(&steady, 60);
        assert!((d.rate(10_000 * MS).unwrap() - 20.0).abs() < 0.5);
        assert!(d.dispersion(10_000 * MS).unwrap() < 0.05);
        // The same mean in bursts: 1 s on at 40 fps, 1 s off.
        let bursty: Vec<Nanos> = (0..1200)
            .map(|i| (i / 40) * 2_000 * MS + (i % 40) * 25 * MS + MS)
            .collect();
        let b = feed(&bursty, 60);
        assert!((b.rate(60_000 * MS).unwrap() - 20.0).abs() < 1.0);
        // Half the intervals hold 4 frames, half none: variance 4, mean 2.
        let iod = b.dispersion(10_000 * MS).unwrap();
        assert!((iod - 2.0).abs() < 0.1, "{iod}");
    }

    #[test]
    fn windows_follow_a_change_of_demand_and_old_samples_go() {
        // 10/s for 60 s, then 40/s for 5 s.
        let mut a: Vec<Nanos> = (0..600).map(|i| i * 100 * MS + MS).collect();
        a.extend((0..200).map(|i| 60_000 * MS + i * 25 * MS + MS));
        let d = feed(&a, 65);
        let r1 = d.rate(1_000 * MS).unwrap();
        let r60 = d.rate(60_000 * MS).unwrap();
        assert!((r1 - 40.0).abs() < 2.0, "{r1}");
        assert!((r60 - 12.5).abs() < 1.0, "{r60}");
        assert!(d.samples.len() <= 602, "bounded: {}", d.samples.len());
        assert!(Demand::default().rate(1_000 * MS).is_none());
        let mut moved = d.clone();
        moved.observe(66_000 * MS, 10);
        moved.observe(67_000 * MS, 30);
        assert_eq!(
            moved.rate(1_000 * MS),
            Some(20.0),
            "a count that went down starts over"
        );
        assert!(Demand::default().dispersion(1_000 * MS).is_none());
    }
}
