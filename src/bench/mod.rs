//! `poolpipe bench ...`: measured figures, printed as a table or JSON.
//!
//! `bench pipeline` measures, in one run and side by side (alternating, medians of repeats):
//! 1. frames/s through a poolpipe pipeline with a no-op engine vs GStreamer alone decoding and
//!    scaling the same file to a fakesink: the ratio and the per-frame overhead;
//! 2. the Rust ONNX Runtime engine vs the Python `onnxruntime` package on the same benchmark CNN
//!    (ResNet-18, batch 1 and 8, the same thread count): images/s and their ratio;
//! 3. the demo pipeline: published frames/s and p50/p99 end-to-end latency, at the clip's pace
//!    and flat out.

pub mod analytic;
pub mod batcher;
pub mod cluster;
pub mod control;
pub mod detect;
pub mod family;
pub mod gpu;
pub mod nodes;
pub mod osd;
pub mod outputs;
pub mod plan_run;
pub mod planner;
pub mod recurrent;
pub mod sim;
pub mod sinks;
pub mod split;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use gstreamer as gst;
use gstreamer::prelude::*;
use serde::Serialize;

use crate::config::{self, ModelManifest, Pace, Pipeline, SinkSpec};
use crate::engine::Engine;
use crate::engine::ort::{OrtConfig, OrtEngine};
use crate::pipeline::{self, RunOptions, Shutdown};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Pipeline overhead vs GStreamer alone, Rust engine vs Python onnxruntime, demo fps/latency.
    Pipeline {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Repeats of each measurement (the median is reported).
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Seconds of the real-time demo run.
        #[arg(long, default_value_t = 20.0)]
        demo_seconds: f64,
        /// Threads for the engine comparison (both sides).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Python interpreter with `onnxruntime` and `numpy` (setup.sh makes `.venv`).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Repository root (pipelines/, engines/, samples/).
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// The YOLOv3-tiny detector vs Python onnxruntime at batch 1-8, the people demo flat out
    /// with the cost of tracking and rules, and the deadline policy at 2 and 8 streams.
    Detect {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Repeats of each engine measurement (the median is reported).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Seconds of each policy run.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Threads of every engine (both sides).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Python interpreter with `onnxruntime` and `numpy` (setup.sh makes `.venv`).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Repository root (pipelines/, engines/, samples/).
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// Results/s and p99 publish latency of every sink on loopback, next to the brokers' own
    /// client tools (mosquitto_pub, redis-benchmark) doing the same work.
    Sinks {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Results per throughput run.
        #[arg(long, default_value_t = 20_000)]
        results: usize,
        /// Results per delivery (HTTP POST, Kafka produce, Redis pipeline, MQTT in flight).
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Offered results per second in the latency runs (3 s each).
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
    },
    /// The planner, placement and simulator at cluster scale: 100-GPU PPipe clusters and a
    /// 1,000-GPU one placed on servers: plan time, cut traffic across servers, goodput at 99%,
    /// simulator speed.
    Cluster {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder of latency profiles.
        #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
        profiles: PathBuf,
        /// Solver time limit per plan, seconds.
        #[arg(long, default_value_t = 60.0)]
        time_limit: f64,
        /// GPUs per server.
        #[arg(long, default_value_t = 4)]
        server_gpus: u32,
        /// Network link of each server, Gbit/s.
        #[arg(long, default_value_t = 25.0)]
        server_link_gbps: f64,
    },
    /// A cut pipeline across three nodes in network namespaces on shaped links, against the
    /// same pipeline in one process: goodput at 99%, link time per frame, and detection,
    /// settling and rejoining around a killed node (needs root and iproute2).
    Nodes {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder of latency profiles.
        #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
        profiles: PathBuf,
        /// Link rates into the worker nodes, Gbit/s.
        #[arg(long, value_delimiter = ',', default_value = "1,10")]
        gbps: Vec<f64>,
        /// Seconds per trial of the 99% search.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Highest frame rate per source searched.
        #[arg(long, default_value_t = 24)]
        max_fps: u32,
        /// Only the controller scenario: a planned pipeline with `poolpipe controller` over
        /// NATS, a server killed and restarted (re-plan and rejoin times).
        #[arg(long)]
        controller: bool,
        /// Only node to node: both halves of the cut on worker nodes, with and without
        /// `[cluster] direct_links` (goodput at 99%, latency, bytes through the front).
        #[arg(long, conflicts_with = "controller")]
        direct: bool,
    },
    /// Models on a device (`cuda:N`, `tensorrt:N`; `cpu` to try it): outputs against the CPU's,
    /// and images/s against Python onnxruntime on the same device, model and batch.
    Gpu {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Device.
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// ONNX models with one image input.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "engines/bench/resnet50.onnx,engines/ppocr/ch_PP-OCRv4_det_infer.onnx"
        )]
        models: Vec<PathBuf>,
        /// Batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        batches: Vec<usize>,
        /// Timed runs per measurement.
        #[arg(long, default_value_t = 20)]
        iters: usize,
        /// Height and width of inputs the model leaves dynamic.
        #[arg(long, default_value = "576x768")]
        hw: String,
        /// Python with onnxruntime (onnxruntime-gpu for a GPU device).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// TensorRT engine cache.
        #[arg(long, default_value = "engines/trt-cache")]
        engine_cache: PathBuf,
    },
    /// Cost of cutting ResNet-50 and the PP-OCR detector into 2 and 4 blocks.
    Split {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Timed runs per measurement (median).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Repository root (engines/).
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// Planned throughput of NP, paired and poolpipe plans: 4 clusters x 6 model groups.
    Planner {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder of latency profiles.
        #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
        profiles: PathBuf,
        /// Solver time limit per plan, seconds.
        #[arg(long, default_value_t = 20.0)]
        time_limit: f64,
        /// Safety margin, a fraction of the SLO.
        #[arg(long, default_value_t = 0.1)]
        margin: f64,
        /// Queueing allowance per stage, a multiple of its run time.
        #[arg(long, default_value_t = 1.0)]
        queueing: f64,
    },
    /// Simulated throughput at 99% SLO attainment of NP and poolpipe plans (24 scenarios), and
    /// the simulator's speed.
    Sim {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder of latency profiles.
        #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
        profiles: PathBuf,
        /// Simulated seconds per run of the 99% search.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Solver time limit per plan, seconds.
        #[arg(long, default_value_t = 10.0)]
        time_limit: f64,
    },
    /// Planner plans served by `poolpipe run --plan` on emulated devices next to the simulator
    /// (two groups of three models, 8 devices, 0.5/0.9/1.2x load), and one pool under 1x, 3x
    /// and 10x overload (published frames/s, fairness, early drops).
    PlanRun {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder of latency profiles.
        #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
        profiles: PathBuf,
        /// Seconds per run (the overload runs take half).
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        /// Solver time limit per plan, seconds.
        #[arg(long, default_value_t = 20.0)]
        time_limit: f64,
    },
    /// A recurrent decoder cell under Poisson load, cellular vs padded batching (p50/p99,
    /// throughput, highest rate within a p99 bound), and per-stream state batched across 8, 32
    /// and 128 streams vs one step per stream.
    Recurrent {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Seconds of arrivals per decoder run.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Largest step batch of the decoder.
        #[arg(long, default_value_t = 32)]
        max_batch: usize,
        /// Repository root (engines/).
        #[arg(long, default_value = ".")]
        root: PathBuf,
    },
    /// The analytic batch size and wait of a `fixed` stage against a grid search in the
    /// simulator, over the paper's 18 models at 30%, 60% and 90% of a pool's capacity.
    Analytic {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder of latency profiles.
        #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
        profiles: PathBuf,
        /// Device class of the pool.
        #[arg(long, default_value = "L4")]
        class: String,
        /// Devices in the pool.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Simulated seconds per run.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
    },
    /// What drawing a frame's results (and encoding it as JPEG) costs per frame.
    Osd {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Frames drawn.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
    },
    /// What annotated outputs (RTSP watched by a client, MP4 recording, JPEG snapshots, MJPEG
    /// preview clients) cost the analytics: paired runs of a pipeline, published frames/s.
    Outputs {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The pipeline.
        #[arg(long, default_value = "pipelines/demo.toml")]
        pipeline: PathBuf,
        /// Pace of its file sources: `realtime` (as shipped) or `fast` (CPU-bound).
        #[arg(long, default_value = "realtime")]
        pace: String,
        /// Seconds per run.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Pairs of runs (plain, with outputs).
        #[arg(long, default_value_t = 2)]
        pairs: usize,
        /// MJPEG preview clients.
        #[arg(long, default_value_t = 3)]
        previews: usize,
    },
    /// The online control plane (re-planning as demand moves) against the static plan, in the
    /// simulator: a demand step, a slow drift and bursts on two of the paper's clusters.
    Control {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder of latency profiles.
        #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
        profiles: PathBuf,
        /// Offered load before the shapes apply, a fraction of the planned throughput.
        #[arg(long, default_value_t = 0.6)]
        load: f64,
        /// Re-plan band: a model's share of the demand may move this much (relative).
        #[arg(long, default_value_t = 0.2)]
        band: f64,
        /// Objective cost of one process started by a re-plan (a fraction of the demand).
        #[arg(long, default_value_t = 0.002)]
        move_cost: f64,
        /// Time limit of a re-plan's solve, seconds.
        #[arg(long, default_value_t = 2.0)]
        time_limit: f64,
        /// Also find each policy's goodput at 99% attainment (bisection over the load: six more
        /// runs per policy and scenario).
        #[arg(long)]
        goodput: bool,
    },
    /// Batching policies side by side on two emulated pools, on a virtual clock.
    Batcher {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Folder of latency profiles.
        #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
        profiles: PathBuf,
        /// Profiled model.
        #[arg(long, default_value = "convnext_large")]
        model: String,
        /// High-class device of the first stage.
        #[arg(long, default_value = "L4")]
        high: String,
        /// Low-class device of the second stage.
        #[arg(long, default_value = "T4")]
        low: String,
        /// Simulated seconds per run.
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        /// Link bandwidth, Gbit/s.
        #[arg(long, default_value_t = 10.0)]
        bandwidth_gbps: f64,
    },
}

