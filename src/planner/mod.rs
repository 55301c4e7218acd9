//! The planner: decides how each model is cut into stages, which device class and GPU share
//! runs each stage, with what batch size and on how many processes, to serve the most frames
//! within their SLOs on the devices at hand (the approach of PPipe, USENIX ATC '25: pools of
//! heterogeneous GPUs serving cut models).
//!
//! # Formulation
//!
//! Inputs: per model `m` its block profiles `l[m][c,s](i, b)` (microseconds of block `i` on class
//! `c` at share `s`, batch `b`), the bytes per frame `B[m](j)` crossing the cut after block `j`,
//! its SLO `S_m` and demand weight `w_m`; per class `c` a device count `N_c`; the link bandwidth
//! per GPU `W` (bytes/s); a safety margin `μ` (a fraction of the SLO).
//!
//! **Candidates** (enumerated before the solver sees anything, [`candidates`]): a pipeline
//! configuration `p` of model `m` is a batch size `b` and a sequence of at most `K` stages, each a
//! contiguous block range `[i, j)` on one `(c, s)`; the ranges cover the model in order. For
//! stage `k`:
//!
//! - latency `L_k = Σ_{i..j} l(i, b)`; transfer into the next stage `T_k = b · B(j-1) / W`;
//! - throughput of one process `r_k = min(b / L_k, (W / s) / B_in, (W / s) / B_out)`, that is
//!   `b / max(L_k, s·T_k)`: a process sends batch `k` on its GPU's link while it computes batch
//!   `k + 1` (one batch in flight on the link per process; copy engines and NICs work on their
//!   own), and a GPU at share `s` runs `s` processes that share its link. With
//!   `send_while_computing` off (`poolpipe plan --no-send-while-computing`, and plans written
//!   before it existed) a process holds a batch while it runs it and while it sends it on:
//!   `r_k = min(b / (L_k + T_k), ...)`. The runtime's emulated devices and the simulator do
//!   what the plan says.
//!
//! A pipeline's end-to-end latency at arrival rate `x_p` is
//! `Σ (1 + q/t) L_k + Σ T_k + (b - 1) / x_p`: the first frame of a batch waits for `b - 1` more,
//! and at each stage the batch may wait `q/t` times its run time for a worker of the pool, where
//! `t` is the pipeline's pool tier: every stage has at least `t` processes (a saturated pool of
//! `t` frees a worker every `1/t` of a run). With `q = 1` (the default) a pool of one process
//! gets the Nexus-style worst case of one batch ahead. Each configuration is a candidate once
//! per tier (default tiers 1, 4, 16; tier `t` adds `n_{p,k} ≥ t · y_p`). The latency must
//! satisfy `latency + μ·S_m ≤ S_m`. Configurations whose fixed part already breaks that are
//! never generated; the rest get a minimum rate
//! `ρ_p = (b - 1) / (S_m (1 - μ) - Σ (1 + q/t) L_k - Σ T_k)`.
//! Among configurations of a model with the same multiset of `(c, s)` stages, one whose sorted
//! per-process rates are all at least another's and whose minimum rate is no higher dominates
//! it and the other is dropped; this is exact (anything the dropped one can do, the other can).
//!
//! **MILP** ([`milp`]), with `z` the objective:
//!
//! ```text
//! maximise   z
//! subject to z · w_m ≤ Σ_{p ∈ m} x_p                      for every model m
//!            x_p ≤ r_{p,k} · n_{p,k}                       for every stage k of p
//!            x_p ≥ ρ_p · y_p,   n_{p,k} ≤ U_{p,k} · y_p    (when ρ_p > min_k r_{p,k} or t > 1)
//!            n_{p,k} ≥ t_p · y_p                           (tier t_p > 1)
//!            Σ_{p,k : class c} n_{p,k} / s_{p,k} ≤ N_c     for every class c
//!            n_{p,0} = n_{p,1}                             (paired baseline only)
//!            x_p ≥ 0, n_{p,k} ∈ {0, 1, ..., U_{p,k} = N_c · s}, y_p ∈ {0, 1}
//! ```
//!
//! When one process per stage already reaches `ρ_p`, `y_p` is left out and a used pipeline's
//! rate is raised to `ρ_p` when the plan is read off (that only adds throughput). `U_{p,k}` is
//! also capped at the processes needed to carry the pipeline's largest possible rate.
//! Several pipelines of one model may run side by side. Processes of any stage may share a GPU
//! (shares count as fractions of a device). The solver is HiGHS through `good_lp`, with a time
//! limit; the relative optimality gap is reported. The NP baseline is the same problem with
//! one-stage candidates only; the paired baseline has two-stage candidates with one high-class
//! and one low-class GPU (share 1) per pipeline instance. The pipelined problem is warm-started
//! from the NP plan, so within any time limit it never returns less than NP.
//!
//! [`check::check`] recomputes every constraint of a finished plan from the profiles alone.

