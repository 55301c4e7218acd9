//! The controls of a running pipeline: add and remove streams, apply an edited pipeline file,
//! and read its state. The HTTP API ([`crate::api`]) and the run loop share one [`Live`].
//!
//! What can change while running: the streams (added, removed, or restarted when their
//! definition changed) and the SLO (frames captured after the change get the new deadline).
//! Everything else (stages, models, workers, batching, sinks) holds engines, threads or
//! connections; a reload that changes it is refused with the reason, and nothing is applied.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use crate::clock::{SharedClock, nanos};
use crate::config::{self, ConfigErrors, ImageSpec, Pipeline, SourceSpec};
use crate::frame::Frame;
use crate::ingest::{self, SourceContext};
use crate::stats::Stats;

use super::analytics::Analytics;
use super::graph::Batch;
use crate::admission::Admission;

/// Why a live change was not made.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The definition or the edited file is invalid (same text as `poolpipe validate`).
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// A stream of that name is running.
    #[error("a stream named `{0}` is already running")]
    Exists(String),
    /// No running stream has that name.
    #[error("no stream named `{0}` is running")]
    NotFound(String),
    /// The edited file changes what cannot change while running.
    #[error("cannot be applied while running (restart to apply): {}", .0.join("; "))]
    Refused(Vec<String>),
    /// The pipeline is shutting down.
    #[error("the pipeline is stopping")]
    Stopping,
    /// A source thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReloadReport {
    /// The new SLO in milliseconds, when it changed.
    pub slo_ms: Option<u64>,
    /// Streams started.
    pub added: Vec<String>,
    /// Streams stopped.
    pub removed: Vec<String>,
    /// Streams whose definition changed, stopped and started again (counters continue).
    pub restarted: Vec<String>,
}

