//! `poolpipe bench plan-run`: planner plans served by the runtime (`poolpipe run --plan` on
//! emulated devices, in real time) next to the simulator serving the same plans with the same
//! arrivals; then one pool under 1x, 3x and 10x overload: published frames/s, where frames were
//! dropped, and how fairly the streams shared it.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::clock::Nanos;
use crate::config::{self, LoadOptions, PolicyKind};
use crate::pipeline::{self, RunOptions, Shutdown};
use crate::planner::{self, Cluster, Options, Plan};
use crate::profile::Profiles;
use crate::sim::{self, Arrivals, SimOptions, SimSetup};
use crate::stats::Summary;

/// The scaled-down cluster: eight emulated GPUs.
pub const CLUSTER: &str = "L4:2,T4:6";

/// Two of the paper's groups of three models (see [`super::planner::GROUPS`]).
pub const GROUPS: [usize; 2] = [0, 2];

/// Offered loads, fractions of each model's planned throughput.
pub const LOADS: [f64; 3] = [0.5, 0.9, 1.2];

/// One model at one load, run and simulated.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Models of the group.
    pub group: String,
    /// Model.
    pub model: String,
    /// Offered load.
    pub load: f64,
    /// Frames per second offered.
    pub offered_fps: u32,
    /// Runtime: published / ingested.
    pub run_attainment: f64,
    /// Runtime: published frames/s.
    pub run_goodput: f64,
    /// Runtime: p99 end-to-end latency of published frames, ms.
    pub run_p99_ms: Option<f64>,
    /// Runtime: dropped because their deadline passed.
    pub run_late: u64,
    /// Runtime: dropped because the flow was full (of which before conversion: `run_early`).
    pub run_overload: u64,
    /// Runtime: dropped before conversion.
    pub run_early: u64,
    /// Simulator: on time / offered.
    pub sim_attainment: f64,
    /// Simulator: on-time frames/s.
    pub sim_goodput: f64,
    /// Simulator: p99 latency, ms.
    pub sim_p99_ms: f64,
}

/// One pool under overload.
#[derive(Debug, Clone, Serialize)]
pub struct OverloadRow {
    /// Offered load, a multiple of the pool's capacity.
    pub load: f64,
    /// Published frames/s, all streams.
    pub published_fps: f64,
    /// Jain's fairness index over the streams' published frames.
    pub jain: f64,
    /// Share of the dropped frames dropped before conversion.
    pub dropped_early_share: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Cluster.
    pub cluster: String,
    /// Seconds per run.
    pub seconds: f64,
    /// Per group, model and load.
    pub rows: Vec<Row>,
    /// The overload runs.
    pub overload: Vec<OverloadRow>,
}

/// A scratch folder, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let d = std::env::temp_dir().join(format!("poolpipe-plan-run-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        Ok(Self(d))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
    Ok(p)
}

fn run_file(path: &Path, opts: &LoadOptions, seconds: f64) -> anyhow::Result<Summary> {
    let p = config::load_pipeline_with(path, opts).map_err(|e| anyhow::anyhow!("{e}"))?;
    let s = pipeline::run(
        &p,
        &RunOptions {
            duration: Some(Duration::from_secs_f64(seconds)),
            ..RunOptions::default()
        },
        &Shutdown::new(),
    )?;
    anyhow::ensure!(s.balanced(), "frames went unaccounted: {}", s.table());
    Ok(s)
}

/// Plans one group on the cluster.
fn plan_group(profiles: &Profiles, group: &[&str; 3], time_limit: f64) -> anyhow::Result<Plan> {
    let cluster = Cluster::parse_spec(CLUSTER, 10.0)?;
    let mut models = Vec::new();
    for (name, w) in group.iter().zip(super::planner::WEIGHTS) {
        let name = planner::resolve_model(profiles, name)?;
        let (slo, slo_basis) = planner::slo_from_multiplier(profiles, &name, 5.0)?;
        models.push(planner::ModelSpec {
            name,
            weight: w,
            slo,
            slo_basis,
        });
    }
    let opts = Options {
        time_limit: Duration::from_secs_f64(time_limit),
        ..Options::default()
    };
    Ok(planner::plan(profiles, &cluster, &models, &opts)?)
}

