//! `poolpipe bench gpu`: a model on a device (`cuda:N`, `tensorrt:N`, or `cpu` to try the bench
//! itself) against the same model on the CPU (largest relative difference of the outputs, same
//! input) and against Python `onnxruntime` on the same device, model and batch (images/s).
//! `tests/gpu/check.sh` runs it on a machine with a GPU.

use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use serde::Serialize;

use crate::device::Device;
use crate::engine::Engine;
use crate::engine::ort::{OrtConfig, OrtEngine};
use crate::gpu::{GpuSession, Precision};

/// What `bench gpu` measures.
#[derive(Debug, Clone)]
pub struct GpuBench {
    /// The device (`cuda:0`, `tensorrt:0`, `cpu`).
    pub device: String,
    /// Models (ONNX files with one image input).
    pub models: Vec<PathBuf>,
    /// Batch sizes of the throughput runs.
    pub batches: Vec<usize>,
    /// Timed runs per measurement.
    pub iters: usize,
    /// Height and width for inputs whose size the model leaves dynamic.
    pub hw: (usize, usize),
    /// Python with `onnxruntime` (the GPU build for a GPU device).
    pub python: PathBuf,
    /// Engine cache of TensorRT.
    pub engine_cache: PathBuf,
}

/// One model's figures.
#[derive(Debug, Serialize)]
pub struct ModelRow {
    /// Model file name.
    pub model: String,
    /// Largest |device - cpu| over the largest |cpu| of each output (batch 1).
    pub max_relative_difference: f64,
    /// Per batch size: (batch, poolpipe images/s, Python images/s, ratio).
    pub throughput: Vec<(usize, f64, Option<f64>, Option<f64>)>,
}

/// A model cut in two, both blocks on the device: the activation kept there from one block to
/// the next against copied to the host and back (as two stages do without
/// `keep_activations`: out of the first block, a host array per frame, stacked, into the
/// second).
#[derive(Debug, Serialize)]
pub struct CutReport {
    /// Model file name.
    pub model: String,
    /// Bytes per frame crossing the cut.
    pub cut_bytes: u64,
    /// Per batch size: (batch, kept ms per batch, copied ms per batch, copied / kept), medians.
    pub rows: Vec<(usize, f64, f64, f64)>,
}

/// A GPU session's batches through page-locked host buffers against ordinary memory.
#[derive(Debug, Serialize)]
pub struct StagingRow {
    /// Model file name.
    pub model: String,
    /// Batch.
    pub batch: usize,
    /// Images/s through pinned buffers.
    pub pinned: f64,
    /// Images/s through ordinary memory.
    pub ordinary: f64,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct GpuReport {
    /// Device measured.
    pub device: String,
    /// One row per model.
    pub models: Vec<ModelRow>,
    /// The first model cut in two (absent where it has no cut).
    pub cut: Option<CutReport>,
    /// Pinned against ordinary host buffers (GPU devices).
    pub staging: Vec<StagingRow>,
}

fn load(model: &Path, gpu: Option<GpuSession>) -> anyhow::Result<OrtEngine> {
    Ok(OrtEngine::load(&OrtConfig {
        model: model.to_path_buf(),
        input: None,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        library: None,
        optimize: true,
        spin: true, // as Python's onnxruntime does
        gpu,
    })?)
}

/// A deterministic input of `batch` samples for the engine's first input: its dimensions where
/// the model fixes them, else `hw` for the last two and 3 for any other.
fn input(engine: &OrtEngine, batch: usize, hw: (usize, usize)) -> anyhow::Result<ArrayD<f32>> {
    let shape = &engine
        .info()
        .inputs
        .first()
        .ok_or_else(|| anyhow::anyhow!("the model has no input"))?
        .shape;
    let rank = shape.len();
    let sample: Vec<usize> = shape
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, &d)| match d {
            d if d > 0 => d as usize,
            _ if i == rank - 2 => hw.0,
            _ if i == rank - 1 => hw.1,
            _ => 3,
        })
        .collect();
    Ok(crate::partition::split::random_input(batch, &sample, 1))
}

/// Largest difference over the largest reference magnitude, over every output.
pub fn relative_difference(reference: &[ArrayD<f32>], other: &[ArrayD<f32>]) -> f64 {
    let mut worst = 0.0f64;
    for (r, o) in reference.iter().zip(other) {
        let scale = r.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
        let diff = r
            .iter()
            .zip(o.iter())
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(f64::from(diff / scale));
    }
    if reference.len() != other.len() {
        return f64::INFINITY;
    }
    worst
}

