//! `poolpipe devices` (what this machine can run stages on) and `poolpipe build-engines` (every
//! TensorRT engine of a pipeline, built into the cache ahead of the first run).

use std::time::Instant;

use super::CliError;
use super::validate::{LoadArgs, load};
use crate::device::Device;
use crate::gpu::{self, GpuBackend};

/// Arguments of `poolpipe devices`.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// Print JSON (`{"cpu": {...}, "gpus": [...], "gpu_error": ...}`) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `poolpipe devices`: the CPU, and each GPU (name, memory, compute capability, driver, and its
/// utilisation and temperature now), or why there are none.
pub fn devices(a: &DevicesArgs) -> Result<(), CliError> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpus = gpu::list();
    if a.json {
        let v = serde_json::json!({
            "cpu": {"device": "cpu", "cores": cores},
            "gpus": gpus.as_ref().ok(),
            "gpu_error": gpus.as_ref().err().map(ToString::to_string),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!("cpu          {cores} cores");
    match gpus {
        Ok(list) if list.is_empty() => println!("no GPUs: the NVIDIA driver reports none"),
        Ok(list) => {
            for g in list {
                println!(
                    "cuda:{}       {} (class {}), {:.1} GiB ({:.1} used), compute {}.{}, driver {}, busy {}, {}",
                    g.index,
                    g.name,
                    g.class,
                    g.memory_total as f64 / 1073741824.0,
                    g.memory_used as f64 / 1073741824.0,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.driver,
                    g.utilization
                        .map_or("?".into(), |u| format!("{:.0}%", u * 100.0)),
                    g.temperature_c.map_or("?".into(), |t| format!("{t} C")),
                );
            }
        }
        Err(e) => println!("no GPUs: {e}"),
    }
    Ok(())
}

/// Arguments of `poolpipe build-engines`.
#[derive(Debug, clap::Args)]
pub struct BuildEnginesArgs {
    /// Pipeline file (TOML).
    pub pipeline: std::path::PathBuf,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// `poolpipe build-engines`: opens one session per `tensorrt:N` stage and GPU, which builds
/// (or finds) its engine in the cache, with a progress bar; prints each build time.
pub fn build_engines(a: &BuildEnginesArgs) -> Result<(), CliError> {
    let p = load(&a.pipeline, &a.load, "")?;
    let mut jobs = Vec::new();
    for s in &p.stages {
        if let Device::Gpu {
            backend: GpuBackend::TensorRt,
            gpus,
            ..
        } = &s.device
        {
            // One worker per GPU: the workers of one GPU share its engine.
            for w in 0..s.workers.min(gpus.len()) {
                jobs.push((s, w));
            }
        }
    }
    if jobs.is_empty() {
        println!(
            "{}: no stage runs on tensorrt:N; nothing to build",
            a.pipeline.display()
        );
        return Ok(());
    }
    let mut bar = crate::progress::Progress::new("TensorRT engines", jobs.len());
    for (s, w) in jobs {
        let g = crate::pipeline::stage::gpu_session(s, w, &p.engine_cache);
        let device = g.as_ref().map(gpu::GpuSession::device).unwrap_or_default();
        let started = Instant::now();
        crate::pipeline::stage::build_runner(s, p.onnxruntime.as_deref(), None, g, false)
            .map_err(|e| CliError::Runtime(format!("stage `{}` on {device}: {e}", s.name)))?;
        bar.line(&format!(
            "stage {} on {device}: {:.1} s",
            s.name,
            started.elapsed().as_secs_f64()
        ));
        bar.inc(&s.name);
    }
    println!("engines are in {}", p.engine_cache.display());
    Ok(())
}
