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

pub mod live;
pub mod stage;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::batcher::deadline::{DeadlineConfig, DeadlinePolicy, StageCost, Timeline};
use crate::batcher::{AimdPolicy, BatchPolicy, FixedPolicy, Hop};
use crate::clock::{Clock, SharedClock, SystemClock, ms, nanos};
use crate::config::{Pipeline, PolicyKind};
use crate::frame::Frame;
use crate::ingest::{self, IngestError};
use crate::sinks::{self, Message, SinkError, SinkHandle};
use crate::stats::{Stats, Summary};
use live::StageQueues;
pub use live::{Live, LiveError, ReloadReport};
use stage::{StageRunner, build_runner};

/// Batches a worker's channel holds besides the one it runs (the simulator models the same).
pub const WORKER_QUEUE: usize = 2;

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
    /// The HTTP API could not listen.
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
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
    /// Serve the HTTP API and metrics.
    pub api: Option<crate::api::ApiOptions>,
}

/// Runs a validated pipeline until it ends or is stopped, and returns its counters.
pub fn run(p: &Pipeline, opts: &RunOptions, shutdown: &Shutdown) -> Result<Summary, PipelineError> {
    ingest::init()?;
    let system_clock = SystemClock::new();
    let clock: SharedClock = Arc::new(system_clock);
    let stats = Arc::new(Stats::new(
        p.sources.iter().map(|s| s.name.clone()).collect(),
        p.stages.iter().map(|s| s.name.clone()).collect(),
    ));

    // Build phase: engines and sinks, before any frame flows.
    let mut runners: Vec<Vec<Box<dyn StageRunner>>> = Vec::new();
    for s in &p.stages {
        let mut pool = Vec::new();
        for _ in 0..s.workers {
            pool.push(build_runner(s, p.onnxruntime.as_deref()).map_err(|source| {
                PipelineError::Engine {
                    stage: s.name.clone(),
                    source,
                }
            })?);
        }
        runners.push(pool);
    }
    let sinks: Vec<SinkHandle> = p
        .sinks
        .iter()
        .map(|s| sinks::open(s, &p.name))
        .collect::<Result<_, _>>()?;
    for s in &sinks {
        stats.register_sink(s.name(), s.counters().clone());
    }
    let sink_buffers: Vec<_> = sinks.iter().map(SinkHandle::blocked_release).collect();

    let (publish_tx, publish_rx) = flume::bounded::<Frame>(64);
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    threads.push(spawn_publisher(
        p,
        publish_rx,
        sinks,
        stats.clone(),
        clock.clone(),
    )?);

    // Stages, last first, each feeding the one after it: frames one by one through the next
    // stage's queue, or, for a batch with a reserved route, as a batch straight to the reserved
    // worker of the next stage.
    let timeline = Arc::new(Mutex::new(Timeline::new(
        &p.stages.iter().map(|s| s.workers).collect::<Vec<_>>(),
    )));
    let mut next = Downstream {
        queue: publish_tx,
        pool: Pool {
            workers: Vec::new(),
            in_flight: Arc::new(Vec::new()),
            dispatched: Arc::new(AtomicU64::new(0)),
        },
    };
    let mut queues = Vec::new();
    for (i, (spec, engines)) in p.stages.iter().zip(runners).enumerate().rev() {
        let (in_tx, in_rx) = flume::bounded::<Frame>(spec.queue);
        let chans: Vec<(flume::Sender<Batch>, flume::Receiver<Batch>)> = (0..spec.workers)
            .map(|_| flume::bounded::<Batch>(WORKER_QUEUE))
            .collect();
        queues.push(StageQueues {
            input: in_rx.clone(),
            capacity: spec.queue,
            workers: chans.iter().map(|c| c.1.clone()).collect(),
        });
        let senders: Vec<flume::Sender<Batch>> = chans.iter().map(|c| c.0.clone()).collect();
        let in_flight: Arc<Vec<AtomicUsize>> =
            Arc::new((0..spec.workers).map(|_| AtomicUsize::new(0)).collect());
        let (fb_tx, fb_rx) = flume::bounded::<bool>(256);
        let pool = Pool {
            workers: senders,
            in_flight: in_flight.clone(),
            dispatched: Arc::new(AtomicU64::new(0)),
        };
        let sequencer = Arc::new(Mutex::new(Sequencer::default()));
        threads.push(spawn_batcher(
            i,
            &spec.name,
            in_rx,
            pool.clone(),
            fb_rx,
            make_policy(p, i, timeline.clone()),
            stats.clone(),
            system_clock,
        )?);
        for (w, (runner, (_, rx))) in engines.into_iter().zip(chans).enumerate() {
            threads.push(spawn_worker(
                WorkerContext {
                    stage: i,
                    name: spec.name.clone(),
                    worker: w,
                    in_flight: in_flight.clone(),
                    next: next.clone(),
                    sequencer: sequencer.clone(),
                    feedback: fb_tx.clone(),
                    timeline: timeline.clone(),
                    stats: stats.clone(),
                    clock: clock.clone(),
                },
                runner,
                rx,
            )?);
        }
        next = Downstream { queue: in_tx, pool };
    }
    queues.reverse();
    let first_tx = next.queue.clone();
    drop(next);

    let budget = opts.max_frames.map(|n| Arc::new(AtomicU64::new(n)));
    let live = Arc::new(Live::new(
        p,
        stats.clone(),
        clock.clone(),
        budget.clone(),
        first_tx,
        queues,
    ));
    let api = match &opts.api {
        Some(a) => Some(crate::api::serve(a, live.clone())?),
        None => None,
    };
    let started = live.started;
    live.start_sources()?;

    let show_progress = opts.progress && std::io::stderr().is_terminal();
    let mut last_progress = Instant::now();
    let mut last_trim = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if last_trim.elapsed() >= Duration::from_secs(60) {
            last_trim = Instant::now();
            crate::alloc::trim();
        }
        let all_ended = !opts.serve && live.all_sources_ended();
        let out_of_budget = budget
            .as_ref()
            .is_some_and(|b| b.load(Ordering::SeqCst) == 0);
        let timed_out = opts.duration.is_some_and(|d| started.elapsed() >= d);
        if shutdown.is_triggered() || out_of_budget || timed_out || all_ended {
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
    // A sink with `when_full = "block"` whose destination stays down would hold the publisher,
    // and so the drain, forever: after its flush timeout it drops (and counts) instead.
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
    for t in threads {
        let _ = t.join();
    }
    if let Some(api) = api {
        api.stop();
    }
    Ok(stats.summary(started.elapsed().as_secs_f64()))
}

/// A batch on its way to a worker, with the route reserved for it, if any.
struct Batch {
    /// Frames in queue order.
    frames: Vec<Frame>,
    /// Reserved hops (first: the stage it is sent to).
    route: Option<Vec<Hop>>,
    /// Dispatch number within the stage (set when sent), for putting outputs back in order.
    seq: u64,
}

/// Puts a stage's finished batches back in dispatch order, so that the frames of a stream leave
/// a stage in the order they entered it, whichever worker ran them.
struct Sequencer<T> {
    /// The dispatch number to release next.
    next: u64,
    /// Finished out of order, by dispatch number.
    parked: BTreeMap<u64, T>,
}

impl<T> Default for Sequencer<T> {
    fn default() -> Self {
        Self {
            next: 0,
            parked: BTreeMap::new(),
        }
    }
}

impl<T> Sequencer<T> {
    /// Records that batch `seq` finished with `out`; returns every output now due, in order
    /// (empty while an earlier batch is still running).
    fn finish(&mut self, seq: u64, out: T) -> Vec<T> {
        self.parked.insert(seq, out);
        let mut due = Vec::new();
        while let Some(o) = self.parked.remove(&self.next) {
            due.push(o);
            self.next += 1;
        }
        due
    }
}

/// What a worker passes on for a batch: its frames and the rest of its route, or nothing when
/// the batch failed.
type Finished = Option<(Vec<Frame>, Option<Vec<Hop>>)>;

/// The workers of a stage, as seen by whoever sends them batches.
#[derive(Clone)]
struct Pool {
    /// One channel per worker.
    workers: Vec<flume::Sender<Batch>>,
    /// Batches sent to each worker and not finished.
    in_flight: Arc<Vec<AtomicUsize>>,
    /// Dispatch numbers of the stage.
    dispatched: Arc<AtomicU64>,
}

/// Where a stage's output goes: the next stage's queue (or the publisher), and its pool for
/// batches with a reserved route.
#[derive(Clone)]
struct Downstream {
    /// Frames one by one.
    queue: flume::Sender<Frame>,
    /// The next stage's workers (none after the last stage).
    pool: Pool,
}

impl Pool {
    /// Sends a batch to a worker: the reserved one, else the one with the least work.
    fn send_batch(&self, mut batch: Batch, rr: &mut usize) -> Result<(), Batch> {
        batch.seq = self.dispatched.fetch_add(1, Ordering::SeqCst);
        let n = self.workers.len();
        let w = match batch.route.as_ref().and_then(|r| r.first()) {
            Some(hop) => hop.worker,
            None => {
                *rr = (*rr + 1) % n;
                (0..n)
                    .map(|k| (*rr + k) % n)
                    .min_by_key(|w| self.in_flight[*w].load(Ordering::SeqCst))
                    .unwrap_or(0)
            }
        };
        self.in_flight[w].fetch_add(1, Ordering::SeqCst);
        self.workers[w].send(batch).map_err(|flume::SendError(b)| {
            self.in_flight[w].fetch_sub(1, Ordering::SeqCst);
            b
        })
    }
}

/// The batching policy of stage `i`. A `deadline` stage right after another `deadline` stage
/// follows the routes that stage reserves; a `deadline` stage after any other reserves the
/// route through itself and every `deadline` stage that directly follows it.
fn make_policy(
    p: &Pipeline,
    i: usize,
    timeline: Arc<Mutex<Timeline>>,
) -> Box<dyn BatchPolicy<Frame>> {
    let s = &p.stages[i];
    let ns = |d: &Duration| nanos(*d);
    match (s.policy, &s.profile) {
        (PolicyKind::Deadline, Some(_)) => {
            let costs = p.stages[i..]
                .iter()
                .take_while(|t| t.policy == PolicyKind::Deadline)
                .map_while(|t| t.profile.as_ref())
                .map(|prof| StageCost {
                    latency: prof.latency.iter().map(ns).collect(),
                    transfer: prof.transfer.iter().map(ns).collect(),
                })
                .collect();
            Box::new(DeadlinePolicy::new(
                DeadlineConfig {
                    stage: i,
                    costs,
                    planned: s.max_batch,
                    margin: nanos(s.margin),
                },
                timeline,
            ))
        }
        (PolicyKind::Aimd, _) => Box::new(AimdPolicy::new(s.max_batch, nanos(s.max_wait))),
        _ => Box::new(FixedPolicy::new(s.max_batch, nanos(s.max_wait))),
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_batcher(
    stage: usize,
    name: &str,
    rx: flume::Receiver<Frame>,
    out: Pool,
    feedback: flume::Receiver<bool>,
    mut policy: Box<dyn BatchPolicy<Frame>>,
    stats: Arc<Stats>,
    clock: SystemClock,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("batch-{name}"))
        .spawn(move || {
            let counters = &stats.stages[stage];
            let mut closing = false;
            let mut rr = 0;
            loop {
                for on_time in feedback.try_iter() {
                    policy.feedback(on_time);
                }
                let now = clock.now();
                let mut late = policy.take_late(now);
                let dispatch = policy.next_batch(now, closing);
                late.extend(policy.take_late(now));
                for f in late {
                    counters.dropped_late.fetch_add(1, Ordering::Relaxed);
                    stats
                        .stream(f.stream)
                        .dropped_late
                        .fetch_add(1, Ordering::Relaxed);
                }
                if let Some(d) = dispatch {
                    let batch = Batch {
                        frames: d.items,
                        route: d.route,
                        seq: 0,
                    };
                    if let Err(lost) = out.send_batch(batch, &mut rr) {
                        // Workers are gone (they only stop when this batcher is): count, never lose silently.
                        for f in lost.frames {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                            stats
                                .stream(f.stream)
                                .failed
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
                if closing && policy.is_empty() {
                    break; // nothing queued and nothing more will come
                }
                // Room for more: wait for a frame, or until the policy wants to look again.
                if policy.len() < policy.max_batch() && !closing {
                    let got = match policy.next_wakeup() {
                        Some(t) => rx
                            .recv_deadline(clock.instant_at(t))
                            .map_err(|e| matches!(e, flume::RecvTimeoutError::Disconnected)),
                        None => rx.recv().map_err(|_| true),
                    };
                    match got {
                        Ok(f) => {
                            let now = clock.now();
                            policy.push(f, now);
                            // Take whatever else is already waiting, up to a batch.
                            while policy.len() < policy.max_batch() {
                                match rx.try_recv() {
                                    Ok(f) => policy.push(f, now),
                                    Err(_) => break,
                                }
                            }
                        }
                        Err(true) => closing = true,
                        Err(false) => {}
                    }
                } else if let Some(t) = policy.next_wakeup() {
                    std::thread::sleep(
                        clock
                            .instant_at(t)
                            .saturating_duration_since(std::time::Instant::now()),
                    );
                }
            }
        })
}

/// What a worker thread shares with the rest of the pipeline.
struct WorkerContext {
    stage: usize,
    name: String,
    worker: usize,
    /// This stage's in-flight counters (decremented when a batch is done).
    in_flight: Arc<Vec<AtomicUsize>>,
    next: Downstream,
    sequencer: Arc<Mutex<Sequencer<Finished>>>,
    feedback: flume::Sender<bool>,
    timeline: Arc<Mutex<Timeline>>,
    stats: Arc<Stats>,
    clock: SharedClock,
}

fn spawn_worker(
    cx: WorkerContext,
    mut runner: Box<dyn StageRunner>,
    rx: flume::Receiver<Batch>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(format!("{}-{}", cx.name, cx.worker)).spawn(move || {
        let stats = &cx.stats;
        let counters = &stats.stages[cx.stage];
        let mut rr = 0;
        for Batch { mut frames, route, seq } in rx.iter() {
            let t0 = cx.clock.now();
            let result = runner.run(&mut frames);
            let t1 = cx.clock.now();
            cx.in_flight[cx.worker].fetch_sub(1, Ordering::SeqCst);
            cx.timeline.lock().unwrap_or_else(|e| e.into_inner()).finished(cx.stage, cx.worker, t1);
            counters.batches.fetch_add(1, Ordering::Relaxed);
            counters.batch_sizes.record(frames.len());
            counters.busy_nanos.fetch_add(t1 - t0, Ordering::Relaxed);
            let earliest = frames.iter().map(|f| f.deadline).min().unwrap_or(u64::MAX);
            let _ = cx.feedback.try_send(t1 <= earliest);
            let output = match result {
                Err(e) => {
                    tracing::error!(stage = %cx.name, frames = frames.len(), error = %e, "Batch failed.");
                    for f in frames {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        stats.stream(f.stream).failed.fetch_add(1, Ordering::Relaxed);
                    }
                    None
                }
                Ok(()) => {
                    for f in frames.iter_mut() {
                        let spent = t1.saturating_sub(f.entered_stage);
                        counters.latency.record(spent);
                        counters.frames_out.fetch_add(1, Ordering::Relaxed);
                        f.stage_nanos.push(spent);
                        f.entered_stage = t1;
                    }
                    Some((frames, route))
                }
            };
            // Release finished batches in dispatch order (this one, and any it was holding up),
            // forwarding under the lock so that no other worker can overtake.
            let mut sq = cx.sequencer.lock().unwrap_or_else(|e| e.into_inner());
            for (frames, route) in sq.finish(seq, output).into_iter().flatten() {
                forward(&cx, frames, route, &mut rr);
            }
        }
    })
}

/// Passes a finished batch on: the rest of a reserved route as a batch to the reserved worker,
/// else frame by frame to the next stage's queue (or the publisher).
fn forward(cx: &WorkerContext, frames: Vec<Frame>, route: Option<Vec<Hop>>, rr: &mut usize) {
    let stats = &cx.stats;
    let next_counters = stats.stages.get(cx.stage + 1);
    if let Some(rest) = route.filter(|r| r.len() > 1).map(|r| r[1..].to_vec()) {
        let n = frames.len() as u64;
        let batch = Batch {
            frames,
            route: Some(rest),
            seq: 0,
        };
        match cx.next.pool.send_batch(batch, rr) {
            Ok(()) => {
                if let Some(c) = next_counters {
                    c.frames_in.fetch_add(n, Ordering::Relaxed);
                }
            }
            Err(lost) => {
                for f in lost.frames {
                    stats
                        .stream(f.stream)
                        .failed
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        return;
    }
    for f in frames {
        let stream = f.stream;
        match cx.next.queue.send(f) {
            Ok(()) => {
                if let Some(c) = next_counters {
                    c.frames_in.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                stats.stream(stream).failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The JSON object published for a frame of stream `stream` (schema in the README).
pub fn result_json(p: &Pipeline, stream: &str, f: &Frame, published: u64) -> serde_json::Value {
    let mut stages = serde_json::Map::new();
    let mut results = serde_json::Map::new();
    for ((spec, spent), out) in p.stages.iter().zip(&f.stage_nanos).zip(&f.outputs) {
        stages.insert(spec.name.clone(), json!(round3(ms(*spent))));
        results.insert(
            spec.name.clone(),
            serde_json::to_value(out).unwrap_or(serde_json::Value::Null),
        );
    }
    json!({
        "pipeline": p.name,
        "stream": stream,
        "seq": f.seq,
        "pts_ms": f.pts.map(|d| round3(d.as_secs_f64() * 1e3)),
        "captured_at": sinks::rfc3339_millis(f.captured_wall),
        "captured_at_unix_ms": f.captured_wall.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        "latency_ms": {
            "end_to_end": round3(ms(published.saturating_sub(f.captured))),
            "stages": stages,
        },
        "deadline_slack_ms": round3(ms(f.deadline.saturating_sub(published))),
        "results": results,
    })
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn spawn_publisher(
    p: &Pipeline,
    rx: flume::Receiver<Frame>,
    mut sinks: Vec<SinkHandle>,
    stats: Arc<Stats>,
    clock: SharedClock,
) -> std::io::Result<JoinHandle<()>> {
    let p = p.clone();
    std::thread::Builder::new()
        .name("publish".into())
        .spawn(move || {
            // Stream names by index (streams added while running are looked up once).
            let mut names: Vec<Arc<str>> = Vec::new();
            for f in rx.iter() {
                while names.len() <= f.stream {
                    names.push(stats.stream_name(names.len()));
                }
                let counters = stats.stream(f.stream);
                let now = clock.now();
                if now > f.deadline {
                    counters.dropped_late.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // Published = made on time and handed to every sink; what each sink then
                // delivered, retried or dropped is in its own counters.
                let payload: Arc<str> = result_json(&p, &names[f.stream], &f, now)
                    .to_string()
                    .into();
                let offered = Instant::now();
                for s in sinks.iter_mut() {
                    s.offer(Message {
                        stream: names[f.stream].clone(),
                        seq: f.seq,
                        payload: payload.clone(),
                        offered,
                    });
                }
                counters.published.fetch_add(1, Ordering::Relaxed);
                stats.end_to_end.record(now - f.captured);
            }
            for s in sinks {
                let name = s.name().to_string();
                let sum = s.close();
                tracing::debug!(sink = %name, ?sum, "Sink closed.");
            }
        })
}

#[cfg(test)]
mod tests {
    use super::Sequencer;

    #[test]
    fn the_sequencer_releases_in_dispatch_order() {
        let mut s = Sequencer::default();
        assert!(s.finish(1, "b").is_empty(), "0 is still running");
        assert!(s.finish(3, "d").is_empty());
        assert_eq!(s.finish(0, "a"), vec!["a", "b"]);
        assert_eq!(s.finish(2, "c"), vec!["c", "d"]);
        assert_eq!(s.finish(4, "e"), vec!["e"]);
    }
}
