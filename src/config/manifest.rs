//! Model manifests (`engines/*.toml`): what a model file is and how to feed and read it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::diag::ConfigErrors;
use super::parse::{ParsedFile, deserialize_part, read_config};
use crate::frame::PixelFormat;

/// Which engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// ONNX Runtime on the CPU.
    #[default]
    Onnxruntime,
    /// No inference at all: measures the pipeline's own overhead.
    Noop,
}

/// What the model computes, which decides its pre- and post-processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Image -> class scores; publishes the top classes.
    Classify,
    /// Image -> text probability map (DB); publishes text boxes.
    TextDetect,
    /// Crops of an earlier stage's text boxes -> characters (CTC); publishes text.
    TextRecognize,
    /// Single-shot object detector (YOLO families); publishes labelled boxes. Takes frames at
    /// any size: it letterboxes (or stretches) them to its input itself.
    Detect,
    /// Runs nothing; frames pass through (with the `noop` backend).
    Passthrough,
    /// One step of a recurrent cell (`[recurrent]`): per-stream state over frames, or per-item
    /// decoding until an end condition, with cellular batching.
    Recurrent,
}

impl ModelKind {
    /// Whether the model's input is the whole frame (so ingest scales frames to its size).
    pub fn takes_whole_image(self) -> bool {
        matches!(self, ModelKind::Classify | ModelKind::TextDetect)
    }
}

/// Tensor layout of an image input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Layout {
    /// Batch, channels, height, width.
    #[default]
    NCHW,
    /// Batch, height, width, channels.
    NHWC,
}

/// `[image]`: the image a model takes and how to normalise it: `(pixel / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Input width in pixels (text recognisers: the smallest padded width).
    pub width: u32,
    /// Input height in pixels.
    pub height: u32,
    /// Channel order the model was trained on.
    #[serde(default = "default_pixel_format")]
    pub pixel_format: PixelFormat,
    /// Tensor layout.
    #[serde(default)]
    pub layout: Layout,
    /// Per-channel mean, in the model's channel order.
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    #[serde(default = "default_std")]
    pub std: [f32; 3],
}

fn default_pixel_format() -> PixelFormat {
    PixelFormat::RGB
}
fn default_mean() -> [f32; 3] {
    [0.485, 0.456, 0.406]
}
fn default_std() -> [f32; 3] {
    [0.229, 0.224, 0.225]
}

impl ImageSpec {
    /// What sources deliver when no stage takes whole images: a small RGB frame.
    pub fn passthrough() -> Self {
        Self {
            width: 320,
            height: 240,
            pixel_format: PixelFormat::RGB,
            layout: Layout::NCHW,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }
}

/// `[classify]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyParams {
    /// Classes published per frame.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Labels file, one per line (else `class_<id>`).
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// The labels, read from the file when the manifest is loaded.
    #[serde(skip)]
    pub names: Vec<String>,
}

fn default_top_k() -> usize {
    5
}

impl Default for ClassifyParams {
    fn default() -> Self {
        Self {
            top_k: default_top_k(),
            labels: None,
            names: Vec::new(),
        }
    }
}

/// `[text_detect]`: DB post-processing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextDetectParams {
    /// Probability above which a pixel is text.
    pub thresh: f32,
    /// Mean probability a region needs to be kept.
    pub box_thresh: f32,
    /// How far a region is grown (DB shrinks text regions in training).
    pub unclip_ratio: f32,
    /// Shortest side a region needs, in map pixels.
    pub min_size: f32,
    /// Most regions kept per frame.
    pub max_candidates: usize,
    /// Dilate the bitmap by 2x2 before finding regions.
    pub dilate: bool,
}

impl Default for TextDetectParams {
    fn default() -> Self {
        Self {
            thresh: 0.3,
            box_thresh: 0.5,
            unclip_ratio: 1.6,
            min_size: 3.0,
            max_candidates: 1000,
            dilate: true,
        }
    }
}

/// How a detector's output tensor is laid out (one image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectFormat {
    /// `[boxes, 5 + classes]`: centre x, centre y, width, height, objectness, class scores
    /// (YOLOv3, v5, v7; score = objectness x class score).
    Yolo,
    /// `[4 + classes, boxes]`: centre x, centre y, width, height, class scores, without
    /// objectness (YOLOv8, v11).
    Yolov8,
}

/// How frames are fitted to a detector's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Scaled to fit with the aspect kept, centred, the borders filled with `pad`.
    Letterbox,
    /// Scaled to the input size, aspect not kept.
    Stretch,
}

