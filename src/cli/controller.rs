//! `poolpipe controller`: owns the plan of a `[cluster]` pipeline with `nats`.
//!
//! It takes the controller lease (one controller acts; another waits and takes over when the
//! lease expires), publishes epoch 0 (the file's placed plan) if none was published, and then
//! watches the heartbeats: when the set of servers that are up changes (a node silent for
//! [`NODE_SILENT`], one that comes back, or one the file does not name that joins by offering
//! its GPUs: [`crate::cluster::members`]), it plans the file's problem again on the servers
//! that are up, places the plan on them, and publishes the next epoch. A re-plan that fails (no
//! server of a class the models need) is logged and tried again when the members change.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use super::CliError;
use crate::clock::unix_ms;
use crate::cluster::bus::{Bus, FrontCounters, Lease, LeaseKeeper, NODE_SILENT};
use crate::cluster::epoch::{Epoch, live_servers, name_routes, planned_flows, replan_on, shard};
use crate::cluster::members::{Heard, Members};

/// Arguments of `poolpipe controller`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// Pipeline file (TOML) with `[cluster] nats` and a placed plan: the file the nodes run.
    pub pipeline: PathBuf,
    /// Solver time limit of a re-plan, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub time_limit: f64,
    /// How long a node that was never heard from counts as up after the lease is taken,
    /// seconds (nodes start beside the controller).
    #[arg(long, default_value_t = 5.0)]
    pub startup_grace: f64,
    /// This controller's name in the lease (default: `controller-PID`).
    #[arg(long)]
    pub id: Option<String>,
    /// Write the epochs this controller published as JSON to this file when it stops.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    #[command(flatten)]
    pub load: super::validate::LoadArgs,
}

