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
    /// Where several fronts share the cameras (`[cluster] fronts`): each front's sources and
    /// routes, by shard. Empty: one front runs them all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<Shard>,
    /// Seconds the solve and placement took.
    pub plan_s: f64,
    /// When it was published, ms since the Unix epoch.
    pub at_unix_ms: u64,
}

/// One front's share of the cameras: its sources, and the routes (indices into
/// [`Epoch::routes`]) that serve them. Routes are not shared: each front makes the
/// reservations of its own routes' workers, as one front does for all of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub sources: Vec<String>,
    pub routes: Vec<usize>,
}

impl Epoch {
    /// What the front of shards `ks` runs: the routes (indices into [`Epoch::routes`]) and
    /// the cameras (`None`: every one). An epoch without shards is one shard: shard 0 runs
    /// everything, any other nothing (fronts that the file says share the cameras never both
    /// run them all, whatever the epoch says).
    fn share(&self, ks: &[u32]) -> (Vec<usize>, Option<Vec<&str>>) {
        if self.shards.is_empty() {
            return if ks.contains(&0) {
                ((0..self.routes.len()).collect(), None)
            } else {
                (Vec::new(), Some(Vec::new()))
            };
        }
        let mine = || {
            self.shards
                .iter()
                .enumerate()
                .filter(|(k, _)| ks.contains(&(*k as u32)))
                .map(|(_, s)| s)
        };
        (
            mine().flat_map(|s| s.routes.iter().copied()).collect(),
            Some(
                mine()
                    .flat_map(|s| s.sources.iter().map(String::as_str))
                    .collect(),
            ),
        )
    }

