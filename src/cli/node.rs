//! `poolpipe node`: serves the workers that a `[cluster]` pipeline places on this node, until
//! SIGINT/SIGTERM.

use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::CliError;
use crate::cluster::bus::Bus;
use crate::cluster::epoch::epoch_pipeline;
use crate::cluster::link::{self, NodeWorkers, Served};
use crate::config::Pipeline;
use crate::profile::Profiles;

/// How long a node keeps serving the workers an epoch dropped: the front switches routes only
/// once the nodes applied the epoch, and batches sent before still arrive.
const RETIRE_AFTER: Duration = Duration::from_secs(10);

/// What a node needs to follow epochs.
struct Following {
    node: String,
    /// The file's pipeline: what every epoch's layout is derived from.
    base: Pipeline,
    profiles: Arc<Profiles>,
    workers: Arc<NodeWorkers>,
    /// The last epoch applied (`u64::MAX`: none), said in every heartbeat.
    applied: Arc<AtomicU64>,
    log: Arc<std::sync::Mutex<Vec<u64>>>,
    /// What a node the file does not name offers in its heartbeats.
    offer: Option<crate::cluster::bus::Offer>,
}

/// Heartbeats, and a thread that applies each epoch: builds the workers it places on this node
/// that the node does not serve yet, and retires (after [`RETIRE_AFTER`]) those it no longer
/// places here.
fn follow(
    bus: &Arc<Bus>,
    f: Following,
    fence: Arc<link::Fence>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>, CliError> {
    let runtime = |e: &dyn std::fmt::Display| CliError::Runtime(e.to_string());
    let epochs = bus.epochs().map_err(|e| runtime(&e))?;
    bus.beat(
        &f.node,
        f.applied.clone(),
        stop.clone(),
        None,
        f.offer.clone(),
    );
    let bus = bus.clone();
    std::thread::Builder::new()
        .name("epochs".into())
        .spawn(move || {
            let mut keep = None;
            let mut polled = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let e = match epochs.recv_timeout(Duration::from_millis(200)) {
                    Ok(e) => Some(e),
                    Err(flume::RecvTimeoutError::Timeout) => None,
                    Err(flume::RecvTimeoutError::Disconnected) => return,
                };
                // The watch can lag behind after the connection to NATS came back: the current
                // epoch is also read once a second.
                let e = match e {
                    Some(e) => e,
                    None if polled.elapsed() >= Duration::from_secs(1) => {
                        polled = std::time::Instant::now();
                        fence.refresh(Duration::from_secs(1));
                        match bus.current() {
                            Ok(Some(e)) => e,
                            _ => continue,
                        }
                    }
                    None => {
                        // Workers whose grace ended go.
                        if let Some(k) = &keep {
                            f.workers.retire_others(k, RETIRE_AFTER);
                        }
                        continue;
                    }
                };
                let done = f.applied.load(Ordering::SeqCst);
                if done != u64::MAX && e.epoch <= done {
                    continue;
                }
                if let Some(mine) = apply(&f, &e) {
                    keep = Some(mine);
                }
            }
        })
        .map_err(|e| runtime(&e))
}

/// Applies epoch `e` on the node: the workers it serves from now on, or `None` where the epoch
/// could not be applied (logged; the node serves what it served).
fn apply(
    f: &Following,
    e: &crate::cluster::epoch::Epoch,
) -> Option<std::collections::HashSet<(String, usize)>> {
    let layout = match epoch_pipeline(&f.base, e, &f.profiles) {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(epoch = e.epoch, error = %err, "Epoch not applied.");
            return None;
        }
    };
    let new = match crate::pipeline::node_workers_but(&layout, &f.node, &|s, w| f.workers.has(s, w))
    {
        Ok(n) => n,
        Err(err) => {
            tracing::error!(epoch = e.epoch, error = %err, "Epoch not applied: an engine failed.");
            return None;
        }
    };
    let started = new.len();
    for (k, r) in new {
        f.workers.insert(k, r);
    }
    let mine: std::collections::HashSet<(String, usize)> = layout
        .stages
        .iter()
        .flat_map(|s| {
            s.nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| **n == f.node)
                .map(|(w, _)| (s.name.clone(), w))
        })
        .collect();
    let serving = f.workers.retire_others(&mine, RETIRE_AFTER);
    f.applied.store(e.epoch, Ordering::SeqCst);
    f.log
        .lock()
        .unwrap_or_else(|x| x.into_inner())
        .push(e.epoch);
    tracing::info!(
        node = %f.node,
        epoch = e.epoch,
        workers_started = started,
        serving = %serving.join(", "),
        "Plan epoch applied."
    );
    Some(mine)
}

