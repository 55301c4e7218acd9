//! Pipeline files and model manifests.
//!
//! Loading has two phases, as in vector: a pure *validation* phase that parses the TOML, checks
//! every component and collects every problem with file:line:column and key path (nothing is
//! opened but the files that the config names, to check that they exist), and a *build* phase
//! (in [`crate::pipeline`]) that starts GStreamer and loads engines from the validated
//! [`Pipeline`].
//!
//! Relative paths in a file are relative to the folder of that file.

mod analytics;
pub mod cell;
mod diag;
mod flows;
mod load;
mod manifest;
mod outputs;
mod parse;

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::sinks::spec::{SinkConfig, SinkKind, SinkSpec};
pub use analytics::AnalyticsSpec;
pub use diag::{ConfigErrors, Diagnostic, SourceText, SpanIndex};
pub use flows::{
    FlowSpec, PlanRef, RouteSpec, assign_devices, assign_free_devices, placed_nodes, planned_stages,
};
pub use load::{
    LoadOptions, PROFILES_ENV, load_pipeline, load_pipeline_str, load_pipeline_with,
    load_source_str,
};
pub use manifest::{
    Backend, ClassifyParams, DetectFormat, DetectParams, FeedbackSpec, ImageSpec, Layout,
    ModelKind, ModelManifest, RecurrentMode, RecurrentParams, Resize, StateSpec, TextDetectParams,
    TextRecognizeParams, class_filter, load_manifest,
};
pub use outputs::{DrawItem, OutputKind, OutputSpec, SnapshotWhen};

/// `[pipeline]`: settings of the whole pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Name shown in logs and reports.
    pub name: String,
    /// Latency budget of every frame, from capture to publication, in milliseconds.
    pub slo_ms: u64,
    /// Folder of model manifests that `stage.model` names are looked up in.
    #[serde(default = "default_engines_dir")]
    pub engines_dir: PathBuf,
    /// Path of the ONNX Runtime shared library (else `ORT_DYLIB_PATH`, else `engines/lib`).
    #[serde(default)]
    pub onnxruntime: Option<PathBuf>,
    /// Folder of built TensorRT engines (`tensorrt:N` stages; default `trt-cache` in the engines
    /// folder).
    #[serde(default)]
    pub engine_cache: Option<PathBuf>,
    /// A stage that runs the first blocks of a cut model leaves each batch's activation where
    /// its engine computed it (on its GPU, or in ONNX Runtime's host memory) when the next stage
    /// runs in this process on the same side; `false` copies every activation to the host and
    /// back.
    #[serde(default = "yes")]
    pub keep_activations: bool,
    /// Folder of latency profiles (see [`crate::profile`]) for emulated and profiled stages
    /// (else `--profiles`, `POOLPIPE_PROFILES`, or `profiles` in the engines folder).
    #[serde(default)]
    pub profiles: Option<PathBuf>,
    /// A planner plan (`poolpipe plan --out`) whose pipelines serve the `[[flow]]`s that name a
    /// `model` (`poolpipe run --plan` overrides it).
    #[serde(default)]
    pub plan: Option<PathBuf>,
    /// The devices this machine has, `CLASS:COUNT,...` (e.g. `L4:2,T4:6`); a plan that uses more
    /// is refused.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Link bandwidth between stages, gigabits per second (transfer time of cuts).
    #[serde(default = "default_bandwidth_gbps")]
    pub bandwidth_gbps: f64,
    /// Emulated stages send batch k to the next stage while they compute batch k+1 (one batch
    /// in flight on the link per process), instead of holding the batch until it is sent.
    /// Stages built from a plan do what the plan assumed.
    #[serde(default)]
    pub send_while_computing: bool,
}

fn default_bandwidth_gbps() -> f64 {
    10.0
}

fn default_engines_dir() -> PathBuf {
    PathBuf::from("../engines")
}

