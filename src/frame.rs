//! The frame that flows through a pipeline, and the results stages attach to it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::clock::Nanos;

/// Byte order of the three colour channels of a packed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
pub enum PixelFormat {
    /// Red, green, blue.
    RGB,
    /// Blue, green, red (what OpenCV-trained models such as PP-OCR expect).
    BGR,
}

impl PixelFormat {
    /// The GStreamer raw video format name.
    pub fn gst_name(self) -> &'static str {
        match self {
            PixelFormat::RGB => "RGB",
            PixelFormat::BGR => "BGR",
        }
    }
}

/// Pixel memory: a `Vec`, or a decoded GStreamer buffer held without copying.
pub type Pixels = Box<dyn AsRef<[u8]> + Send + Sync>;

/// A packed 8-bit, 3-channel image (rows without padding).
pub struct Image {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Channel order.
    pub format: PixelFormat,
    /// `height * width * 3` bytes, row-major.
    pub data: Pixels,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({}x{} {:?})", self.width, self.height, self.format)
    }
}

impl Image {
    /// An image over these bytes (`width * height * 3` of them).
    pub fn from_vec(width: u32, height: u32, format: PixelFormat, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width as usize * height as usize * 3);
        Self {
            width,
            height,
            format,
            data: Box::new(data),
        }
    }

    /// A black image.
    pub fn black(width: u32, height: u32, format: PixelFormat) -> Self {
        Self::from_vec(
            width,
            height,
            format,
            vec![0; width as usize * height as usize * 3],
        )
    }

    /// The pixels.
    pub fn bytes(&self) -> &[u8] {
        (*self.data).as_ref()
    }
}

/// One decoded image of one stream, with its deadline and what stages found in it.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Index of the stream in the pipeline's source list.
    pub stream: usize,
    /// Sequence number within the stream, from 0, counting every frame that reached Rust.
    pub seq: u64,
    /// Presentation timestamp from GStreamer, when the source has one.
    pub pts: Option<Duration>,
    /// Wall-clock time at which the frame reached poolpipe (capture time).
    pub captured_wall: SystemTime,
    /// Capture time on the pipeline's monotonic clock.
    pub captured: Nanos,
    /// Capture time + the pipeline's SLO, on the same clock.
    pub deadline: Nanos,
    /// The image, scaled and converted to the first stage's input size and pixel format.
    pub image: Arc<Image>,
    /// What each finished stage produced, in stage order.
    pub outputs: Vec<StageOutput>,
    /// Time spent in each finished stage (queue + batching + inference), nanoseconds.
    pub stage_nanos: Vec<Nanos>,
    /// When the frame entered its current stage's queue.
    pub entered_stage: Nanos,
    /// The activation a stage running the first blocks of a cut model passes to the stage that
    /// runs the next ones (one sample, without the batch dimension).
    pub activation: Option<ndarray::ArrayD<f32>>,
    /// Where the activation is instead, in a cluster: the node that computed it holds it for the
    /// node of the next stage, which takes it from there (it does not pass through this process).
    pub held: Option<Box<Held>>,
    /// Where the activation is instead when the engine that computed it kept it in its own
    /// memory (a GPU's, or ONNX Runtime's on the CPU) for the next stage, whose engine reads it
    /// from there: no copy to and from the host between the two.
    pub kept: Option<Kept>,
    /// The route of its flow that it takes (index into the pipeline's routes), set when it is
    /// admitted.
    pub route: usize,
    /// Its stream's `priority` (share under overload), set when it is admitted (1 before).
    pub priority: u32,
}

impl Frame {
    /// Frame `seq` of stream `stream`, captured now (wall clock) at `captured` on the pipeline's
    /// clock, due at `deadline`, with nothing attached yet.
    pub fn new(
        stream: usize,
        seq: u64,
        image: Arc<Image>,
        captured: Nanos,
        deadline: Nanos,
    ) -> Self {
        Self {
            stream,
            seq,
            pts: None,
            captured_wall: SystemTime::now(),
            captured,
            deadline,
            image,
            outputs: Vec::new(),
            stage_nanos: Vec::new(),
            entered_stage: captured,
            activation: None,
            held: None,
            kept: None,
            route: 0,
            priority: 1,
        }
    }
}

/// A batch of activations an engine left where it computed them (see [`Frame::kept`]).
pub trait KeptBatch: Send + Sync + std::fmt::Debug {
    /// Samples in the batch.
    fn len(&self) -> usize;
    /// Whether the batch has no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The shape of one sample.
    fn sample_shape(&self) -> &[usize];
    /// A copy of sample `i` in host memory.
    fn sample_to_host(&self, i: usize) -> Result<ndarray::ArrayD<f32>, String>;
    /// Sample `i` read where it is, when that is host memory (else `None`).
    fn sample_in_host_memory(&self, i: usize) -> Option<&[f32]> {
        let _ = i;
        None
    }
    /// The concrete type, for the engine that reads it.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// One frame's activation: sample `index` of a batch an engine kept.
#[derive(Debug, Clone)]
pub struct Kept {
    /// The batch, shared by the frames that were computed together.
    pub batch: Arc<dyn KeptBatch>,
    /// The frame's sample in it.
    pub index: usize,
}

impl Kept {
    /// Every sample of `batch`, in order.
    pub fn all(batch: &Arc<dyn KeptBatch>) -> Vec<Kept> {
        (0..batch.len())
            .map(|index| Kept {
                batch: batch.clone(),
                index,
            })
            .collect()
    }