/// Arguments of `poolpipe node`.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// Pipeline file (TOML) with a `[cluster]` section: the same file the front runs.
    pub pipeline: PathBuf,
    /// This node's name in `[cluster] nodes`, or a new name for a node that joins (`--gpus`).
    #[arg(long)]
    pub name: String,
    /// Listen here instead of on the node's address in `[cluster]` (e.g. `0.0.0.0:7070`).
    #[arg(long)]
    pub listen: Option<String>,
    /// Join a cluster whose file does not name this node, as a server with these GPUs
    /// (`CLASS:COUNT`, e.g. `T4:2`; a class the plan's latency profiles have). Needs
    /// `[cluster] nats`: the controller takes the node in at its next re-plan.
    #[arg(long, value_name = "CLASS:COUNT")]
    pub gpus: Option<String>,
    /// Where the front reaches a node that joins (`HOST:PORT`; default: --listen, unless that
    /// is an unspecified address such as 0.0.0.0).
    #[arg(long)]
    pub advertise: Option<String>,
    /// The link of a node that joins, Gbit/s each way (default: the pipeline's
    /// `bandwidth_gbps`).
    #[arg(long)]
    pub link_gbps: Option<f64>,
    /// Write what the node served as JSON to this file when it stops.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    #[command(flatten)]
    pub load: super::validate::LoadArgs,
}

