//! `poolpipe split`: cut an ONNX model into blocks of even measured latency.

use std::path::PathBuf;

use super::CliError;
use crate::partition::split::{RunConfig, split};

/// Arguments of `poolpipe split`.
#[derive(Debug, clap::Args)]
pub struct SplitArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Number of blocks.
    #[arg(long)]
    pub blocks: usize,
    /// Output folder (default: next to the model, `<name>.blocks`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Shape of one input sample, without the batch dimension.
    #[arg(long, value_delimiter = ',', default_value = "3,224,224")]
    pub input_shape: Vec<usize>,
    /// Intra-op threads for measuring.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
}

/// Splits the model and prints each block.
pub fn run(a: SplitArgs) -> Result<(), CliError> {
    let out = a.out.unwrap_or_else(|| a.model.with_extension("blocks"));
    let cfg = RunConfig {
        sample_shape: a.input_shape,
        threads: a.threads,
        optimize: true,
    };
    let m = split(&a.model, a.blocks, &out, &cfg).map_err(|e| CliError::Runtime(e.to_string()))?;
    println!(
        "{} -> {} blocks in {}",
        a.model.display(),
        m.blocks.len(),
        out.display()
    );
    for b in &m.blocks {
        println!(
            "  {:<32} {:>9.2} ms at batch 1  output {:<16} {:?}  cut {} bytes/sample",
            b.file, b.latency_ms, b.output, b.output_shape, b.cut_bytes
        );
    }
    Ok(())
}
