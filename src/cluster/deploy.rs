//! What a placed plan needs to run on many machines: the pipeline file every node loads (with
//! its `[cluster]` naming the nodes), the plan, and, for Kubernetes, the manifests.
//!
//! Each server of the placement is a node. On Kubernetes the servers of one kind (`l4-0`,
//! `l4-1`, ...) are the pods of one StatefulSet (`poolpipe-l4-0`, ...), each with the server's
//! GPUs (`nvidia.com/gpu`), scheduled on machines of the server's GPU product, reached through a
//! headless Service at a stable name; the front is a Deployment of one pod with the HTTP API.
//! Bare metal gets the same pipeline file, the nodes reached at `SERVER:7070`.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::planner::Plan;
use crate::planner::placement::Placement;

/// The port nodes serve their workers on.
pub const NODE_PORT: u16 = 7070;
/// The port of the front's HTTP API.
pub const API_PORT: u16 = 8080;
/// The front's node name.
pub const FRONT: &str = "front";

/// Why a deployment cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The pipeline file is not TOML.
    #[error("{0}")]
    Pipeline(String),
    /// The plan has no placement.
    #[error(
        "the plan has no placement: give --servers, or place it first (poolpipe place --plan P --servers S --out P)"
    )]
    NotPlaced,
}

/// Where the manifests say the pods are.
#[derive(Debug, Clone)]
pub struct Target {
    /// Container image with `poolpipe` on its PATH and what the pipeline needs (engines, profiles).
    pub image: String,
    /// Kubernetes namespace of every object, if any.
    pub namespace: Option<String>,
    /// Node label value of `nvidia.com/gpu.product` per device class, beyond [`gpu_product`]'s.
    pub products: BTreeMap<String, String>,
    /// Add a NATS server and `poolpipe controller` (the pipeline's `[cluster] nats` points at
    /// [`NATS_URL`]).
    pub controller: bool,
    /// The NATS server's image.
    pub nats_image: String,
    /// Pools of nodes that join by offering their GPUs (with a controller): per pool the class,
    /// GPUs per pod and pods.
    pub join: Vec<JoinPool>,
    /// Fronts that share the cameras at once (with a controller; one more stands by).
    pub fronts: u32,
}

/// A Deployment of nodes the pipeline file does not name: each pod joins the cluster with
/// `poolpipe node --gpus CLASS:GPUS`, and scaling the Deployment adds or removes servers (the
/// controller re-plans on each change).
#[derive(Debug, Clone, PartialEq)]
pub struct JoinPool {
    /// Device class of the pods' GPUs.
    pub class: String,
    /// GPUs per pod.
    pub gpus: u32,
    /// Pods to start with.
    pub replicas: u32,
}

impl JoinPool {
    /// Parses `CLASS:GPUS=PODS` (e.g. `T4:1=2`).
    pub fn parse(s: &str) -> Result<JoinPool, String> {
        let bad = || format!("`{s}`: expected CLASS:GPUS=PODS (e.g. T4:1=2)");
        let (left, pods) = s.split_once('=').ok_or_else(bad)?;
        let (class, gpus) = left.split_once(':').ok_or_else(bad)?;
        let gpus: u32 = gpus.trim().parse().map_err(|_| bad())?;
        let replicas: u32 = pods.trim().parse().map_err(|_| bad())?;
        let class = class.trim();
        let name_ok =
            !class.is_empty() && class.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !name_ok || gpus == 0 {
            return Err(bad());
        }
        Ok(JoinPool {
            class: class.to_string(),
            gpus,
            replicas,
        })
    }
}

/// Where the manifests' NATS server is reached.
pub const NATS_URL: &str = "nats://poolpipe-nats:4222";

/// The `nvidia.com/gpu.product` label (NVIDIA GPU feature discovery) of a device class.
pub fn gpu_product(class: &str) -> String {
    match class {
        "T4" => "Tesla-T4".into(),
        "P4" => "Tesla-P4".into(),
        "V100" => "Tesla-V100-SXM2-16GB".into(),
        "A100" => "NVIDIA-A100-SXM4-80GB".into(),
        "L4" | "H100" | "H200" | "A10" | "L40S" => format!("NVIDIA-{class}"),
        other => other.to_string(),
    }
}

