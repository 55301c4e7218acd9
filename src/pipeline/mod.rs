//! Builds and runs the stage graph.
//!
//! ```text
//! sources --(bounded queue)--> batcher 1 --(bounded)--> workers of pool 1 --(bounded queue)-->
//!   batcher 2 --> workers of pool 2 --> ... --(bounded)--> publisher --> sinks
//! ```
//!
//! Every queue is a bounded flume channel. Workers block when the next queue is full, which
//! pushes back to the first queue, where live sources drop frames (counted as
//! `dropped_overload`) and files in `fast` pace wait. Batchers drop frames whose deadline has
//! passed (`dropped_late`); the publisher drops frames that finished after their deadline, so that
//! every published frame met its SLO.
//!
//! Shutdown (signal, `--duration`, `--max-frames`, or every source ended) stops the sources, and
//! the rest drains in order as each channel's senders go away: nothing in flight is lost.

mod analytics;
mod build;
mod epochs;
mod graph;
pub mod live;
mod publisher;
mod recurrent;
mod replan;
pub mod stage;
mod worker;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::admission::{Admission, RouteEntry};
use crate::clock::{SharedClock, SystemClock};
use crate::config::Pipeline;
use crate::frame::Frame;
use crate::ingest::{self, IngestError};
use crate::panics::panic_message;
use crate::sinks::delivery::Queue;
use crate::sinks::{self, SinkError, SinkHandle};
use crate::stats::{Stats, Summary};
use analytics::Analytics;
pub use build::{node_workers, node_workers_but};
pub use live::{Live, LiveError, ReloadReport};
pub use publisher::result_json;
pub use worker::PANIC_STAGE_ENV;

