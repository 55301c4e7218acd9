//! `poolpipe bench detect`: the YOLOv3-tiny detector against Python onnxruntime, the people demo
//! flat out with the cost of tracking and rules, and the deadline policy on a measured profile.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::{EngineRun, median};
use crate::analytics::StreamAnalytics;
use crate::config::{self, Pace, SinkSpec};
use crate::frame::{BBox, Frame, Image, Object, PixelFormat};
use crate::pipeline::{self, RunOptions, Shutdown};

/// Everything `bench detect` measured.
#[derive(Debug, Serialize)]
pub struct DetectReport {
    /// Threads of every engine (both sides).
    pub threads: usize,
    /// Detector throughput per batch size.
    pub engines: Vec<DetectEngineRow>,
    /// The people demo flat out.
    pub demo: DemoFlatOut,
    /// The deadline and fixed policies side by side at 2 and 8 real-time streams.
    pub policies: Vec<PolicyRow>,
}

/// The detector at one batch size.
#[derive(Debug, Serialize)]
pub struct DetectEngineRow {
    /// Batch size.
    pub batch: usize,
    /// poolpipe's engine alone, images/s (median).
    pub rust_images_per_s: f64,
    /// Python onnxruntime on the same file, images/s (median).
    pub python_images_per_s: Option<f64>,
    /// Median of paired rust / python.
    pub ratio: Option<f64>,
    /// The whole detect stage (letterbox from 768x576, inference, decoding, NMS), images/s.
    pub stage_images_per_s: f64,
}

/// The people demo, read as fast as it decodes.
#[derive(Debug, Serialize)]
pub struct DemoFlatOut {
    /// Frames published.
    pub frames: u64,
    /// Published frames/s.
    pub fps: f64,
    /// 99th percentile end-to-end latency, ms.
    pub p99_ms: Option<f64>,
    /// Objects per frame (mean).
    pub objects_per_frame: f64,
    /// Tracker and rules on the run's detections, replayed: microseconds per frame (median of
    /// repeats).
    pub analytics_us_per_frame: f64,
    /// That, as a share of a frame's time flat out (1 / fps).
    pub analytics_share: f64,
    /// The same timed in the run itself, by the publisher: median and p99 per frame, us.
    pub analytics_in_run_us: (Option<f64>, Option<f64>),
}

/// One policy at one number of streams.
#[derive(Debug, Serialize)]
pub struct PolicyRow {
    /// Real-time streams of the sample (10 fps each).
    pub streams: usize,
    /// `deadline` or `fixed`.
    pub policy: String,
    /// Frames/s the sources delivered.
    pub offered_fps: f64,
    /// Frames/s published.
    pub published_fps: f64,
    /// Dropped late (deadline passed).
    pub dropped_late: u64,
    /// Dropped at overload (before entering, or early in GStreamer).
    pub dropped_overload: u64,
    /// Published / ingested.
    pub attainment: f64,
    /// 99th percentile end-to-end latency of published frames, ms.
    pub p99_ms: Option<f64>,
}

