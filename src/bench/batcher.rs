//! `poolpipe bench batcher`: the batching policies side by side on two emulated pools, on a
//! controlled (virtual) clock.
//!
//! One model from the published profiles is cut in two stages: the first blocks on a pool of
//! high-class devices, the rest on a pool of low-class ones (the cut and pool sizes are chosen so
//! that the two pools have about the same capacity). Frames arrive as a Poisson process or in
//! bursts (a two-state Markov-modulated Poisson process) at 50%..120% of the pipeline's capacity.
//! The simulator's discrete-event core (`crate::sim`) drives the very policy code the runtime uses (`fixed` tuned for the SLO,
//! `aimd`, `deadline`) with devices that hold a batch for its profiled latency (and the transfer
//! of the cut), as `emulated:<class>` devices do.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::batcher::deadline::{StageCost, Timeline};
use crate::batcher::{Driver, PolicySettings, make_policy};
use crate::clock::Nanos;
use crate::config::PolicyKind;
use crate::profile::Profiles;
use crate::sim::{self, SimFrame, SimOptions, SimSetup};

const MS: Nanos = 1_000_000;

/// Arrival processes of this benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    /// Poisson.
    Poisson,
    /// Two-state MMPP: bursts at 3x the mean rate a fifth of the time, half the mean otherwise
    /// (0.2 * 3 + 0.8 * 0.5 = 1), states lasting 125 ms and 500 ms on average.
    Bursty,
}

impl Arrivals {
    fn process(self) -> sim::Arrivals {
        match self {
            Arrivals::Poisson => sim::Arrivals::Poisson,
            Arrivals::Bursty => sim::Arrivals::Bursty { burstiness: 3.0 },
        }
    }
}

/// Arrival times over `duration` at a mean of `rate` frames per second.
fn arrival_times(kind: Arrivals, rate: f64, duration: Nanos, seed: u64) -> Vec<Nanos> {
    kind.process().times(0, "", rate, duration, seed)
}

/// The two-stage setup under test.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Profiled model.
    pub model: String,
    /// High-class device and count, blocks.
    pub head: (String, usize, [usize; 2]),
    /// Low-class device and count, blocks.
    pub tail: (String, usize, [usize; 2]),
    /// SLO, ms (5 x the whole model's batch-1 latency on the high class).
    pub slo_ms: f64,
    /// Planned batch size.
    pub batch: usize,
    /// Capacity at the planned batch, frames/s.
    pub capacity_fps: f64,
    /// Link bandwidth, Gbit/s.
    pub bandwidth_gbps: f64,
}

struct Stage {
    cost: StageCost,
    workers: usize,
}