    /// The epoch as the front of shards `ks` runs it: only those shards' routes.
    pub fn for_shards(&self, ks: &[u32]) -> Epoch {
        let mut e = self.clone();
        e.routes = self
            .share(ks)
            .0
            .into_iter()
            .filter_map(|r| self.routes.get(r).cloned())
            .collect();
        e
    }

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

/// `base` laid out as epoch `e` for the front of shards `ks`: those shards' sources and routes
/// ([`Epoch::for_shards`], [`epoch_pipeline`]).
pub fn shard_pipeline(
    base: &Pipeline,
    e: &Epoch,
    ks: &[u32],
    profiles: &Profiles,
) -> Result<Pipeline, EpochError> {
    let mut mine = base.clone();
    if let (_, Some(cameras)) = e.share(ks) {
        mine.sources.retain(|s| cameras.contains(&s.name.as_str()));
    }
    epoch_pipeline(&mine, &e.for_shards(ks), profiles)
}

/// Splits the cameras of `sources` (name, flow) and the `routes` of `plan` over `fronts`
/// shards. A route belongs to one shard (its front makes its reservations); a flow with `r`
/// routes is spread over at most `r` shards (those that ran its cameras in `prev` first, then
/// the least loaded ones by planned frames/s), its
/// routes largest first each to the least loaded of those, and its sources over them in
/// proportion to their routes' planned rates. A source stays in the shard `prev` had it in
/// where that shard still serves its flow and has room, so a re-plan moves few cameras. A flow
/// without routes keeps its sources in one shard. One shard (or none) where `fronts` is 1.
pub fn shard(
    plan: &Plan,
    routes: &[EpochRoute],
    sources: &[(String, String)],
    fronts: u32,
    prev: Option<&Epoch>,
) -> Vec<Shard> {
    if fronts <= 1 {
        return Vec::new();
    }
    let k = fronts as usize;
    let rate = |r: &EpochRoute| {
        plan.models
            .iter()
            .find(|m| m.name == r.model)
            .and_then(|m| m.pipelines.get(r.pipeline))
            .map_or(0.0, |p| p.throughput)
    };
    let was_in = |name: &str| {
        prev.and_then(|e| {
            e.shards
                .iter()
                .position(|s| s.sources.iter().any(|x| x == name))
        })
    };
    let mut out = vec![Shard::default(); k];
    let mut load = vec![0.0f64; k];
    let mut flows: Vec<&str> = Vec::new();
    for f in routes
        .iter()
        .map(|r| r.flow.as_str())
        .chain(sources.iter().map(|s| s.1.as_str()))
    {
        if !flows.contains(&f) {
            flows.push(f);
        }
    }
    for (fi, flow) in flows.iter().enumerate() {
        let mut mine: Vec<usize> = (0..routes.len())
            .filter(|r| routes[*r].flow == *flow)
            .collect();
        mine.sort_by(|a, b| {
            rate(&routes[*b])
                .total_cmp(&rate(&routes[*a]))
                .then(a.cmp(b))
        });
        let cams: Vec<&str> = sources
            .iter()
            .filter(|s| s.1 == *flow)
            .map(|s| s.0.as_str())
            .collect();
        if mine.is_empty() {
            let to = fi % k;
            out[to].sources.extend(cams.iter().map(|c| c.to_string()));
            continue;
        }
        // As many shards as the flow has routes: those that ran its cameras before first, then
        // the least loaded.
        let hosted: Vec<bool> = (0..k)
            .map(|s| cams.iter().any(|c| was_in(c) == Some(s)))
            .collect();
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|a, b| {
            hosted[*b]
                .cmp(&hosted[*a])
                .then(load[*a].total_cmp(&load[*b]))
                .then(a.cmp(b))
        });
        order.truncate(mine.len().min(k));
        let mut got = vec![0.0f64; k];
        for r in mine {
            let to = *order
                .iter()
                .min_by(|a, b| got[**a].total_cmp(&got[**b]).then(a.cmp(b)))
                .expect("one shard at least");
            got[to] += rate(&routes[r]).max(1e-9);
            out[to].routes.push(r);
        }
        // Cameras in proportion to the shards' rates for the flow (largest remainder).
        let total: f64 = order.iter().map(|s| got[*s]).sum();
        let n = cams.len();
        let mut room: Vec<(usize, usize, f64)> = order
            .iter()
            .map(|s| {
                let exact = n as f64 * got[*s] / total;
                (*s, exact.floor() as usize, exact - exact.floor())
            })
            .collect();
        let mut left = n - room.iter().map(|r| r.1).sum::<usize>();
        room.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
        for r in room.iter_mut() {
            if left == 0 {
                break;
            }
            r.1 += 1;
            left -= 1;
        }
        let mut room: BTreeMap<usize, usize> = room.into_iter().map(|r| (r.0, r.1)).collect();
        let mut placed: Vec<Option<usize>> = vec![None; n];
        for (i, c) in cams.iter().enumerate() {
            if let Some(s) = was_in(c)
                && let Some(left) = room.get_mut(&s)
                && *left > 0
            {
                *left -= 1;
                placed[i] = Some(s);
            }
        }
        for (i, c) in cams.iter().enumerate() {
            let s = match placed[i] {
                Some(s) => s,
                None => {
                    let s = *room
                        .iter()
                        .find(|(_, left)| **left > 0)
                        .map(|(s, _)| s)
                        .expect("room for every camera");
                    *room.get_mut(&s).expect("known shard") -= 1;
                    s
                }
            };
            out[s].sources.push(c.to_string());
        }
        for s in order {
            load[s] += got[s];
        }
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan whose models have pipelines of these rates (frames/s), and their routes.
    fn plan_of(models: &[(&str, &[f64])]) -> (Plan, Vec<EpochRoute>) {
        let models: Vec<serde_json::Value> = models
            .iter()
            .map(|(name, rates)| {
                serde_json::json!({
                    "name": name, "weight": 1.0, "slo_ms": 100.0, "slo_basis": "", "throughput": 0.0,
                    "pipelines": rates.iter().map(|r| serde_json::json!({
                        "batch": 1, "throughput": r, "latency_ms": 1.0, "stages": [],
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let plan: Plan = serde_json::from_value(serde_json::json!({
            "mode": "poolpipe", "objective": 0.0, "solve_seconds": 0.0, "gap": 0.0,
            "status": "optimal", "candidates": 0, "bandwidth_gbps": 10.0, "margin": 0.0,
            "queueing": 0.0, "pool_tiers": [], "max_stages": 2, "classes": [], "models": models,
        }))
        .unwrap();
        let flows: Vec<(String, String)> = plan
            .models
            .iter()
            .map(|m| (format!("f-{}", m.name), m.name.clone()))
            .collect();
        let routes = name_routes(&plan, &flows, 0, None);
        (plan, routes)
    }

    fn cams(flow: &str, n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("{flow}-cam{i}"), flow.to_string()))
            .collect()
    }

    #[test]
    fn shards_split_routes_and_cameras_by_planned_rate_and_keep_cameras_where_they_were() {
        let (plan, routes) = plan_of(&[("a", &[30.0, 10.0]), ("b", &[20.0])]);
        let mut sources = cams("f-a", 8);
        sources.extend(cams("f-b", 3));
        // One front: no shards at all.
        assert!(shard(&plan, &routes, &sources, 1, None).is_empty());
        let s = shard(&plan, &routes, &sources, 2, None);
        assert_eq!(s.len(), 2);
        // a's routes on both shards, the larger first on shard 0; b's one route on the less
        // loaded shard (1: 10 of a against 30), with all of b's cameras.
        assert_eq!(s[0].routes, [0]);
        assert_eq!(s[1].routes, [1, 2]);
        let count = |k: usize, flow: &str| {
            s[k].sources
                .iter()
                .filter(|c| c.starts_with(&format!("{flow}-")))
                .count()
        };
        // a's 8 cameras 3:1 by rate.
        assert_eq!((count(0, "f-a"), count(1, "f-a")), (6, 2));
        assert_eq!((count(0, "f-b"), count(1, "f-b")), (0, 3));
        // Every camera and every route exactly once.
        let mut all: Vec<String> = s.iter().flat_map(|x| x.sources.clone()).collect();
        all.sort();
        let mut want: Vec<String> = sources.iter().map(|x| x.0.clone()).collect();
        want.sort();
        assert_eq!(all, want);
        // More fronts than routes: the extra front gets nothing.
        let s3 = shard(&plan, &routes, &sources, 4, None);
        assert_eq!(s3.iter().filter(|x| x.routes.is_empty()).count(), 1);
        assert!(
            s3.iter()
                .all(|x| !x.routes.is_empty() || x.sources.is_empty())
        );

        // A re-plan that keeps a's two routes with other rates: cameras stay where they were as
        // far as the new proportions allow.
        let e = Epoch {
            epoch: 0,
            members: Vec::new(),
            reason: String::new(),
            plan: plan.clone(),
            routes: routes.clone(),
            addresses: BTreeMap::new(),
            shards: s.clone(),
            plan_s: 0.0,
            at_unix_ms: 0,
        };
        let (plan2, routes2) = plan_of(&[("a", &[20.0, 20.0]), ("b", &[20.0])]);
        let s2 = shard(&plan2, &routes2, &sources, 2, Some(&e));
        let moved = s2
            .iter()
            .enumerate()
            .flat_map(|(k, x)| x.sources.iter().map(move |c| (k, c.clone())))
            .filter(|(k, c)| !s[*k].sources.contains(c))
            .count();
        let a_on = |sh: &[Shard], k: usize| {
            sh[k]
                .sources
                .iter()
                .filter(|c| c.starts_with("f-a-"))
                .count()
        };
        assert_eq!(a_on(&s2, 0) + a_on(&s2, 1), 8);
        // b stays on shard 1; a goes 4:4, so two of its cameras move.
        assert_eq!(moved, 2, "{s:?} -> {s2:?}");

        // A flow that lost every route keeps its cameras in one shard.
        let (plan3, routes3) = plan_of(&[("a", &[30.0])]);
        let s4 = shard(&plan3, &routes3, &sources, 2, None);
        assert_eq!(
            s4.iter()
                .map(|x| x.sources.iter().filter(|c| c.starts_with("f-b-")).count())
                .filter(|n| *n > 0)
                .collect::<Vec<_>>(),
            [3]
        );
    }

    #[test]
    fn a_shard_of_an_epoch_runs_only_its_routes() {
        let (plan, routes) = plan_of(&[("a", &[30.0, 10.0])]);
        let mut e = Epoch {
            epoch: 3,
            members: Vec::new(),
            reason: String::new(),
            plan,
            routes: routes.clone(),
            addresses: BTreeMap::new(),
            shards: Vec::new(),
            plan_s: 0.0,
            at_unix_ms: 0,
        };
        assert_eq!(e.for_shards(&[0]).routes, routes);
        // Without shards, only shard 0 runs anything.
        assert!(e.for_shards(&[1]).routes.is_empty());
        e.shards = vec![
            Shard {
                sources: vec!["c0".into()],
                routes: vec![1],
            },
            Shard::default(),
        ];
        assert_eq!(e.for_shards(&[0]).routes, vec![routes[1].clone()]);
        assert!(e.for_shards(&[1]).routes.is_empty());
        assert!(e.for_shards(&[7]).routes.is_empty());
        e.shards[1].routes = vec![0];
        assert_eq!(
            e.for_shards(&[0, 1]).routes,
            vec![routes[1].clone(), routes[0].clone()]
        );
    }
}
