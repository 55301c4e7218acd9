//! Prometheus metrics (`GET /metrics`, OpenMetrics text format through `prometheus-client`).
//!
//! Nothing is counted twice: a collector reads the pipeline's own counters ([`crate::stats`],
//! sink counters, queue lengths) at scrape time, so the hot path pays nothing for metrics.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `poolpipe_stream_frames_ingested_total` | counter | stream |
//! | `poolpipe_stream_frames_total` | counter | stream, outcome (`published`, `dropped_late`, `dropped_overload`, `failed`, `lost`) |
//! | `poolpipe_stream_up` | gauge | stream (1 while its source runs) |
//! | `poolpipe_slo_attainment_ratio` | gauge | stream (published / frames with an outcome) |
//! | `poolpipe_source_reconnects_total`, `poolpipe_source_errors_total` | counter | stream |
//! | `poolpipe_slo_seconds` | gauge | |
//! | `poolpipe_end_to_end_latency_seconds` | histogram | (published frames) |
//! | `poolpipe_stage_frames_total` | counter | stage, outcome (`in`, `out`, `dropped_late`, `failed`, `lost`) |
//! | `poolpipe_stage_batches_total` | counter | stage |
//! | `poolpipe_stage_batch_size` | histogram | stage (frames per batch) |
//! | `poolpipe_stage_latency_seconds` | histogram | stage (queue entry to stage exit) |
//! | `poolpipe_stage_queue_frames`, `poolpipe_stage_queue_capacity_frames` | gauge | stage |
//! | `poolpipe_stage_worker_queue_batches` | gauge | stage |
//! | `poolpipe_stream_frames_dropped_early_total` | counter | stream (part of `dropped_overload`: before conversion) |
//! | `poolpipe_stream_frames_dropped_before_decode_total` | counter | stream (part of `dropped_early`: before decoding) |
//! | `poolpipe_stream_events_total` | counter | stream (events raised by analytics rules) |
//! | `poolpipe_stage_workers` | gauge | stage, device |
//! | `poolpipe_stage_device_processes` | gauge | stage, device_id (`L4:0`, `T4:3`, `cpu`) |
//! | `poolpipe_stage_busy_seconds_total` | counter | stage (all workers together) |
//! | `poolpipe_stage_busy_ratio` | gauge | stage (busy share since start) |
//! | `poolpipe_sink_messages_total` | counter | sink, outcome (`offered`, `recovered`, `delivered`, `dropped_overflow`, `dropped_rejected`, `dropped_corrupt`, `left_at_shutdown`) |
//! | `poolpipe_sink_retries_total`, `poolpipe_sink_resent_total` | counter | sink |
//! | `poolpipe_sink_buffered_messages` | gauge | sink |
//! | `poolpipe_recurrent_streams_held`, `poolpipe_recurrent_state_bytes`, `poolpipe_recurrent_items` | gauge | stage (recurrent stages: streams whose state is held, its bytes, items at the cell) |
//! | `poolpipe_flow_arrival_rate` | gauge | flow, window (`1s`, `10s`, `60s`): frames/s its sources delivered |
//! | `poolpipe_flow_arrival_dispersion` | gauge | flow (variance / mean of arrivals per 100 ms over 10 s: 1 Poisson, 0 steady, > 1 bursty) |
//! | `poolpipe_output_frames_total` | counter | output, outcome (`taken`, `written`, `dropped`, `failed`, `unwatched`) |
//! | `poolpipe_replans_total` | counter | outcome (`applied`, `failed`): re-plans while running (`run --control`) |
//! | `poolpipe_uptime_seconds` | gauge | |
//! | `poolpipe_plan_epoch` | gauge | the controller's plan epoch the front runs (`[cluster] nats`) |
//! | `poolpipe_epochs_total` | counter | outcome (`applied`, `failed`): controller epochs the front applied |
//! | `poolpipe_node_up` | gauge | node: another node of a `[cluster]` answers (1) or is down (0) |
//! | `poolpipe_node_frames_total` | counter | node, outcome (`answered`, `lost`) |
//! | `poolpipe_node_sent_bytes_total` | counter | node: bytes of the batches it answered |
//! | `poolpipe_gpu_utilization_ratio`, `poolpipe_gpu_memory_used_bytes`, `poolpipe_gpu_memory_total_bytes`, `poolpipe_gpu_temperature_celsius` | gauge | gpu, name: read from NVML at scrape time (builds with `gpu` and a driver only) |

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::histogram::Histogram;
use crate::pipeline::Live;
use crate::pipeline::live::busy_share;

