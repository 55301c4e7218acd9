//! Counters per stream and per stage, and latency histograms.
//!
//! Every frame that a source hands to the pipeline ends as exactly one of published,
//! dropped_late, dropped_overload, failed or lost, so for every stream
//! `ingested = published + dropped_late + dropped_overload + failed + lost` once the pipeline
//! has drained. `lost` counts frames that were on another node (see [`crate::cluster`]) when it or
//! its link went away.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use crate::clock::Nanos;
pub use crate::histogram::Histogram;
pub use crate::panics::ThreadPanic;
use crate::sinks::{SinkCounters, SinkSummary};

/// Counters of one stream.
#[derive(Debug, Default)]
pub struct StreamCounters {
    /// Frames the source handed to the pipeline.
    pub ingested: AtomicU64,
    /// Frames published by their deadline.
    pub published: AtomicU64,
    /// Frames dropped because their deadline passed.
    pub dropped_late: AtomicU64,
    /// Frames dropped because the pipeline was full.
    pub dropped_overload: AtomicU64,
    /// Of `dropped_overload`, those dropped in GStreamer before colour conversion and scaling.
    pub dropped_early: AtomicU64,
    /// Of `dropped_early`, those dropped before decoding (the rest of a group of pictures).
    pub dropped_before_decode: AtomicU64,
    /// Frames lost to an engine or processing error.
    pub failed: AtomicU64,
    /// Frames that were in flight on another node when it or the link to it went away.
    pub lost: AtomicU64,
    /// Times a live source was restarted after an error, EOS or stall.
    pub reconnects: AtomicU64,
    /// Source errors (each followed by a reconnect for live sources).
    pub source_errors: AtomicU64,
    /// Events its frames raised (rule events offered to the sinks beside the results).
    pub events: AtomicU64,
}

impl StreamCounters {
    /// Frames that ended without being published: dropped (late or overload), failed or lost.
    pub fn missed(&self) -> u64 {
        self.dropped_late.load(Relaxed)
            + self.dropped_overload.load(Relaxed)
            + self.failed.load(Relaxed)
            + self.lost.load(Relaxed)
    }
}

/// Counters of one stage.
#[derive(Debug, Default)]
pub struct StageCounters {
    /// Frames that entered the stage's queue.
    pub frames_in: AtomicU64,
    /// Frames that left the stage with a result.
    pub frames_out: AtomicU64,
    /// Frames dropped in this stage's batcher because their deadline had passed.
    pub dropped_late: AtomicU64,
    /// Frames that failed in this stage.
    pub failed: AtomicU64,
    /// Frames lost with a worker of this stage on another node.
    pub lost: AtomicU64,
    /// Batches run.
    pub batches: AtomicU64,
    /// Nanoseconds workers spent running batches (all workers together).
    pub busy_nanos: AtomicU64,
    /// Time from entering the queue to leaving the stage.
    pub latency: Histogram,
    /// Batches run, by size (index = frames in the batch; the last slot holds every larger size).
    pub batch_sizes: BatchSizes,
}

/// Counts of batches by size, in fixed memory.
#[derive(Debug)]
pub struct BatchSizes(Vec<AtomicU64>);

/// Batch sizes counted one by one; larger batches share the last slot.
pub const MAX_COUNTED_BATCH: usize = 256;

impl Default for BatchSizes {
    fn default() -> Self {
        Self((0..=MAX_COUNTED_BATCH).map(|_| AtomicU64::new(0)).collect())
    }
}

impl BatchSizes {
    /// Records a batch of `n` frames.
    pub fn record(&self, n: usize) {
        self.0[n.min(MAX_COUNTED_BATCH)].fetch_add(1, Relaxed);
    }
    /// `(size, batches)` for every size seen, ascending.
    pub fn counts(&self) -> Vec<(usize, u64)> {
        self.0
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.load(Relaxed)))
            .filter(|(_, c)| *c > 0)
            .collect()
    }
}

/// A stream's name, the flow it feeds, and its counters.
type StreamEntry = (Arc<str>, usize, Arc<StreamCounters>);