/// `[detect]`: single-shot detector post-processing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectParams {
    /// Output layout.
    pub format: DetectFormat,
    /// Box coordinates are fractions of the input size (else input pixels).
    pub normalized: bool,
    /// Fitting frames to the input.
    pub resize: Resize,
    /// Pixel value (0-255) of letterbox borders (Darknet: 127.5; Ultralytics: 114).
    pub pad: f32,
    /// Lowest score of a published object.
    pub score: f32,
    /// Boxes of one class overlapping more than this (IoU) are one object.
    pub iou: f32,
    /// Only these classes (labels or ids as strings); empty: all.
    pub classes: Vec<String>,
    /// Most objects per frame (the highest scores).
    pub max_objects: usize,
    /// Labels file, one per line (else `class_<id>`).
    pub labels: Option<PathBuf>,
    /// The labels, read from the file when the manifest is loaded.
    #[serde(skip)]
    pub names: Vec<String>,
}

impl Default for DetectParams {
    fn default() -> Self {
        Self {
            format: DetectFormat::Yolo,
            normalized: false,
            resize: Resize::Letterbox,
            pad: 114.0,
            score: 0.25,
            iou: 0.45,
            classes: Vec::new(),
            max_objects: 300,
            labels: None,
            names: Vec::new(),
        }
    }
}

/// The class filter of a detector: `classes` (labels or indices) resolved against `labels`.
pub fn class_filter(classes: &[String], labels: &[String]) -> Result<Vec<bool>, String> {
    if classes.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::new();
    for c in classes {
        let id = match labels.iter().position(|l| l == c) {
            Some(i) => i,
            None => c.parse::<usize>().map_err(|_| {
                format!(
                    "class `{c}` is neither a label{} nor a class index",
                    if labels.is_empty() {
                        " (the model has no labels file)"
                    } else {
                        " of the model"
                    }
                )
            })?,
        };
        ids.push(id);
    }
    let n = ids.iter().max().map_or(0, |m| m + 1).max(labels.len());
    let mut allowed = vec![false; n];
    for i in ids {
        allowed[i] = true;
    }
    Ok(allowed)
}

/// `[text_recognize]`: crops and CTC decoding.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextRecognizeParams {
    /// Model metadata key that holds the character list, one per line.
    pub charset_metadata_key: String,
    /// Widest crop after resizing to the input height, in pixels.
    pub max_width: u32,
    /// Most crops in one inference.
    pub max_crops: usize,
    /// Lines with a lower mean probability are not published.
    pub min_score: f32,
}

impl Default for TextRecognizeParams {
    fn default() -> Self {
        Self {
            charset_metadata_key: "character".into(),
            max_width: 1280,
            max_crops: 16,
            min_score: 0.5,
        }
    }
}

/// How a recurrent cell is driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecurrentMode {
    /// One step per frame of a stream; the stream's state is kept between its frames.
    Stream,
    /// Each item (the frame, or each box of an earlier stage) runs steps until its end
    /// condition, from a fresh state.
    Decode,
}

/// A state carried from one step to the next: the output `output` of a step is the input
/// `input` of the next.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    /// The cell's state input.
    pub input: String,
    /// The cell's state output (same shape as the input).
    pub output: String,
    /// Model metadata key holding the initial state (comma-separated floats); else zeros.
    #[serde(default)]
    pub initial: Option<String>,
}

/// `feedback`: a decoder's input fed with the one-hot of the previous step's token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackSpec {
    /// The cell's token input (`[N, vocabulary]`; zeros at the first step).
    pub input: String,
}

/// `[recurrent]`: a cell of a recurrent model, run one step per call.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecurrentParams {
    /// Per-stream state or per-item decoding.
    pub mode: RecurrentMode,
    /// State inputs and outputs (at least one).
    #[serde(default)]
    pub state: Vec<StateSpec>,
    /// The step output that is published (stream: the vector; decode: its argmax is the token).
    pub output: String,
    /// Decode: the previous token, fed back.
    #[serde(default)]
    pub feedback: Option<FeedbackSpec>,
    /// Decode: the token that ends an item (argmax of `output`).
    #[serde(default)]
    pub end_token: Option<usize>,
    /// Decode: the most steps an item runs (its end condition where there is no end token).
    #[serde(default)]
    pub max_steps: Option<u32>,
    /// Model metadata key with the token strings (decode) or labels (stream), one per line.
    #[serde(default)]
    pub labels_metadata_key: Option<String>,
}

