//! The command line: `run`, `validate`, `split`, `profile`, `bench`, `serve-rtsp`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 invalid configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config;
use crate::pipeline::{self, RunOptions, Shutdown};

/// Exit code of a configuration error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code of a runtime failure.
pub const EXIT_RUNTIME: u8 = 1;

/// poolpipe: video analytics stream processor.
#[derive(Debug, Parser)]
#[command(name = "poolpipe", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline until its sources end, a limit is reached, or SIGINT/SIGTERM.
    Run {
        /// Pipeline file (TOML).
        pipeline: PathBuf,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// Stop after this many frames (all sources together).
        #[arg(long)]
        max_frames: Option<u64>,
        /// Write the final counters as JSON to this file.
        #[arg(long)]
        summary_json: Option<PathBuf>,
    },
    /// Check a pipeline file without running anything; prints every problem found.
    Validate {
        /// Pipeline file (TOML).
        pipeline: PathBuf,
    },
    /// Cut an ONNX model into K consecutive blocks of even measured latency; write the blocks
    /// and a manifest (cut tensors, shapes, bytes per sample).
    Split {
        /// The ONNX model.
        model: PathBuf,
        /// Number of blocks.
        #[arg(long)]
        blocks: usize,
        /// Output folder (default: next to the model, `<name>.blocks`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Shape of one input sample, without the batch dimension.
        #[arg(long, value_delimiter = ',', default_value = "3,224,224")]
        input_shape: Vec<usize>,
        /// Intra-op threads for measuring.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Measure every block of a split at each batch size; write a profile in the layout of the
    /// published profiles (block-timing/{model}-cpu-1.csv, cut-bytes/{model}.csv).
    Profile {
        /// A split's folder (with manifest.json).
        blocks: PathBuf,
        /// Device to measure on (only `cpu`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Batch sizes, `1..N`.
        #[arg(long, default_value = "1..8")]
        batch: String,
        /// Timed runs per measurement (the median is kept), after one warm-up.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Output folder of the profile.
        #[arg(long)]
        out: PathBuf,
        /// Intra-op threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Measure and print figures.
    Bench {
        /// Which benchmark.
        #[command(subcommand)]
        which: crate::bench::BenchCommand,
    },
    /// Serve a test pattern or an H.264 MP4 over RTSP (for tests and experiments).
    ServeRtsp {
        /// `test://PATTERN` or an MP4 file.
        media: String,
        /// TCP port.
        #[arg(long, default_value_t = 8554)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        address: String,
        /// Mount path.
        #[arg(long, default_value = "/cam")]
        mount: String,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Validate { pipeline } => match config::load_pipeline(&pipeline) {
            Ok(p) => {
                println!(
                    "{}: ok ({} sources, {} stages, {} sinks)",
                    pipeline.display(),
                    p.sources.len(),
                    p.stages.len(),
                    p.sinks.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{}: {} problem(s)", pipeline.display(), e.0.len());
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run {
            pipeline,
            duration,
            max_frames,
            summary_json,
        } => run(pipeline, duration, max_frames, summary_json),
        Command::Split {
            model,
            blocks,
            out,
            input_shape,
            threads,
        } => {
            let out = out.unwrap_or_else(|| model.with_extension("blocks"));
            let cfg = crate::partition::split::RunConfig {
                sample_shape: input_shape,
                threads,
                optimize: true,
            };
            match crate::partition::split::split(&model, blocks, &out, &cfg) {
                Ok(m) => {
                    println!(
                        "{} -> {} blocks in {}",
                        model.display(),
                        m.blocks.len(),
                        out.display()
                    );
                    for b in &m.blocks {
                        println!(
                            "  {:<32} {:>9.2} ms at batch 1  output {:<16} {:?}  cut {} bytes/sample",
                            b.file, b.latency_ms, b.output, b.output_shape, b.cut_bytes
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Profile {
            blocks,
            device,
            batch,
            runs,
            out,
            threads,
        } => {
            if device != "cpu" {
                eprintln!("error: only `--device cpu` can be measured in this build");
                return ExitCode::from(EXIT_CONFIG);
            }
            let max_batch = match batch
                .strip_prefix("1..")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) if (1..=64).contains(&n) => n,
                _ => {
                    eprintln!("error: --batch takes `1..N` with N in 1..=64, got `{batch}`");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let cfg = crate::partition::split::RunConfig {
                sample_shape: Vec::new(),
                threads,
                optimize: true,
            };
            match crate::partition::split::profile(&blocks, max_batch, runs, &out, &cfg) {
                Ok(table) => {
                    println!(
                        "block latency (us) at batch 1..{max_batch}, written under {}",
                        out.display()
                    );
                    for (i, row) in table.iter().enumerate() {
                        println!("  block {i}: {row:?}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        Command::Bench { which } => match crate::bench::run(which) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        Command::ServeRtsp {
            media,
            port,
            address,
            mount,
        } => match crate::rtsp::serve(&crate::rtsp::ServeConfig {
            address,
            port,
            mount,
            media,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
    }
}

fn run(
    path: PathBuf,
    duration: Option<f64>,
    max_frames: Option<u64>,
    summary_json: Option<PathBuf>,
) -> ExitCode {
    let p = match config::load_pipeline(&path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            eprintln!(
                "{}: {} problem(s); nothing was started",
                path.display(),
                e.0.len()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let shutdown = Shutdown::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while draining exits at once.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, shutdown.flag());
        let _ = signal_hook::flag::register(sig, shutdown.flag());
    }
    let opts = RunOptions {
        duration: duration.map(Duration::from_secs_f64),
        max_frames,
        progress: true,
    };
    tracing::info!(pipeline = %p.name, file = %path.display(), "Starting pipeline.");
    match pipeline::run(&p, &opts, &shutdown) {
        Ok(summary) => {
            eprintln!("{}", summary.table());
            if let Some(out) = summary_json {
                let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
                if let Err(e) = std::fs::write(&out, text) {
                    eprintln!("error: cannot write {}: {e}", out.display());
                    return ExitCode::from(EXIT_RUNTIME);
                }
            }
            if !summary.balanced() {
                eprintln!("error: frame accounting does not balance (a bug): see the table above");
                return ExitCode::from(EXIT_RUNTIME);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
