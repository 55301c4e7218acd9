//! Plan epochs: the layout of a cluster pipeline as the controller publishes it.
//!
//! An epoch is a placed plan plus the names of its routes' stages. Every process derives the
//! same stages from it ([`epoch_pipeline`]): the front builds the routes it does not run yet and
//! retires the others, a node builds the workers placed on it. A route the next plan runs
//! unchanged (same classes, blocks, shares, processes, batch and nodes) keeps its names
//! ([`name_routes`]), so the processes keep running it; every other route gets names of its
//! epoch (`FLOW.eN.pK.sJ`). Epoch 0 is the file's plan, named as the file names it
//! (`FLOW.pK.sJ`).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::config::{Pipeline, assign_free_devices, placed_nodes, planned_stages};
use crate::planner::placement::{Server, place};
use crate::planner::{Cluster, Plan, cluster::ClassSpec};
use crate::profile::Profiles;

/// Why an epoch cannot be made or followed.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// The pipeline's plan has no placement.
    #[error("the plan has no placement (place it: `poolpipe place --out` or `poolpipe deploy`)")]
    NotPlaced,
    /// No live server holds a class the problem needs, or the solve failed.
    #[error("re-plan on {on}: {detail}")]
    Plan { on: String, detail: String },
    /// An epoch names a route its plan does not have.
    #[error("epoch {epoch}: flow `{flow}` route {pipeline} is not in its plan")]
    Route {
        epoch: u64,
        flow: String,
        pipeline: usize,
    },
    /// A flow of the pipeline is not served by a model of the plan.
    #[error(
        "flow `{0}` is not served by the plan (`model`): a controller re-plans planned flows only"
    )]
    Unplanned(String),
}

/// One route of an epoch: pipeline `pipeline` of the plan's model `model`, serving `flow`, with
/// the names of its stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRoute {
    pub flow: String,
    pub model: String,
    pub pipeline: usize,
    pub stages: Vec<String>,
}

/// A plan epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Epoch {
    /// Number, from 0 (the file's plan), one up per re-plan.
    pub epoch: u64,
    /// The nodes it was planned on (up when it was planned), the front first.
    pub members: Vec<String>,
    /// Why it was made.
    pub reason: String,
    /// The plan, placed on the members' servers.
    pub plan: Plan,
    /// Every route, with its stages' names.
    pub routes: Vec<EpochRoute>,
    /// `HOST:PORT` of the members the file does not name (they joined by an offer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub addresses: BTreeMap<String, String>,
    /// Seconds the solve and placement took.
    pub plan_s: f64,
    /// When it was published, ms since the Unix epoch.
    pub at_unix_ms: u64,
}