pub mod candidates;
pub mod check;
pub mod cluster;
pub mod family;
pub mod milp;
pub mod placement;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use cluster::Cluster;

use crate::profile::{ProfileError, Profiles};

/// Errors of planning.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A profile is missing or malformed.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The input is unusable (a message for the user).
    #[error("{0}")]
    Input(String),
    /// A model cannot be served at all.
    #[error("model `{model}`: {reason}")]
    Infeasible {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
    /// The solver failed.
    #[error("MILP solver: {0}")]
    Solver(String),
    /// A cluster file could not be read.
    #[error("{path}: {message}")]
    ClusterFile {
        /// File.
        path: PathBuf,
        /// What.
        message: String,
    },
}

/// Which family of plans to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Pool-based pipelines of up to `max_stages` stages (poolpipe's planner).
    Poolpipe,
    /// No partitioning: each model whole on devices of one class.
    Np,
    /// Paired: each pipeline instance is one high-class plus one low-class GPU.
    Paired,
}

impl Mode {
    /// Name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Poolpipe => "poolpipe",
            Mode::Np => "np",
            Mode::Paired => "paired",
        }
    }
}

/// One model to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// Name as in the profiles.
    pub name: String,
    /// Demand weight.
    pub weight: f64,
    /// Latency budget.
    pub slo: Duration,
    /// How the SLO was chosen (for the output), e.g. `5 x batch-1 on L4`.
    pub slo_basis: String,
}

/// Planner options.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Most stages per pipeline.
    pub max_stages: usize,
    /// Largest batch size considered (also bounded by the profiles).
    pub max_batch: usize,
    /// Largest GPU share considered (also bounded by the profiles).
    pub max_share: u32,
    /// Safety margin, a fraction of the SLO kept free.
    pub margin: f64,
    /// Queueing allowance: each stage's batch may wait this many times its own run time for a
    /// worker of its pool (1.0: the Nexus-style worst case of one batch ahead).
    pub queueing: f64,
    /// Pool tiers: a pipeline whose every stage has at least `t` processes gets the queueing
    /// allowance divided by `t` (a saturated pool of `t` frees a worker every `1/t` of a run).
    pub pool_tiers: Vec<u32>,
    /// Solver time limit.
    pub time_limit: Duration,
    /// Relative optimality gap at which the solver stops.
    pub gap: f64,
    /// Which plans to search.
    pub mode: Mode,
    /// A process sends batch k on its device's link while it computes batch k+1 (one batch in
    /// flight on the link per process): a stage's rate is `b / max(L, T)` under the link's share
    /// rather than `b / (L + T)`.
    pub send_while_computing: bool,
    /// What the MILP maximises.
    pub objective: Objective,
}

