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
mod graph;
pub mod live;
mod publisher;
mod recurrent;
pub mod stage;
mod worker;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::admission::{Admission, RouteEntry};
use crate::batcher::deadline::Timeline;
use crate::batcher::driver::WORKER_QUEUE;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Device, Pipeline};
use crate::device::emulated::{Link, new_link};
use crate::engine::StageRunner;
use crate::frame::Frame;
use crate::ingest::{self, IngestError};
use crate::panics::panic_message;
use crate::sinks::delivery::Queue;
use crate::sinks::{self, SinkError, SinkHandle};
use crate::stats::{Stats, Summary};
use analytics::Analytics;
use graph::{Batch, Downstream, Pool, Sequencer, policy_settings, spawn_batcher};
pub use live::{Live, LiveError, ReloadReport};
pub use publisher::result_json;
use stage::build_runner;
pub use worker::PANIC_STAGE_ENV;
use worker::{WorkerContext, spawn_worker};

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
}

/// A pipeline whose stages, workers and publisher run, waiting for its sources
/// ([`Running::wait`] starts them). Its [`Live`] handle is what an API serves.
pub struct Running {
    live: Arc<Live>,
    stats: Arc<Stats>,
    opts: RunOptions,
    budget: Option<Arc<AtomicU64>>,
    /// Stage, worker and publisher threads, with what each is, in the order they drain.
    threads: Vec<(String, JoinHandle<()>)>,
    /// Sinks' buffers, released after their flush timeout at shutdown.
    sink_buffers: Vec<(Arc<Queue>, Duration)>,
}

/// Runs a validated pipeline until it ends or is stopped, and returns its counters.
pub fn run(p: &Pipeline, opts: &RunOptions, shutdown: &Shutdown) -> Result<Summary, PipelineError> {
    start(p, opts)?.wait(shutdown)
}