/// One source thread.
struct RunningSource {
    spec: SourceSpec,
    /// Its index in the stats (and the analytics).
    index: usize,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

#[derive(Default)]
struct SourceSet {
    running: BTreeMap<String, RunningSource>,
    /// Whether the pipeline file's sources were started (the API listens before they are).
    started: bool,
    /// Threads of removed streams, joined at shutdown.
    retired: Vec<JoinHandle<()>>,
}

/// An encoded JPEG, shared by every client that asks for it.
pub type Jpeg = Arc<[u8]>;

/// Queues of a stage, for depths in status and metrics (receivers never read from).
pub(super) struct StageQueues {
    pub input: flume::Receiver<Frame>,
    pub capacity: usize,
    pub workers: Vec<flume::Receiver<Batch>>,
    /// A recurrent stage's workers: what each holds.
    pub cells: Vec<Arc<crate::recurrent::CellGauges>>,
    /// A `fixed` stage with `"auto"` limits: what chooses them.
    pub tuner: Option<Arc<crate::batcher::analytic::Tuner>>,
    /// The flow the stage serves (fixed while running).
    pub flow: usize,
}

/// A running pipeline, as the API and the run loop see it.
pub struct Live {
    pub(super) started: Instant,
    /// The pipeline as it runs: streams added and removed, reloads and re-plans applied (the
    /// publisher reads its routes).
    pub(super) pipeline: Arc<Mutex<Pipeline>>,
    /// The pipeline file as last loaded (what a reload is compared with).
    loaded: Mutex<Pipeline>,
    pub(super) stats: Arc<Stats>,
    /// Each flow's SLO in nanoseconds (a reload may change it).
    slos: Vec<Arc<AtomicU64>>,
    clock: SharedClock,
    /// What each flow's sources deliver.
    fmts: Vec<ImageSpec>,
    budget: Option<Arc<AtomicU64>>,
    /// Each flow's admission; closed at shutdown so that the pipeline drains.
    pub(super) admissions: Vec<Arc<Admission>>,
    sources: Mutex<SourceSet>,
    /// By stage index (a re-plan appends the stages it starts).
    pub(super) queues: Mutex<Vec<StageQueues>>,
    /// Every re-plan made while running.
    pub(super) replans: Mutex<Vec<crate::control::Replan>>,
    /// Every controller epoch applied (`[cluster] nats`).
    pub(super) epochs: Mutex<Vec<serde_json::Value>>,
    /// The front lease this front runs the cameras under (`[cluster] nats`).
    pub(super) front_lease: Mutex<Option<serde_json::Value>>,
    reloads: AtomicU64,
    stopping: AtomicBool,
    /// Tracks and rule states per stream.
    analytics: Arc<Analytics>,
    /// Tells recurrent stages when a stream (re)starts or is removed.
    resets: Arc<crate::recurrent::StreamResets>,
    /// Each flow's arrivals, sampled by the run loop.
    demand: Mutex<Vec<crate::demand::Demand>>,
    /// The last frame published on each stream.
    latest: super::publisher::LatestFrames,
    /// The `[[output]]`s' counters.
    outputs: Vec<crate::outputs::OutputView>,
    /// Per stream: preview frames sent to clients, and frames of the stream the clients did not
    /// get (seq gaps between two frames sent to one client).
    previews: Mutex<BTreeMap<String, (u64, u64)>>,
    /// The last snapshot encoded for each stream, with its frame's `seq`: every client asking
    /// for the same frame (dashboards, previews) gets the one JPEG.
    encoded: Mutex<BTreeMap<String, (u64, Jpeg)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Live {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        p: &Pipeline,
        shared: Arc<Mutex<Pipeline>>,
        stats: Arc<Stats>,
        clock: SharedClock,
        budget: Option<Arc<AtomicU64>>,
        admissions: Vec<Arc<Admission>>,
        queues: Vec<StageQueues>,
        analytics: Arc<Analytics>,
        resets: Arc<crate::recurrent::StreamResets>,
        latest: super::publisher::LatestFrames,
        outputs: Vec<crate::outputs::OutputView>,
    ) -> Self {
        Self {
            started: Instant::now(),
            fmts: (0..p.flows.len()).map(|f| p.ingest_format_of(f)).collect(),
            pipeline: shared,
            loaded: Mutex::new(p.clone()),
            stats,
            slos: p
                .flows
                .iter()
                .map(|f| Arc::new(AtomicU64::new(nanos(f.slo))))
                .collect(),
            clock,
            budget,
            admissions,
            sources: Mutex::new(SourceSet::default()),
            queues: Mutex::new(queues),
            replans: Mutex::new(Vec::new()),
            epochs: Mutex::new(Vec::new()),
            front_lease: Mutex::new(None),
            reloads: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            analytics,
            resets,
            demand: Mutex::new(vec![Default::default(); p.flows.len()]),
            latest,
            outputs,
            previews: Mutex::new(BTreeMap::new()),
            encoded: Mutex::new(BTreeMap::new()),
        }
    }

    /// The pipeline as it runs now (with streams added or removed and reloads applied).
    pub fn pipeline(&self) -> Pipeline {
        lock(&self.pipeline).clone()
    }

    /// Time since the pipeline started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The SLO frames of the first flow get now.
    pub fn slo(&self) -> Duration {
        self.flow_slo(0)
    }

