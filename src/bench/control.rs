//! `poolpipe bench control`: the online control plane against the static plan, in the
//! simulator, on two of the paper's 100-GPU clusters.
//!
//! Each cluster serves one group of three models (SLO 5x batch-1, weights 0.30/0.33/0.37, the
//! planner benchmark's rules) under the `deadline` batcher, planned once for that mix. Each
//! scenario offers `load` x the planned throughput of every model, shaped over time:
//!
//! - **step**: the first model goes to 2x at 30 s (the others stay);
//! - **drift**: a compressed day, each model's rate `1 + 0.5 sin(2 pi (t / 120 s + m / 3))`,
//!   at 1.25 x `load` (so that each model's peak is above what the first plan gives it);
//! - **burst**: steady rates from a two-state MMPP (bursts at 2x the mean, independent per
//!   model), which a controller should not chase.
//!
//! Both policies see the same arrivals. `static` keeps the first plan; `online` runs the
//! controller ([`crate::control`]) and re-plans from the running plan, each new plan taking
//! over after its solve's wall time plus 1 s of start-up. Reported: frames missed (offered -
//! on time), attainment, goodput, attainment per 10 s window, re-plans with their solve times
//! and the processes they started.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::planner::{GROUPS, group_specs};
use crate::clock::Nanos;
use crate::config::PolicyKind;
use crate::control::{ControlSettings, PlanSupervisor, Replan};
use crate::planner::{self, Cluster, ModelSpec, Options, Plan};
use crate::profile::Profiles;
use crate::sim::arrivals::Shape;
use crate::sim::{self, Arrivals, SimOptions, SimResult, SimSetup};

/// Bisection steps of `--goodput` (the load is found within 2 x load / 2^steps).
const GOODPUT_STEPS: usize = 6;

/// The clusters: high class, low class, link Gbit/s (25 + 75 GPUs).
pub const CLUSTERS: [(&str, &str, f64); 2] = [("L4", "T4", 10.0), ("V100", "P4", 6.0)];

/// One policy on one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `static` or `online`.
    pub policy: String,
    /// Frames offered.
    pub offered: u64,
    /// Frames not published within their SLO.
    pub missed: u64,
    /// On time / offered.
    pub attainment: f64,
    /// Lowest model attainment.
    pub min_attainment: f64,
    /// On-time frames per second.
    pub goodput: f64,
    /// Attainment of each 10 s window (frames resolved in it).
    pub windows: Vec<f64>,
    /// Re-plans (online only).
    pub replans: Vec<Replan>,
    /// Looks where the mix left its band and the running plan had room for it (no re-plan).
    pub skipped: u64,
    /// Goodput at 99% (`--goodput`): the highest load (same shape, same policy) at which 99% of
    /// the frames meet their SLO, found by bisection, and the on-time frames/s there.
    pub at_99: Option<(f64, f64)>,
}

/// One scenario on one cluster: both policies.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Cluster.
    pub cluster: String,
    /// `step`, `drift` or `burst`.
    pub scenario: String,
    /// Offered load before the shape, a fraction of the planned throughput.
    pub load: f64,
    /// Models.
    pub models: Vec<String>,
    /// Static, then online.
    pub runs: Vec<Run>,
    /// Static misses / online misses.
    pub fewer_misses: f64,
}

/// The scenarios: name, shape, arrivals, seconds, load (a multiple of the bench's `load`).
fn scenarios() -> Vec<(&'static str, Shape, Arrivals, f64, f64)> {
    vec![
        (
            "step",
            Shape::Step {
                model: 0,
                at_s: 30.0,
                factor: 2.0,
            },
            Arrivals::Poisson,
            90.0,
            1.0,
        ),
        (
            "drift",
            Shape::Diurnal {
                period_s: 120.0,
                amplitude: 0.5,
            },
            Arrivals::Poisson,
            120.0,
            1.25,
        ),
        (
            "burst",
            Shape::Steady,
            Arrivals::Bursty { burstiness: 2.0 },
            60.0,
            1.0,
        ),
    ]
}

/// Windows of `every` from cumulative `(time, resolved, on_time)` samples.
fn windows(samples: &[(Nanos, u64, u64)], every: Nanos) -> Vec<f64> {
    let mut out = Vec::new();
    let mut last = (0u64, 0u64);
    let mut edge = every;
    for &(t, r, o) in samples {
        if t >= edge {
            let (dr, d_o) = (r - last.0, o - last.1);
            out.push(if dr > 0 { d_o as f64 / dr as f64 } else { 1.0 });
            last = (r, o);
            edge += every;
        }
    }
    out
}

