//! `poolpipe run`: a pipeline until its sources end, a limit is reached, or SIGINT/SIGTERM, with
//! the HTTP API on the running pipeline.

use std::path::PathBuf;
use std::time::Duration;

use super::CliError;
use crate::api::{ApiOptions, ApiServer};
use crate::pipeline::{self, RunOptions, Shutdown};

/// Arguments of `poolpipe run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Pipeline file (TOML).
    pub pipeline: PathBuf,
    /// Stop after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop after this many frames (all sources together).
    #[arg(long)]
    pub max_frames: Option<u64>,
    /// Write the final counters as JSON to this file.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// Where the HTTP API and `/metrics` listen (`HOST:PORT`; port 0 picks a free one), or
    /// `off`. Any address but loopback needs a bearer token (see --api-token-env).
    #[arg(long, default_value = super::DEFAULT_API)]
    pub api: String,
    /// Environment variable holding the API's bearer token.
    #[arg(long, default_value = "POOLPIPE_API_TOKEN")]
    pub api_token_env: String,
    /// Keep running when every source has ended (streams come and go through the API).
    #[arg(long)]
    pub serve: bool,
    /// Print the dashboard's URL prominently, and open it in a browser when stdout is a terminal
    /// and one is available (`xdg-open`, `$BROWSER`).
    #[arg(long)]
    pub open: bool,
    #[command(flatten)]
    pub load: super::validate::LoadArgs,
    /// Re-planning while running (a pipeline served by a plan).
    #[command(flatten)]
    pub ctl: super::simulate::ControlArgs,
}

/// Runs the pipeline; the exit is an error when it could not start, a thread panicked, the
/// summary could not be written, or the accounting does not balance.
pub fn run(a: RunArgs) -> Result<(), CliError> {
    let api = parse_api(&a.api, &a.api_token_env).map_err(CliError::Usage)?;
    let control = if a.ctl.control {
        Some(a.ctl.settings()?)
    } else {
        None
    };
    let path = a.pipeline;
    let p = super::validate::load(&path, &a.load, "; nothing was started")?;
    if control.is_some() && p.plan.is_none() {
        return Err(CliError::Usage(format!(
            "--control re-plans a pipeline served by a plan, and {} has none: give --plan PLAN.json or [pipeline] plan",
            path.display()
        )));
    }
    let shutdown = Shutdown::new();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while draining exits at once.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, shutdown.flag());
        let _ = signal_hook::flag::register(sig, shutdown.flag());
    }
    let opts = RunOptions {
        duration: a.duration.map(Duration::from_secs_f64),
        max_frames: a.max_frames,
        progress: true,
        serve: a.serve,
        control,
        stop: Some(shutdown.clone()),
    };
    tracing::info!(pipeline = %p.name, file = %path.display(), "Starting pipeline.");
    let running = match pipeline::start(&p, &opts) {
        Ok(r) => r,
        // A standby front stopped before it took the cameras over: nothing ran, nothing to say.
        Err(pipeline::PipelineError::StoppedAsStandby) => {
            tracing::info!("Stopped as a standby front; no frames ran here.");
            return Ok(());
        }
        Err(e) => return Err(CliError::Runtime(e.to_string())),
    };
    // The API listens before any source starts, so a taken port fails the start.
    let server: Option<ApiServer> = match &api {
        Some(o) => Some(
            crate::api::serve(o, running.live().clone())
                .map_err(|e| CliError::Runtime(e.to_string()))?,
        ),
        None => None,
    };
    if a.open {
        match &server {
            Some(s) => open_dashboard(s.addr),
            None => eprintln!("--open: the API is off (--api off), so there is no dashboard"),
        }
    }
    let summary = running.wait(&shutdown);
    if let Some(server) = server {
        server.stop();
    }
    let summary = summary.map_err(|e| CliError::Runtime(e.to_string()))?;
    eprintln!("{}", summary.table());
    if let Some(out) = a.summary_json {
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
        std::fs::write(&out, text)
            .map_err(|e| CliError::Runtime(format!("cannot write {}: {e}", out.display())))?;
    }
    if !summary.panics.is_empty() {
        let what: Vec<String> = summary.panics.iter().map(ToString::to_string).collect();
        return Err(CliError::Runtime(what.join("; ")));
    }
    if summary
        .front_lease
        .as_ref()
        .is_some_and(|l| l["lost"] == true)
    {
        return Err(CliError::Runtime(
            "another front took the cameras over (this one was stalled or cut off from NATS for longer than the front lease lives): stopped".into(),
        ));
    }
    if !summary.balanced() {
        return Err(CliError::Runtime(
            "frame accounting does not balance (a bug): see the table above".into(),
        ));
    }
    Ok(())
}

/// `--api` and its token: `None` for `off`.
fn parse_api(listen: &str, token_env: &str) -> Result<Option<ApiOptions>, String> {
    if listen == "off" {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = listen.parse().map_err(|_| {
        format!("--api {listen}: expected HOST:PORT (e.g. 127.0.0.1:9464, [::1]:9464) or `off`")
    })?;
    let opts = ApiOptions {
        listen: addr,
        token: std::env::var(token_env).ok().filter(|t| !t.is_empty()),
    };
    opts.check().map_err(|e| e.to_string())?;
    Ok(Some(opts))
}

/// Prints the dashboard's URL where it cannot be missed, and asks the desktop to open it when
/// stdout is a terminal (a run under a service manager or a test opens nothing).
fn open_dashboard(addr: std::net::SocketAddr) {
    use std::io::IsTerminal;
    // An unspecified bind address is reachable on loopback from this machine.
    let host = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port())
    } else {
        addr
    };
    let url = format!("http://{host}/");
    let rule = "=".repeat(url.len() + 12);
    eprintln!("\n{rule}\n  dashboard: {url}\n{rule}\n");
    println!("dashboard: {url}");
    if !std::io::stdout().is_terminal() {
        return;
    }
    let browser = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| "xdg-open".to_string());
    let opened = std::process::Command::new(&browser)
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if let Err(e) = opened {
        tracing::info!(browser = %browser, error = %e, "No browser opened; open the dashboard's URL by hand.");
    }
}
