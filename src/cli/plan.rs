//! `poolpipe plan`: models planned on a cluster (MILP), checked and printed.

use std::path::PathBuf;
use std::time::Duration;

use super::CliError;

/// Arguments of `poolpipe plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Folder of latency profiles (block-timing/, cut-bytes/).
    #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
    pub profiles: PathBuf,
    /// Devices, `CLASS:COUNT,...` (e.g. `L4:25,T4:75`).
    #[arg(
        long,
        conflicts_with = "cluster_file",
        required_unless_present = "cluster_file"
    )]
    pub cluster: Option<String>,
    /// Devices from a cluster file (configs/cluster-*.toml).
    #[arg(long)]
    pub cluster_file: Option<PathBuf>,
    /// Link bandwidth per GPU, Gbit/s (overrides the cluster file's).
    #[arg(long)]
    pub bandwidth_gbps: Option<f64>,
    /// Models (names in the profiles, or unique prefixes of them).
    #[arg(long, value_delimiter = ',', required = true)]
    pub models: Vec<String>,
    /// Demand weights, one per model (default: equal).
    #[arg(long, value_delimiter = ',')]
    pub weights: Vec<f64>,
    /// SLO = this x the model's whole-model batch-1 latency on its fastest profiled class.
    #[arg(long, conflicts_with = "slo_ms")]
    pub slo_multiplier: Option<f64>,
    /// SLOs in milliseconds, one per model.
    #[arg(long, value_delimiter = ',')]
    pub slo_ms: Vec<f64>,
    /// Most stages per pipeline.
    #[arg(long, default_value_t = 2)]
    pub max_stages: usize,
    /// Largest batch size.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Largest GPU share (processes per GPU).
    #[arg(long, default_value_t = 4)]
    pub max_share: u32,
    /// Safety margin kept free, a fraction of the SLO.
    #[arg(long, default_value_t = 0.1)]
    pub margin: f64,
    /// Queueing allowance: each stage's batch may wait this many times its run time for a
    /// worker (1 = one batch ahead, the Nexus-style worst case; 0 = no queueing).
    #[arg(long, default_value_t = 1.0)]
    pub queueing: f64,
    /// Pool tiers: a pipeline whose every stage has at least T processes gets the queueing
    /// allowance divided by T.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub pool_tiers: Vec<u32>,
    /// Plan a baseline instead: `np` (whole models) or `paired` (one high + one low GPU).
    #[arg(long, value_enum)]
    pub baseline: Option<crate::planner::Mode>,
    /// Solver time limit, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub time_limit: f64,
    /// Plan for processes that hold a batch while they send it on (rate b/(L+T)) instead of
    /// sending batch k while computing batch k+1 (rate b/max(L,T) under the link's share).
    #[arg(long)]
    pub no_send_while_computing: bool,
    /// Relative optimality gap at which the solver stops.
    #[arg(long, default_value_t = 1e-4)]
    pub gap: f64,
    /// Model family (accuracy scaling): the `--models` are variants of one task and this is
    /// its demand in frames/s; the plan splits it across them for the highest accuracy served
    /// (every variant takes the first one's SLO).
    #[arg(long, requires = "accuracy")]
    pub demand: Option<f64>,
    /// Model family: the published accuracy of each variant, percent, one per model.
    #[arg(long, value_delimiter = ',', requires = "demand")]
    pub accuracy: Vec<f64>,
    /// Model family: plan for demand / this, so pools keep room for queueing.
    #[arg(long, default_value_t = 0.8)]
    pub utilisation: f64,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the plan (JSON) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Plans, checks and prints the plan.
