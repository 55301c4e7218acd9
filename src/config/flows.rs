//! Flows (model chains with their own SLO), routes (the chains of stages that serve a flow side
//! by side) and plans: a planner plan's pipelines become the stages of the flows that name its
//! models, every process on a device of its own id.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::DeValue;

use super::diag::Diagnostic;
use super::*;
use crate::planner::{Cluster, Plan};
use crate::profile::Profiles;

/// A validated flow.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowSpec {
    /// Name (results carry it).
    pub name: String,
    /// Latency budget of its frames.
    pub slo: Duration,
    /// The plan's model it serves, when its stages come from a plan.
    pub model: Option<String>,
    /// The plan's models (variants of one task) it serves, for a model family.
    pub family: Vec<String>,
    /// Its routes (indices into [`Pipeline::routes`]).
    pub routes: Vec<usize>,
}

/// One chain of stages of a flow.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    /// The flow it serves.
    pub flow: usize,
    /// Stages in order (indices into [`Pipeline::stages`]).
    pub stages: Vec<usize>,
    /// Share of the flow's frames it takes (a plan's throughput; 1 when written by hand).
    pub weight: f64,
    /// Model families: the variant the route runs and its accuracy (results carry them).
    pub variant: Option<(String, Option<f64>)>,
}

/// The plan a pipeline follows.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRef {
    /// Where it was read from.
    pub path: PathBuf,
    /// The plan.
    pub plan: Plan,
    /// The latency profiles it was checked against, as loaded (what a re-plan plans with).
    pub profiles: Option<std::sync::Arc<Profiles>>,
}

impl Pipeline {
    /// Appends `chain` as a new route of flow `flow` with `weight` (not yet in the flow's
    /// routes); returns the route's index.
    pub fn append_route(&mut self, flow: usize, chain: Vec<StageSpec>, weight: f64) -> usize {
        let first = self.stages.len();
        self.stages.extend(chain.into_iter().map(|mut s| {
            s.flow = flow;
            s
        }));
        self.routes.push(RouteSpec {
            flow,
            stages: (first..self.stages.len()).collect(),
            weight,
            variant: None,
        });
        self.routes.len() - 1
    }

    /// Makes all the stages one flow (named after the pipeline, with its SLO) on one route, as a
    /// file without `[[flow]]` does, and gives the workers their devices.
    pub fn into_one_flow(mut self) -> Self {
        for s in &mut self.stages {
            s.flow = 0;
        }
        self.routes = vec![RouteSpec {
            flow: 0,
            stages: (0..self.stages.len()).collect(),
            weight: 1.0,
            variant: None,
        }];
        self.flows = vec![FlowSpec {
            name: self.name.clone(),
            slo: self.slo,
            model: None,
            family: Vec::new(),
            routes: vec![0],
        }];
        assign_devices(&mut self.stages);
        self
    }
}

/// Gives every worker of every stage a device id, deterministically, in stage order: a device
/// of class `C` at share `s` holds `s` processes (the share-`s` profile assumes as many), so the
/// workers of stages on `emulated:C` at share `s` fill devices `s` at a time (`T4:0` takes the
/// first `s` processes, `T4:1` the next, and a stage that leaves a device part-filled leaves it
/// to the next stage of the same class and share, as the planner counts `processes / share`
/// devices); devices are numbered per class. CPU workers run on `cpu`.
pub fn assign_devices(stages: &mut [StageSpec]) {
    assign_free_devices(stages, &HashSet::new());
}