/// Most steps of a decoder without `max_steps` (an end token that never comes stops here).
pub const DEFAULT_MAX_STEPS: u32 = 256;

impl RecurrentParams {
    /// The step limit of an item.
    pub fn step_limit(&self) -> u32 {
        match self.mode {
            RecurrentMode::Stream => 1,
            RecurrentMode::Decode => self.max_steps.unwrap_or(DEFAULT_MAX_STEPS),
        }
    }

    /// Problems of these settings alone, as `(key under [recurrent], message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.state.is_empty() {
            out.push((
                "state",
                "a recurrent cell needs at least one state: `state = [{ input = \"h_in\", output = \"h_out\" }]`".to_string(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for s in &self.state {
            if !seen.insert(&s.input) || !seen.insert(&s.output) {
                out.push((
                    "state",
                    format!("`{}`/`{}` is named twice", s.input, s.output),
                ));
            }
        }
        match self.mode {
            RecurrentMode::Decode => {
                if self.end_token.is_none() && self.max_steps.is_none() {
                    out.push((
                        "mode",
                        "a decoder needs an end condition: `end_token = ID` (argmax of `output`) or `max_steps = N`, or both".to_string(),
                    ));
                }
                if self.max_steps == Some(0) {
                    out.push(("max_steps", "must be at least 1".to_string()));
                }
            }
            RecurrentMode::Stream => {
                for (key, set) in [
                    ("end_token", self.end_token.is_some()),
                    ("max_steps", self.max_steps.is_some()),
                    ("feedback", self.feedback.is_some()),
                ] {
                    if set {
                        out.push((
                            key,
                            "applies to `mode = \"decode\"` only (a per-stream cell runs one step per frame)".to_string(),
                        ));
                    }
                }
            }
        }
        out
    }
}

/// A model manifest, with paths made absolute.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    /// Model name.
    pub name: String,
    /// Engine backend.
    #[serde(default)]
    pub backend: Backend,
    /// The ONNX file (relative to the manifest in the file; absolute once loaded).
    #[serde(default)]
    pub onnx: Option<PathBuf>,
    /// Name of the image input (default: the model's first input).
    #[serde(default)]
    pub input: Option<String>,
    /// What the model computes.
    pub kind: ModelKind,
    /// Input image and normalisation.
    #[serde(default)]
    pub image: Option<ImageSpec>,
    /// Classifier settings.
    #[serde(default)]
    pub classify: ClassifyParams,
    /// Text detector settings.
    #[serde(default)]
    pub text_detect: TextDetectParams,
    /// Text recogniser settings.
    #[serde(default)]
    pub text_recognize: TextRecognizeParams,
    /// Object detector settings.
    #[serde(default)]
    pub detect: DetectParams,
    /// Recurrent cell settings (`kind = "recurrent"`).
    #[serde(default)]
    pub recurrent: Option<RecurrentParams>,
    /// Folder of the model cut into blocks by `poolpipe split` (with `manifest.json`), for stages
    /// that run a block range of it.
    #[serde(default)]
    pub split: Option<PathBuf>,
    /// The manifest file.
    #[serde(skip)]
    pub path: PathBuf,
}

impl ModelManifest {
    /// The stand-in model of an emulated stage without a manifest: computes nothing.
    pub fn emulated() -> Self {
        Self {
            name: "emulated".into(),
            backend: Backend::Noop,
            onnx: None,
            input: None,
            kind: ModelKind::Passthrough,
            image: None,
            classify: ClassifyParams::default(),
            text_detect: TextDetectParams::default(),
            text_recognize: TextRecognizeParams::default(),
            detect: DetectParams::default(),
            recurrent: None,
            split: None,
            path: PathBuf::new(),
        }
    }
}

/// Loads and checks a manifest; every problem is reported against the manifest file.
pub fn load_manifest(path: &Path) -> Result<ModelManifest, ConfigErrors> {
    let text = read_config(path, "model manifest")?;
    let parsed = ParsedFile::parse(path, &text)?;
    let mut m: ModelManifest =
        deserialize_part(&parsed, "", parsed.root_value()).map_err(|d| ConfigErrors(vec![d]))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    m.path = path.to_path_buf();
    m.onnx = m.onnx.map(|p| dir.join(p));
    m.classify.labels = m.classify.labels.map(|p| dir.join(p));
    m.detect.labels = m.detect.labels.map(|p| dir.join(p));
    m.split = m.split.map(|p| dir.join(p));
    let mut errs = Vec::new();
    let mut err = |key: &str, msg: String| errs.push(parsed.diag_at(key, msg));
    match (m.backend, &m.onnx) {
        (Backend::Onnxruntime, None) => err(
            "onnx",
            "the onnxruntime backend needs `onnx = \"FILE.onnx\"`".into(),
        ),
        (Backend::Onnxruntime, Some(p)) if !p.is_file() => err(
            "onnx",
            format!(
                "model file {} does not exist (run ./setup.sh to fetch and generate models)",
                p.display()
            ),
        ),
        _ => {}
    }
    // Labels are read here, once: stages and the validation of classes use them.
    for (key, labels, names) in [
        ("classify.labels", &m.classify.labels, &mut m.classify.names),
        ("detect.labels", &m.detect.labels, &mut m.detect.names),
    ] {
        if let Some(l) = labels {
            match std::fs::read_to_string(l) {
                Ok(text) => *names = text.lines().map(|l| l.trim_end().to_string()).collect(),
                Err(e) => err(key, format!("labels file {}: {e}", l.display())),
            }
        }
    }
    let d = &m.detect;
    if let Err(e) = class_filter(&d.classes, &d.names) {
        err("detect.classes", e);
    }
    if !(0.0..=1.0).contains(&d.score) || !(0.0..=1.0).contains(&d.iou) {
        err("detect", "score and iou are in [0, 1]".into());
    }
    if !(0.0..=255.0).contains(&d.pad) {
        err(
            "detect.pad",
            format!("{}: a pixel value in [0, 255]", d.pad),
        );
    }
    if d.max_objects == 0 {
        err("detect.max_objects", "must be at least 1".into());
    }
    match (&m.image, m.kind) {
        (None, k) if k != ModelKind::Passthrough => err(
            "image",
            format!("a `{k:?}` model needs an [image] section (width, height, ...)"),
        ),
        (Some(img), _) => {
            if img.width == 0 || img.height == 0 || img.width > 8192 || img.height > 8192 {
                err(
                    "image",
                    format!(
                        "image size {}x{} must be between 1 and 8192",
                        img.width, img.height
                    ),
                );
            }
            if img.std.iter().any(|s| *s <= 0.0) {
                err("image.std", "every std must be > 0".into());
            }
        }
        _ => {}
    }
    if m.kind == ModelKind::Passthrough && m.backend != Backend::Noop {
        err(
            "kind",
            "`passthrough` models run on the `noop` backend".into(),
        );
    }
    if let Some(s) = &m.split
        && !s.join("manifest.json").is_file()
    {
        err(
            "split",
            format!(
                "{} has no manifest.json: make it with `poolpipe split MODEL --blocks K --out {}` (./setup.sh does for shipped models)",
                s.display(),
                s.display()
            ),
        );
    }
    match (&m.recurrent, m.kind) {
        (None, ModelKind::Recurrent) => err(
            "kind",
            "a `recurrent` model needs a [recurrent] section (mode, state, output, ...)".into(),
        ),
        (Some(_), k) if k != ModelKind::Recurrent => err(
            "recurrent",
            format!("[recurrent] applies to `kind = \"recurrent\"` models, not `{k:?}`"),
        ),
        (Some(r), _) => {
            for (key, msg) in r.problems() {
                err(&format!("recurrent.{key}"), msg);
            }
            if m.backend != Backend::Onnxruntime {
                err(
                    "backend",
                    "a recurrent cell runs on the onnxruntime backend".into(),
                );
            }
        }
        _ => {}
    }
    if m.classify.top_k == 0 {
        err("classify.top_k", "must be at least 1".into());
    }
    if m.text_recognize.max_crops == 0 {
        err("text_recognize.max_crops", "must be at least 1".into());
    }
    let td = &m.text_detect;
    if !(0.0..=1.0).contains(&td.thresh) || !(0.0..=1.0).contains(&td.box_thresh) {
        err(
            "text_detect",
            "thresh and box_thresh are probabilities in [0, 1]".into(),
        );
    }
    if errs.is_empty() {
        Ok(m)
    } else {
        Err(ConfigErrors(errs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_filters_take_labels_or_indices() {
        let labels = vec!["person".to_string(), "car".into(), "truck".into()];
        assert_eq!(
            class_filter(&["car".into(), "0".into()], &labels).unwrap(),
            vec![true, true, false]
        );
        assert!(class_filter(&["zebra".into()], &labels).is_err());
        assert!(class_filter(&[], &labels).unwrap().is_empty());
    }
}