/// All counters of a running pipeline.
///
/// Streams can be added while the pipeline runs; a stream's index never changes, and a stream
/// removed and added again under the same name keeps its counters.
#[derive(Debug)]
pub struct Stats {
    /// Per stream, with its name and flow, in the order they were first added.
    streams: RwLock<Vec<StreamEntry>>,
    /// Flow names, with the end-to-end latency of each flow's published frames.
    flows: Vec<(String, Histogram)>,
    /// Per stage, with its name, in order. Append-only: a re-plan adds the stages of the
    /// pipelines it starts (a stage's index never changes).
    stages: RwLock<Vec<(String, Arc<StageCounters>)>>,
    /// End-to-end latency of published frames.
    pub end_to_end: Histogram,
    /// Time the publisher spent tracking and running rules, per frame that has them.
    pub analytics: Histogram,
    /// Sinks by name, as they were opened.
    sinks: Mutex<Vec<(String, Arc<SinkCounters>)>>,
    /// Other nodes of a cluster that run workers, by name.
    nodes: Mutex<Vec<(String, Arc<NodeCounters>)>>,
    /// Threads that panicked (a pipeline with any exits with an error).
    panics: Mutex<Vec<ThreadPanic>>,
}

impl StreamCounters {
    /// A frame was handed to the pipeline.
    pub fn frame_ingested(&self) {
        self.ingested.fetch_add(1, Relaxed);
    }
    /// A frame was dropped because the pipeline's first queue was full.
    pub fn frame_dropped_overload(&self) {
        self.dropped_overload.fetch_add(1, Relaxed);
    }
    /// A frame was dropped because the pipeline was full, before it was converted and scaled.
    pub fn frame_dropped_early(&self) {
        self.ingested.fetch_add(1, Relaxed);
        self.dropped_overload.fetch_add(1, Relaxed);
        self.dropped_early.fetch_add(1, Relaxed);
    }
    /// Dropped before decoding, for the same reason.
    pub fn frame_dropped_before_decode(&self) {
        self.frame_dropped_early();
        self.dropped_before_decode.fetch_add(1, Relaxed);
    }
    /// The source failed (a live source then reconnects).
    pub fn source_error(&self) {
        self.source_errors.fetch_add(1, Relaxed);
    }
    /// A live source was started again.
    pub fn source_reconnected(&self) {
        self.reconnects.fetch_add(1, Relaxed);
    }
}

impl Stats {
    /// Zeroed counters for these streams (all of the first flow) and stages.
    pub fn new(stream_names: Vec<String>, stage_names: Vec<String>) -> Self {
        Self::with_flows(
            vec!["pipeline".into()],
            stream_names.into_iter().map(|n| (n, 0)).collect(),
            stage_names,
        )
    }

    /// Zeroed counters for these flows, streams (with their flow) and stages.
    pub fn with_flows(
        flow_names: Vec<String>,
        streams: Vec<(String, usize)>,
        stage_names: Vec<String>,
    ) -> Self {
        Self {
            streams: RwLock::new(
                streams
                    .into_iter()
                    .map(|(n, f)| (Arc::from(n), f, Arc::default()))
                    .collect(),
            ),
            flows: flow_names
                .into_iter()
                .map(|n| (n, Histogram::default()))
                .collect(),
            stages: RwLock::new(
                stage_names
                    .into_iter()
                    .map(|n| (n, Arc::default()))
                    .collect(),
            ),
            end_to_end: Histogram::default(),
            analytics: Histogram::default(),
            sinks: Mutex::new(Vec::new()),
            nodes: Mutex::new(Vec::new()),
            panics: Mutex::new(Vec::new()),
        }
    }

    /// Counters for one more stage (started by a re-plan); returns its index.
    pub fn add_stage(&self, name: String) -> usize {
        let mut s = self.stages.write().unwrap_or_else(|e| e.into_inner());
        s.push((name, Arc::default()));
        s.len() - 1
    }

    /// Stage `stage`'s counters.
    pub fn stage(&self, stage: usize) -> Option<Arc<StageCounters>> {
        self.stages
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(stage)
            .map(|(_, c)| c.clone())
    }

