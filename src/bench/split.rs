//! `poolpipe bench split`: what cutting a model into blocks costs on this machine.
//!
//! For ResNet-50 (random weights) and the PP-OCR detector: the latency of the whole model at
//! batch 1..8, every block's latency after cutting into K = 2 and K = 4 blocks (the sum of the
//! blocks against the whole), and the throughput of a K-stage pipeline (one thread per stage)
//! against the whole model on one stage with two threads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::config::{
    self, Device, Pace, Pipeline, PolicyKind, SinkSpec, SourceKind, SourceSpec, StageSpec,
    StageSplit,
};
use crate::partition::split::{RunConfig, engine, profile, sample_input, split, timed};
use crate::pipeline::{self, RunOptions, Shutdown};

/// One model's figures.
#[derive(Debug, Serialize)]
pub struct ModelReport {
    /// Model.
    pub model: String,
    /// Whole-model latency at batch 1..8, ms (1 thread).
    pub whole_ms: Vec<f64>,
    /// Per K.
    pub splits: Vec<SplitReport>,
    /// Frames/s of the whole model on one stage with 2 threads.
    pub whole_pipeline_fps: f64,
}

/// Figures of one cut.
#[derive(Debug, Serialize)]
pub struct SplitReport {
    /// Blocks.
    pub k: usize,
    /// `block_us[block][batch - 1]` (1 thread).
    pub block_us: Vec<Vec<u64>>,
    /// Sum of the blocks / whole model, per batch size.
    pub overhead: Vec<f64>,
    /// Bytes per frame crossing each cut.
    pub cut_bytes: Vec<u64>,
    /// Frames/s of the K-stage pipeline, one thread per stage.
    pub pipeline_fps: f64,
}

fn whole_latency(model: &Path, sample: &[usize], batch: usize, runs: usize) -> anyhow::Result<f64> {
    let cfg = RunConfig {
        sample_shape: sample.to_vec(),
        threads: 1,
        optimize: true,
    };
    let mut e = engine(model, &cfg, "whole model")?;
    let (_, ms) = timed(&mut e, &sample_input(batch, sample, 3), runs, "whole model")?;
    Ok(ms)
}

/// A pipeline of a test pattern through the model, whole or as the given block ranges.
fn pipeline(
    manifest: &config::ModelManifest,
    stages: &[(Option<StageSplit>, usize)],
    frames: u32,
) -> Pipeline {
    Pipeline {
        analytics: Default::default(),
        file: PathBuf::from("bench-split"),
        name: "bench-split".into(),
        slo: Duration::from_secs(600),
        onnxruntime: None,
        engine_cache: PathBuf::from("engines/trt-cache"),
        keep_activations: true,
        sources: vec![SourceSpec {
            name: "pattern".into(),
            decode: Default::default(),
            kind: SourceKind::Test {
                pattern: "ball".into(),
            },
            max_fps: None,
            looping: false,
            pace: Pace::Fast,
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            num_buffers: Some(frames),
            flow: None,
            priority: 1,
        }],
        stages: stages
            .iter()
            .enumerate()
            .map(|(i, (split, threads))| StageSpec {
                name: format!("s{i}"),
                model: manifest.clone(),
                device: Device::Cpu,
                profile: None,
                split: split.clone(),
                policy: PolicyKind::Fixed,
                margin: Duration::ZERO,
                workers: 1,
                threads: *threads,
                max_batch: 4,
                max_wait: Duration::from_millis(5),
                auto: Default::default(),
                queue: 8,
                boxes_from: None,
                batching: Default::default(),
                flow: 0,
                devices: Vec::new(),
                nodes: Vec::new(),
            })
            .collect(),
        sinks: vec![SinkSpec::jsonl_file("/dev/null")],
        outputs: Vec::new(),
        bandwidth_gbps: 10.0,
        flows: Vec::new(),
        routes: Vec::new(),
        plan: None,
        options: Default::default(),
        cluster: None,
    }
    .into_one_flow()
}