/// As [`assign_devices`], leaving out the device ids in `taken` (held by stages that keep
/// running, when a re-plan starts new ones): each new device is the lowest free id of its class.
pub fn assign_free_devices(stages: &mut [StageSpec], taken: &HashSet<String>) {
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    // (class, share) -> (device, processes on it) of the part-filled device.
    let mut open: BTreeMap<(String, usize), (usize, usize)> = BTreeMap::new();
    for s in stages {
        s.devices = match &s.device {
            Device::Cpu => vec!["cpu".to_string(); s.workers],
            Device::Gpu { .. } => (0..s.workers)
                .filter_map(|w| s.device.gpu_of_worker(w))
                .map(|(b, i)| format!("{}:{i}", b.prefix()))
                .collect(),
            Device::Emulated { class } => {
                let share = s.profile.as_ref().map_or(1, |p| p.share.max(1)) as usize;
                (0..s.workers)
                    .map(|_| {
                        let slot = open.entry((class.clone(), share)).or_insert((0, share));
                        if slot.1 == share {
                            let n = next.entry(class.clone()).or_default();
                            while taken.contains(&format!("{class}:{n}")) {
                                *n += 1;
                            }
                            *slot = (*n, 0);
                            *n += 1;
                        }
                        slot.1 += 1;
                        format!("{class}:{}", slot.0)
                    })
                    .collect()
            }
        };
    }
}

/// Devices of each class that the stages occupy.
pub(super) fn devices_used(stages: &[StageSpec]) -> BTreeMap<String, usize> {
    let mut used: BTreeMap<String, HashSet<&str>> = BTreeMap::new();
    for s in stages {
        if let Device::Emulated { class } = &s.device {
            used.entry(class.clone())
                .or_default()
                .extend(s.devices.iter().map(String::as_str));
        }
    }
    used.into_iter().map(|(c, d)| (c, d.len())).collect()
}

/// Latency per batch size `1..=max_batch` of blocks `blocks` of `model` on `class`/`share`, the
/// transfer of the cut after them at `gbps` (zero after the model's last block), and the bytes
/// of that cut; the process sends while computing when `send_while_computing`.
pub(super) fn profiled_costs(
    profiles: &Profiles,
    model: &str,
    (class, share): (&str, u32),
    blocks: [usize; 2],
    max_batch: usize,
    (gbps, send_while_computing): (f64, bool),
) -> StageProfile {
    let nblocks = profiles.model(model).map_or(0, |m| m.blocks());
    let cut_bytes = profiles
        .model(model)
        .ok()
        .and_then(|m| m.cut_bytes.get(blocks[1] - 1).copied())
        .filter(|_| blocks[1] < nblocks);
    StageProfile {
        model: model.to_string(),
        class: class.to_string(),
        share,
        blocks,
        latency: (1..=max_batch)
            .map(|b| {
                profiles
                    .latency(model, class, share, blocks[0]..blocks[1], b)
                    .unwrap_or_default()
            })
            .collect(),
        cut_bytes,
        transfer: (1..=max_batch)
            .map(|b| match cut_bytes {
                Some(_) => profiles
                    .transfer(model, blocks[1] - 1, b, gbps)
                    .unwrap_or_default(),
                None => Duration::ZERO,
            })
            .collect(),
        send_while_computing,
        receive: Vec::new(),
    }
}