/// Picks the cut and pool sizes.
fn setup(
    profiles: &Profiles,
    model: &str,
    high: &str,
    low: &str,
    gbps: f64,
) -> anyhow::Result<(Setup, Vec<Stage>)> {
    let blocks = profiles.model(model)?.blocks();
    let slo = profiles.latency(model, high, 1, 0..blocks, 1)? * 5;
    let lat = |class: &str, r: std::ops::Range<usize>, b: usize| {
        profiles
            .latency(model, class, 1, r, b)
            .map(|d| d.as_nanos() as Nanos)
    };
    // The paper's clusters have three low-class devices per high-class one: one high, three low.
    // For every cut, the planned batch is the largest whose route takes at most 80% of the SLO;
    // take the cut with the most capacity at its planned batch.
    let tails = 3;
    let budget = slo.as_nanos() as Nanos * 4 / 5;
    let mut best: Option<(f64, usize, usize)> = None;
    for cut in 1..blocks {
        for b in (1..=8).rev() {
            let head = lat(high, 0..cut, b)?;
            let tail = lat(low, cut..blocks, b)?;
            let tr = profiles.transfer(model, cut - 1, b, gbps)?.as_nanos() as Nanos;
            if head + tr + tail > budget {
                continue;
            }
            let cap = (b as f64 / ((head + tr) as f64 / 1e9))
                .min(tails as f64 * b as f64 / (tail as f64 / 1e9));
            if best.is_none_or(|x| cap > x.0) {
                best = Some((cap, cut, b));
            }
            break;
        }
    }
    let Some((_, cut, b)) = best else {
        bail!("no cut of {model} fits its SLO on {high} -> {low}");
    };
    let head = sim::stage_cost(profiles, model, (high, 1), 0..cut, Some(gbps))?;
    let tail = sim::stage_cost(profiles, model, (low, 1), cut..blocks, None)?;
    let cap = (b as f64 / ((head.latency[b - 1] + head.transfer[b - 1]) as f64 / 1e9))
        .min(tails as f64 * b as f64 / (tail.latency[b - 1] as f64 / 1e9));
    Ok((
        Setup {
            model: model.into(),
            head: (high.into(), 1, [0, cut]),
            tail: (low.into(), tails, [cut, blocks]),
            slo_ms: slo.as_secs_f64() * 1e3,
            batch: b,
            capacity_fps: cap,
            bandwidth_gbps: gbps,
        },
        vec![
            Stage {
                cost: head,
                workers: 1,
            },
            Stage {
                cost: tail,
                workers: tails,
            },
        ],
    ))
}

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Policy.
    pub policy: String,
    /// Arrival process.
    pub arrivals: Arrivals,
    /// Offered load, fraction of capacity.
    pub load: f64,
    /// Frames offered.
    pub offered: u64,
    /// Share of offered frames published within their deadline.
    pub attainment: f64,
    /// Frames per second published within their deadline.
    pub goodput_fps: f64,
    /// Median latency of frames that finished, ms.
    pub p50_ms: f64,
    /// 99th percentile latency of frames that finished, ms.
    pub p99_ms: f64,
    /// Dropped by a batcher because their deadline could not be met.
    pub dropped_late: u64,
    /// Dropped because a queue was full.
    pub dropped_overload: u64,
    /// Finished after their deadline (the runtime's publisher drops these).
    pub finished_late: u64,
    /// Busy share of the high-class pool.
    pub busy_high: f64,
    /// Busy share of the low-class pool.
    pub busy_low: f64,
}

/// Simulates one policy on one arrival trace with the simulator's core (one pipeline, each
/// worker on its own device).
fn simulate(
    stages: &[Stage],
    policy: PolicyKind,
    planned: usize,
    slo: Nanos,
    times: &[Nanos],
    duration: Nanos,
) -> RunResult {
    let stages: Vec<(StageCost, usize)> =
        stages.iter().map(|s| (s.cost.clone(), s.workers)).collect();
    let setup = SimSetup::one_model(slo, planned, None, &stages);
    let opts = SimOptions {
        policy,
        duration: duration as f64 / 1e9,
        load: 0.0,
        arrivals: sim::Arrivals::Poisson,
        seed: 0,
        margin: MS / 2,
        queue: None,
    };
    let r = sim::simulate_times(&setup, &opts, &[times.to_vec()], duration);
    let m = &r.models[0];
    RunResult {
        policy: format!("{policy:?}").to_lowercase(),
        arrivals: Arrivals::Poisson,
        load: 0.0,
        offered: m.offered,
        attainment: m.attainment,
        goodput_fps: m.goodput,
        p50_ms: m.p50_ms,
        p99_ms: m.p99_ms,
        dropped_late: m.dropped_late,
        dropped_overload: m.dropped_overload,
        finished_late: m.finished_late,
        busy_high: r.busy[0].busy,
        busy_low: r.busy[stages.len() - 1].busy,
    }
}