    /// The SLO frames of flow `flow` get now.
    pub fn flow_slo(&self, flow: usize) -> Duration {
        Duration::from_nanos(self.slos.get(flow).map_or(0, |s| s.load(Ordering::Relaxed)))
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Validates a stream definition (TOML text of one `[[source]]` table) against the running
    /// pipeline: same rules and messages as a pipeline file, relative paths from its folder.
    pub fn validate_stream(&self, text: &str) -> Result<SourceSpec, LiveError> {
        let file = lock(&self.pipeline).file.clone();
        let dir = file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        config::load_source_str(Path::new("request"), &dir, text).map_err(LiveError::Invalid)
    }

    /// Starts a stream; the others are not touched.
    pub fn add_stream(&self, spec: SourceSpec) -> Result<(), LiveError> {
        let mut set = lock(&self.sources);
        if set
            .running
            .get(&spec.name)
            .is_some_and(|r| !r.thread.is_finished())
        {
            return Err(LiveError::Exists(spec.name));
        }
        if let Some(old) = set.running.remove(&spec.name) {
            set.retired.push(old.thread); // ended by itself (end of file)
        }
        let running = self.spawn(spec.clone())?;
        set.running.insert(spec.name.clone(), running);
        let mut p = lock(&self.pipeline);
        p.sources.retain(|s| s.name != spec.name);
        p.sources.push(spec);
        Ok(())
    }

    /// Stops a stream. Its frames already in the pipeline finish and are counted.
    pub fn remove_stream(&self, name: &str) -> Result<(), LiveError> {
        let mut set = lock(&self.sources);
        let Some(r) = set.running.remove(name) else {
            return Err(LiveError::NotFound(name.to_string()));
        };
        r.stop.store(true, Ordering::SeqCst);
        self.analytics.end_stream(r.index);
        self.resets.removed(r.index, self.clock.now());
        tracing::info!(stream = %name, "Stream removed.");
        set.retired.push(r.thread);
        lock(&self.pipeline).sources.retain(|s| s.name != name);
        Ok(())
    }

    /// Reads the pipeline file again and applies what changed, or refuses (and changes nothing)
    /// when the edit touches what cannot change while running.
    pub fn reload(&self) -> Result<ReloadReport, LiveError> {
        let (file, options) = {
            let p = lock(&self.pipeline);
            (p.file.clone(), p.options.clone())
        };
        // Read as it was at start (`--plan`, `--profiles`).
        let new = config::load_pipeline_with(&file, &options).map_err(LiveError::Invalid)?;
        let mut set = lock(&self.sources);
        let old = lock(&self.loaded).clone();
        let refused = unchangeable_differences(&old, &new);
        if !refused.is_empty() {
            return Err(LiveError::Refused(refused));
        }
        let mut report = ReloadReport::default();
        if new.slo != old.slo {
            report.slo_ms = Some(new.slo.as_millis() as u64);
        }
        for (slo, flow) in self.slos.iter().zip(&new.flows) {
            slo.store(nanos(flow.slo), Ordering::SeqCst);
        }
        let wanted: BTreeMap<&str, &SourceSpec> =
            new.sources.iter().map(|s| (s.name.as_str(), s)).collect();
        let names: Vec<String> = set.running.keys().cloned().collect();
        for name in names {
            let changed = match wanted.get(name.as_str()) {
                None => false,
                Some(w) => format!("{w:?}") != format!("{:?}", set.running[&name].spec),
            };
            if !wanted.contains_key(name.as_str()) || changed {
                if let Some(r) = set.running.remove(&name) {
                    r.stop.store(true, Ordering::SeqCst);
                    self.analytics.end_stream(r.index);
                    self.resets.removed(r.index, self.clock.now());
                    set.retired.push(r.thread);
                }
                if changed {
                    report.restarted.push(name);
                } else {
                    report.removed.push(name);
                }
            }
        }
        for s in &new.sources {
            if !set.running.contains_key(&s.name) {
                let r = self.spawn(s.clone())?;
                set.running.insert(s.name.clone(), r);
                if !report.restarted.contains(&s.name) {
                    report.added.push(s.name.clone());
                }
            }
        }
        self.analytics.reconfigure(&new.analytics);
        {
            // The stages and routes that run stay (a re-plan may have changed them since the
            // file was loaded; an edit to them was refused above).
            let mut running = lock(&self.pipeline);
            let mut next = new.clone();
            next.stages = std::mem::take(&mut running.stages);
            next.routes = std::mem::take(&mut running.routes);
            for (f, r) in next.flows.iter_mut().zip(&running.flows) {
                f.routes = r.routes.clone();
            }
            next.plan = running.plan.take();
            *running = next;
        }
        *lock(&self.loaded) = new;
        self.reloads.fetch_add(1, Ordering::Relaxed);
        tracing::info!(?report, "Pipeline file reloaded.");
        Ok(report)
    }

    /// Starts the sources of the pipeline file.
    pub(super) fn start_sources(&self) -> Result<(), LiveError> {
        let specs = lock(&self.pipeline).sources.clone();
        let mut set = lock(&self.sources);
        set.started = true;
        for s in specs {
            let r = self.spawn(s.clone())?;
            set.running.insert(s.name, r);
        }
        Ok(())
    }

    fn spawn(&self, spec: SourceSpec) -> Result<RunningSource, LiveError> {
        if self.is_stopping() {
            return Err(LiveError::Stopping);
        }
        let (flow, file) = {
            let p = lock(&self.pipeline);
            (p.flow_of(&spec), p.file.clone())
        };
        let Some(flow) = flow else {
            let names: Vec<String> = lock(&self.pipeline)
                .flows
                .iter()
                .map(|f| f.name.clone())
                .collect();
            return Err(LiveError::Invalid(ConfigErrors(vec![config::Diagnostic {
                file,
                line: 0,
                column: 0,
                key: "source.flow".into(),
                message: match &spec.flow {
                    Some(f) => {
                        format!("no flow named `{f}`, expected one of: {}", names.join(", "))
                    }
                    None => format!(
                        "missing key `flow`: the pipeline has several flows ({})",
                        names.join(", ")
                    ),
                },
            }])));
        };
        let index = self.stats.add_stream(&spec.name, flow);
        self.analytics.start_stream(index, &spec.name);
        self.resets.restarted(index, self.clock.now());
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = SourceContext {
            stream: index,
            tx: self.admissions[flow].inlet(spec.priority),
            stats: self.stats.clone(),
            clock: self.clock.clone(),
            slo: self.slos[flow].clone(),
            stop: stop.clone(),
            budget: self.budget.clone(),
            resets: Some(self.resets.clone()),
        };
        tracing::info!(stream = %spec.name, uri = %spec.redacted_uri(), flow, "Starting source.");
        let fmt = self.fmts[flow].clone();
        let thread = std::thread::Builder::new()
            .name(format!("src-{}", spec.name))
            .spawn({
                let spec = spec.clone();
                move || ingest::run_source(&spec, &fmt, &ctx)
            })?;
        Ok(RunningSource {
            spec,
            index,
            stop,
            thread,
        })
    }

    /// Whether every source has ended by itself (none is running).
    pub(super) fn all_sources_ended(&self) -> bool {
        lock(&self.sources)
            .running
            .values()
            .all(|r| r.thread.is_finished())
    }

    /// Stops every source; returns the source threads to join (then
    /// [`Live::close_admissions`], so that what they delivered is still taken).
    pub(super) fn stop_sources(&self) -> Vec<JoinHandle<()>> {
        self.stopping.store(true, Ordering::SeqCst);
        let mut set = lock(&self.sources);
        let mut threads = std::mem::take(&mut set.retired);
        for (_, r) in std::mem::take(&mut set.running) {
            r.stop.store(true, Ordering::SeqCst);
            threads.push(r.thread);
        }
        threads
    }

    /// Closes every flow's admission: what the lanes hold is forwarded, then the stages drain.
    pub(super) fn close_admissions(&self) {
        for a in &self.admissions {
            a.close();
        }
    }

    /// Stage `i`'s queue: `(frames waiting, capacity, batches waiting in its workers' queues)`.
    pub fn queue_depth(&self, i: usize) -> (usize, usize, usize) {
        let queues = lock(&self.queues);
        let Some(q) = queues.get(i) else {
            return (0, 0, 0);
        };
        (
            q.input.len(),
            q.capacity,
            q.workers.iter().map(flume::Receiver::len).sum(),
        )
    }

    /// The `[[output]]`s' counters now.
    pub fn outputs(&self) -> Vec<crate::outputs::OutputSummary> {
        self.outputs.iter().map(|o| o.summary()).collect()
    }

    /// Re-plans applied, and re-plans that failed (the running plan stayed).
    pub fn replan_counts(&self) -> (u64, u64) {
        let r = lock(&self.replans);
        let failed = r.iter().filter(|x| x.error.is_some()).count() as u64;
        (r.len() as u64 - failed, failed)
    }

    /// With a controller, after its first epoch: the epoch running, epochs applied, and epochs
    /// that could not be applied.
    pub fn epoch_counts(&self) -> Option<(u64, u64, u64)> {
        let e = lock(&self.epochs);
        let failed = e.iter().filter(|x| x.get("error").is_some()).count() as u64;
        let running = e
            .iter()
            .rev()
            .find(|x| x.get("error").is_none())?
            .get("epoch")?
            .as_u64()?;
        Some((running, e.len() as u64 - failed, failed))
    }

    /// Samples every flow's arrivals (the run loop calls it every 100 ms).
    pub(super) fn sample_demand(&self) {
        let now = self.clock.now();
        let totals = self.stats.ingested_by_flow();
        for (d, n) in lock(&self.demand).iter_mut().zip(totals) {
            d.observe(now, n);
        }
    }

    /// Re-computes the limits of every stage with `"auto"` batching from its flow's measured
    /// demand (the run loop calls it every second).
    pub(super) fn tune_batches(&self) {
        let tuners: Vec<(usize, usize, Arc<crate::batcher::analytic::Tuner>)> = lock(&self.queues)
            .iter()
            .enumerate()
            .filter_map(|(i, q)| Some((i, q.flow, q.tuner.clone()?)))
            .collect();
        for (i, flow, t) in tuners {
            let (rates, dispersion) = self.demand(flow);
            let slo = self.slos.get(flow).map_or(0, |s| s.load(Ordering::Relaxed));
            if let Some(tuned) = t.retune(rates[1], dispersion, slo) {
                let (batch, wait) = t.knob.get();
                tracing::info!(
                    stage = i,
                    max_batch = batch,
                    max_wait_ms = wait as f64 / 1e6,
                    "auto batching: {}",
                    tuned.why
                );
            }
        }
    }

    /// The last frame published on stream `name`, its results drawn on it
    /// ([`crate::osd`]), as a JPEG, with the frame's `seq`; None when the stream has published
    /// nothing (yet).
    pub fn snapshot(&self, name: &str) -> Option<Result<(Jpeg, u64), String>> {
        let (image, outputs, header, seq) = {
            let latest = lock(&self.latest);
            let (f, overlay) = latest.get(name)?;
            let overlay = crate::osd::Overlay {
                attainment: overlay.attainment.or_else(|| self.attainment(f.stream)),
                ..*overlay
            };
            let overlay = &overlay;
            if let Some((s, jpeg)) = lock(&self.encoded).get(name)
                && *s == f.seq
            {
                return Some(Ok((jpeg.clone(), f.seq)));
            }
            (
                f.image.clone(),
                f.outputs.clone(),
                crate::osd::header(name, f, overlay),
                f.seq,
            )
        };
        let mut canvas = crate::osd::Canvas::from_image(&image);
        canvas.draw(
            &crate::osd::marks(&outputs),
            &header,
            &crate::osd::Style::default(),
            crate::osd::system_font(),
        );
        Some(
            canvas
                .jpeg(85)
                .map(|j| {
                    let j: Jpeg = Arc::from(j);
                    lock(&self.encoded).insert(name.to_string(), (seq, j.clone()));
                    (j, seq)
                })
                .map_err(|e| e.to_string()),
        )
    }

    /// Stream `stream`'s share of frames on time so far.
    fn attainment(&self, stream: usize) -> Option<f64> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = self.stats.stream(stream);
        let published = c.published.load(Relaxed);
        let done = published + c.missed();
        (done > 0).then(|| published as f64 / done as f64)
    }

