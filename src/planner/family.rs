//! Accuracy scaling (the idea of Proteus, ASPLOS '24): a task served by a family of model
//! variants of different cost and accuracy. For a demand the planner decides how many frames
//! per second each variant serves, so that every frame it serves meets the family's SLO and the
//! accuracy served is the highest; only when even the cheapest mix cannot carry the demand are
//! frames dropped (as without families).
//!
//! It is the planner's MILP with [`Objective::Served`]: the variants' rates sum to at most the
//! demand, and a frame served is worth `1000 + accuracy` (serving first, then accuracy). The
//! plan is made for `demand / utilisation`, so that the pools run at `utilisation` of what the
//! plan gives them (the planned capacity is the rate at which batches just keep up; queueing
//! needs room). Frames are routed to the variants in the planned proportions.

use serde::Serialize;

use super::{Cluster, ModelSpec, Objective, Options, Plan, PlanError, candidates, milp};
use crate::profile::Profiles;

/// One variant of a family.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// The model (its name in the profiles) and the family's SLO.
    pub spec: ModelSpec,
    /// Published accuracy of its trained weights, percent.
    pub accuracy: f64,
    /// Where the figure comes from.
    pub source: String,
}

/// What one variant serves.
#[derive(Debug, Clone, Serialize)]
pub struct VariantShare {
    /// Model.
    pub name: String,
    /// Accuracy, percent.
    pub accuracy: f64,
    /// Share of the family's frames routed to it.
    pub share: f64,
    /// Frames/s of the demand routed to it.
    pub rate: f64,
}

/// A family's plan.
#[derive(Debug, Clone, Serialize)]
pub struct FamilyPlan {
    /// The plan (one model per variant; a variant that serves nothing has no pipelines).
    #[serde(skip)]
    pub plan: Plan,
    /// The demand, frames/s.
    pub demand: f64,
    /// Utilisation the plan was made for.
    pub utilisation: f64,
    /// Per variant, in the order given.
    pub variants: Vec<VariantShare>,
    /// Share of the demand routed to a variant (the rest is dropped at the door).
    pub served: f64,
    /// Mean accuracy of the frames routed to a variant.
    pub accuracy: f64,
}

/// Plans `variants` of one task for `demand` frames/s (see the module docs).
pub fn plan_family(
    profiles: &Profiles,
    cluster: &Cluster,
    variants: &[Variant],
    demand: f64,
    utilisation: f64,
    opts: &Options,
) -> Result<FamilyPlan, PlanError> {
    if variants.is_empty() {
        return Err(PlanError::Input(
            "a family needs at least one variant".into(),
        ));
    }
    for (i, v) in variants.iter().enumerate() {
        if !(0.0..=100.0).contains(&v.accuracy) {
            return Err(PlanError::Input(format!(
                "variant `{}`: accuracy is a percentage in 0..100, got {}",
                v.spec.name, v.accuracy
            )));
        }
        if variants[..i].iter().any(|w| w.spec.name == v.spec.name) {
            return Err(PlanError::Input(format!(
                "variant `{}` is named twice in the family",
                v.spec.name
            )));
        }
    }
    if !(demand > 0.0 && demand.is_finite()) {
        return Err(PlanError::Input(format!(
            "a family's demand is a positive number of frames/s, got {demand}"
        )));
    }
    if !(utilisation > 0.0 && utilisation <= 1.0) {
        return Err(PlanError::Input(format!(
            "utilisation is a fraction in (0, 1], got {utilisation}"
        )));
    }
    let target = demand / utilisation;
    let specs: Vec<ModelSpec> = variants
        .iter()
        .map(|v| ModelSpec {
            weight: 1.0,
            ..v.spec.clone()
        })
        .collect();
    let opts = Options {
        objective: Objective::Served {
            family: vec![0; variants.len()],
            demand: vec![target],
            value: variants.iter().map(|v| 1000.0 + v.accuracy).collect(),
        },
        ..opts.clone()
    };
    let cands = candidates::enumerate(profiles, cluster, &specs, &opts)?;
    let solved = milp::solve(cluster, &specs, &opts, &cands)?;
    let mut plan = solved.into_plan(cluster, &specs, &opts);
    for (m, v) in plan.models.iter_mut().zip(variants) {
        m.accuracy = Some(v.accuracy);
    }
    let planned: f64 = plan.models.iter().map(|m| m.throughput).sum();
    // A pipeline's rate may be raised to what fills its batches in time: route in proportion.
    let base = planned.max(target);
    let shares: Vec<VariantShare> = variants
        .iter()
        .zip(&plan.models)
        .map(|(v, m)| VariantShare {
            name: v.spec.name.clone(),
            accuracy: v.accuracy,
            share: m.throughput / base,
            rate: demand * m.throughput / base,
        })
        .collect();
    let served: f64 = shares.iter().map(|s| s.share).sum();
    let accuracy = if served > 0.0 {
        shares.iter().map(|s| s.share * s.accuracy).sum::<f64>() / served
    } else {
        0.0
    };
    Ok(FamilyPlan {
        plan,
        demand,
        utilisation,
        variants: shares,
        served,
        accuracy,
    })
}