/// Runs one shaped scenario on `setup` (the plan of `supervisor`), with or without re-planning
/// (`supervisor.adaptive`): `opts` gives the policy, arrivals, load (of each model's planned
/// throughput, before the shape), duration and seed.
pub fn run_one(
    setup: &SimSetup,
    supervisor: &mut PlanSupervisor<'_>,
    shape: &Shape,
    opts: &SimOptions,
) -> (Run, SimResult) {
    let duration = (opts.duration * 1e9) as Nanos;
    let n = setup.models.len();
    let times: Vec<Vec<Nanos>> = setup
        .models
        .iter()
        .enumerate()
        .map(|(m, model)| {
            opts.arrivals.shaped_times(
                shape,
                m,
                n,
                &model.name,
                model.planned * opts.load,
                duration,
                opts.seed.wrapping_add(m as u64 * 7919),
            )
        })
        .collect();
    let r = sim::simulate_supervised(setup, opts, &times, duration, supervisor);
    let offered: u64 = r.models.iter().map(|m| m.offered).sum();
    let on_time: u64 = r.models.iter().map(|m| m.on_time).sum();
    let run = Run {
        policy: if supervisor.adaptive {
            "online"
        } else {
            "static"
        }
        .into(),
        offered,
        missed: offered - on_time,
        attainment: r.attainment,
        min_attainment: r.min_attainment,
        goodput: r.goodput,
        windows: windows(&supervisor.samples, 10_000_000_000),
        replans: supervisor.log.clone(),
        skipped: supervisor.skipped,
        at_99: None,
    };
    (run, r)
}

/// A plan of models on a cluster, to run shaped demand on with or without re-planning.
pub struct Case<'a> {
    /// Profiles.
    pub profiles: &'a Profiles,
    /// Cluster.
    pub cluster: &'a Cluster,
    /// The models as planned.
    pub specs: &'a [ModelSpec],
    /// Planner options (re-plans take the settings' time limit).
    pub opts: &'a Options,
    /// The first plan.
    pub plan: &'a Plan,
    /// Its simulation.
    pub setup: &'a SimSetup,
}

impl Case<'_> {
    /// One run: the first plan kept (`adaptive` false) or re-planned by the controller.
    /// Returns the run and the plan that runs at its end.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        settings: &ControlSettings,
        adaptive: bool,
        shape: &Shape,
        arrivals: &Arrivals,
        load: f64,
        seconds: f64,
        seed: u64,
    ) -> (Run, Plan) {
        let mut sup = PlanSupervisor::new(
            settings.clone(),
            self.profiles,
            self.cluster,
            self.specs,
            self.opts,
            self.plan.clone(),
        );
        sup.adaptive = adaptive;
        let opts = SimOptions {
            policy: PolicyKind::Deadline,
            duration: seconds,
            load,
            arrivals: arrivals.clone(),
            seed,
            margin: 0,
            queue: None,
        };
        let (run, _) = run_one(self.setup, &mut sup, shape, &opts);
        (run, sup.plan().clone())
    }

    /// The highest load in `(0, top]` at which the run meets 99% attainment (`steps` bisection
    /// steps), with its goodput; `(0, 0)` when none tried does.
    #[allow(clippy::too_many_arguments)]
    pub fn goodput_at_99(
        &self,
        settings: &ControlSettings,
        adaptive: bool,
        shape: &Shape,
        arrivals: &Arrivals,
        top: f64,
        seconds: f64,
        steps: usize,
    ) -> (f64, f64) {
        let (mut lo, mut hi) = (0.0, top);
        let mut best = (0.0, 0.0);
        for _ in 0..steps {
            let mid = (lo + hi) / 2.0;
            let (r, _) = self.run(settings, adaptive, shape, arrivals, mid, seconds, 1);
            if r.attainment >= 0.99 {
                lo = mid;
                best = (mid, r.goodput);
            } else {
                hi = mid;
            }
        }
        best
    }
}

