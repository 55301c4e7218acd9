//! Re-planning while running (`poolpipe run --plan P --control`).
//!
//! A thread looks at every planned flow's counters once a second and feeds them to the
//! [`Controller`] ([`crate::control`]): when the demand mix leaves its band or attainment stays
//! low, it re-solves the plan (warm-started from the running one, time-limited, a cost per
//! process started) and applies it live:
//!
//! - a pipeline of the new plan that the running plan already runs (same stages: device class,
//!   blocks, share, processes, batch) keeps running and only gets its new share of the flow;
//! - a new pipeline gets new stages (named `FLOW.eN.pK.sJ`, N the re-plan's number), engines and
//!   threads, started before any frame is sent to it;
//! - each flow's admission then switches to the new set of routes at its next frame, and lets go
//!   of the routes no longer planned: their stages finish the frames they hold (published or
//!   counted) and end.
//!
//! So frames in flight finish under the old plan, and every frame keeps exactly one outcome.
//! Stages and routes are only ever appended (indices never move); retired ones stay listed in
//! `/status` with their counters (`"active": false`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::PipelineError;
use super::build::{BuiltRoute, Wiring, build_engines, lock};
use super::live::Live;
use crate::admission::RouteEntry;
use crate::config::{Pipeline, StageSpec, assign_free_devices, planned_stages};
use crate::control::{ControlSettings, Controller, Problem};
use crate::planner::{Cluster, ModelSpec, Options, Plan};
use crate::profile::Profiles;
use crate::recurrent::StreamResets;

/// The re-planner of a running pipeline, before its thread starts.
pub(super) struct Replanner {
    installer: Installer,
    controller: Controller,
    profiles: std::sync::Arc<Profiles>,
    cluster: Cluster,
    specs: Vec<ModelSpec>,
    opts: Options,
    current: Plan,
    /// Per model of the plan: the flow that serves it.
    flows: Vec<usize>,
    /// Re-plans applied.
    epoch: u32,
    /// Looks where the mix had left its band but the running plan had room for it.
    skipped: u64,
}

/// The re-planner's thread.
pub(super) struct ReplanHandle {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl ReplanHandle {
    /// Stops the thread (a solve in progress finishes first, within its time limit) and waits
    /// for it.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

fn refuse(why: impl Into<String>) -> PipelineError {
    PipelineError::Control(why.into())
}

impl Replanner {
    /// A re-planner of `p` (which must be served by a plan, every flow by one of its models)
    /// with the routes' admission entries as they were started.
    pub fn new(
        p: &Pipeline,
        settings: ControlSettings,
        wiring: Wiring,
        entries: Vec<Vec<RouteEntry>>,
        resets: Arc<StreamResets>,
        live: Arc<Live>,
    ) -> Result<Self, PipelineError> {
        settings.check().map_err(|e| refuse(e.to_string()))?;
        let Some(plan) = &p.plan else {
            return Err(refuse(
                "re-planning (--control) needs a pipeline served by a plan (--plan PLAN.json or [pipeline] plan)",
            ));
        };
        if let Some(f) = p.flows.iter().find(|f| !f.family.is_empty()) {
            return Err(refuse(format!(
                "flow `{}` serves a model family: re-planning a family while running is not supported (run its plan without --control)",
                f.name
            )));
        }
        let (cluster, specs, opts) = plan.plan.problem();
        let mut flows = Vec::new();
        for s in &specs {
            match p
                .flows
                .iter()
                .position(|f| f.model.as_deref() == Some(s.name.as_str()))
            {
                Some(i) => flows.push(i),
                None => {
                    return Err(refuse(format!(
                        "no flow serves the plan's model `{}`",
                        s.name
                    )));
                }
            }
        }
        if let Some(f) = p.flows.iter().find(|f| f.model.is_none()) {
            return Err(refuse(format!(
                "flow `{}` has hand-written stages: re-planning needs every flow served by the plan (`model`)",
                f.name
            )));
        }
        let profiles = plan.profiles.clone().ok_or_else(|| {
            refuse("the pipeline was loaded without latency profiles".to_string())
        })?;
        let weights: Vec<f64> = specs.iter().map(|s| s.weight).collect();
        Ok(Replanner {
            installer: Installer::new(live, wiring, entries, resets, None),
            controller: Controller::new(settings, &weights),
            profiles,
            cluster,
            specs,
            opts,
            current: plan.plan.clone(),
            flows,
            epoch: 0,
            skipped: 0,
        })
    }

    /// Starts the thread that looks once every `interval`.
    pub fn spawn(mut self) -> Result<ReplanHandle, PipelineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let interval = Duration::from_nanos(self.controller.settings().interval.max(1));
        let thread = std::thread::Builder::new()
            .name("replan".into())
            .spawn(move || {
                let mut next = Instant::now() + interval;
                while !stopped.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                    let now = Instant::now();
                    if now < next {
                        continue;
                    }
                    // A steady beat; after a long solve it starts again from now.
                    next = if now - next > interval {
                        now + interval
                    } else {
                        next + interval
                    };
                    self.look();
                }
            })?;
        Ok(ReplanHandle { stop, thread })
    }

