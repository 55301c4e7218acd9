//! Builds the MILP of [`super`]'s docs with `good_lp` and solves it with HiGHS.
//!
//! The model is written through `good_lp`; it is then handed to `highs` directly
//! (`HighsProblem::into_inner`) because only there the MIP gap, the status of a time-limited
//! solve and a starting solution are reachable. Columns are numbered in the order the variables
//! are created, which `good_lp` keeps.

use std::time::Instant;

use good_lp::solvers::highs::highs;
use good_lp::{Expression, ProblemVariables, SolverModel, variable};
use highs::{HighsModelStatus, HighsSolutionStatus};

use super::candidates::Candidate;
use super::{
    ClassPlan, Cluster, Mode, ModelPlan, ModelSpec, Objective, Options, PipelinePlan, Plan,
    PlanError, StagePlan,
};

/// Where a solve starts.
#[derive(Debug, Clone, Copy)]
pub enum Start<'a> {
    /// From scratch.
    None,
    /// From a solution over one-stage candidates (the NP plan).
    Solved(&'a Solved),
    /// From the plan that runs now (a re-plan): its pipelines are the starting solution, and
    /// every process started that it does not already run costs `move_cost` in the objective
    /// (`maximise z - move_cost x processes started`).
    Running {
        /// The current plan.
        plan: &'a Plan,
        /// Objective units (fractions of the demand) per process started.
        move_cost: f64,
    },
}

/// The running plan's pipelines as candidates: `(model, candidate, processes per stage,
/// throughput)`. A pipeline goes to the candidate of the same batch, stages and the tier its
/// smallest pool reaches (lower tiers when that one was pruned); one that matches none (a plan
/// made with other options) is left out.
fn running_pipelines(
    plan: &Plan,
    cluster: &Cluster,
    models: &[ModelSpec],
    cands: &[Vec<Candidate>],
) -> Vec<(usize, usize, Vec<u32>, f64)> {
    let mut out = Vec::new();
    for mp in &plan.models {
        let Some(m) = models.iter().position(|s| s.name == mp.name) else {
            continue;
        };
        for pp in &mp.pipelines {
            let smallest = pp.stages.iter().map(|s| s.processes).min().unwrap_or(0);
            let same = |c: &Candidate| {
                c.batch == pp.batch
                    && c.tier <= smallest.max(1)
                    && c.stages.len() == pp.stages.len()
                    && c.stages.iter().zip(&pp.stages).all(|(a, b)| {
                        a.blocks.start == b.blocks[0]
                            && a.blocks.end == b.blocks[1]
                            && a.share == b.share
                            && cluster.classes[a.class].name == b.class
                    })
            };
            let best = cands[m]
                .iter()
                .enumerate()
                .filter(|(_, c)| same(c))
                .max_by_key(|(_, c)| c.tier);
            if let Some((p, _)) = best {
                let n = pp.stages.iter().map(|s| s.processes).collect();
                out.push((m, p, n, pp.throughput));
            }
        }
    }
    out
}

/// Columns of one candidate.
#[derive(Debug, Clone)]
struct Cols {
    x: usize,
    n: Vec<usize>,
    y: Option<usize>,
}

/// A solved MILP: column values and how the solve went.
#[derive(Debug, Clone)]
pub struct Solved {
    cols: Vec<f64>,
    layout: Vec<Vec<Cols>>,
    /// Candidates of every model (what the columns refer to).
    cands: Vec<Vec<Candidate>>,
    /// Relative gap.
    pub gap: f64,
    /// `optimal` or `time_limit`.
    pub status: String,
    /// Wall time, model building included.
    pub solve_seconds: f64,
}