    /// Number of stages counted.
    pub fn stage_count(&self) -> usize {
        self.stages.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Runs `f` on stage `stage`'s counters, if it exists.
    fn on_stage(&self, stage: usize, f: impl FnOnce(&StageCounters)) {
        if let Some((_, c)) = self
            .stages
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(stage)
        {
            f(c);
        }
    }

    /// `n` frames entered stage `stage`'s queue (or were sent to one of its workers directly).
    pub fn frames_entered(&self, stage: usize, n: u64) {
        self.on_stage(stage, |c| {
            c.frames_in.fetch_add(n, Relaxed);
        });
    }

    /// A frame of `stream` was dropped by stage `stage`'s batcher: its deadline can no longer
    /// be met.
    pub fn frame_late_in_stage(&self, stage: usize, stream: usize) {
        self.on_stage(stage, |c| {
            c.dropped_late.fetch_add(1, Relaxed);
        });
        self.stream(stream).dropped_late.fetch_add(1, Relaxed);
    }

    /// A frame of `stream` failed in stage `stage` (an engine error, or its worker is gone).
    pub fn frame_failed_in_stage(&self, stage: usize, stream: usize) {
        self.on_stage(stage, |c| {
            c.failed.fetch_add(1, Relaxed);
        });
        self.stream(stream).failed.fetch_add(1, Relaxed);
    }

    /// A frame of `stream` was on a worker of stage `stage` that runs on another node when the
    /// node or the link to it went away.
    pub fn frame_lost_in_stage(&self, stage: usize, stream: usize) {
        self.on_stage(stage, |c| {
            c.lost.fetch_add(1, Relaxed);
        });
        self.stream(stream).lost.fetch_add(1, Relaxed);
    }

    /// A frame of `stream` was lost between stages (the next stage is gone).
    pub fn frame_failed_between_stages(&self, stream: usize) {
        self.stream(stream).failed.fetch_add(1, Relaxed);
    }

    /// A worker of stage `stage` ran a batch of `size` frames for `busy` nanoseconds.
    pub fn batch_ran(&self, stage: usize, size: usize, busy: Nanos) {
        self.on_stage(stage, |c| {
            c.batches.fetch_add(1, Relaxed);
            c.batch_sizes.record(size);
            c.busy_nanos.fetch_add(busy, Relaxed);
        });
    }

    /// A frame left stage `stage` with a result, `spent` after it entered.
    pub fn frame_left_stage(&self, stage: usize, spent: Nanos) {
        self.on_stage(stage, |c| {
            c.latency.record(spent);
            c.frames_out.fetch_add(1, Relaxed);
        });
    }

    /// A frame of `stream` finished after its deadline and was not published.
    pub fn frame_finished_late(&self, stream: usize) {
        self.stream(stream).dropped_late.fetch_add(1, Relaxed);
    }

    /// A rule raised an event on a frame of `stream`.
    pub fn event_raised(&self, stream: usize) {
        self.stream(stream).events.fetch_add(1, Relaxed);
    }

    /// A frame of `stream` was published, `end_to_end` after it was captured.
    pub fn frame_published(&self, stream: usize, end_to_end: Nanos) {
        let flow = {
            let s = self.streams.read().unwrap_or_else(|e| e.into_inner());
            s[stream].2.published.fetch_add(1, Relaxed);
            s[stream].1
        };
        self.end_to_end.record(end_to_end);
        if let Some((_, h)) = self.flows.get(flow) {
            h.record(end_to_end);
        }
    }

    /// A pipeline thread panicked.
    pub fn thread_panicked(&self, thread: String, message: String) {
        tracing::error!(thread = %thread, message = %message, "Thread panicked.");
        self.panics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ThreadPanic { thread, message });
    }