/// `[cluster]`: the nodes a pipeline spans (see [`crate::cluster`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The node that runs the sources, batchers, publisher and sinks (`poolpipe run`).
    pub front: String,
    /// Every other node: name -> `HOST:PORT` its `poolpipe node` serves on.
    pub nodes: std::collections::BTreeMap<String, String>,
    /// NATS server of the control plane (`nats://HOST:PORT`): heartbeats, membership and plan
    /// epochs from `poolpipe controller`. Without it the plan is the file's, fixed.
    #[serde(default)]
    pub nats: Option<String>,
    /// How many fronts share the cameras at once (with `nats`): the controller splits the
    /// sources and routes into this many shards, and each `poolpipe run` of the file takes one
    /// (a further one stands by). 1 (the default): one front runs every camera.
    #[serde(default = "one_front")]
    pub fronts: u32,
    /// A stage's output goes from the node that computed it straight to the node of the next
    /// stage (true, the default), or back through the front (false).
    #[serde(default = "yes")]
    pub direct_links: bool,
    /// With direct links: the most a node holds for the next stages' nodes to take, MiB; past
    /// it, it answers with the bytes instead.
    #[serde(default = "hold_mib")]
    pub hold_mib: u64,
    /// With direct links: how long a node holds an output nobody took, ms (then it is dropped
    /// and counted `expired`).
    #[serde(default = "hold_ms")]
    pub hold_ms: u64,
}

fn one_front() -> u32 {
    1
}

/// `[cluster] hold_mib` by default.
pub const DEFAULT_HOLD_MIB: u64 = 1024;
/// `[cluster] hold_ms` by default.
pub const DEFAULT_HOLD_MS: u64 = 5000;

fn hold_mib() -> u64 {
    DEFAULT_HOLD_MIB
}

fn hold_ms() -> u64 {
    DEFAULT_HOLD_MS
}

fn yes() -> bool {
    true
}

/// A validated `[cluster]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSpec {
    /// The front node.
    pub front: String,
    /// Every other node's address.
    pub nodes: std::collections::BTreeMap<String, String>,
    /// NATS server of the control plane, when a controller owns the plan.
    pub nats: Option<String>,
    /// Fronts sharing the cameras at once (1: one front runs them all).
    pub fronts: u32,
    /// Outputs go straight from node to node, not through the front.
    pub direct_links: bool,
    /// The most a node holds for other nodes to take, bytes.
    pub hold_bytes: usize,
    /// How long a node holds an output nobody took.
    pub hold_for: Duration,
}

/// How a non-live source is paced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pace {
    /// At the media's own frame rate, like a camera; frames are dropped when the pipeline is full.
    Realtime,
    /// As fast as the pipeline takes them; the source waits when the pipeline is full (offline
    /// processing and benchmarks), so nothing is dropped at the source.
    Fast,
}

/// RTSP lower transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// RTP interleaved in the RTSP TCP connection (works through NAT and firewalls).
    #[default]
    Tcp,
    /// RTP over UDP.
    Udp,
}

/// `[[source]]`: one camera or file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Stream name, unique in the pipeline.
    pub name: String,
    /// `rtsp://…`, `file://…`, a path, or `test://PATTERN` (a GStreamer videotestsrc pattern).
    pub uri: String,
    /// Drop frames in GStreamer above this many frames per second.
    #[serde(default)]
    pub max_fps: Option<u32>,
    /// Files and test sources: start again at the end.
    #[serde(default, rename = "loop")]
    pub looping: bool,
    /// Files and test sources: `realtime` (default) or `fast`.
    #[serde(default)]
    pub pace: Option<Pace>,
    /// RTSP: `tcp` (default) or `udp`.
    #[serde(default)]
    pub transport: Transport,
    /// Decoder of RTSP and file sources: `auto` (default: GStreamer picks, on the CPU) or
    /// `nvdec` (NVIDIA's decoder, on GPU `gpu`).
    #[serde(default)]
    pub decode: Option<String>,
    /// `decode = "nvdec"`: the GPU that decodes (default 0).
    #[serde(default)]
    pub gpu: Option<u32>,
    /// `decode = "nvdec"`: the stream's codec, `h264` (default) or `h265`.
    #[serde(default)]
    pub codec: Option<String>,
    /// RTSP: jitter buffer latency in milliseconds.
    #[serde(default = "default_latency_ms")]
    pub latency_ms: u32,
    /// First reconnect delay of a live source, in milliseconds.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Cap of the exponential reconnect delay, in milliseconds.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// A live source that delivers no frame for this long is restarted, in milliseconds.
    #[serde(default = "default_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
    /// Test sources: end after this many frames.
    #[serde(default)]
    pub num_buffers: Option<u32>,
    /// The `[[flow]]` its frames go through (may be left out when there is one flow).
    #[serde(default)]
    pub flow: Option<String>,
    /// Share of its flow's capacity under overload, relative to other streams (1..=100).
    #[serde(default = "one")]
    pub priority: u32,
}

