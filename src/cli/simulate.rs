//! `poolpipe simulate`: a plan served on a virtual clock by the runtime's batching policies.

use std::path::PathBuf;
use std::time::Duration;

use super::CliError;

/// Arguments of `poolpipe simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// A plan written by `poolpipe plan --out` (or `--json`).
    #[arg(long)]
    pub plan: PathBuf,
    /// Folder of latency profiles (block-timing/, cut-bytes/).
    #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
    pub profiles: PathBuf,
    /// Simulated seconds of arrivals.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// `poisson`, `bursty`, `bursty:K` (bursts at K x the mean rate, 1 <= K < 5) or
    /// `trace:FILE` (one timestamp in seconds per line, or `seconds,model`).
    #[arg(long, default_value = "poisson")]
    pub arrivals: String,
    /// Offered load, a fraction of each model's planned throughput (default 0.9; a trace without
    /// `--load` is replayed as recorded).
    #[arg(long)]
    pub load: Option<f64>,
    /// Batching policy of every stage.
    #[arg(long, value_enum, default_value_t = crate::config::PolicyKind::Deadline)]
    pub policy: crate::config::PolicyKind,
    /// Safety margin of the deadline policy, ms (the runtime's default).
    #[arg(long, default_value_t = 2.0)]
    pub margin_ms: f64,
    /// Seed of the arrival processes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Search the highest load (fraction of planned, up to `--load` or 1.2) at which every
    /// model meets its SLO for at least 99% of its frames.
    #[arg(long)]
    pub find_99: bool,
    /// How each model's demand moves over the run: `steady`, `step:MODEL:AT_S:FACTOR` (model
    /// index in the plan) or `diurnal:PERIOD_S:AMPLITUDE`.
    #[arg(long, default_value = "steady")]
    pub shape: String,
    #[command(flatten)]
    pub ctl: ControlArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also sweep the load from 0.1 to 1.2 (or `--load`, if higher) in steps of 0.1 and draw
    /// attainment per model and busy share per device class against it (PNG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Simulates the plan and prints the result.
pub fn run(a: SimulateArgs) -> Result<(), CliError> {
    use crate::sim::{self, Arrivals, SimOptions, SimSetup};
    let plan = match crate::planner::Plan::load(&a.plan) {
        Ok(p) => p,
        Err(e) => return Err(CliError::Usage(e.to_string())),
    };
    let profiles = match crate::profile::Profiles::load_dir(&a.profiles, None) {
        Ok(p) => p,
        Err(e) => return Err(CliError::Usage(format!("profiles: {e}"))),
    };
    let violations = crate::planner::check::check(&plan, &profiles);
    if let Some(v) = violations.first() {
        return Err(CliError::Usage(format!(
            "{}: the plan does not hold on these profiles ({} problems), first: {v}",
            a.plan.display(),
            violations.len()
        )));
    }
    let mut arrivals = match Arrivals::parse(&a.arrivals) {
        Ok(x) => x,
        Err(e) => return Err(CliError::Usage(e.to_string())),
    };
    if let Arrivals::Trace(t) = &mut arrivals {
        t.as_recorded = a.load.is_none();
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        return Err(CliError::Usage(format!(
            "--duration {} is not a positive number of seconds",
            a.duration
        )));
    }
    let load = a.load.unwrap_or(if a.find_99 { 1.2 } else { 0.9 });
    if !(load > 0.0 && load.is_finite()) {
        return Err(CliError::Usage(format!(
            "--load {load} is not a positive fraction"
        )));
    }
    let setup = match SimSetup::from_plan(&plan, &profiles) {
        Ok(s) => s,
        Err(e) => return Err(CliError::Usage(e.to_string())),
    };
    let opts = SimOptions {
        policy: a.policy,
        duration: a.duration,
        load,
        arrivals,
        seed: a.seed,
        margin: crate::clock::nanos(Duration::from_secs_f64(a.margin_ms.max(0.0) / 1e3)),
        queue: None,
    };
    if a.ctl.control || a.shape != "steady" {
        if a.find_99 || a.plot.is_some() {
            return Err(CliError::Usage(
                "--control and --shape run once: leave out --find-99 and --plot".into(),
            ));
        }
        return supervised(&a, &plan, &profiles, &setup, &opts);
    }
    let t0 = std::time::Instant::now();
    let mut runs = 0u64;
    let mut events = 0u64;
    let result = if a.find_99 {
        sim::find_load(&setup, &opts, 0.99, 0.0, load, 7, |r| {
            runs += 1;
            events += r.events;
            eprintln!(
                "[simulate] load {:.3}: min attainment {:.4}, goodput {:.1} frames/s",
                r.load, r.min_attainment, r.goodput
            );
        })
    } else {
        let r = sim::simulate(&setup, &opts);
        runs = 1;
        events = r.events;
        r
    };
    if let Some(path) = &a.plot {
        let top = (load.max(1.2) * 10.0).round() as usize;
        let sweep: Vec<sim::SimResult> = (1..=top)
            .map(|k| {
                let r = sim::simulate(
                    &setup,
                    &SimOptions {
                        load: k as f64 / 10.0,
                        ..opts.clone()
                    },
                );
                runs += 1;
                events += r.events;
                eprintln!(
                    "[simulate] sweep {k}/{top}: load {:.1}, attainment {:.4}",
                    r.load, r.attainment
                );
                r
            })
            .collect();
        let title = format!(
            "{} plan on {}, {} arrivals, {} policy, {} s per point",
            plan.mode.name(),
            plan.classes
                .iter()
                .map(|c| format!("{}:{}", c.class, c.available))
                .collect::<Vec<_>>()
                .join(","),
            a.arrivals,
            format!("{:?}", a.policy).to_lowercase(),
            a.duration
        );
        if let Err(e) = sim::plot::plot(path, &title, &sweep) {
            return Err(CliError::Runtime(e.to_string()));
        }
        eprintln!("[simulate] plot written to {}", path.display());
    }
    let wall = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&result).expect("results serialise");
        v["wall_seconds"] = serde_json::json!(wall);
        v["runs"] = serde_json::json!(runs);
        v["events_per_second"] = serde_json::json!(events as f64 / wall.max(1e-9));
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    } else {
        print!("{}", sim::table(&result, &plan));
        println!(
            "{runs} run(s), {events} events in {wall:.2} s of wall time ({:.2} M events/s)",
            events as f64 / wall.max(1e-9) / 1e6
        );
    }
    Ok(())
}