    /// Whether any pipeline thread (worker, batcher, publisher or sink) panicked.
    pub fn any_panicked(&self) -> bool {
        !self
            .panics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
            || self
                .sinks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|(_, c)| c.panicked().is_some())
    }

    /// Every pipeline thread that panicked, sinks' delivery threads included.
    pub fn panics(&self) -> Vec<ThreadPanic> {
        let mut all = self
            .panics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (name, c) in self.sinks() {
            if let Some(message) = c.panicked() {
                all.push(ThreadPanic {
                    thread: format!("sink `{name}`"),
                    message,
                });
            }
        }
        all
    }

    /// Adds a sink's counters to the reports.
    pub fn register_sink(&self, name: &str, counters: Arc<SinkCounters>) {
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), counters));
    }

    /// Registers another node of the cluster, so that the summary reports its link.
    pub fn register_node(&self, name: &str, counters: Arc<NodeCounters>) {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name.to_string(), counters));
    }

    /// The other nodes of the cluster, now.
    pub fn nodes(&self) -> Vec<NodeSummary> {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, c)| c.summary(n))
            .collect()
    }

    /// The counters of stream `i` (an index from [`Stats::add_stream`] or the initial list).
    ///
    /// # Panics
    /// If no stream has that index (indices are never reused or removed).
    pub fn stream(&self, i: usize) -> Arc<StreamCounters> {
        self.streams.read().unwrap_or_else(|e| e.into_inner())[i]
            .2
            .clone()
    }

    /// Frames all streams have ingested (every frame counted at its source, dropped or not).
    pub fn ingested_total(&self) -> u64 {
        self.ingested_by_flow().iter().sum()
    }

    /// Frames ingested by the streams of each flow (as they feed flows now), by flow index.
    pub fn ingested_by_flow(&self) -> Vec<u64> {
        self.flow_totals().iter().map(|f| f.ingested).collect()
    }

    /// The frame counters of each flow's streams (as they feed flows now), by flow index; no
    /// latency quantiles (cheaper than [`Stats::summary`], for callers that poll).
    pub fn flow_totals(&self) -> Vec<FlowSummary> {
        self.flows_of(&self.stream_summaries())
    }

    /// Every stream's counters, read once, with its flow index.
    fn stream_summaries(&self) -> Vec<(usize, StreamSummary)> {
        let flow_name = |f: usize| self.flows.get(f).map_or("", |x| x.0.as_str()).to_string();
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, flow, c)| {
                let s = StreamSummary {
                    name: name.to_string(),
                    flow: flow_name(*flow),
                    ingested: c.ingested.load(Relaxed),
                    published: c.published.load(Relaxed),
                    dropped_late: c.dropped_late.load(Relaxed),
                    dropped_overload: c.dropped_overload.load(Relaxed),
                    dropped_early: c.dropped_early.load(Relaxed),
                    dropped_before_decode: c.dropped_before_decode.load(Relaxed),
                    failed: c.failed.load(Relaxed),
                    lost: c.lost.load(Relaxed),
                    reconnects: c.reconnects.load(Relaxed),
                    source_errors: c.source_errors.load(Relaxed),
                    events: c.events.load(Relaxed),
                };
                (*flow, s)
            })
            .collect()
    }

    /// Per-flow sums of `streams` (without latency quantiles).
    fn flows_of(&self, streams: &[(usize, StreamSummary)]) -> Vec<FlowSummary> {
        let mut out: Vec<FlowSummary> = self
            .flows
            .iter()
            .map(|(name, _)| FlowSummary {
                name: name.clone(),
                ..FlowSummary::default()
            })
            .collect();
        for (flow, s) in streams {
            if let Some(f) = out.get_mut(*flow) {
                f.ingested += s.ingested;
                f.published += s.published;
                f.dropped_late += s.dropped_late;
                f.dropped_overload += s.dropped_overload;
                f.dropped_early += s.dropped_early;
                f.dropped_before_decode += s.dropped_before_decode;
                f.failed += s.failed;
                f.lost += s.lost;
            }
        }
        out
    }

    /// The name of stream `i`.
    pub fn stream_name(&self, i: usize) -> Arc<str> {
        self.streams.read().unwrap_or_else(|e| e.into_inner())[i]
            .0
            .clone()
    }

    /// Index of the stream named `name`, adding it (with zeroed counters) if it is new; the
    /// stream now feeds flow `flow`.
    pub fn add_stream(&self, name: &str, flow: usize) -> usize {
        let mut s = self.streams.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = s.iter().position(|(n, _, _)| &**n == name) {
            s[i].1 = flow;
            return i;
        }
        s.push((Arc::from(name), flow, Arc::default()));
        s.len() - 1
    }

    /// Every stream's name and counters, in index order.
    pub fn streams(&self) -> Vec<(Arc<str>, Arc<StreamCounters>)> {
        self.streams
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, _, c)| (n.clone(), c.clone()))
            .collect()
    }

    /// Flow names, in order.
    pub fn flow_names(&self) -> Vec<String> {
        self.flows.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Every sink's name and counters.
    pub fn sinks(&self) -> Vec<(String, Arc<SinkCounters>)> {
        self.sinks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A snapshot for reports.
    pub fn summary(&self, elapsed_s: f64) -> Summary {
        let indexed = self.stream_summaries();
        let flows = self
            .flows_of(&indexed)
            .into_iter()
            .zip(&self.flows)
            .map(|(f, (_, latency))| FlowSummary {
                p50_ms: latency.quantile_ms(0.5),
                p99_ms: latency.quantile_ms(0.99),
                ..f
            })
            .collect();
        let stages = self
            .stages
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, c)| {
                let batches = c.batches.load(Relaxed);
                // Frames per batch (a recurrent stage: rows per step).
                let rows: u64 = c
                    .batch_sizes
                    .counts()
                    .iter()
                    .map(|(size, n)| *size as u64 * n)
                    .sum();
                StageSummary {
                    name: name.clone(),
                    frames_in: c.frames_in.load(Relaxed),
                    frames_out: c.frames_out.load(Relaxed),
                    dropped_late: c.dropped_late.load(Relaxed),
                    failed: c.failed.load(Relaxed),
                    lost: c.lost.load(Relaxed),
                    batches,
                    mean_batch: if batches > 0 {
                        rows as f64 / batches as f64
                    } else {
                        0.0
                    },
                    busy_s: c.busy_nanos.load(Relaxed) as f64 / 1e9,
                    p50_ms: c.latency.quantile_ms(0.5),
                    p99_ms: c.latency.quantile_ms(0.99),
                }
            })
            .collect();
        let sinks = self
            .sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, c)| c.summary(n))
            .collect();
        let nodes = self.nodes();
        Summary {
            nodes,
            elapsed_s,
            streams: indexed.into_iter().map(|(_, s)| s).collect(),
            flows,
            stages,
            sinks,
            end_to_end_p50_ms: self.end_to_end.quantile_ms(0.5),
            end_to_end_p99_ms: self.end_to_end.quantile_ms(0.99),
            analytics_p50_us: self.analytics.quantile_ms(0.5).map(|v| v * 1e3),
            analytics_p99_us: self.analytics.quantile_ms(0.99).map(|v| v * 1e3),
            panics: self.panics(),
            epochs: Vec::new(),
            front_lease: None,
        }
    }
}

