//! The front following a controller's plan epochs (`[cluster] nats`).
//!
//! A thread reads each epoch the controller publishes, waits until every node the epoch places
//! processes on says (in its heartbeat) that it applied it (at most [`NODE_APPLY_WAIT`]; a node
//! whose link is down is not waited for), then applies it the way a re-plan is applied: routes
//! whose stages the epoch names as running ones keep running, the others start (engines on this
//! node, remote runners for the nodes'), each flow's admission switches at its next frame, and
//! the routes left out drain and end. Frames in flight finish where they are.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use super::PipelineError;
use super::build::lock;
use super::replan::Installer;
use crate::cluster::bus::{Bus, Heartbeat};
use crate::cluster::epoch::{Epoch, shard_pipeline};
use crate::config::Pipeline;
use crate::profile::Profiles;

/// Longest wait for the nodes to apply an epoch before the front applies it anyway.
pub const NODE_APPLY_WAIT: Duration = Duration::from_secs(10);

/// How long another shard's front lease must be free, as a front that runs a share sees it,
/// before that front takes the shard over too: two lease lives, so a standby (which tries
/// every 200 ms) or a front that is starting takes it first.
pub const ADOPT_AFTER: Duration = Duration::from_secs(6);

/// A front that shares the cameras with others, taking over the shares whose fronts are gone
/// and no standby took: it takes the shard's front lease and runs the shard's cameras and
/// routes beside its own, until that lease is lost.
pub(super) struct Adopter {
    /// This front's id in the leases.
    pub id: String,
    /// How many shards there are.
    pub fronts: u32,
    /// Leases of the shards taken over, with the flag raised where one is lost.
    held: Vec<(u32, crate::cluster::bus::LeaseKeeper, Arc<AtomicBool>)>,
    /// Since when each other shard's lease has been seen free, without a break.
    free_since: HashMap<u32, Instant>,
    checked: Instant,
}

impl Adopter {
    pub fn new(id: String, fronts: u32) -> Self {
        Adopter {
            id,
            fronts,
            held: Vec::new(),
            free_since: HashMap::new(),
            checked: Instant::now(),
        }
    }

    /// Looks (once a second) at the shards `shards` does not hold: takes over one whose lease
    /// has been free for [`ADOPT_AFTER`], and gives up one whose lease was lost. Returns what
    /// changed, for the epoch record, or `None`.
    fn look(&mut self, bus: &Arc<Bus>, shards: &mut Vec<u32>) -> Option<String> {
        use crate::cluster::bus::{Lease, LeaseKeeper, READ_WAIT};
        if let Some(i) = self
            .held
            .iter()
            .position(|(_, _, lost)| lost.load(Ordering::SeqCst))
        {
            let (k, _, _) = self.held.remove(i);
            shards.retain(|s| *s != k);
            tracing::warn!(
                shard = k,
                "The front lease of a shard taken over was lost: its cameras go."
            );
            return Some(format!("gave up shard {k}: its lease was taken"));
        }
        if self.checked.elapsed() < Duration::from_secs(1) {
            return None;
        }
        self.checked = Instant::now();
        for k in (0..self.fronts).filter(|k| !shards.contains(k)) {
            match bus.lease_holder(Lease::Front(k), READ_WAIT) {
                Ok(None) => {
                    let since = *self.free_since.entry(k).or_insert_with(Instant::now);
                    if since.elapsed() < ADOPT_AFTER {
                        continue;
                    }
                    let Some(rev) = bus.take_lease(Lease::Front(k), &self.id) else {
                        continue;
                    };
                    let lost = Arc::new(AtomicBool::new(false));
                    match LeaseKeeper::keep(
                        bus.clone(),
                        Lease::Front(k),
                        self.id.clone(),
                        rev,
                        Some(lost.clone()),
                    ) {
                        Ok(keeper) => {
                            self.free_since.remove(&k);
                            self.held.push((k, keeper, lost));
                            shards.push(k);
                            tracing::warn!(
                                shard = k,
                                "No front ran this shard of the cameras: taken over."
                            );
                            return Some(format!("took over shard {k}: no front ran it"));
                        }
                        Err(e) => tracing::error!(shard = k, error = %e, "Shard not taken over."),
                    }
                }
                _ => {
                    self.free_since.remove(&k);
                }
            }
        }
        None
    }
}