/// Runs the benchmark.
pub fn run(
    root: &Path,
    python: &Path,
    repeats: usize,
    seconds: f64,
    threads: usize,
) -> anyhow::Result<DetectReport> {
    crate::ingest::init()?;
    let root = &root
        .canonicalize()
        .with_context(|| format!("repository root {}", root.display()))?;
    let model = root.join("engines/yolo/yolov3-tiny.onnx");
    if !model.is_file() {
        bail!("{} is missing: run ./setup.sh", model.display());
    }
    let people_path = root.join("pipelines/people.toml");
    let people = config::load_pipeline(&people_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut bar = crate::progress::Progress::new("bench detect", repeats * 4 + 5);

    // 1. The detector: engine against Python, and the whole stage.
    let mut stage_spec = people.stages[0].clone();
    stage_spec.threads = threads;
    let mut engines = Vec::new();
    for batch in [1usize, 2, 4, 8] {
        let iters = (32 / batch).max(4);
        let run = EngineRun {
            model: &model,
            python,
            batch,
            hw: (416, 416),
            threads,
            iters,
        };
        let (rust, py, ratio) = run.paired(repeats, &mut bar)?;
        engines.push(DetectEngineRow {
            batch,
            rust_images_per_s: rust,
            python_images_per_s: py,
            ratio,
            stage_images_per_s: stage_images_per_s(&stage_spec, batch, iters)?,
        });
    }

    // 2. The people demo flat out, then its detections replayed through tracker and rules.
    let dir = TempDir::new()?;
    let results = dir.path().join("people.jsonl");
    let mut fast = people.clone();
    fast.sources[0].pace = Pace::Fast;
    fast.sinks = vec![SinkSpec::jsonl_file(&results)];
    let t = Instant::now();
    let s = pipeline::run(&fast, &RunOptions::default(), &Shutdown::new())?;
    let secs = t.elapsed().as_secs_f64();
    let published: u64 = s.streams.iter().map(|x| x.published).sum();
    let fps = published as f64 / secs;
    bar.inc("people demo flat out");
    let mut frames = read_objects(&results)?;
    let objects: usize = frames.iter().map(|f| f.2.len()).sum();
    let stream = people.sources[0].name.clone();
    let mut per_frame = Vec::new();
    for _ in 0..repeats.max(3) {
        per_frame.push(
            replay(&people.analytics, &mut frames, &stream) * 1e6 / frames.len().max(1) as f64,
        );
    }
    let analytics_us = median(per_frame);
    let demo = DemoFlatOut {
        frames: published,
        fps,
        p99_ms: s.end_to_end_p99_ms,
        objects_per_frame: objects as f64 / frames.len().max(1) as f64,
        analytics_us_per_frame: analytics_us,
        analytics_share: analytics_us * fps / 1e6,
        analytics_in_run_us: (s.analytics_p50_us, s.analytics_p99_us),
    };
    bar.inc("tracker and rules");

    // 3. The deadline policy on a profile measured here, next to the fixed policy.
    let blocks = dir.path().join("blocks");
    let profiles = dir.path().join("profiles");
    let cfg = crate::partition::split::RunConfig {
        sample_shape: vec![3, 416, 416],
        threads,
        optimize: true,
    };
    crate::partition::split::split(&model, 1, &blocks, &cfg)
        .context("one block of the detector")?;
    crate::partition::split::profile(&blocks, 8, 5, &profiles, &cfg).context("profiling")?;
    bar.inc("profile");
    let mut policies = Vec::new();
    for streams in [2usize, 8] {
        for policy in ["deadline", "fixed"] {
            let text = policy_pipeline(root, &profiles, streams, policy, threads);
            let path = dir.path().join(format!("p{streams}-{policy}.toml"));
            std::fs::write(&path, text)?;
            let p = config::load_pipeline(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = Instant::now();
            let s = pipeline::run(
                &p,
                &RunOptions {
                    duration: Some(Duration::from_secs_f64(seconds)),
                    ..Default::default()
                },
                &Shutdown::new(),
            )?;
            let secs = t.elapsed().as_secs_f64();
            let sum = |f: &dyn Fn(&crate::stats::StreamSummary) -> u64| -> u64 {
                s.streams.iter().map(f).sum()
            };
            let ingested = sum(&|x| x.ingested);
            let published = sum(&|x| x.published);
            policies.push(PolicyRow {
                streams,
                policy: policy.into(),
                offered_fps: ingested as f64 / secs,
                published_fps: published as f64 / secs,
                dropped_late: sum(&|x| x.dropped_late),
                dropped_overload: sum(&|x| x.dropped_overload),
                attainment: published as f64 / ingested.max(1) as f64,
                p99_ms: s.end_to_end_p99_ms,
            });
        }
        bar.inc(&format!("{streams} streams"));
    }
    Ok(DetectReport {
        threads,
        engines,
        demo,
        policies,
    })
}

/// A scratch folder, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!("poolpipe-bench-detect-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The whole detect stage on `batch` frames of the sample's size, images/s.
fn stage_images_per_s(spec: &config::StageSpec, batch: usize, iters: usize) -> anyhow::Result<f64> {
    let mut runner = pipeline::stage::build_runner(spec, None, None, None, false)?;
    let (w, h) = (768u32, 576u32);
    let pixels: Vec<u8> = (0..w as usize * h as usize * 3)
        .map(|i| ((i * 7) % 251) as u8)
        .collect();
    let image = Arc::new(Image::from_vec(w, h, PixelFormat::RGB, pixels));
    let frame = |seq: u64| Frame::new(0, seq, image.clone(), 0, u64::MAX);
    let mut run = || -> anyhow::Result<()> {
        let mut frames: Vec<Frame> = (0..batch as u64).map(frame).collect();
        runner.run(&mut frames)?;
        Ok(())
    };
    run()?;
    let t = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    Ok((batch * iters) as f64 / t.elapsed().as_secs_f64())
}

/// One frame of a run's results: media time, seq and its objects (as published).
type FrameObjects = (f64, u64, Vec<Object>);

/// The objects of a run's results file, in frame order.
fn read_objects(path: &Path) -> anyhow::Result<Vec<FrameObjects>> {
    let text = std::fs::read_to_string(path)?;
    let mut frames = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        let Some(objects) = v["results"]["detect"]["objects"].as_array() else {
            continue;
        };
        let objects = objects
            .iter()
            .map(|o| {
                let b = &o["box"];
                let f = |k: &str| b[k].as_f64().unwrap_or(0.0) as f32;
                Object {
                    label: o["label"].as_str().unwrap_or("").into(),
                    class_id: o["class_id"].as_u64().unwrap_or(0) as usize,
                    score: o["score"].as_f64().unwrap_or(0.0) as f32,
                    bbox: BBox {
                        x: f("x"),
                        y: f("y"),
                        w: f("w"),
                        h: f("h"),
                    },
                    track_id: None,
                }
            })
            .collect();
        let t = v["pts_ms"].as_f64().unwrap_or(0.0) / 1e3;
        frames.push((t, v["seq"].as_u64().unwrap_or(0), objects));
    }
    frames.sort_by_key(|f| f.1);
    Ok(frames)
}

/// Runs the objects through the stream analytics the pipeline runs (a fresh tracker and the
/// rules); seconds taken.
fn replay(spec: &config::AnalyticsSpec, frames: &mut [FrameObjects], stream: &str) -> f64 {
    let params = spec.tracker.clone().unwrap_or_default();
    let mut state = StreamAnalytics::new(&params, &spec.rules, stream);
    let t = Instant::now();
    for (time, seq, objects) in frames.iter_mut() {
        std::hint::black_box(state.step(*time, *seq, (768, 576), objects));
    }
    t.elapsed().as_secs_f64()
}

/// `streams` real-time copies of the sample through the detector with `policy`.
fn policy_pipeline(
    root: &Path,
    profiles: &Path,
    streams: usize,
    policy: &str,
    threads: usize,
) -> String {
    let mut s = format!(
        "[pipeline]\nname = \"bench-{policy}\"\nslo_ms = 1000\nengines_dir = \"{}\"\nprofiles = \"{}\"\n\n",
        root.join("engines").display(),
        profiles.display()
    );
    for i in 0..streams {
        s += &format!(
            "[[source]]\nname = \"cam-{i}\"\nuri = \"{}\"\npace = \"realtime\"\nloop = true\n\n",
            root.join("samples/campus.mp4").display()
        );
    }
    s += &format!(
        "[[stage]]\nname = \"detect\"\nmodel = \"yolov3-tiny\"\nprofile = \"yolov3-tiny\"\npolicy = \"{policy}\"\nthreads = {threads}\nmax_batch = 4\nmax_wait_ms = 50\n\n\
         [[sink]]\ntype = \"jsonl\"\npath = \"/dev/null\"\n"
    );
    s
}

impl DetectReport {
    /// The report as a table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "YOLOv3-tiny 416x416: poolpipe (Rust, ort) vs Python onnxruntime, {} threads each",
            self.threads
        );
        let _ = writeln!(
            s,
            "  {:>5} {:>12} {:>12} {:>7} {:>22}",
            "batch", "rust img/s", "python img/s", "ratio", "whole stage img/s"
        );
        for r in &self.engines {
            let py = r
                .python_images_per_s
                .map_or("n/a".to_string(), |v| format!("{v:.1}"));
            let ratio = r.ratio.map_or("n/a".to_string(), |v| format!("{v:.3}"));
            let _ = writeln!(
                s,
                "  {:>5} {:>12.1} {:>12} {:>7} {:>22.1}",
                r.batch, r.rust_images_per_s, py, ratio, r.stage_images_per_s
            );
        }
        let d = &self.demo;
        let _ = writeln!(
            s,
            "\nPeople demo flat out (pipelines/people.toml, pace fast): {} frames, {:.1} frames/s, p99 {}",
            d.frames,
            d.fps,
            d.p99_ms.map_or("-".into(), |v| format!("{v:.1} ms"))
        );
        let _ = writeln!(
            s,
            "  tracker + 2 rules: {:.1} us/frame ({:.1} objects/frame) = {:.3}% of a frame's time",
            d.analytics_us_per_frame,
            d.objects_per_frame,
            d.analytics_share * 100.0
        );
        let us = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        let _ = writeln!(
            s,
            "  in the run itself (publisher): median {} us, p99 {} us per frame",
            us(d.analytics_in_run_us.0),
            us(d.analytics_in_run_us.1)
        );
        let _ = writeln!(
            s,
            "\nDeadline vs fixed policy, measured CPU profile, SLO 1000 ms, real-time 10 fps streams"
        );
        let _ = writeln!(
            s,
            "  {:>7} {:<9} {:>11} {:>13} {:>6} {:>9} {:>10} {:>8}",
            "streams",
            "policy",
            "offered/s",
            "published/s",
            "late",
            "overload",
            "attained",
            "p99 ms"
        );
        for r in &self.policies {
            let _ = writeln!(
                s,
                "  {:>7} {:<9} {:>11.1} {:>13.1} {:>6} {:>9} {:>9.1}% {:>8}",
                r.streams,
                r.policy,
                r.offered_fps,
                r.published_fps,
                r.dropped_late,
                r.dropped_overload,
                r.attainment * 100.0,
                r.p99_ms.map_or("-".into(), |v| format!("{v:.0}"))
            );
        }
        s
    }
}