/// The batcher's decision cost: frames of `streams` streams through one deadline stage.
fn decision_cost_ns(streams: usize, kind: PolicyKind) -> f64 {
    let cost = StageCost {
        latency: (1..=8).map(|b| (2 + b as u64) * MS).collect(),
        transfer: vec![0; 8],
        send_while_computing: false,
        receive: Vec::new(),
    };
    let timeline = Arc::new(Mutex::new(Timeline::new(&[4])));
    let mut p: Driver<SimFrame> = Driver::new(make_policy(
        PolicySettings {
            kind,
            stage: 0,
            max_batch: 8,
            max_wait: 5 * MS,
            margin: MS,
            costs: vec![cost],
            knob: None,
        },
        timeline,
    ));
    let load = [0usize; 4];
    let rounds = 20;
    let t = Instant::now();
    let mut dispatched = 0usize;
    for r in 0..rounds {
        // One frame from each stream, 100 us apart, SLO 10 s (nothing late: measure deciding).
        let base = r as u64 * streams as u64 * 100_000;
        for s in 0..streams {
            let now = base + s as u64 * 100_000;
            p.push(
                SimFrame {
                    arrival: now,
                    deadline: now + 10_000 * MS,
                },
                now,
            );
            loop {
                let step = p.step(now, false, &load);
                dispatched += step.late.len();
                match step.dispatch {
                    Some(d) => dispatched += d.items.len(),
                    None => break,
                }
            }
        }
    }
    while let Some(d) = p.step(u64::MAX / 2, true, &load).dispatch {
        dispatched += d.items.len();
    }
    assert_eq!(dispatched, rounds * streams, "every frame dispatched once");
    t.elapsed().as_nanos() as f64 / (rounds * streams) as f64
}

/// Everything `bench batcher` measured.
#[derive(Debug, Serialize)]
pub struct BatcherReport {
    /// The setup.
    pub setup: Setup,
    /// Simulated seconds per run.
    pub seconds: f64,
    /// Every run.
    pub runs: Vec<RunResult>,
    /// Per arrival process and policy: the highest load with >= 99% attainment (bisection) and
    /// its goodput.
    pub at_99: Vec<(Arrivals, String, f64, f64)>,
    /// Decision cost per frame with 1,000 streams, ns, per policy.
    pub decision_ns: BTreeMap<String, f64>,
}

/// Runs the benchmark.
pub fn run(
    profiles_dir: &Path,
    model: &str,
    high: &str,
    low: &str,
    seconds: f64,
    gbps: f64,
) -> anyhow::Result<BatcherReport> {
    let profiles = Profiles::load_dir(profiles_dir, Some(&[model]))
        .with_context(|| format!("profiles in {}", profiles_dir.display()))?;
    let (setup, stages) = setup(&profiles, model, high, low, gbps)?;
    let duration = (seconds * 1e9) as Nanos;
    let slo = (setup.slo_ms * 1e6) as Nanos;
    let mut runs = Vec::new();
    let loads = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2];
    // Runs: every load x arrival process x policy, then 12 bisection steps per process x policy.
    let mut bar = crate::progress::Progress::new("bench batcher", loads.len() * 2 * 3 + 2 * 3 * 12);
    for arrivals in [Arrivals::Poisson, Arrivals::Bursty] {
        for (k, load) in loads.iter().enumerate() {
            let times = arrival_times(arrivals, setup.capacity_fps * load, duration, 42 + k as u64);
            for policy in [PolicyKind::Fixed, PolicyKind::Aimd, PolicyKind::Deadline] {
                let mut r = simulate(&stages, policy, setup.batch, slo, &times, duration);
                r.arrivals = arrivals;
                r.load = *load;
                runs.push(r);
                bar.inc("");
            }
        }
    }
    // The highest load with >= 99% attainment, by bisection (same seed at every step).
    let mut at_99 = Vec::new();
    for arrivals in [Arrivals::Poisson, Arrivals::Bursty] {
        for policy in [PolicyKind::Fixed, PolicyKind::Aimd, PolicyKind::Deadline] {
            let attain = |load: f64| {
                let times = arrival_times(arrivals, setup.capacity_fps * load, duration, 7);
                simulate(&stages, policy, setup.batch, slo, &times, duration)
            };
            let (mut lo, mut hi) = (0.0, 1.5);
            let mut best: Option<RunResult> = None;
            for _ in 0..12 {
                let mid = (lo + hi) / 2.0;
                let r = attain(mid);
                bar.inc("99% load");
                if r.attainment >= 0.99 {
                    lo = mid;
                    best = Some(r);
                } else {
                    hi = mid;
                }
            }
            at_99.push((
                arrivals,
                format!("{policy:?}").to_lowercase(),
                lo,
                best.map_or(0.0, |r| r.goodput_fps),
            ));
        }
    }
    let mut decision_ns = BTreeMap::new();
    for kind in [PolicyKind::Fixed, PolicyKind::Aimd, PolicyKind::Deadline] {
        let mut v: Vec<f64> = (0..5).map(|_| decision_cost_ns(1000, kind)).collect();
        v.sort_by(f64::total_cmp);
        decision_ns.insert(format!("{kind:?}").to_lowercase(), v[2]);
    }
    Ok(BatcherReport {
        setup,
        seconds,
        runs,
        at_99,
        decision_ns,
    })
}