/// Server `name` split into its kind and ordinal (`l4-3` -> `l4`, 3; `edge` -> `edge`, 0).
fn kind_and_ordinal(name: &str) -> (String, u32) {
    match name.rsplit_once('-') {
        Some((k, n)) if !k.is_empty() => match n.parse() {
            Ok(i) => (k.to_string(), i),
            Err(_) => (name.to_string(), 0),
        },
        _ => (name.to_string(), 0),
    }
}

/// The node name of a server: `KIND-ORDINAL`, as its pod is named after it.
fn node_name(server: &str) -> String {
    let (k, i) = kind_and_ordinal(server);
    format!("{k}-{i}")
}

/// The plan with its servers named as nodes, and the servers that run processes.
pub fn nodes_of(plan: &Plan) -> Result<(Plan, Vec<usize>), DeployError> {
    let placed: &Placement = plan.placement.as_ref().ok_or(DeployError::NotPlaced)?;
    let mut plan = plan.clone();
    let mut used: Vec<usize> = placed.processes.iter().map(|p| p.server).collect();
    used.sort_unstable();
    used.dedup();
    if let Some(p) = plan.placement.as_mut() {
        for s in &mut p.servers {
            s.name = node_name(&s.name);
        }
    }
    Ok((plan, used))
}

/// The pipeline file every node loads: `text` with `[pipeline] plan = "plan.json"` and a
/// `[cluster]` whose nodes are the used servers at `address(node)`, with a controller's NATS
/// server and the fronts that share the cameras, if given.
pub fn pipeline_file(
    text: &str,
    plan: &Plan,
    used: &[usize],
    address: &dyn Fn(&str) -> String,
    nats: Option<&str>,
    fronts: u32,
) -> Result<String, DeployError> {
    let mut doc: toml::Table =
        toml::from_str(text).map_err(|e| DeployError::Pipeline(e.to_string()))?;
    let placed = plan.placement.as_ref().ok_or(DeployError::NotPlaced)?;
    let pipeline = doc
        .entry("pipeline")
        .or_insert_with(|| toml::Value::Table(Default::default()));
    if let toml::Value::Table(t) = pipeline {
        t.insert("plan".into(), toml::Value::String("plan.json".into()));
    }
    let mut nodes = toml::Table::new();
    for &s in used {
        let n = &placed.servers[s].name;
        nodes.insert(n.clone(), toml::Value::String(address(n)));
    }
    let mut cluster = toml::Table::new();
    cluster.insert("front".into(), toml::Value::String(FRONT.into()));
    cluster.insert("nodes".into(), toml::Value::Table(nodes));
    if let Some(url) = nats {
        cluster.insert("nats".into(), toml::Value::String(url.into()));
    }
    if fronts > 1 {
        cluster.insert("fronts".into(), toml::Value::Integer(fronts.into()));
    }
    doc.insert("cluster".into(), toml::Value::Table(cluster));
    let body = toml::to_string(&doc).map_err(|e| DeployError::Pipeline(e.to_string()))?;
    Ok(format!(
        "# Written by `poolpipe deploy`: the pipeline every node loads, its nodes those of the plan's placement.\n{body}"
    ))
}