    /// Counts a preview frame of `name` sent to a client that `skipped` frames since its last.
    pub fn preview_sent(&self, name: &str, skipped: u64) {
        let mut p = lock(&self.previews);
        let e = p.entry(name.to_string()).or_default();
        e.0 += 1;
        e.1 += skipped;
    }

    /// Flow `flow`'s arrival rate (frames/s) over each of [`crate::demand::WINDOWS_S`], and the
    /// index of dispersion of its arrivals over 10 s.
    pub fn demand(&self, flow: usize) -> ([Option<f64>; 3], Option<f64>) {
        let d = lock(&self.demand);
        let Some(d) = d.get(flow) else {
            return ([None; 3], None);
        };
        let s = |w: u64| w * 1_000_000_000;
        (
            crate::demand::WINDOWS_S.map(|w| d.rate(s(w))),
            d.dispersion(s(10)),
        )
    }

    /// A recurrent stage's `[streams held, state bytes, items]` (None for other stages).
    pub fn cell_gauges(&self, i: usize) -> Option<[usize; 3]> {
        let cells = lock(&self.queues).get(i)?.cells.clone();
        (!cells.is_empty()).then(|| {
            let mut g = [0; 3];
            for c in &cells {
                g[0] += c.streams.load(Ordering::Relaxed);
                g[1] += c.state_bytes.load(Ordering::Relaxed);
                g[2] += c.items.load(Ordering::Relaxed);
            }
            g
        })
    }