impl BatcherReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let s0 = &self.setup;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: blocks {:?} on {}x{} -> blocks {:?} on {}x{}, {} Gbit/s; SLO {:.1} ms; planned batch {}; capacity {:.1} frames/s",
            s0.model,
            s0.head.2,
            s0.head.1,
            s0.head.0,
            s0.tail.2,
            s0.tail.1,
            s0.tail.0,
            s0.bandwidth_gbps,
            s0.slo_ms,
            s0.batch,
            s0.capacity_fps
        );
        let _ = writeln!(
            s,
            "Virtual clock, {:.0} simulated seconds per run, the runtime's policy code.\n",
            self.seconds
        );
        let _ = writeln!(
            s,
            "{:<8} {:>5} {:<9} {:>7} {:>10} {:>8} {:>8} {:>7} {:>8} {:>7} {:>6} {:>6}",
            "arrivals",
            "load",
            "policy",
            "attain",
            "goodput/s",
            "p50 ms",
            "p99 ms",
            "late",
            "overload",
            "fin.late",
            "busyH",
            "busyL"
        );
        for r in &self.runs {
            let _ = writeln!(
                s,
                "{:<8} {:>5.2} {:<9} {:>7.4} {:>10.1} {:>8.1} {:>8.1} {:>7} {:>8} {:>7} {:>6.2} {:>6.2}",
                format!("{:?}", r.arrivals).to_lowercase(),
                r.load,
                r.policy,
                r.attainment,
                r.goodput_fps,
                r.p50_ms,
                r.p99_ms,
                r.dropped_late,
                r.dropped_overload,
                r.finished_late,
                r.busy_high,
                r.busy_low
            );
        }
        let _ = writeln!(
            s,
            "\nHighest load with >= 99% attainment (bisection), and goodput there:"
        );
        for (a, p, load, g) in &self.at_99 {
            let _ = writeln!(
                s,
                "  {:<8} {:<9} load {:>4.2}  goodput {:>7.1}/s",
                format!("{a:?}").to_lowercase(),
                p,
                load,
                g
            );
        }
        for a in [Arrivals::Poisson, Arrivals::Bursty] {
            let g = |p: &str| {
                self.at_99
                    .iter()
                    .find(|x| x.0 == a && x.1 == p)
                    .map_or(0.0, |x| x.3)
            };
            if g("fixed") > 0.0 {
                let _ = writeln!(
                    s,
                    "  {:<8} deadline / fixed goodput at 99%: {:.3}",
                    format!("{a:?}").to_lowercase(),
                    g("deadline") / g("fixed")
                );
            }
        }
        let _ = writeln!(
            s,
            "\nDecision cost per frame, 1,000 streams into one stage (median of 5):"
        );
        for (p, ns) in &self.decision_ns {
            let _ = writeln!(s, "  {p:<9} {ns:>8.0} ns");
        }
        s
    }
}