/// Where `needle` first appears in `text`, as a 1-based (line, column); (1, 1) if nowhere.
fn locate(text: &str, needle: &str) -> (usize, usize) {
    let Some(at) = text.find(needle) else {
        return (1, 1);
    };
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// A plan file as read, with its text for locating problems.
pub(super) struct PlanFile {
    pub path: PathBuf,
    pub text: String,
    pub plan: Plan,
}

impl PlanFile {
    /// A problem in the plan file, at the first place `needle` appears.
    pub fn diag(&self, needle: &str, key: &str, message: impl Into<String>) -> Diagnostic {
        let (line, column) = locate(&self.text, needle);
        Diagnostic {
            file: self.path.clone(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Reads a plan; a file that cannot be read or is not a plan is a located problem.
pub(super) fn read_plan(path: &Path) -> Result<PlanFile, Diagnostic> {
    let here = |line, column, key: &str, message: String| Diagnostic {
        file: path.to_path_buf(),
        line,
        column,
        key: key.to_string(),
        message,
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| here(0, 0, "", format!("cannot read the plan: {e}")))?;
    let plan: Plan = serde_json::from_str(&text).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "not JSON"
        } else {
            "not a plan (write one with `poolpipe plan --out PLAN.json`)"
        };
        here(e.line(), e.column(), "", format!("{what}: {e}"))
    })?;
    Ok(PlanFile {
        path: path.to_path_buf(),
        text,
        plan,
    })
}

/// A string key of a table (the `flow` of a `[[stage]]`), read before the table is checked.
pub(super) fn string_key(value: &Spanned<DeValue<'_>>, key: &str) -> Option<String> {
    match value.get_ref() {
        DeValue::Table(t) => t.iter().find_map(|(k, v)| match v.get_ref() {
            DeValue::String(s) if k.get_ref() == key => Some(s.to_string()),
            _ => None,
        }),
        _ => None,
    }
}

/// Where the plan's placement (`poolpipe place`) puts the processes of stage `stage` of
/// pipeline `pipeline` of `model`: the server of each, in process order (the nodes of a
/// `[cluster]` are named after the servers). Empty without a placement.
pub fn placed_nodes(plan: &Plan, model: &str, pipeline: usize, stage: usize) -> Vec<String> {
    let (Some(mi), Some(placed)) = (
        plan.models.iter().position(|m| m.name == model),
        plan.placement.as_ref(),
    ) else {
        return Vec::new();
    };
    let mut procs: Vec<_> = placed
        .processes
        .iter()
        .filter(|p| p.model == mi && p.pipeline == pipeline && p.stage == stage)
        .collect();
    procs.sort_by_key(|p| p.process);
    procs
        .iter()
        .map(|p| placed.servers[p.server].name.clone())
        .collect()
}

/// Gives the stages of each planned chain of `model` the nodes the plan's placement puts their
/// processes on.
pub(super) fn place_chains(chains: &mut [(Vec<StageSpec>, f64)], plan: &Plan, model: &str) {
    for (k, (chain, _)) in chains.iter_mut().enumerate() {
        for (j, st) in chain.iter_mut().enumerate() {
            st.nodes = placed_nodes(plan, model, k, j);
        }
    }
}

/// The stages of one planned flow: every pipeline the plan gives `model`, each stage a pool
/// of `processes` emulated devices of its class at its share, running its block range, with
/// the planned batch as the largest batch and the `deadline` policy.
pub fn planned_stages(
    flow: &str,
    model: &str,
    margin_ms: f64,
    plan: &Plan,
    profiles: &Profiles,
) -> Vec<(Vec<StageSpec>, f64)> {
    let Some(m) = plan.models.iter().find(|m| m.name == model) else {
        return Vec::new();
    };
    m.pipelines
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let stages = p
                .stages
                .iter()
                .enumerate()
                .map(|(j, st)| {
                    let share = st.share.max(1);
                    let profile = profiled_costs(
                        profiles,
                        model,
                        (&st.class, share),
                        st.blocks,
                        p.batch,
                        (plan.bandwidth_gbps, plan.send_while_computing),
                    );
                    StageSpec {
                        name: format!("{flow}.p{k}.s{j}"),
                        model: ModelManifest::emulated(),
                        device: Device::Emulated {
                            class: st.class.clone(),
                        },
                        profile: Some(profile),
                        split: None,
                        policy: PolicyKind::Deadline,
                        margin: Duration::from_secs_f64(margin_ms.max(0.0) / 1e3),
                        workers: st.processes.max(1) as usize,
                        threads: 1,
                        max_batch: p.batch,
                        max_wait: Duration::ZERO,
                        auto: Default::default(),
                        queue: (2 * st.processes.max(1) as usize * p.batch).max(64),
                        boxes_from: None,
                        batching: Default::default(),
                        flow: 0,
                        devices: Vec::new(),
                        nodes: Vec::new(),
                    }
                })
                .collect();
            (stages, p.throughput)
        })
        .collect()
}