/// Builds a validated pipeline and starts everything but its sources: engines are loaded and
/// sinks opened before any frame flows.
pub fn start(p: &Pipeline, opts: &RunOptions) -> Result<Running, PipelineError> {
    ingest::init()?;
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

    // Build phase: engines and sinks, before any frame flows. The processes of one emulated
    // device share its link.
    let mut links: HashMap<&str, Link> = HashMap::new();
    let mut runners: Vec<Option<Vec<Box<dyn StageRunner>>>> = Vec::new();
    let mut cells: Vec<Vec<crate::recurrent::Recurrent>> = Vec::new();
    let resets = Arc::new(crate::recurrent::StreamResets::default());
    for s in &p.stages {
        let mut pool = Vec::new();
        let mut stage_cells = Vec::new();
        if s.model.kind == crate::config::ModelKind::Recurrent {
            for _ in 0..s.workers {
                let cell =
                    stage::build_recurrent(s, p.onnxruntime.as_deref()).map_err(|source| {
                        PipelineError::Engine {
                            stage: s.name.clone(),
                            source,
                        }
                    })?;
                stage_cells.push(cell.with_resets(resets.clone()));
            }
            runners.push(Some(pool));
            cells.push(stage_cells);
            continue;
        }
        cells.push(stage_cells);
        for w in 0..s.workers {
            let link = match (&s.device, s.devices.get(w)) {
                (Device::Emulated { .. }, Some(id)) => {
                    Some(links.entry(id.as_str()).or_insert_with(new_link).clone())
                }
                _ => None,
            };
            pool.push(
                build_runner(s, p.onnxruntime.as_deref(), link).map_err(|source| {
                    PipelineError::Engine {
                        stage: s.name.clone(),
                        source,
                    }
                })?,
            );
        }
        runners.push(Some(pool));
    }
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

    let analytics = Analytics::new(&p.analytics);
    let (publish_tx, publish_rx) = flume::bounded::<Frame>(64);
    let latest = publisher::LatestFrames::default();
    let mut threads: Vec<(String, JoinHandle<()>)> = Vec::new();
    threads.push((
        "publisher".into(),
        publisher::spawn_publisher(
            p,
            publish_rx,
            sinks,
            stats.clone(),
            clock.clone(),
            analytics.clone(),
            latest.clone(),
        )?,
    ));

    // Every route: its stages, last first, each feeding the one after it: frames one by one
    // through the next stage's queue, or, for a batch with a reserved route, as a batch straight
    // to the reserved worker of the next stage. Each route has its own reservations.
    let mut queues: Vec<Option<live::StageQueues>> = p.stages.iter().map(|_| None).collect();
    let mut entries: Vec<Vec<RouteEntry>> = p.flows.iter().map(|_| Vec::new()).collect();
    for (ri, route) in p.routes.iter().enumerate() {
        let timeline = Arc::new(Mutex::new(Timeline::new(
            &route
                .stages
                .iter()
                .map(|i| p.stages[*i].workers)
                .collect::<Vec<_>>(),
        )));
        let mut next = Downstream {
            queue: publish_tx.clone(),
            pool: Pool::new(Vec::new()),
        };
        for (k, &i) in route.stages.iter().enumerate().rev() {
            let spec = &p.stages[i];
            let engines = runners[i].take().unwrap_or_default();
            let (in_tx, in_rx) = flume::bounded::<Frame>(spec.queue);
            let chans: Vec<(flume::Sender<Batch>, flume::Receiver<Batch>)> = (0..spec.workers)
                .map(|_| flume::bounded::<Batch>(WORKER_QUEUE))
                .collect();
            let tuner = auto_tuner(p, route, k);
            queues[i] = Some(live::StageQueues {
                input: in_rx.clone(),
                capacity: spec.queue,
                workers: chans.iter().map(|c| c.1.clone()).collect(),
                cells: Vec::new(),
                tuner: tuner.clone(),
                flow: spec.flow,
            });
            let pool = Pool::new(chans.iter().map(|c| c.0.clone()).collect());
            if spec.model.kind == crate::config::ModelKind::Recurrent {
                let gauges = spawn_cells(
                    &mut threads,
                    i,
                    route.stages.get(k + 1).copied(),
                    spec,
                    std::mem::take(&mut cells[i]),
                    in_rx,
                    &next,
                    &pool,
                    &stats,
                    &clock,
                )?;
                if let Some(q) = queues[i].as_mut() {
                    q.cells = gauges;
                }
                next = Downstream { queue: in_tx, pool };
                continue;
            }
            let (fb_tx, fb_rx) = flume::bounded::<bool>(256);
            let sequencer = Arc::new(Mutex::new(Sequencer::default()));
            let started = Arc::new(AtomicU64::new(0));
            threads.push((
                format!("stage `{}` batcher", spec.name),
                spawn_batcher(
                    i,
                    &spec.name,
                    in_rx,
                    pool.clone(),
                    fb_rx,
                    crate::batcher::PolicySettings {
                        knob: tuner.map(|t| t.knob.clone()),
                        ..policy_settings(p, &route.stages, k)
                    },
                    timeline.clone(),
                    stats.clone(),
                    system_clock,
                )?,
            ));
            for (w, (runner, (_, rx))) in engines.into_iter().zip(chans).enumerate() {
                threads.push((
                    format!("stage `{}` worker {w}", spec.name),
                    spawn_worker(
                        WorkerContext {
                            stage: i,
                            hop: k,
                            next_stage: route.stages.get(k + 1).copied(),
                            name: spec.name.clone(),
                            worker: w,
                            in_flight: pool.in_flight.clone(),
                            room: pool.room.clone(),
                            next: next.clone(),
                            sequencer: sequencer.clone(),
                            feedback: fb_tx.clone(),
                            timeline: timeline.clone(),
                            stats: stats.clone(),
                            clock: clock.clone(),
                            started: started.clone(),
                        },
                        runner,
                        rx,
                    )?,
                ));
            }
            next = Downstream { queue: in_tx, pool };
        }
        entries[route.flow].push(RouteEntry {
            route: ri,
            first_stage: route.stages[0],
            queue: next.queue.clone(),
            weight: route.weight,
            in_flight: next.pool.in_flight.clone(),
            room: next.pool.room.clone(),
        });
    }
    drop(publish_tx);
    let queues: Vec<live::StageQueues> = queues.into_iter().flatten().collect();

    // Each flow's admission: fair across its streams, spread over its routes.
    let mut admissions = Vec::new();
    for (flow, routes) in p.flows.iter().zip(entries) {
        let a = Admission::new();
        threads.push((
            format!("flow `{}` admission", flow.name),
            a.spawn(&flow.name, routes, stats.clone())?,
        ));
        admissions.push(a);
    }

    let budget = opts.max_frames.map(|n| Arc::new(AtomicU64::new(n)));
    let live = Arc::new(Live::new(
        p,
        stats.clone(),
        clock,
        budget.clone(),
        admissions,
        queues,
        analytics,
        resets,
        latest,
    ));
    Ok(Running {
        live,
        stats,
        opts: opts.clone(),
        budget,
        threads,
        sink_buffers,
    })
}