/// Counters of one stream at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    /// Stream name.
    pub name: String,
    /// The flow it feeds.
    pub flow: String,
    /// See [`StreamCounters`].
    pub ingested: u64,
    /// See [`StreamCounters`].
    pub published: u64,
    /// See [`StreamCounters`].
    pub dropped_late: u64,
    /// See [`StreamCounters`].
    pub dropped_overload: u64,
    /// See [`StreamCounters`] (part of `dropped_overload`).
    pub dropped_early: u64,
    /// See [`StreamCounters`] (part of `dropped_early`).
    pub dropped_before_decode: u64,
    /// See [`StreamCounters`].
    pub failed: u64,
    /// See [`StreamCounters`].
    #[serde(default)]
    pub lost: u64,
    /// See [`StreamCounters`].
    pub reconnects: u64,
    /// See [`StreamCounters`].
    pub events: u64,
    /// See [`StreamCounters`].
    pub source_errors: u64,
}

impl StreamSummary {
    /// Frames with an outcome: published, dropped, failed or lost.
    pub fn resolved(&self) -> u64 {
        self.published + self.dropped_late + self.dropped_overload + self.failed + self.lost
    }

    /// Whether every ingested frame is accounted for.
    pub fn balanced(&self) -> bool {
        self.ingested == self.resolved()
    }
}

/// The streams of one flow, added up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlowSummary {
    /// Flow name.
    pub name: String,
    /// Frames its sources handed to the pipeline.
    pub ingested: u64,
    /// Published by their deadline.
    pub published: u64,
    /// Dropped because their deadline passed.
    pub dropped_late: u64,
    /// Dropped because the flow was full.
    pub dropped_overload: u64,
    /// Of `dropped_overload`, dropped before conversion.
    pub dropped_early: u64,
    /// Of `dropped_early`, dropped before decoding.
    pub dropped_before_decode: u64,
    /// Lost to errors.
    pub failed: u64,
    /// In flight on a node that went away.
    pub lost: u64,
    /// Median end-to-end latency of published frames, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile end-to-end latency of published frames, ms.
    pub p99_ms: Option<f64>,
}