/// Prints a report as JSON, or as the text its `table` makes.
fn emit<R: Serialize>(
    json: bool,
    report: &R,
    table: impl FnOnce(&R) -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", table(report));
    }
    Ok(())
}

/// Runs a benchmark.
pub fn run(which: BenchCommand) -> anyhow::Result<()> {
    match which {
        BenchCommand::Planner {
            json,
            profiles,
            time_limit,
            margin,
            queueing,
        } => {
            let report = planner::run(&profiles, time_limit, margin, queueing, json)?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::Sim {
            json,
            profiles,
            duration,
            time_limit,
        } => {
            let report = sim::run(&profiles, duration, time_limit, json)?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::PlanRun {
            json,
            profiles,
            seconds,
            time_limit,
        } => {
            let report = plan_run::run(&profiles, seconds, time_limit)?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::Sinks {
            json,
            results,
            batch,
            rate,
        } => {
            let report = sinks::run(results, batch, rate)?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::Detect {
            json,
            repeats,
            seconds,
            threads,
            python,
            root,
        } => {
            let report = detect::run(&root, &python, repeats.max(1), seconds, threads)?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::Recurrent {
            json,
            seconds,
            max_batch,
            root,
        } => {
            let report = recurrent::run(&root, seconds, max_batch.max(1))?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::Analytic {
            json,
            profiles,
            class,
            workers,
            seconds,
        } => {
            let p = crate::profile::Profiles::load_dir(&profiles, None)?;
            let models = analytic::main_models(&profiles, &p);
            let rows = analytic::compare(
                &p,
                &models,
                &class,
                workers.max(1),
                &[0.3, 0.6, 0.9],
                seconds,
            )?;
            emit(json, &rows, |r| analytic::table(r))
        }
        BenchCommand::Osd { json, iterations } => {
            let report = osd::run(iterations)?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::Outputs {
            json,
            pipeline,
            pace,
            seconds,
            pairs,
            previews,
        } => {
            let pace = match pace.as_str() {
                "realtime" => crate::config::Pace::Realtime,
                "fast" => crate::config::Pace::Fast,
                other => anyhow::bail!("--pace {other}: expected realtime or fast"),
            };
            let report = outputs::run(&pipeline, pace, seconds, pairs.max(1), previews)?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::Control {
            json,
            profiles,
            load,
            band,
            move_cost,
            time_limit,
            goodput,
        } => {
            let settings = crate::control::ControlSettings {
                band,
                move_cost,
                time_limit: std::time::Duration::from_secs_f64(time_limit.max(0.01)),
                ..Default::default()
            };
            settings.check()?;
            let report = control::report(&profiles, load, &settings, goodput, json)?;
            emit(json, &report, |r| r.table())
        }
        BenchCommand::Cluster {
            json,
            profiles,
            time_limit,
            server_gpus,
            server_link_gbps,
        } => {
            anyhow::ensure!(server_gpus >= 1, "--server-gpus must be at least 1");
            let rows = cluster::run(&profiles, time_limit, server_gpus, server_link_gbps)?;
            emit(json, &rows, |r| {
                cluster::table(r, server_gpus, server_link_gbps)
            })
        }
        BenchCommand::Nodes {
            json,
            profiles,
            gbps,
            seconds,
            max_fps,
            controller,
            direct,
        } => {
            if direct {
                anyhow::ensure!(seconds >= 3, "--seconds must be at least 3");
                let rows = nodes::run_direct(&profiles, &gbps, seconds, max_fps)?;
                return emit(json, &rows, |r| nodes::direct_table(r));
            }
            if controller {
                let rows = nodes::run_controlled(&profiles, &gbps)?;
                return emit(json, &rows, |r| nodes::control_table(r));
            }
            anyhow::ensure!(seconds >= 3, "--seconds must be at least 3");
            let rows = nodes::run(&profiles, &gbps, seconds, max_fps)?;
            emit(json, &rows, |r| nodes::table(r))
        }
        BenchCommand::Gpu {
            json,
            device,
            models,
            batches,
            iters,
            hw,
            python,
            engine_cache,
        } => {
            let hw = hw
                .split_once('x')
                .and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("--hw takes HEIGHTxWIDTH, got `{hw}`"))?;
            let report = gpu::run(&gpu::GpuBench {
                device,
                models,
                batches,
                iters: iters.max(1),
                hw,
                python,
                engine_cache,
            })?;
            emit(json, &report, gpu::table)
        }
        BenchCommand::Split { json, runs, root } => {
            let reports = split::run(&root, runs.max(1))?;
            emit(json, &reports, |r| split::table(r))
        }
        BenchCommand::Batcher {
            json,
            profiles,
            model,
            high,
            low,
            seconds,
            bandwidth_gbps,
        } => {
            let report = batcher::run(&profiles, &model, &high, &low, seconds, bandwidth_gbps)?;
            emit(json, &report, |r| format!("{}\n", r.table()))
        }
        BenchCommand::Pipeline {
            json,
            repeats,
            demo_seconds,
            threads,
            python,
            root,
        } => {
            let report = bench_pipeline(&root, &python, repeats.max(1), demo_seconds, threads)?;
            emit(json, &report, |r| format!("{}\n", r.table()))
        }
    }
}

/// Median, smallest and largest of `v` (NaN, infinity and 0 when empty).
pub(crate) fn spread(v: &[f64]) -> (f64, f64, f64) {
    (
        median_of(v).unwrap_or(f64::NAN),
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(0.0, f64::max),
    )
}

/// Median of `v`, `None` when empty.
pub(crate) fn median_of(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (n > 0).then(|| {
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    })
}

fn median(v: Vec<f64>) -> f64 {
    median_of(&v).unwrap_or(0.0)
}

/// Everything `bench pipeline` measured.
#[derive(Debug, Serialize)]
pub struct PipelineReport {
    /// Frames in the sample clip.
    pub frames: u64,
    /// GStreamer alone, frames/s (median).
    pub gstreamer_fps: f64,
    /// poolpipe with a no-op engine, frames/s (median).
    pub noop_pipeline_fps: f64,
    /// Median over repeats of noop_pipeline_fps / gstreamer_fps (paired).
    pub overhead_ratio: f64,
    /// Extra time per frame, microseconds.
    pub overhead_us_per_frame: f64,
    /// Engine comparison rows.
    pub engines: Vec<EngineRow>,
    /// Demo pipeline runs.
    pub demo: Vec<DemoRow>,
}

/// Rust vs Python on one batch size.
#[derive(Debug, Serialize)]
pub struct EngineRow {
    /// Model.
    pub model: String,
    /// Batch size.
    pub batch: usize,
    /// Threads (both sides).
    pub threads: usize,
    /// poolpipe's engine, images/s (median).
    pub rust_images_per_s: f64,
    /// Python onnxruntime, images/s (median), if it could run.
    pub python_images_per_s: Option<f64>,
    /// Median over repeats of rust / python (paired).
    pub ratio: Option<f64>,
}

/// One demo run.
#[derive(Debug, Serialize)]
pub struct DemoRow {
    /// How the clip was paced.
    pub pace: String,
    /// Frames published.
    pub published: u64,
    /// Frames dropped (late + overload).
    pub dropped: u64,
    /// Published frames/s.
    pub fps: f64,
    /// Median end-to-end latency, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile end-to-end latency, ms.
    pub p99_ms: Option<f64>,
}

impl PipelineReport {
    fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Pipeline overhead ({} frames of the sample, decode + scale to 768x576 BGR)",
            self.frames
        );
        let _ = writeln!(
            s,
            "  GStreamer alone to fakesink     {:>9.1} frames/s",
            self.gstreamer_fps
        );
        let _ = writeln!(
            s,
            "  poolpipe, no-op engine          {:>9.1} frames/s",
            self.noop_pipeline_fps
        );
        let _ = writeln!(
            s,
            "  ratio {:.3}, overhead {:.1} us/frame\n",
            self.overhead_ratio, self.overhead_us_per_frame
        );
        let _ = writeln!(
            s,
            "Engine: poolpipe (Rust, ort) vs Python onnxruntime, same model and threads"
        );
        let _ = writeln!(
            s,
            "  {:<10} {:>5} {:>7} {:>12} {:>12} {:>7}",
            "model", "batch", "threads", "rust img/s", "python img/s", "ratio"
        );
        for r in &self.engines {
            let py = r
                .python_images_per_s
                .map_or("n/a".to_string(), |v| format!("{v:.1}"));
            let ratio = r.ratio.map_or("n/a".to_string(), |v| format!("{v:.3}"));
            let _ = writeln!(
                s,
                "  {:<10} {:>5} {:>7} {:>12.1} {:>12} {:>7}",
                r.model, r.batch, r.threads, r.rust_images_per_s, py, ratio
            );
        }
        let _ = writeln!(
            s,
            "\nDemo pipeline (pipelines/demo.toml: PP-OCRv4 det + rec on the CPU)"
        );
        let _ = writeln!(
            s,
            "  {:<34} {:>9} {:>8} {:>7} {:>8} {:>8}",
            "pace", "published", "dropped", "fps", "p50 ms", "p99 ms"
        );
        for d in &self.demo {
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            let _ = writeln!(
                s,
                "  {:<34} {:>9} {:>8} {:>7.2} {:>8} {:>8}",
                d.pace,
                d.published,
                d.dropped,
                d.fps,
                f(d.p50_ms),
                f(d.p99_ms)
            );
        }
        s
    }
}

fn bench_pipeline(
    root: &Path,
    python: &Path,
    repeats: usize,
    demo_seconds: f64,
    threads: usize,
) -> anyhow::Result<PipelineReport> {
    crate::ingest::init()?;
    let demo_path = root.join("pipelines/demo.toml");
    let demo = config::load_pipeline(&demo_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let det_image = demo.ingest_format();
    let sample = match &demo.sources[0].kind {
        config::SourceKind::File { path } => path.clone(),
        _ => bail!("the demo's first source is expected to be the sample file"),
    };

    // 1. Overhead: the same decode + scale with and without poolpipe around it.
    let caps = format!(
        "video/x-raw,format={},width={},height={},pixel-aspect-ratio=1/1",
        det_image.pixel_format.gst_name(),
        det_image.width,
        det_image.height
    );
    let noop = noop_pipeline(&demo, &sample)?;
    let (mut gst_fps, mut pipe_fps, mut frames) = (Vec::new(), Vec::new(), 0);
    // Runs: overhead pairs, engine pairs at batch 1 and 8, the demo twice.
    let mut bar = crate::progress::Progress::new("bench pipeline", repeats * 3 + 2);
    for _ in 0..repeats {
        let (n, secs) = gstreamer_alone(&sample, &caps)?;
        frames = n;
        gst_fps.push(n as f64 / secs);
        let t = Instant::now();
        let summary = pipeline::run(&noop, &RunOptions::default(), &Shutdown::new())?;
        let secs = t.elapsed().as_secs_f64();
        let published: u64 = summary.streams.iter().map(|s| s.published).sum();
        if published != n {
            bail!("the no-op pipeline published {published} of {n} frames");
        }
        pipe_fps.push(published as f64 / secs);
        bar.inc("overhead");
    }
    // Each repeat pairs the two measurements back to back; the ratio is the median of the paired
    // ratios, which drifts less on a shared machine than a ratio of medians.
    let overhead_ratio = median(pipe_fps.iter().zip(&gst_fps).map(|(p, g)| p / g).collect());
    let (g, p) = (median(gst_fps), median(pipe_fps));

    // 2. Engines.
    let model = root.join("engines/bench/resnet18.onnx");
    let mut engines = Vec::new();
    for batch in [1usize, 8] {
        let run = EngineRun {
            model: &model,
            python,
            batch,
            hw: (224, 224),
            threads,
            iters: if batch == 1 { 40 } else { 8 },
        };
        let (r, py, ratio) = run.paired(repeats, &mut bar)?;
        engines.push(EngineRow {
            model: "resnet18".into(),
            batch,
            threads,
            rust_images_per_s: r,
            python_images_per_s: py,
            ratio,
        });
    }

    // 3. The demo, as shipped (real time) and flat out.
    let mut rows = Vec::new();
    let mut demo = demo.clone();
    demo.sinks = vec![SinkSpec::jsonl_file("/dev/null")];
    let s = pipeline::run(
        &demo,
        &RunOptions {
            duration: Some(Duration::from_secs_f64(demo_seconds)),
            ..Default::default()
        },
        &Shutdown::new(),
    )?;
    rows.push(demo_row(
        &format!("clip pace, max_fps 5, {demo_seconds:.0} s"),
        &s,
    ));
    bar.inc("demo");
    let mut fast = demo.clone();
    fast.sources[0].pace = Pace::Fast;
    fast.sources[0].max_fps = None;
    let s = pipeline::run(
        &fast,
        &RunOptions {
            max_frames: Some(60),
            ..Default::default()
        },
        &Shutdown::new(),
    )?;
    rows.push(demo_row("flat out (pace fast), 60 frames", &s));
    bar.inc("demo flat out");

    Ok(PipelineReport {
        frames,
        gstreamer_fps: g,
        noop_pipeline_fps: p,
        overhead_ratio,
        overhead_us_per_frame: (1.0 / p - 1.0 / g) * 1e6,
        engines,
        demo: rows,
    })
}

fn demo_row(pace: &str, s: &crate::stats::Summary) -> DemoRow {
    DemoRow {
        pace: pace.into(),
        published: s.streams.iter().map(|x| x.published).sum(),
        dropped: s
            .streams
            .iter()
            .map(|x| x.dropped_late + x.dropped_overload)
            .sum(),
        fps: s.published_fps(),
        p50_ms: s.end_to_end_p50_ms,
        p99_ms: s.end_to_end_p99_ms,
    }
}

/// The demo's source (flat out) into one pass-through stage that takes the detector's image size.
fn noop_pipeline(demo: &Pipeline, sample: &Path) -> anyhow::Result<Pipeline> {
    let mut p = demo.clone();
    p.name = "bench-noop".into();
    let mut src = demo.sources[0].clone();
    src.kind = config::SourceKind::File {
        path: sample.to_path_buf(),
    };
    src.pace = Pace::Fast;
    src.max_fps = None;
    p.sources = vec![src];
    let mut stage = demo.stages[0].clone();
    stage.name = "noop".into();
    stage.model = ModelManifest {
        name: "noop".into(),
        image: Some(demo.ingest_format()),
        ..ModelManifest::emulated()
    };
    stage.max_batch = 8;
    stage.max_wait = Duration::ZERO;
    stage.queue = 16;
    p.stages = vec![stage];
    p.sinks = vec![SinkSpec::jsonl_file("/dev/null")];
    Ok(p)
}

/// Decodes and scales the file to a fakesink; returns (frames, seconds).
fn gstreamer_alone(sample: &Path, caps: &str) -> anyhow::Result<(u64, f64)> {
    let launch = format!(
        "filesrc location=\"{}\" ! decodebin ! videoconvert ! videoscale ! {caps} ! fakesink name=sink sync=false",
        sample.display()
    );
    let pipeline = gst::parse::launch(&launch)?;
    let bin = pipeline
        .clone()
        .dynamic_cast::<gst::Bin>()
        .map_err(|_| anyhow::anyhow!("not a bin"))?;
    let pad = bin
        .by_name("sink")
        .context("fakesink")?
        .static_pad("sink")
        .context("sink pad")?;
    // A pad probe counts buffers at almost no cost (a handoff signal would add its own overhead).
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c = count.clone();
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        gst::PadProbeReturn::Ok
    });
    let t = Instant::now();
    pipeline.set_state(gst::State::Playing)?;
    let bus = pipeline.bus().context("bus")?;
    for msg in bus.iter_timed(gst::ClockTime::NONE) {
        match msg.view() {
            gst::MessageView::Eos(_) => break,
            gst::MessageView::Error(e) => bail!("GStreamer: {}", e.error()),
            _ => {}
        }
    }
    let secs = t.elapsed().as_secs_f64();
    pipeline.set_state(gst::State::Null)?;
    Ok((count.load(std::sync::atomic::Ordering::Relaxed), secs))
}

/// One engine measurement, made by poolpipe and by Python onnxruntime.
pub(crate) struct EngineRun<'a> {
    pub model: &'a Path,
    pub python: &'a Path,
    pub batch: usize,
    pub hw: (usize, usize),
    pub threads: usize,
    pub iters: usize,
}

impl EngineRun<'_> {
    /// `repeats` pairs, back to back: poolpipe's median images/s, Python's (if it ran), and the
    /// median of the paired ratios (which drifts less on a shared machine than a ratio of
    /// medians).
    pub(crate) fn paired(
        &self,
        repeats: usize,
        bar: &mut crate::progress::Progress,
    ) -> anyhow::Result<(f64, Option<f64>, Option<f64>)> {
        let (mut rust, mut py) = (Vec::new(), Vec::new());
        for _ in 0..repeats {
            rust.push(rust_images_per_s(
                self.model,
                self.batch,
                self.hw,
                self.threads,
                self.iters,
            )?);
            if let Some(v) = python_images_per_s(
                self.python,
                self.model,
                "cpu",
                self.batch,
                self.hw,
                self.threads,
                self.iters,
            ) {
                py.push(v);
            }
            bar.inc(&format!("engines at batch {}", self.batch));
        }
        let ratio = (py.len() == rust.len())
            .then(|| median(rust.iter().zip(&py).map(|(r, p)| r / p).collect()));
        Ok((median(rust), (!py.is_empty()).then(|| median(py)), ratio))
    }
}

/// poolpipe's engine on `model` (one image input of `hw` pixels), images/s.
fn rust_images_per_s(
    model: &Path,
    batch: usize,
    hw: (usize, usize),
    threads: usize,
    iters: usize,
) -> anyhow::Result<f64> {
    let mut engine = OrtEngine::load(&OrtConfig {
        model: model.to_path_buf(),
        input: None,
        threads,
        library: None,
        optimize: true,
        gpu: None,
        spin: true, // as Python's onnxruntime does by default
    })?;
    let input = ndarray::Array4::<f32>::from_shape_fn((batch, 3, hw.0, hw.1), |(n, c, y, x)| {
        ((n * 7 + c * 13 + y * 3 + x) % 255) as f32 / 255.0
    });
    images_per_s(&mut engine, &input.into_dyn(), iters)
}

/// Images per second of `engine` on `input` (its first dimension is the batch): three warm-up
/// runs, then `iters` timed ones.
pub(crate) fn images_per_s(
    engine: &mut OrtEngine,
    input: &ndarray::ArrayD<f32>,
    iters: usize,
) -> anyhow::Result<f64> {
    for _ in 0..3 {
        engine.infer(input.view())?;
    }
    let t = Instant::now();
    for _ in 0..iters {
        engine.infer(input.view())?;
    }
    Ok((input.shape()[0] * iters) as f64 / t.elapsed().as_secs_f64())
}

/// Python onnxruntime on `device` (`cpu`, `cuda:N`, `tensorrt:N`; CUDA with TF32 off). Input
/// sizes the model leaves dynamic are `h` x `w` (3 for anything else). Exits non-zero if a GPU
/// session fell back to the CPU.
const PY_BENCH: &str = r#"
import sys, time, numpy as np, onnxruntime as ort
model, device = sys.argv[1], sys.argv[2]
batch, threads, iters, h, w = map(int, sys.argv[3:8])
o = ort.SessionOptions()
o.intra_op_num_threads = threads
o.inter_op_num_threads = 1
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
if device == "cpu":
    providers = ["CPUExecutionProvider"]
else:
    kind, idx = device.split(":")
    cuda = ("CUDAExecutionProvider", {"device_id": idx, "use_tf32": "0"})
    providers = [cuda] if kind == "cuda" else [("TensorrtExecutionProvider", {"device_id": idx}), cuda]
s = ort.InferenceSession(model, o, providers=providers)
if device != "cpu" and s.get_providers()[0] == "CPUExecutionProvider":
    sys.exit("onnxruntime fell back to the CPU")
i = s.get_inputs()[0]
rank = len(i.shape)
dims = [batch] + [d if isinstance(d, int) and d > 0 else (h if k == rank - 2 else w if k == rank - 1 else 3)
                  for k, d in enumerate(i.shape) if k > 0]
x = np.random.rand(*dims).astype(np.float32)
for _ in range(3): s.run(None, {i.name: x})
t = time.perf_counter()
for _ in range(iters): s.run(None, {i.name: x})
print(batch * iters / (time.perf_counter() - t))
"#;

/// Python onnxruntime on the same, images/s (None when it cannot run).
pub(crate) fn python_images_per_s(
    python: &Path,
    model: &Path,
    device: &str,
    batch: usize,
    hw: (usize, usize),
    threads: usize,
    iters: usize,
) -> Option<f64> {
    let out = Command::new(python)
        .args(["-c", PY_BENCH])
        .arg(model)
        .arg(device)
        .args([batch, threads, iters, hw.0, hw.1].map(|v| v.to_string()))
        .output()
        .ok()?;
    if !out.status.success() {
        tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr), "Python onnxruntime benchmark failed.");
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}
