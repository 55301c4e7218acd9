//! `poolpipe node`: serves the workers that a `[cluster]` pipeline places on this node, until
//! SIGINT/SIGTERM.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::CliError;
use crate::cluster::link::{self, Served};

/// Arguments of `poolpipe node`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Pipeline file (TOML) with a `[cluster]` section: the same file the front runs.
    pub pipeline: PathBuf,
    /// This node's name in `[cluster] nodes`.
    #[arg(long)]
    pub name: String,
    /// Listen here instead of on the node's address in `[cluster]` (e.g. `0.0.0.0:7070`).
    #[arg(long)]
    pub listen: Option<String>,
    /// Write what the node served as JSON to this file when it stops.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    #[command(flatten)]
    pub load: super::validate::LoadArgs,
}

/// Serves the node's workers until a signal.
pub fn run(a: NodeArgs) -> Result<(), CliError> {
    let p = super::validate::load(&a.pipeline, &a.load, "; nothing was started")?;
    let Some(cluster) = &p.cluster else {
        return Err(CliError::Usage(format!(
            "{} has no [cluster] section: there is nothing for a node to serve",
            a.pipeline.display()
        )));
    };
    let Some(own) = cluster.nodes.get(&a.name) else {
        let hint = if a.name == cluster.front {
            format!(
                "`{}` is the front: run `poolpipe run {}` there",
                a.name,
                a.pipeline.display()
            )
        } else {
            format!(
                "nodes: {}",
                cluster.nodes.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        return Err(CliError::Usage(format!(
            "no node `{}` in the [cluster] of {} ({hint})",
            a.name,
            a.pipeline.display()
        )));
    };
    let listen = a.listen.clone().unwrap_or_else(|| own.clone());
    let addr = listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| CliError::Usage(format!("--listen {listen}: not an address")))?;
    let workers =
        crate::pipeline::node_workers(&p, &a.name).map_err(|e| CliError::Runtime(e.to_string()))?;
    if workers.is_empty() {
        return Err(CliError::Usage(format!(
            "no stage of {} places a worker on node `{}` (stage key `nodes`)",
            a.pipeline.display(),
            a.name
        )));
    }
    let names: Vec<String> = workers.keys().map(|(s, w)| format!("{s}[{w}]")).collect();
    tracing::info!(node = %a.name, workers = %names.join(", "), "Starting node.");
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    let served = Arc::new(Served::default());
    let flag = stop.clone();
    let stopped = async move {
        while !flag.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let limit = crate::cluster::message_limit(&p);
    link::serve(&a.name, addr, workers, limit, served.clone(), stopped)
        .map_err(|e| CliError::Runtime(e.to_string()))?;
    let summary = serde_json::json!({
        "node": a.name,
        "workers": names,
        "batches": served.batches.load(Ordering::Relaxed),
        "frames": served.frames.load(Ordering::Relaxed),
        "failed_batches": served.failed.load(Ordering::Relaxed),
        "bytes_in": served.bytes_in.load(Ordering::Relaxed),
    });
    println!("{summary}");
    if let Some(path) = &a.summary_json {
        std::fs::write(path, format!("{summary:#}\n"))
            .map_err(|e| CliError::Runtime(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}
