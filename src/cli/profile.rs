//! `poolpipe profile`: measure every block of a split at each batch size.

use std::path::PathBuf;

use super::CliError;
use crate::partition::split::{RunConfig, profile_on};

/// Arguments of `poolpipe profile`.
#[derive(Debug, clap::Args)]
pub struct ProfileArgs {
    /// A split's folder (with manifest.json).
    pub blocks: PathBuf,
    /// Device to measure on: `cpu`, `cuda:N` or `tensorrt:N` (builds with `--features gpu`).
    /// The profile's class is `cpu` or the GPU's (its product name without the vendor, e.g.
    /// `H200`), so the planner and the `deadline` policy can use it.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Processes sharing the device: this many copies of each block run at once (the published
    /// profiles' share; the file is `{model}-{class}-{share}.csv`).
    #[arg(long, default_value_t = 1)]
    pub share: usize,
    /// GPU precision: `fp32`, `tf32` or `fp16` (TensorRT).
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// TensorRT engine cache.
    #[arg(long, default_value = "engines/trt-cache")]
    pub engine_cache: PathBuf,
    /// Batch sizes, `1..N`.
    #[arg(long, default_value = "1..8")]
    pub batch: String,
    /// Timed runs per measurement (the median is kept), after one warm-up.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Output folder of the profile.
    #[arg(long)]
    pub out: PathBuf,
    /// Intra-op threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// Measures the blocks and writes the profile.
pub fn run(a: ProfileArgs) -> Result<(), CliError> {
    use crate::device::Device;
    use crate::gpu;
    if !(1..=16).contains(&a.share) {
        return Err(CliError::Usage(format!(
            "--share {}: expected 1..=16",
            a.share
        )));
    }
    let target = match Device::parse(&a.device).map_err(CliError::Usage)? {
        Device::Cpu => crate::partition::split::ProfileTarget {
            share: a.share,
            ..crate::partition::split::ProfileTarget::cpu()
        },
        Device::Emulated { .. } => {
            return Err(CliError::Usage(
                "an emulated device has no latency of its own to measure: profile on `cpu`, `cuda:N` or `tensorrt:N`".into(),
            ));
        }
        Device::Gpu { backend, gpus, .. } => {
            let precision = gpu::Precision::parse(&a.precision)
                .and_then(|p| gpu::check_precision(backend, p).map(|_| p))
                .map_err(CliError::Usage)?;
            let index = gpus[0];
            let device = format!("{}:{index}", backend.prefix());
            let info = gpu::info(&device, index).map_err(|e| CliError::Runtime(e.to_string()))?;
            crate::partition::split::ProfileTarget {
                class: info.class,
                share: a.share,
                gpu: Some(gpu::GpuSession {
                    backend,
                    index,
                    precision,
                    cache: a.engine_cache.clone(),
                    max_batch: 1,
                    blocks: None,
                    input_hint: None,
                }),
            }
        }
    };
    let max_batch = match a
        .batch
        .strip_prefix("1..")
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) if (1..=64).contains(&n) => n,
        _ => {
            return Err(CliError::Usage(format!(
                "--batch takes `1..N` with N in 1..=64, got `{}`",
                a.batch
            )));
        }
    };
    let cfg = RunConfig {
        sample_shape: Vec::new(),
        threads: a.threads,
        optimize: true,
    };
    let table = profile_on(&a.blocks, max_batch, a.runs, &a.out, &cfg, &target)
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    println!(
        "block latency (us) at batch 1..{max_batch} on {} (class {}, share {}), written under {}",
        a.device,
        target.class,
        target.share,
        a.out.display()
    );
    for (i, row) in table.iter().enumerate() {
        println!("  block {i}: {row:?}");
    }
    Ok(())
}