/// Runs the benchmark.
pub fn run(profiles_dir: &Path, seconds: f64, time_limit: f64) -> anyhow::Result<Report> {
    let profiles = Profiles::load_dir(profiles_dir, None)?;
    let dir = TempDir::new()?;
    let load_opts = |plan: &Path| LoadOptions {
        data_dir: None,
        plan: Some(plan.to_path_buf()),
        profiles: Some(profiles_dir.to_path_buf()),
    };
    let runs = GROUPS.len() * LOADS.len() + OVERLOADS.len();
    let mut bar = crate::progress::Progress::new("bench plan-run", runs);
    let mut rows = Vec::new();
    for g in GROUPS {
        let group = &super::planner::GROUPS[g];
        let plan = plan_group(&profiles, group, time_limit)?;
        let plan_path = write(
            dir.path(),
            &format!("plan-{g}.json"),
            &serde_json::to_string_pretty(&plan)?,
        )?;
        let setup = SimSetup::from_plan(&plan, &profiles)?;
        for load in LOADS {
            let rates: Vec<u32> = plan
                .models
                .iter()
                .map(|m| ((m.throughput * load).round() as u32).max(1))
                .collect();
            let mut text = format!(
                "[pipeline]\nname = \"bench\"\nslo_ms = 1000\ncluster = \"{CLUSTER}\"\n\n[[sink]]\ntype = \"jsonl\"\npath = \"/dev/null\"\n"
            );
            for (i, (m, r)) in plan.models.iter().zip(&rates).enumerate() {
                text += &format!(
                    "\n[[flow]]\nname = \"f{i}\"\nmodel = \"{}\"\n\n[[source]]\nname = \"cam{i}\"\nuri = \"test://ball\"\nmax_fps = {r}\nflow = \"f{i}\"\n",
                    m.name
                );
            }
            let file = write(dir.path(), "p.toml", &text)?;
            let s = run_file(&file, &load_opts(&plan_path), seconds)?;
            // The simulator, with the arrivals the run had: each source's frames, periodic.
            let span = (s.elapsed_s * 1e9) as Nanos;
            let times: Vec<Vec<Nanos>> = rates
                .iter()
                .zip(&s.flows)
                .map(|(r, f)| {
                    let period = (1e9 / f64::from(*r)) as Nanos;
                    (0..f.ingested).map(|k| k * period).collect()
                })
                .collect();
            let simulated = sim::simulate_times(
                &setup,
                &SimOptions {
                    policy: PolicyKind::Deadline,
                    duration: s.elapsed_s,
                    load: 1.0,
                    arrivals: Arrivals::Poisson,
                    seed: 0,
                    margin: 2_000_000,
                    queue: None,
                },
                &times,
                span,
            );
            for ((m, f), (r, sm)) in plan
                .models
                .iter()
                .zip(&s.flows)
                .zip(rates.iter().zip(&simulated.models))
            {
                rows.push(Row {
                    group: group.join(","),
                    model: m.name.clone(),
                    load,
                    offered_fps: *r,
                    run_attainment: f.published as f64 / f.ingested.max(1) as f64,
                    run_goodput: f.published as f64 / s.elapsed_s,
                    run_p99_ms: f.p99_ms,
                    run_late: f.dropped_late,
                    run_overload: f.dropped_overload,
                    run_early: f.dropped_early,
                    sim_attainment: sm.attainment,
                    sim_goodput: sm.on_time as f64 / s.elapsed_s,
                    sim_p99_ms: sm.p99_ms,
                });
            }
            bar.inc(&format!("group {g} at {load}x"));
        }
    }
    let mut overload = Vec::new();
    for load in OVERLOADS {
        overload.push(overloaded(dir.path(), profiles_dir, load, seconds / 2.0)?);
        bar.inc(&format!("{load}x overload"));
    }
    drop(bar);
    Ok(Report {
        cluster: CLUSTER.into(),
        seconds,
        rows,
        overload,
    })
}