/// `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the latency histograms, seconds.
const LATENCY_BOUNDS_S: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Upper bounds of the batch size histograms, frames.
const BATCH_BOUNDS: [usize; 9] = [1, 2, 4, 8, 16, 32, 64, 128, 256];

/// Every metric of a running pipeline, in the OpenMetrics text format.
pub fn render(live: &Arc<Live>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(PipelineCollector(live.clone())));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

struct PipelineCollector(Arc<Live>);

impl std::fmt::Debug for PipelineCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PipelineCollector")
    }
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: its descriptor, then one sample per label set.
fn family<'e, T>(
    enc: &'e mut DescriptorEncoder,
    name: &'e str,
    help: &str,
    unit: Option<&'e Unit>,
    kind: MetricType,
    rows: &[(Labels<'_>, T)],
    mut write: impl FnMut(&mut MetricEncoder, &T) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, v) in rows {
        if labels.is_empty() {
            write(&mut m, v)?;
        } else {
            let mut fam = m.encode_family(labels)?;
            write(&mut fam, v)?;
        }
    }
    Ok(())
}

fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels<'_>, f64)],
) -> Result<(), std::fmt::Error> {
    scalars(enc, name, help, unit, MetricType::Counter, rows)
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels<'_>, f64)],
) -> Result<(), std::fmt::Error> {
    scalars(enc, name, help, unit, MetricType::Gauge, rows)
}

