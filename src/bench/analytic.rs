//! `poolpipe bench analytic`: the analytic batch size and wait ([`crate::batcher::analytic`])
//! against a grid search over batch size x wait in the simulator, per profiled model and rate.
//!
//! Each model runs whole on one pool (`workers` devices of one class, share 1), `fixed` policy,
//! SLO 5x its batch-1 latency on an L4 (the PPipe paper's rule), Poisson arrivals at fractions of
//! the pool's largest capacity (`workers x b / l(b)` over the batches `b` that alone fit the SLO). The grid: batch 1..=8 x waits of 0, 1/16,
//! 1/8, 1/4, 3/8, 1/2, 3/4 and 1 of what the SLO leaves after the batch's latency. Every
//! candidate runs on the same arrivals; goodput = frames published within the SLO per second.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::batcher::analytic::{self, Choice};
use crate::batcher::deadline::StageCost;
use crate::clock::Nanos;
use crate::config::PolicyKind;
use crate::profile::Profiles;
use crate::sim::{self, SimOptions, SimSetup};

/// One model at one rate.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Profiled model.
    pub model: String,
    /// Offered frames/s.
    pub rate: f64,
    /// Fraction of the pool's largest capacity.
    pub load: f64,
    /// SLO, ms.
    pub slo_ms: f64,
    /// The analytic choice.
    pub choice: Choice,
    /// How long choosing took, µs.
    pub choose_us: f64,
    /// Simulated goodput of the analytic choice, frames/s.
    pub analytic: f64,
    /// Best simulated goodput over the grid, and its batch and wait (ms).
    pub best: (f64, usize, f64),
    /// `analytic / best`.
    pub ratio: f64,
}

/// One simulated run of a `fixed` stage at batch `b` and wait `w`.
fn goodput(
    cost: &StageCost,
    workers: usize,
    slo: Nanos,
    b: usize,
    w: Nanos,
    times: &[Nanos],
    duration: Nanos,
) -> f64 {
    let setup = SimSetup::one_model(slo, b, Some(w), &[(cost.clone(), workers)]);
    let opts = SimOptions {
        policy: PolicyKind::Fixed,
        duration: duration as f64 / 1e9,
        load: 0.0,
        arrivals: sim::Arrivals::Poisson,
        seed: 0,
        margin: 0,
        queue: None,
    };
    sim::simulate_times(&setup, &opts, &[times.to_vec()], duration).models[0].goodput
}

/// Compares the analytic choice with the grid's best for each model and load.
pub fn compare(
    profiles: &Profiles,
    models: &[String],
    class: &str,
    workers: usize,
    loads: &[f64],
    seconds: f64,
) -> anyhow::Result<Vec<Row>> {
    let duration = (seconds * 1e9) as Nanos;
    let mut rows = Vec::new();
    for model in models {
        let t = profiles.timing(model, class, 1)?;
        let blocks = 0..t.us.len();
        let latency: Vec<Nanos> = (1..=t.max_batch())
            .map(|b| profiles.latency(model, class, 1, blocks.clone(), b))
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .map(|d| d.as_nanos() as Nanos)
            .collect();
        let l4 = profiles.latency(
            model,
            "L4",
            1,
            0..profiles.timing(model, "L4", 1)?.us.len(),
            1,
        )?;
        let slo = 5 * l4.as_nanos() as Nanos;
        let cost = StageCost {
            transfer: vec![0; latency.len()],
            latency: latency.clone(),
            send_while_computing: false,
            receive: Vec::new(),
        };
        let top = latency.len();
        // The largest throughput of a batch that alone fits the SLO.
        let capacity = (1..=top)
            .filter(|b| latency[b - 1] < slo)
            .map(|b| workers as f64 * b as f64 / (latency[b - 1] as f64 / 1e9))
            .fold(0.0, f64::max);
        for (k, load) in loads.iter().enumerate() {
            let rate = capacity * load;
            let times = sim::Arrivals::Poisson.times(0, model, rate, duration, 17 + k as u64);
            let started = Instant::now();
            let choice = analytic::choose(&analytic::Demand {
                latency: &latency,
                workers,
                rate,
                dispersion: 1.0,
                slo,
                // The simulator's stage queue: twice a batch per worker, at least 64 frames.
                queue: (2 * top * workers).max(64),
            });
            let choose_us = started.elapsed().as_secs_f64() * 1e6;
            let analytic = goodput(
                &cost,
                workers,
                slo,
                choice.max_batch,
                choice.max_wait,
                &times,
                duration,
            );
            let mut best = (0.0, 1, 0.0);
            for b in 1..=top {
                let room = slo.saturating_sub(latency[b - 1]);
                for f in [0.0, 1.0 / 16.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0] {
                    let w = (room as f64 * f) as Nanos;
                    let g = goodput(&cost, workers, slo, b, w, &times, duration);
                    if g > best.0 {
                        best = (g, b, w as f64 / 1e6);
                    }
                }
            }
            rows.push(Row {
                model: model.clone(),
                rate,
                load: *load,
                slo_ms: slo as f64 / 1e6,
                choice,
                choose_us,
                analytic,
                ratio: if best.0 > 0.0 { analytic / best.0 } else { 1.0 },
                best,
            });
        }
    }
    Ok(rows)
}

/// The models of the paper's main evaluation (`model_list.txt`), else every profiled one.
pub fn main_models(dir: &Path, profiles: &Profiles) -> Vec<String> {
    match std::fs::read_to_string(dir.join("model_list.txt")) {
        Ok(t) => t
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && profiles.models.contains_key(*l))
            .map(str::to_string)
            .collect(),
        Err(_) => profiles.models.keys().cloned().collect(),
    }
}

/// The rows as a table, with the summary lines.
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<46} {:>5} {:>8} {:>7} {:>11} {:>9} {:>14} {:>9} {:>6}\n",
        "model",
        "load",
        "rate/s",
        "slo ms",
        "analytic b/w",
        "goodput",
        "grid best b/w",
        "goodput",
        "ratio"
    );
    for r in rows {
        s += &format!(
            "{:<46} {:>5.2} {:>8.1} {:>7.1} {:>4}/{:>6.1} {:>9.1} {:>5}/{:>8.1} {:>9.1} {:>6.3}\n",
            r.model,
            r.load,
            r.rate,
            r.slo_ms,
            r.choice.max_batch,
            r.choice.max_wait as f64 / 1e6,
            r.analytic,
            r.best.1,
            r.best.2,
            r.best.0,
            r.ratio
        );
    }
    let mut ratios: Vec<f64> = rows.iter().map(|r| r.ratio).collect();
    ratios.sort_by(f64::total_cmp);
    let under = rows.iter().filter(|r| r.ratio < 0.95).count();
    let slowest = rows.iter().map(|r| r.choose_us).fold(0.0, f64::max);
    if let (Some(min), Some(med)) = (ratios.first(), ratios.get(ratios.len() / 2)) {
        s += &format!(
            "analytic / grid best: median {med:.3}, min {min:.3}, {under} of {} under 0.95; slowest choice {slowest:.1} us\n",
            rows.len()
        );
    }
    s
}
