//! `poolpipe place`: which server runs each process of a plan, and what crosses the network.

use std::path::PathBuf;

use super::CliError;
use crate::planner::placement::{self, Placement};

/// Arguments of `poolpipe place`.
#[derive(Debug, clap::Args)]
pub struct PlaceArgs {
    /// The plan (`poolpipe plan --out`).
    #[arg(long)]
    pub plan: PathBuf,
    /// The servers: a TOML file of `[[servers]]` (name, class, count, gpus, link_gbps); see
    /// configs/servers-*.toml.
    #[arg(long)]
    pub servers: PathBuf,
    /// Folder of latency profiles (cut-bytes/ gives the traffic).
    #[arg(long, env = "POOLPIPE_PROFILES", default_value = "engines/profiles")]
    pub profiles: PathBuf,
    /// Write the plan with its placement here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the placement as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Places the plan, prints it, and writes it into the plan file given by `--out`.
pub fn run(a: &PlaceArgs) -> Result<(), CliError> {
    let mut plan =
        crate::planner::Plan::load(&a.plan).map_err(|e| CliError::Usage(e.to_string()))?;
    let servers =
        placement::load_servers(&a.servers).map_err(|e| CliError::Usage(e.to_string()))?;
    let names: Vec<&str> = plan.models.iter().map(|m| m.name.as_str()).collect();
    let profiles = crate::profile::Profiles::load_dir(&a.profiles, Some(&names))
        .map_err(|e| CliError::Usage(format!("profiles: {e}")))?;
    let placed = placement::place(&plan, &servers, &|m, after| profiles.cut_bytes(m, after))
        .map_err(|e| CliError::Usage(format!("{}: {e}", a.plan.display())))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&placed).map_err(|e| CliError::Runtime(e.to_string()))?
        );
    } else {
        print!("{}", table(&placed));
    }
    for (server, ratio) in placed.overloaded() {
        eprintln!(
            "warning: the plan's cuts need {ratio:.2}x the link of server {server}: its frames will queue at its sources; keep the pipelines that cross on servers with faster links, or plan for them"
        );
    }
    if let Some(out) = &a.out {
        plan.placement = Some(placed);
        let text =
            serde_json::to_string_pretty(&plan).map_err(|e| CliError::Runtime(e.to_string()))?;
        std::fs::write(out, text + "\n")
            .map_err(|e| CliError::Runtime(format!("{}: {e}", out.display())))?;
        eprintln!("wrote the placed plan to {}", out.display());
    }
    Ok(())
}

/// One line per server.
fn table(p: &Placement) -> String {
    let used = p.gpus_used();
    let mut procs = vec![0usize; p.servers.len()];
    for x in &p.processes {
        procs[x.server] += 1;
    }
    let mut s = format!(
        "{:<14} {:<6} {:>9} {:>9} {:>13} {:>13} {:>10}\n",
        "server", "class", "gpus used", "processes", "out Gbit/s", "in Gbit/s", "link"
    );
    for (i, srv) in p.servers.iter().enumerate() {
        let link = p.links.iter().find(|l| l.server == i);
        s += &format!(
            "{:<14} {:<6} {:>4} of {:<2} {:>9} {:>13.3} {:>13.3} {:>10}\n",
            srv.name,
            srv.class,
            used[i],
            srv.gpus,
            procs[i],
            link.map_or(0.0, |l| l.out_gbps),
            link.map_or(0.0, |l| l.in_gbps),
            srv.link_gbps,
        );
    }
    s += &format!(
        "{} processes on {} of {} servers; {:.1}% of the cut frames cross servers\n",
        p.processes.len(),
        used.iter().filter(|&&u| u > 0).count(),
        p.servers.len(),
        p.crossing_share * 100.0
    );
    s
}