    /// One look: the counters to the controller, and a re-plan applied when it asks for one.
    fn look(&mut self) {
        let now = self.installer.wiring.clock.now();
        let totals = self.installer.live.stats.flow_totals();
        let of = |f: usize| totals.get(f).cloned().unwrap_or_default();
        let arrived: Vec<u64> = self.flows.iter().map(|&f| of(f).ingested).collect();
        let resolved: Vec<u64> = self.flows.iter().map(|&f| of(f).resolved()).collect();
        let on_time: Vec<u64> = self.flows.iter().map(|&f| of(f).published).collect();
        let problem = Problem {
            profiles: &self.profiles,
            cluster: &self.cluster,
            specs: &self.specs,
            opts: &self.opts,
        };
        let Some((mut entry, plan)) = self.controller.look_and_replan(
            now,
            [&arrived, &resolved, &on_time],
            &self.current,
            &problem,
            &mut self.skipped,
        ) else {
            return;
        };
        if let Some(plan) = plan {
            match self.apply(&plan) {
                Ok((started, retired)) => {
                    tracing::info!(
                        routes_started = started,
                        routes_retired = retired,
                        "Re-plan applied: {entry}"
                    );
                    self.current = plan;
                }
                Err(e) => {
                    entry.error = Some(format!("the new plan could not be started: {e}"));
                    entry.after = entry.before;
                }
            }
        }
        if entry.error.is_some() {
            tracing::warn!("Re-plan failed (the running plan stays): {entry}");
        }
        lock(&self.installer.live.replans).push(entry);
    }

    /// Runs `plan` from now on: keeps the routes it shares with the running plan, starts the
    /// others, and retires the rest. Returns the routes started and retired.
    fn apply(&mut self, plan: &Plan) -> Result<(usize, usize), PipelineError> {
        let epoch = self.epoch + 1;
        let mut next = lock(&self.installer.live.pipeline).clone();
        let first_new = next.stages.len();
        let mut started = Vec::new();
        let mut retired = Vec::new();
        for (m, &fi) in self.flows.iter().enumerate() {
            let flow = next.flows[fi].name.clone();
            let margin_ms = next.flows[fi]
                .routes
                .first()
                .and_then(|r| next.routes[*r].stages.first())
                .map_or(2.0, |s| next.stages[*s].margin.as_secs_f64() * 1e3);
            let chains =
                planned_stages(&flow, &self.specs[m].name, margin_ms, plan, &self.profiles);
            let mut old = next.flows[fi].routes.clone();
            let mut routes = Vec::new();
            for (k, (mut chain, weight)) in chains.into_iter().enumerate() {
                if let Some(pos) = old.iter().position(|r| same_chain(&next, *r, &chain)) {
                    let r = old.remove(pos);
                    next.routes[r].weight = weight;
                    routes.push(r);
                    continue;
                }
                for (j, st) in chain.iter_mut().enumerate() {
                    st.name = format!("{flow}.e{epoch}.p{k}.s{j}");
                }
                routes.push(next.append_route(fi, chain, weight));
                started.push(next.routes.len() - 1);
            }
            retired.extend(old);
            next.flows[fi].routes = routes;
        }
        if let Some(r) = next.plan.as_mut() {
            r.plan = plan.clone();
        }
        self.installer
            .install(next, first_new, &started, &retired, &self.flows)?;
        self.epoch = epoch;
        Ok((started.len(), retired.len()))
    }
}

/// Whether route `r` of `p` runs the same stages as `chain`: device class, blocks, share,
/// processes and batch.
fn same_chain(p: &Pipeline, r: usize, chain: &[StageSpec]) -> bool {
    let route = &p.routes[r].stages;
    let key = |s: &StageSpec| {
        (
            s.device.to_string(),
            s.profile.as_ref().map(|x| (x.blocks, x.share)),
            s.workers,
            s.max_batch,
        )
    };
    route.len() == chain.len()
        && route
            .iter()
            .zip(chain)
            .all(|(i, c)| key(&p.stages[*i]) == key(c))
}

/// Starts new routes in a running pipeline and switches its flows to them: what a re-plan and
/// a controller's epoch ([`super::epochs`]) both do once they know the next layout.
pub(super) struct Installer {
    pub live: Arc<Live>,
    pub wiring: Wiring,
    /// The admission entry of every route that runs now, by route index.
    pub entries: HashMap<usize, RouteEntry>,
    pub resets: Arc<StreamResets>,
    /// Links to the other nodes of a `[cluster]`, with their measured Gbit/s.
    pub peers: Option<(
        Arc<crate::cluster::link::Peers>,
        std::collections::BTreeMap<String, f64>,
    )>,
}

/// Longest wait for a node that joined the cluster to answer the front.
pub const JOIN_WAIT: Duration = Duration::from_secs(5);