impl Epoch {
    /// The nodes other than `front` that run a process of it.
    pub fn used_nodes(&self, front: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .plan
            .placement
            .iter()
            .flat_map(|pl| {
                pl.processes
                    .iter()
                    .map(|p| pl.servers[p.server].name.clone())
            })
            .filter(|n| n != front)
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Flows of `p` with the plan's model each serves.
pub fn planned_flows(p: &Pipeline) -> Result<Vec<(String, String)>, EpochError> {
    p.flows
        .iter()
        .map(|f| match &f.model {
            Some(m) if f.family.is_empty() => Ok((f.name.clone(), m.clone())),
            _ => Err(EpochError::Unplanned(f.name.clone())),
        })
        .collect()
}

/// What makes two routes the same running thing: per stage the class, blocks, share,
/// processes, batch and the node of each process.
type RouteKey = Vec<(String, [usize; 2], u32, u32, usize, Vec<String>)>;

fn route_key(plan: &Plan, model: &str, k: usize) -> Option<RouteKey> {
    let m = plan.models.iter().find(|m| m.name == model)?;
    let p = m.pipelines.get(k)?;
    Some(
        p.stages
            .iter()
            .enumerate()
            .map(|(j, st)| {
                (
                    st.class.clone(),
                    st.blocks,
                    st.share.max(1),
                    st.processes,
                    p.batch,
                    placed_nodes(plan, model, k, j),
                )
            })
            .collect(),
    )
}

/// The routes of epoch `n` of `plan` for `flows` (flow, model): a route that `prev` runs with
/// the same key keeps its names; the others are named for epoch `n` (epoch 0: as the file
/// names them).
pub fn name_routes(
    plan: &Plan,
    flows: &[(String, String)],
    n: u64,
    prev: Option<&Epoch>,
) -> Vec<EpochRoute> {
    let mut taken: HashSet<usize> = HashSet::new();
    let mut out = Vec::new();
    for (flow, model) in flows {
        let Some(m) = plan.models.iter().find(|m| &m.name == model) else {
            continue;
        };
        for (k, p) in m.pipelines.iter().enumerate() {
            let key = route_key(plan, model, k);
            let kept = prev.and_then(|e| {
                e.routes.iter().enumerate().find_map(|(i, r)| {
                    (!taken.contains(&i)
                        && &r.flow == flow
                        && &r.model == model
                        && route_key(&e.plan, model, r.pipeline) == key)
                        .then_some((i, r.stages.clone()))
                })
            });
            let stages = match kept {
                Some((i, names)) => {
                    taken.insert(i);
                    names
                }
                None => (0..p.stages.len())
                    .map(|j| {
                        if n == 0 {
                            format!("{flow}.p{k}.s{j}")
                        } else {
                            format!("{flow}.e{n}.p{k}.s{j}")
                        }
                    })
                    .collect(),
            };
            out.push(EpochRoute {
                flow: flow.clone(),
                model: model.clone(),
                pipeline: k,
                stages,
            });
        }
    }
    out
}

/// `base` (the file's pipeline) laid out as epoch `e`: its stages and routes those of the
/// epoch's plan, named as the epoch names them, each process on its placed node; the nodes that
/// joined by an offer are added to its `[cluster]` with their addresses.
pub fn epoch_pipeline(
    base: &Pipeline,
    e: &Epoch,
    profiles: &Profiles,
) -> Result<Pipeline, EpochError> {
    let mut next = base.clone();
    if let Some(c) = next.cluster.as_mut() {
        for (node, addr) in &e.addresses {
            if node != &c.front {
                c.nodes.entry(node.clone()).or_insert_with(|| addr.clone());
            }
        }
    }
    next.stages.clear();
    next.routes.clear();
    for f in &mut next.flows {
        f.routes.clear();
    }
    for r in &e.routes {
        let Some(fi) = base.flows.iter().position(|f| f.name == r.flow) else {
            continue;
        };
        let margin_ms = base.flows[fi]
            .routes
            .first()
            .and_then(|x| base.routes[*x].stages.first())
            .map_or(2.0, |s| base.stages[*s].margin.as_secs_f64() * 1e3);
        let mut chains = planned_stages(&r.flow, &r.model, margin_ms, &e.plan, profiles);
        if r.pipeline >= chains.len() || chains[r.pipeline].0.len() != r.stages.len() {
            return Err(EpochError::Route {
                epoch: e.epoch,
                flow: r.flow.clone(),
                pipeline: r.pipeline,
            });
        }
        let (mut chain, weight) = chains.swap_remove(r.pipeline);
        for (j, (st, name)) in chain.iter_mut().zip(&r.stages).enumerate() {
            st.name = name.clone();
            st.nodes = placed_nodes(&e.plan, &r.model, r.pipeline, j);
        }
        let ri = next.append_route(fi, chain, weight);
        next.flows[fi].routes.push(ri);
    }
    assign_free_devices(&mut next.stages, &HashSet::new());
    if let Some(p) = next.plan.as_mut() {
        p.plan = e.plan.clone();
    }
    Ok(next)
}

/// The servers of `placed_on` (the file's placement) that are among `members`.
pub fn live_servers(placed_on: &[Server], members: &[String]) -> Vec<Server> {
    placed_on
        .iter()
        .filter(|s| members.contains(&s.name))
        .cloned()
        .collect()
}

/// Plans the problem of `original` again on `servers` (within `time_limit`) and places it on
/// them.
pub fn replan_on(
    original: &Plan,
    servers: &[Server],
    profiles: &Profiles,
    time_limit: std::time::Duration,
) -> Result<Plan, EpochError> {
    let (cluster, specs, mut opts) = original.problem();
    let mut per_class: BTreeMap<String, u32> = BTreeMap::new();
    for s in servers {
        *per_class.entry(s.class.clone()).or_default() += s.gpus;
    }
    let on = if per_class.is_empty() {
        "no servers".to_string()
    } else {
        per_class
            .iter()
            .map(|(c, n)| format!("{c}:{n}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let fail = |detail: String| EpochError::Plan {
        on: on.clone(),
        detail,
    };
    let cluster = Cluster {
        classes: per_class
            .into_iter()
            .map(|(name, count)| ClassSpec { name, count })
            .collect(),
        bandwidth_gbps: cluster.bandwidth_gbps,
    };
    if cluster.classes.is_empty() {
        return Err(fail("no server is up".into()));
    }
    opts.time_limit = time_limit;
    let mut plan =
        crate::planner::plan(profiles, &cluster, &specs, &opts).map_err(|e| fail(e.to_string()))?;
    let placed = place(&plan, servers, &|m, after| profiles.cut_bytes(m, after))
        .map_err(|e| fail(e.to_string()))?;
    plan.placement = Some(placed);
    Ok(plan)
}