/// `[[flow]]`: one model chain with its own SLO, fed by the sources that name it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// Flow name, unique in the pipeline; results carry it.
    pub name: String,
    /// Latency budget of its frames (default: the plan's SLO of its model, else the pipeline's).
    #[serde(default)]
    pub slo_ms: Option<u64>,
    /// A model of the plan: its planned pipelines become this flow's stages (else the
    /// `[[stage]]`s that name this flow).
    #[serde(default)]
    pub model: Option<String>,
    /// A model family of the plan (`poolpipe plan --demand ... --accuracy ...`): every
    /// variant's planned pipelines serve this flow, frames split in the planned proportions.
    #[serde(default)]
    pub family: Option<Vec<String>>,
    /// Planned stages: safety margin of the `deadline` policy, in milliseconds.
    #[serde(default = "default_margin_ms")]
    pub margin_ms: f64,
}

fn default_latency_ms() -> u32 {
    200
}
fn default_reconnect_min_ms() -> u64 {
    500
}
fn default_reconnect_max_ms() -> u64 {
    10_000
}
fn default_stall_timeout_ms() -> u64 {
    5_000
}

/// `[[stage]]`: one step of the model chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Stage name, unique in the pipeline; results are keyed by it.
    pub name: String,
    /// A manifest name in `engines_dir` (`ppocr-det` -> `ppocr-det.toml`) or a path to a manifest
    /// (optional on emulated devices, which compute nothing).
    #[serde(default)]
    pub model: Option<String>,
    /// Device kind of the stage's pool: `cpu`, `emulated:<class>` (e.g. `emulated:T4`),
    /// `cuda:N` or `tensorrt:N` (builds with the `gpu` feature).
    #[serde(default = "default_device")]
    pub device: String,
    /// GPUs the workers are spread over in turn (`["cuda:0", "cuda:1"]`), instead of `device`.
    #[serde(default)]
    pub devices: Option<Vec<String>>,
    /// The node each worker runs on (names from `[cluster]`), one per worker.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// GPU stages: `fp32` (default), `tf32` or `fp16` (TensorRT).
    #[serde(default)]
    pub precision: Option<String>,
    /// Processes sharing one device (profiles are per share; 1 = the whole device).
    #[serde(default = "one")]
    pub share: u32,
    /// Model name in the profiles folder whose timings this stage follows.
    #[serde(default)]
    pub profile: Option<String>,
    /// Block range `[first, end)` that this stage runs: of the profiled model (emulated devices,
    /// and the deadline policy), and on `cpu` of the model's split (default: all).
    #[serde(default)]
    pub blocks: Option<[usize; 2]>,
    /// Batching policy: `deadline` (default where the stage has a profile), `fixed` (default
    /// otherwise) or `aimd`.
    #[serde(default)]
    pub policy: Option<PolicyKind>,
    /// `deadline`: safety margin added to every planned finish, in milliseconds.
    #[serde(default = "default_margin_ms")]
    pub margin_ms: f64,
    /// Workers in the pool; each owns an engine instance and a thread.
    #[serde(default = "one")]
    pub workers: u32,
    /// Threads each engine instance uses for one inference.
    #[serde(default = "one")]
    pub threads: u32,
    /// Largest batch the stage runs; `"auto"` (`fixed` stages with a profile): chosen from the
    /// measured demand ([`crate::batcher::analytic`]).
    #[serde(default = "default_max_batch")]
    pub max_batch: OrAuto,
    /// Longest time the first frame of a batch waits for more, in milliseconds; `"auto"` as
    /// for `max_batch`.
    #[serde(default = "default_max_wait_ms")]
    pub max_wait_ms: OrAuto,
    /// Frames the stage's queue holds; when it is full upstream waits (or a source drops).
    #[serde(default = "default_queue")]
    pub queue: u32,
    /// `text_recognize` stages: the `text_detect` stage whose boxes to read (default: the nearest
    /// earlier one).
    #[serde(default)]
    pub input: Option<String>,
    /// `detect` stages: publish only these classes (labels or class ids), instead of the
    /// manifest's `[detect] classes`.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// The `[[flow]]` this stage belongs to (may be left out when there is one flow).
    #[serde(default)]
    pub flow: Option<String>,
    /// Recurrent stages: `cellular` (a step's batch is assembled anew from the items at that
    /// step) or `padded` (whole groups of items run until the longest ends).
    #[serde(default)]
    pub batching: Option<crate::batcher::cell::CellBatching>,
}

