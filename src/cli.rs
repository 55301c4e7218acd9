//! The command line: `run`, `validate`, `split`, `profile`, `plan`, `simulate`, `bench`,
//! `serve-rtsp`.
//!
//! Exit codes: 0 success, 1 runtime failure (an engine, sink or the API address could not be
//! opened, a run that failed), 2 invalid configuration or usage (nothing was started).

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
/// Default address of the HTTP API and metrics.
pub const DEFAULT_API: &str = "127.0.0.1:9464";

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
        /// Where the HTTP API and `/metrics` listen (`HOST:PORT`; port 0 picks a free one), or
        /// `off`. Any address but loopback needs a bearer token (see --api-token-env).
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Environment variable holding the API's bearer token.
        #[arg(long, default_value = "POOLPIPE_API_TOKEN")]
        api_token_env: String,
        /// Keep running when every source has ended (streams come and go through the API).
        #[arg(long)]
        serve: bool,
    },
    /// Check a pipeline file without running anything; prints every problem found.
    Validate {
        /// Pipeline file (TOML).
        pipeline: PathBuf,
    },
    /// Validate a pipeline file, then try each sink's destination once (connect and
    /// authenticate; an HTTP sink POSTs an empty array) and say which fails and why.
    Check {
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
    /// Plan models on a cluster: cuts, device classes, shares, batch sizes and device counts that
    /// serve the most frames within the SLOs (MILP, HiGHS). Every plan printed is checked.
    Plan(PlanArgs),
    /// Simulate a plan on a virtual clock with the runtime's batching policies: SLO attainment,
    /// goodput, latency, drops and busy shares; optionally the highest load with 99% attainment.
    Simulate(SimulateArgs),
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

/// Arguments of `poolpipe plan`.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Folder of latency profiles (block-timing/, cut-bytes/).
    #[arg(long, default_value = "../shared/data/ppipe-profiles")]
    pub profiles: PathBuf,
    /// Devices, `CLASS:COUNT,...` (e.g. `L4:25,T4:75`).
    #[arg(
        long,
        conflicts_with = "cluster_file",
        required_unless_present = "cluster_file"
    )]
    pub cluster: Option<String>,
    /// Devices from a cluster file (configs/cluster-*.toml).
    #[arg(long)]
    pub cluster_file: Option<PathBuf>,
    /// Link bandwidth per GPU, Gbit/s (overrides the cluster file's).
    #[arg(long)]
    pub bandwidth_gbps: Option<f64>,
    /// Models (names in the profiles, or unique prefixes of them).
    #[arg(long, value_delimiter = ',', required = true)]
    pub models: Vec<String>,
    /// Demand weights, one per model (default: equal).
    #[arg(long, value_delimiter = ',')]
    pub weights: Vec<f64>,
    /// SLO = this x the model's whole-model batch-1 latency on its fastest profiled class.
    #[arg(long, conflicts_with = "slo_ms")]
    pub slo_multiplier: Option<f64>,
    /// SLOs in milliseconds, one per model.
    #[arg(long, value_delimiter = ',')]
    pub slo_ms: Vec<f64>,
    /// Most stages per pipeline.
    #[arg(long, default_value_t = 2)]
    pub max_stages: usize,
    /// Largest batch size.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// Largest GPU share (processes per GPU).
    #[arg(long, default_value_t = 4)]
    pub max_share: u32,
    /// Safety margin kept free, a fraction of the SLO.
    #[arg(long, default_value_t = 0.1)]
    pub margin: f64,
    /// Queueing allowance: each stage's batch may wait this many times its run time for a
    /// worker (1 = one batch ahead, the Nexus-style worst case; 0 = no queueing).
    #[arg(long, default_value_t = 1.0)]
    pub queueing: f64,
    /// Pool tiers: a pipeline whose every stage has at least T processes gets the queueing
    /// allowance divided by T.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub pool_tiers: Vec<u32>,
    /// Plan a baseline instead: `np` (whole models) or `paired` (one high + one low GPU).
    #[arg(long, value_enum)]
    pub baseline: Option<crate::planner::Mode>,
    /// Solver time limit, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub time_limit: f64,
    /// Relative optimality gap at which the solver stops.
    #[arg(long, default_value_t = 1e-4)]
    pub gap: f64,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write the plan (JSON) to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Arguments of `poolpipe simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// A plan written by `poolpipe plan --out` (or `--json`).
    #[arg(long)]
    pub plan: PathBuf,
    /// Folder of latency profiles (block-timing/, cut-bytes/).
    #[arg(long, default_value = "../shared/data/ppipe-profiles")]
    pub profiles: PathBuf,
    /// Simulated seconds of arrivals.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// `poisson`, `bursty`, `bursty:K` (bursts at K x the mean rate, 1 <= K < 5) or
    /// `trace:FILE` (one timestamp in seconds per line, or `seconds,model`).
    #[arg(long, default_value = "poisson")]
    pub arrivals: String,
    /// Offered load, a fraction of each model's planned throughput (default 0.9; a trace without
    /// `--load` is replayed as recorded).
    #[arg(long)]
    pub load: Option<f64>,
    /// Batching policy of every stage.
    #[arg(long, value_enum, default_value_t = crate::config::PolicyKind::Deadline)]
    pub policy: crate::config::PolicyKind,
    /// Safety margin of the deadline policy, ms (the runtime's default).
    #[arg(long, default_value_t = 2.0)]
    pub margin_ms: f64,
    /// Seed of the arrival processes.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Search the highest load (fraction of planned, up to `--load` or 1.2) at which every
    /// model meets its SLO for at least 99% of its frames.
    #[arg(long)]
    pub find_99: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also sweep the load from 0.1 to 1.2 (or `--load`, if higher) in steps of 0.1 and draw
    /// attainment per model and busy share per device class against it (PNG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

fn simulate_command(a: SimulateArgs) -> ExitCode {
    use crate::sim::{self, Arrivals, SimOptions, SimSetup};
    let usage = |m: String| {
        eprintln!("error: {m}");
        ExitCode::from(EXIT_CONFIG)
    };
    let plan = match crate::planner::Plan::load(&a.plan) {
        Ok(p) => p,
        Err(e) => return usage(e.to_string()),
    };
    let profiles = match crate::profile::Profiles::load_dir(&a.profiles, None) {
        Ok(p) => p,
        Err(e) => return usage(format!("profiles: {e}")),
    };
    let violations = crate::planner::check::check(&plan, &profiles);
    if let Some(v) = violations.first() {
        return usage(format!(
            "{}: the plan does not hold on these profiles ({} problems), first: {v}",
            a.plan.display(),
            violations.len()
        ));
    }
    let mut arrivals = match Arrivals::parse(&a.arrivals) {
        Ok(x) => x,
        Err(e) => return usage(e.to_string()),
    };
    if let Arrivals::Trace(t) = &mut arrivals {
        t.as_recorded = a.load.is_none();
    }
    if !(a.duration > 0.0 && a.duration.is_finite()) {
        return usage(format!(
            "--duration {} is not a positive number of seconds",
            a.duration
        ));
    }
    let load = a.load.unwrap_or(if a.find_99 { 1.2 } else { 0.9 });
    if !(load > 0.0 && load.is_finite()) {
        return usage(format!("--load {load} is not a positive fraction"));
    }
    let setup = match SimSetup::from_plan(&plan, &profiles) {
        Ok(s) => s,
        Err(e) => return usage(e.to_string()),
    };
    let opts = SimOptions {
        policy: a.policy,
        duration: a.duration,
        load,
        arrivals,
        seed: a.seed,
        margin: crate::clock::nanos(Duration::from_secs_f64(a.margin_ms.max(0.0) / 1e3)),
        queue: None,
    };
    let t0 = std::time::Instant::now();
    let mut runs = 0u64;
    let mut events = 0u64;
    let result = if a.find_99 {
        sim::find_load(&setup, &opts, 0.99, 0.0, load, 7, |r| {
            runs += 1;
            events += r.events;
            eprintln!(
                "[simulate] load {:.3}: min attainment {:.4}, goodput {:.1} frames/s",
                r.load, r.min_attainment, r.goodput
            );
        })
    } else {
        let r = sim::simulate(&setup, &opts);
        runs = 1;
        events = r.events;
        r
    };
    if let Some(path) = &a.plot {
        let top = (load.max(1.2) * 10.0).round() as usize;
        let sweep: Vec<sim::SimResult> = (1..=top)
            .map(|k| {
                let r = sim::simulate(
                    &setup,
                    &SimOptions {
                        load: k as f64 / 10.0,
                        ..opts.clone()
                    },
                );
                runs += 1;
                events += r.events;
                eprintln!(
                    "[simulate] sweep {k}/{top}: load {:.1}, attainment {:.4}",
                    r.load, r.attainment
                );
                r
            })
            .collect();
        let title = format!(
            "{} plan on {}, {} arrivals, {} policy, {} s per point",
            plan.mode.name(),
            plan.classes
                .iter()
                .map(|c| format!("{}:{}", c.class, c.available))
                .collect::<Vec<_>>()
                .join(","),
            a.arrivals,
            format!("{:?}", a.policy).to_lowercase(),
            a.duration
        );
        if let Err(e) = sim::plot::plot(path, &title, &sweep) {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        eprintln!("[simulate] plot written to {}", path.display());
    }
    let wall = t0.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&result).expect("results serialise");
        v["wall_seconds"] = serde_json::json!(wall);
        v["runs"] = serde_json::json!(runs);
        v["events_per_second"] = serde_json::json!(events as f64 / wall.max(1e-9));
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    } else {
        print!("{}", sim::table(&result, &plan));
        println!(
            "{runs} run(s), {events} events in {wall:.2} s of wall time ({:.2} M events/s)",
            events as f64 / wall.max(1e-9) / 1e6
        );
    }
    ExitCode::SUCCESS
}

fn plan_command(a: PlanArgs) -> ExitCode {
    use crate::planner::{self, Cluster, Mode, ModelSpec, Options, PlanError};
    let usage = |m: String| {
        eprintln!("error: {m}");
        ExitCode::from(EXIT_CONFIG)
    };
    let profiles = match crate::profile::Profiles::load_dir(&a.profiles, None) {
        Ok(p) => p,
        Err(e) => return usage(format!("profiles: {e}")),
    };
    let cluster = match (&a.cluster, &a.cluster_file) {
        (Some(spec), _) => Cluster::parse_spec(spec, a.bandwidth_gbps.unwrap_or(10.0)),
        (None, Some(f)) => Cluster::load(f).map(|mut c| {
            if let Some(b) = a.bandwidth_gbps {
                c.bandwidth_gbps = b;
            }
            c
        }),
        (None, None) => Err(PlanError::Input("give --cluster or --cluster-file".into())),
    };
    let cluster = match cluster {
        Ok(c) => c,
        Err(e) => return usage(e.to_string()),
    };
    if !a.weights.is_empty() && a.weights.len() != a.models.len() {
        return usage(format!(
            "--weights has {} values for {} models",
            a.weights.len(),
            a.models.len()
        ));
    }
    if !a.slo_ms.is_empty() && a.slo_ms.len() != a.models.len() {
        return usage(format!(
            "--slo-ms has {} values for {} models",
            a.slo_ms.len(),
            a.models.len()
        ));
    }
    let mut models = Vec::new();
    for (i, name) in a.models.iter().enumerate() {
        let name = match planner::resolve_model(&profiles, name) {
            Ok(n) => n,
            Err(e) => return usage(e.to_string()),
        };
        let (slo, basis) = if let Some(ms) = a.slo_ms.get(i) {
            if !(*ms > 0.0 && ms.is_finite()) {
                return usage(format!("--slo-ms: {ms} is not a positive number of ms"));
            }
            (Duration::from_secs_f64(ms / 1e3), "given".to_string())
        } else {
            let mult = a.slo_multiplier.unwrap_or(5.0);
            match planner::slo_from_multiplier(&profiles, &name, mult) {
                Ok((slo, class)) => (slo, format!("{mult} x batch-1 on {class}")),
                Err(e) => return usage(e.to_string()),
            }
        };
        models.push(ModelSpec {
            name,
            weight: a.weights.get(i).copied().unwrap_or(1.0),
            slo,
            slo_basis: basis,
        });
    }
    let opts = Options {
        max_stages: a.max_stages,
        max_batch: a.max_batch,
        max_share: a.max_share,
        margin: a.margin,
        queueing: a.queueing,
        pool_tiers: a.pool_tiers.clone(),
        time_limit: Duration::from_secs_f64(a.time_limit.max(0.01)),
        gap: a.gap,
        mode: a.baseline.unwrap_or(Mode::Poolpipe),
    };
    let plan = match planner::plan(&profiles, &cluster, &models, &opts) {
        Ok(p) => p,
        Err(e @ (PlanError::Solver(_) | PlanError::Profile(_))) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
        Err(e) => return usage(e.to_string()),
    };
    let violations = planner::check::check(&plan, &profiles);
    let json = serde_json::to_string_pretty(&plan).expect("plans serialise");
    if let Some(out) = &a.out
        && let Err(e) = std::fs::write(out, format!("{json}\n"))
    {
        eprintln!("error: writing {}: {e}", out.display());
        return ExitCode::from(EXIT_RUNTIME);
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", plan.table());
        println!(
            "\nchecked: {}",
            if violations.is_empty() {
                "every constraint holds".to_string()
            } else {
                format!("{} violations", violations.len())
            }
        );
    }
    if !violations.is_empty() {
        for v in &violations {
            eprintln!("plan check: {v}");
        }
        return ExitCode::from(EXIT_RUNTIME);
    }
    ExitCode::SUCCESS
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
    if matches!(cli.command, Command::Run { .. }) {
        // Long runs only (where it was measured); before any thread starts.
        crate::alloc::tune();
    }
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
        Command::Check { pipeline } => check(&pipeline),
        Command::Run {
            pipeline,
            duration,
            max_frames,
            summary_json,
            api,
            api_token_env,
            serve,
        } => {
            let api = match parse_api(&api, &api_token_env) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            run(pipeline, duration, max_frames, summary_json, api, serve)
        }
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
        Command::Plan(args) => plan_command(args),
        Command::Simulate(args) => simulate_command(args),
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

/// `poolpipe check`: one line per sink, `ok` or `FAILED: why`.
fn check(path: &std::path::Path) -> ExitCode {
    let p = match config::load_pipeline(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{}: {} problem(s)", path.display(), e.0.len());
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut failed = 0;
    for s in &p.sinks {
        match crate::sinks::check(s, &p.name) {
            Ok(()) => println!("sink {} ({}): ok", s.name, s.describe()),
            Err(e) => {
                failed += 1;
                println!("sink {} ({}): FAILED: {}", s.name, s.describe(), e.reason());
            }
        }
    }
    if failed > 0 {
        eprintln!(
            "{}: {failed} of {} sink(s) failed",
            path.display(),
            p.sinks.len()
        );
        ExitCode::from(EXIT_RUNTIME)
    } else {
        ExitCode::SUCCESS
    }
}

/// `--api` and its token: `None` for `off`.
fn parse_api(listen: &str, token_env: &str) -> Result<Option<crate::api::ApiOptions>, String> {
    if listen == "off" {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        format!("--api {listen}: expected HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464) or `off`")
    })?;
    let opts = crate::api::ApiOptions {
        listen: addr,
        token: std::env::var(token_env).ok().filter(|t| !t.is_empty()),
    };
    opts.check().map_err(|e| e.to_string())?;
    Ok(Some(opts))
}

fn run(
    path: PathBuf,
    duration: Option<f64>,
    max_frames: Option<u64>,
    summary_json: Option<PathBuf>,
    api: Option<crate::api::ApiOptions>,
    serve: bool,
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
        serve,
        api,
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