    /// What a recurrent stage holds (null for other stages).
    fn cell_status(&self, i: usize, spec: &crate::config::StageSpec) -> Value {
        let cells = lock(&self.queues)
            .get(i)
            .map(|q| q.cells.clone())
            .unwrap_or_default();
        let Some(r) = spec.model.recurrent.as_ref().filter(|_| !cells.is_empty()) else {
            return Value::Null;
        };
        let [streams, bytes, items] = self.cell_gauges(i).unwrap_or_default();
        let padding: u64 = cells
            .iter()
            .map(|c| c.padding.load(Ordering::Relaxed))
            .sum();
        // Steps and rows per step are the stage's `batches` and `mean_batch` counters.
        json!({
            "mode": r.mode,
            "batching": spec.batching,
            "streams_held": streams,
            "state_bytes": bytes,
            "items": items,
            "padding_rows": padding,
        })
    }

    /// Names of the streams running now, with their state (`running` or `ended`); before the
    /// sources start, the pipeline file's streams are `starting`.
    pub fn stream_states(&self) -> BTreeMap<String, (&'static str, String, bool)> {
        let set = lock(&self.sources);
        if !set.started {
            return lock(&self.pipeline)
                .sources
                .iter()
                .map(|s| {
                    let state = ("starting", s.redacted_uri(), s.is_live());
                    (s.name.clone(), state)
                })
                .collect();
        }
        set.running
            .iter()
            .map(|(n, r)| {
                let state = if r.thread.is_finished() {
                    "ended"
                } else {
                    "running"
                };
                (n.clone(), (state, r.spec.redacted_uri(), r.spec.is_live()))
            })
            .collect()
    }