    /// Whether `kept` are the samples of one batch, all of them, in order: the batch can be fed
    /// to the next engine as it is.
    pub fn whole_batch(kept: &[&Kept]) -> Option<Arc<dyn KeptBatch>> {
        let first = kept.first()?;
        let whole = first.batch.len() == kept.len()
            && kept
                .iter()
                .enumerate()
                .all(|(i, k)| k.index == i && Arc::ptr_eq(&k.batch, &first.batch));
        whole.then(|| first.batch.clone())
    }
}

/// A frame's activation held on another node of a cluster (see [`Frame::held`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Held {
    /// The node that holds it.
    pub node: String,
    /// Its address (`HOST:PORT`).
    pub addr: String,
    /// Its key there.
    pub key: u64,
    /// The activation's shape (one sample), or `None` for bytes that stand for an emulated
    /// cut's activation.
    pub shape: Option<Vec<usize>>,
    /// Its size.
    pub bytes: u64,
}

/// An axis-aligned box in image pixels.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, serde::Deserialize)]
pub struct BBox {
    /// Left edge.
    #[serde(serialize_with = "round1")]
    pub x: f32,
    /// Top edge.
    #[serde(serialize_with = "round1")]
    pub y: f32,
    /// Width.
    #[serde(serialize_with = "round1")]
    pub w: f32,
    /// Height.
    #[serde(serialize_with = "round1")]
    pub h: f32,
}

impl BBox {
    /// Left, top, right, bottom.
    pub fn corners(&self) -> [f32; 4] {
        [self.x, self.y, self.x + self.w, self.y + self.h]
    }
}

/// Intersection over union of two boxes given by their corners (left, top, right, bottom).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Pixels to 0.1: finer is noise.
fn round1<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((*v as f64 * 10.0).round() / 10.0)
}

/// Scores to 4 decimals.
fn round4<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((*v as f64 * 1e4).round() / 1e4)
}

/// One class with its score.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Class {
    /// Class index in the model's output.
    pub id: usize,
    /// Label (from the manifest's labels, or `class_<id>`).
    pub label: String,
    /// Softmax probability.
    #[serde(serialize_with = "round4")]
    pub score: f32,
}

/// A region that a text detector believes holds text.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TextBox {
    /// Where, in image pixels.
    #[serde(rename = "box")]
    pub bbox: BBox,
    /// Mean text probability inside the region.
    #[serde(serialize_with = "round4")]
    pub score: f32,
}

/// A line of recognised text.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct TextLine {
    /// The text.
    pub text: String,
    /// Mean probability of the decoded characters.
    #[serde(serialize_with = "round4")]
    pub score: f32,
    /// Where, in image pixels.
    #[serde(rename = "box")]
    pub bbox: BBox,
}

/// An object a detector found (and a tracker followed).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Object {
    /// Label (from the manifest's labels, or `class_<id>`).
    pub label: Arc<str>,
    /// Class index in the model's output.
    pub class_id: usize,
    /// Detection score (objectness x class score, or the class score).
    #[serde(serialize_with = "round4")]
    pub score: f32,
    /// Where, in frame pixels.
    #[serde(rename = "box")]
    pub bbox: BBox,
    /// Identity across frames, given by the tracker (absent without one, and for a detection no
    /// confirmed track owns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_id: Option<u64>,
}

/// What one stage attached to a frame.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageOutput {
    /// Top classes of a classifier.
    Classes(Vec<Class>),
    /// Regions of text found by a detector.
    TextBoxes(Vec<TextBox>),
    /// Text read by a recogniser.
    Texts(Vec<TextLine>),
    /// Objects found by a detector.
    Objects(Vec<Object>),
    /// What an emulated device did (it computes no result of its own).
    Emulated(EmulatedRun),
    /// A stage ran blocks of a cut model and passed the activation on.
    Partial(PartialRun),
    /// A per-stream recurrent cell's step on this frame.
    State(StreamStep),
    /// What a recurrent decoder read from each item (the frame, or each box).
    Decoded(Vec<DecodedItem>),
    /// Nothing (a pass-through stage).
    Nothing,
}

/// One step of a per-stream recurrent cell.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct StreamStep {
    /// Steps the stream's state has taken, this one included (1 at the stream's first frame).
    pub step: u64,
    /// The cell's published output for this frame.
    #[serde(serialize_with = "round4_vec")]
    pub output: Vec<f32>,
    /// Its largest entry, labelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top: Option<Class>,
}

/// Why a decoded item ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecodeEnd {
    /// The cell emitted the end token.
    EndToken,
    /// It ran its step limit.
    MaxSteps,
}

/// The tokens a recurrent decoder emitted for one item.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct DecodedItem {
    /// The box it read (absent where the item is the whole frame).
    #[serde(rename = "box", skip_serializing_if = "Option::is_none")]
    pub bbox: Option<BBox>,
    /// Token ids, the end token left out.
    pub tokens: Vec<u32>,
    /// The tokens as text, where the model names its tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Steps it ran.
    pub steps: u32,
    /// Why it ended.
    pub end: DecodeEnd,
}

fn round4_vec<S: serde::Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for x in v {
        seq.serialize_element(&((*x as f64 * 1e4).round() / 1e4))?;
    }
    seq.end()
}

/// Blocks of a cut model that a stage ran.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct PartialRun {
    /// Block range `[first, end)`.
    pub blocks: [usize; 2],
    /// Shape of the activation passed on (one frame).
    pub shape: Vec<usize>,
}

/// A batch held by an emulated device.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct EmulatedRun {
    /// Device class emulated.
    pub class: String,
    /// Block range `[first, end)` of the profiled model.
    pub blocks: [usize; 2],
    /// Batch size the frame ran in.
    pub batch: usize,
    /// Profiled latency of the block range at this batch size, ms.
    pub latency_ms: f64,
    /// Time to send the batch's activations to the next stage's device, ms.
    pub transfer_ms: f64,
}