fn meta(name: &str, component: &str, t: &Target) -> Value {
    let mut m = json!({
        "name": name,
        "labels": {"app.kubernetes.io/name": "poolpipe", "app.kubernetes.io/component": component},
    });
    if let Some(ns) = &t.namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// Tolerations that move a dead machine's pods after 10 s instead of the default 300 s.
fn tolerations(gpu: bool) -> Value {
    let mut v: Vec<Value> = [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ]
    .iter()
    .map(
        |k| json!({"key": k, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10}),
    )
    .collect();
    if gpu {
        v.push(json!({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}));
    }
    Value::Array(v)
}

fn config_volume() -> (Value, Value) {
    (
        json!([{"name": "config", "configMap": {"name": "poolpipe-config"}}]),
        json!([{"name": "config", "mountPath": "/etc/poolpipe", "readOnly": true}]),
    )
}

/// The Kubernetes objects of a placed plan, one `(file name, object)` each: the ConfigMap with
/// the pipeline and plan, a StatefulSet per server kind, the nodes' headless Service, the front's
/// Deployment and Service.
pub fn k8s(plan: &Plan, used: &[usize], pipeline: &str, t: &Target) -> Vec<(String, Value)> {
    let placed = plan
        .placement
        .as_ref()
        .expect("nodes_of checked the placement");
    let mut out = Vec::new();
    let plan_json = serde_json::to_string_pretty(plan).expect("plans serialise");
    out.push((
        "configmap.yaml".into(),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta("poolpipe-config", "config", t),
            "data": {"pipeline.toml": pipeline, "plan.json": plan_json},
        }),
    ));
    // Servers of one kind: one StatefulSet, as many pods as the highest ordinal used.
    let mut kinds: BTreeMap<String, (String, u32, u32, u32)> = BTreeMap::new();
    for &s in used {
        let server = &placed.servers[s];
        let (kind, ordinal) = kind_and_ordinal(&server.name);
        let share = placed
            .processes
            .iter()
            .filter(|p| p.server == s)
            .map(|p| {
                plan.models[p.model].pipelines[p.pipeline].stages[p.stage]
                    .share
                    .max(1)
            })
            .max()
            .unwrap_or(1);
        let e = kinds
            .entry(kind)
            .or_insert((server.class.clone(), 0, server.gpus, 1));
        e.1 = e.1.max(ordinal + 1);
        e.3 = e.3.max(share);
    }
    for (kind, (class, replicas, gpus, share)) in &kinds {
        let name = format!("poolpipe-{kind}");
        let mut labels = json!({"app.kubernetes.io/name": "poolpipe", "app.kubernetes.io/component": "node", "poolpipe.io/kind": kind});
        let mut m = meta(&name, "node", t);
        m["labels"] = labels.clone();
        // Several processes of a plan on one GPU (share > 1) are workers of this one pod; they
        // share the GPU's CUDA context without MPS or time-slicing.
        m["annotations"] =
            json!({"poolpipe.io/class": class, "poolpipe.io/max-share": share.to_string()});
        out.push((
            format!("node-{kind}.yaml"),
            json!({
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": m,
                "spec": {
                    "serviceName": "poolpipe-nodes",
                    "replicas": replicas,
                    "podManagementPolicy": "Parallel",
                    "selector": {"matchLabels": labels.clone()},
                    "template": node_pod(t, labels.take(), class, *gpus, format!(
                        "exec poolpipe node /etc/poolpipe/pipeline.toml --name \"${{POD_NAME#poolpipe-}}\" --listen 0.0.0.0:{NODE_PORT}"
                    )),
                }
            }),
        ));
    }
    out.push((
        "service-nodes.yaml".into(),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("poolpipe-nodes", "node", t),
            "spec": {
                "clusterIP": "None",
                "selector": {"app.kubernetes.io/name": "poolpipe", "app.kubernetes.io/component": "node"},
                "ports": [{"name": "link", "port": NODE_PORT, "targetPort": "link"}],
            }
        }),
    ));
    let (volumes, mounts) = config_volume();
    let front_labels =
        json!({"app.kubernetes.io/name": "poolpipe", "app.kubernetes.io/component": "front"});
    let mut front = json!({
        "name": "front",
        "image": t.image,
        "args": ["poolpipe", "run", "/etc/poolpipe/pipeline.toml", "--serve", "--api", format!("0.0.0.0:{API_PORT}")],
        "env": [{"name": "POOLPIPE_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "poolpipe-api", "key": "token"}}}],
        "ports": [{"name": "api", "containerPort": API_PORT}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "api"}, "periodSeconds": 2},
        "volumeMounts": mounts,
    });
    let mut front_pod = json!({
        "tolerations": tolerations(false),
        "terminationGracePeriodSeconds": 30,
        "containers": [],
        "volumes": volumes,
    });
    if t.controller {
        // One front more than share the cameras: those holding a front lease run their shares
        // of the cameras (and are the Service's ready endpoints); the other stands by without
        // an API, on another machine where there is one, and takes a share over when a lease
        // ends. So no liveness probe: a standby never answers one.
        front_pod["affinity"] = json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "podAffinityTerm": {"labelSelector": {"matchLabels": front_labels.clone()}, "topologyKey": "kubernetes.io/hostname"},
        }]}});
    } else {
        front["livenessProbe"] = json!({"httpGet": {"path": "/health", "port": "api"}, "periodSeconds": 5, "failureThreshold": 6});
    }
    front_pod["containers"] = json!([front]);
    out.push((
        "front.yaml".into(),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta("poolpipe-front", "front", t),
            "spec": {
                "replicas": if t.controller { t.fronts.max(1) + 1 } else { 1 },
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": front_labels.clone()},
                "template": {
                    "metadata": {"labels": front_labels.clone()},
                    "spec": front_pod,
                }
            }
        }),
    ));
    if t.controller {
        out.extend(control_plane(t));
        out.extend(t.join.iter().map(|pool| join_pool(pool, t)));
    }
    out.push((
        "service-front.yaml".into(),
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta("poolpipe-front", "front", t),
            "spec": {
                "selector": front_labels,
                "ports": [{"name": "api", "port": API_PORT, "targetPort": "api"}],
            }
        }),
    ));
    out
}

