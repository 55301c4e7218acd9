//! `poolpipe bench planner`: planned throughput of NP, paired and poolpipe plans on the
//! published profiles, for the paper's four 100-GPU clusters x six groups of three models.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::planner::{self, Cluster, Mode, ModelSpec, Options, Plan};
use crate::profile::Profiles;

/// The four clusters: 25 high-class + 75 low-class GPUs and the link bandwidth.
pub const CLUSTERS: [(&str, &str, f64); 4] = [
    ("L4", "T4", 10.0),
    ("L4", "P4", 6.0),
    ("V100", "T4", 10.0),
    ("V100", "P4", 6.0),
];

/// The six groups of three of the 18 main models (prefixes of the profile names).
pub const GROUPS: [[&str; 3]; 6] = [
    ["apcnet", "atss", "gcnet"],
    ["centernet-update", "convnext_large", "dnl"],
    ["colorization-v2", "googlenet-v3", "repvgg-b3"],
    ["efficientnet-b8", "encnet", "rtmdet_x"],
    ["fcn-d6", "gfl_x101", "wide_resnet101_2"],
    ["fsaf", "nonlocal", "tf_efficientdet_d1"],
];

/// Demand weights of the three models of a group.
pub const WEIGHTS: [f64; 3] = [0.30, 0.33, 0.37];

/// One scenario: a cluster and a group of models.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// e.g. `L4:25,T4:75 at 10 Gbit/s`.
    pub cluster: String,
    /// Short model names.
    pub models: Vec<String>,
    /// Objective (min throughput/weight) of each mode.
    pub np: f64,
    /// Paired baseline.
    pub paired: f64,
    /// poolpipe.
    pub poolpipe: f64,
    /// poolpipe / NP.
    pub vs_np: f64,
    /// poolpipe / paired.
    pub vs_paired: f64,
    /// poolpipe planned for processes held while they send (`--no-send-while-computing`).
    pub poolpipe_held: f64,
    /// poolpipe / poolpipe held: the gain of sending while computing.
    pub vs_held: f64,
    /// Solver seconds of poolpipe (its NP warm start included).
    pub solve_seconds: f64,
    /// poolpipe's relative gap.
    pub gap: f64,
    /// Candidates poolpipe's MILP saw.
    pub candidates: usize,
    /// Low-class devices planned busy: NP, poolpipe (devices x planned utilisation).
    pub low_busy_np: f64,
    /// See `low_busy_np`.
    pub low_busy_poolpipe: f64,
    /// Violations the checker found in any of the three plans (0 expected).
    pub violations: usize,
}

/// The whole benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per scenario.
    pub scenarios: Vec<Scenario>,
    /// Median poolpipe/NP.
    pub median_vs_np: f64,
    /// Smallest poolpipe/NP.
    pub min_vs_np: f64,
    /// Median poolpipe/paired.
    pub median_vs_paired: f64,
    /// Median, smallest and largest poolpipe / poolpipe held.
    pub vs_held: (f64, f64, f64),
    /// Longest poolpipe solve.
    pub max_solve_seconds: f64,
    /// Options used.
    pub time_limit_s: f64,
    /// Margin used.
    pub margin: f64,
    /// Queueing allowance used.
    pub queueing: f64,
}

/// Planned busy low-class devices: per stage on `class`, devices x (planned rate / capacity).
pub fn busy_devices(plan: &Plan, class: &str) -> f64 {
    plan.models
        .iter()
        .flat_map(|m| &m.pipelines)
        .flat_map(|p| p.stages.iter().map(move |s| (p.throughput, s)))
        .filter(|(_, s)| s.class == class && s.capacity > 0.0)
        .map(|(x, s)| s.devices * (x / s.capacity).min(1.0))
        .sum()
}

/// The models of a group with SLO = `multiplier` x batch-1 latency on the fastest class.
pub fn group_specs(
    profiles: &Profiles,
    group: &[&str],
    multiplier: f64,
) -> anyhow::Result<Vec<ModelSpec>> {
    group
        .iter()
        .zip(WEIGHTS)
        .map(|(short, weight)| {
            let name = planner::resolve_model(profiles, short)?;
            let (slo, class) = planner::slo_from_multiplier(profiles, &name, multiplier)?;
            Ok(ModelSpec {
                name,
                weight,
                slo,
                slo_basis: format!("{multiplier} x batch-1 on {class}"),
            })
        })
        .collect()
}