fn lcm_upto(n: u32) -> u32 {
    fn gcd(a: u32, b: u32) -> u32 {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    (1..=n.max(1)).fold(1, |acc, k| acc / gcd(acc, k) * k)
}

/// Solves without a starting solution.
pub fn solve(
    cluster: &Cluster,
    models: &[ModelSpec],
    opts: &Options,
    cands: &[Vec<Candidate>],
) -> Result<Solved, PlanError> {
    solve_with_start(cluster, models, opts, cands, Start::None)
}

/// Solves from `start`.
pub fn solve_with_start(
    cluster: &Cluster,
    models: &[ModelSpec],
    opts: &Options,
    cands: &[Vec<Candidate>],
    start: Start<'_>,
) -> Result<Solved, PlanError> {
    let t0 = Instant::now();
    let running = match start {
        Start::Running { plan, .. } => running_pipelines(plan, cluster, models, cands),
        _ => Vec::new(),
    };
    let move_cost = match start {
        Start::Running { move_cost, .. } => move_cost.max(0.0),
        _ => 0.0,
    };
    // Processes each candidate's stages run now (re-plans only).
    let mut now_running: Vec<Vec<Option<Vec<u32>>>> =
        cands.iter().map(|c| vec![None; c.len()]).collect();
    for (m, p, n, _) in &running {
        now_running[*m][*p] = Some(n.clone());
    }
    let mut vars = ProblemVariables::new();
    let mut next = 0usize;
    let mut col = || {
        next += 1;
        next - 1
    };
    let z = vars.add(variable().min(0.0));
    let z_col = col();
    debug_assert_eq!(z_col, 0);
    let mut layout: Vec<Vec<Cols>> = Vec::with_capacity(cands.len());
    let mut handles = Vec::new();
    // Re-plans: processes started, `Σ max(0, n - n_now)`; a column per stage that runs now.
    let mut started = Expression::from(0.0);
    let mut started_rows = Vec::new();
    for (m, model_cands) in cands.iter().enumerate() {
        let mut ml = Vec::with_capacity(model_cands.len());
        for (p, c) in model_cands.iter().enumerate() {
            let upper: Vec<f64> = c
                .stages
                .iter()
                .map(|s| f64::from(cluster.classes[s.class].count) * f64::from(s.share))
                .collect();
            let x_max = c
                .stages
                .iter()
                .zip(&upper)
                .map(|(s, u)| s.rate * u)
                .fold(f64::INFINITY, f64::min);
            let x = vars.add(variable().min(0.0).max(x_max));
            let xc = col();
            let mut n = Vec::new();
            let mut ncols = Vec::new();
            for (s, u) in c.stages.iter().zip(&upper) {
                // No stage needs more processes than carry the pipeline's largest rate.
                let need = (x_max / s.rate * (1.0 + 1e-9)).ceil();
                n.push(vars.add(variable().integer().min(0.0).max(u.min(need))));
                ncols.push(col());
            }
            // A binary "used" is needed only when one process per stage cannot reach the
            // minimum rate; otherwise a used pipeline's rate is raised to it afterwards.
            let needs_y = c.tier > 1
                || c.min_rate
                    > c.stages
                        .iter()
                        .map(|s| s.rate)
                        .fold(f64::INFINITY, f64::min);
            let y = needs_y.then(|| (vars.add(variable().binary()), col()));
            if move_cost > 0.0 {
                match &now_running[m][p] {
                    Some(n0) => {
                        for (nv, &k) in n.iter().zip(n0) {
                            let sv = vars.add(variable().min(0.0));
                            col();
                            started += sv;
                            started_rows.push((sv, *nv, f64::from(k)));
                        }
                    }
                    None => {
                        for nv in &n {
                            started += *nv;
                        }
                    }
                }
            }
            handles.push((x, n, y.map(|(v, _)| v)));
            ml.push(Cols {
                x: xc,
                n: ncols,
                y: y.map(|(_, c)| c),
            });
        }
        layout.push(ml);
    }
    // The objective: the demand's scale `z` (minus the cost of moves), or, for model families,
    // the frames served weighted by their value, per frame of the family's demand.
    let objective = match &opts.objective {
        Objective::MaxMin => z - move_cost * started,
        Objective::Served {
            family,
            demand,
            value,
        } => {
            let mut e = Expression::from(0.0);
            let mut h = handles.iter();
            for (m, model_cands) in cands.iter().enumerate() {
                for _ in model_cands {
                    let (x, _, _) = h.next().expect("one handle per candidate");
                    e += (value[m] / demand[family[m]]) * *x;
                }
            }
            e - move_cost * started
        }
    };
    let mut problem = vars.maximise(objective).using(highs);
    for (sv, nv, k) in started_rows {
        problem.add_constraint((Expression::from(sv) - nv).geq(-k));
    }
    let scale = lcm_upto(opts.max_share);
    let mut per_class: Vec<Expression> = vec![Expression::from(0.0); cluster.classes.len()];
    let mut per_model: Vec<Expression> = vec![Expression::from(0.0); cands.len()];
    let mut h = handles.iter();
    for (m, model_cands) in cands.iter().enumerate() {
        for c in model_cands {
            let (x, n, y) = h.next().expect("one handle per candidate");
            per_model[m] += *x;
            for (s, nv) in c.stages.iter().zip(n) {
                problem.add_constraint((Expression::from(*x) - s.rate * *nv).leq(0.0));
                per_class[s.class] += f64::from(scale / s.share) * *nv;
                if let Some(y) = y {
                    let u = f64::from(cluster.classes[s.class].count) * f64::from(s.share);
                    problem.add_constraint((Expression::from(*nv) - u * *y).leq(0.0));
                    if c.tier > 1 {
                        problem.add_constraint(
                            (Expression::from(*nv) - f64::from(c.tier) * *y).geq(0.0),
                        );
                    }
                }
            }
            if let Some(y) = y {
                problem.add_constraint((Expression::from(*x) - c.min_rate * *y).geq(0.0));
            }
            if opts.mode == Mode::Paired && n.len() == 2 {
                problem.add_constraint((Expression::from(n[0]) - n[1]).eq(0.0));
            }
        }
    }
    for (c, e) in per_class.into_iter().enumerate() {
        let cap = f64::from(scale) * f64::from(cluster.classes[c].count);
        problem.add_constraint(e.leq(cap));
    }
    match &opts.objective {
        Objective::MaxMin => {
            for (m, e) in per_model.into_iter().enumerate() {
                problem.add_constraint((models[m].weight * z - e).leq(0.0));
            }
        }
        Objective::Served { family, demand, .. } => {
            // A family's variants together serve at most its demand.
            for (f, d) in demand.iter().enumerate() {
                let mut e = Expression::from(0.0);
                for (m, x) in per_model.iter().enumerate() {
                    if family[m] == f {
                        e += x.clone();
                    }
                }
                problem.add_constraint(e.leq(*d));
            }
        }
    }
    let mut model = problem
        .try_into_inner()
        .map_err(|e| PlanError::Solver(e.to_string()))?;
    // POOLPIPE_SOLVER_LOG=1 shows HiGHS's own log on stdout.
    let log = std::env::var_os("POOLPIPE_SOLVER_LOG").is_some();
    model.set_option("output_flag", log);
    model.set_option("log_to_console", log);
    model.set_option("time_limit", opts.time_limit.as_secs_f64().max(0.01));
    model.set_option("mip_rel_gap", opts.gap);
    // HiGHS presolve spends seconds probing the big-M rows of these models and finds little.
    model.set_option("presolve", "off");
    let cols = match start {
        Start::None => None,
        Start::Solved(start) => Some(starting_columns(next, &layout, cands, models, start)),
        Start::Running { .. } => Some(running_columns(next, &layout, cands, models, &running)),
    };
    if let Some(cols) = cols {
        model
            .try_set_solution(Some(&cols), None, None, None)
            .map_err(|e| PlanError::Solver(format!("starting solution refused: {e:?}")))?;
    }
    let solved = model
        .try_solve()
        .map_err(|e| PlanError::Solver(format!("{e:?}")))?;
    let status = match solved.status() {
        HighsModelStatus::Optimal => "optimal",
        HighsModelStatus::ReachedTimeLimit => "time_limit",
        other => return Err(PlanError::Solver(format!("ended with status {other:?}"))),
    };
    if solved.primal_solution_status() != HighsSolutionStatus::Feasible {
        return Err(PlanError::Solver(format!(
            "no feasible solution within the time limit of {:?}",
            opts.time_limit
        )));
    }
    let gap = solved.mip_gap();
    let cols = solved.get_solution().columns().to_vec();
    Ok(Solved {
        cols,
        layout,
        cands: cands.to_vec(),
        gap: if gap.is_finite() { gap.max(0.0) } else { 0.0 },
        status: status.to_string(),
        solve_seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Maps a solution over one-stage candidates onto `cands`: each used pipeline of `start` goes to
/// a one-stage candidate of the same class and share that dominates it (one exists: pruning only
/// drops candidates that a kept one dominates).
fn starting_columns(
    ncols: usize,
    layout: &[Vec<Cols>],
    cands: &[Vec<Candidate>],
    models: &[ModelSpec],
    start: &Solved,
) -> Vec<f64> {
    let mut cols = vec![0.0; ncols];
    for (m, (scands, slayout)) in start.cands.iter().zip(&start.layout).enumerate() {
        for (q, ql) in scands.iter().zip(slayout) {
            let x = start.cols[ql.x];
            if x <= 1e-9 || q.stages.len() != 1 {
                continue;
            }
            let n = start.cols[ql.n[0]].round();
            let s = &q.stages[0];
            let target = cands[m].iter().position(|p| {
                p.stages.len() == 1
                    && p.tier == q.tier
                    && p.stages[0].class == s.class
                    && p.stages[0].share == s.share
                    && p.stages[0].rate >= s.rate * (1.0 - 1e-12)
                    && p.min_rate <= q.min_rate * (1.0 + 1e-12)
            });
            if let Some(p) = target {
                let l = &layout[m][p];
                cols[l.x] += x;
                cols[l.n[0]] += n;
                if let Some(y) = l.y {
                    cols[y] = 1.0;
                }
            }
        }
    }
    set_z(&mut cols, layout, models);
    cols
}

/// The running plan as columns (nothing started: the `started` columns stay 0).
fn running_columns(
    ncols: usize,
    layout: &[Vec<Cols>],
    cands: &[Vec<Candidate>],
    models: &[ModelSpec],
    running: &[(usize, usize, Vec<u32>, f64)],
) -> Vec<f64> {
    let mut cols = vec![0.0; ncols];
    for (m, p, n, x) in running {
        let (c, l) = (&cands[*m][*p], &layout[*m][*p]);
        let cap = c
            .stages
            .iter()
            .zip(n)
            .map(|(s, &k)| s.rate * f64::from(k))
            .fold(f64::INFINITY, f64::min);
        cols[l.x] = x.min(cap).max(0.0);
        for (&i, &k) in l.n.iter().zip(n) {
            cols[i] = f64::from(k);
        }
        if let Some(y) = l.y {
            cols[y] = 1.0;
        }
    }
    set_z(&mut cols, layout, models);
    cols
}

fn set_z(cols: &mut [f64], layout: &[Vec<Cols>], models: &[ModelSpec]) {
    let z = layout
        .iter()
        .zip(models)
        .map(|(ml, spec)| ml.iter().map(|l| cols[l.x]).sum::<f64>() / spec.weight)
        .fold(f64::INFINITY, f64::min);
    cols[0] = if z.is_finite() { z } else { 0.0 };
}

impl Solved {
    /// The plan this solution describes (process counts rounded, idle pipelines left out, each
    /// pipeline's rate capped at its capacity).
    pub fn into_plan(self, cluster: &Cluster, models: &[ModelSpec], opts: &Options) -> Plan {
        let mut used = vec![0.0f64; cluster.classes.len()];
        let mut model_plans = Vec::with_capacity(models.len());
        let candidates = self.cands.iter().map(Vec::len).sum();
        for (m, spec) in models.iter().enumerate() {
            let mut pipelines = Vec::new();
            for (c, l) in self.cands[m].iter().zip(&self.layout[m]) {
                let n: Vec<u32> =
                    l.n.iter()
                        .map(|&i| self.cols[i].round().max(0.0) as u32)
                        .collect();
                let capacity: Vec<f64> = c
                    .stages
                    .iter()
                    .zip(&n)
                    .map(|(s, &k)| s.rate * f64::from(k))
                    .collect();
                let cap = capacity.iter().copied().fold(f64::INFINITY, f64::min);
                if cap <= 1e-9 || self.cols[l.x] <= 1e-9 {
                    continue;
                }
                // Batches must fill fast enough: at least the minimum rate (see `needs_y`).
                let x = self.cols[l.x].max(c.min_rate).min(cap);
                let mut stages = Vec::with_capacity(c.stages.len());
                for ((s, &k), cap) in c.stages.iter().zip(&n).zip(&capacity) {
                    let devices = f64::from(k) / f64::from(s.share);
                    used[s.class] += devices;
                    stages.push(StagePlan {
                        blocks: [s.blocks.start, s.blocks.end],
                        class: cluster.classes[s.class].name.clone(),
                        share: s.share,
                        processes: k,
                        devices,
                        latency_ms: s.latency * 1e3,
                        transfer_ms: s.transfer * 1e3,
                        capacity: *cap,
                    });
                }
                pipelines.push(PipelinePlan {
                    batch: c.batch,
                    throughput: x,
                    latency_ms: (c.fixed + (c.batch - 1) as f64 / x) * 1e3,
                    stages,
                });
            }
            model_plans.push(ModelPlan {
                name: spec.name.clone(),
                weight: spec.weight,
                slo_ms: spec.slo.as_secs_f64() * 1e3,
                slo_basis: spec.slo_basis.clone(),
                // (An empty sum of floats is -0.0.)
                throughput: pipelines.iter().map(|p| p.throughput).sum::<f64>().max(0.0),
                pipelines,
                accuracy: None,
            });
        }
        let objective = model_plans
            .iter()
            .map(|m| m.throughput / m.weight)
            .fold(f64::INFINITY, f64::min);
        Plan {
            mode: opts.mode,
            objective,
            solve_seconds: self.solve_seconds,
            gap: self.gap,
            status: self.status,
            candidates,
            bandwidth_gbps: cluster.bandwidth_gbps,
            margin: opts.margin,
            queueing: opts.queueing,
            pool_tiers: opts.pool_tiers.clone(),
            max_stages: match opts.mode {
                Mode::Np => 1,
                Mode::Paired => 2,
                Mode::Poolpipe => opts.max_stages,
            },
            send_while_computing: opts.send_while_computing,
            classes: cluster
                .classes
                .iter()
                .zip(used)
                .map(|(c, u)| ClassPlan {
                    class: c.name.clone(),
                    available: c.count,
                    used: u,
                })
                .collect(),
            models: model_plans,
            placement: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcm() {
        assert_eq!(lcm_upto(1), 1);
        assert_eq!(lcm_upto(4), 12);
        assert_eq!(lcm_upto(5), 60);
    }
}