/// What is wrong with the devices the stages occupy, against `[pipeline] cluster`.
pub(super) fn check_cluster(
    cluster: &str,
    stages: &[StageSpec],
    plan: Option<&Path>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let c = match Cluster::parse_spec(cluster, 10.0) {
        Ok(c) => c,
        Err(e) => {
            return vec![format!("{e} (expected CLASS:COUNT,..., e.g. L4:2,T4:6)")];
        }
    };
    for (class, n) in devices_used(stages) {
        let have = c
            .classes
            .iter()
            .find(|x| x.name == class)
            .map_or(0, |x| x.count as usize);
        if n > have {
            let by = plan.map_or(String::new(), |p| format!(" (the plan {})", p.display()));
            problems.push(format!(
                "the stages{by} need {n} {class} device(s) but the cluster `{cluster}` has {have}"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(name: &str, device: Device, workers: usize, share: u32) -> StageSpec {
        StageSpec {
            name: name.into(),
            model: ModelManifest::emulated(),
            profile: matches!(device, Device::Emulated { .. }).then(|| StageProfile {
                model: "m".into(),
                class: device.class().into(),
                share,
                blocks: [0, 1],
                latency: vec![],
                cut_bytes: None,
                transfer: vec![],
                send_while_computing: false,
                receive: vec![],
            }),
            device,
            split: None,
            policy: PolicyKind::Fixed,
            margin: Duration::ZERO,
            workers,
            threads: 1,
            max_batch: 1,
            max_wait: Duration::ZERO,
            auto: Default::default(),
            queue: 1,
            boxes_from: None,
            batching: Default::default(),
            flow: 0,
            devices: vec![],
            nodes: vec![],
        }
    }

    #[test]
    fn devices_are_numbered_per_class_and_filled_share_processes_at_a_time() {
        let t4 = || Device::Emulated { class: "T4".into() };
        let l4 = Device::Emulated { class: "L4".into() };
        let mut s = vec![
            stage("a", t4(), 3, 2),
            stage("b", l4, 2, 1),
            stage("c", t4(), 2, 1),
            stage("d", Device::Cpu, 2, 1),
        ];
        s.push(stage("e", Device::Emulated { class: "T4".into() }, 3, 2));
        assign_devices(&mut s);
        assert_eq!(s[0].devices, ["T4:0", "T4:0", "T4:1"]);
        assert_eq!(s[1].devices, ["L4:0", "L4:1"]);
        assert_eq!(s[2].devices, ["T4:2", "T4:3"]);
        assert_eq!(s[3].devices, ["cpu", "cpu"]);
        // Share 2: the device stage `a` left half-filled takes `e`'s first process.
        assert_eq!(s[4].devices, ["T4:1", "T4:4", "T4:4"]);
        let used = devices_used(&s);
        assert_eq!(used["T4"], 5);
        assert_eq!(used["L4"], 2);
    }

    #[test]
    fn new_stages_take_the_devices_the_running_ones_leave_free() {
        let t4 = || Device::Emulated { class: "T4".into() };
        let mut s = vec![stage("a", t4(), 3, 1), stage("b", t4(), 2, 2)];
        let taken: HashSet<String> = ["T4:0", "T4:2"].iter().map(|d| d.to_string()).collect();
        assign_free_devices(&mut s, &taken);
        assert_eq!(s[0].devices, ["T4:1", "T4:3", "T4:4"]);
        assert_eq!(s[1].devices, ["T4:5", "T4:5"]);
    }

    #[test]
    fn problems_in_a_plan_file_are_located() {
        assert_eq!(locate("{\n  \"models\": [\n    \"x\"", "\"x\""), (3, 5));
        assert_eq!(locate("abc", "zzz"), (1, 1));
    }
}
