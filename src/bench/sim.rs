//! `poolpipe bench sim`: for the planner benchmark's 24 scenarios, the throughput at 99% SLO
//! attainment (Poisson arrivals, simulated) of the NP plan served whole and of poolpipe's plan,
//! both with the `deadline` batcher, and the busy share of low-class GPUs in each; the same for
//! poolpipe's plan made and served with processes held while they send (the gain of sending
//! while computing, paired); then the simulator's speed on 100 GPUs, 3 models, 30 simulated
//! seconds at full load.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::planner::{CLUSTERS, GROUPS, group_specs};
use crate::config::PolicyKind;
use crate::planner::{self, Cluster, Mode, Options, Plan};
use crate::profile::Profiles;
use crate::sim::{self, Arrivals, SimOptions, SimResult, SimSetup};

/// Planner settings compared: name and pool tiers (queueing allowance 1 in both).
pub const SETTINGS: [(&str, &[u32]); 2] = [("pool-aware", &[1, 4, 16]), ("one-batch-ahead", &[1])];

/// One plan simulated.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Planner setting: `pool-aware` (queueing 1, pool tiers 1, 4, 16: the default) or
    /// `one-batch-ahead` (queueing 1, tier 1 only: every stage may wait a whole batch, the
    /// Nexus-style assumption of the paper's baselines).
    pub setting: String,
    /// Planned objective.
    pub planned: f64,
    /// Load (fraction of planned) where every model holds 99%.
    pub load: f64,
    /// min goodput/weight there.
    pub at_99: f64,
    /// Busy share of the low-class GPUs there.
    pub low_busy: f64,
    /// Busy share of the high-class GPUs there.
    pub high_busy: f64,
}

/// One scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Cluster.
    pub cluster: String,
    /// Short model names.
    pub models: Vec<String>,
    /// NP plans, one per queueing allowance.
    pub np: Vec<Point>,
    /// poolpipe plans, one per queueing allowance.
    pub pp: Vec<Point>,
    /// poolpipe / NP at 99%, at the same allowance, per allowance.
    pub same_q_ratio: Vec<f64>,
    /// Best poolpipe / best NP at 99% (each at its best allowance).
    pub best_ratio: f64,
    /// Low-class busy share of the best NP and the best poolpipe plan.
    pub low_busy_best: (f64, f64),
    /// The pool-aware poolpipe plan made and served with processes held while they send.
    pub pp_held: Point,
    /// Pool-aware poolpipe / the same held, at 99%: the gain of sending while computing.
    pub vs_held: f64,
}

/// Speed of the simulator.
#[derive(Debug, Clone, Serialize)]
pub struct Speed {
    /// What was simulated.
    pub what: String,
    /// Simulated seconds.
    pub simulated_s: f64,
    /// Wall seconds.
    pub wall_s: f64,
    /// Events processed.
    pub events: u64,
    /// Events per wall second.
    pub events_per_s: f64,
    /// Frames offered.
    pub frames: u64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per scenario.
    pub scenarios: Vec<Scenario>,
    /// Per setting: median and smallest poolpipe/NP at 99%.
    pub same_q: Vec<(String, f64, f64)>,
    /// Median and smallest best-poolpipe / best-NP.
    pub best: (f64, f64),
    /// Median, smallest and largest poolpipe / poolpipe held (pool-aware).
    pub vs_held: (f64, f64, f64),
    /// Per allowance: scenarios where NP leaves the low-class GPUs idle, and the median
    /// relative low-class busy gain (poolpipe / NP - 1) over the others.
    pub low_busy: Vec<(String, usize, Option<f64>)>,
    /// Simulated seconds per run.
    pub duration_s: f64,
    /// Simulator speed.
    pub speed: Speed,
}

fn busy(r: &SimResult, class: &str) -> f64 {
    r.busy
        .iter()
        .find(|b| b.class == class)
        .map_or(0.0, |b| b.busy)
}

