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

/// The report.
#[derive(Debug, Serialize)]
pub struct GpuReport {
    /// Device measured.
    pub device: String,
    /// One row per model.
    pub models: Vec<ModelRow>,
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
            model: model
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            max_relative_difference: diff,
            throughput,
        });
    }
    Ok(GpuReport {
        device: b.device.clone(),
        models: rows,
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