/// Overload factors of the single-pool runs.
pub const OVERLOADS: [f64; 3] = [1.0, 3.0, 10.0];

/// Frames/s one emulated T4 runs WideResNet-101-2 at batch 1 (its profiled latency).
fn pool_capacity(profiles: &Path) -> anyhow::Result<f64> {
    let p = Profiles::load_dir(profiles, Some(&["wide_resnet101_2"]))?;
    let nb = p.model("wide_resnet101_2")?.blocks();
    Ok(1.0
        / p.latency("wide_resnet101_2", "T4", 1, 0..nb, 1)?
            .as_secs_f64())
}

/// Four equal streams into one emulated pool at `load` x its capacity.
fn overloaded(dir: &Path, profiles: &Path, load: f64, seconds: f64) -> anyhow::Result<OverloadRow> {
    let per_stream = ((pool_capacity(profiles)? * load / 4.0).round() as u32).max(1);
    let mut text = String::from(
        "[pipeline]\nname = \"overload\"\nslo_ms = 1000\n\n[[stage]]\nname = \"net\"\ndevice = \"emulated:T4\"\n\
         profile = \"wide_resnet101_2\"\nmax_batch = 1\nqueue = 2\n\n[[sink]]\ntype = \"jsonl\"\npath = \"/dev/null\"\n",
    );
    for i in 0..4 {
        text += &format!(
            "\n[[source]]\nname = \"cam{i}\"\nuri = \"test://ball\"\nmax_fps = {per_stream}\n"
        );
    }
    let file = write(dir, "overload.toml", &text)?;
    let s = run_file(
        &file,
        &LoadOptions {
            data_dir: None,
            plan: None,
            profiles: Some(profiles.to_path_buf()),
        },
        seconds,
    )?;
    let x: Vec<f64> = s.streams.iter().map(|v| v.published as f64).collect();
    let dropped: u64 = s
        .streams
        .iter()
        .map(|v| v.dropped_late + v.dropped_overload)
        .sum();
    let early: u64 = s.streams.iter().map(|v| v.dropped_early).sum();
    Ok(OverloadRow {
        load,
        published_fps: s.published_fps(),
        jain: crate::stats::jain_index(&x).unwrap_or(0.0),
        dropped_early_share: if dropped > 0 {
            early as f64 / dropped as f64
        } else {
            0.0
        },
    })
}

impl Report {
    /// The tables.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plans on {} served by `poolpipe run --plan` (emulated devices, {:.0} s per run) and by the simulator, same arrivals",
            self.cluster, self.seconds
        );
        let _ = writeln!(
            s,
            "{:<34} {:>5} {:>6} | {:>7} {:>8} {:>8} {:>6} {:>8} {:>6} | {:>7} {:>8} {:>8}",
            "model",
            "load",
            "fps",
            "attain",
            "goodput",
            "p99 ms",
            "late",
            "overload",
            "early",
            "sim att",
            "sim good",
            "sim p99"
        );
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<34} {:>5.2} {:>6} | {:>7.3} {:>8.1} {:>8} {:>6} {:>8} {:>6} | {:>7.3} {:>8.1} {:>8.1}",
                r.model,
                r.load,
                r.offered_fps,
                r.run_attainment,
                r.run_goodput,
                f(r.run_p99_ms),
                r.run_late,
                r.run_overload,
                r.run_early,
                r.sim_attainment,
                r.sim_goodput,
                r.sim_p99_ms
            );
        }
        let _ = writeln!(
            s,
            "\none emulated T4 pool (WideResNet-101-2, batch 1), four equal streams"
        );
        let _ = writeln!(
            s,
            "{:>6} {:>14} {:>8} {:>22}",
            "load", "published fps", "Jain", "dropped before conv."
        );
        for o in &self.overload {
            let _ = writeln!(
                s,
                "{:>5.0}x {:>14.1} {:>8.3} {:>21.1}%",
                o.load,
                o.published_fps,
                o.jain,
                o.dropped_early_share * 100.0
            );
        }
        s
    }
}
