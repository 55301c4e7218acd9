//! Analytic batching for `fixed` stages: the batch size and wait that serve an arrival process
//! within the SLO, from the stage's latency profile (BATCH, SC '20: model batch formation and
//! service as a queue rather than search by trial).
//!
//! The model, for a stage of `n` workers with batch latency `l(b)`, arrivals at rate `λ` with
//! index of dispersion `D` (1 for Poisson), and a policy that dispatches at `b` frames or `w`
//! after the first:
//!
//! - **formation**: `b` frames take `(b - 1) / λ` to gather after the first; with
//!   `w` shorter than that a batch leaves on its timeout with `b_e = 1 + λ w` frames on average.
//!   The first frame of a batch waits `min(w, (b - 1) / λ)`.
//! - **service**: `s = l(b_e)` (interpolated between profiled sizes); utilisation
//!   `ρ = λ s / (n b_e)`.
//! - **queueing** of batches for the `n` workers (Allen–Cunneen for G/D/n): a batch waits with
//!   probability `C` (Erlang C at `n ρ`), then on average `s / (n (1 - ρ)) x ca² / 2`, where
//!   `ca² = D / b_e` is the variability of batch inter-arrivals (gathering `b_e` arrivals smooths
//!   them). The wait's tail is taken as exponential: its 99th percentile is
//!   `mean_if_waiting x ln(C / 0.01)` (0 when `C <= 0.01`).
//! - **a frame's p99**: formation + queueing p99 + `s`.
//!
//! A choice is feasible when `ρ < 1` and the predicted p99 fits the SLO; among feasible choices
//! the one with the most slack is taken (they all serve `λ`; slack absorbs what the model does
//! not see). When none is feasible (overload), the queues stay full: a frame waits for the
//! stage's queue ahead of it, drained at the pool's rate at batch `b`, then for the batches in its
//! worker's channel, then runs; the batch with the largest rate whose frames still make their
//! deadline that way is taken. When no batch does (the queue alone outlasts the SLO, and frames
//! past their deadline are dropped from it), the largest rate among the batches that leave room
//! for one more ahead of them. Under overload the wait is long enough to fill batches (queued
//! frames fill them at once; a short wait would only send small ones). Pure arithmetic over
//! `max_batch x 6` candidates.

use serde::Serialize;

use super::driver::{Knob, WORKER_QUEUE};
use crate::clock::Nanos;

/// What the chooser knows of a stage and its demand.
#[derive(Debug, Clone)]
pub struct Demand<'a> {
    /// Batch latency at sizes 1, 2, ... (nanoseconds).
    pub latency: &'a [Nanos],
    /// Workers.
    pub workers: usize,
    /// Arrivals per second.
    pub rate: f64,
    /// Index of dispersion of arrivals (1: Poisson).
    pub dispersion: f64,
    /// Latency budget of a frame at this stage.
    pub slo: Nanos,
    /// Frames the stage's queue holds (what waits ahead of a frame under overload).
    pub queue: usize,
}

/// The chosen batch size and wait, with what the model predicts of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Choice {
    /// Largest batch.
    pub max_batch: usize,
    /// Longest wait of a batch's first frame, ns.
    pub max_wait: Nanos,
    /// Mean batch size the wait leads to.
    pub mean_batch: f64,
    /// Workers' utilisation.
    pub utilisation: f64,
    /// Predicted 99th-percentile latency of a frame, ns.
    pub p99: Nanos,
    /// Whether the demand fits within the SLO (else: overload, the largest capacity).
    pub feasible: bool,
}

/// Latency at a fractional batch size, interpolated between profiled sizes.
fn service(latency: &[Nanos], b: f64) -> f64 {
    let b = b.clamp(1.0, latency.len() as f64);
    let lo = b.floor() as usize;
    let hi = b.ceil() as usize;
    let f = b - lo as f64;
    latency[lo - 1] as f64 * (1.0 - f) + latency[hi - 1] as f64 * f
}