/// The front's follower, before its thread starts.
pub(super) struct Follower {
    pub installer: Installer,
    pub bus: Arc<Bus>,
    /// The file's pipeline: what every epoch's layout is derived from.
    pub base: Pipeline,
    pub profiles: Arc<Profiles>,
    pub front: String,
    /// The shards of the cameras this front runs ([`crate::cluster::epoch::Shard`]): the one
    /// whose lease it took, and those it took over from fronts that are gone.
    pub shards: Vec<u32>,
    /// Fronts that share the cameras: the shares of gone fronts this one takes over.
    pub adopter: Option<Adopter>,
    /// The epoch it runs (`None`: the file's layout).
    pub last: Option<Epoch>,
    /// The last epoch applied (`u64::MAX`: none; the file's layout runs).
    pub applied: Arc<AtomicU64>,
    /// The front's counters, for its heartbeats.
    pub counters: Option<crate::cluster::bus::CountFront>,
}

/// The follower's thread.
pub(super) struct FollowerHandle {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl FollowerHandle {
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

impl Follower {
    /// Starts heartbeats and the thread that applies epochs.
    pub fn spawn(mut self) -> Result<FollowerHandle, PipelineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let cluster = |e: crate::cluster::bus::BusError| PipelineError::Cluster(e.to_string());
        let epochs = self.bus.epochs().map_err(cluster)?;
        let beats = self.bus.heartbeats().map_err(cluster)?;
        self.bus.beat(
            &self.front,
            self.applied.clone(),
            stop.clone(),
            self.counters.clone(),
            None,
        );
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("epochs".into())
            .spawn(move || {
                let mut nodes: HashMap<String, Option<u64>> = HashMap::new();
                let mut pending: Option<(Epoch, Instant)> = None;
                let mut polled = Instant::now();
                while !stopped.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                    for Heartbeat { node, applied, .. } in beats.try_iter() {
                        nodes.insert(node, applied);
                    }
                    let done = self.applied.load(Ordering::SeqCst);
                    // The watch can lag behind after the connection to NATS came back: the
                    // current epoch is also read once a second.
                    let mut arrived: Vec<Epoch> = epochs.try_iter().collect();
                    if arrived.is_empty() && polled.elapsed() >= Duration::from_secs(1) {
                        polled = Instant::now();
                        arrived.extend(self.bus.current().ok().flatten());
                    }
                    for e in arrived {
                        if pending.as_ref().is_some_and(|(p, _)| e.epoch <= p.epoch) {
                            continue;
                        }
                        if done == u64::MAX || e.epoch > done {
                            tracing::info!(epoch = e.epoch, reason = %e.reason, "Plan epoch received.");
                            pending = Some((e, Instant::now()));
                        }
                    }
                    if let Some(adopter) = self.adopter.as_mut()
                        && let Some(why) = adopter.look(&self.bus, &mut self.shards)
                        && let Some(e) = self.last.clone()
                    {
                        let record = self.run(&e, Duration::ZERO, Vec::new(), Some(why));
                        lock(&self.installer.live.epochs).push(record);
                    }
                    let Some((e, since)) = &pending else { continue };
                    // Every node the epoch uses, up or not: one that is down now may answer
                    // again before it heard of the epoch.
                    let waiting: Vec<String> = e
                        .used_nodes(&self.front)
                        .into_iter()
                        .filter(|n| nodes.get(n).copied().flatten() < Some(e.epoch))
                        .collect();
                    let waited = since.elapsed();
                    if !waiting.is_empty() && waited < NODE_APPLY_WAIT {
                        continue;
                    }
                    let (e, _) = pending.take().expect("pending");
                    if !waiting.is_empty() {
                        tracing::warn!(
                            epoch = e.epoch,
                            nodes = %waiting.join(", "),
                            "Applying an epoch that some nodes have not applied after {NODE_APPLY_WAIT:?}."
                        );
                    }
                    let record = self.run(&e, waited, waiting, None);
                    lock(&self.installer.live.epochs).push(record);
                }
                if let Some(count) = &self.counters {
                    self.bus.last_beat(&self.front, &self.applied, count);
                }
            })?;
        Ok(FollowerHandle { stop, thread })
    }