/// Where the node listens, and, for a node the file does not name, what it offers to join
/// with. A named node is what the file says (no `--gpus`); an unnamed one needs `--gpus`, a
/// controller (`[cluster] nats`) and an address the front can reach.
fn own_address(
    a: &NodeArgs,
    cluster: &crate::config::ClusterSpec,
    p: &Pipeline,
) -> Result<(String, Option<crate::cluster::bus::Offer>), CliError> {
    let file = a.pipeline.display();
    let usage = |m: String| CliError::Usage(format!("{file}: {m}"));
    if a.name == cluster.front {
        return Err(usage(format!(
            "`{}` is the front: run `poolpipe run {file}` there",
            a.name
        )));
    }
    if let Some(own) = cluster.nodes.get(&a.name) {
        if a.gpus.is_some() {
            return Err(usage(format!(
                "node `{}` is in [cluster] nodes: its GPUs are the placement's, so --gpus is for a node the file does not name",
                a.name
            )));
        }
        return Ok((a.listen.clone().unwrap_or_else(|| own.clone()), None));
    }
    let named = cluster.nodes.keys().cloned().collect::<Vec<_>>().join(", ");
    let Some(gpus) = &a.gpus else {
        return Err(usage(format!(
            "no node `{}` in [cluster] nodes ({named}); to join as a new node, give --gpus CLASS:COUNT (and --advertise HOST:PORT)",
            a.name
        )));
    };
    if cluster.nats.is_none() {
        return Err(usage(format!(
            "node `{}` joins with --gpus, which needs a controller: [cluster] has no `nats`",
            a.name
        )));
    }
    let (class, count) = gpus
        .split_once(':')
        .and_then(|(c, n)| Some((c.trim(), n.trim().parse::<u32>().ok()?)))
        .filter(|(c, n)| !c.is_empty() && *n > 0)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "--gpus {gpus}: expected CLASS:COUNT with COUNT at least 1 (e.g. T4:2)"
            ))
        })?;
    let Some(listen) = &a.listen else {
        return Err(CliError::Usage(format!(
            "node `{}` is not in [cluster] nodes of {file}: give --listen HOST:PORT (and --advertise where the front reaches it)",
            a.name
        )));
    };
    let advertise = match &a.advertise {
        Some(x) => x.clone(),
        None => {
            let unspecified = listen
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.next())
                .is_some_and(|s| s.ip().is_unspecified());
            if unspecified {
                return Err(CliError::Usage(format!(
                    "--listen {listen} is no address the front can reach: give --advertise HOST:PORT"
                )));
            }
            listen.clone()
        }
    };
    if !advertise.contains(':') {
        return Err(CliError::Usage(format!(
            "--advertise {advertise}: expected HOST:PORT"
        )));
    }
    let link_gbps = a.link_gbps.unwrap_or(p.bandwidth_gbps);
    if !(link_gbps > 0.0 && link_gbps.is_finite()) {
        return Err(CliError::Usage(format!(
            "--link-gbps {link_gbps}: expected a positive rate"
        )));
    }
    Ok((
        listen.clone(),
        Some(crate::cluster::bus::Offer {
            address: advertise,
            class: class.to_string(),
            gpus: count,
            link_gbps,
        }),
    ))
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
    let (listen, offer) = own_address(&a, cluster, &p)?;
    let addr = listen
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| CliError::Usage(format!("--listen {listen}: not an address")))?;
    let runtime = |e: &dyn std::fmt::Display| CliError::Runtime(e.to_string());
    // With a controller, the current epoch's layout, if one was published; else the file's.
    let bus = match &cluster.nats {
        Some(url) => Some(Arc::new(
            Bus::connect(url, &p.name, crate::pipeline::NODE_WAIT).map_err(|e| runtime(&e))?,
        )),
        None => None,
    };
    let profiles = p.plan.as_ref().and_then(|r| r.profiles.clone());
    let current = match &bus {
        Some(b) => b.current().map_err(|e| runtime(&e))?,
        None => None,
    };
    let (layout, applied) = match (&current, &profiles) {
        (Some(e), Some(pr)) => (epoch_pipeline(&p, e, pr).map_err(|e| runtime(&e))?, e.epoch),
        _ => (p.clone(), u64::MAX),
    };
    let workers = crate::pipeline::node_workers(&layout, &a.name).map_err(|e| runtime(&e))?;
    if workers.is_empty() && bus.is_none() {
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
    let store = Arc::new(crate::cluster::handoff::Store::new(
        cluster.hold_bytes,
        cluster.hold_for,
    ));
    let workers = NodeWorkers::new(workers);
    let applied = Arc::new(AtomicU64::new(applied));
    let epochs_applied = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    // With a controller: epochs followed, and batches only from the front that holds the front
    // lease.
    let (follower, fence) = match (&bus, profiles) {
        (Some(bus), Some(profiles)) => {
            let fence = link::Fence::new(bus.clone(), cluster.fronts);
            let following = Following {
                node: a.name.clone(),
                base: p.clone(),
                profiles,
                workers: workers.clone(),
                applied: applied.clone(),
                log: epochs_applied.clone(),
                offer,
            };
            let t = follow(bus, following, fence.clone(), stop.clone())?;
            (Some(t), Some(fence))
        }
        (Some(_), None) => {
            return Err(CliError::Usage(format!(
                "{}: [cluster] nats needs a pipeline served by a plan (its epochs are plans)",
                a.pipeline.display()
            )));
        }
        _ => (None, None),
    };
    let flag = stop.clone();
    let stopped = async move {
        while !flag.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let limit = crate::cluster::message_limit(&p);
    let served_result = link::serve(
        link::Serving {
            node: &a.name,
            addr,
            workers,
            limit,
            served: served.clone(),
            fence,
            store: store.clone(),
        },
        stopped,
    );
    stop.store(true, Ordering::SeqCst);
    if let Some(t) = follower {
        let _ = t.join();
    }
    served_result.map_err(|e| runtime(&e))?;
    let summary = serde_json::json!({
        "node": a.name,
        "workers": names,
        "epochs_applied": *epochs_applied.lock().unwrap_or_else(|e| e.into_inner()),
        "batches": served.batches.load(Ordering::Relaxed),
        "frames": served.frames.load(Ordering::Relaxed),
        "failed_batches": served.failed.load(Ordering::Relaxed),
        "bytes_in": served.bytes_in.load(Ordering::Relaxed),
        "refused_batches": served.refused.load(Ordering::Relaxed),
        "handoff": store.counters.json(),
    });
    println!("{summary}");
    if let Some(path) = &a.summary_json {
        std::fs::write(path, format!("{summary:#}\n"))
            .map_err(|e| CliError::Runtime(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}