/// Runs every scenario.
pub fn run(
    profiles_dir: &Path,
    time_limit: f64,
    margin: f64,
    queueing: f64,
    quiet: bool,
) -> anyhow::Result<Report> {
    let profiles = Profiles::load_dir(profiles_dir, None)
        .with_context(|| format!("loading profiles from {}", profiles_dir.display()))?;
    let mut scenarios = Vec::new();
    let mut bar = crate::progress::Progress::new("bench planner", CLUSTERS.len() * GROUPS.len());
    for (high, low, gbps) in CLUSTERS {
        let cluster = Cluster::parse_spec(&format!("{high}:25,{low}:75"), gbps)?;
        for group in GROUPS {
            let specs = group_specs(&profiles, &group, 5.0)?;
            // The baselines are planned as before (processes held while they send; NP has no
            // transfers anyway), poolpipe both ways.
            let plan_of = |mode: Mode, send_while_computing: bool| -> anyhow::Result<Plan> {
                let opts = Options {
                    mode,
                    margin,
                    queueing,
                    time_limit: Duration::from_secs_f64(time_limit),
                    send_while_computing,
                    ..Options::default()
                };
                planner::plan(&profiles, &cluster, &specs, &opts).with_context(|| {
                    format!("{} on {}: {:?}", mode.name(), cluster.describe(), group)
                })
            };
            let np = plan_of(Mode::Np, false)?;
            let paired = plan_of(Mode::Paired, false)?;
            let pp = plan_of(Mode::Poolpipe, true)?;
            let held = plan_of(Mode::Poolpipe, false)?;
            let violations = [&np, &paired, &pp, &held]
                .iter()
                .map(|p| planner::check::check(p, &profiles).len())
                .sum();
            let s = Scenario {
                cluster: cluster.describe(),
                models: group.iter().map(|s| s.to_string()).collect(),
                np: np.objective,
                paired: paired.objective,
                poolpipe: pp.objective,
                vs_np: pp.objective / np.objective,
                vs_paired: pp.objective / paired.objective,
                poolpipe_held: held.objective,
                vs_held: pp.objective / held.objective,
                solve_seconds: pp.solve_seconds,
                gap: pp.gap,
                candidates: pp.candidates,
                low_busy_np: busy_devices(&np, low),
                low_busy_poolpipe: busy_devices(&pp, low),
                violations,
            };
            if !quiet {
                bar.line(&format!(
                    "[bench planner] {} {:?}: poolpipe/NP {:.3}, /held {:.3}, solve {:.1} s",
                    s.cluster, s.models, s.vs_np, s.vs_held, s.solve_seconds
                ));
            }
            bar.inc(&s.cluster);
            scenarios.push(s);
        }
    }
    let vs_np: Vec<f64> = scenarios.iter().map(|s| s.vs_np).collect();
    let vs_paired: Vec<f64> = scenarios.iter().map(|s| s.vs_paired).collect();
    let vs_held: Vec<f64> = scenarios.iter().map(|s| s.vs_held).collect();
    Ok(Report {
        vs_held: super::spread(&vs_held),
        median_vs_np: super::median_of(&vs_np).unwrap_or(f64::NAN),
        min_vs_np: vs_np.iter().copied().fold(f64::INFINITY, f64::min),
        median_vs_paired: super::median_of(&vs_paired).unwrap_or(f64::NAN),
        max_solve_seconds: scenarios
            .iter()
            .map(|s| s.solve_seconds)
            .fold(0.0, f64::max),
        time_limit_s: time_limit,
        margin,
        queueing,
        scenarios,
    })
}

impl Report {
    /// The table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "planned min(throughput/weight), frames/s; SLO = 5 x batch-1 latency on the fastest class; margin {:.0}%; queueing {} x stage time; <= 2 stages; batch 1..8; time limit {} s",
            self.margin * 100.0,
            self.queueing,
            self.time_limit_s
        );
        let _ = writeln!(
            s,
            "{:<26} {:<46} {:>8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>6} {:>7} {:>6} {:>6} {:>13}",
            "cluster",
            "models",
            "NP",
            "paired",
            "poolpipe",
            "/NP",
            "/pair",
            "pp held",
            "/held",
            "solve_s",
            "gap%",
            "cands",
            "low busy NP/pp"
        );
        for r in &self.scenarios {
            let _ = writeln!(
                s,
                "{:<26} {:<46} {:>8.1} {:>8.1} {:>8.1} {:>6.3} {:>6.3} {:>8.1} {:>6.3} {:>7.1} {:>6.2} {:>6} {:>6.1}/{:<6.1}{}",
                r.cluster,
                r.models.join(","),
                r.np,
                r.paired,
                r.poolpipe,
                r.vs_np,
                r.vs_paired,
                r.poolpipe_held,
                r.vs_held,
                r.solve_seconds,
                r.gap * 100.0,
                r.candidates,
                r.low_busy_np,
                r.low_busy_poolpipe,
                if r.violations > 0 {
                    format!("  {} VIOLATIONS", r.violations)
                } else {
                    String::new()
                }
            );
        }
        let _ = writeln!(
            s,
            "median poolpipe/NP {:.3} (min {:.3}); median poolpipe/paired {:.3}; longest solve {:.1} s",
            self.median_vs_np, self.min_vs_np, self.median_vs_paired, self.max_solve_seconds
        );
        let _ = writeln!(
            s,
            "sending while computing vs held while sending (poolpipe/pp held): median {:.3}, min {:.3}, max {:.3}; NP and paired are planned held",
            self.vs_held.0, self.vs_held.1, self.vs_held.2
        );
        s
    }
}