/// Runs the bench.
pub fn run(b: &GpuBench) -> anyhow::Result<GpuReport> {
    let session = |max_batch: usize| -> anyhow::Result<Option<GpuSession>> {
        Ok(
            match Device::parse(&b.device).map_err(anyhow::Error::msg)? {
                Device::Cpu => None,
                Device::Gpu { backend, gpus, .. } => Some(GpuSession {
                    backend,
                    index: gpus[0],
                    // TF32 off, so that the outputs compare with the CPU's.
                    precision: Precision::Fp32,
                    cache: b.engine_cache.clone(),
                    max_batch,
                    blocks: None,
                    input_hint: None,
                }),
                Device::Emulated { .. } => anyhow::bail!("an emulated device runs no model"),
            },
        )
    };
    let max_batch = b.batches.iter().copied().max().unwrap_or(1);
    let mut rows = Vec::new();
    for model in &b.models {
        let mut cpu = load(model, None)?;
        let mut dev = load(model, session(max_batch)?)?;
        let x = input(&cpu, 1, b.hw)?;
        let reference = cpu.infer(x.view())?;
        let got = dev.infer(x.view())?;
        let diff = relative_difference(&reference, &got);
        drop(cpu);
        let mut throughput = Vec::new();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        for &batch in &b.batches {
            let x = input(&dev, batch, b.hw)?;
            let ours = super::images_per_s(&mut dev, &x, b.iters)?;
            let py = super::python_images_per_s(
                &b.python, model, &b.device, batch, b.hw, threads, b.iters,
            );
            throughput.push((batch, ours, py, py.map(|p| ours / p)));
        }
        rows.push(ModelRow {
            model: file_name(model),
            max_relative_difference: diff,
            throughput,
        });
    }
    let mut staging = Vec::new();
    if let Some(model) = b.models.first().filter(|_| b.device != "cpu") {
        let mut pinned = load(model, session(max_batch)?)?;
        let mut ordinary = load(model, session(max_batch)?)?.without_staging();
        for &batch in &b.batches {
            let x = input(&pinned, batch, b.hw)?;
            staging.push(StagingRow {
                model: file_name(model),
                batch,
                pinned: super::images_per_s(&mut pinned, &x, b.iters)?,
                ordinary: super::images_per_s(&mut ordinary, &x, b.iters)?,
            });
        }
    }
    let cut = match b.models.first() {
        Some(model) => cut_handoff(b, model, &session(max_batch)?)
            .inspect_err(|e| eprintln!("no cut measured for {}: {e:#}", model.display()))
            .ok(),
        None => None,
    };
    Ok(GpuReport {
        device: b.device.clone(),
        models: rows,
        cut,
        staging,
    })
}