/// Erlang C: the probability that an arrival waits, `n` servers at utilisation `rho`.
fn erlang_c(n: usize, rho: f64) -> f64 {
    let a = n as f64 * rho;
    // Erlang B by its recurrence, then C from B.
    let mut b = 1.0;
    for k in 1..=n {
        b = a * b / (k as f64 + a * b);
    }
    let c = b / (1.0 - rho + rho * b);
    c.clamp(0.0, 1.0)
}

/// The prediction for batch size `b` and wait `w` (None: unstable).
fn predict(d: &Demand<'_>, b: usize, w: f64) -> Option<(f64, f64, f64)> {
    let lambda = d.rate / 1e9; // per ns
    let fill = (b as f64 - 1.0) / lambda;
    let (be, formation) = if w >= fill {
        (b as f64, fill)
    } else {
        ((1.0 + lambda * w).min(b as f64), w)
    };
    let s = service(d.latency, be);
    let n = d.workers.max(1) as f64;
    let rho = lambda * s / (n * be);
    if rho >= 1.0 {
        return None;
    }
    let c = erlang_c(d.workers.max(1), rho);
    let ca2 = d.dispersion.max(0.0) / be;
    let mean_if_waiting = s / (n * (1.0 - rho)) * (ca2 / 2.0).max(0.05);
    let q99 = if c > 0.01 {
        mean_if_waiting * (c / 0.01).ln()
    } else {
        0.0
    };
    Some((formation + q99 + s, be, rho))
}

/// The feasible choice with the most slack at the demand's rate, if any.
fn best_at(d: &Demand<'_>) -> Option<Choice> {
    let slo = d.slo as f64;
    let lambda = d.rate.max(1e-9) / 1e9;
    let mut best: Option<(f64, Choice)> = None;
    for b in 1..=d.latency.len() {
        let fill = (b as f64 - 1.0) / lambda;
        for k in [0.0, 0.25, 0.5, 1.0, 1.5, 2.0] {
            let w = (fill * k).min(slo);
            let Some((p99, be, rho)) = predict(d, b, w) else {
                continue;
            };
            if p99 > slo {
                continue;
            }
            let slack = slo - p99;
            if best.as_ref().is_none_or(|(s, _)| slack > *s) {
                best = Some((
                    slack,
                    Choice {
                        max_batch: b,
                        max_wait: w as Nanos,
                        mean_batch: be,
                        utilisation: rho,
                        p99: p99 as Nanos,
                        feasible: true,
                    },
                ));
            }
        }
    }
    best.map(|(_, c)| c)
}

/// The batch size and wait for this demand.
pub fn choose(d: &Demand<'_>) -> Choice {
    if let Some(c) = best_at(d) {
        return c;
    }
    // Overload: no choice serves the whole rate within the SLO. The queues then stay full: a
    // frame waits for the stage's queue ahead of it (drained at the pool's rate at batch `b`),
    // then for the batches in its worker's channel, then runs. The largest rate whose frames
    // still make their deadline that way; batches fill before any wait, so the wait only needs
    // to be long enough not to send small batches.
    let slo = d.slo as f64;
    let n = d.workers.max(1) as f64;
    let through = |b: usize| {
        let s = d.latency[b - 1] as f64;
        let rate = n * b as f64 / s;
        let delay = d.queue as f64 / rate + (WORKER_QUEUE as f64 + 1.0) * s;
        (rate, delay, s)
    };
    let fits: Vec<usize> = (1..=d.latency.len())
        .filter(|b| through(*b).1 <= slo)
        .collect();
    // When no queue fits (frames past their deadline are then dropped from the queue rather
    // than served late), the largest rate among the batches that leave room for one more ahead
    // of them within the SLO.
    let b = if fits.is_empty() {
        (1..=d.latency.len())
            .filter(|b| 2.0 * through(*b).2 <= slo)
            .max_by(|x, y| through(*x).0.total_cmp(&through(*y).0))
            .unwrap_or(1)
    } else {
        fits.into_iter()
            .max_by(|x, y| through(*x).0.total_cmp(&through(*y).0))
            .unwrap_or(1)
    };
    let (_, delay, s) = through(b);
    let lambda = d.rate.max(1e-9) / 1e9;
    // Queued frames fill a batch at once; the wait only covers a lull, and a short one would
    // send small batches (less throughput when throughput is what is short).
    let w = (2.0 * (b as f64 - 1.0) / lambda).min(slo / 2.0);
    Choice {
        max_batch: b,
        max_wait: w as Nanos,
        mean_batch: b as f64,
        utilisation: 1.0,
        p99: (delay + w).max(s) as Nanos,
        feasible: false,
    }
}