    /// `GET /status`: streams, stages, pools, the plan that runs, counters.
    pub fn status(&self) -> Value {
        let elapsed = self.started.elapsed().as_secs_f64();
        let summary = self.stats.summary(elapsed);
        let p = self.pipeline();
        let states = self.stream_states();
        let streams: Vec<Value> = summary
            .streams
            .iter()
            .map(|s| {
                let (state, uri, live) =
                    states
                        .get(&s.name)
                        .cloned()
                        .unwrap_or(("removed", String::new(), false));
                let done = s.resolved();
                json!({
                    "name": s.name,
                    "state": state,
                    "uri": (!uri.is_empty()).then_some(uri),
                    "live": live,
                    "counters": s,
                    "slo_attainment": (done > 0).then(|| s.published as f64 / done as f64),
                })
            })
            .collect();
        // Stages of the flows' routes now (a re-plan retires others, which drain and stay listed
        // with their counters).
        let active: std::collections::BTreeSet<usize> = p
            .flows
            .iter()
            .flat_map(|f| &f.routes)
            .flat_map(|r| p.routes[*r].stages.iter().copied())
            .collect();
        let stages: Vec<Value> = p
            .stages
            .iter()
            .zip(&summary.stages)
            .enumerate()
            .map(|(i, (spec, c))| {
                let (depth, capacity, worker_batches) = self.queue_depth(i);
                json!({
                    "name": spec.name,
                    "flow": p.flows.get(spec.flow).map(|f| f.name.clone()),
                    "model": spec.model.name,
                    "device": spec.device.to_string(),
                    "devices": spec.devices,
                    "workers": spec.workers,
                    "threads": spec.threads,
                    "policy": spec.policy,
                    "max_batch": spec.max_batch,
                    "max_wait_ms": spec.max_wait.as_secs_f64() * 1e3,
                    "queue": {"frames": depth, "capacity": capacity, "worker_batches": worker_batches},
                    "busy_share": busy_share(c.busy_s, elapsed, spec.workers),
                    "counters": c,
                    "recurrent": self.cell_status(i, spec),
                    "auto_batching": lock(&self.queues).get(i).and_then(|q| q.tuner.as_ref().map(|t| t.report())),
                    "active": active.contains(&i),
                })
            })
            .collect();
        let mut pools: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (_, s) in p
            .stages
            .iter()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
        {
            pools
                .entry(s.device.to_string())
                .or_default()
                .push(json!({"stage": s.name, "workers": s.workers}));
        }
        let plan: Vec<Value> = p
            .stages
            .iter()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(_, s)| {
                json!({
                    "stage": s.name,
                    "device": s.device.to_string(),
                    "devices": s.devices,
                    "workers": s.workers,
                    "batch": s.max_batch,
                    "blocks": s.split.as_ref().map(|x| x.blocks).or(s.profile.as_ref().map(|x| x.blocks)),
                    "share": s.profile.as_ref().map(|x| x.share),
                })
            })
            .collect();
        let flows: Vec<Value> = p
            .flows
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let c = summary.flows.get(i);
                let demand = self.demand(i);
                json!({
                    "name": f.name,
                    "model": f.model,
                    "family": f.family,
                    "slo_ms": self.flow_slo(i).as_secs_f64() * 1e3,
                    "routes": f.routes.iter().map(|r| json!({
                        "stages": p.routes[*r].stages.iter().map(|s| p.stages[*s].name.clone()).collect::<Vec<_>>(),
                        "weight": p.routes[*r].weight,
                        "variant": p.routes[*r].variant.as_ref().map(|(m, a)| json!({"model": m, "accuracy": a})),
                    })).collect::<Vec<_>>(),
                    "waiting": self.admissions.get(i).map_or(0, |a| a.waiting()),
                    "demand": {
                        "fps_1s": demand.0[0],
                        "fps_10s": demand.0[1],
                        "fps_60s": demand.0[2],
                        "dispersion_10s": demand.1,
                    },
                    "counters": c,
                })
            })
            .collect();
        json!({
            "pipeline": p.name,
            "file": p.file.display().to_string(),
            "plan_file": p.plan.as_ref().map(|x| x.path.display().to_string()),
            "flows": flows,
            "state": if self.is_stopping() { "stopping" } else { "running" },
            "uptime_s": elapsed,
            "slo_ms": self.slo().as_secs_f64() * 1e3,
            "reloads": self.reloads.load(Ordering::Relaxed),
            "replans": lock(&self.replans).iter().map(|r| json!({
                "at_s": r.at_s,
                "reason": r.reason,
                "solve_s": r.solve_s,
                "serves_before": r.before,
                "serves_after": r.after,
                "processes_started": r.moves.started,
                "processes_stopped": r.moves.stopped,
                "error": r.error,
            })).collect::<Vec<_>>(),
            "epochs": lock(&self.epochs).clone(),
            "front_lease": lock(&self.front_lease).clone(),
            "streams": streams,
            "stages": stages,
            "pools": pools,
            "plan": plan,
            "previews": lock(&self.previews)
                .iter()
                .map(|(k, (sent, skipped))| (k.clone(), json!({"sent": sent, "skipped": skipped})))
                .collect::<serde_json::Map<_, _>>(),
            "sinks": summary.sinks,
            "nodes": summary.nodes,
            "outputs": self.outputs(),
            "gpus": crate::gpu::telemetry(),
            "published_fps": summary.published_fps(),
            "end_to_end_ms": {"p50": summary.end_to_end_p50_ms, "p99": summary.end_to_end_p99_ms},
        })
    }
}