fn fps(p: &Pipeline) -> anyhow::Result<f64> {
    let s = pipeline::run(p, &RunOptions::default(), &Shutdown::new())?;
    let published: u64 = s.streams.iter().map(|x| x.published).sum();
    anyhow::ensure!(
        s.balanced() && published > 0,
        "the benchmark pipeline lost frames: {}",
        s.table()
    );
    Ok(s.published_fps())
}

/// Runs the benchmark.
pub fn run(root: &Path, runs: usize) -> anyhow::Result<Vec<ModelReport>> {
    let mut out = Vec::new();
    let models: [(&str, &str, Vec<usize>, u32); 2] = [
        (
            "resnet50",
            "engines/bench/resnet50.onnx",
            vec![3, 224, 224],
            64,
        ),
        (
            "ppocr-det",
            "engines/ppocr/ch_PP-OCRv4_det_infer.onnx",
            vec![3, 576, 768],
            24,
        ),
    ];
    for (name, file, sample, frames) in models {
        let model = root.join(file);
        let mut manifest = config::load_manifest(&root.join(format!("engines/{name}.toml")))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let whole_ms = (1..=8)
            .map(|b| whole_latency(&model, &sample, b, runs))
            .collect::<anyhow::Result<Vec<_>>>()?;
        manifest.split = None;
        let whole_pipeline_fps = fps(&pipeline(&manifest, &[(None, 2)], frames))?;
        let mut splits = Vec::new();
        for k in [2, 4] {
            let dir = std::env::temp_dir()
                .join(format!("poolpipe-bench-{name}-{k}-{}", std::process::id()));
            let cfg = RunConfig {
                sample_shape: sample.clone(),
                threads: 1,
                optimize: true,
            };
            let m = split(&model, k, &dir.join("blocks"), &cfg)?;
            let block_us = profile(&dir.join("blocks"), 8, runs, &dir.join("profile"), &cfg)?;
            let overhead = (0..8)
                .map(|b| block_us.iter().map(|r| r[b]).sum::<u64>() as f64 / 1e3 / whole_ms[b])
                .collect();
            let n = m.blocks.len();
            let stages: Vec<(Option<StageSplit>, usize)> = (0..n)
                .map(|i| {
                    (
                        Some(StageSplit {
                            blocks: [i, i + 1],
                            files: vec![dir.join("blocks").join(&m.blocks[i].file)],
                            first: i == 0,
                            last: i + 1 == n,
                        }),
                        1,
                    )
                })
                .collect();
            let pipeline_fps = fps(&pipeline(&manifest, &stages, frames))?;
            splits.push(SplitReport {
                k,
                block_us,
                overhead,
                cut_bytes: m.blocks[..n - 1].iter().map(|b| b.cut_bytes).collect(),
                pipeline_fps,
            });
            let _ = std::fs::remove_dir_all(&dir);
        }
        out.push(ModelReport {
            model: name.into(),
            whole_ms,
            splits,
            whole_pipeline_fps,
        });
    }
    Ok(out)
}

/// A human-readable table.
pub fn table(reports: &[ModelReport]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for r in reports {
        let _ = writeln!(s, "{} (1 thread; ms at batch 1..8)", r.model);
        let row = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:>7.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(s, "  whole model      {}", row(&r.whole_ms));
        for sp in &r.splits {
            for (i, b) in sp.block_us.iter().enumerate() {
                let ms: Vec<f64> = b.iter().map(|u| *u as f64 / 1e3).collect();
                let _ = writeln!(s, "  K={} block {}      {}", sp.k, i, row(&ms));
            }
            let _ = writeln!(s, "  K={} sum / whole  {}", sp.k, row(&sp.overhead));
            let _ = writeln!(s, "  K={} cut bytes per frame: {:?}", sp.k, sp.cut_bytes);
        }
        let _ = writeln!(
            s,
            "  pipeline throughput: whole model, 1 stage x 2 threads: {:.1} frames/s",
            r.whole_pipeline_fps
        );
        for sp in &r.splits {
            let _ = writeln!(
                s,
                "  pipeline throughput: K={} stages x 1 thread: {:.1} frames/s ({:.2}x)",
                sp.k,
                sp.pipeline_fps,
                sp.pipeline_fps / r.whole_pipeline_fps
            );
        }
        let _ = writeln!(s);
    }
    s
}