/// What the planner maximises.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Objective {
    /// `min over models of throughput / weight` (the paper's objective).
    #[default]
    MaxMin,
    /// Model families (accuracy scaling): each model is a variant of family `family[m]`, whose
    /// demand is `demand[f]` frames/s; the variants of a family serve at most its demand
    /// together, and the plan maximises `sum over models of value[m] x served[m] /
    /// demand[family[m]]`. With `value = 1000 + accuracy` serving a frame always beats serving
    /// it more accurately, and among plans that serve as much the most accurate wins.
    Served {
        /// Family of each model.
        family: Vec<usize>,
        /// Frames/s per family.
        demand: Vec<f64>,
        /// Value of a frame served by each model.
        value: Vec<f64>,
    },
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_stages: 2,
            max_batch: 8,
            max_share: 4,
            margin: 0.1,
            queueing: 1.0,
            pool_tiers: vec![1, 4, 16],
            time_limit: Duration::from_secs(60),
            gap: 1e-4,
            mode: Mode::Poolpipe,
            send_while_computing: true,
            objective: Objective::MaxMin,
        }
    }
}

/// One stage of a planned pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// Block range `[start, end)`.
    pub blocks: [usize; 2],
    /// Device class.
    pub class: String,
    /// GPU share (processes per GPU).
    pub share: u32,
    /// Processes serving the stage.
    pub processes: u32,
    /// Devices used: `processes / share`.
    pub devices: f64,
    /// Profiled latency of the stage at the pipeline's batch size, ms.
    pub latency_ms: f64,
    /// Transfer of a batch to the next stage, ms (0 for the last stage).
    pub transfer_ms: f64,
    /// Frames per second the stage can carry (processes x per-process rate, links included).
    pub capacity: f64,
}

/// One pipeline (a chain of pools) of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PipelinePlan {
    /// Batch size, the same on every stage.
    pub batch: usize,
    /// Planned frames per second through this pipeline.
    pub throughput: f64,
    /// Planned end-to-end latency at that rate (stages + transfers + batch-building wait), ms.
    pub latency_ms: f64,
    /// The stages in order.
    pub stages: Vec<StagePlan>,
}

/// What one model gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelPlan {
    /// Name as in the profiles.
    pub name: String,
    /// Demand weight.
    pub weight: f64,
    /// SLO, ms.
    pub slo_ms: f64,
    /// How the SLO was chosen.
    pub slo_basis: String,
    /// Planned frames per second over all pipelines.
    pub throughput: f64,
    /// Pipelines side by side.
    pub pipelines: Vec<PipelinePlan>,
    /// Model families: the published accuracy of this variant, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
}

/// A device class of the cluster, as recorded in a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassPlan {
    /// Class name.
    pub class: String,
    /// Devices available.
    pub available: u32,
    /// Devices used (shares count as fractions).
    pub used: f64,
}

/// The planner's output; what `poolpipe simulate` takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Which family of plans was searched.
    pub mode: Mode,
    /// `min over models of throughput / weight`.
    pub objective: f64,
    /// Wall time of the solver.
    pub solve_seconds: f64,
    /// Relative optimality gap reported by the solver (0 = proven optimal).
    pub gap: f64,
    /// `optimal` or `time_limit`.
    pub status: String,
    /// Candidate pipeline configurations the solver saw.
    pub candidates: usize,
    /// Link bandwidth per GPU, Gbit/s.
    pub bandwidth_gbps: f64,
    /// Safety margin (fraction of the SLO).
    pub margin: f64,
    /// Queueing allowance per stage (multiple of the stage's run time).
    pub queueing: f64,
    /// Pool tiers (see [`Options::pool_tiers`]).
    pub pool_tiers: Vec<u32>,
    /// Most stages per pipeline allowed.
    pub max_stages: usize,
    /// Whether processes send while they compute (see [`Options::send_while_computing`]);
    /// plans written before this existed did not.
    #[serde(default)]
    pub send_while_computing: bool,
    /// Device classes: available and used.
    pub classes: Vec<ClassPlan>,
    /// Per model.
    pub models: Vec<ModelPlan>,
    /// Which server runs each process (`poolpipe place`), when placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<placement::Placement>,
}