/// What a tuned stage chose last, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tuned {
    /// The choice.
    pub choice: Choice,
    /// Frames/s reaching the stage (its flow's rate over 10 s times its share of the flow).
    pub rate: f64,
    /// Index of dispersion of the flow's arrivals.
    pub dispersion: f64,
    /// The stage's latency budget (the flow's SLO less the rest of its route), ms.
    pub budget_ms: f64,
    /// The choice in words.
    pub why: String,
}

/// A `fixed` stage whose batch size and/or wait are chosen while running (`max_batch = "auto"`,
/// `max_wait_ms = "auto"`): each look re-computes the choice from the measured demand and sets
/// the policy's [`Knob`] when it changed. A limit that is not `auto` keeps its written value.
#[derive(Debug)]
pub struct Tuner {
    /// Where the stage's policy reads its limits.
    pub knob: std::sync::Arc<Knob>,
    latency: Vec<Nanos>,
    workers: usize,
    queue: usize,
    /// Latency of the rest of the route, subtracted from the flow's SLO.
    rest: Nanos,
    /// Share of the flow's frames that reach the stage.
    share: f64,
    /// Which limits are chosen.
    auto: (bool, bool),
    /// The written limits.
    written: (usize, Nanos),
    last: std::sync::Mutex<Option<Tuned>>,
    changes: std::sync::atomic::AtomicU64,
}

impl Tuner {
    /// A tuner for a stage with batch latencies `latency` (sizes 1, 2, ...), `workers`,
    /// a queue of `queue` frames, `rest` of latency after it on its route, taking `share` of
    /// its flow's frames; `auto` = (batch, wait) chosen; `written` = the limits as written.
    pub fn new(
        latency: Vec<Nanos>,
        workers: usize,
        queue: usize,
        rest: Nanos,
        share: f64,
        auto: (bool, bool),
        written: (usize, Nanos),
    ) -> Tuner {
        Tuner {
            knob: std::sync::Arc::new(Knob::new(written.0.max(1), written.1)),
            latency,
            workers: workers.max(1),
            queue,
            rest,
            share,
            auto,
            written,
            last: std::sync::Mutex::new(None),
            changes: 0.into(),
        }
    }

    /// Re-computes the choice for the flow's measured `rate` and `dispersion` under `slo`.
    /// Returns the new choice when the limits changed. Nothing happens before a rate is known.
    pub fn retune(&self, rate: Option<f64>, dispersion: Option<f64>, slo: Nanos) -> Option<Tuned> {
        let rate = rate? * self.share;
        let dispersion = dispersion.unwrap_or(1.0).max(0.0);
        let budget = slo.saturating_sub(self.rest);
        let choice = choose(&Demand {
            latency: &self.latency,
            workers: self.workers,
            rate: rate.max(1e-3),
            dispersion,
            slo: budget,
            queue: self.queue,
        });
        let batch = if self.auto.0 {
            choice.max_batch
        } else {
            self.written.0
        };
        let wait = if self.auto.1 {
            choice.max_wait
        } else {
            self.written.1
        };
        let ms = |n: Nanos| n as f64 / 1e6;
        let why = if choice.feasible {
            format!(
                "{rate:.1} frames/s (dispersion {dispersion:.2}) on {} worker(s): batches of up to {} after at most {:.1} ms give {:.1} frames per batch, {:.0}% busy, p99 {:.1} ms of a {:.1} ms budget",
                self.workers,
                choice.max_batch,
                ms(choice.max_wait),
                choice.mean_batch,
                choice.utilisation * 100.0,
                ms(choice.p99),
                ms(budget)
            )
        } else {
            format!(
                "{rate:.1} frames/s (dispersion {dispersion:.2}) is more than {} worker(s) serve within the {:.1} ms budget: batches of {} for the largest rate that still meets deadlines",
                self.workers,
                ms(budget),
                choice.max_batch
            )
        };
        let tuned = Tuned {
            choice,
            rate,
            dispersion,
            budget_ms: ms(budget),
            why,
        };
        let changed = self.knob.get() != (batch, wait);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(tuned.clone());
        if changed {
            self.knob.set(batch, wait);
            self.changes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(tuned)
        } else {
            None
        }
    }