/// `--control` / `--shape`: one run with demand shaped over time, re-planned while it runs when
/// `--control` is given.
fn supervised(
    a: &SimulateArgs,
    plan: &crate::planner::Plan,
    profiles: &crate::profile::Profiles,
    setup: &crate::sim::SimSetup,
    opts: &crate::sim::SimOptions,
) -> Result<(), CliError> {
    use crate::control::PlanSupervisor;
    let shape = crate::sim::arrivals::Shape::parse(&a.shape).map_err(CliError::Usage)?;
    if let crate::sim::arrivals::Shape::Step { model, .. } = shape
        && model >= plan.models.len()
    {
        return Err(CliError::Usage(format!(
            "--shape: model {model} is not in the plan (it has {} models, numbered from 0)",
            plan.models.len()
        )));
    }
    let settings = a.ctl.settings()?;
    let (cluster, specs, popts) = plan.problem();
    let mut sup = PlanSupervisor::new(settings, profiles, &cluster, &specs, &popts, plan.clone());
    sup.adaptive = a.ctl.control;
    let (run, result) = crate::bench::control::run_one(setup, &mut sup, &shape, opts);
    if a.json {
        let v = serde_json::json!({"result": result, "run": run});
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
        return Ok(());
    }
    print!("{}", crate::sim::table(&result, plan));
    let w: Vec<String> = run.windows.iter().map(|x| format!("{x:.3}")).collect();
    println!(
        "{}: missed {} of {} frames; attainment per 10 s: {}",
        run.policy,
        run.missed,
        run.offered,
        w.join(" ")
    );
    for p in &run.replans {
        println!("re-plan {p}");
    }
    Ok(())
}

/// The online control plane's settings (`simulate` and `run`).
#[derive(Debug, Clone, clap::Args)]
pub struct ControlArgs {
    /// Re-plan while it runs (the online control plane): when the demand mix leaves its band
    /// or a model's attainment stays under 99%, re-solve from the running plan.
    #[arg(long)]
    pub control: bool,
    /// `--control`: how far (relative) a model's share of the demand may move before a re-plan.
    #[arg(long, default_value_t = 0.2)]
    pub band: f64,
    /// `--control`: objective cost of one process started (a fraction of the demand).
    #[arg(long, default_value_t = 0.002)]
    pub move_cost: f64,
    /// `--control`: time limit of a re-plan's solve, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub replan_time_limit: f64,
}

impl ControlArgs {
    /// The settings, checked (a value out of range is a usage error naming it).
    pub fn settings(&self) -> Result<crate::control::ControlSettings, CliError> {
        let settings = crate::control::ControlSettings {
            band: self.band,
            move_cost: self.move_cost,
            time_limit: Duration::from_secs_f64(self.replan_time_limit.max(0.0)),
            ..Default::default()
        };
        settings
            .check()
            .map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(settings)
    }
}