/// Errors that keep a pipeline from starting.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// GStreamer is not usable.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// A stage's engine could not be loaded.
    #[error("stage `{stage}`: {source}")]
    Engine {
        /// Stage name.
        stage: String,
        /// Why.
        source: crate::engine::EngineError,
    },
    /// A sink could not be opened.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
    /// A source could not be started.
    #[error(transparent)]
    Live(#[from] LiveError),
    /// An output could not start.
    #[error(transparent)]
    Output(#[from] crate::outputs::OutputError),
    /// Re-planning while running cannot be set up.
    #[error("re-planning: {0}")]
    Control(String),
    /// The other nodes of a `[cluster]` cannot be reached.
    #[error("cluster: {0}")]
    Cluster(String),
    /// Stopped while another front held the cameras (`[cluster] nats`): nothing ran.
    #[error("stopped as a standby front: another front held the cameras, and this one ran none")]
    StoppedAsStandby,
}

/// A stop request shared by signal handlers, the API and the run loop.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// A fresh, untriggered handle.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the pipeline to stop.
    pub fn trigger(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// Whether a stop was asked for.
    pub fn is_triggered(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// The flag itself (for signal handlers).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

/// Limits and display of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Stop after this many frames have been ingested (all sources together).
    pub max_frames: Option<u64>,
    /// Print a progress line to stderr (when it is a terminal).
    pub progress: bool,
    /// Keep running when every source has ended (streams can be added through the API).
    pub serve: bool,
    /// Re-plan while running (a pipeline served by a plan), with these settings.
    pub control: Option<crate::control::ControlSettings>,
    /// Ends a front's wait for the cameras while another front holds them (`[cluster] nats`);
    /// [`run`] sets it to its shutdown.
    pub stop: Option<Shutdown>,
}

/// A pipeline whose stages, workers and publisher run, waiting for its sources
/// ([`Running::wait`] starts them). Its [`Live`] handle is what an API serves.
pub struct Running {
    live: Arc<Live>,
    stats: Arc<Stats>,
    opts: RunOptions,
    budget: Option<Arc<AtomicU64>>,
    /// Stage, worker and publisher threads, with what each is.
    threads: build::Threads,
    /// The online re-planner, when `run` re-plans.
    control: Option<replan::Replanner>,
    /// The follower of a controller's plan epochs (`[cluster] nats`).
    follower: Option<epochs::Follower>,
    /// The front lease this front runs the cameras under (`[cluster] nats`).
    front_lease: Option<FrontLease>,
    /// Sinks' buffers, released after their flush timeout at shutdown.
    sink_buffers: Vec<(Arc<Queue>, Duration)>,
}

/// Bytes of each ping that measures a link at start.
const PROBE_BYTES: usize = 8 << 20;

/// How long the front waits for the other nodes of a `[cluster]` at start.
pub const NODE_WAIT: Duration = Duration::from_secs(30);

/// Runs a validated pipeline until it ends or is stopped, and returns its counters.
pub fn run(p: &Pipeline, opts: &RunOptions, shutdown: &Shutdown) -> Result<Summary, PipelineError> {
    let opts = RunOptions {
        stop: Some(shutdown.clone()),
        ..opts.clone()
    };
    start(p, &opts)?.wait(shutdown)
}

/// Builds a validated pipeline and starts everything but its sources: engines are loaded and
/// sinks opened before any frame flows.
pub fn start(p: &Pipeline, opts: &RunOptions) -> Result<Running, PipelineError> {
    ingest::init()?;
    // With a controller ([cluster] nats): its bus, and the layout of its current epoch where
    // one was published (a front that restarts runs what the nodes run now).
    let file = p;
    let (bus, front_lease, from_epoch) = control_plane(p, opts)?;
    let p = from_epoch.as_ref().map_or(p, |(layout, _)| layout);
    let system_clock = SystemClock::new();
    let clock: SharedClock = Arc::new(system_clock);
    let stats = Arc::new(Stats::with_flows(
        p.flows.iter().map(|f| f.name.clone()).collect(),
        p.sources
            .iter()
            .map(|s| (s.name.clone(), p.flow_of(s).unwrap_or(0)))
            .collect(),
        p.stages.iter().map(|s| s.name.clone()).collect(),
    ));

    // Across nodes: links to the other nodes, waited for; cut transfers are then the links'.
    let (clustered, peers, mut measured_links);
    let p = match &p.cluster {
        Some(c) => {
            let limit = crate::cluster::message_limit(p);
            // Batches carry the front's id; a node that refuses one because another front holds
            // the lease deposes this one, as its own lease keeper would.
            let front = front_lease.as_ref().map(|l| crate::cluster::link::FrontId {
                id: l.id.clone(),
                deposed: Box::new(l.keeper.deposer()),
            });
            let links = crate::cluster::link::Peers::new(&c.nodes, limit, front)
                .map_err(|e| PipelineError::Cluster(e.to_string()))?;
            tracing::info!(
                nodes = c.nodes.len(),
                "Waiting for the other nodes of the cluster."
            );
            // The nodes this layout runs workers on (with a controller, the others may be down
            // and come back later).
            let used: Vec<String> = if bus.is_some() {
                p.stages
                    .iter()
                    .flat_map(|s| (0..s.workers).filter_map(|w| s.remote_node(w, Some(c))))
                    .map(String::from)
                    .collect()
            } else {
                c.nodes.keys().cloned().collect()
            };
            links
                .wait_for(&used, NODE_WAIT)
                .map_err(|e| PipelineError::Cluster(e.to_string()))?;
            for peer in links.all() {
                stats.register_node(peer.name(), peer.counters().clone());
            }
            // The links as they are: a cut is charged at the slower of the file's bandwidth and
            // the link's measured rate.
            let measured = links.measure(PROBE_BYTES.min(limit / 2));
            for (node, gbps) in &measured {
                tracing::info!(
                    node,
                    gbps = format!("{gbps:.2}"),
                    configured = p.bandwidth_gbps,
                    "Link measured."
                );
            }
            let mut q = p.clone();
            crate::cluster::charge_transfers_to_remote_stages(&mut q, &measured);
            measured_links = measured;
            peers = Some(Arc::new(links));
            clustered = q;
            &clustered
        }
        None => {
            peers = None;
            measured_links = Default::default();
            p
        }
    };

    // Build phase: engines and sinks, before any frame flows.
    let resets = Arc::new(crate::recurrent::StreamResets::default());
    let mut engines = build::build_engines(p, 0..p.stages.len(), &resets, peers.as_deref())?;
    log_layout(p);
    let sinks: Vec<SinkHandle> = p
        .sinks
        .iter()
        .map(|s| sinks::open(s, &p.name))
        .collect::<Result<_, _>>()?;
    for s in &sinks {
        stats.register_sink(s.name(), s.counters().clone());
    }
    let sink_buffers: Vec<_> = sinks.iter().map(SinkHandle::blocked_release).collect();
    let outputs: Vec<crate::outputs::Output> = p
        .outputs
        .iter()
        .map(crate::outputs::open)
        .collect::<Result<_, _>>()?;
    let output_views: Vec<crate::outputs::OutputView> =
        outputs.iter().map(crate::outputs::Output::view).collect();

    let analytics = Analytics::new(&p.analytics);
    let (publish_tx, publish_rx) = flume::bounded::<Frame>(64);
    let latest = publisher::LatestFrames::default();
    let shared = Arc::new(Mutex::new(p.clone()));
    let threads: build::Threads = Arc::default();
    build::lock(&threads).push((
        "publisher".into(),
        publisher::spawn_publisher(
            shared.clone(),
            publish_rx,
            (sinks, outputs),
            stats.clone(),
            clock.clone(),
            analytics.clone(),
            latest.clone(),
        )?,
    ));

    // Every route, and each flow's admission: fair across its streams, spread over its routes.
    let wiring = build::Wiring {
        publish: publish_tx,
        stats: stats.clone(),
        clock: clock.clone(),
        system_clock,
        threads: threads.clone(),
        release: peers.as_deref().map(crate::cluster::link::Peers::releaser),
    };
    let mut queues: Vec<Option<live::StageQueues>> = p.stages.iter().map(|_| None).collect();
    let mut entries: Vec<Vec<RouteEntry>> = p.flows.iter().map(|_| Vec::new()).collect();
    for ri in 0..p.routes.len() {
        let built = wiring.route(p, ri, &mut engines)?;
        for (i, q) in built.queues {
            queues[i] = Some(q);
        }
        entries[p.routes[ri].flow].push(built.entry);
    }
    let queues: Vec<live::StageQueues> = queues.into_iter().flatten().collect();
    let mut admissions = Vec::new();
    for (flow, routes) in p.flows.iter().zip(&entries) {
        let a = Admission::new();
        build::lock(&threads).push((
            format!("flow `{}` admission", flow.name),
            a.spawn(&flow.name, routes.clone(), stats.clone())?,
        ));
        admissions.push(a);
    }

    let budget = opts.max_frames.map(|n| Arc::new(AtomicU64::new(n)));
    let live = Arc::new(Live::new(
        p,
        shared,
        stats.clone(),
        clock,
        budget.clone(),
        admissions,
        queues,
        analytics,
        resets.clone(),
        latest,
        output_views,
    ));
    if let Some(l) = &front_lease {
        *build::lock(&live.front_lease) = Some(l.describe());
    }
    // With re-planning on, the controller keeps the wiring to build new routes with; otherwise
    // it goes here (and with it this copy of the publisher's queue).
    let nats = bus.and_then(|b| Some((b, p.cluster.as_ref()?.front.clone())));
    let (control, follower) = match (&opts.control, nats) {
        (Some(settings), _) => (
            Some(replan::Replanner::new(
                p,
                settings.clone(),
                wiring,
                entries,
                resets,
                live.clone(),
            )?),
            None,
        ),
        (None, Some((bus, front))) => {
            let profiles = p
                .plan
                .as_ref()
                .and_then(|r| r.profiles.clone())
                .ok_or_else(|| {
                    PipelineError::Cluster(
                        "[cluster] nats: a controller's epochs need a pipeline served by a plan"
                            .into(),
                    )
                })?;
            if let Some((_, e)) = &from_epoch {
                build::lock(&live.epochs).push(serde_json::json!({
                    "epoch": e.epoch,
                    "reason": e.reason,
                    "members": e.members,
                    "plan_s": e.plan_s,
                    "started_in": true,
                    "published_unix_ms": e.at_unix_ms,
                    "applied_unix_ms": crate::clock::unix_ms(),
                    "nodes_not_ready": Vec::<String>::new(),
                }));
            }
            let peers = peers.map(|x| (x, std::mem::take(&mut measured_links)));
            (
                None,
                Some(epochs::Follower {
                    installer: replan::Installer::new(live.clone(), wiring, entries, resets, peers),
                    bus,
                    base: file.clone(),
                    profiles,
                    front,
                    shards: vec![front_lease.as_ref().map_or(0, |l| l.shard)],
                    adopter: front_lease
                        .as_ref()
                        .filter(|l| l.fronts > 1)
                        .map(|l| epochs::Adopter::new(l.id.clone(), l.fronts)),
                    last: from_epoch.as_ref().map(|(_, e)| e.clone()),
                    applied: Arc::new(AtomicU64::new(
                        from_epoch.as_ref().map_or(u64::MAX, |(_, e)| e.epoch),
                    )),
                    counters: front_lease.as_ref().map(|l| {
                        let (id, stats) = (l.id.clone(), stats.clone());
                        let count: crate::cluster::bus::CountFront = Arc::new(move || {
                            let flows = stats.flow_totals();
                            crate::cluster::bus::FrontCounters {
                                id: id.clone(),
                                ingested: flows.iter().map(|f| f.ingested).sum(),
                                settled: flows.iter().map(|f| f.resolved()).sum(),
                                stopping: false,
                            }
                        });
                        count
                    }),
                }),
            )
        }
        (None, None) => (None, None),
    };
    Ok(Running {
        live,
        stats,
        opts: opts.clone(),
        budget,
        threads,
        sink_buffers,
        control,
        follower,
        front_lease,
    })
}

/// The front lease held while this front runs the cameras, and what its summary says of it.
struct FrontLease {
    keeper: crate::cluster::bus::LeaseKeeper,
    id: String,
    /// The shard of the cameras it runs, of `fronts`.
    shard: u32,
    fronts: u32,
    waited_s: f64,
    taken_unix_ms: u64,
}

impl FrontLease {
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "shard": self.shard,
            "fronts": self.fronts,
            "waited_s": self.waited_s,
            "taken_unix_ms": self.taken_unix_ms,
            "lost": self.keeper.lost(),
        })
    }
}

