//! An independent check of a plan: every constraint recomputed from the profiles and the plan's
//! own record of the cluster, without the planner's candidate tables.

use std::fmt;

use super::Plan;
use crate::profile::Profiles;

/// Which constraint a violation breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// The model, a class or a share is not in the profiles or the cluster.
    Unknown,
    /// Stages do not cover the model's blocks in order, or there are too many.
    Blocks,
    /// A batch size outside the profiles, or zero processes on a stage.
    Shape,
    /// A reported latency or transfer differs from the profiles.
    Latency,
    /// End-to-end latency plus margin exceeds the SLO.
    Slo,
    /// A stage (compute or link) cannot carry its pipeline's throughput.
    Throughput,
    /// More devices of a class than available.
    Devices,
    /// Totals (model throughput, objective, devices used) do not add up.
    Totals,
}

/// One broken constraint.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Which rule.
    pub rule: Rule,
    /// The model, when the violation is about one.
    pub model: Option<String>,
    /// What is wrong, with the numbers.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.model {
            Some(m) => write!(f, "{:?}: model `{m}`: {}", self.rule, self.message),
            None => write!(f, "{:?}: {}", self.rule, self.message),
        }
    }
}

const REL: f64 = 1e-6;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= REL * a.abs().max(b.abs()).max(1e-3)
}