/// Starts a recurrent stage's workers (and, with several, the router that keeps each stream on
/// one of them); returns each worker's gauges.
#[allow(clippy::too_many_arguments)]
fn spawn_cells(
    threads: &mut Vec<(String, JoinHandle<()>)>,
    stage: usize,
    next_stage: Option<usize>,
    spec: &crate::config::StageSpec,
    cells: Vec<crate::recurrent::Recurrent>,
    input: flume::Receiver<Frame>,
    next: &Downstream,
    pool: &Pool,
    stats: &Arc<Stats>,
    clock: &SharedClock,
) -> Result<Vec<Arc<crate::recurrent::CellGauges>>, PipelineError> {
    let capacity = spec.queue.max(2 * spec.max_batch);
    let inputs: Vec<flume::Receiver<Frame>> = if cells.len() > 1 {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..cells.len())
            .map(|_| flume::bounded::<Frame>(spec.max_batch))
            .unzip();
        threads.push((
            format!("stage `{}` router", spec.name),
            recurrent::spawn_cell_router(
                &spec.name,
                stage,
                input,
                txs,
                pool.room.clone(),
                stats.clone(),
            )?,
        ));
        rxs
    } else {
        vec![input]
    };
    let mut gauges = Vec::new();
    let started = Arc::new(AtomicU64::new(0));
    for (w, (cell, rx)) in cells.into_iter().zip(inputs).enumerate() {
        let g = Arc::new(crate::recurrent::CellGauges::default());
        gauges.push(g.clone());
        threads.push((
            format!("stage `{}` worker {w}", spec.name),
            recurrent::spawn_cell_worker(
                recurrent::CellWorker {
                    stage,
                    next_stage,
                    name: spec.name.clone(),
                    worker: w,
                    capacity,
                    next: next.clone(),
                    room: pool.room.clone(),
                    stats: stats.clone(),
                    clock: clock.clone(),
                    started: started.clone(),
                },
                cell.with_gauges(g),
                rx,
            )?,
        ));
    }
    Ok(gauges)
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
        } = self;
        let started = live.started;
        live.start_sources()?;

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
            if shutdown.is_triggered() || out_of_budget || timed_out || all_ended || panicked {
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
        let sources = live.stop_sources();
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
        live.close_admissions();
        for (name, t) in threads {
            if let Err(p) = t.join() {
                stats.thread_panicked(name, panic_message(&*p));
            }
        }
        Ok(stats.summary(started.elapsed().as_secs_f64()))
    }
}

/// The tuner of the `k`-th stage of `route` when its batching limits are `"auto"`: its
/// profiled latency, pool and queue; the rest of the route's profiled latency (at each later or
/// earlier stage's largest batch) comes off the flow's SLO; it takes the route's share of its
/// flow's frames.
fn auto_tuner(
    p: &Pipeline,
    route: &crate::config::RouteSpec,
    k: usize,
) -> Option<Arc<crate::batcher::analytic::Tuner>> {
    let spec = &p.stages[route.stages[k]];
    let prof = spec.profile.as_ref().filter(|_| spec.auto.any())?;
    let ns = |d: &Duration| d.as_nanos() as crate::clock::Nanos;
    let rest: crate::clock::Nanos = route
        .stages
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != k)
        .filter_map(|(_, s)| {
            let s = &p.stages[*s];
            let pr = s.profile.as_ref()?;
            let b = s.max_batch.clamp(1, pr.latency.len());
            Some(ns(&pr.latency[b - 1]) + pr.transfer.get(b - 1).map_or(0, ns))
        })
        .sum();
    let total: f64 = p
        .routes
        .iter()
        .filter(|r| r.flow == route.flow)
        .map(|r| r.weight)
        .sum();
    let share = if total > 0.0 {
        route.weight / total
    } else {
        1.0
    };
    Some(Arc::new(crate::batcher::analytic::Tuner::new(
        prof.latency.iter().map(ns).collect(),
        spec.workers,
        spec.queue,
        rest,
        share,
        (spec.auto.batch, spec.auto.wait),
        (spec.max_batch, ns(&spec.max_wait)),
    )))
}