    /// The last choice with the limits in force and how often they changed, for `/status`.
    pub fn report(&self) -> serde_json::Value {
        let (batch, wait) = self.knob.get();
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        serde_json::json!({
            "max_batch": batch,
            "max_wait_ms": wait as f64 / 1e6,
            "auto": {"max_batch": self.auto.0, "max_wait_ms": self.auto.1},
            "changes": self.changes.load(std::sync::atomic::Ordering::Relaxed),
            "last": last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Nanos = 1_000_000;

    /// 10 ms + 2 ms per extra frame: batching pays.
    fn lat() -> Vec<Nanos> {
        (1..=8)
            .map(|b| 10 * MS + 2 * MS * (b as Nanos - 1))
            .collect()
    }

    #[test]
    fn erlang_c_matches_known_values() {
        assert!((erlang_c(1, 0.5) - 0.5).abs() < 1e-9, "M/M/1: rho");
        // 2 servers at 0.5: C = 1/3.
        assert!((erlang_c(2, 0.5) - 1.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn light_load_runs_small_batches_and_heavy_load_large_ones() {
        let l = lat();
        let light = choose(&Demand {
            latency: &l,
            workers: 1,
            rate: 20.0,
            dispersion: 1.0,
            slo: 100 * MS,
            queue: 8,
        });
        assert!(light.feasible && light.max_batch <= 2, "{light:?}");
        // 250/s needs batches: batch 1 serves 100/s, 8 frames in 24 ms 333/s.
        let heavy = choose(&Demand {
            latency: &l,
            workers: 1,
            rate: 250.0,
            dispersion: 1.0,
            slo: 100 * MS,
            queue: 8,
        });
        assert!(heavy.feasible && heavy.mean_batch > 5.0, "{heavy:?}");
        assert!(heavy.p99 <= 100 * MS);
    }

    #[test]
    fn overload_takes_the_largest_rate_whose_frames_still_make_their_deadline() {
        let l = lat();
        let c = choose(&Demand {
            latency: &l,
            workers: 1,
            rate: 1000.0,
            dispersion: 1.0,
            slo: 100 * MS,
            queue: 8,
        });
        assert!(!c.feasible);
        assert_eq!(c.max_batch, 8);
        // An SLO that only batch 1 fits.
        let c = choose(&Demand {
            latency: &l,
            workers: 1,
            rate: 1000.0,
            dispersion: 1.0,
            slo: 11 * MS,
            queue: 8,
        });
        assert_eq!(c.max_batch, 1);
    }

    #[test]
    fn burstier_demand_is_predicted_slower() {
        let l = lat();
        let d = |dispersion| Demand {
            latency: &l,
            workers: 2,
            rate: 250.0,
            dispersion,
            slo: 100 * MS,
            queue: 8,
        };
        let calm = predict(&d(0.0), 4, 20.0 * MS as f64).unwrap().0;
        let bursty = predict(&d(4.0), 4, 20.0 * MS as f64).unwrap().0;
        assert!(bursty > calm, "{bursty} vs {calm}");
    }
}