/// Runs the controller until SIGINT/SIGTERM.
pub fn run(a: ControllerArgs) -> Result<(), CliError> {
    let p = super::validate::load(&a.pipeline, &a.load, "; nothing was started")?;
    let usage = |m: String| CliError::Usage(format!("{}: {m}", a.pipeline.display()));
    let runtime = |e: &dyn std::fmt::Display| CliError::Runtime(e.to_string());
    let Some(cluster) = &p.cluster else {
        return Err(usage(
            "no [cluster] section: a controller owns the plan of a cluster".into(),
        ));
    };
    let Some(url) = &cluster.nats else {
        return Err(usage(
            "[cluster] has no `nats`: the controller publishes epochs over NATS".into(),
        ));
    };
    let Some(plan) = &p.plan else {
        return Err(usage(
            "no plan ([pipeline] plan): the controller re-plans a plan".into(),
        ));
    };
    let Some(profiles) = plan.profiles.clone() else {
        return Err(usage("the plan's latency profiles were not loaded".into()));
    };
    let Some(placement) = plan.plan.placement.clone() else {
        return Err(usage(
            "the plan has no placement (`poolpipe place --out` or `poolpipe deploy`)".into(),
        ));
    };
    let flows = planned_flows(&p).map_err(|e| usage(e.to_string()))?;
    // The cameras, by flow: split over the fronts where several share them.
    let cameras: Vec<(String, String)> = p
        .sources
        .iter()
        .filter_map(|s| Some((s.name.clone(), p.flows.get(p.flow_of(s)?)?.name.clone())))
        .collect();
    if cluster.fronts > 1
        && placement
            .processes
            .iter()
            .any(|x| placement.servers[x.server].name == cluster.front)
    {
        return Err(usage(format!(
            "[cluster] fronts = {}: the plan places processes on the front `{}`, and fronts that share the cameras run none (place them on the servers: `poolpipe deploy`)",
            cluster.fronts, cluster.front
        )));
    }
    let time_limit = Duration::from_secs_f64(a.time_limit.max(0.1));
    let me =
        a.id.clone()
            .unwrap_or_else(|| format!("controller-{}", std::process::id()));
    let bus =
        Arc::new(Bus::connect(url, &p.name, crate::pipeline::NODE_WAIT).map_err(|e| runtime(&e))?);
    let beats = bus.heartbeats().map_err(|e| runtime(&e))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    // Every node of the file, the front first; the servers among them can hold processes, and
    // so can nodes that join by offering theirs, in a class the plan's models have latencies for.
    let mut named: Vec<String> = vec![cluster.front.clone()];
    named.extend(cluster.nodes.keys().cloned());
    let classes: BTreeSet<String> = plan
        .plan
        .models
        .iter()
        .filter_map(|m| profiles.models.get(&m.name))
        .flat_map(|m| m.timing.keys().map(|(c, _)| c.clone()))
        .collect();
    let mut members = Members::new(named, &placement.servers, classes);
    tracing::info!(id = %me, nodes = %members.names().join(", "), "Controller waiting for the lease.");

    // Fronts by id: when last heard, and what they last said of their frames.
    let mut fronts: BTreeMap<String, (Instant, FrontCounters)> = BTreeMap::new();
    let mut fronts_gone: Vec<serde_json::Value> = Vec::new();
    // Renewed on a thread of its own while held.
    let mut lease: Option<LeaseKeeper> = None;
    let mut leader_since = Instant::now();
    let mut last_lease = Instant::now() - Duration::from_secs(10);
    let mut last_members = Instant::now() - Duration::from_secs(10);
    let mut current: Option<Epoch> = None;
    let mut failed_on: Option<BTreeSet<String>> = None;
    let mut published: Vec<serde_json::Value> = Vec::new();
    let mut leases: Vec<serde_json::Value> = Vec::new();
    let grace = Duration::from_secs_f64(a.startup_grace.max(0.0));
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
        let now = Instant::now();
        for hb in beats.try_iter() {
            if let Some(f) = hb.front.clone() {
                // A heartbeat sent before the last one may arrive after it: "stopping" stays.
                let stopping = f.stopping || fronts.get(&f.id).is_some_and(|x| x.1.stopping);
                fronts.insert(f.id.clone(), (now, FrontCounters { stopping, ..f }));
            }
            match members.hear(&hb, now) {
                Some(Heard::Joined(what)) => tracing::info!("Node offer: {what}."),
                Some(Heard::Refused(why)) => tracing::warn!("Node offer refused: {why}."),
                None => {}
            }
        }
        // A front that went silent without saying it stops took the frames it held with it.
        let silent: Vec<String> = fronts
            .iter()
            .filter(|(_, (at, _))| now - *at > NODE_SILENT)
            .map(|(id, _)| id.clone())
            .collect();
        for id in silent {
            let Some((_, c)) = fronts.remove(&id) else {
                continue;
            };
            if c.stopping {
                tracing::info!(front = %id, "Front stopped.");
            } else {
                tracing::warn!(front = %id, in_flight = c.in_flight(), "Front silent: the frames it held are lost unless it comes back.");
            }
            fronts_gone.push(json!({
                "id": id,
                "outcome": if c.stopping { "stopped" } else { "silent" },
                "ingested": c.ingested,
                "settled": c.settled,
                "in_flight": c.in_flight(),
                "at_unix_ms": unix_ms(),
            }));
        }
        if now - last_lease >= Duration::from_secs(1) {
            last_lease = now;
            if lease.as_ref().is_some_and(LeaseKeeper::lost) {
                lease = None;
                tracing::warn!(id = %me, "Controller lease lost; waiting to take it again.");
            }
            if lease.is_none()
                && let Some(rev) = bus.take_lease(Lease::Controller, &me)
            {
                lease = Some(
                    LeaseKeeper::keep(bus.clone(), Lease::Controller, me.clone(), rev, None)
                        .map_err(|e| runtime(&e))?,
                );
                leader_since = now;
                current = bus.current().map_err(|e| runtime(&e))?;
                if let Some(e) = &current {
                    members.recall(e);
                }
                leases.push(json!({
                    "taken_unix_ms": unix_ms(),
                    "found_epoch": current.as_ref().map(|e| e.epoch),
                }));
                tracing::info!(id = %me, epoch = ?current.as_ref().map(|e| e.epoch), "Controller lease taken.");
                if current.is_none() {
                    let routes = name_routes(&plan.plan, &flows, 0, None);
                    let e = Epoch {
                        epoch: 0,
                        members: members.names(),
                        reason: "the file's plan".into(),
                        shards: shard(&plan.plan, &routes, &cameras, cluster.fronts, None),
                        routes,
                        addresses: BTreeMap::new(),
                        plan: plan.plan.clone(),
                        plan_s: 0.0,
                        at_unix_ms: unix_ms(),
                    };
                    bus.publish(&e).map_err(|e| runtime(&e))?;
                    published.push(describe(&e, &[], &[]));
                    current = Some(e);
                }
            }
        }
        let Some(cur) = &current else { continue };
        if lease.is_none() {
            continue;
        }
        let grace_until = leader_since + grace;
        let up_now = members.live(now, grace_until);
        if now - last_members >= Duration::from_secs(1) {
            last_members = now;
            let view = members.view(now, grace_until);
            let front_view: serde_json::Map<String, serde_json::Value> = fronts
                .iter()
                .map(|(id, (at, c))| {
                    (
                        id.clone(),
                        json!({
                            "ingested": c.ingested,
                            "in_flight": c.in_flight(),
                            "last_heard_ms": (now - *at).as_millis() as u64,
                        }),
                    )
                })
                .collect();
            let _ = bus.publish_members(&json!({
                "controller": me,
                "epoch": cur.epoch,
                "nodes": view,
                "fronts": front_view,
            }));
        }
        let live: BTreeSet<String> = up_now
            .iter()
            .filter(|n| members.is_server(n))
            .cloned()
            .collect();
        let planned: BTreeSet<String> = cur
            .members
            .iter()
            .filter(|n| members.is_server(n))
            .cloned()
            .collect();
        if live == planned || failed_on.as_ref() == Some(&live) {
            continue;
        }
        let lost: Vec<String> = planned.difference(&live).cloned().collect();
        let back: Vec<String> = live.difference(&planned).cloned().collect();
        let reason = match (lost.is_empty(), back.is_empty()) {
            (false, true) => format!("lost {}", lost.join(", ")),
            (true, false) => format!("joined {}", back.join(", ")),
            _ => format!("lost {}; joined {}", lost.join(", "), back.join(", ")),
        };
        let servers = live_servers(&members.servers(), &up_now);
        let t0 = Instant::now();
        match replan_on(&plan.plan, &servers, &profiles, time_limit) {
            Ok(next) => {
                let n = cur.epoch + 1;
                let routes = name_routes(&next, &flows, n, Some(cur));
                let e = Epoch {
                    epoch: n,
                    members: up_now.clone(),
                    reason: reason.clone(),
                    shards: shard(&next, &routes, &cameras, cluster.fronts, Some(cur)),
                    routes,
                    addresses: members.addresses(&up_now),
                    plan: next,
                    plan_s: t0.elapsed().as_secs_f64(),
                    at_unix_ms: unix_ms(),
                };
                bus.publish(&e).map_err(|e| runtime(&e))?;
                tracing::info!(
                    epoch = n,
                    reason = %reason,
                    plan_s = format!("{:.2}", e.plan_s),
                    servers = servers.len(),
                    "Plan epoch published."
                );
                published.push(describe(&e, &lost, &back));
                failed_on = None;
                current = Some(e);
            }
            Err(err) => {
                tracing::error!(reason = %reason, error = %err, "Re-plan failed; the last epoch stays.");
                published.push(json!({"reason": reason, "error": err.to_string()}));
                failed_on = Some(live);
            }
        }
    }
    // Let go of, unless another controller took it.
    drop(lease);
    let summary = json!({
        "controller": me,
        "leases": leases,
        "epochs": published,
        "fronts_gone": fronts_gone,
        "refused_offers": members.refused(),
    });
    println!("{summary}");
    if let Some(path) = &a.summary_json {
        std::fs::write(path, format!("{summary:#}\n"))
            .map_err(|e| CliError::Runtime(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

/// One published epoch in the controller's summary.
fn describe(e: &Epoch, lost: &[String], joined: &[String]) -> serde_json::Value {
    let processes: u32 = e
        .plan
        .models
        .iter()
        .flat_map(|m| &m.pipelines)
        .flat_map(|p| &p.stages)
        .map(|s| s.processes)
        .sum();
    json!({
        "epoch": e.epoch,
        "reason": e.reason,
        "members": e.members,
        "lost": lost,
        "joined": joined,
        "plan_s": e.plan_s,
        "processes": processes,
        "planned_fps": e.plan.models.iter().map(|m| m.throughput).sum::<f64>(),
        "routes": e.routes.iter().map(|r| r.stages.clone()).collect::<Vec<_>>(),
        "at_unix_ms": e.at_unix_ms,
    })
}