fn file_name(model: &Path) -> String {
    model
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Median milliseconds of `f` over `iters` runs, after 3 unmeasured.
fn median_ms(iters: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = std::time::Instant::now();
        f()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    super::median_of(&ms).ok_or_else(|| anyhow::anyhow!("no timed runs"))
}

/// Cuts `model` in two and times a batch through both blocks on the device, the activation
/// kept there or copied through the host; the outputs of both ways must agree.
fn cut_handoff(b: &GpuBench, model: &Path, gpu: &Option<GpuSession>) -> anyhow::Result<CutReport> {
    let probe = load(model, None)?;
    let sample: Vec<usize> = input(&probe, 1, b.hw)?.shape()[1..].to_vec();
    drop(probe);
    let dir = std::env::temp_dir().join(format!("poolpipe-bench-gpu-cut-{}", std::process::id()));
    let result = cut_blocks(b, model, gpu, sample, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn cut_blocks(
    b: &GpuBench,
    model: &Path,
    gpu: &Option<GpuSession>,
    sample: Vec<usize>,
    dir: &Path,
) -> anyhow::Result<CutReport> {
    use crate::engine::Feed;
    use crate::frame::Kept;
    use ndarray::Axis;
    let cfg = crate::partition::split::RunConfig {
        sample_shape: sample,
        threads: 1,
        optimize: true,
    };
    let m = crate::partition::split::split(model, 2, dir, &cfg)?;
    let block = |i: usize| {
        let g = gpu.clone().map(|g| GpuSession {
            blocks: Some([i, i + 1]),
            ..g
        });
        load(&dir.join(&m.blocks[i].file), g)
    };
    let (mut head, mut tail) = (block(0)?, block(1)?);
    let mut rows = Vec::new();
    for &batch in &b.batches {
        let x = input(&head, batch, b.hw)?;
        let kept_way =
            |head: &mut OrtEngine, tail: &mut OrtEngine| -> anyhow::Result<Vec<ArrayD<f32>>> {
                let k = Kept::all(&head.infer_keeping(Feed::Host(x.view()))?);
                Ok(tail.infer_feed(Feed::Kept(&k.iter().collect::<Vec<_>>()))?)
            };
        let copied_way =
            |head: &mut OrtEngine, tail: &mut OrtEngine| -> anyhow::Result<Vec<ArrayD<f32>>> {
                let out = head.infer(x.view())?.swap_remove(0);
                let frames: Vec<ArrayD<f32>> = out.outer_iter().map(|a| a.to_owned()).collect();
                let views: Vec<_> = frames.iter().map(|a| a.view()).collect();
                Ok(tail.infer(ndarray::stack(Axis(0), &views)?.view())?)
            };
        let diff = relative_difference(
            &copied_way(&mut head, &mut tail)?,
            &kept_way(&mut head, &mut tail)?,
        );
        anyhow::ensure!(diff < 1e-5, "kept and copied outputs differ by {diff:e}");
        let kept = median_ms(b.iters, || kept_way(&mut head, &mut tail).map(drop))?;
        let copied = median_ms(b.iters, || copied_way(&mut head, &mut tail).map(drop))?;
        rows.push((batch, kept, copied, copied / kept));
    }
    Ok(CutReport {
        model: file_name(model),
        cut_bytes: m.blocks[0].cut_bytes,
        rows,
    })
}

/// The report as a table.
pub fn table(r: &GpuReport) -> String {
    let mut s = format!(
        "device {}\n{:<34} {:>10} {:>6} {:>14} {:>14} {:>7}\n",
        r.device, "model", "rel. diff", "batch", "poolpipe img/s", "python img/s", "ratio"
    );
    for m in &r.models {
        for (i, (batch, ours, py, ratio)) in m.throughput.iter().enumerate() {
            let diff = if i == 0 {
                format!("{:.2e}", m.max_relative_difference)
            } else {
                String::new()
            };
            s += &format!(
                "{:<34} {:>10} {:>6} {:>14.1} {:>14} {:>7}\n",
                if i == 0 { m.model.as_str() } else { "" },
                diff,
                batch,
                ours,
                py.map_or("-".into(), |p| format!("{p:.1}")),
                ratio.map_or("-".into(), |r| format!("{r:.2}x")),
            );
        }
    }
    if let Some(c) = &r.cut {
        s += &format!(
            "\n{} cut in two ({} bytes per frame cross the cut); ms per batch, medians\n{:>6} {:>12} {:>12} {:>8}\n",
            c.model, c.cut_bytes, "batch", "kept", "copied", "ratio"
        );
        for (batch, kept, copied, ratio) in &c.rows {
            s += &format!("{batch:>6} {kept:>12.3} {copied:>12.3} {ratio:>7.2}x\n");
        }
    }
    if !r.staging.is_empty() {
        s += &format!(
            "\nhost buffers, images/s\n{:<34} {:>6} {:>10} {:>10} {:>8}\n",
            "model", "batch", "pinned", "ordinary", "ratio"
        );
        for t in &r.staging {
            s += &format!(
                "{:<34} {:>6} {:>10.1} {:>10.1} {:>7.2}x\n",
                t.model,
                t.batch,
                t.pinned,
                t.ordinary,
                t.pinned / t.ordinary
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_difference_is_scaled_by_the_reference() {
        let a = vec![ArrayD::from_shape_vec(vec![3], vec![10.0f32, -20.0, 5.0]).unwrap()];
        let b = vec![ArrayD::from_shape_vec(vec![3], vec![10.0f32, -20.01, 5.0]).unwrap()];
        let d = relative_difference(&a, &b);
        assert!((d - 0.0005).abs() < 1e-6, "{d}");
        assert_eq!(relative_difference(&a, &a), 0.0);
        assert!(relative_difference(&a, &[]).is_infinite());
    }
}