    /// Applies epoch `e` (again, with `again`: why, where this front's shards changed) and says
    /// how it went, for `/status` and the summary.
    fn run(
        &mut self,
        e: &Epoch,
        waited: Duration,
        waiting: Vec<String>,
        again: Option<String>,
    ) -> serde_json::Value {
        let t0 = Instant::now();
        let reason = again.clone().unwrap_or_else(|| e.reason.clone());
        match self.apply(e) {
            Ok((started, retired, (cams_in, cams_out))) => {
                self.applied.store(e.epoch, Ordering::SeqCst);
                self.last = Some(e.clone());
                tracing::info!(
                    epoch = e.epoch,
                    reason = %reason,
                    routes_started = started,
                    routes_retired = retired,
                    "Plan epoch applied."
                );
                json!({
                    "epoch": e.epoch,
                    "reason": reason,
                    "members": e.members,
                    "shards": self.shards,
                    "plan_s": e.plan_s,
                    "waited_for_nodes_s": waited.as_secs_f64(),
                    "apply_s": t0.elapsed().as_secs_f64(),
                    "published_unix_ms": e.at_unix_ms,
                    "applied_unix_ms": crate::clock::unix_ms(),
                    "routes_started": started,
                    "routes_retired": retired,
                    "cameras_taken": cams_in,
                    "cameras_given": cams_out,
                    "nodes_not_ready": waiting,
                })
            }
            Err(err) => {
                tracing::error!(epoch = e.epoch, error = %err, "Plan epoch not applied; the running layout stays.");
                json!({"epoch": e.epoch, "reason": reason, "error": err.to_string()})
            }
        }
    }

    /// Runs epoch `e` from now on. Returns the routes started and retired, and the cameras
    /// this front took and gave up (fronts that share the cameras).
    fn apply(&mut self, e: &Epoch) -> Result<(usize, usize, Cameras), PipelineError> {
        let target = shard_pipeline(&self.base, e, &self.shards, &self.profiles)
            .map_err(|x| PipelineError::Cluster(x.to_string()))?;
        let mut next = lock(&self.installer.live.pipeline).clone();
        let first_new = next.stages.len();
        let (mut started, mut retired) = (Vec::new(), Vec::new());
        for fi in 0..next.flows.len() {
            let Some(wanted) = target.flows.get(fi).map(|f| f.routes.clone()) else {
                continue;
            };
            let mut old = next.flows[fi].routes.clone();
            let mut routes = Vec::new();
            for tr in wanted {
                let names: Vec<&str> = target.routes[tr]
                    .stages
                    .iter()
                    .map(|i| target.stages[*i].name.as_str())
                    .collect();
                let same = |r: &usize| {
                    next.routes[*r]
                        .stages
                        .iter()
                        .map(|i| next.stages[*i].name.as_str())
                        .eq(names.iter().copied())
                };
                if let Some(pos) = old.iter().position(same) {
                    let r = old.remove(pos);
                    next.routes[r].weight = target.routes[tr].weight;
                    routes.push(r);
                    continue;
                }
                let chain = target.routes[tr]
                    .stages
                    .iter()
                    .map(|i| target.stages[*i].clone())
                    .collect();
                routes.push(next.append_route(fi, chain, target.routes[tr].weight));
                started.push(next.routes.len() - 1);
            }
            retired.extend(old);
            next.flows[fi].routes = routes;
        }
        next.plan = target.plan.clone();
        // Nodes that joined the cluster are reached before any route of theirs starts.
        next.cluster = target.cluster.clone();
        self.installer.reach_new_nodes(&next)?;
        let flows: Vec<usize> = (0..next.flows.len()).collect();
        self.installer
            .install(next, first_new, &started, &retired, &flows)?;
        let cameras = if e.shards.is_empty() {
            Cameras::default()
        } else {
            self.move_cameras(&target)
        };
        Ok((started.len(), retired.len(), cameras))
    }

    /// Fronts that share the cameras: starts the cameras of the file that `target` (this
    /// front's shard of an epoch) gives it and stops those it gave to another front (their
    /// frames in the pipeline finish here). Streams added through the API stay.
    fn move_cameras(&self, target: &Pipeline) -> Cameras {
        let live = &self.installer.live;
        let running: Vec<String> = lock(&live.pipeline)
            .sources
            .iter()
            .map(|s| s.name.clone())
            .collect();
        let mut moved = Cameras::default();
        for s in &self.base.sources {
            let wanted = target.sources.iter().any(|t| t.name == s.name);
            let runs = running.contains(&s.name);
            if wanted && !runs {
                match live.add_stream(s.clone()) {
                    Ok(()) => {
                        tracing::info!(stream = %s.name, shards = ?self.shards, "Camera taken over from another front.");
                        moved.0.push(s.name.clone());
                    }
                    Err(err) => {
                        tracing::error!(stream = %s.name, error = %err, "Camera of this front's share not started.");
                    }
                }
            } else if !wanted && runs && live.remove_stream(&s.name).is_ok() {
                tracing::info!(stream = %s.name, shards = ?self.shards, "Camera given to another front.");
                moved.1.push(s.name.clone());
            }
        }
        moved
    }
}

/// Cameras a front took and gave up when it applied an epoch.
type Cameras = (Vec<String>, Vec<String>);