fn default_margin_ms() -> f64 {
    2.0
}

pub use crate::batcher::PolicyKind;

fn default_device() -> String {
    "cpu".into()
}
fn one() -> u32 {
    1
}
fn default_max_batch() -> OrAuto {
    OrAuto::Value(4)
}
fn default_max_wait_ms() -> OrAuto {
    OrAuto::Value(10)
}

/// A number, or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrAuto {
    /// As written.
    Value(u64),
    /// Chosen while running.
    Auto,
}

impl OrAuto {
    /// The number, or `auto` when chosen while running.
    pub fn value_or(self, auto: u64) -> u64 {
        match self {
            OrAuto::Value(v) => v,
            OrAuto::Auto => auto,
        }
    }
}

impl<'de> Deserialize<'de> for OrAuto {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = OrAuto;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number or \"auto\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<OrAuto, E> {
                u64::try_from(v).map(OrAuto::Value).map_err(|_| {
                    E::custom(format!(
                        "{v} is negative: expected a whole number >= 0 or \"auto\""
                    ))
                })
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<OrAuto, E> {
                Ok(OrAuto::Value(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OrAuto, E> {
                if v == "auto" {
                    Ok(OrAuto::Auto)
                } else {
                    Err(E::custom(format!(
                        "`{v}`: expected a whole number or \"auto\""
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}
fn default_queue() -> u32 {
    8
}

/// Where a source's frames come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// An RTSP camera.
    Rtsp {
        /// `rtsp://…` URL (may carry credentials; never logged as is).
        url: String,
        /// Lower transport.
        transport: Transport,
        /// Jitter buffer latency.
        latency_ms: u32,
    },
    /// A media file.
    File {
        /// Absolute path.
        path: PathBuf,
    },
    /// A GStreamer test pattern.
    Test {
        /// videotestsrc pattern name.
        pattern: String,
    },
}

/// How a source decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Decode {
    /// `decodebin` picks a decoder (on the CPU).
    #[default]
    Auto,
    /// NVIDIA's hardware decoder (GStreamer `nvcodec`) on a GPU.
    Nvdec {
        /// GPU index.
        gpu: u32,
        /// `true` for H.265, `false` for H.264.
        h265: bool,
    },
}

impl Decode {
    /// The parser and decoder elements of `nvdec` (`h264parse`, `nvh264dec`; GPU n > 0 has
    /// `nvh264device{n}dec`), none for `auto`.
    pub fn nvdec_elements(self) -> Option<(&'static str, String)> {
        match self {
            Decode::Auto => None,
            Decode::Nvdec { gpu, h265 } => {
                let codec = if h265 { "h265" } else { "h264" };
                let dec = if gpu == 0 {
                    format!("nv{codec}dec")
                } else {
                    format!("nv{codec}device{gpu}dec")
                };
                Some((if h265 { "h265parse" } else { "h264parse" }, dec))
            }
        }
    }
}

/// A validated source.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// Stream name.
    pub name: String,
    /// How it decodes.
    pub decode: Decode,
    /// Where frames come from.
    pub kind: SourceKind,
    /// Frame rate cap, frames per second.
    pub max_fps: Option<u32>,
    /// Restart at EOS (files, test sources).
    pub looping: bool,
    /// Pacing of files and test sources (RTSP is always real time).
    pub pace: Pace,
    /// First reconnect delay.
    pub reconnect_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_max: Duration,
    /// Restart a live source after this long without a frame.
    pub stall_timeout: Duration,
    /// Test sources: frames before EOS.
    pub num_buffers: Option<u32>,
    /// The flow it feeds, as written (None: the only flow).
    pub flow: Option<String>,
    /// Weight of its share under overload.
    pub priority: u32,
}

impl SourceSpec {
    /// Live sources reconnect on errors and EOS; others end.
    pub fn is_live(&self) -> bool {
        matches!(self.kind, SourceKind::Rtsp { .. })
    }

    /// The URI with any password replaced by `***`, for logs.
    pub fn redacted_uri(&self) -> String {
        match &self.kind {
            SourceKind::Rtsp { url, .. } => redact_url(url),
            SourceKind::File { path } => path.display().to_string(),
            SourceKind::Test { pattern } => format!("test://{pattern}"),
        }
    }
}

/// Replaces the password of `scheme://user:password@host` with `***`.
pub fn redact_url(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            let user = userinfo.split(':').next().unwrap_or("");
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_string()
            };
            return format!("{}{}{}", &url[..scheme_end + 3], masked, &rest[at..]);
        }
    }
    url.to_string()
}

pub use crate::device::Device;

/// The blocks of a cut model that a CPU stage runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageSplit {
    /// Block range `[first, end)`.
    pub blocks: [usize; 2],
    /// The block files, in order.
    pub files: Vec<PathBuf>,
    /// Whether the range starts at the model's input (else it reads the previous stage's
    /// activation).
    pub first: bool,
    /// Whether the range ends at the model's output (else it passes an activation on).
    pub last: bool,
}

/// The profiled cost of a stage, resolved from the profiles folder at validation.
#[derive(Debug, Clone, PartialEq)]
pub struct StageProfile {
    /// Model name in the profiles.
    pub model: String,
    /// Device class.
    pub class: String,
    /// Processes per device.
    pub share: u32,
    /// Block range `[first, end)`.
    pub blocks: [usize; 2],
    /// Latency of the block range at batch `b`, at index `b - 1` (up to the stage's max batch).
    pub latency: Vec<Duration>,
    /// Bytes per frame sent to the next stage (none after the model's last block).
    pub cut_bytes: Option<u64>,
    /// Time to send a batch of `b` frames to the next stage at the pipeline's bandwidth, at
    /// index `b - 1` (zero after the model's last block).
    pub transfer: Vec<Duration>,
    /// The process sends batch k while it computes batch k+1, instead of holding the batch
    /// until it is sent.
    pub send_while_computing: bool,
    /// Time for a batch of `b` frames to reach a worker of this stage over the worker's own
    /// link, at index `b - 1`: set on the front for a stage whose workers run on other nodes
    /// ([`crate::cluster::charge_transfers_to_remote_stages`]); empty otherwise.
    pub receive: Vec<Duration>,
}

/// A validated stage.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Stage name.
    pub name: String,
    /// The model it runs.
    pub model: ModelManifest,
    /// Device kind of its pool.
    pub device: Device,
    /// Profiled cost, when the stage names a profile (always, for emulated devices).
    pub profile: Option<StageProfile>,
    /// CPU stages that run a block range of a cut model.
    pub split: Option<StageSplit>,
    /// Batching policy.
    pub policy: PolicyKind,
    /// `deadline`: safety margin of planned finishes.
    pub margin: Duration,
    /// Workers in the pool.
    pub workers: usize,
    /// Threads per engine instance.
    pub threads: usize,
    /// Largest batch.
    pub max_batch: usize,
    /// Longest wait of a batch's first frame.
    pub max_wait: Duration,
    /// Queue capacity in frames.
    pub queue: usize,
    /// `text_recognize` (and recurrent decoders over boxes): position (in its route) of the
    /// stage whose boxes it reads.
    pub boxes_from: Option<usize>,
    /// Recurrent stages: how a step's batch is formed.
    pub batching: crate::batcher::cell::CellBatching,
    /// `fixed` stages: whether `max_batch` / `max_wait` are chosen while running from the
    /// measured demand (then `max_batch` is the profile's largest batch and `max_wait` the
    /// wait before the first choice).
    pub auto: AutoLimits,
    /// The flow it belongs to (index into [`Pipeline::flows`]).
    pub flow: usize,
    /// The device each worker runs on (`L4:0`, `T4:3`, `cpu`), one per worker.
    pub devices: Vec<String>,
    /// The node each worker runs on, one per worker (`[cluster]`); empty: all on the front.
    pub nodes: Vec<String>,
}