/// Runs every scenario on both clusters.
pub fn run(
    profiles_dir: &Path,
    load: f64,
    settings: &ControlSettings,
    goodput: bool,
    quiet: bool,
) -> anyhow::Result<Vec<Scenario>> {
    settings.check()?;
    let profiles = Profiles::load_dir(profiles_dir, None)
        .with_context(|| format!("loading profiles from {}", profiles_dir.display()))?;
    let group = GROUPS[2];
    let specs = group_specs(&profiles, &group, 5.0)?;
    let opts = Options {
        time_limit: Duration::from_secs(10),
        ..Options::default()
    };
    let mut out = Vec::new();
    let all = scenarios();
    let mut bar = crate::progress::Progress::new("bench control", CLUSTERS.len() * all.len());
    for (high, low, gbps) in CLUSTERS {
        let cluster = Cluster::parse_spec(&format!("{high}:25,{low}:75"), gbps)?;
        let plan = planner::plan(&profiles, &cluster, &specs, &opts)
            .with_context(|| format!("planning {group:?} on {}", cluster.describe()))?;
        let setup = SimSetup::from_plan(&plan, &profiles)?;
        for (name, shape, arrivals, seconds, scale) in &all {
            let load = load * scale;
            let case = Case {
                profiles: &profiles,
                cluster: &cluster,
                specs: &specs,
                opts: &opts,
                plan: &plan,
                setup: &setup,
            };
            let runs: Vec<Run> = [false, true]
                .into_iter()
                .map(|adaptive| {
                    let mut r = case
                        .run(settings, adaptive, shape, arrivals, load, *seconds, 1)
                        .0;
                    if goodput {
                        r.at_99 = Some(case.goodput_at_99(
                            settings,
                            adaptive,
                            shape,
                            arrivals,
                            2.0 * load,
                            *seconds,
                            GOODPUT_STEPS,
                        ));
                    }
                    r
                })
                .collect();
            let fewer = runs[0].missed as f64 / (runs[1].missed.max(1)) as f64;
            let s = Scenario {
                cluster: cluster.describe(),
                scenario: name.to_string(),
                load,
                models: group.iter().map(|s| s.to_string()).collect(),
                runs,
                fewer_misses: fewer,
            };
            if !quiet {
                bar.line(&format!(
                    "[bench control] {} {}: missed static {} online {} ({} re-plans)",
                    s.cluster,
                    s.scenario,
                    s.runs[0].missed,
                    s.runs[1].missed,
                    s.runs[1].replans.len()
                ));
            }
            bar.inc(&s.cluster);
            out.push(s);
        }
    }
    Ok(out)
}

/// The whole benchmark: the control scenarios and the accuracy-scaling table.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Static vs online.
    pub control: Vec<Scenario>,
    /// Accuracy scaling on the first cluster.
    pub family: Vec<super::family::Row>,
    /// The cluster of the accuracy-scaling table.
    pub family_cluster: String,
}

/// Runs both parts.
pub fn report(
    profiles_dir: &Path,
    load: f64,
    settings: &ControlSettings,
    goodput: bool,
    quiet: bool,
) -> anyhow::Result<Report> {
    let control = run(profiles_dir, load, settings, goodput, quiet)?;
    let profiles = Profiles::load_dir(profiles_dir, None)
        .with_context(|| format!("loading profiles from {}", profiles_dir.display()))?;
    let (high, low, gbps) = CLUSTERS[0];
    let cluster = Cluster::parse_spec(&format!("{high}:25,{low}:75"), gbps)?;
    let family = super::family::run(&profiles, &cluster, &[1.0, 1.5, 2.0], 0.8, 20.0)?;
    Ok(Report {
        control,
        family,
        family_cluster: cluster.describe(),
    })
}

impl Report {
    /// Both tables.
    pub fn table(&self) -> String {
        let mut s = table(&self.control);
        s.push_str(&format!(
            "\naccuracy scaling on {} (family: {}; planned at 80% utilisation; 20 s simulated):\n",
            self.family_cluster,
            super::family::FAMILY
                .iter()
                .map(|(m, a, _)| format!("{m} {a}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        s.push_str(&super::family::table(&self.family));
        s
    }
}

/// The table.
pub fn table(rows: &[Scenario]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<28} {:<6} {:>5} {:<7} {:>9} {:>8} {:>8} {:>8} {:>9} {:>13} {:>7} {:>8} {:>7}  attainment per 10 s",
        "cluster",
        "scen",
        "load",
        "policy",
        "offered",
        "missed",
        "attain",
        "min_att",
        "goodput",
        "load@99 good",
        "replans",
        "solve_med",
        "started"
    );
    for sc in rows {
        for r in &sc.runs {
            let solves: Vec<f64> = r.replans.iter().map(|p| p.solve_s).collect();
            let solve = super::median_of(&solves).unwrap_or(0.0);
            let started: u32 = r.replans.iter().map(|p| p.moves.started).sum();
            let w: Vec<String> = r.windows.iter().map(|a| format!("{a:.3}")).collect();
            let _ = writeln!(
                s,
                "{:<28} {:<6} {:>5.2} {:<7} {:>9} {:>8} {:>8.4} {:>8.4} {:>9.1} {:>13} {:>7} {:>8.2} {:>7}  {}",
                sc.cluster,
                sc.scenario,
                sc.load,
                r.policy,
                r.offered,
                r.missed,
                r.attainment,
                r.min_attainment,
                r.goodput,
                r.at_99
                    .map_or("-".to_string(), |(l, g)| format!("{l:.3} {g:.0}")),
                r.replans.len(),
                solve,
                started,
                w.join(" ")
            );
        }
        let _ = writeln!(
            s,
            "{:<28} {:<6} static/online missed: {:.2}x",
            "", sc.scenario, sc.fewer_misses
        );
    }
    let _ = writeln!(s, "\nre-plans (online):");
    for sc in rows {
        for p in sc.runs.iter().flat_map(|r| &r.replans) {
            let _ = writeln!(s, "  {:<28} {:<6} {p}", sc.cluster, sc.scenario);
        }
    }
    s
}
