//! The command line: `run`, `validate`, `split`, `profile`, `plan`, `simulate`, `bench`,
//! `serve-rtsp`, `devices`, `build-engines`, `place`.
//!
//! Exit codes: 0 success, 1 runtime failure (an engine, sink or the API address could not be
//! opened, a run that failed), 2 invalid configuration or usage (nothing was started).

mod controller;
mod deploy;
mod gpu;
mod node;
mod place;
mod plan;
mod profile;
mod run;
mod serve_rtsp;
mod simulate;
mod split;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

pub use plan::PlanArgs;
pub use simulate::SimulateArgs;

/// Exit code of a configuration error.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code of a runtime failure.
pub const EXIT_RUNTIME: u8 = 1;
/// Default address of the HTTP API and metrics.
pub const DEFAULT_API: &str = "127.0.0.1:9464";

/// Why a command failed, and so its exit code. Every subcommand returns one; only
/// [`main`] prints it and exits.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Invalid usage or input: nothing was started (exit 2; printed as `error: ...`).
    #[error("error: {0}")]
    Usage(String),
    /// Invalid configuration, already worded with files and positions (exit 2; printed as is).
    #[error("{0}")]
    Invalid(String),
    /// A runtime failure (exit 1; printed as `error: ...`).
    #[error("error: {0}")]
    Runtime(String),
    /// A failure whose details were printed already (exit 1; the text, if any, is printed).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The documented exit code.
    pub fn code(&self) -> u8 {
        match self {
            Self::Usage(_) | Self::Invalid(_) => EXIT_CONFIG,
            Self::Runtime(_) | Self::Failed(_) => EXIT_RUNTIME,
        }
    }

    /// Prints the error to stderr and returns its exit code.
    pub fn exit(self) -> ExitCode {
        let text = self.to_string();
        if !text.is_empty() {
            eprintln!("{text}");
        }
        ExitCode::from(self.code())
    }
}

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
    Run(run::RunArgs),
    /// Check a pipeline file without running anything; prints every problem found.
    Validate {
        /// Pipeline file (TOML).
        pipeline: PathBuf,
        #[command(flatten)]
        load: validate::LoadArgs,
    },
    /// Validate a pipeline file, then try each sink's destination once (connect and
    /// authenticate; an HTTP sink POSTs an empty array) and say which fails and why.
    Check {
        /// Pipeline file (TOML).
        pipeline: PathBuf,
        #[command(flatten)]
        load: validate::LoadArgs,
    },
    /// Cut an ONNX model into K consecutive blocks of even measured latency; write the blocks
    /// and a manifest (cut tensors, shapes, bytes per sample).
    Split(split::SplitArgs),
    /// Measure every block of a split at each batch size; write a profile in the layout of the
    /// published profiles (block-timing/{model}-cpu-1.csv, cut-bytes/{model}.csv).
    Profile(profile::ProfileArgs),
    /// Plan models on a cluster: cuts, device classes, shares, batch sizes and device counts that
    /// serve the most frames within the SLOs (MILP, HiGHS). Every plan printed is checked.
    Plan(plan::PlanArgs),
    /// Simulate a plan on a virtual clock with the runtime's batching policies: SLO attainment,
    /// goodput, latency, drops and busy shares; optionally the highest load with 99% attainment.
    Simulate(simulate::SimulateArgs),
    /// Measure and print figures.
    Bench {
        /// Which benchmark.
        #[command(subcommand)]
        which: crate::bench::BenchCommand,
    },
    /// Serve a test pattern or an H.264 MP4 over RTSP (for tests and experiments).
    ServeRtsp(serve_rtsp::ServeRtspArgs),
    /// List the devices stages can run on here: the CPU and each NVIDIA GPU (name, memory,
    /// compute capability, driver, utilisation, temperature), or why there are no GPUs.
    Devices(gpu::DevicesArgs),
    /// Build the TensorRT engine of every `tensorrt:N` stage of a pipeline into the engine cache,
    /// so that the first run starts without building.
    BuildEngines(gpu::BuildEnginesArgs),
    /// Place a plan on servers: which server and GPU runs each process (consecutive stages on
    /// one server where they fit), and the cut traffic each server's link carries.
    Place(place::PlaceArgs),
    /// Serve the workers that a `[cluster]` pipeline places on this node (the front reaches
    /// them over gRPC), until SIGINT/SIGTERM.
    Node(node::NodeArgs),
    /// Write what a placed plan needs to run on many machines: Kubernetes manifests (`--emit
    /// k8s`), or the pipeline file and plan for bare-metal nodes (`--emit nodes`).
    Deploy(deploy::DeployArgs),
    /// Own the plan of a `[cluster]` pipeline with `nats`: watch the nodes' heartbeats, re-plan
    /// on the servers that are up when one is lost or comes back, and publish plan epochs.
    Controller(controller::ControllerArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_)) {
        // Long runs only (where it was measured); before any thread starts.
        crate::alloc::tune();
    }
    init_logging(cli.log_format);
    let done = match cli.command {
        Command::Run(a) => run::run(a),
        Command::Validate { pipeline, load } => validate::validate(&pipeline, &load),
        Command::Check { pipeline, load } => validate::check(&pipeline, &load),
        Command::Split(a) => split::run(a),
        Command::Profile(a) => profile::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Simulate(a) => simulate::run(a),
        Command::Bench { which } => {
            crate::bench::run(which).map_err(|e| CliError::Runtime(format!("{e:#}")))
        }
        Command::ServeRtsp(a) => serve_rtsp::run(a),
        Command::Devices(a) => gpu::devices(&a),
        Command::BuildEngines(a) => gpu::build_engines(&a),
        Command::Place(a) => place::run(&a),
        Command::Node(a) => node::run(a),
        Command::Deploy(a) => deploy::run(&a),
        Command::Controller(a) => controller::run(a),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.exit(),
    }
}
