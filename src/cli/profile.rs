//! `poolpipe profile`: measure every block of a split at each batch size.

use std::path::PathBuf;

use super::CliError;
use crate::partition::split::{RunConfig, profile};

/// Arguments of `poolpipe profile`.
#[derive(Debug, clap::Args)]
pub struct ProfileArgs {
    /// A split's folder (with manifest.json).
    pub blocks: PathBuf,
    /// Device to measure on (only `cpu`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
    if a.device != "cpu" {
        return Err(CliError::Usage(
            "only `--device cpu` can be measured in this build".into(),
        ));
    }
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
    let table = profile(&a.blocks, max_batch, a.runs, &a.out, &cfg)
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    println!(
        "block latency (us) at batch 1..{max_batch}, written under {}",
        a.out.display()
    );
    for (i, row) in table.iter().enumerate() {
        println!("  block {i}: {row:?}");
    }
    Ok(())
}
