//! `poolpipe bench cluster`: the planner, placement and simulator at cluster scale. The PPipe
//! clusters (25 high-class + 75 low-class GPUs) and a 1,000-GPU one (250 + 750), each placed on
//! servers of 4 GPUs of one class: plan time, how much of the cut traffic crosses servers and the
//! busiest server link against its capacity, goodput at 99% attainment in the simulator, and the
//! simulator's speed (30 simulated seconds at the planned load). The simulator sends cuts over
//! each GPU's own link; the servers' shared network links are not simulated (their load is the
//! placement's figure).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::planner::{GROUPS, group_specs};
use crate::config::PolicyKind;
use crate::planner::placement::{self, Server};
use crate::planner::{self, Cluster, Options};
use crate::profile::Profiles;
use crate::sim::{self, Arrivals, SimOptions, SimSetup};

/// One cluster's figures.
#[derive(Debug, Serialize)]
pub struct Row {
    /// e.g. `L4:250,T4:750 at 10 Gbit/s`.
    pub cluster: String,
    /// GPUs.
    pub gpus: u32,
    /// Solver wall time, s.
    pub plan_s: f64,
    /// `optimal` or `time_limit`.
    pub status: String,
    /// Planned objective (min throughput / weight).
    pub planned: f64,
    /// Servers of 4 GPUs the plan was placed on.
    pub servers: usize,
    /// Share of cut frames that cross servers.
    pub crossing_share: f64,
    /// Busiest server link: load / capacity.
    pub busiest_link: f64,
    /// Weighted goodput at 99% attainment (simulated), frames/s.
    pub goodput_99: f64,
    /// Load (fraction of planned) at which 99% holds.
    pub load_99: f64,
    /// Simulator: wall seconds for 30 simulated seconds at load 1.
    pub sim_wall_s: f64,
    /// Simulator events per wall second.
    pub events_per_s: f64,
}

/// The clusters: (high class, low class, high GPUs, low GPUs, GPU link Gbit/s).
const CLUSTERS: [(&str, &str, u32, u32, f64); 3] = [
    ("L4", "T4", 25, 75, 10.0),
    ("V100", "P4", 25, 75, 6.0),
    ("L4", "T4", 250, 750, 10.0),
];

/// Servers of `per` GPUs of each class, one spare server per class for packing.
fn servers(cluster: &Cluster, per: u32, link_gbps: f64) -> Vec<Server> {
    let mut out = Vec::new();
    for c in &cluster.classes {
        for n in 0..c.count.div_ceil(per) + 1 {
            out.push(Server {
                name: format!("{}-{n}", c.name.to_lowercase()),
                class: c.name.clone(),
                gpus: per,
                link_gbps,
            });
        }
    }
    out
}

/// Runs the benchmark.
pub fn run(
    profiles_dir: &Path,
    time_limit: f64,
    server_gpus: u32,
    server_link_gbps: f64,
) -> anyhow::Result<Vec<Row>> {
    let profiles = Profiles::load_dir(profiles_dir, None)
        .with_context(|| format!("loading profiles from {}", profiles_dir.display()))?;
    let specs = group_specs(&profiles, &GROUPS[0], 5.0)?;
    let opts = SimOptions {
        policy: PolicyKind::Deadline,
        duration: 30.0,
        load: 1.0,
        arrivals: Arrivals::Poisson,
        seed: 1,
        margin: crate::clock::nanos(Duration::from_millis(2)),
        queue: None,
    };
    let mut rows = Vec::new();
    let mut bar = crate::progress::Progress::new("bench cluster", CLUSTERS.len());
    for (high, low, nh, nl, gbps) in CLUSTERS {
        let cluster = Cluster::parse_spec(&format!("{high}:{nh},{low}:{nl}"), gbps)?;
        let plan = planner::plan(
            &profiles,
            &cluster,
            &specs,
            &Options {
                time_limit: Duration::from_secs_f64(time_limit),
                ..Options::default()
            },
        )
        .with_context(|| cluster.describe())?;
        let srv = servers(&cluster, server_gpus, server_link_gbps);
        let placed = placement::place(&plan, &srv, &|m, after| profiles.cut_bytes(m, after))?;
        let busiest = placed
            .links
            .iter()
            .map(|l| l.out_gbps.max(l.in_gbps) / placed.servers[l.server].link_gbps)
            .fold(0.0, f64::max);
        let setup = SimSetup::from_plan(&plan, &profiles)?;
        let t = Instant::now();
        let full = sim::simulate(&setup, &opts);
        let wall = t.elapsed().as_secs_f64();
        let at99 = sim::find_load(
            &setup,
            &SimOptions {
                duration: 10.0,
                ..opts.clone()
            },
            0.99,
            0.0,
            1.0,
            5,
            |_| {},
        );
        bar.inc(&cluster.describe());
        rows.push(Row {
            cluster: cluster.describe(),
            gpus: nh + nl,
            plan_s: plan.solve_seconds,
            status: plan.status.clone(),
            planned: plan.objective,
            servers: srv.len(),
            crossing_share: placed.crossing_share,
            busiest_link: busiest,
            goodput_99: at99.weighted_goodput,
            load_99: at99.load,
            sim_wall_s: wall,
            events_per_s: full.events as f64 / wall,
        });
    }
    Ok(rows)
}

/// The rows as a table.
pub fn table(rows: &[Row], server_gpus: u32, link_gbps: f64) -> String {
    let mut s = format!(
        "models apcnet, atss, gcnet (weights 0.30/0.33/0.37, SLO 5x batch-1); servers of {server_gpus} GPUs on {link_gbps} Gbit/s links\n{:<28} {:>6} {:>8} {:>11} {:>8} {:>9} {:>9} {:>12} {:>8} {:>10} {:>11}\n",
        "cluster",
        "GPUs",
        "plan s",
        "status",
        "servers",
        "cross",
        "busiest",
        "goodput@99",
        "load",
        "sim 30 s",
        "events/s"
    );
    for r in rows {
        s += &format!(
            "{:<28} {:>6} {:>8.1} {:>11} {:>8} {:>8.1}% {:>8.2}x {:>12.1} {:>8.3} {:>9.2}s {:>10.2}M\n",
            r.cluster,
            r.gpus,
            r.plan_s,
            r.status,
            r.servers,
            r.crossing_share * 100.0,
            r.busiest_link,
            r.goodput_99,
            r.load_99,
            r.sim_wall_s,
            r.events_per_s / 1e6,
        );
    }
    s
}