impl FlowSummary {
    /// Frames with an outcome: published, dropped, failed or lost.
    pub fn resolved(&self) -> u64 {
        self.published + self.dropped_late + self.dropped_overload + self.failed + self.lost
    }
}

/// Counters of one stage at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct StageSummary {
    /// Stage name.
    pub name: String,
    /// Frames in.
    pub frames_in: u64,
    /// Frames out with a result.
    pub frames_out: u64,
    /// Dropped for lateness in this stage.
    pub dropped_late: u64,
    /// Failed in this stage.
    pub failed: u64,
    /// Lost with a worker on a node that went away.
    pub lost: u64,
    /// Batches run.
    pub batches: u64,
    /// Mean frames per batch.
    pub mean_batch: f64,
    /// Worker busy time, seconds.
    pub busy_s: f64,
    /// Median time in the stage, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile time in the stage, ms.
    pub p99_ms: Option<f64>,
}

/// Snapshot of a pipeline's counters.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Seconds since the pipeline started.
    pub elapsed_s: f64,
    /// Per stream.
    pub streams: Vec<StreamSummary>,
    /// Per flow.
    pub flows: Vec<FlowSummary>,
    /// Per stage.
    pub stages: Vec<StageSummary>,
    /// Per sink.
    pub sinks: Vec<SinkSummary>,
    /// Per other node of a cluster (absent from JSON without one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeSummary>,
    /// Median end-to-end latency of published frames, ms.
    pub end_to_end_p50_ms: Option<f64>,
    /// 99th percentile end-to-end latency of published frames, ms.
    pub end_to_end_p99_ms: Option<f64>,
    /// Median time of tracking and rules per frame, microseconds (absent without them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub analytics_p50_us: Option<f64>,
    /// 99th percentile of the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub analytics_p99_us: Option<f64>,
    /// Pipeline threads that panicked (absent from JSON when none did).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub panics: Vec<ThreadPanic>,
    /// Controller epochs the front applied (`[cluster] nats`; absent from JSON without).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub epochs: Vec<serde_json::Value>,
    /// The front lease this front ran the cameras under (`[cluster] nats`): its id, how long it
    /// stood by, when it took the lease, and whether another front took it away.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub front_lease: Option<serde_json::Value>,
}

impl Summary {
    /// Whether the accounting identity holds for every stream.
    pub fn balanced(&self) -> bool {
        self.streams.iter().all(StreamSummary::balanced)
    }