impl StageSpec {
    /// The node worker `w` runs on, where it is not the front.
    pub fn remote_node<'a>(&'a self, w: usize, cluster: Option<&ClusterSpec>) -> Option<&'a str> {
        let node = self.nodes.get(w)?;
        let c = cluster?;
        (node != &c.front).then_some(node.as_str())
    }
}

/// Which batching limits of a `fixed` stage are chosen while running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AutoLimits {
    /// `max_batch = "auto"`.
    pub batch: bool,
    /// `max_wait_ms = "auto"`.
    pub wait: bool,
}

impl AutoLimits {
    /// Whether anything is chosen while running.
    pub fn any(self) -> bool {
        self.batch || self.wait
    }
}

/// A validated pipeline, ready to build.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file it came from.
    pub file: PathBuf,
    /// Name.
    pub name: String,
    /// Latency budget of every frame.
    pub slo: Duration,
    /// ONNX Runtime library named in the file.
    pub onnxruntime: Option<PathBuf>,
    /// Folder of built TensorRT engines.
    pub engine_cache: PathBuf,
    /// Cut models' activations stay where they were computed, for the next stage in this
    /// process (`[pipeline] keep_activations`).
    pub keep_activations: bool,
    /// Sources in file order; a frame's `stream` indexes this.
    pub sources: Vec<SourceSpec>,
    /// Stages in order.
    pub stages: Vec<StageSpec>,
    /// Sinks.
    pub sinks: Vec<SinkSpec>,
    /// Annotated video out (`[[output]]`).
    pub outputs: Vec<OutputSpec>,
    /// Link bandwidth between stages, Gbit/s.
    pub bandwidth_gbps: f64,
    /// Flows: model chains with their SLOs (one, named after the pipeline, in a file without
    /// `[[flow]]`).
    pub flows: Vec<FlowSpec>,
    /// Chains of stages; every flow has one or more (a plan's pipelines side by side).
    pub routes: Vec<RouteSpec>,
    /// Tracking and rules after the detectors.
    pub analytics: AnalyticsSpec,
    /// The plan the flows follow, if any.
    pub plan: Option<PlanRef>,
    /// How it was loaded (`--plan`, `--profiles`), so that a reload reads it the same way.
    pub options: LoadOptions,
    /// The nodes it spans, if more than one.
    pub cluster: Option<ClusterSpec>,
}