/// Runs the benchmark.
pub fn run(
    profiles_dir: &Path,
    duration: f64,
    time_limit: f64,
    quiet: bool,
) -> anyhow::Result<Report> {
    let profiles = Profiles::load_dir(profiles_dir, None)
        .with_context(|| format!("loading profiles from {}", profiles_dir.display()))?;
    let opts = SimOptions {
        policy: PolicyKind::Deadline,
        duration,
        load: 1.0,
        arrivals: Arrivals::Poisson,
        seed: 1,
        margin: crate::clock::nanos(Duration::from_millis(2)),
        queue: None,
    };
    let mut scenarios = Vec::new();
    let mut first_pp: Option<Plan> = None;
    let mut bar = crate::progress::Progress::new("bench sim", CLUSTERS.len() * GROUPS.len());
    for (high, low, gbps) in CLUSTERS {
        let cluster = Cluster::parse_spec(&format!("{high}:25,{low}:75"), gbps)?;
        for group in GROUPS {
            let specs = group_specs(&profiles, &group, 5.0)?;
            let plan_with = |mode: Mode, tiers: &[u32], swc: bool| -> anyhow::Result<Plan> {
                let o = Options {
                    mode,
                    pool_tiers: tiers.to_vec(),
                    time_limit: Duration::from_secs_f64(time_limit),
                    send_while_computing: swc,
                    ..Options::default()
                };
                planner::plan(&profiles, &cluster, &specs, &o)
                    .with_context(|| format!("{} on {}", mode.name(), cluster.describe()))
            };
            let serve = |setting: &str, plan: &Plan| -> anyhow::Result<Point> {
                let setup = SimSetup::from_plan(plan, &profiles)?;
                let r = sim::find_load(&setup, &opts, 0.99, 0.0, 1.0, 7, |_| {});
                Ok(Point {
                    setting: setting.to_string(),
                    planned: plan.objective,
                    load: r.load,
                    at_99: r.weighted_goodput,
                    low_busy: busy(&r, low),
                    high_busy: busy(&r, high),
                })
            };
            let mut np = Vec::new();
            let mut pp = Vec::new();
            for (setting, tiers) in SETTINGS {
                for (mode, out) in [(Mode::Np, &mut np), (Mode::Poolpipe, &mut pp)] {
                    let plan = plan_with(mode, tiers, true)?;
                    out.push(serve(setting, &plan)?);
                    if mode == Mode::Poolpipe && first_pp.is_none() {
                        first_pp = Some(plan);
                    }
                }
            }
            // Paired before/after: the first setting's poolpipe plan with processes held while
            // they send, planned and served that way.
            let pp_held = serve(
                &format!("{} held", SETTINGS[0].0),
                &plan_with(Mode::Poolpipe, SETTINGS[0].1, false)?,
            )?;
            let best = |v: &[Point]| -> Point {
                v.iter()
                    .max_by(|a, b| a.at_99.total_cmp(&b.at_99))
                    .cloned()
                    .expect("at least one allowance")
            };
            let (bn, bp) = (best(&np), best(&pp));
            let s = Scenario {
                cluster: cluster.describe(),
                models: group.iter().map(|s| s.to_string()).collect(),
                same_q_ratio: np.iter().zip(&pp).map(|(n, p)| p.at_99 / n.at_99).collect(),
                best_ratio: bp.at_99 / bn.at_99,
                low_busy_best: (bn.low_busy, bp.low_busy),
                vs_held: pp[0].at_99 / pp_held.at_99,
                pp_held,
                np,
                pp,
            };
            if !quiet {
                bar.line(&format!(
                    "[bench sim] {} {:?}: poolpipe/NP at 99% {:?}, best {:.3}, /held {:.3}",
                    s.cluster, s.models, s.same_q_ratio, s.best_ratio, s.vs_held
                ));
            }
            bar.inc(&s.cluster);
            scenarios.push(s);
        }
    }
    // Speed: the first scenario's poolpipe plan (100 GPUs, 3 models), 30 s at full load.
    let plan = first_pp.context("no scenario")?;
    let setup = SimSetup::from_plan(&plan, &profiles)?;
    let t = Instant::now();
    let r = sim::simulate(
        &setup,
        &SimOptions {
            duration: 30.0,
            ..opts.clone()
        },
    );
    let wall = t.elapsed().as_secs_f64();
    let speed = Speed {
        what: format!(
            "{} ({}), load 1.0",
            plan.classes
                .iter()
                .map(|c| format!("{}:{}", c.class, c.available))
                .collect::<Vec<_>>()
                .join(","),
            plan.models
                .iter()
                .map(|m| m.name.split(['_', '-']).next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(",")
        ),
        simulated_s: 30.0,
        wall_s: wall,
        events: r.events,
        events_per_s: r.events as f64 / wall,
        frames: r.models.iter().map(|m| m.offered).sum(),
    };
    let mut same_q = Vec::new();
    let mut low_busy = Vec::new();
    for (i, (q, _)) in SETTINGS.iter().enumerate() {
        let q = q.to_string();
        let r: Vec<f64> = scenarios.iter().map(|s| s.same_q_ratio[i]).collect();
        let min = r.iter().copied().fold(f64::INFINITY, f64::min);
        same_q.push((q.clone(), super::median_of(&r).unwrap_or(f64::NAN), min));
        let idle = scenarios
            .iter()
            .filter(|s| s.np[i].low_busy <= 1e-3)
            .count();
        let gains: Vec<f64> = scenarios
            .iter()
            .filter(|s| s.np[i].low_busy > 1e-3)
            .map(|s| s.pp[i].low_busy / s.np[i].low_busy - 1.0)
            .collect();
        low_busy.push((q, idle, super::median_of(&gains)));
    }
    let best: Vec<f64> = scenarios.iter().map(|s| s.best_ratio).collect();
    let best_min = best.iter().copied().fold(f64::INFINITY, f64::min);
    let held: Vec<f64> = scenarios.iter().map(|s| s.vs_held).collect();
    Ok(Report {
        vs_held: super::spread(&held),
        same_q,
        best: (super::median_of(&best).unwrap_or(f64::NAN), best_min),
        low_busy,
        duration_s: duration,
        scenarios,
        speed,
    })
}

impl Report {
    /// The table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "min(goodput/weight) at the highest load where every model meets its SLO for 99% of frames; Poisson; deadline batcher; {} simulated s per run",
            self.duration_s
        );
        let _ = writeln!(
            s,
            "per planner setting: NP@99 / poolpipe@99 (ratio) [low-class busy NP/pp]"
        );
        for r in &self.scenarios {
            let mut line = format!("{:<26} {:<46}", r.cluster, r.models.join(","));
            for ((n, p), ratio) in r.np.iter().zip(&r.pp).zip(&r.same_q_ratio) {
                let _ = write!(
                    line,
                    "  {}: {:>7.1}/{:>7.1} ({:.3}) [{:>4.1}%/{:>4.1}%]",
                    n.setting,
                    n.at_99,
                    p.at_99,
                    ratio,
                    n.low_busy * 100.0,
                    p.low_busy * 100.0
                );
            }
            let _ = writeln!(
                s,
                "{line}  best {:.3}  held {:>7.1} (pp/held {:.3})",
                r.best_ratio, r.pp_held.at_99, r.vs_held
            );
        }
        for ((q, med, min), (_, idle, gain)) in self.same_q.iter().zip(&self.low_busy) {
            let _ = writeln!(
                s,
                "{q}: median poolpipe/NP at 99% {med:.3} (min {min:.3}); NP leaves low-class GPUs idle in {idle} of {} scenarios{}",
                self.scenarios.len(),
                match gain {
                    Some(g) => format!(", median low-class busy gain elsewhere {:+.0}%", g * 100.0),
                    None => String::new(),
                }
            );
        }
        let _ = writeln!(
            s,
            "each at its best setting: median poolpipe/NP at 99% {:.3} (min {:.3})",
            self.best.0, self.best.1
        );
        let _ = writeln!(
            s,
            "sending while computing vs held while sending ({} poolpipe plans, planned and served each way): median {:.3}, min {:.3}, max {:.3}",
            SETTINGS[0].0, self.vs_held.0, self.vs_held.1, self.vs_held.2
        );
        let sp = &self.speed;
        let _ = writeln!(
            s,
            "speed: {}: {} simulated s, {} frames, {} events in {:.2} s wall ({:.2} M events/s)",
            sp.what,
            sp.simulated_s,
            sp.frames,
            sp.events,
            sp.wall_s,
            sp.events_per_s / 1e6
        );
        s
    }
}