/// The pod template of a node with `labels`: `gpus` GPUs of `class` (on a machine labelled with
/// its product), running `command` with the pod's name and IP in its environment, the
/// pipeline's ConfigMap mounted, ready and alive while its link port takes connections.
fn node_pod(t: &Target, labels: Value, class: &str, gpus: u32, command: String) -> Value {
    let (volumes, mounts) = config_volume();
    let product = t
        .products
        .get(class)
        .cloned()
        .unwrap_or_else(|| gpu_product(class));
    let probe = json!({"tcpSocket": {"port": "link"}, "periodSeconds": 2, "failureThreshold": 3});
    json!({
        "metadata": {"labels": labels},
        "spec": {
            "nodeSelector": {"nvidia.com/gpu.product": product},
            "tolerations": tolerations(true),
            "terminationGracePeriodSeconds": 10,
            "containers": [{
                "name": "node",
                "image": t.image,
                "command": ["sh", "-c", command],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                ],
                "ports": [{"name": "link", "containerPort": NODE_PORT}],
                "resources": {"limits": {"nvidia.com/gpu": gpus}},
                "readinessProbe": probe.clone(),
                "livenessProbe": probe,
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        }
    })
}

/// The Deployment of a pool of joining nodes: each pod is a node named after itself, reached
/// at its pod IP, that offers its GPUs to the controller.
fn join_pool(pool: &JoinPool, t: &Target) -> (String, Value) {
    let kind = format!("join-{}", pool.class.to_ascii_lowercase());
    let name = format!("poolpipe-{kind}");
    // Not the `node` component: the headless Service of the placement's nodes does not select
    // them (the front reaches them at their pod IPs, from the epoch).
    let labels = json!({"app.kubernetes.io/name": "poolpipe", "app.kubernetes.io/component": "joining-node", "poolpipe.io/kind": kind});
    let mut m = meta(&name, "joining-node", t);
    m["labels"] = labels.clone();
    m["annotations"] = json!({"poolpipe.io/class": pool.class, "poolpipe.io/joins": "scale this Deployment to add or remove servers; the controller re-plans"});
    (
        format!("node-{kind}.yaml"),
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": m,
            "spec": {
                "replicas": pool.replicas,
                "selector": {"matchLabels": labels.clone()},
                "template": node_pod(t, labels, &pool.class, pool.gpus, format!(
                    "exec poolpipe node /etc/poolpipe/pipeline.toml --name \"$POD_NAME\" --gpus {}:{} --listen 0.0.0.0:{NODE_PORT} --advertise \"$POD_IP:{NODE_PORT}\"",
                    pool.class, pool.gpus
                )),
            }
        }),
    )
}