impl Pipeline {
    /// The flow a source feeds: the one it names, or the only one.
    pub fn flow_of(&self, s: &SourceSpec) -> Option<usize> {
        match &s.flow {
            Some(name) => self.flows.iter().position(|f| &f.name == name),
            None => (self.flows.len() == 1).then_some(0),
        }
    }

    /// Size and pixel format of the images the sources of the first flow deliver.
    pub fn ingest_format(&self) -> ImageSpec {
        self.ingest_format_of(0)
    }

    /// Size and pixel format of the images that sources of flow `flow` deliver: the input of
    /// the first stage of its first route that takes whole images (a pass-through stage may name
    /// one with an [image] section); where only detectors take images, the source's own size
    /// (width and height 0) in the first detector's pixel format, since detectors fit frames to
    /// their input themselves and publish boxes in the camera's pixels.
    pub fn ingest_format_of(&self, flow: usize) -> ImageSpec {
        let route = self
            .flows
            .get(flow)
            .and_then(|f| f.routes.first())
            .map(|r| self.routes[*r].stages.as_slice())
            .unwrap_or_default();
        let stages = || route.iter().map(|i| &self.stages[*i]);
        stages()
            .filter(|s| {
                !matches!(
                    s.model.kind,
                    ModelKind::TextRecognize | ModelKind::Detect | ModelKind::Recurrent
                )
            })
            .find_map(|s| s.model.image.clone())
            .or_else(|| {
                stages()
                    .filter(|s| s.model.kind == ModelKind::Detect)
                    .find_map(|s| s.model.image.clone())
                    .map(|i| ImageSpec {
                        width: 0,
                        height: 0,
                        ..i
                    })
            })
            .unwrap_or_else(ImageSpec::passthrough)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("rtsp://admin:s3cret@10.0.0.5:554/live"),
            "rtsp://admin:***@10.0.0.5:554/live"
        );
        assert_eq!(redact_url("rtsp://admin@cam/live"), "rtsp://admin@cam/live");
        assert_eq!(redact_url("rtsp://cam:554/a@b"), "rtsp://cam:554/a@b");
        assert_eq!(redact_url("file:///x"), "file:///x");
    }
}
