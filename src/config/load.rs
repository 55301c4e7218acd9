//! Parsing and validating pipeline files: every problem is collected, none stops the others.

use std::collections::HashSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeValue;

use super::diag::{ConfigErrors, Diagnostic};
use super::flows::{PlanFile, check_cluster, planned_stages, read_plan, string_key};
use super::manifest::{ModelKind, RecurrentMode, RecurrentParams, load_manifest};
use super::parse::{ParsedFile, deserialize_part, read_config};
use super::*;

/// A route as built from a flow: its stages, its weight, and the variant it runs (families).
type BuiltRoute = (Vec<StageSpec>, f64, Option<(String, Option<f64>)>);

/// Environment variable naming the folder of latency profiles (after `--profiles` and
/// `[pipeline] profiles`).
pub const PROFILES_ENV: &str = "POOLPIPE_PROFILES";

/// What the command line adds to a pipeline file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    /// `--plan`: the plan to serve, instead of `[pipeline] plan`.
    pub plan: Option<PathBuf>,
    /// `--profiles`: the folder of latency profiles, instead of `[pipeline] profiles`.
    pub profiles: Option<PathBuf>,
    /// `--data-dir`: where disk-buffered sinks keep their buffers.
    pub data_dir: Option<PathBuf>,
}

/// Reads and validates a pipeline file.
pub fn load_pipeline(path: &Path) -> Result<Pipeline, ConfigErrors> {
    load_pipeline_with(path, &LoadOptions::default())
}

/// Reads and validates a pipeline file with command-line settings.
pub fn load_pipeline_with(path: &Path, opts: &LoadOptions) -> Result<Pipeline, ConfigErrors> {
    let text = read_config(path, "pipeline file")?;
    load_str(path, &text, opts)
}

/// Validates pipeline text as if it were the file at `path` (relative paths resolve from there).
pub fn load_pipeline_str(path: &Path, text: &str) -> Result<Pipeline, ConfigErrors> {
    load_str(path, text, &LoadOptions::default())
}

fn load_str(path: &Path, text: &str, opts: &LoadOptions) -> Result<Pipeline, ConfigErrors> {
    let parsed = ParsedFile::parse(path, text)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut v = Validator {
        parsed: &parsed,
        dir,
        errors: Vec::new(),
        opts,
        flow_names: None,
        onnxruntime: None,
    };
    let pipeline = v.pipeline();
    let mut errors = v.errors;
    errors.sort_by_key(|d| (d.file != path, d.file.clone(), d.line, d.column));
    match pipeline {
        Some(p) if errors.is_empty() => Ok(p),
        _ => Err(ConfigErrors(errors)),
    }
}

/// Validates the definition of one stream, as the API receives it: TOML text of a single
/// `[[source]]` table (keys as in a pipeline file), checked by the same rules as a pipeline
/// file's sources, with relative paths resolved from `dir` (the pipeline file's folder) and
/// diagnostics pointing into `text` as if it were the file `path`.
pub fn load_source_str(path: &Path, dir: &Path, text: &str) -> Result<SourceSpec, ConfigErrors> {
    let parsed = ParsedFile::parse(path, text)?;
    let opts = LoadOptions::default();
    let mut v = Validator {
        parsed: &parsed,
        dir,
        errors: Vec::new(),
        opts: &opts,
        flow_names: None,
        onnxruntime: None,
    };
    let extra: Vec<(String, Range<usize>)> = parsed
        .table
        .get_ref()
        .keys()
        .filter(|k| k.get_ref() != "source")
        .map(|k| (k.get_ref().to_string(), k.span()))
        .collect();
    for (k, span) in extra {
        let d = parsed.src.diag(
            Some(span),
            k.clone(),
            format!("unknown section `{k}`, expected one [[source]]"),
        );
        v.errors.push(d);
    }
    let sources = v.sources();
    let mut errors = v.errors;
    match sources {
        Some(mut s) if errors.is_empty() && s.len() == 1 => Ok(s.remove(0)),
        Some(s) if errors.is_empty() => {
            errors.push(parsed.src.diag(
                Some(0..0),
                "source",
                format!("expected exactly one [[source]], found {}", s.len()),
            ));
            Err(ConfigErrors(errors))
        }
        _ => Err(ConfigErrors(errors)),
    }
}

const SECTIONS: [&str; 9] = [
    "pipeline", "flow", "source", "stage", "sink", "output", "tracker", "rule", "cluster",
];

/// videotestsrc patterns (GStreamer 1.22).
const TEST_PATTERNS: [&str; 26] = [
    "smpte",
    "snow",
    "black",
    "white",
    "red",
    "green",
    "blue",
    "checkers-1",
    "checkers-2",
    "checkers-4",
    "checkers-8",
    "circular",
    "blink",
    "smpte75",
    "zone-plate",
    "gamut",
    "chroma-zone-plate",
    "solid-color",
    "ball",
    "smpte100",
    "bar",
    "pinwheel",
    "spokes",
    "gradient",
    "colors",
    "smpte-rp-219",
];

pub(super) struct Validator<'p, 'a> {
    pub(super) parsed: &'p ParsedFile<'a>,
    dir: &'p Path,
    pub(super) errors: Vec<Diagnostic>,
    opts: &'p LoadOptions,
    /// Names of the file's `[[flow]]`s (None: the file has none, or this is one stream).
    flow_names: Option<Vec<String>>,
    /// The ONNX Runtime library the file names (for reading recurrent cells' tensors).
    onnxruntime: Option<PathBuf>,
}

