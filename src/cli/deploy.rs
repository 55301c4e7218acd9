//! `poolpipe deploy`: a placed plan as Kubernetes manifests, or as the pipeline file and plan
//! every node of a bare-metal cluster loads.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::CliError;
use crate::cluster::deploy::{self, NODE_PORT, Target};
use crate::planner::placement;

/// What `deploy` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Emit {
    /// Kubernetes manifests (StatefulSets of nodes, the front's Deployment, Services, the
    /// ConfigMap with the pipeline and plan).
    K8s,
    /// The pipeline file and plan for nodes reached at `SERVER:7070` (bare metal).
    Nodes,
}

/// Arguments of `poolpipe deploy`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The plan (`poolpipe plan --out`), placed (`poolpipe place --out`) unless --servers is given.
    #[arg(long)]
    pub plan: PathBuf,
    /// The pipeline file whose flows the plan serves.
    #[arg(long)]
    pub pipeline: PathBuf,
    /// Place the plan on these servers first (configs/servers-*.toml).
    #[arg(long)]
    pub servers: Option<PathBuf>,
    /// What to write.
    #[arg(long, value_enum, default_value = "k8s")]
    pub emit: Emit,
    /// The folder to write into.
    pub out: PathBuf,
    /// Container image with poolpipe on its PATH and what the pipeline reads (engines, profiles).
    #[arg(long, default_value = "poolpipe:latest")]
    pub image: String,
    /// Kubernetes namespace of every object.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Node label `nvidia.com/gpu.product` of a device class, `CLASS=LABEL` (repeatable).
    #[arg(long, value_parser = parse_pair)]
    pub product: Vec<(String, String)>,
    /// `--emit nodes`: where a node is reached, `NODE=HOST:PORT` (repeatable; default
    /// `NODE:7070`).
    #[arg(long, value_parser = parse_pair)]
    pub address: Vec<(String, String)>,
    /// A controller owns the plan: `[cluster] nats` is this URL (`--emit k8s`: default
    /// `nats://poolpipe-nats:4222`, and the manifests gain the NATS server and the controller).
    #[arg(long)]
    pub nats: Option<String>,
    /// `--emit k8s`: add a NATS server and `poolpipe controller` (re-plans when a node is lost
    /// or returns).
    #[arg(long)]
    pub controller: bool,
    /// `--controller`: the NATS server's image.
    #[arg(long, default_value = "nats:2.10-alpine")]
    pub nats_image: String,
    /// `--emit k8s --controller`: a Deployment of PODS nodes the file does not name, each with
    /// GPUS GPUs of CLASS, that join the cluster by offering them (`CLASS:GPUS=PODS`, e.g.
    /// `T4:1=2`; repeatable). Scale it to add or remove servers; the controller re-plans.
    #[arg(long, value_parser = deploy::JoinPool::parse, value_name = "CLASS:GPUS=PODS")]
    pub join: Vec<deploy::JoinPool>,
    /// With a controller: this many fronts share the cameras at once (`[cluster] fronts`);
    /// `--emit k8s` runs one front more, standing by.
    #[arg(long, default_value_t = 1)]
    pub fronts: u32,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| format!("`{s}`: expected NAME=VALUE"))
}