impl Installer {
    pub fn new(
        live: Arc<Live>,
        wiring: Wiring,
        entries: Vec<Vec<RouteEntry>>,
        resets: Arc<StreamResets>,
        peers: Option<(
            Arc<crate::cluster::link::Peers>,
            std::collections::BTreeMap<String, f64>,
        )>,
    ) -> Self {
        Installer {
            live,
            wiring,
            entries: entries
                .into_iter()
                .flatten()
                .map(|e| (e.route, e))
                .collect(),
            resets,
            peers,
        }
    }

    /// Links to the nodes of `next`'s `[cluster]` this front has none to yet (they joined the
    /// cluster since it started): waited for (at most [`JOIN_WAIT`]; one that does not answer
    /// takes no batches until it does), their links measured, their counters in the summary.
    pub fn reach_new_nodes(&mut self, next: &Pipeline) -> Result<(), PipelineError> {
        let (Some((peers, measured)), Some(c)) = (self.peers.as_mut(), next.cluster.as_ref())
        else {
            return Ok(());
        };
        let added = peers
            .learn(&c.nodes)
            .map_err(|e| PipelineError::Cluster(e.to_string()))?;
        if added.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = added.iter().map(|p| p.name().to_string()).collect();
        for p in &added {
            self.live
                .stats
                .register_node(p.name(), p.counters().clone());
        }
        if let Err(e) = peers.wait_for(&names, JOIN_WAIT) {
            tracing::warn!(error = %e, "A node that joined does not answer yet.");
        }
        let limit = crate::cluster::message_limit(next);
        for (node, gbps) in peers.measure_some(&names, super::PROBE_BYTES.min(limit / 2)) {
            tracing::info!(node = %node, gbps = format!("{gbps:.2}"), "Node joined; link measured.");
            measured.insert(node, gbps);
        }
        Ok(())
    }

    /// Makes `next` the running layout: `next` is the running one with stages from `first_new`
    /// on and routes `started` appended, and `retired` left out of its flows' routes. Builds
    /// the new stages (nothing is sent to them yet), then switches the admissions of `flows`.
    pub fn install(
        &mut self,
        mut next: Pipeline,
        first_new: usize,
        started: &[usize],
        retired: &[usize],
        flows: &[usize],
    ) -> Result<(), PipelineError> {
        if let Some((_, measured)) = &self.peers {
            // Kept stages were charged when they started: charging moves a cut's transfer
            // from one stage to the next once, so a second pass changes nothing of theirs.
            crate::cluster::charge_transfers_to_remote_stages(&mut next, measured);
        }
        // The new stages' processes go to the devices the kept stages leave free (those of the
        // retired stages, which drain meanwhile, among them).
        let taken: std::collections::HashSet<String> = next
            .flows
            .iter()
            .flat_map(|f| &f.routes)
            .flat_map(|r| &next.routes[*r].stages)
            .filter(|i| **i < first_new)
            .flat_map(|i| next.stages[*i].devices.iter().cloned())
            .collect();
        assign_free_devices(&mut next.stages[first_new..], &taken);

        // Engines and threads of the new routes; nothing is sent to them yet.
        let mut engines = build_engines(
            &next,
            first_new..next.stages.len(),
            &self.resets,
            self.peers.as_ref().map(|(p, _)| &**p),
        )?;
        let stats = &self.live.stats;
        if stats.stage_count() != first_new {
            return Err(refuse(format!(
                "the counters have {} stages where the pipeline has {first_new}",
                stats.stage_count()
            )));
        }
        for s in &next.stages[first_new..] {
            stats.add_stage(s.name.clone());
        }
        let mut built: Vec<BuiltRoute> = Vec::new();
        for &ri in started {
            built.push(self.wiring.route(&next, ri, &mut engines)?);
        }
        {
            let mut queues = lock(&self.live.queues);
            let mut new: Vec<_> = built.iter_mut().flat_map(|b| b.queues.drain(..)).collect();
            new.sort_by_key(|(i, _)| *i);
            for (i, q) in new {
                debug_assert_eq!(i, queues.len());
                queues.push(q);
            }
        }
        for b in built {
            self.entries.insert(b.entry.route, b.entry);
        }

        // The layout becomes the running one (streams may have changed meanwhile: only the
        // stages, routes and plan are taken), then each flow switches routes.
        {
            let mut running = lock(&self.live.pipeline);
            running.stages = next.stages.clone();
            running.routes = next.routes.clone();
            for (r, n) in running.flows.iter_mut().zip(&next.flows) {
                r.routes = n.routes.clone();
            }
            running.plan = next.plan.clone();
        }
        for r in retired {
            self.entries.remove(r);
        }
        for &fi in flows {
            let routes: Vec<RouteEntry> = next.flows[fi]
                .routes
                .iter()
                .filter_map(|r| {
                    let mut e = self.entries.get(r)?.clone();
                    e.weight = next.routes[*r].weight;
                    Some(e)
                })
                .collect();
            if let Some(a) = self.live.admissions.get(fi) {
                a.set_routes(routes);
            }
        }
        Ok(())
    }
}