impl<'a> Validator<'_, 'a> {
    pub(super) fn err(&mut self, key: &str, message: impl Into<String>) {
        let d = self.parsed.diag_at(key, message);
        self.errors.push(d);
    }

    pub(super) fn has(&self, key: &str) -> bool {
        self.parsed.index.value_span(key).is_some()
    }

    pub(super) fn section(&self, name: &str) -> Option<Spanned<DeValue<'a>>> {
        self.parsed
            .table
            .get_ref()
            .iter()
            .find(|(k, _)| k.get_ref() == name)
            .map(|(_, v)| v.clone())
    }

    /// The elements of an array-of-tables section that may be absent, each with its path.
    pub(super) fn items_optional(&mut self, name: &str) -> Vec<(String, Spanned<DeValue<'a>>)> {
        if self.section(name).is_none() {
            return Vec::new();
        }
        self.items(name)
    }

    /// The elements of an array-of-tables section, each with its path.
    fn items(&mut self, name: &str) -> Vec<(String, Spanned<DeValue<'a>>)> {
        match self.section(name) {
            None => {
                self.errors.push(self.parsed.src.diag(
                    Some(0..0),
                    name,
                    format!("missing: the pipeline needs at least one [[{name}]]"),
                ));
                Vec::new()
            }
            Some(v) => match v.get_ref() {
                DeValue::Array(items) if !items.is_empty() => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| (format!("{name}[{i}]"), item.clone()))
                    .collect(),
                _ => {
                    self.err(name, format!("expected one or more [[{name}]] tables"));
                    Vec::new()
                }
            },
        }
    }

    pub(super) fn part<T: Deserialize<'a>>(
        &mut self,
        base: &str,
        value: Spanned<DeValue<'a>>,
    ) -> Option<T> {
        match deserialize_part(self.parsed, base, value) {
            Ok(t) => Some(t),
            Err(d) => {
                self.errors.push(d);
                None
            }
        }
    }

    pub(super) fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn pipeline(&mut self) -> Option<Pipeline> {
        let keys: Vec<(String, Range<usize>)> = self
            .parsed
            .table
            .get_ref()
            .keys()
            .map(|k| (k.get_ref().to_string(), k.span()))
            .collect();
        for (k, span) in keys {
            if !SECTIONS.contains(&k.as_str()) {
                let d = self.parsed.src.diag(
                    Some(span),
                    k.clone(),
                    format!(
                        "unknown section `{k}`, expected one of: {}",
                        SECTIONS.join(", ")
                    ),
                );
                self.errors.push(d);
            }
        }
        let header: Option<PipelineSection> = match self.section("pipeline") {
            Some(v) => self.part("pipeline", v),
            None => {
                self.errors.push(self.parsed.src.diag(
                    Some(0..0),
                    "pipeline",
                    "missing: a [pipeline] table with `name` and `slo_ms`",
                ));
                None
            }
        };
        if let Some(h) = &header {
            if h.name.trim().is_empty() {
                self.err("pipeline.name", "must not be empty");
            }
            if h.slo_ms == 0 || h.slo_ms > 3_600_000 {
                self.err(
                    "pipeline.slo_ms",
                    format!(
                        "{} is not a latency budget: expected 1..=3600000 milliseconds",
                        h.slo_ms
                    ),
                );
            }
            self.onnxruntime = h.onnxruntime.as_ref().map(|l| self.resolve(l));
            if let Some(lib) = &h.onnxruntime
                && !self.resolve(lib).is_file()
            {
                self.err(
                    "pipeline.onnxruntime",
                    format!("{} does not exist", self.resolve(lib).display()),
                );
            }
        }
        if let Some(h) = &header
            && !(h.bandwidth_gbps > 0.0 && h.bandwidth_gbps.is_finite())
        {
            self.err(
                "pipeline.bandwidth_gbps",
                format!("{} Gbit/s: expected a positive number", h.bandwidth_gbps),
            );
        }
        let engines_dir = header
            .as_ref()
            .map(|h| self.resolve(&h.engines_dir))
            .unwrap_or_else(|| self.dir.join("../engines"));
        let flow_cfgs = self.flow_configs();
        let stage_items = self.items_optional("stage");
        let plan_path = header.as_ref().and_then(|h| h.plan.clone());
        let needs_profiles = plan_path.is_some()
            || self.opts.plan.is_some()
            || header.as_ref().is_some_and(|h| h.profiles.is_some())
            || self.opts.profiles.is_some()
            || stage_items
                .iter()
                .any(|(_, v)| string_key(v, "profile").is_some());
        let profiles = if needs_profiles {
            self.profiles(header.as_ref(), &engines_dir)
        } else {
            None
        };
        let plan = self.plan_file(
            plan_path.as_deref(),
            self.opts.plan.as_deref(),
            profiles.as_ref(),
        );
        self.flow_names = Some(if flow_cfgs.is_empty() {
            vec![
                header
                    .as_ref()
                    .map_or("pipeline", |h| h.name.as_str())
                    .to_string(),
            ]
        } else {
            flow_cfgs.iter().map(|(_, c)| c.name.clone()).collect()
        });
        let sources = self.sources();
        let bandwidth = header.as_ref().map_or(10.0, |h| h.bandwidth_gbps);
        let send_while_computing = header.as_ref().is_some_and(|h| h.send_while_computing);
        let slo_ms = header.as_ref().map(|h| h.slo_ms);

        // Which flow each [[stage]] belongs to.
        let declared = !flow_cfgs.is_empty();
        let names: Vec<String> = flow_cfgs.iter().map(|(_, c)| c.name.clone()).collect();
        let mut groups: Vec<Vec<(String, Spanned<DeValue<'a>>)>> =
            (0..names.len().max(1)).map(|_| Vec::new()).collect();
        if !declared && self.section("stage").is_none() {
            self.items("stage"); // reports the missing section
        }
        for (base, value) in stage_items {
            match (string_key(&value, "flow"), names.len()) {
                (None, 0 | 1) => groups[0].push((base, value)),
                (None, _) => self.err(
                    &base,
                    format!(
                        "missing key `flow`: the file has several [[flow]]s ({})",
                        names.join(", ")
                    ),
                ),
                (Some(f), _) if !declared => self.err(
                    &format!("{base}.flow"),
                    format!("names flow `{f}` but the file declares no [[flow]]"),
                ),
                (Some(f), _) => match names.iter().position(|n| *n == f) {
                    Some(i) => groups[i].push((base, value)),
                    None => self.err(
                        &format!("{base}.flow"),
                        format!(
                            "no [[flow]] named `{f}`, expected one of: {}",
                            names.join(", ")
                        ),
                    ),
                },
            }
        }

        let pipeline_name = header
            .as_ref()
            .map_or("pipeline", |h| h.name.as_str())
            .to_string();
        let implicit = FlowConfig {
            name: pipeline_name.clone(),
            slo_ms: None,
            model: None,
            family: None,
            margin_ms: 2.0,
        };
        let flow_list: Vec<(Option<String>, FlowConfig)> = if declared {
            flow_cfgs.into_iter().map(|(b, c)| (Some(b), c)).collect()
        } else {
            vec![(None, implicit)]
        };
        // A plan's pipelines for a model are one set of devices: two flows of one model would
        // each run all of them, booking the same GPUs twice.
        let mut served_by: Vec<(String, String)> = Vec::new();
        for (base, c) in &flow_list {
            let Some(base) = base else { continue };
            let (key, models) = match (&c.model, &c.family) {
                (Some(m), _) => ("model", std::slice::from_ref(m)),
                (None, Some(f)) => ("family", f.as_slice()),
                (None, None) => continue,
            };
            for m in models {
                if let Some((_, other)) = served_by.iter().find(|(x, _)| x == m) {
                    self.err(
                        &format!("{base}.{key}"),
                        format!(
                            "flow `{}` serves model `{m}`, which flow `{other}` serves too: a plan's pipelines for a model are one set of devices, and two flows would each run all of them (the GPUs booked twice); put the cameras of both in one flow",
                            c.name
                        ),
                    );
                } else {
                    served_by.push((m.clone(), c.name.clone()));
                }
            }
        }
        let mut stages: Vec<StageSpec> = Vec::new();
        let mut routes: Vec<RouteSpec> = Vec::new();
        let mut flows: Vec<FlowSpec> = Vec::new();
        let mut stages_ok = true;
        for (fi, ((base, c), items)) in flow_list.into_iter().zip(groups).enumerate() {
            let family = c.family.clone().unwrap_or_default();
            let planned_model = c.model.as_ref().or(family.first()).and_then(|m| {
                plan.as_ref()
                    .and_then(|p| p.plan.models.iter().find(|x| &x.name == m))
            });
            let slo = c
                .slo_ms
                .map(|ms| ms as f64)
                .or(planned_model.map(|m| m.slo_ms))
                .or(slo_ms.map(|ms| ms as f64))
                .unwrap_or(1000.0);
            let built: Vec<BuiltRoute> = match (&c.model, &base) {
                (None, Some(base)) if c.family.is_some() => {
                    self.family_routes(base, &c, &family, plan.as_ref(), profiles.as_ref(), &items)
                }
                (Some(model), Some(base)) => {
                    if c.family.is_some() {
                        self.err(
                            &format!("{base}.family"),
                            "a flow serves one plan's `model` or a `family` of them, not both",
                        );
                    }
                    if let Some((b, _)) = items.first() {
                        self.err(
                            &format!("{b}.flow"),
                            format!("flow `{}` is served by the plan's model `{model}`: its stages come from the plan", c.name),
                        );
                    }
                    match (&plan, &profiles, planned_model) {
                        (Some(p), Some(pr), Some(_)) => {
                            let mut chains =
                                planned_stages(&c.name, model, c.margin_ms, &p.plan, pr);
                            if self.has("cluster") {
                                super::flows::place_chains(&mut chains, &p.plan, model);
                            }
                            chains.into_iter().map(|(st, w)| (st, w, None)).collect()
                        }
                        (Some(p), _, None) => {
                            let have: Vec<&str> =
                                p.plan.models.iter().map(|m| m.name.as_str()).collect();
                            self.err(
                                &format!("{base}.model"),
                                format!(
                                    "the plan {} has no pipelines for model `{model}` (it plans: {})",
                                    p.path.display(),
                                    have.join(", ")
                                ),
                            );
                            Vec::new()
                        }
                        (None, _, _) => {
                            if plan_path.is_none() && self.opts.plan.is_none() {
                                self.err(
                                    &format!("{base}.model"),
                                    "a flow with `model` is served by a plan: give `--plan PLAN.json` or [pipeline] plan",
                                );
                            }
                            Vec::new()
                        }
                        _ => Vec::new(),
                    }
                }
                _ => {
                    if items.is_empty() {
                        if let Some(base) = &base {
                            self.err(
                                base,
                                format!("no [[stage]] names flow `{}`: give it stages (`flow = \"{}\"`) or a plan's `model`", c.name, c.name),
                            );
                        }
                        Vec::new()
                    } else {
                        let slo_limit = c.slo_ms.or(slo_ms);
                        match self.stages(
                            items,
                            &engines_dir,
                            slo_limit,
                            profiles
                                .as_ref()
                                .map(|p| (p, (bandwidth, send_while_computing))),
                        ) {
                            Some(st) => vec![(st, 1.0, None)],
                            None => {
                                stages_ok = false;
                                Vec::new()
                            }
                        }
                    }
                }
            };
            let mut route_ids = Vec::new();
            for (mut chain, weight, variant) in built {
                let first = stages.len();
                for st in &mut chain {
                    st.flow = fi;
                }
                stages.extend(chain);
                route_ids.push(routes.len());
                routes.push(RouteSpec {
                    flow: fi,
                    stages: (first..stages.len()).collect(),
                    weight,
                    variant,
                });
            }
            flows.push(FlowSpec {
                name: c.name,
                slo: Duration::from_secs_f64(slo / 1e3),
                model: c.model,
                family,
                routes: route_ids,
            });
        }
        if let Some(p) = &plan {
            for m in &p.plan.models {
                if !flows.iter().any(|f| {
                    f.model.as_deref() == Some(m.name.as_str()) || f.family.contains(&m.name)
                }) {
                    let d = p.diag(
                        &format!("\"{}\"", m.name),
                        &format!("models.{}", m.name),
                        format!(
                            "the plan serves model `{}` but no [[flow]] of {} has `model = \"{}\"` or names it in a `family`",
                            m.name,
                            self.parsed.src.path.display(),
                            m.name
                        ),
                    );
                    self.errors.push(d);
                }
            }
        }
        super::flows::assign_devices(&mut stages);
        if let Some(cluster) = header.as_ref().and_then(|h| h.cluster.clone()) {
            for problem in check_cluster(&cluster, &stages, plan.as_ref().map(|p| p.path.as_path()))
            {
                self.err("pipeline.cluster", problem);
            }
        }
        let cluster = self.cluster(&stages);
        let sinks = self.sinks(&pipeline_name);
        let outputs = self.outputs(sources.as_deref());
        let analytics = self.analytics(&stages, &routes, sources.as_deref());
        let h = header?;
        if !stages_ok {
            return None;
        }
        Some(Pipeline {
            file: self.parsed.src.path.to_path_buf(),
            name: h.name,
            slo: Duration::from_millis(h.slo_ms),
            onnxruntime: h.onnxruntime.map(|p| self.resolve(&p)),
            engine_cache: match &h.engine_cache {
                Some(p) => self.resolve(p),
                None => self.resolve(&h.engines_dir).join("trt-cache"),
            },
            keep_activations: h.keep_activations,
            sources: sources?,
            outputs: outputs?,
            stages,
            sinks: sinks?,
            bandwidth_gbps: h.bandwidth_gbps,
            flows,
            routes,
            analytics,
            plan: plan.map(|p| PlanRef {
                path: p.path,
                plan: p.plan,
                profiles: profiles.map(std::sync::Arc::new),
            }),
            options: self.opts.clone(),
            cluster,
        })
    }

    /// `[cluster]`, and the `nodes` of every stage against it.
    fn cluster(&mut self, stages: &[StageSpec]) -> Option<ClusterSpec> {
        let spec = match self.section("cluster") {
            Some(v) => {
                let c: ClusterConfig = self.part("cluster", v)?;
                for (name, addr) in &c.nodes {
                    let key = format!("cluster.nodes.{name}");
                    if name == &c.front {
                        self.err(
                            &key,
                            format!("`{name}` is the front; list only the other nodes"),
                        );
                    }
                    let port = addr.rsplit_once(':').and_then(|(h, p)| {
                        (!h.is_empty()).then_some(())?;
                        p.parse::<u16>().ok().filter(|p| *p > 0)
                    });
                    if port.is_none() {
                        self.err(&key, format!("`{addr}`: expected HOST:PORT"));
                    }
                }
                if c.nodes.is_empty() {
                    self.err(
                        "cluster.nodes",
                        "a cluster needs at least one node besides the front",
                    );
                }
                if let Some(url) = &c.nats
                    && !(url.starts_with("nats://") || url.starts_with("tls://"))
                {
                    self.err(
                        "cluster.nats",
                        format!("`{url}`: expected nats://HOST:PORT"),
                    );
                }
                if c.fronts == 0 {
                    self.err("cluster.fronts", "at least 1 front runs the cameras");
                } else if c.fronts > 1 && c.nats.is_none() {
                    self.err(
                        "cluster.fronts",
                        format!(
                            "{} fronts share the cameras through a controller: set `nats`",
                            c.fronts
                        ),
                    );
                }
                if c.hold_mib == 0 {
                    self.err(
                        "cluster.hold_mib",
                        "a node needs room to hold at least 1 MiB",
                    );
                }
                if c.hold_ms == 0 {
                    self.err(
                        "cluster.hold_ms",
                        "a node must hold an output for at least 1 ms",
                    );
                }
                Some(ClusterSpec {
                    front: c.front,
                    nodes: c.nodes,
                    nats: c.nats,
                    fronts: c.fronts,
                    direct_links: c.direct_links,
                    hold_bytes: usize::try_from(c.hold_mib.saturating_mul(1 << 20))
                        .unwrap_or(usize::MAX),
                    hold_for: Duration::from_millis(c.hold_ms),
                })
            }
            None => None,
        };
        for (i, s) in stages.iter().enumerate() {
            if s.nodes.is_empty() {
                continue;
            }
            let key = format!("stage[{i}].nodes");
            let Some(c) = &spec else {
                self.err(&key, "`nodes` needs a [cluster] section naming the nodes");
                continue;
            };
            if s.nodes.len() != s.workers {
                self.err(
                    &key,
                    format!(
                        "{} nodes for {} workers: name the node of every worker",
                        s.nodes.len(),
                        s.workers
                    ),
                );
            }
            for n in &s.nodes {
                if n != &c.front && !c.nodes.contains_key(n) {
                    let mut known: Vec<&str> = c.nodes.keys().map(String::as_str).collect();
                    known.insert(0, &c.front);
                    self.err(
                        &key,
                        format!("no node `{n}` in [cluster] (nodes: {})", known.join(", ")),
                    );
                }
            }
            if s.model.kind == ModelKind::Recurrent && s.nodes.iter().any(|n| n != &c.front) {
                self.err(
                    &key,
                    "a recurrent stage keeps per-stream state on the front; it cannot run on another node",
                );
            }
        }
        spec
    }

    /// Loads the latency profiles: from `--profiles`, else `[pipeline] profiles`, else
    /// `POOLPIPE_PROFILES`, else the `profiles` folder beside the model manifests.
    fn profiles(
        &mut self,
        header: Option<&PipelineSection>,
        engines_dir: &Path,
    ) -> Option<crate::profile::Profiles> {
        let (dir, from) = if let Some(d) = &self.opts.profiles {
            (d.clone(), "--profiles")
        } else if let Some(d) = header.and_then(|h| h.profiles.as_ref()) {
            (self.resolve(d), "[pipeline] profiles")
        } else if let Some(d) = std::env::var_os(PROFILES_ENV).filter(|d| !d.is_empty()) {
            (PathBuf::from(d), PROFILES_ENV)
        } else {
            (
                engines_dir.join("profiles"),
                "the default, `profiles` in the engines folder",
            )
        };
        match crate::profile::Profiles::load_dir(&dir, None) {
            Ok(p) => Some(p),
            Err(e) => {
                self.err(
                    "pipeline.profiles",
                    format!(
                        "cannot load latency profiles from {} ({from}): {e}; point [pipeline] profiles, --profiles or {PROFILES_ENV} at the published profiles (the `data/` folder of the PPipe artifact) or at a folder made with `poolpipe profile`",
                        dir.display()
                    ),
                );
                None
            }
        }
    }

    pub(super) fn check_name(
        &mut self,
        key: &str,
        name: &str,
        seen: &mut HashSet<String>,
        what: &str,
    ) {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            self.err(key, format!("{what} name `{name}` must be non-empty and use only letters, digits, `-`, `_`, `.`"));
        } else if !seen.insert(name.to_string()) {
            self.err(key, format!("duplicate {what} name `{name}`"));
        }
    }

    fn sources(&mut self) -> Option<Vec<SourceSpec>> {
        let mut out = Vec::new();
        let mut ok = true;
        let mut seen = HashSet::new();
        for (base, value) in self.items("source") {
            let Some(c) = self.part::<SourceConfig>(&base, value) else {
                ok = false;
                continue;
            };
            let n = self.errors.len();
            self.check_name(&format!("{base}.name"), &c.name, &mut seen, "source");
            let kind = self.source_kind(&base, &c);
            let uri = c.uri.trim();
            let is_rtsp = uri.starts_with("rtsp://") || uri.starts_with("rtsps://");
            let is_test = uri.starts_with("test://");
            for key in ["transport", "latency_ms"] {
                if !is_rtsp && self.has(&format!("{base}.{key}")) {
                    self.err(
                        &format!("{base}.{key}"),
                        format!("`{key}` applies to rtsp:// sources only"),
                    );
                }
            }
            for key in ["loop", "pace"] {
                if is_rtsp && self.has(&format!("{base}.{key}")) {
                    self.err(
                        &format!("{base}.{key}"),
                        format!("`{key}` applies to files and test sources, not to live cameras"),
                    );
                }
            }
            if !is_test && self.has(&format!("{base}.num_buffers")) {
                self.err(
                    &format!("{base}.num_buffers"),
                    "`num_buffers` applies to test:// sources only",
                );
            }
            if let Some(f) = c.max_fps
                && !(1..=1000).contains(&f)
            {
                self.err(
                    &format!("{base}.max_fps"),
                    format!("{f} frames per second: expected 1..=1000"),
                );
            }
            if c.reconnect_min_ms == 0 {
                self.err(
                    &format!("{base}.reconnect_min_ms"),
                    "must be at least 1 millisecond",
                );
            }
            if c.reconnect_max_ms < c.reconnect_min_ms {
                self.err(
                    &format!("{base}.reconnect_max_ms"),
                    format!(
                        "{} is below reconnect_min_ms = {}",
                        c.reconnect_max_ms, c.reconnect_min_ms
                    ),
                );
            }
            if c.stall_timeout_ms < 100 {
                self.err(
                    &format!("{base}.stall_timeout_ms"),
                    "must be at least 100 milliseconds",
                );
            }
            if c.num_buffers == Some(0) {
                self.err(&format!("{base}.num_buffers"), "must be at least 1");
            }
            self.source_flow(&base, c.flow.as_deref());
            if !(1..=100).contains(&c.priority) {
                self.err(
                    &format!("{base}.priority"),
                    format!("{}: expected 1..=100 (a stream's share under overload, relative to the others)", c.priority),
                );
            }
            let decode = self.source_decode(&base, &c, kind.as_ref());
            let (Some(kind), true) = (kind, self.errors.len() == n) else {
                ok = false;
                continue;
            };
            out.push(SourceSpec {
                name: c.name,
                decode,
                kind,
                max_fps: c.max_fps,
                looping: c.looping,
                pace: c.pace.unwrap_or(Pace::Realtime),
                reconnect_min: Duration::from_millis(c.reconnect_min_ms),
                reconnect_max: Duration::from_millis(c.reconnect_max_ms),
                stall_timeout: Duration::from_millis(c.stall_timeout_ms),
                num_buffers: c.num_buffers,
                flow: c.flow,
                priority: c.priority,
            });
        }
        ok.then_some(out)
    }

    /// `decode` (with `gpu` and `codec`) of a source. For `nvdec` the decoder element must be
    /// registered, which GStreamer does only where the NVIDIA driver loads.
    fn source_decode(&mut self, base: &str, c: &SourceConfig, kind: Option<&SourceKind>) -> Decode {
        let nvdec = match c.decode.as_deref() {
            None | Some("auto") => false,
            Some("nvdec") => true,
            Some(other) => {
                self.err(
                    &format!("{base}.decode"),
                    format!("unknown decoder `{other}`, expected `auto` or `nvdec`"),
                );
                return Decode::Auto;
            }
        };
        if !nvdec {
            for key in ["gpu", "codec"] {
                if self.has(&format!("{base}.{key}")) {
                    self.err(
                        &format!("{base}.{key}"),
                        format!("`{key}` applies to `decode = \"nvdec\"` only"),
                    );
                }
            }
            return Decode::Auto;
        }
        if matches!(kind, Some(SourceKind::Test { .. })) {
            self.err(&format!("{base}.decode"), "test:// sources are generated, not decoded: `nvdec` applies to rtsp and file sources");
            return Decode::Auto;
        }
        let h265 = match c.codec.as_deref() {
            None | Some("h264") => false,
            Some("h265") => true,
            Some(other) => {
                self.err(
                    &format!("{base}.codec"),
                    format!("unknown codec `{other}`, expected `h264` or `h265`"),
                );
                return Decode::Auto;
            }
        };
        let decode = Decode::Nvdec {
            gpu: c.gpu.unwrap_or(0),
            h265,
        };
        if let Some((parser, dec)) = decode.nvdec_elements() {
            let found = gstreamer::init()
                .map_err(|e| format!("GStreamer could not be initialised: {e}"))
                .and_then(|_| {
                    crate::elements::check(&[parser, dec.as_str()]).map_err(|e| e.to_string())
                });
            if let Err(e) = found {
                self.err(&format!("{base}.decode"), e);
            }
        }
        decode
    }

    /// Checks the flow a source names against the file's `[[flow]]`s.
    fn source_flow(&mut self, base: &str, flow: Option<&str>) {
        let Some(names) = self.flow_names.clone() else {
            return;
        };
        match flow {
            Some(f) if !names.iter().any(|n| n == f) => self.err(
                &format!("{base}.flow"),
                format!(
                    "no [[flow]] named `{f}`, expected one of: {}",
                    names.join(", ")
                ),
            ),
            None if names.len() > 1 => self.err(
                base,
                format!(
                    "missing key `flow`: the file has several [[flow]]s ({})",
                    names.join(", ")
                ),
            ),
            _ => {}
        }
    }

    fn source_kind(&mut self, base: &str, c: &SourceConfig) -> Option<SourceKind> {
        let key = format!("{base}.uri");
        let uri = c.uri.trim();
        if uri.starts_with("rtsp://") || uri.starts_with("rtsps://") {
            let host = uri
                .split("://")
                .nth(1)
                .unwrap_or("")
                .split(['/', '?'])
                .next()
                .unwrap_or("");
            let host = host.rsplit('@').next().unwrap_or("");
            if host.is_empty() || host.starts_with(':') {
                self.err(&key, format!("`{}` has no host", super::redact_url(uri)));
                return None;
            }
            return Some(SourceKind::Rtsp {
                url: uri.to_string(),
                transport: c.transport,
                latency_ms: c.latency_ms,
            });
        }
        if let Some(pattern) = uri.strip_prefix("test://") {
            if !TEST_PATTERNS.contains(&pattern) {
                self.err(
                    &key,
                    format!(
                        "unknown test pattern `{pattern}`, expected one of: {}",
                        TEST_PATTERNS.join(", ")
                    ),
                );
                return None;
            }
            return Some(SourceKind::Test {
                pattern: pattern.to_string(),
            });
        }
        let path = if let Some(p) = uri.strip_prefix("file://") {
            p
        } else if let Some((scheme, _)) = uri.split_once("://") {
            self.err(&key, format!("unsupported scheme `{scheme}://`, expected rtsp://, rtsps://, file://, test:// or a path"));
            return None;
        } else {
            uri
        };
        if path.is_empty() {
            self.err(&key, "empty path");
            return None;
        }
        let full = self.resolve(Path::new(path));
        if !full.is_file() {
            self.err(&key, format!("file {} does not exist", full.display()));
            return None;
        }
        Some(SourceKind::File { path: full })
    }

    /// The `[[stage]]`s of one flow, in order.
    fn stages(
        &mut self,
        items: Vec<(String, Spanned<DeValue<'a>>)>,
        engines_dir: &Path,
        slo_ms: Option<u64>,
        profiles: Option<(&crate::profile::Profiles, (f64, bool))>,
    ) -> Option<Vec<StageSpec>> {
        let mut out: Vec<StageSpec> = Vec::new();
        let mut ok = true;
        let mut seen = HashSet::new();
        for (i, (base, value)) in items.into_iter().enumerate() {
            let Some(c) = self.part::<StageConfig>(&base, value) else {
                ok = false;
                continue;
            };
            let n = self.errors.len();
            self.check_name(&format!("{base}.name"), &c.name, &mut seen, "stage");
            let device = self.stage_device(&base, &c);
            let ranges: [(&str, u64, u64, u64); 5] = [
                ("workers", c.workers.into(), 1, 64),
                ("threads", c.threads.into(), 1, 256),
                ("max_batch", c.max_batch.value_or(1), 1, 256),
                ("queue", c.queue.into(), 1, 4096),
                ("max_wait_ms", c.max_wait_ms.value_or(0), 0, 10_000),
            ];
            for (key, value, lo, hi) in ranges {
                if value < lo || value > hi {
                    self.err(
                        &format!("{base}.{key}"),
                        format!("{value} is out of range: expected {lo}..={hi}"),
                    );
                }
            }
            if let Some(slo) = slo_ms
                && let OrAuto::Value(wait) = c.max_wait_ms
                && wait >= slo
            {
                self.err(
                    &format!("{base}.max_wait_ms"),
                    format!("{wait} ms leaves nothing of the {slo} ms SLO"),
                );
            }
            let mut model = match (&c.model, &device) {
                (Some(name), _) => self.manifest(&base, name, engines_dir),
                (None, Some(Device::Emulated { .. })) => Some(ModelManifest::emulated()),
                (None, _) => {
                    self.err(
                        &base,
                        "missing key `model` (only emulated devices may leave it out)",
                    );
                    None
                }
            };
            if let (Some(classes), Some(m)) = (&c.classes, model.as_mut()) {
                if m.kind != ModelKind::Detect {
                    self.err(
                        &format!("{base}.classes"),
                        "`classes` applies to detect stages only",
                    );
                } else {
                    match super::manifest::class_filter(classes, &m.detect.names) {
                        Ok(_) => m.detect.classes = classes.clone(),
                        Err(e) => self.err(&format!("{base}.classes"), e),
                    }
                }
            }
            let has_split = model.as_ref().is_some_and(|m| m.split.is_some())
                && device.as_ref().is_some_and(Device::runs_models);
            let profile = match &device {
                Some(d) => self.stage_profile(&base, &c, d, profiles, out.last(), has_split),
                None => None,
            };
            let split = match (&model, &device) {
                (Some(m), Some(d)) if d.runs_models() => self.stage_split(&base, &c, m, out.last()),
                _ => None,
            };
            let mut boxes_from = None;
            let recurrent = model.as_ref().and_then(|m| m.recurrent.clone());
            if let (Some(r), Some(m)) = (&recurrent, &model) {
                boxes_from = self.recurrent_stage(&base, &c, r, m, device.as_ref(), &out);
            } else if c.batching.is_some() {
                self.err(
                    &format!("{base}.batching"),
                    "`batching` applies to stages of `kind = \"recurrent\"` models only",
                );
            }
            if let Some(m) = model.as_ref().filter(|_| recurrent.is_none()) {
                if i == 0 && m.kind == ModelKind::TextRecognize {
                    self.err(&format!("{base}.model"), "a text_recognize stage reads boxes of an earlier text_detect stage; it cannot come first");
                }
                if m.kind == ModelKind::TextRecognize {
                    boxes_from = match &c.input {
                        Some(name) => match self.earlier_stage(&base, name, &out) {
                            Some(j) if out[j].model.kind == ModelKind::TextDetect => Some(j),
                            Some(_) => {
                                self.err(
                                    &format!("{base}.input"),
                                    format!("stage `{name}` is not a text_detect stage"),
                                );
                                None
                            }
                            None => None,
                        },
                        None => {
                            let j = out
                                .iter()
                                .rposition(|s| s.model.kind == ModelKind::TextDetect);
                            if j.is_none() && i > 0 {
                                self.err(
                                    &format!("{base}.model"),
                                    "a text_recognize stage needs an earlier text_detect stage",
                                );
                            }
                            j
                        }
                    };
                } else if c.input.is_some() {
                    self.err(
                        &format!("{base}.input"),
                        "`input` applies to text_recognize stages only",
                    );
                }
                if m.kind.takes_whole_image()
                    && let Some(first) = out.iter().find(|s| s.model.kind.takes_whole_image())
                    && let (Some(a), Some(b)) = (&first.model.image, &m.image)
                    && (a.width, a.height, a.pixel_format) != (b.width, b.height, b.pixel_format)
                {
                    self.err(
                        &format!("{base}.model"),
                        format!(
                            "takes {}x{} {:?} images but stage `{}` takes {}x{} {:?}: every whole-image stage of a pipeline must take the same size",
                            b.width, b.height, b.pixel_format, first.name, a.width, a.height, a.pixel_format
                        ),
                    );
                }
            }
            let (Some(model), Some(device), true) = (model, device, self.errors.len() == n) else {
                ok = false;
                continue;
            };
            let policy = match (c.policy, &profile) {
                // A recurrent stage learns its step latency as it runs.
                (Some(PolicyKind::Aimd), _) if recurrent.is_some() => {
                    self.err(
                        &format!("{base}.policy"),
                        "a recurrent stage batches per step: `deadline` (drops items that cannot finish in time) or `fixed`",
                    );
                    PolicyKind::Fixed
                }
                (Some(p), _) if recurrent.is_some() => p,
                (None, _) if recurrent.is_some() => PolicyKind::Deadline,
                (Some(PolicyKind::Deadline), None) => {
                    self.err(
                        &format!("{base}.policy"),
                        "the deadline policy needs the stage's latency: give the stage a `profile`",
                    );
                    PolicyKind::Fixed
                }
                (Some(p), _) => p,
                (None, Some(_)) => PolicyKind::Deadline,
                (None, None) => PolicyKind::Fixed,
            };
            let auto = AutoLimits {
                batch: c.max_batch == OrAuto::Auto,
                wait: c.max_wait_ms == OrAuto::Auto,
            };
            if auto.any() {
                let key = if auto.batch {
                    "max_batch"
                } else {
                    "max_wait_ms"
                };
                if policy != PolicyKind::Fixed || recurrent.is_some() {
                    self.err(
                        &format!("{base}.{key}"),
                        "\"auto\" applies to `policy = \"fixed\"` stages (deadline stages batch by their reservations; aimd adapts by itself)",
                    );
                } else if profile.is_none() {
                    self.err(
                        &format!("{base}.{key}"),
                        "\"auto\" needs the stage's latency: give the stage a `profile` (or run it on an emulated device)",
                    );
                }
            }
            if !(c.margin_ms >= 0.0 && c.margin_ms < 10_000.0) {
                self.err(
                    &format!("{base}.margin_ms"),
                    format!("{} ms: expected 0 <= margin_ms < 10000", c.margin_ms),
                );
            }
            if self.errors.len() != n {
                ok = false;
                continue;
            }
            let max_batch = match (c.max_batch, &profile) {
                (OrAuto::Auto, Some(p)) => p.latency.len(),
                (v, _) => v.value_or(1) as usize,
            };
            out.push(StageSpec {
                name: c.name,
                model,
                device,
                profile,
                split,
                policy,
                margin: Duration::from_secs_f64(c.margin_ms.max(0.0) / 1e3),
                workers: c.workers as usize,
                threads: c.threads as usize,
                max_batch,
                // Before the first choice an auto wait is none: frames go as they come.
                max_wait: Duration::from_millis(c.max_wait_ms.value_or(0)),
                auto,
                queue: c.queue as usize,
                boxes_from,
                batching: c.batching.unwrap_or_default(),
                flow: 0,
                devices: Vec::new(),
                nodes: c.nodes.clone().unwrap_or_default(),
            });
        }
        ok.then_some(out)
    }

    /// The position of the earlier stage that `input` names (an error at `input` when there is
    /// none).
    fn earlier_stage(&mut self, base: &str, name: &str, earlier: &[StageSpec]) -> Option<usize> {
        let found = earlier.iter().position(|s| s.name == name);
        if found.is_none() {
            self.err(
                &format!("{base}.input"),
                format!("no earlier stage named `{name}`"),
            );
        }
        found
    }

    /// Checks a recurrent stage: where its items come from (returns the position of the stage
    /// whose boxes a decoder reads), its device, and its model's state tensors.
    fn recurrent_stage(
        &mut self,
        base: &str,
        c: &StageConfig,
        r: &RecurrentParams,
        m: &ModelManifest,
        device: Option<&Device>,
        earlier: &[StageSpec],
    ) -> Option<usize> {
        if device.is_some_and(|d| *d != Device::Cpu) {
            self.err(
                &format!("{base}.device"),
                "a recurrent cell runs on `cpu` (emulated devices have no per-step profile)",
            );
        }
        if c.profile.is_some() {
            self.err(
                &format!("{base}.profile"),
                "a recurrent stage measures its step latency as it runs: it takes no profile",
            );
        }
        let boxes_from = match &c.input {
            None => None,
            Some(name) => match self.earlier_stage(base, name, earlier) {
                None => None,
                Some(j) => {
                    let kind = earlier[j].model.kind;
                    let per_box = matches!(kind, ModelKind::Detect | ModelKind::TextDetect);
                    match (r.mode, per_box) {
                        (RecurrentMode::Stream, true) => {
                            self.err(
                                &format!("{base}.input"),
                                format!("stage `{name}` emits per-box items ({kind:?}), but a per-stream cell (`mode = \"stream\"` in {}) takes one item per frame: use `mode = \"decode\"`, or leave `input` out to step on whole frames", m.path.display()),
                            );
                            None
                        }
                        (RecurrentMode::Stream, false) => {
                            self.err(
                                &format!("{base}.input"),
                                "a per-stream cell steps on whole frames: leave `input` out",
                            );
                            None
                        }
                        (RecurrentMode::Decode, false) => {
                            self.err(
                                &format!("{base}.input"),
                                format!("stage `{name}` emits no boxes ({kind:?}): a decoder's `input` names a detect or text_detect stage"),
                            );
                            None
                        }
                        (RecurrentMode::Decode, true) => Some(j),
                    }
                }
            },
        };
        if let Some(onnx) = &m.onnx
            && onnx.is_file()
        {
            match crate::engine::ort::describe(onnx, self.onnxruntime.as_deref()) {
                Ok(info) => {
                    for problem in super::cell::check_io(&info, m) {
                        self.err(
                            &format!("{base}.model"),
                            format!("{}: {problem}", m.path.display()),
                        );
                    }
                }
                // Without the runtime the tensors are checked when the stage loads.
                Err(crate::engine::EngineError::Runtime(e)) => {
                    tracing::debug!(error = %e, "Recurrent cell not checked: no ONNX Runtime.")
                }
                Err(e) => self.err(&format!("{base}.model"), e.to_string()),
            }
        }
        boxes_from
    }

    fn manifest(&mut self, base: &str, name: &str, engines_dir: &Path) -> Option<ModelManifest> {
        let manifest_path = if name.ends_with(".toml") || name.contains('/') {
            self.resolve(Path::new(name))
        } else {
            engines_dir.join(format!("{name}.toml"))
        };
        if !manifest_path.is_file() {
            self.err(
                &format!("{base}.model"),
                format!("no model manifest at {}", manifest_path.display()),
            );
            return None;
        }
        match load_manifest(&manifest_path) {
            Ok(m) => Some(m),
            Err(e) => {
                self.err(
                    &format!("{base}.model"),
                    format!(
                        "model manifest {} is invalid (see below)",
                        manifest_path.display()
                    ),
                );
                self.errors.extend(e.0);
                None
            }
        }
    }

    /// Resolves `profile`/`blocks`/`share` of a stage against the profiles folder.
    fn stage_profile(
        &mut self,
        base: &str,
        c: &StageConfig,
        device: &Device,
        profiles: Option<(&crate::profile::Profiles, (f64, bool))>,
        previous: Option<&StageSpec>,
        has_split: bool,
    ) -> Option<StageProfile> {
        let emulated = matches!(device, Device::Emulated { .. });
        let Some(model) = &c.profile else {
            if emulated {
                self.err(&format!("{base}.device"), "an emulated device needs `profile` (a model of [pipeline] profiles) to know its latency");
            }
            for key in ["blocks", "share"] {
                if self.has(&format!("{base}.{key}")) && !(key == "blocks" && has_split) {
                    self.err(&format!("{base}.{key}"), format!("`{key}` needs `profile`"));
                }
            }
            return None;
        };
        let Some((profiles, link)) = profiles else {
            if !self.has("pipeline.profiles") {
                self.err(
                    &format!("{base}.profile"),
                    "set [pipeline] profiles to the folder of latency profiles",
                );
            }
            return None;
        };
        // A GPU's profiles are filed under its class (`poolpipe profile --device cuda:N` writes
        // `H200`, `L4`, ...); its driver was checked with the device.
        let class = match device {
            Device::Gpu { gpus, .. } => crate::gpu::info(&device.to_string(), gpus[0])
                .map_or_else(|_| device.class().to_string(), |g| g.class),
            _ => device.class().to_string(),
        };
        let share = c.share;
        let timing = match profiles.timing(model, &class, share) {
            Ok(t) => t,
            Err(e) => {
                let key = if matches!(e, crate::profile::ProfileError::NoModel(_)) {
                    "profile"
                } else {
                    "device"
                };
                self.err(&format!("{base}.{key}"), e.to_string());
                return None;
            }
        };
        let nblocks = timing.us.len();
        let blocks = c.blocks.unwrap_or([0, nblocks]);
        if blocks[0] >= blocks[1] || blocks[1] > nblocks {
            self.err(
                &format!("{base}.blocks"),
                format!("[{}, {}] is not a block range of `{model}`: expected [first, end) with 0 <= first < end <= {nblocks}", blocks[0], blocks[1]),
            );
            return None;
        }
        if let Some(prev) = previous.and_then(|p| p.profile.as_ref().map(|pp| (p, pp)))
            && prev.1.model == *model
            && prev.1.blocks[1] != blocks[0]
        {
            self.err(
                &format!("{base}.blocks"),
                format!(
                    "starts at block {} but stage `{}` ends at block {}: stages of one model run consecutive blocks",
                    blocks[0], prev.0.name, prev.1.blocks[1]
                ),
            );
        }
        let max_batch = c.max_batch.value_or(timing.max_batch() as u64) as usize;
        if max_batch > timing.max_batch() {
            self.err(
                &format!("{base}.max_batch"),
                format!(
                    "{max_batch}: the profile of `{model}` on {class}/{share} covers batch sizes 1..={}",
                    timing.max_batch()
                ),
            );
            return None;
        }
        Some(super::flows::profiled_costs(
            profiles,
            model,
            (&class, share),
            blocks,
            max_batch,
            link,
        ))
    }

    /// The routes of a flow served by a model family of the plan: each variant's planned
    /// pipelines, weighted by their planned rates, named `FLOW.vK.pN.sM`.
    fn family_routes(
        &mut self,
        base: &str,
        c: &FlowConfig,
        family: &[String],
        plan: Option<&PlanFile>,
        profiles: Option<&crate::profile::Profiles>,
        items: &[(String, Spanned<DeValue<'a>>)],
    ) -> Vec<BuiltRoute> {
        let key = format!("{base}.family");
        if let Some((b, _)) = items.first() {
            self.err(
                &format!("{b}.flow"),
                format!(
                    "flow `{}` is served by the plan's family: its stages come from the plan",
                    c.name
                ),
            );
        }
        if family.is_empty() {
            self.err(&key, "a family names at least one model of the plan");
            return Vec::new();
        }
        for (i, m) in family.iter().enumerate() {
            if family[..i].contains(m) {
                self.err(&key, format!("`{m}` is named twice"));
            }
        }
        let Some(p) = plan else {
            if self.opts.plan.is_none() {
                self.err(
                    &key,
                    "a flow with `family` is served by a plan: give `--plan PLAN.json` or [pipeline] plan",
                );
            }
            return Vec::new();
        };
        let mut slos: Vec<(String, f64)> = Vec::new();
        for m in family {
            match p.plan.models.iter().find(|x| &x.name == m) {
                Some(x) => slos.push((m.clone(), x.slo_ms)),
                None => {
                    let have: Vec<&str> = p.plan.models.iter().map(|m| m.name.as_str()).collect();
                    self.err(
                        &key,
                        format!(
                            "the plan {} has no model `{m}` (it plans: {})",
                            p.path.display(),
                            have.join(", ")
                        ),
                    );
                }
            }
        }
        // Variants of one task answer one request: one SLO (the planner plans a family so).
        if let Some((first, slo)) = slos.first()
            && let Some((other, o)) = slos.iter().find(|(_, o)| (o - slo).abs() > 1e-6)
        {
            self.err(
                &key,
                format!(
                    "the variants of a family share one SLO, but the plan gives `{first}` {slo:.1} ms and `{other}` {o:.1} ms"
                ),
            );
        }
        let Some(pr) = profiles else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, m) in family.iter().enumerate() {
            let accuracy = p
                .plan
                .models
                .iter()
                .find(|x| &x.name == m)
                .and_then(|x| x.accuracy);
            let mut chains =
                planned_stages(&format!("{}.v{k}", c.name), m, c.margin_ms, &p.plan, pr);
            if self.has("cluster") {
                super::flows::place_chains(&mut chains, &p.plan, m);
            }
            for (st, w) in chains {
                out.push((st, w, Some((m.clone(), accuracy))));
            }
        }
        out
    }

    /// Resolves the block range a CPU stage runs of its model's split.
    fn stage_split(
        &mut self,
        base: &str,
        c: &StageConfig,
        m: &ModelManifest,
        previous: Option<&StageSpec>,
    ) -> Option<StageSplit> {
        let blocks = c.blocks?;
        let Some(dir) = &m.split else {
            if c.profile.is_none() {
                self.err(
                    &format!("{base}.blocks"),
                    format!("model `{}` has no `split`: cut it with `poolpipe split` and name the folder in its manifest", m.name),
                );
            }
            return None;
        };
        let manifest = match crate::partition::split::read_manifest(dir) {
            Ok(sm) => sm,
            Err(e) => {
                self.err(&format!("{base}.model"), e.to_string());
                return None;
            }
        };
        let n = manifest.blocks.len();
        if blocks[0] >= blocks[1] || blocks[1] > n {
            self.err(
                &format!("{base}.blocks"),
                format!("[{}, {}] is not a block range of the split of `{}`: expected [first, end) with 0 <= first < end <= {n}", blocks[0], blocks[1], m.name),
            );
            return None;
        }
        if let Some(prev) = previous
            && prev.model.path == m.path
            && let Some(ps) = &prev.split
            && ps.blocks[1] != blocks[0]
        {
            self.err(
                &format!("{base}.blocks"),
                format!("starts at block {} but stage `{}` ends at block {}: stages of one model run consecutive blocks", blocks[0], prev.name, ps.blocks[1]),
            );
        }
        if blocks[0] > 0 && !previous.is_some_and(|p| p.model.path == m.path && p.split.is_some()) {
            self.err(
                &format!("{base}.blocks"),
                format!(
                    "starts at block {} but no earlier stage runs the blocks before it",
                    blocks[0]
                ),
            );
        }
        Some(StageSplit {
            blocks,
            files: manifest.blocks[blocks[0]..blocks[1]]
                .iter()
                .map(|b| dir.join(&b.file))
                .collect(),
            first: blocks[0] == 0,
            last: blocks[1] == n,
        })
    }

    /// The device of a stage: `device`, or `devices` (GPUs), with its `precision`. A GPU device
    /// is checked as far as can be without starting anything: the build has GPU support, the
    /// driver loads and the GPUs exist.
    fn stage_device(&mut self, base: &str, c: &StageConfig) -> Option<Device> {
        let (key, parsed) = match &c.devices {
            Some(list) => {
                let key = format!("{base}.devices");
                if self.has(&format!("{base}.device")) {
                    self.err(&key, "give `device` or `devices`, not both");
                    return None;
                }
                (key, Device::parse_list(list))
            }
            None => (format!("{base}.device"), Device::parse(&c.device)),
        };
        let mut device = parsed.map_err(|e| self.err(&key, e)).ok()?;
        let precision_key = format!("{base}.precision");
        match (&mut device, &c.precision) {
            (
                Device::Gpu {
                    backend,
                    gpus,
                    precision,
                },
                p,
            ) => {
                if let Some(p) = p {
                    match crate::gpu::Precision::parse(p)
                        .and_then(|p| crate::gpu::check_precision(*backend, p).map(|_| p))
                    {
                        Ok(p) => *precision = p,
                        Err(e) => {
                            self.err(&precision_key, e);
                            return None;
                        }
                    }
                }
                let wanted: Vec<(String, u32)> = gpus
                    .iter()
                    .map(|g| (format!("{}:{g}", backend.prefix()), *g))
                    .collect();
                if let Err(e) = crate::gpu::check_devices(&wanted) {
                    self.err(&key, e.to_string());
                    return None;
                }
            }
            (_, Some(_)) => {
                self.err(
                    &precision_key,
                    "`precision` applies to GPU devices (`cuda:N`, `tensorrt:N`)",
                );
                return None;
            }
            (_, None) => {}
        }
        Some(device)
    }

    fn sinks(&mut self, pipeline: &str) -> Option<Vec<SinkSpec>> {
        let mut out: Vec<SinkSpec> = Vec::new();
        let mut ok = true;
        let items = self.items("sink");
        let mut kinds_seen: std::collections::HashMap<SinkKind, usize> = Default::default();
        for (base, value) in items {
            let present: Vec<String> = match value.get_ref() {
                DeValue::Table(t) => t.keys().map(|k| k.get_ref().to_string()).collect(),
                _ => Vec::new(),
            };
            let read = SinkConfig::read(&mut SinkParts {
                validator: self,
                base: &base,
                value: &value,
            });
            let Some(c) = read else {
                ok = false;
                continue;
            };
            let n = kinds_seen.entry(c.kind).or_default();
            *n += 1;
            let name = match &c.name {
                Some(n) => n.clone(),
                None if *n == 1 => c.kind.as_str().to_string(),
                None => format!("{}-{}", c.kind.as_str(), n),
            };
            if name.is_empty() || name.contains(char::is_whitespace) {
                self.err(
                    &format!("{base}.name"),
                    "a sink name needs letters and no spaces",
                );
                ok = false;
                continue;
            }
            if out.iter().any(|s| s.name == name) {
                self.err(
                    &format!("{base}.name"),
                    format!("two sinks are named `{name}`; give each a distinct `name`"),
                );
                ok = false;
                continue;
            }
            let env = |k: &str| std::env::var(k).ok();
            let ctx = crate::sinks::spec::Ctx {
                pipeline,
                dir: self.dir,
                env: &env,
                data_dir: self.opts.data_dir.as_deref(),
            };
            match crate::sinks::spec::validate(&c, &present, name, &ctx) {
                Ok(spec) => {
                    if let Some(path) = spec.file()
                        && let Some(other) = out.iter().find(|s| s.file() == Some(path))
                    {
                        self.err(
                            &format!("{base}.path"),
                            format!(
                                "sink `{}` writes {} already: two sinks writing one file would mix their lines",
                                other.name,
                                path.display()
                            ),
                        );
                        ok = false;
                        continue;
                    }
                    out.push(spec)
                }
                Err(problems) => {
                    ok = false;
                    for (key, message) in problems {
                        let full = format!("{base}.{key}");
                        if self.has(&full) {
                            self.err(&full, message);
                        } else {
                            self.err(&base, format!("{key}: {message}"));
                        }
                    }
                }
            }
        }
        ok.then_some(out)
    }
}

impl Validator<'_, '_> {
    /// `[[flow]]` tables, checked (none: an empty list).
    pub(super) fn flow_configs(&mut self) -> Vec<(String, FlowConfig)> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (base, value) in self.items_optional("flow") {
            let Some(c) = self.part::<FlowConfig>(&base, value) else {
                continue;
            };
            self.check_name(&format!("{base}.name"), &c.name, &mut seen, "flow");
            if let Some(s) = c.slo_ms
                && (s == 0 || s > 3_600_000)
            {
                self.err(
                    &format!("{base}.slo_ms"),
                    format!("{s} is not a latency budget: expected 1..=3600000 milliseconds"),
                );
            }
            if !(c.margin_ms >= 0.0 && c.margin_ms < 10_000.0) {
                self.err(
                    &format!("{base}.margin_ms"),
                    format!("{} ms: expected 0 <= margin_ms < 10000", c.margin_ms),
                );
            }
            if c.model.is_none() && self.has(&format!("{base}.margin_ms")) {
                self.err(
                    &format!("{base}.margin_ms"),
                    "`margin_ms` applies to flows served by a plan (`model`); set it on each [[stage]] otherwise",
                );
            }
            out.push((base, c));
        }
        out
    }

    /// The plan named by `--plan` or `[pipeline] plan`, read and checked against the profiles
    /// (`planner::check`): each broken rule is a problem in the plan file.
    pub(super) fn plan_file(
        &mut self,
        from_file: Option<&Path>,
        from_cli: Option<&Path>,
        profiles: Option<&crate::profile::Profiles>,
    ) -> Option<PlanFile> {
        let path = match (from_cli, from_file) {
            (Some(p), _) => p.to_path_buf(),
            (None, Some(p)) => self.resolve(p),
            (None, None) => return None,
        };
        let file = match read_plan(&path) {
            Ok(f) => f,
            Err(d) => {
                if from_cli.is_none() && d.line == 0 {
                    self.err("pipeline.plan", d.message);
                } else {
                    self.errors.push(d);
                }
                return None;
            }
        };
        let Some(profiles) = profiles else {
            self.err_plan_key(
                from_cli.is_some(),
                "a plan needs the latency profiles of its models: set [pipeline] profiles, --profiles or POOLPIPE_PROFILES",
            );
            return None;
        };
        let violations = crate::planner::check::check(&file.plan, profiles);
        for v in &violations {
            let needle = v
                .model
                .as_ref()
                .map_or_else(|| "\"models\"".to_string(), |m| format!("\"{m}\""));
            let d = file.diag(
                &needle,
                &v.model
                    .as_ref()
                    .map_or("plan".to_string(), |m| format!("models.{m}")),
                format!(
                    "the plan breaks rule {:?} of `poolpipe plan`'s checks: {}",
                    v.rule, v.message
                ),
            );
            self.errors.push(d);
        }
        violations.is_empty().then_some(file)
    }

    fn err_plan_key(&mut self, cli: bool, message: &str) {
        if cli {
            self.errors.push(Diagnostic {
                file: self.parsed.src.path.to_path_buf(),
                line: 0,
                column: 0,
                key: "--plan".into(),
                message: message.to_string(),
            });
        } else {
            self.err("pipeline.plan", message);
        }
    }
}

/// The parts of one `[[sink]]` table, each read from the whole table (see
/// [`crate::sinks::spec::PartReader`]).
struct SinkParts<'v, 'p, 'a, 'b> {
    validator: &'v mut Validator<'p, 'a>,
    base: &'b str,
    value: &'b Spanned<DeValue<'a>>,
}

impl crate::sinks::spec::PartReader for SinkParts<'_, '_, '_, '_> {
    fn read<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        self.validator.part::<T>(self.base, self.value.clone())
    }
}