    /// Published frames per second over the run.
    pub fn published_fps(&self) -> f64 {
        let p: u64 = self.streams.iter().map(|s| s.published).sum();
        if self.elapsed_s > 0.0 {
            p as f64 / self.elapsed_s
        } else {
            0.0
        }
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let _ = writeln!(
            s,
            "{:<20} {:>9} {:>9} {:>6} {:>9} {:>6} {:>6} {:>10}",
            "stream", "ingested", "published", "late", "overload", "failed", "lost", "reconnects"
        );
        for st in &self.streams {
            let _ = writeln!(
                s,
                "{:<20} {:>9} {:>9} {:>6} {:>9} {:>6} {:>6} {:>10}{}",
                st.name,
                st.ingested,
                st.published,
                st.dropped_late,
                st.dropped_overload,
                st.failed,
                st.lost,
                st.reconnects,
                if st.balanced() { "" } else { "  UNBALANCED" }
            );
        }
        if self.flows.len() > 1 {
            let _ = writeln!(
                s,
                "{:<20} {:>9} {:>9} {:>6} {:>9} {:>6} {:>10} {:>8}",
                "flow",
                "ingested",
                "published",
                "late",
                "overload",
                "failed",
                "attainment",
                "p99 ms"
            );
            for fl in &self.flows {
                let done = fl.resolved();
                let _ = writeln!(
                    s,
                    "{:<20} {:>9} {:>9} {:>6} {:>9} {:>6} {:>10} {:>8}",
                    fl.name,
                    fl.ingested,
                    fl.published,
                    fl.dropped_late,
                    fl.dropped_overload,
                    fl.failed,
                    if done > 0 {
                        format!("{:.3}", fl.published as f64 / done as f64)
                    } else {
                        "-".into()
                    },
                    f(fl.p99_ms)
                );
            }
        }
        let _ = writeln!(
            s,
            "{:<20} {:>9} {:>9} {:>6} {:>6} {:>8} {:>10} {:>8} {:>8}",
            "stage", "in", "out", "late", "failed", "batches", "mean batch", "p50 ms", "p99 ms"
        );
        for st in &self.stages {
            let _ = writeln!(
                s,
                "{:<20} {:>9} {:>9} {:>6} {:>6} {:>8} {:>10.2} {:>8} {:>8}",
                st.name,
                st.frames_in,
                st.frames_out,
                st.dropped_late,
                st.failed,
                st.batches,
                st.mean_batch,
                f(st.p50_ms),
                f(st.p99_ms)
            );
        }
        if !self.sinks.is_empty() {
            let _ = writeln!(
                s,
                "{:<20} {:>9} {:>9} {:>9} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}",
                "sink",
                "offered",
                "recovered",
                "delivered",
                "retries",
                "resent",
                "overflow",
                "refused",
                "corrupt",
                "left",
                "p99 ms"
            );
            for k in &self.sinks {
                let _ = writeln!(
                    s,
                    "{:<20} {:>9} {:>9} {:>9} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}",
                    k.name,
                    k.offered,
                    k.recovered,
                    k.delivered,
                    k.retries,
                    k.resent,
                    k.dropped_overflow,
                    k.dropped_rejected,
                    k.dropped_corrupt,
                    k.left_at_shutdown + k.buffered,
                    f(k.p99_ms)
                );
            }
        }
        if !self.nodes.is_empty() {
            let _ = writeln!(
                s,
                "{:<20} {:>4} {:>6} {:>8} {:>8} {:>6} {:>10} {:>11} {:>11} {:>9}",
                "node",
                "up",
                "downs",
                "batches",
                "frames",
                "lost",
                "MB sent",
                "link p50 ms",
                "link p99 ms",
                "link Gb/s"
            );
            for n in &self.nodes {
                let _ = writeln!(
                    s,
                    "{:<20} {:>4} {:>6} {:>8} {:>8} {:>6} {:>10.1} {:>11} {:>11} {:>9}",
                    n.name,
                    if n.up { "yes" } else { "no" },
                    n.downs,
                    n.batches,
                    n.frames,
                    n.lost,
                    n.bytes_sent as f64 / 1e6,
                    f(n.link_p50_ms),
                    f(n.link_p99_ms),
                    n.link_gbps.map_or("-".into(), |g| format!("{g:.3}"))
                );
            }
        }
        let _ = write!(
            s,
            "{:.1} s, {:.1} published frames/s, end-to-end p50 {} ms, p99 {} ms",
            self.elapsed_s,
            self.published_fps(),
            f(self.end_to_end_p50_ms),
            f(self.end_to_end_p99_ms)
        );
        s
    }
}

/// Counters of the link to another node of a cluster (see [`crate::cluster`]).
#[derive(Debug, Default)]
pub struct NodeCounters {
    /// The node answers.
    pub up: std::sync::atomic::AtomicBool,
    /// Times it went down.
    pub downs: AtomicU64,
    /// When it last went down (Unix ms; 0: never).
    pub down_at_unix_ms: AtomicU64,
    /// When it last came up (Unix ms; 0: never).
    pub up_at_unix_ms: AtomicU64,
    /// Frames in them.
    pub frames: AtomicU64,
    /// Frames lost with it.
    pub lost: AtomicU64,
    /// Bytes sent to it (batches answered).
    pub bytes_sent: AtomicU64,
    /// Bytes it took straight from other nodes for those batches (their activations held
    /// there).
    pub bytes_direct: AtomicU64,
    /// Bytes of its answers (the outputs that came back here).
    pub bytes_back: AtomicU64,
    /// Link time of each batch answered: the round trip less the node's own time (its count
    /// is the batches answered, its sum their link time).
    pub link: Histogram,
}

impl NodeCounters {
    /// A batch of `frames` frames and `bytes` bytes was answered, `link` of its round trip on
    /// the link.
    pub fn answered(&self, frames: usize, bytes: usize, link: Nanos) {
        self.frames.fetch_add(frames as u64, Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Relaxed);
        self.link.record(link);
    }

