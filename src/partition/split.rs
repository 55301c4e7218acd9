//! `poolpipe split` and `poolpipe profile`: measure the pieces between cut points on the CPU,
//! choose even blocks, write them with a manifest, and profile them per batch size in the CSV
//! layout of the published profiles.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use super::{CutPoint, PartitionError, balance, cut_points, extract, load, save};
use crate::engine::Engine;
use crate::engine::ort::{OrtConfig, OrtEngine};
use crate::progress::Progress;

/// Errors of splitting and profiling.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// Cutting failed.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// A block could not be run.
    #[error("block {block}: {source}")]
    Engine {
        /// Which block.
        block: String,
        /// Why.
        source: crate::engine::EngineError,
    },
    /// Writing the outputs failed.
    #[error("{0}")]
    Io(String),
}

/// How to run pieces of a model on the CPU.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Shape of one input sample without the batch dimension, e.g. `[3, 224, 224]`.
    pub sample_shape: Vec<usize>,
    /// Intra-op threads.
    pub threads: usize,
    /// Graph optimisations on (off makes block outputs bit-comparable with the whole model).
    pub optimize: bool,
}

/// One block of a split model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlockEntry {
    /// File name of the block, next to the manifest.
    pub file: String,
    /// Input tensor name.
    pub input: String,
    /// Output tensor name (the cut after the block, or the model's first output).
    pub output: String,
    /// Output shape of one sample (without batch).
    pub output_shape: Vec<usize>,
    /// Bytes per sample sent to the next block (0 after the last).
    pub cut_bytes: u64,
    /// Measured latency at batch 1 when the split was made, ms.
    pub latency_ms: f64,
}

/// `manifest.json` of a split model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SplitManifest {
    /// Model name (file stem).
    pub model: String,
    /// The whole model.
    pub source: String,
    /// Shape of one input sample.
    pub sample_shape: Vec<usize>,
    /// Blocks in order.
    pub blocks: Vec<BlockEntry>,
}

pub(crate) fn random_input(batch: usize, sample: &[usize], seed: u64) -> ArrayD<f32> {
    let mut shape = vec![batch];
    shape.extend_from_slice(sample);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    ArrayD::from_shape_fn(IxDyn(&shape), |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 40) as f32 / (1u64 << 24) as f32
    })
}

/// Loads an ONNX file into an engine.
pub(crate) fn engine(path: &Path, cfg: &RunConfig, name: &str) -> Result<OrtEngine, SplitError> {
    engine_on(path, cfg, name, None)
}

/// Loads an ONNX file into an engine, on a GPU where `gpu` says.
fn engine_on(
    path: &Path,
    cfg: &RunConfig,
    name: &str,
    gpu: Option<crate::gpu::GpuSession>,
) -> Result<OrtEngine, SplitError> {
    OrtEngine::load(&OrtConfig {
        model: path.to_path_buf(),
        input: None,
        threads: cfg.threads,
        library: None,
        spin: false,
        optimize: cfg.optimize,
        gpu,
    })
    .map_err(|source| SplitError::Engine {
        block: name.to_string(),
        source,
    })
}

/// Runs `input` through an engine `runs` times after one warm-up; returns the output and the
/// median latency in ms.
pub(crate) fn timed(
    e: &mut OrtEngine,
    input: &ArrayD<f32>,
    runs: usize,
    name: &str,
) -> Result<(ArrayD<f32>, f64), SplitError> {
    let (out, times) = timed_all(e, input, runs, name)?;
    Ok((out, times[times.len() / 2]))
}

/// The first output of a block and its run times in milliseconds, sorted.
type Timed = Result<(ArrayD<f32>, Vec<f64>), SplitError>;

/// One warm-up, then `runs` timed runs (milliseconds, sorted) and the first output.
fn timed_all(e: &mut OrtEngine, input: &ArrayD<f32>, runs: usize, name: &str) -> Timed {
    let err = |source| SplitError::Engine {
        block: name.to_string(),
        source,
    };
    let mut out = e.infer(input.view()).map_err(err)?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        out = e.infer(input.view()).map_err(err)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let first = out
        .into_iter()
        .next()
        .ok_or_else(|| SplitError::Io(format!("{name}: no output")))?;
    Ok((first, times))
}