impl Plan {
    /// The planning problem this plan answers, as far as the plan records it: its cluster,
    /// its models (weights and SLOs) and its options (largest batch and share are the
    /// defaults, which plans do not record). What a re-plan of a plan file starts from.
    pub fn problem(&self) -> (Cluster, Vec<ModelSpec>, Options) {
        let cluster = Cluster {
            classes: self
                .classes
                .iter()
                .map(|c| cluster::ClassSpec {
                    name: c.class.clone(),
                    count: c.available,
                })
                .collect(),
            bandwidth_gbps: self.bandwidth_gbps,
        };
        let specs = self
            .models
            .iter()
            .map(|m| ModelSpec {
                name: m.name.clone(),
                weight: m.weight,
                slo: Duration::from_secs_f64(m.slo_ms / 1e3),
                slo_basis: m.slo_basis.clone(),
            })
            .collect();
        let opts = Options {
            max_stages: self.max_stages,
            margin: self.margin,
            queueing: self.queueing,
            pool_tiers: self.pool_tiers.clone(),
            mode: self.mode,
            send_while_computing: self.send_while_computing,
            ..Options::default()
        };
        (cluster, specs, opts)
    }

    /// Reads a plan written with `--json` / `--out`.
    pub fn load(path: &std::path::Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlanError::ClusterFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| PlanError::ClusterFile {
            path: path.to_path_buf(),
            message: format!("not a plan: {e}"),
        })
    }

    /// A human-readable table per model.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "plan ({}): objective min(throughput/weight) = {:.1}  status {}  gap {:.2}%  solve {:.2} s  candidates {}",
            self.mode.name(),
            self.objective,
            self.status,
            self.gap * 100.0,
            self.solve_seconds,
            self.candidates
        );
        for c in &self.classes {
            let _ = writeln!(
                s,
                "  {:<6} {:>7.2} of {} devices used",
                c.class, c.used, c.available
            );
        }
        for m in &self.models {
            let _ = writeln!(
                s,
                "\n{}  weight {:.2}  SLO {:.1} ms ({})  throughput {:.1} frames/s",
                m.name, m.weight, m.slo_ms, m.slo_basis, m.throughput
            );
            let _ = writeln!(
                s,
                "  {:>4} {:>6} {:>9} {:>11} {:>8} {:>6} {:>6} {:>6} {:>8} {:>10} {:>9}",
                "pipe",
                "batch",
                "fps",
                "latency_ms",
                "stage",
                "blocks",
                "class",
                "share",
                "procs",
                "devices",
                "stage_ms"
            );
            for (i, p) in m.pipelines.iter().enumerate() {
                for (k, st) in p.stages.iter().enumerate() {
                    let head = if k == 0 {
                        format!(
                            "  {:>4} {:>6} {:>9.1} {:>11.2}",
                            i, p.batch, p.throughput, p.latency_ms
                        )
                    } else {
                        format!("  {:>4} {:>6} {:>9} {:>11}", "", "", "", "")
                    };
                    let _ = writeln!(
                        s,
                        "{head} {:>8} {:>6} {:>6} {:>6} {:>8} {:>10.2} {:>9.2}",
                        k,
                        format!("{}..{}", st.blocks[0], st.blocks[1]),
                        st.class,
                        st.share,
                        st.processes,
                        st.devices,
                        st.latency_ms
                    );
                }
            }
        }
        s
    }
}