/// Writes the deployment.
pub fn run(a: &DeployArgs) -> Result<(), CliError> {
    let usage = |e: String| CliError::Usage(e);
    let mut plan = crate::planner::Plan::load(&a.plan).map_err(|e| usage(e.to_string()))?;
    if let Some(s) = &a.servers {
        let servers = placement::load_servers(s).map_err(|e| usage(e.to_string()))?;
        let placed = placement::place(&plan, &servers, &|_, _| None)
            .map_err(|e| usage(format!("{}: {e}", a.plan.display())))?;
        plan.placement = Some(placed);
    }
    let (plan, mut used) = deploy::nodes_of(&plan).map_err(|e| usage(e.to_string()))?;
    let text = std::fs::read_to_string(&a.pipeline)
        .map_err(|e| usage(format!("{}: {e}", a.pipeline.display())))?;
    let address: Box<dyn Fn(&str) -> String> = match a.emit {
        Emit::K8s => Box::new(|n: &str| format!("poolpipe-{n}.poolpipe-nodes:{NODE_PORT}")),
        Emit::Nodes => {
            let given: BTreeMap<String, String> = a.address.iter().cloned().collect();
            Box::new(move |n: &str| {
                given
                    .get(n)
                    .cloned()
                    .unwrap_or_else(|| format!("{n}:{NODE_PORT}"))
            })
        }
    };
    let joins_through_controller = a.controller && a.emit == Emit::K8s;
    if !a.join.is_empty() && !joins_through_controller {
        return Err(usage(
            "--join adds nodes that join through the controller: it needs --emit k8s --controller"
                .into(),
        ));
    }
    let nats = match (a.emit, &a.nats, a.controller) {
        (_, Some(url), _) => Some(url.clone()),
        (Emit::K8s, None, true) => Some(deploy::NATS_URL.to_string()),
        (Emit::Nodes, None, true) => {
            return Err(usage(
                "--controller with --emit nodes: give the NATS server the nodes reach (--nats nats://HOST:4222)".into(),
            ));
        }
        _ => None,
    };
    // With a controller every server is a node, those the plan leaves idle too: when a server
    // is lost, the controller re-plans on the ones that remain, spares among them.
    if nats.is_some()
        && let Some(p) = &plan.placement
    {
        used = (0..p.servers.len()).collect();
    }
    if a.fronts == 0 || (a.fronts > 1 && nats.is_none()) {
        return Err(usage(format!(
            "--fronts {}: 1 front, or several that share the cameras through a controller (--controller or --nats)",
            a.fronts
        )));
    }
    let pipeline = deploy::pipeline_file(&text, &plan, &used, &*address, nats.as_deref(), a.fronts)
        .map_err(|e| usage(format!("{}: {e}", a.pipeline.display())))?;
    std::fs::create_dir_all(&a.out)
        .map_err(|e| CliError::Runtime(format!("{}: {e}", a.out.display())))?;
    let write = |name: &str, body: &str| {
        let p = a.out.join(name);
        std::fs::write(&p, body).map_err(|e| CliError::Runtime(format!("{}: {e}", p.display())))
    };
    let nodes: Vec<&str> = used
        .iter()
        .filter_map(|&s| plan.placement.as_ref().map(|p| p.servers[s].name.as_str()))
        .collect();
    match a.emit {
        Emit::K8s => {
            let target = Target {
                image: a.image.clone(),
                namespace: a.namespace.clone(),
                products: a.product.iter().cloned().collect::<BTreeMap<_, _>>(),
                controller: a.controller,
                nats_image: a.nats_image.clone(),
                join: a.join.clone(),
                fronts: a.fronts,
            };
            let objects = deploy::k8s(&plan, &used, &pipeline, &target);
            for (name, obj) in &objects {
                write(name, &deploy::yaml(obj))?;
            }
            println!(
                "wrote {} manifests to {} ({} nodes: {}); create the API token first: kubectl create secret generic poolpipe-api --from-literal=token=...",
                objects.len(),
                a.out.display(),
                nodes.len(),
                nodes.join(", ")
            );
        }
        Emit::Nodes => {
            write("pipeline.toml", &pipeline)?;
            let plan_text = serde_json::to_string_pretty(&plan)
                .map_err(|e| CliError::Runtime(e.to_string()))?;
            write("plan.json", &(plan_text + "\n"))?;
            let control = if nats.is_some() {
                "; with a controller, run `poolpipe controller pipeline.toml` (two, for a standby), and `poolpipe run` on a second machine too: it stands by and takes the cameras over if the front is lost"
            } else {
                ""
            };
            println!(
                "wrote pipeline.toml and plan.json to {}: copy both to every machine; on each server run `poolpipe node pipeline.toml --name NAME` ({}), then `poolpipe run pipeline.toml` on the front{control}",
                a.out.display(),
                nodes.join(", ")
            );
        }
    }
    Ok(())
}