/// Recomputes every constraint of `plan`; an empty list means the plan holds.
pub fn check(plan: &Plan, profiles: &Profiles) -> Vec<Violation> {
    let mut out = Vec::new();
    let link = plan.bandwidth_gbps * 1e9 / 8.0;
    let mut used = vec![0.0f64; plan.classes.len()];
    let mut objective = f64::INFINITY;
    for m in &plan.models {
        let mut bad = |rule: Rule, message: String| {
            out.push(Violation {
                rule,
                model: Some(m.name.clone()),
                message,
            })
        };
        let Ok(prof) = profiles.model(&m.name) else {
            bad(Rule::Unknown, "not in the profiles".into());
            continue;
        };
        let nblocks = prof.blocks();
        let slo = m.slo_ms / 1e3;
        let mut total = 0.0;
        for (pi, p) in m.pipelines.iter().enumerate() {
            let x = p.throughput;
            total += x;
            if p.stages.is_empty() || p.stages.len() > plan.max_stages {
                bad(
                    Rule::Blocks,
                    format!(
                        "pipeline {pi} has {} stages (allowed 1..={})",
                        p.stages.len(),
                        plan.max_stages
                    ),
                );
            }
            let mut next_block = 0;
            let mut e2e = 0.0;
            // The pool tier the pipeline reaches: the largest tier <= its smallest pool.
            let smallest = p.stages.iter().map(|s| s.processes).min().unwrap_or(0);
            let tier = plan
                .pool_tiers
                .iter()
                .copied()
                .filter(|&t| t >= 1 && t <= smallest)
                .max()
                .unwrap_or(1);
            for (k, st) in p.stages.iter().enumerate() {
                let [a, b] = st.blocks;
                if a != next_block || b <= a || b > nblocks {
                    bad(
                        Rule::Blocks,
                        format!(
                            "pipeline {pi} stage {k}: blocks {a}..{b} do not continue at block {next_block} of {nblocks}"
                        ),
                    );
                }
                next_block = b;
                let Some(ci) = plan.classes.iter().position(|c| c.class == st.class) else {
                    bad(
                        Rule::Unknown,
                        format!(
                            "pipeline {pi} stage {k}: class `{}` is not in the cluster",
                            st.class
                        ),
                    );
                    continue;
                };
                if st.processes == 0 || st.share == 0 {
                    bad(
                        Rule::Shape,
                        format!(
                            "pipeline {pi} stage {k}: {} processes at share {}",
                            st.processes, st.share
                        ),
                    );
                    continue;
                }
                let latency = match profiles.latency(
                    &m.name,
                    &st.class,
                    st.share,
                    a..b.min(nblocks).max(a + 1),
                    p.batch,
                ) {
                    Ok(l) => l.as_secs_f64(),
                    Err(e) => {
                        bad(Rule::Shape, format!("pipeline {pi} stage {k}: {e}"));
                        continue;
                    }
                };
                if !close(latency * 1e3, st.latency_ms) {
                    bad(
                        Rule::Latency,
                        format!(
                            "pipeline {pi} stage {k}: latency {:.4} ms reported, profiles say {:.4} ms",
                            st.latency_ms,
                            latency * 1e3
                        ),
                    );
                }
                let bytes_in = if k > 0 {
                    prof.cut_bytes.get(a - 1).copied()
                } else {
                    None
                };
                let bytes_out = if k + 1 < p.stages.len() && b >= 1 {
                    prof.cut_bytes.get(b - 1).copied()
                } else {
                    None
                };
                let transfer = bytes_out.map_or(0.0, |by| by as f64 * p.batch as f64 / link);
                if !close(transfer * 1e3, st.transfer_ms) {
                    bad(
                        Rule::Latency,
                        format!(
                            "pipeline {pi} stage {k}: transfer {:.4} ms reported, {:.4} ms at {} Gbit/s",
                            st.transfer_ms,
                            transfer * 1e3,
                            plan.bandwidth_gbps
                        ),
                    );
                }
                e2e += latency * (1.0 + plan.queueing / f64::from(tier)) + transfer;
                // What the stage can carry: compute, and the link of each GPU shared by its processes.
                let procs = f64::from(st.processes);
                // A process holds a batch while it runs it, and also while it sends it on unless
                // it sends while computing the next (the links are checked below).
                let hold = if plan.send_while_computing {
                    latency
                } else {
                    latency + transfer
                };
                let compute = procs * p.batch as f64 / hold;
                if compute < x * (1.0 - REL) {
                    bad(
                        Rule::Throughput,
                        format!(
                            "pipeline {pi} stage {k}: {} processes compute {compute:.2} frames/s < {x:.2} planned",
                            st.processes
                        ),
                    );
                }
                let gpus = procs / f64::from(st.share);
                for (dir, bytes) in [("in", bytes_in), ("out", bytes_out)] {
                    if let Some(by) = bytes.filter(|&b| b > 0) {
                        let net = gpus * link / by as f64;
                        if net < x * (1.0 - REL) {
                            bad(
                                Rule::Throughput,
                                format!(
                                    "pipeline {pi} stage {k}: links {dir} carry {net:.2} frames/s < {x:.2} planned ({by} bytes/frame on {gpus:.2} GPUs at {} Gbit/s)",
                                    plan.bandwidth_gbps
                                ),
                            );
                        }
                    }
                }
                used[ci] += gpus;
            }
            if next_block != nblocks && !p.stages.is_empty() {
                bad(
                    Rule::Blocks,
                    format!("pipeline {pi} ends at block {next_block}, the model has {nblocks}"),
                );
            }
            let wait = if p.batch > 1 {
                if x > 0.0 {
                    (p.batch - 1) as f64 / x
                } else {
                    f64::INFINITY
                }
            } else {
                0.0
            };
            let need = e2e + wait + plan.margin * slo;
            if need > slo * (1.0 + REL) {
                bad(
                    Rule::Slo,
                    format!(
                        "pipeline {pi}: {:.3} ms of stages (with queueing) and transfers + {:.3} ms to fill a batch of {} at {x:.2} frames/s + {:.3} ms margin > SLO {:.3} ms",
                        e2e * 1e3,
                        wait * 1e3,
                        p.batch,
                        plan.margin * slo * 1e3,
                        m.slo_ms
                    ),
                );
            }
            if x <= 0.0 {
                bad(Rule::Throughput, format!("pipeline {pi} carries nothing"));
            }
        }
        if !close(total, m.throughput) {
            bad(
                Rule::Totals,
                format!(
                    "throughput {:.4} reported, pipelines sum to {total:.4}",
                    m.throughput
                ),
            );
        }
        objective = objective.min(total / m.weight);
    }
    for (c, u) in plan.classes.iter().zip(&used) {
        if *u > f64::from(c.available) + 1e-9 {
            out.push(Violation {
                rule: Rule::Devices,
                model: None,
                message: format!(
                    "class {}: {u:.3} devices used, {} available",
                    c.class, c.available
                ),
            });
        }
        if !close(*u, c.used) {
            out.push(Violation {
                rule: Rule::Totals,
                model: None,
                message: format!(
                    "class {}: {:.3} devices used reported, stages sum to {u:.3}",
                    c.class, c.used
                ),
            });
        }
    }
    if !plan.models.is_empty() && !close(objective, plan.objective) {
        out.push(Violation {
            rule: Rule::Totals,
            model: None,
            message: format!(
                "objective {:.4} reported, recomputed {objective:.4}",
                plan.objective
            ),
        });
    }
    out
}