/// A family of single-valued samples: counters or gauges.
fn scalars(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    rows: &[(Labels<'_>, f64)],
) -> Result<(), std::fmt::Error> {
    let counter = matches!(kind, MetricType::Counter);
    family(enc, name, help, unit, kind, rows, |m, v| {
        if counter {
            m.encode_counter::<NoLabelSet, f64, f64>(v, None)
        } else {
            m.encode_gauge(v)
        }
    })
}

/// `(sum, count, per-bucket counts with +Inf last)`, as the encoder takes a histogram.
type HistogramSample = (f64, u64, Vec<(f64, u64)>);

/// A latency histogram as the encoder takes it.
fn latency_buckets(h: &Histogram) -> HistogramSample {
    let total = h.count();
    let mut prev = 0;
    let mut buckets: Vec<(f64, u64)> = h
        .cumulative(&LATENCY_BOUNDS_S)
        .into_iter()
        .map(|(b, c)| {
            let n = c - prev;
            prev = c;
            (b, n)
        })
        .collect();
    buckets.push((f64::MAX, total - prev));
    (h.sum_s(), total, buckets)
}

fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels<'_>, HistogramSample)],
) -> Result<(), std::fmt::Error> {
    family(
        enc,
        name,
        help,
        unit,
        MetricType::Histogram,
        rows,
        |m, (sum, count, b)| m.encode_histogram::<NoLabelSet>(*sum, *count, b, None),
    )
}

impl Collector for PipelineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let live = &self.0;
        let stats = live.stats();
        let elapsed = live.uptime().as_secs_f64();
        let p = live.pipeline();
        let states = live.stream_states();
        let streams = stats.streams();
        let e = &mut enc;

        // Streams.
        let names: Vec<String> = streams.iter().map(|(n, _)| n.to_string()).collect();
        let per_stream = |f: &dyn Fn(&crate::stats::StreamCounters) -> f64| {
            streams
                .iter()
                .zip(&names)
                .map(|((_, c), n)| (vec![("stream", n.as_str())], f(c)))
                .collect::<Vec<_>>()
        };
        counters(
            e,
            "poolpipe_stream_frames_ingested",
            "Frames a source handed to the pipeline.",
            None,
            &per_stream(&|c| c.ingested.load(Relaxed) as f64),
        )?;
        let mut outcomes = Vec::new();
        for ((_, c), n) in streams.iter().zip(&names) {
            for (o, v) in [
                ("published", &c.published),
                ("dropped_late", &c.dropped_late),
                ("dropped_overload", &c.dropped_overload),
                ("failed", &c.failed),
                ("lost", &c.lost),
            ] {
                outcomes.push((
                    vec![("stream", n.as_str()), ("outcome", o)],
                    v.load(Relaxed) as f64,
                ));
            }
        }
        counters(
            e,
            "poolpipe_stream_frames",
            "Frames by outcome: published (within the SLO), dropped_late, dropped_overload, failed, lost (in flight on a node that went away).",
            None,
            &outcomes,
        )?;
        gauges(
            e,
            "poolpipe_stream_up",
            "1 while the stream's source runs, 0 when it ended or was removed.",
            None,
            &streams
                .iter()
                .zip(&names)
                .map(|(_, n)| {
                    let up = states.get(n).is_some_and(|s| s.0 == "running");
                    (vec![("stream", n.as_str())], if up { 1.0 } else { 0.0 })
                })
                .collect::<Vec<_>>(),
        )?;
        gauges(
            e,
            "poolpipe_slo_attainment_ratio",
            "Published frames over frames with an outcome, since start (1 when none yet).",
            None,
            &per_stream(&|c| {
                let p = c.published.load(Relaxed);
                let done = p + c.missed();
                if done == 0 {
                    1.0
                } else {
                    p as f64 / done as f64
                }
            }),
        )?;
        counters(
            e,
            "poolpipe_source_reconnects",
            "Times a live source was restarted after an error, end of stream or stall.",
            None,
            &per_stream(&|c| c.reconnects.load(Relaxed) as f64),
        )?;
        counters(
            e,
            "poolpipe_source_errors",
            "Source errors (each followed by a reconnect for live sources).",
            None,
            &per_stream(&|c| c.source_errors.load(Relaxed) as f64),
        )?;
        counters(
            e,
            "poolpipe_stream_frames_dropped_early",
            "Of the frames dropped_overload, those dropped before colour conversion and scaling.",
            None,
            &per_stream(&|c| c.dropped_early.load(Relaxed) as f64),
        )?;
        counters(
            e,
            "poolpipe_stream_frames_dropped_before_decode",
            "Of the frames dropped_early, those dropped before decoding (the rest of a group of pictures).",
            None,
            &per_stream(&|c| c.dropped_before_decode.load(Relaxed) as f64),
        )?;
        counters(
            e,
            "poolpipe_stream_events",
            "Events raised by the analytics rules on the stream's frames.",
            None,
            &per_stream(&|c| c.events.load(Relaxed) as f64),
        )?;
        gauges(
            e,
            "poolpipe_slo",
            "Latency budget of new frames, capture to publication.",
            Some(&Unit::Seconds),
            &[(vec![], live.slo().as_secs_f64())],
        )?;
        let outputs = live.outputs();
        let mut rows = Vec::new();
        for o in &outputs {
            for (outcome, v) in [
                ("taken", o.taken),
                ("written", o.written),
                ("dropped", o.dropped),
                ("failed", o.failed),
                ("unwatched", o.unwatched),
            ] {
                rows.push((
                    vec![("output", o.name.as_str()), ("outcome", outcome)],
                    v as f64,
                ));
            }
        }
        counters(
            e,
            "poolpipe_output_frames",
            "Frames offered to each [[output]]: taken into its queue, written, dropped (its queue was full), failed, unwatched (RTSP, no client).",
            None,
            &rows,
        )?;
        let (replans, failed) = live.replan_counts();
        counters(
            e,
            "poolpipe_replans",
            "Re-plans made while running (`run --control`): applied, or failed (the running plan stayed).",
            None,
            &[
                (vec![("outcome", "applied")], replans as f64),
                (vec![("outcome", "failed")], failed as f64),
            ],
        )?;
        if let Some((epoch, applied, failed)) = live.epoch_counts() {
            gauges(
                e,
                "poolpipe_plan_epoch",
                "The controller's plan epoch the front runs (`[cluster] nats`).",
                None,
                &[(vec![], epoch as f64)],
            )?;
            counters(
                e,
                "poolpipe_epochs",
                "Controller epochs the front applied, or could not (the running layout stayed).",
                None,
                &[
                    (vec![("outcome", "applied")], applied as f64),
                    (vec![("outcome", "failed")], failed as f64),
                ],
            )?;
        }
        let flows = stats.flow_names();
        let demand: Vec<_> = (0..flows.len()).map(|i| live.demand(i)).collect();
        let windows: Vec<String> = crate::demand::WINDOWS_S
            .iter()
            .map(|w| format!("{w}s"))
            .collect();
        let mut rates = Vec::new();
        let mut dispersion = Vec::new();
        for (f, (r, d)) in flows.iter().zip(&demand) {
            for (w, v) in windows.iter().zip(r) {
                if let Some(v) = v {
                    rates.push((vec![("flow", f.as_str()), ("window", w.as_str())], *v));
                }
            }
            if let Some(d) = d {
                dispersion.push((vec![("flow", f.as_str())], *d));
            }
        }
        gauges(
            e,
            "poolpipe_flow_arrival_rate",
            "Frames per second the flow's sources delivered, over the window.",
            None,
            &rates,
        )?;
        gauges(
            e,
            "poolpipe_flow_arrival_dispersion",
            "Variance / mean of the flow's arrivals per 100 ms over 10 s (1: Poisson, 0: steady, more: bursty).",
            None,
            &dispersion,
        )?;
        histograms(
            e,
            "poolpipe_end_to_end_latency",
            "Capture to publication, published frames.",
            Some(&Unit::Seconds),
            &[(vec![], latency_buckets(&stats.end_to_end))],
        )?;

        // Stages.
        let stage_counters: Vec<std::sync::Arc<crate::stats::StageCounters>> = (0..p.stages.len())
            .map(|i| stats.stage(i).unwrap_or_default())
            .collect();
        let stage_rows = |f: &dyn Fn(usize) -> f64| {
            p.stages
                .iter()
                .enumerate()
                .map(|(i, s)| (vec![("stage", s.name.as_str())], f(i)))
                .collect::<Vec<_>>()
        };
        let mut stage_out = Vec::new();
        for (s, c) in p.stages.iter().zip(&stage_counters) {
            for (o, v) in [
                ("in", &c.frames_in),
                ("out", &c.frames_out),
                ("dropped_late", &c.dropped_late),
                ("failed", &c.failed),
                ("lost", &c.lost),
            ] {
                stage_out.push((
                    vec![("stage", s.name.as_str()), ("outcome", o)],
                    v.load(Relaxed) as f64,
                ));
            }
        }
        counters(
            e,
            "poolpipe_stage_frames",
            "Frames through a stage: in (entered its queue), out (with a result), dropped_late, failed.",
            None,
            &stage_out,
        )?;
        counters(
            e,
            "poolpipe_stage_batches",
            "Batches run.",
            None,
            &stage_rows(&|i| stage_counters[i].batches.load(Relaxed) as f64),
        )?;
        let batch_rows: Vec<_> = p
            .stages
            .iter()
            .zip(&stage_counters)
            .map(|(s, c)| {
                let counts = c.batch_sizes.counts();
                let mut buckets: Vec<(f64, u64)> =
                    BATCH_BOUNDS.iter().map(|b| (*b as f64, 0)).collect();
                buckets.push((f64::MAX, 0));
                let (mut sum, mut count) = (0.0, 0);
                for (size, n) in counts {
                    sum += (size * n as usize) as f64;
                    count += n;
                    let slot = BATCH_BOUNDS
                        .iter()
                        .position(|b| size <= *b)
                        .unwrap_or(BATCH_BOUNDS.len());
                    buckets[slot].1 += n;
                }
                (vec![("stage", s.name.as_str())], (sum, count, buckets))
            })
            .collect();
        histograms(
            e,
            "poolpipe_stage_batch_size",
            "Frames per batch.",
            None,
            &batch_rows,
        )?;
        histograms(
            e,
            "poolpipe_stage_latency",
            "Time from entering a stage's queue to leaving the stage.",
            Some(&Unit::Seconds),
            &p.stages
                .iter()
                .zip(&stage_counters)
                .map(|(s, c)| {
                    (
                        vec![("stage", s.name.as_str())],
                        latency_buckets(&c.latency),
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        let depths: Vec<(usize, usize, usize)> =
            (0..p.stages.len()).map(|i| live.queue_depth(i)).collect();
        gauges(
            e,
            "poolpipe_stage_queue_frames",
            "Frames waiting in a stage's queue.",
            None,
            &stage_rows(&|i| depths[i].0 as f64),
        )?;
        gauges(
            e,
            "poolpipe_stage_queue_capacity_frames",
            "Capacity of a stage's queue.",
            None,
            &stage_rows(&|i| depths[i].1 as f64),
        )?;
        gauges(
            e,
            "poolpipe_stage_worker_queue_batches",
            "Batches dispatched to a stage's workers and not yet started.",
            None,
            &stage_rows(&|i| depths[i].2 as f64),
        )?;
        let cells: Vec<(usize, [usize; 3])> = (0..p.stages.len())
            .filter_map(|i| live.cell_gauges(i).map(|g| (i, g)))
            .collect();
        for (k, (name, help)) in [
            (
                "poolpipe_recurrent_streams_held",
                "Streams whose state a recurrent stage holds.",
            ),
            (
                "poolpipe_recurrent_state_bytes",
                "Bytes of state a recurrent stage holds (streams and items).",
            ),
            (
                "poolpipe_recurrent_items",
                "Items waiting at or stepping through a recurrent cell.",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            if cells.is_empty() {
                break;
            }
            gauges(
                e,
                name,
                help,
                None,
                &cells
                    .iter()
                    .map(|(i, g)| (vec![("stage", p.stages[*i].name.as_str())], g[k] as f64))
                    .collect::<Vec<_>>(),
            )?;
        }
        let devices: Vec<String> = p.stages.iter().map(|s| s.device.to_string()).collect();
        gauges(
            e,
            "poolpipe_stage_workers",
            "Workers in a stage's pool.",
            None,
            &p.stages
                .iter()
                .zip(&devices)
                .map(|(s, d)| {
                    (
                        vec![("stage", s.name.as_str()), ("device", d.as_str())],
                        s.workers as f64,
                    )
                })
                .collect::<Vec<_>>(),
        )?;
        // Where each stage's processes run: one row per (stage, device id).
        let mut placed: Vec<(&str, &str, f64)> = Vec::new();
        for st in &p.stages {
            for d in &st.devices {
                match placed.last_mut() {
                    Some(last) if last.0 == st.name && last.1 == d => last.2 += 1.0,
                    _ => placed.push((st.name.as_str(), d.as_str(), 1.0)),
                }
            }
        }
        gauges(
            e,
            "poolpipe_stage_device_processes",
            "Processes of a stage on one device (device ids such as L4:0, T4:3, cpu).",
            None,
            &placed
                .iter()
                .map(|(stage, device, n)| (vec![("stage", *stage), ("device_id", *device)], *n))
                .collect::<Vec<_>>(),
        )?;
        let busy = |i: usize| stage_counters[i].busy_nanos.load(Relaxed) as f64 / 1e9;
        counters(
            e,
            "poolpipe_stage_busy",
            "Time a stage's workers spent running batches, all workers together.",
            Some(&Unit::Seconds),
            &stage_rows(&busy),
        )?;
        gauges(
            e,
            "poolpipe_stage_busy_ratio",
            "Share of time a stage's workers were running batches, since start.",
            None,
            &stage_rows(&|i| busy_share(busy(i), elapsed, p.stages[i].workers)),
        )?;

        // Sinks.
        let sinks: Vec<_> = stats.sinks().iter().map(|(n, c)| c.summary(n)).collect();
        let mut sink_rows = Vec::new();
        for s in &sinks {
            for (o, v) in [
                ("offered", s.offered),
                ("delivered", s.delivered),
                ("dropped_overflow", s.dropped_overflow),
                ("dropped_rejected", s.dropped_rejected),
                ("dropped_corrupt", s.dropped_corrupt),
                ("left_at_shutdown", s.left_at_shutdown),
                ("recovered", s.recovered),
            ] {
                sink_rows.push((vec![("sink", s.name.as_str()), ("outcome", o)], v as f64));
            }
        }
        counters(
            e,
            "poolpipe_sink_messages",
            "Results by sink outcome: offered, recovered (left in a disk buffer by an earlier run), delivered (acknowledged), dropped_overflow, dropped_rejected, dropped_corrupt, left_at_shutdown.",
            None,
            &sink_rows,
        )?;
        let sink_col = |f: &dyn Fn(&crate::sinks::SinkSummary) -> u64| {
            sinks
                .iter()
                .map(|s| (vec![("sink", s.name.as_str())], f(s) as f64))
                .collect::<Vec<_>>()
        };
        counters(
            e,
            "poolpipe_sink_retries",
            "Reconnects after a failed delivery.",
            None,
            &sink_col(&|s| s.retries),
        )?;
        counters(
            e,
            "poolpipe_sink_resent",
            "Results sent again after a failed attempt (possible duplicates).",
            None,
            &sink_col(&|s| s.resent),
        )?;
        gauges(
            e,
            "poolpipe_sink_buffered_messages",
            "Results waiting in a sink's buffer.",
            None,
            &sink_col(&|s| s.buffered),
        )?;
        gauges(
            e,
            "poolpipe_uptime",
            "Time since the pipeline started.",
            Some(&Unit::Seconds),
            &[(vec![], elapsed)],
        )?;
        let nodes = stats.nodes();
        if !nodes.is_empty() {
            let per_node = |f: &dyn Fn(&crate::stats::NodeSummary) -> f64| {
                nodes
                    .iter()
                    .map(|n| (vec![("node", n.name.as_str())], f(n)))
                    .collect::<Vec<_>>()
            };
            gauges(
                e,
                "poolpipe_node_up",
                "1 while another node of the cluster answers, 0 while it is down.",
                None,
                &per_node(&|n| if n.up { 1.0 } else { 0.0 }),
            )?;
            let mut frames = Vec::new();
            for n in &nodes {
                frames.push((
                    vec![("node", n.name.as_str()), ("outcome", "answered")],
                    n.frames as f64,
                ));
                frames.push((
                    vec![("node", n.name.as_str()), ("outcome", "lost")],
                    n.lost as f64,
                ));
            }
            counters(
                e,
                "poolpipe_node_frames",
                "Frames sent to another node's workers: answered, or lost with the node.",
                None,
                &frames,
            )?;
            counters(
                e,
                "poolpipe_node_sent",
                "Bytes of the batches another node answered.",
                Some(&Unit::Bytes),
                &per_node(&|n| n.bytes_sent as f64),
            )?;
            counters(
                e,
                "poolpipe_node_taken",
                "Bytes another node took straight from the nodes that held its batches' activations.",
                Some(&Unit::Bytes),
                &per_node(&|n| n.bytes_direct as f64),
            )?;
            counters(
                e,
                "poolpipe_node_answered",
                "Bytes of another node's answers.",
                Some(&Unit::Bytes),
                &per_node(&|n| n.bytes_back as f64),
            )?;
        }
        gpu_gauges(e, &crate::gpu::telemetry())
    }
}

/// GPU telemetry, read at scrape time (nothing without the `gpu` feature or a driver).
fn gpu_gauges(
    e: &mut DescriptorEncoder,
    gpus: &[crate::gpu::GpuInfo],
) -> Result<(), std::fmt::Error> {
    if gpus.is_empty() {
        return Ok(());
    }
    let index: Vec<String> = gpus.iter().map(|g| g.index.to_string()).collect();
    let rows = |f: &dyn Fn(&crate::gpu::GpuInfo) -> Option<f64>| {
        gpus.iter()
            .zip(&index)
            .filter_map(|(g, i)| {
                Some((vec![("gpu", i.as_str()), ("name", g.name.as_str())], f(g)?))
            })
            .collect::<Vec<_>>()
    };
    gauges(
        e,
        "poolpipe_gpu_utilization_ratio",
        "Share of the last sample period the GPU was busy (NVML).",
        None,
        &rows(&|g| g.utilization),
    )?;
    gauges(
        e,
        "poolpipe_gpu_memory_used",
        "GPU memory in use.",
        Some(&Unit::Bytes),
        &rows(&|g| Some(g.memory_used as f64)),
    )?;
    gauges(
        e,
        "poolpipe_gpu_memory_total",
        "GPU memory.",
        Some(&Unit::Bytes),
        &rows(&|g| Some(g.memory_total as f64)),
    )?;
    gauges(
        e,
        "poolpipe_gpu_temperature_celsius",
        "GPU core temperature.",
        None,
        &rows(&|g| g.temperature_c.map(f64::from)),
    )
}

// Label sets are plain vectors of pairs; make sure that stays encodable.
const _: fn() = || {
    fn encodable<T: EncodeLabelSet>() {}
    encodable::<Labels<'static>>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Gpus(Vec<crate::gpu::GpuInfo>);

    impl Collector for Gpus {
        fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            gpu_gauges(&mut enc, &self.0)
        }
    }

    #[test]
    fn gpu_telemetry_is_exported_per_gpu() {
        let gpu = crate::gpu::GpuInfo {
            index: 1,
            name: "NVIDIA H200".into(),
            class: "H200".into(),
            memory_total: 150_000_000_000,
            memory_used: 2_000_000_000,
            compute_capability: (9, 0),
            driver: "580.1".into(),
            utilization: Some(0.37),
            temperature_c: None,
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Gpus(vec![gpu])));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("poolpipe_gpu_utilization_ratio{gpu=\"1\",name=\"NVIDIA H200\"} 0.37"),
            "{text}"
        );
        assert!(
            text.contains(
                "poolpipe_gpu_memory_used_bytes{gpu=\"1\",name=\"NVIDIA H200\"} 2000000000"
            ),
            "{text}"
        );
        // An unread sensor is left out, not reported as zero.
        assert!(
            !text.contains("poolpipe_gpu_temperature_celsius{"),
            "{text}"
        );
        // Without GPUs nothing is written.
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Gpus(vec![])));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("poolpipe_gpu"), "{text}");
    }
}