/// Share of the time a stage's workers were running batches (0..=1).
pub fn busy_share(busy_s: f64, elapsed_s: f64, workers: usize) -> f64 {
    if elapsed_s <= 0.0 || workers == 0 {
        0.0
    } else {
        (busy_s / (elapsed_s * workers as f64)).min(1.0)
    }
}

/// What differs between two versions of a pipeline file that a running pipeline cannot take.
pub fn unchangeable_differences(old: &Pipeline, new: &Pipeline) -> Vec<String> {
    let mut why = Vec::new();
    if old.name != new.name {
        why.push(format!(
            "pipeline.name changed (`{}` -> `{}`)",
            old.name, new.name
        ));
    }
    if old.onnxruntime != new.onnxruntime {
        why.push("pipeline.onnxruntime changed (the runtime library is loaded once)".into());
    }
    if old.outputs != new.outputs {
        why.push("[[output]] changed (outputs hold encoders, files and servers)".into());
    }
    if old.bandwidth_gbps != new.bandwidth_gbps {
        why.push("pipeline.bandwidth_gbps changed (batchers are planned with it)".into());
    }
    let formats = |p: &Pipeline| {
        (0..p.flows.len())
            .map(|f| p.ingest_format_of(f))
            .collect::<Vec<_>>()
    };
    if formats(old) != formats(new) {
        why.push("the first model's input size changed (sources decode to it)".into());
    }
    let flows = |p: &Pipeline| {
        p.flows
            .iter()
            .map(|f| format!("{} {:?} {:?} {:?}", f.name, f.model, f.family, f.routes))
            .chain(p.routes.iter().map(|r| format!("{r:?}")))
            .collect::<Vec<_>>()
    };
    if flows(old) != flows(new) || old.plan != new.plan {
        why.push("flows, routes or the plan changed (stages are built from them at start)".into());
    }
    let names = |p: &Pipeline| p.stages.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    if names(old) != names(new) {
        why.push(format!(
            "stages changed ({:?} -> {:?}): engines and workers are built at start",
            names(old),
            names(new)
        ));
    } else {
        for (a, b) in old.stages.iter().zip(&new.stages) {
            if format!("{a:?}") != format!("{b:?}") {
                why.push(format!(
                    "stage `{}` changed (model, device, workers or batching are fixed at start)",
                    a.name
                ));
            }
        }
    }
    let sinks = |p: &Pipeline| p.sinks.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>();
    if sinks(old) != sinks(new) {
        why.push("sinks changed (connections are opened at start)".into());
    }
    why
}
