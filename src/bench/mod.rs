//! `poolpipe bench ...`: measured figures, printed as a table or JSON.

use clap::Subcommand;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Pipeline overhead vs GStreamer alone, Rust engine vs Python onnxruntime, demo fps/latency.
    Pipeline {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a benchmark.
pub fn run(which: BenchCommand) -> anyhow::Result<()> {
    match which {
        BenchCommand::Pipeline { json: _ } => anyhow::bail!("not built yet"),
    }
}