/// The SLO of `model` as `multiplier` x its whole-model batch-1 latency on the class that is
/// fastest at batch 1 (share 1) among all classes profiled for it. Returns the SLO and that class.
pub fn slo_from_multiplier(
    profiles: &Profiles,
    model: &str,
    multiplier: f64,
) -> Result<(Duration, String), PlanError> {
    let m = profiles.model(model)?;
    let blocks = m.blocks();
    let mut best: Option<(Duration, String)> = None;
    for (class, share) in m.timing.keys() {
        if *share != 1 {
            continue;
        }
        let l = profiles.latency(model, class, 1, 0..blocks, 1)?;
        if best.as_ref().is_none_or(|(b, _)| l < *b) {
            best = Some((l, class.clone()));
        }
    }
    let (l, class) = best.ok_or_else(|| PlanError::Infeasible {
        model: model.to_string(),
        reason: "no share-1 profile to base the SLO on".into(),
    })?;
    Ok((l.mul_f64(multiplier), class))
}

/// Resolves a model name: an exact name in the profiles, or a unique prefix of one.
pub fn resolve_model(profiles: &Profiles, name: &str) -> Result<String, PlanError> {
    if profiles.models.contains_key(name) {
        return Ok(name.to_string());
    }
    let hits: Vec<&String> = profiles
        .models
        .keys()
        .filter(|k| k.starts_with(name))
        .collect();
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(PlanError::Input(format!(
            "model `{name}` is not in the profiles (have: {})",
            profiles
                .models
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        many => Err(PlanError::Input(format!(
            "model `{name}` is ambiguous: {}",
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Plans `models` on `cluster`. With `Mode::Poolpipe` the NP plan is solved first and used as a
/// starting solution.
pub fn plan(
    profiles: &Profiles,
    cluster: &Cluster,
    models: &[ModelSpec],
    opts: &Options,
) -> Result<Plan, PlanError> {
    validate_input(cluster, models, opts)?;
    let start = match opts.mode {
        Mode::Poolpipe => {
            let np = Options {
                mode: Mode::Np,
                ..opts.clone()
            };
            let cands = candidates::enumerate(profiles, cluster, models, &np)?;
            Some(milp::solve(cluster, models, &np, &cands)?)
        }
        _ => None,
    };
    let cands = candidates::enumerate(profiles, cluster, models, opts)?;
    let start_from = start
        .as_ref()
        .map_or(milp::Start::None, milp::Start::Solved);
    let mut solved = milp::solve_with_start(cluster, models, opts, &cands, start_from)?;
    if let Some(np) = &start {
        solved.solve_seconds += np.solve_seconds;
    }
    let plan = solved.into_plan(cluster, models, opts);
    if let Some(zero) = plan.models.iter().find(|m| m.throughput <= 0.0) {
        return Err(PlanError::Infeasible {
            model: zero.name.clone(),
            reason: format!(
                "no frames can be served within the SLO of {:.1} ms on these devices ({})",
                zero.slo_ms,
                cluster.describe()
            ),
        });
    }
    Ok(plan)
}

/// Re-plans for a new demand (`models` with their measured rates as weights) from the plan that
/// runs now: the solve starts from `running` (so a time-limited solve never returns less than
/// it) and every process started that `running` does not already run costs `move_cost` (a
/// fraction of the demand, the objective's unit, per process) in the objective. A model whose
/// measured rate is 0 keeps a token weight, so it stays planned.
pub fn replan(
    profiles: &Profiles,
    cluster: &Cluster,
    models: &[ModelSpec],
    opts: &Options,
    running: &Plan,
    move_cost: f64,
) -> Result<Plan, PlanError> {
    validate_input(cluster, models, opts)?;
    if !(0.0..=1.0).contains(&move_cost) {
        return Err(PlanError::Input(format!(
            "the cost of a moved process is a fraction of the demand in [0, 1], got {move_cost}"
        )));
    }
    let cands = candidates::enumerate(profiles, cluster, models, opts)?;
    let start = milp::Start::Running {
        plan: running,
        move_cost,
    };
    let solved = milp::solve_with_start(cluster, models, opts, &cands, start)?;
    Ok(solved.into_plan(cluster, models, opts))
}

/// What a re-plan changes: processes started and stopped, counted per stage of each pipeline
/// (same model, batch, blocks, class and share).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Moves {
    /// Processes the new plan runs that the old one did not.
    pub started: u32,
    /// Processes the old plan ran that the new one does not.
    pub stopped: u32,
}

impl Moves {
    /// The processes that change between `old` and `new`.
    pub fn between(old: &Plan, new: &Plan) -> Moves {
        use std::collections::BTreeMap;
        type Key = (String, usize, usize, [usize; 2], String, u32);
        let count = |plan: &Plan| {
            let mut c: BTreeMap<Key, i64> = BTreeMap::new();
            for m in &plan.models {
                for p in &m.pipelines {
                    for (k, s) in p.stages.iter().enumerate() {
                        let key = (
                            m.name.clone(),
                            p.batch,
                            k,
                            s.blocks,
                            s.class.clone(),
                            s.share,
                        );
                        *c.entry(key).or_default() += i64::from(s.processes);
                    }
                }
            }
            c
        };
        let (a, b) = (count(old), count(new));
        let keys: std::collections::BTreeSet<&Key> = a.keys().chain(b.keys()).collect();
        let mut moves = Moves::default();
        for key in keys {
            let d = b.get(key).copied().unwrap_or(0) - a.get(key).copied().unwrap_or(0);
            if d > 0 {
                moves.started += d as u32;
            } else {
                moves.stopped += (-d) as u32;
            }
        }
        moves
    }
}

fn validate_input(
    cluster: &Cluster,
    models: &[ModelSpec],
    opts: &Options,
) -> Result<(), PlanError> {
    if models.is_empty() {
        return Err(PlanError::Input("no models to plan".into()));
    }
    if cluster.classes.iter().all(|c| c.count == 0) {
        return Err(PlanError::Input(format!(
            "the cluster has no devices ({})",
            cluster.describe()
        )));
    }
    if !(cluster.bandwidth_gbps > 0.0 && cluster.bandwidth_gbps.is_finite()) {
        return Err(PlanError::Input(format!(
            "bandwidth must be a positive number of Gbit/s, got {}",
            cluster.bandwidth_gbps
        )));
    }
    for m in models {
        if !(m.weight > 0.0 && m.weight.is_finite()) {
            return Err(PlanError::Input(format!(
                "model `{}`: weight must be positive, got {}",
                m.name, m.weight
            )));
        }
        if m.slo.is_zero() {
            return Err(PlanError::Input(format!("model `{}`: SLO is zero", m.name)));
        }
    }
    if opts.max_stages == 0 || opts.max_batch == 0 || opts.max_share == 0 {
        return Err(PlanError::Input(
            "max stages, max batch and max share must be at least 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&opts.margin) {
        return Err(PlanError::Input(format!(
            "margin is a fraction of the SLO in [0, 1), got {}",
            opts.margin
        )));
    }
    if !(0.0..=10.0).contains(&opts.queueing) {
        return Err(PlanError::Input(format!(
            "the queueing allowance is a multiple of a stage's run time in [0, 10], got {}",
            opts.queueing
        )));
    }
    if opts.pool_tiers.is_empty() || opts.pool_tiers.contains(&0) || !opts.pool_tiers.contains(&1) {
        return Err(PlanError::Input(format!(
            "pool tiers are process counts >= 1 and include 1, got {:?}",
            opts.pool_tiers
        )));
    }
    if !(0.0..1.0).contains(&opts.gap) {
        return Err(PlanError::Input(format!(
            "the optimality gap is a fraction in [0, 1), got {}",
            opts.gap
        )));
    }
    if opts.mode == Mode::Paired && cluster.classes.iter().filter(|c| c.count > 0).count() < 2 {
        return Err(PlanError::Input(
            "the paired baseline needs two device classes".into(),
        ));
    }
    Ok(())
}