pub fn run(a: PlanArgs) -> Result<(), CliError> {
    use crate::planner::{self, Cluster, Mode, ModelSpec, Options, PlanError};
    let profiles = match crate::profile::Profiles::load_dir(&a.profiles, None) {
        Ok(p) => p,
        Err(e) => return Err(CliError::Usage(format!("profiles: {e}"))),
    };
    let cluster = match (&a.cluster, &a.cluster_file) {
        (Some(spec), _) => Cluster::parse_spec(spec, a.bandwidth_gbps.unwrap_or(10.0)),
        (None, Some(f)) => Cluster::load(f).map(|mut c| {
            if let Some(b) = a.bandwidth_gbps {
                c.bandwidth_gbps = b;
            }
            c
        }),
        (None, None) => Err(PlanError::Input("give --cluster or --cluster-file".into())),
    };
    let cluster = match cluster {
        Ok(c) => c,
        Err(e) => return Err(CliError::Usage(e.to_string())),
    };
    if !a.weights.is_empty() && a.weights.len() != a.models.len() {
        return Err(CliError::Usage(format!(
            "--weights has {} values for {} models",
            a.weights.len(),
            a.models.len()
        )));
    }
    if !a.slo_ms.is_empty() && a.slo_ms.len() != a.models.len() {
        return Err(CliError::Usage(format!(
            "--slo-ms has {} values for {} models",
            a.slo_ms.len(),
            a.models.len()
        )));
    }
    let mut models = Vec::new();
    for (i, name) in a.models.iter().enumerate() {
        let name = match planner::resolve_model(&profiles, name) {
            Ok(n) => n,
            Err(e) => return Err(CliError::Usage(e.to_string())),
        };
        let (slo, basis) = if let Some(ms) = a.slo_ms.get(i) {
            if !(*ms > 0.0 && ms.is_finite()) {
                return Err(CliError::Usage(format!(
                    "--slo-ms: {ms} is not a positive number of ms"
                )));
            }
            (Duration::from_secs_f64(ms / 1e3), "given".to_string())
        } else {
            let mult = a.slo_multiplier.unwrap_or(5.0);
            match planner::slo_from_multiplier(&profiles, &name, mult) {
                Ok((slo, class)) => (slo, format!("{mult} x batch-1 on {class}")),
                Err(e) => return Err(CliError::Usage(e.to_string())),
            }
        };
        models.push(ModelSpec {
            name,
            weight: a.weights.get(i).copied().unwrap_or(1.0),
            slo,
            slo_basis: basis,
        });
    }
    let opts = Options {
        max_stages: a.max_stages,
        max_batch: a.max_batch,
        max_share: a.max_share,
        margin: a.margin,
        queueing: a.queueing,
        pool_tiers: a.pool_tiers.clone(),
        time_limit: Duration::from_secs_f64(a.time_limit.max(0.01)),
        gap: a.gap,
        mode: a.baseline.unwrap_or(Mode::Poolpipe),
        send_while_computing: !a.no_send_while_computing,
        objective: planner::Objective::MaxMin,
    };
    let ticker = crate::progress::Ticker::start("planning (HiGHS)", Some(opts.time_limit));
    let planned = match a.demand {
        Some(demand) => plan_family(&a, &profiles, &cluster, &models, demand, &opts)
            .map(|f| (f.plan.clone(), Some(f))),
        None => planner::plan(&profiles, &cluster, &models, &opts).map(|p| (p, None)),
    };
    drop(ticker);
    let (plan, family) = match planned {
        Ok(p) => p,
        Err(e @ (PlanError::Solver(_) | PlanError::Profile(_))) => {
            return Err(CliError::Runtime(e.to_string()));
        }
        Err(e) => return Err(CliError::Usage(e.to_string())),
    };
    let violations = planner::check::check(&plan, &profiles);
    let json = serde_json::to_string_pretty(&plan).expect("plans serialise");
    if let Some(out) = &a.out
        && let Err(e) = std::fs::write(out, format!("{json}\n"))
    {
        return Err(CliError::Runtime(format!("writing {}: {e}", out.display())));
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", plan.table());
        if let Some(f) = &family {
            println!(
                "\nfamily (planned for {:.1} frames/s at {:.0}% utilisation): serves {:.1}% of {:.1} frames/s at a mean accuracy of {:.2}",
                f.demand / f.utilisation,
                f.utilisation * 100.0,
                f.served * 100.0,
                f.demand,
                f.accuracy
            );
            for v in &f.variants {
                println!(
                    "  {:<44} accuracy {:>6.2}  {:>9.1} frames/s  {:>5.1}% of the demand",
                    v.name,
                    v.accuracy,
                    v.rate,
                    v.share * 100.0
                );
            }
        }
        println!(
            "\nchecked: {}",
            if violations.is_empty() {
                "every constraint holds".to_string()
            } else {
                format!("{} violations", violations.len())
            }
        );
    }
    if !violations.is_empty() {
        for v in &violations {
            eprintln!("plan check: {v}");
        }
        return Err(CliError::Failed(String::new()));
    }
    Ok(())
}

/// `--demand`: the models are variants of one task (accuracy scaling).
fn plan_family(
    a: &PlanArgs,
    profiles: &crate::profile::Profiles,
    cluster: &crate::planner::Cluster,
    models: &[crate::planner::ModelSpec],
    demand: f64,
    opts: &crate::planner::Options,
) -> Result<crate::planner::family::FamilyPlan, crate::planner::PlanError> {
    use crate::planner::PlanError;
    use crate::planner::family::Variant;
    if a.accuracy.len() != models.len() {
        return Err(PlanError::Input(format!(
            "--accuracy has {} values for {} models",
            a.accuracy.len(),
            models.len()
        )));
    }
    let slo = models[0].slo;
    let variants: Vec<Variant> = models
        .iter()
        .zip(&a.accuracy)
        .map(|(m, acc)| Variant {
            spec: crate::planner::ModelSpec {
                slo,
                slo_basis: format!("the family's: {}", models[0].slo_basis),
                ..m.clone()
            },
            accuracy: *acc,
            source: "--accuracy".into(),
        })
        .collect();
    crate::planner::family::plan_family(profiles, cluster, &variants, demand, a.utilisation, opts)
}