/// The NATS server (JetStream on, its store in the pod: epochs are re-published by the
/// controller after a restart) and the controller, with their Service.
fn control_plane(t: &Target) -> Vec<(String, Value)> {
    let (volumes, mounts) = config_volume();
    let nats_labels =
        json!({"app.kubernetes.io/name": "poolpipe", "app.kubernetes.io/component": "nats"});
    let ctl_labels =
        json!({"app.kubernetes.io/name": "poolpipe", "app.kubernetes.io/component": "controller"});
    vec![
        (
            "nats.yaml".into(),
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta("poolpipe-nats", "nats", t),
                "spec": {
                    "replicas": 1,
                    "strategy": {"type": "Recreate"},
                    "selector": {"matchLabels": nats_labels.clone()},
                    "template": {
                        "metadata": {"labels": nats_labels.clone()},
                        "spec": {
                            "tolerations": tolerations(false),
                            "containers": [{
                                "name": "nats",
                                "image": t.nats_image,
                                "args": ["-js", "-sd", "/data", "-p", "4222", "-m", "8222"],
                                "ports": [{"name": "client", "containerPort": 4222}, {"name": "monitor", "containerPort": 8222}],
                                "readinessProbe": {"httpGet": {"path": "/healthz?js-enabled-only=true", "port": "monitor"}, "periodSeconds": 2},
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                            }],
                            "volumes": [{"name": "data", "emptyDir": {}}],
                        }
                    }
                }
            }),
        ),
        (
            "service-nats.yaml".into(),
            json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta("poolpipe-nats", "nats", t),
                "spec": {
                    "selector": nats_labels,
                    "ports": [{"name": "client", "port": 4222, "targetPort": "client"}],
                }
            }),
        ),
        (
            "controller.yaml".into(),
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta("poolpipe-controller", "controller", t),
                "spec": {
                    // Two: one holds the lease, the other takes over when it expires.
                    "replicas": 2,
                    "selector": {"matchLabels": ctl_labels.clone()},
                    "template": {
                        "metadata": {"labels": ctl_labels},
                        "spec": {
                            "tolerations": tolerations(false),
                            "containers": [{
                                "name": "controller",
                                "image": t.image,
                                "command": ["sh", "-c", "exec poolpipe controller /etc/poolpipe/pipeline.toml --id \"$POD_NAME\""],
                                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                                "volumeMounts": mounts,
                            }],
                            "volumes": volumes,
                        }
                    }
                }
            }),
        ),
    ]
}

/// A JSON value as YAML (block style; strings double-quoted, multi-line ones as literal blocks).
pub fn yaml(v: &Value) -> String {
    let mut out = String::new();
    write_yaml(v, 0, &mut out);
    out
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Null => Some("null".into()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.contains('\n') => Some(Value::String(s.clone()).to_string()),
        Value::Array(a) if a.is_empty() => Some("[]".into()),
        Value::Object(o) if o.is_empty() => Some("{}".into()),
        _ => None,
    }
}

fn key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
        && !k.starts_with(['-', '.']);
    if plain {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

fn block(s: &str, indent: usize, out: &mut String) {
    out.push_str("|\n");
    for line in s.lines() {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str(&" ".repeat(indent));
            out.push_str(line);
            out.push('\n');
        }
    }
}

fn write_yaml(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                out.push_str(&pad);
                out.push_str(&key(k));
                out.push(':');
                match (scalar(v), v) {
                    (Some(s), _) => {
                        out.push(' ');
                        out.push_str(&s);
                        out.push('\n');
                    }
                    (None, Value::String(s)) => {
                        out.push(' ');
                        block(s, indent + 2, out);
                    }
                    (None, _) => {
                        out.push('\n');
                        write_yaml(v, indent + 2, out);
                    }
                }
            }
        }
        Value::Array(a) => {
            for item in a {
                match (scalar(item), item) {
                    (Some(s), _) => {
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&s);
                        out.push('\n');
                    }
                    (None, Value::String(s)) => {
                        out.push_str(&pad);
                        out.push_str("- ");
                        block(s, indent + 2, out);
                    }
                    (None, _) => {
                        let mut inner = String::new();
                        write_yaml(item, indent + 2, &mut inner);
                        // The item's first line goes after the dash.
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&inner[indent + 2..]);
                    }
                }
            }
        }
        other => {
            out.push_str(&pad);
            out.push_str(&scalar(other).unwrap_or_default());
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_nests_maps_lists_and_text() {
        let v = json!({
            "a": 1,
            "b": {"c": "x: y", "d": []},
            "e": [1, {"f": true, "g": ["h"]}, "line1\nline2"],
            "weird key": null,
        });
        assert_eq!(
            yaml(&v),
            "a: 1\nb:\n  c: \"x: y\"\n  d: []\ne:\n  - 1\n  - f: true\n    g:\n      - \"h\"\n  - |\n    line1\n    line2\n\"weird key\": null\n"
        );
    }

    #[test]
    fn servers_are_named_as_their_pods() {
        assert_eq!(node_name("l4-3"), "l4-3");
        assert_eq!(node_name("edge"), "edge-0");
        assert_eq!(node_name("t4-x"), "t4-x-0");
        assert_eq!(gpu_product("T4"), "Tesla-T4");
        assert_eq!(gpu_product("H200"), "NVIDIA-H200");
    }
}