    /// The counters now.
    pub fn summary(&self, name: &str) -> NodeSummary {
        let bytes = self.bytes_sent.load(Relaxed);
        let direct = self.bytes_direct.load(Relaxed);
        let back = self.bytes_back.load(Relaxed);
        let link_s = self.link.sum_s();
        NodeSummary {
            name: name.to_string(),
            up: self.up.load(Relaxed),
            downs: self.downs.load(Relaxed),
            down_at_unix_ms: Some(self.down_at_unix_ms.load(Relaxed)).filter(|t| *t > 0),
            up_at_unix_ms: Some(self.up_at_unix_ms.load(Relaxed)).filter(|t| *t > 0),
            batches: self.link.count(),
            frames: self.frames.load(Relaxed),
            lost: self.lost.load(Relaxed),
            bytes_sent: bytes,
            bytes_direct: direct,
            bytes_back: back,
            link_p50_ms: self.link.quantile_ms(0.5),
            link_p99_ms: self.link.quantile_ms(0.99),
            link_s,
            link_gbps: (link_s > 0.0).then(|| (bytes + direct + back) as f64 * 8.0 / link_s / 1e9),
        }
    }
}

/// The link to another node at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSummary {
    /// Node name.
    pub name: String,
    /// Whether it answers.
    pub up: bool,
    /// Times it went down.
    pub downs: u64,
    /// When it last went down, Unix ms.
    pub down_at_unix_ms: Option<u64>,
    /// When it last came up, Unix ms.
    pub up_at_unix_ms: Option<u64>,
    /// Batches it answered.
    pub batches: u64,
    /// Frames in them.
    pub frames: u64,
    /// Frames lost with it.
    pub lost: u64,
    /// Bytes sent to it in the batches it answered.
    pub bytes_sent: u64,
    /// Bytes it took for them straight from the nodes that held their activations.
    pub bytes_direct: u64,
    /// Bytes of its answers.
    pub bytes_back: u64,
    /// Median link time per batch (round trip less the node's own time), ms.
    pub link_p50_ms: Option<f64>,
    /// 99th percentile of the same, ms.
    pub link_p99_ms: Option<f64>,
    /// Link time of the batches answered, summed, seconds.
    pub link_s: f64,
    /// Bytes moved for its batches (sent, taken and answered) over the link time, Gbit/s.
    pub link_gbps: Option<f64>,
}

/// Jain's fairness index of shares `x`: `(Σx)² / (n·Σx²)`, 1 when all are equal, `1/n` when one
/// gets everything; `None` when there is nothing to share.
pub fn jain_index(x: &[f64]) -> Option<f64> {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    (squares > 0.0).then(|| sum * sum / (x.len() as f64 * squares))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jain_index_is_one_for_equal_shares_and_one_over_n_for_one_taker() {
        assert_eq!(jain_index(&[3.0, 3.0, 3.0, 3.0]), Some(1.0));
        assert_eq!(jain_index(&[8.0, 0.0, 0.0, 0.0]), Some(0.25));
        let two_to_one = jain_index(&[2.0, 1.0]).unwrap();
        assert!((two_to_one - 0.9).abs() < 1e-12, "{two_to_one}");
        assert_eq!(jain_index(&[0.0, 0.0]), None);
        assert_eq!(jain_index(&[]), None);
    }

    #[test]
    fn streams_added_later_get_new_indices_and_a_name_keeps_its_counters() {
        let s = Stats::new(vec!["a".into()], vec![]);
        assert_eq!(s.add_stream("b", 0), 1);
        s.stream(1).ingested.fetch_add(3, Relaxed);
        assert_eq!(s.add_stream("b", 0), 1, "same name, same counters");
        assert_eq!(s.stream(1).ingested.load(Relaxed), 3);
        assert_eq!(&*s.stream_name(1), "b");
        let names: Vec<String> = s.summary(1.0).streams.into_iter().map(|x| x.name).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn batch_sizes_are_counted_by_size() {
        let b = BatchSizes::default();
        b.record(4);
        b.record(4);
        b.record(1);
        b.record(10_000);
        assert_eq!(b.counts(), vec![(1, 1), (4, 2), (MAX_COUNTED_BATCH, 1)]);
    }
}