/// Cuts `model_path` into `k` blocks of even measured latency and writes them and
/// `manifest.json` into `out_dir`.
pub fn split(
    model_path: &Path,
    k: usize,
    out_dir: &Path,
    cfg: &RunConfig,
) -> Result<SplitManifest, SplitError> {
    let model = load(model_path)?;
    let graph = model.graph.as_ref().cloned().unwrap_or_default();
    let cuts = cut_points(&graph);
    if cuts.is_empty() {
        return Err(PartitionError::NoCut.into());
    }
    if k == 0 || k > cuts.len() + 1 {
        return Err(PartitionError::TooManyBlocks {
            asked: k,
            cuts: cuts.len(),
            max: cuts.len() + 1,
        }
        .into());
    }
    std::fs::create_dir_all(out_dir)
        .map_err(|e| SplitError::Io(format!("{}: {e}", out_dir.display())))?;
    let scratch = tempfile_dir(out_dir)?;
    // Measure every piece between consecutive cut points, feeding each the previous one's output.
    let bounds: Vec<Option<&CutPoint>> = std::iter::once(None)
        .chain(cuts.iter().map(Some))
        .chain(std::iter::once(None))
        .collect();
    let mut costs = Vec::new();
    let mut cut_bytes = Vec::new();
    let mut x = random_input(1, &cfg.sample_shape, 1);
    let mut bar = Progress::new("measuring pieces", bounds.len() - 1);
    for (i, w) in bounds.windows(2).enumerate() {
        let piece = extract(&model, w[0], w[1]);
        let path = scratch.join(format!("piece{i}.onnx"));
        save(&piece, &path)?;
        let mut e = engine(&path, cfg, &format!("piece {i}"))?;
        let (y, ms) = timed(&mut e, &x, 5, &format!("piece {i}"))?;
        costs.push(ms);
        if w[1].is_some() {
            cut_bytes.push((y.len() * std::mem::size_of::<f32>()) as u64);
        }
        x = y;
        bar.inc(&format!("piece {i}"));
    }
    drop(bar);
    let _ = std::fs::remove_dir_all(&scratch);
    let chosen = balance(&costs, &cut_bytes, k)?;
    // Write the blocks and measure each once more as a whole.
    let name = model_path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model")
        .to_string();
    let edges: Vec<Option<&CutPoint>> = std::iter::once(None)
        .chain(chosen.iter().map(|&c| Some(&cuts[c])))
        .chain(std::iter::once(None))
        .collect();
    let mut blocks = Vec::new();
    let mut x = random_input(1, &cfg.sample_shape, 1);
    for (i, w) in edges.windows(2).enumerate() {
        let block = extract(&model, w[0], w[1]);
        let file = format!("{name}.block{i}.onnx");
        let path = out_dir.join(&file);
        save(&block, &path)?;
        let mut e = engine(&path, cfg, &file)?;
        let (y, ms) = timed(&mut e, &x, 3, &file)?;
        let g = block.graph.as_ref().cloned().unwrap_or_default();
        blocks.push(BlockEntry {
            file,
            input: g.input.first().map(|v| v.name.clone()).unwrap_or_default(),
            output: g.output.first().map(|v| v.name.clone()).unwrap_or_default(),
            output_shape: y.shape()[1..].to_vec(),
            cut_bytes: if w[1].is_some() {
                (y.len() * 4) as u64
            } else {
                0
            },
            latency_ms: ms,
        });
        x = y;
    }
    let manifest = SplitManifest {
        model: name,
        source: model_path.display().to_string(),
        sample_shape: cfg.sample_shape.clone(),
        blocks,
    };
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| SplitError::Io(e.to_string()))?;
    std::fs::write(out_dir.join("manifest.json"), text)
        .map_err(|e| SplitError::Io(e.to_string()))?;
    Ok(manifest)
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf, SplitError> {
    let d = parent.join(format!(".pieces-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| SplitError::Io(format!("{}: {e}", d.display())))?;
    Ok(d)
}

/// Reads a split's manifest.
pub fn read_manifest(dir: &Path) -> Result<SplitManifest, SplitError> {
    let p = dir.join("manifest.json");
    let text =
        std::fs::read_to_string(&p).map_err(|e| SplitError::Io(format!("{}: {e}", p.display())))?;
    serde_json::from_str(&text).map_err(|e| SplitError::Io(format!("{}: {e}", p.display())))
}

/// Runs the blocks of a split in sequence on `input`; returns the last output.
pub fn run_blocks(
    dir: &Path,
    manifest: &SplitManifest,
    input: &ArrayD<f32>,
    cfg: &RunConfig,
) -> Result<ArrayD<f32>, SplitError> {
    let mut x = input.clone();
    for b in &manifest.blocks {
        let mut e = engine(&dir.join(&b.file), cfg, &b.file)?;
        let out = e.infer(x.view()).map_err(|source| SplitError::Engine {
            block: b.file.clone(),
            source,
        })?;
        x = out
            .into_iter()
            .next()
            .ok_or_else(|| SplitError::Io(format!("{}: no output", b.file)))?;
    }
    Ok(x)
}

/// Runs a whole model on `input`; returns its first output.
pub fn run_whole(
    model: &Path,
    input: &ArrayD<f32>,
    cfg: &RunConfig,
) -> Result<ArrayD<f32>, SplitError> {
    let mut e = engine(model, cfg, "whole model")?;
    let out = e.infer(input.view()).map_err(|source| SplitError::Engine {
        block: "whole model".into(),
        source,
    })?;
    out.into_iter()
        .next()
        .ok_or_else(|| SplitError::Io("whole model: no output".into()))
}

/// A random input of `batch` samples (deterministic for a seed).
pub fn sample_input(batch: usize, sample: &[usize], seed: u64) -> ArrayD<f32> {
    random_input(batch, sample, seed)
}

/// Measures every block of a split at batch sizes `1..=max_batch` (one warm-up, median of
/// `runs`) and writes `block-timing/{model}-cpu-1.csv` and `cut-bytes/{model}.csv` under
/// `out` (the layout of the published profiles; values in integer microseconds).
pub fn profile(
    dir: &Path,
    max_batch: usize,
    runs: usize,
    out: &Path,
    cfg: &RunConfig,
) -> Result<Vec<Vec<u64>>, SplitError> {
    profile_on(dir, max_batch, runs, out, cfg, &ProfileTarget::cpu())
}

/// Where [`profile_on`] measures.
#[derive(Debug, Clone)]
pub struct ProfileTarget {
    /// Profile class written in the file name (`cpu`, or the GPU's class, e.g. `H200`).
    pub class: String,
    /// Processes sharing the device: this many copies of each block run at once and the median
    /// of all their runs is kept (the published profiles' `share`).
    pub share: usize,
    /// The GPU session of block 0 (each block gets its own block range), or `None` for the CPU.
    pub gpu: Option<crate::gpu::GpuSession>,
}

impl ProfileTarget {
    /// One process on the CPU.
    pub fn cpu() -> Self {
        Self {
            class: "cpu".into(),
            share: 1,
            gpu: None,
        }
    }
}

/// As [`profile`], on `target`: writes `block-timing/{model}-{class}-{share}.csv`.
pub fn profile_on(
    dir: &Path,
    max_batch: usize,
    runs: usize,
    out: &Path,
    cfg: &RunConfig,
    target: &ProfileTarget,
) -> Result<Vec<Vec<u64>>, SplitError> {
    let m = read_manifest(dir)?;
    let share = target.share.max(1);
    // One set of block engines per process sharing the device.
    let mut copies: Vec<Vec<OrtEngine>> = Vec::with_capacity(share);
    for _ in 0..share {
        let mut engines = Vec::new();
        for (i, b) in m.blocks.iter().enumerate() {
            let gpu = target.gpu.clone().map(|g| crate::gpu::GpuSession {
                blocks: Some([i, i + 1]),
                max_batch,
                ..g
            });
            engines.push(engine_on(&dir.join(&b.file), cfg, &b.file, gpu)?);
        }
        copies.push(engines);
    }
    let mut table = vec![vec![0u64; max_batch]; m.blocks.len()];
    let total = max_batch * m.blocks.len();
    let mut bar = Progress::new("profiling blocks", total);
    for batch in 1..=max_batch {
        let mut x = random_input(batch, &m.sample_shape, batch as u64);
        for i in 0..m.blocks.len() {
            let name = &m.blocks[i].file;
            // Every copy runs block i at once; the median of all their runs is the latency.
            let results: Vec<Timed> = std::thread::scope(|s| {
                let handles: Vec<_> = copies
                    .iter_mut()
                    .map(|engines| {
                        let x = &x;
                        s.spawn(move || timed_all(&mut engines[i], x, runs.max(1), name))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(SplitError::Io(format!(
                                "{name}: a measuring thread panicked"
                            )))
                        })
                    })
                    .collect()
            });
            let mut times = Vec::new();
            let mut next = None;
            for r in results {
                let (y, t) = r?;
                times.extend(t);
                next.get_or_insert(y);
            }
            times.sort_by(f64::total_cmp);
            table[i][batch - 1] = (times[times.len() / 2] * 1e3).round() as u64;
            x = next.unwrap_or(x);
            bar.inc(&format!("block {i} at batch {batch}"));
        }
    }
    drop(bar);
    let io = |e: std::io::Error| SplitError::Io(e.to_string());
    std::fs::create_dir_all(out.join("block-timing")).map_err(io)?;
    std::fs::create_dir_all(out.join("cut-bytes")).map_err(io)?;
    let rows: Vec<String> = table
        .iter()
        .map(|r| r.iter().map(u64::to_string).collect::<Vec<_>>().join(","))
        .collect();
    std::fs::write(
        out.join("block-timing")
            .join(format!("{}-{}-{share}.csv", m.model, target.class)),
        rows.join("\n") + "\n",
    )
    .map_err(io)?;
    let cuts: Vec<String> = m.blocks[..m.blocks.len() - 1]
        .iter()
        .map(|b| b.cut_bytes.to_string())
        .collect();
    std::fs::write(
        out.join("cut-bytes").join(format!("{}.csv", m.model)),
        cuts.join("\n") + "\n",
    )
    .map_err(io)?;
    Ok(table)
}