/// This front's name in the front lease: `front@HOST:PID` (a pod's name is its host name).
fn front_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("front@{host}:{}", std::process::id())
}

/// The control plane's handles of a front: the bus, the front lease, and the current epoch
/// with the layout it gives the pipeline.
type ControlPlane = (
    Option<Arc<crate::cluster::bus::Bus>>,
    Option<FrontLease>,
    Option<(Pipeline, crate::cluster::epoch::Epoch)>,
);

/// With `[cluster] nats`: the control plane's bus, the front lease (waited for while another
/// front holds it: one front runs the cameras, the others stand by and take them over when its
/// lease ends), and the current epoch (with the layout it gives `p`) if the controller
/// published one.
fn control_plane(p: &Pipeline, opts: &RunOptions) -> Result<ControlPlane, PipelineError> {
    use crate::cluster::bus::{Bus, Lease, LeaseKeeper, READ_WAIT};
    let Some(url) = p.cluster.as_ref().and_then(|c| c.nats.clone()) else {
        return Ok((None, None, None));
    };
    if opts.control.is_some() {
        return Err(PipelineError::Control(
            "[cluster] nats: the controller owns the plan; re-planning on the front (--control) cannot run beside it".into(),
        ));
    }
    let cluster = |e: &dyn std::fmt::Display| PipelineError::Cluster(e.to_string());
    let bus = Arc::new(Bus::connect(&url, &p.name, NODE_WAIT).map_err(|e| cluster(&e))?);
    let id = front_id();
    let fronts = p.cluster.as_ref().map_or(1, |c| c.fronts.max(1));
    let asked = Instant::now();
    let mut said = None;
    // Any shard of the cameras that no front runs (one shard where one front runs them all).
    let mut looked: Option<Instant> = None;
    let (shard, revision) = loop {
        if let Some(taken) =
            (0..fronts).find_map(|k| bus.take_lease(Lease::Front(k), &id).map(|r| (k, r)))
        {
            break taken;
        }
        if opts.stop.as_ref().is_some_and(Shutdown::is_triggered) {
            return Err(PipelineError::StoppedAsStandby);
        }
        // Who holds the leases, for the log: read once a second, not at every try.
        if looked.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(1)) {
            looked = Some(Instant::now());
            let holders: Vec<String> = (0..fronts)
                .filter_map(|k| bus.lease_holder(Lease::Front(k), READ_WAIT).ok().flatten())
                .collect();
            let holder = (!holders.is_empty()).then(|| holders.join(", "));
            if holder.is_some() && holder != said {
                tracing::info!(holder = ?holder, "Standing by: other fronts run the cameras; taking a share over when a front lease ends.");
                said = holder;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let waited_s = asked.elapsed().as_secs_f64();
    if said.is_some() || fronts > 1 {
        tracing::info!(id = %id, shard, fronts, waited_s = format!("{waited_s:.1}"), "Front lease taken: this front runs its cameras now.");
    }
    let on_lost = opts.stop.as_ref().map(Shutdown::flag);
    let keeper = LeaseKeeper::keep(
        bus.clone(),
        Lease::Front(shard),
        id.clone(),
        revision,
        on_lost,
    )
    .map_err(|e| cluster(&e))?;
    let lease = FrontLease {
        keeper,
        id,
        shard,
        fronts,
        waited_s,
        taken_unix_ms: crate::clock::unix_ms(),
    };
    let profiles = p.plan.as_ref().and_then(|r| r.profiles.clone());
    let mut current = bus.current().map_err(|e| cluster(&e))?;
    // Fronts that share the cameras take their shares from the controller's epoch.
    let until = Instant::now() + NODE_WAIT;
    while fronts > 1 && current.is_none() {
        if Instant::now() > until {
            return Err(PipelineError::Cluster(format!(
                "[cluster] fronts = {fronts}: the controller publishes which cameras each front runs, and it published no epoch within {NODE_WAIT:?} (is `poolpipe controller` running?)"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
        current = bus.current().map_err(|e| cluster(&e))?;
    }
    let from = match (current, profiles) {
        (Some(e), Some(pr)) => {
            let layout = crate::cluster::epoch::shard_pipeline(p, &e, &[shard], &pr)
                .map_err(|x| cluster(&x))?;
            tracing::info!(epoch = e.epoch, reason = %e.reason, shard, sources = layout.sources.len(), routes = layout.routes.len(), "Starting in the controller's current epoch.");
            Some((layout, e))
        }
        _ => None,
    };
    // Taken over from a front on another machine: the workers the layout puts on the front
    // (its devices) run here now.
    fn host(id: &str) -> Option<&str> {
        id.split_once('@')
            .map(|(_, h)| h.rsplit_once(':').map_or(h, |x| x.0))
    }
    if let Some(before) = &said
        && host(before) != host(&lease.id)
    {
        let layout = from.as_ref().map_or(p, |(l, _)| l);
        let local: Vec<&str> = layout
            .stages
            .iter()
            .filter(|s| (0..s.workers).any(|w| s.remote_node(w, layout.cluster.as_ref()).is_none()))
            .map(|s| s.name.as_str())
            .collect();
        if !local.is_empty() {
            tracing::warn!(
                before = %before,
                stages = %local.join(", "),
                "Took the cameras over from a front on another machine, and this layout runs workers on the front: they run on this machine's devices now."
            );
        }
    }
    Ok((Some(bus), Some(lease), from))
}

/// Logs which devices each stage's processes run on.
fn log_layout(p: &Pipeline) {
    for route in &p.routes {
        let flow = &p.flows[route.flow];
        for &i in &route.stages {
            let s = &p.stages[i];
            let mut devices: Vec<&str> = s.devices.iter().map(String::as_str).collect();
            devices.dedup();
            tracing::info!(
                flow = %flow.name,
                stage = %s.name,
                device = %s.device,
                processes = s.workers,
                share = s.profile.as_ref().map_or(1, |x| x.share),
                blocks = ?s.profile.as_ref().map(|x| x.blocks).or(s.split.as_ref().map(|x| x.blocks)),
                max_batch = s.max_batch,
                send_while_computing = s.profile.as_ref().is_some_and(|x| x.send_while_computing),
                on = %devices.join(","),
                "Stage layout."
            );
        }
    }
}

impl Running {
    /// The handle that the API and metrics read and change the running pipeline through.
    pub fn live(&self) -> &Arc<Live> {
        &self.live
    }

    /// Starts the sources and runs until every source has ended (unless serving), the frame
    /// budget or duration is spent, a thread panicked, or `shutdown` is triggered; then stops the
    /// sources, drains everything in flight, and returns the counters. A run in which a thread
    /// panicked returns normally: its [`Summary::panics`] says which.
    pub fn wait(self, shutdown: &Shutdown) -> Result<Summary, PipelineError> {
        let Running {
            live,
            stats,
            opts,
            budget,
            threads,
            sink_buffers,
            control,
            follower,
            front_lease,
        } = self;
        let started = live.started;
        live.start_sources()?;
        let control = control.map(replan::Replanner::spawn).transpose()?;
        let follower = follower.map(epochs::Follower::spawn).transpose()?;

        let show_progress = opts.progress && std::io::stderr().is_terminal();
        let mut last_progress = Instant::now();
        let mut last_trim = Instant::now();
        let mut last_tune = Instant::now();
        let mut budget_spent_at: Option<Instant> = None;
        let mut last_demand = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            // Every 100 ms, on a steady beat (after a stall, the beat starts again).
            if last_demand.elapsed() >= Duration::from_millis(300) {
                last_demand = Instant::now();
                live.sample_demand();
            } else if last_demand.elapsed() >= Duration::from_millis(100) {
                last_demand += Duration::from_millis(100);
                live.sample_demand();
            }
            if last_tune.elapsed() >= Duration::from_secs(1) {
                last_tune = Instant::now();
                live.tune_batches();
            }
            if last_trim.elapsed() >= Duration::from_secs(60) {
                last_trim = Instant::now();
                crate::alloc::trim();
                build::reap(&threads, &stats);
            }
            let all_ended = !opts.serve && live.all_sources_ended();
            // Spent once every budgeted frame has been counted at the source (ingested, or
            // dropped there): a frame that took the last unit may still be waiting for room in
            // its lane, and stopping the sources then would lose it. (A source stopped by hand
            // may have taken a unit and never count it: two seconds end the wait.)
            let spent = budget
                .as_ref()
                .is_some_and(|b| b.load(Ordering::SeqCst) == 0);
            if spent && budget_spent_at.is_none() {
                budget_spent_at = Some(Instant::now());
            }
            let out_of_budget = spent
                && (opts.max_frames.is_some_and(|n| stats.ingested_total() >= n)
                    || budget_spent_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)));
            let timed_out = opts.duration.is_some_and(|d| started.elapsed() >= d);
            let panicked = stats.any_panicked();
            // Another front took the cameras over (this one was cut off from NATS): stop.
            let deposed = front_lease.as_ref().is_some_and(|l| l.keeper.lost());
            // Results went to a standard output whose reader went away (`| head`).
            let stdout_gone = crate::sinks::jsonl::stdout_closed();
            if shutdown.is_triggered()
                || stdout_gone
                || out_of_budget
                || timed_out
                || all_ended
                || panicked
                || deposed
            {
                break;
            }
            if show_progress && last_progress.elapsed() >= Duration::from_millis(500) {
                last_progress = Instant::now();
                let s = stats.summary(started.elapsed().as_secs_f64());
                let ingested: u64 = s.streams.iter().map(|x| x.ingested).sum();
                let dropped: u64 = s
                    .streams
                    .iter()
                    .map(|x| x.dropped_late + x.dropped_overload)
                    .sum();
                eprint!(
                    "\r{ingested} frames, {:.1} fps published, {dropped} dropped   ",
                    s.published_fps()
                );
            }
        }
        if show_progress {
            eprintln!();
        }
        tracing::info!("Stopping sources and draining.");
        // The re-planner first: it holds a way into the publisher's queue, and it must not start
        // routes while the rest drains.
        if let Some(c) = control {
            c.stop();
        }
        // The sources before the follower, which may be waiting for NATS.
        let sources = live.stop_sources();
        if let Some(f) = follower {
            f.stop();
        }
        // A sink with `when_full = "block"` whose destination stays down would hold the
        // publisher, and so the drain, forever: after its flush timeout it drops (and counts)
        // instead.
        let _ = std::thread::Builder::new()
            .name("sink-release".into())
            .spawn(move || {
                let longest = sink_buffers
                    .iter()
                    .map(|(_, t)| *t)
                    .max()
                    .unwrap_or_default();
                std::thread::sleep(longest);
                for (b, _) in sink_buffers {
                    b.release_blocked();
                }
            });
        for s in sources {
            let _ = s.join();
        }
        // The cameras are closed: a standby front may take them now, while this one drains.
        let front = front_lease.map(|l| l.describe());
        live.close_admissions();
        let threads = std::mem::take(&mut *build::lock(&threads));
        for (name, t) in threads {
            if let Err(p) = t.join() {
                stats.thread_panicked(name, panic_message(&*p));
            }
        }
        let mut summary = stats.summary(started.elapsed().as_secs_f64());
        summary.epochs = build::lock(&live.epochs).clone();
        summary.front_lease = front;
        Ok(summary)
    }
}
