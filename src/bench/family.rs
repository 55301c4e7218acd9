//! The accuracy-scaling table of `poolpipe bench control`: one task served by a family of
//! image classifiers whose GPU profiles are published, at 1x, 1.5x and 2x the demand that the
//! most accurate variant alone can carry, under three policies planned by the same MILP:
//!
//! - `family`: the planner splits the demand across the variants (accuracy scaling);
//! - `best`: the most accurate variant only (what cannot be served is dropped);
//! - `cheapest`: the variant with the most capacity only.
//!
//! Each plan is simulated (deadline batcher, Poisson arrivals of the whole demand routed to the
//! variants in the planned proportions, the rest dropped at the door): attainment is frames on
//! time / frames offered, and the served accuracy is the mean published accuracy of the frames
//! served on time.

use std::time::Duration;

use serde::Serialize;

use crate::clock::Nanos;
use crate::config::PolicyKind;
use crate::planner::family::{FamilyPlan, Variant, plan_family};
use crate::planner::{self, Cluster, ModelSpec, Options};
use crate::profile::Profiles;
use crate::sim::arrivals::Rng;
use crate::sim::{self, Arrivals, SimOptions, SimSetup};

/// The family: profile name (prefix), ImageNet-1k top-1 accuracy of the trained weights, and
/// where the figure is published.
pub const FAMILY: [(&str, f64, &str); 3] = [
    (
        "convnext_large",
        84.414,
        "torchvision docs, ConvNeXt_Large_Weights.IMAGENET1K_V1, acc@1",
    ),
    (
        "wide_resnet101_2",
        78.848,
        "torchvision docs, Wide_ResNet101_2_Weights.IMAGENET1K_V1, acc@1",
    ),
    (
        "googlenet-v3",
        77.294,
        "torchvision docs, Inception_V3_Weights.IMAGENET1K_V1, acc@1",
    ),
];

/// One policy at one load.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Demand / the best variant's capacity (at the planning utilisation).
    pub load: f64,
    /// Frames/s.
    pub demand: f64,
    /// `family`, `best` or `cheapest`.
    pub policy: String,
    /// The plan: shares per variant, planned served share and accuracy.
    pub plan: FamilyPlan,
    /// Simulated: on time / offered.
    pub attainment: f64,
    /// Simulated: mean accuracy of the frames served on time.
    pub accuracy: f64,
}

/// The family's variants with one SLO: 5x the most accurate variant's batch-1 latency on its
/// fastest class.
pub fn variants(profiles: &Profiles) -> anyhow::Result<Vec<Variant>> {
    let best = planner::resolve_model(profiles, FAMILY[0].0)?;
    let (slo, class) = planner::slo_from_multiplier(profiles, &best, 5.0)?;
    FAMILY
        .iter()
        .map(|(short, accuracy, source)| {
            Ok(Variant {
                spec: ModelSpec {
                    name: planner::resolve_model(profiles, short)?,
                    weight: 1.0,
                    slo,
                    slo_basis: format!("5 x batch-1 of {best} on {class}"),
                },
                accuracy: *accuracy,
                source: source.to_string(),
            })
        })
        .collect()
}

/// Simulates a family plan: Poisson arrivals at the demand, each frame routed to a variant with
/// its planned share or dropped.
pub fn simulate(
    plan: &FamilyPlan,
    profiles: &Profiles,
    seconds: f64,
    seed: u64,
) -> anyhow::Result<(f64, f64)> {
    let duration = (seconds * 1e9) as Nanos;
    let all = Arrivals::Poisson.times(0, "family", plan.demand, duration, seed);
    let setup = SimSetup::from_plan(&plan.plan, profiles)?;
    let mut times: Vec<Vec<Nanos>> = vec![Vec::new(); setup.models.len()];
    let mut rng = Rng(seed ^ 0xA5A5_5A5A);
    for t in &all {
        let mut u = rng.next_f64();
        for (v, share) in plan.variants.iter().enumerate() {
            if u < share.share {
                times[v].push(*t);
                break;
            }
            u -= share.share;
        }
    }
    let opts = SimOptions {
        policy: PolicyKind::Deadline,
        duration: seconds,
        load: 1.0,
        arrivals: Arrivals::Poisson,
        seed,
        margin: 0,
        queue: None,
    };
    let r = sim::simulate_times(&setup, &opts, &times, duration);
    let on_time: u64 = r.models.iter().map(|m| m.on_time).sum();
    let accuracy = if on_time > 0 {
        r.models
            .iter()
            .zip(&plan.variants)
            .map(|(m, v)| m.on_time as f64 * v.accuracy)
            .sum::<f64>()
            / on_time as f64
    } else {
        0.0
    };
    Ok((on_time as f64 / all.len().max(1) as f64, accuracy))
}

/// Runs the table on `cluster`.
pub fn run(
    profiles: &Profiles,
    cluster: &Cluster,
    loads: &[f64],
    utilisation: f64,
    seconds: f64,
) -> anyhow::Result<Vec<Row>> {
    let vars = variants(profiles)?;
    let opts = Options {
        time_limit: Duration::from_secs(10),
        ..Options::default()
    };
    // Capacity of each variant alone: plan it for far more than it can carry.
    let alone = |v: &Variant| -> anyhow::Result<f64> {
        let p = plan_family(profiles, cluster, std::slice::from_ref(v), 1e7, 1.0, &opts)?;
        Ok(p.plan.models[0].throughput)
    };
    let caps: Vec<f64> = vars.iter().map(alone).collect::<anyhow::Result<_>>()?;
    let cheapest = (0..vars.len())
        .max_by(|a, b| caps[*a].total_cmp(&caps[*b]))
        .expect("variants");
    let unit = caps[0] * utilisation;
    let mut rows = Vec::new();
    for &load in loads {
        let demand = load * unit;
        let policies: [(&str, Vec<Variant>); 3] = [
            ("family", vars.clone()),
            ("best", vec![vars[0].clone()]),
            ("cheapest", vec![vars[cheapest].clone()]),
        ];
        for (name, vs) in policies {
            let plan = plan_family(profiles, cluster, &vs, demand, utilisation, &opts)?;
            let (attainment, accuracy) = simulate(&plan, profiles, seconds, 7)?;
            rows.push(Row {
                load,
                demand,
                policy: name.into(),
                plan,
                attainment,
                accuracy,
            });
        }
    }
    Ok(rows)
}

/// The table.
pub fn table(rows: &[Row]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>5} {:>9} {:<9} {:>8} {:>9} {:>8} {:>9}  variants (share of the demand)",
        "load", "demand", "policy", "planned", "plan_acc", "attain", "served_acc"
    );
    for r in rows {
        let v: Vec<String> = r
            .plan
            .variants
            .iter()
            .filter(|v| v.share > 0.0)
            .map(|v| format!("{} {:.1}%", v.name, v.share * 100.0))
            .collect();
        let _ = writeln!(
            s,
            "{:>5.2} {:>9.1} {:<9} {:>8.3} {:>9.2} {:>8.4} {:>9.2}  {}",
            r.load,
            r.demand,
            r.policy,
            r.plan.served,
            r.plan.accuracy,
            r.attainment,
            r.accuracy,
            v.join(", ")
        );
    }
    s
}
