//! What a stage does to a batch of frames: pre-processing, inference, post-processing.

use std::path::Path;
use std::sync::Arc;

use ndarray::{Array4, Axis, s};

use crate::config::{
    Backend, DetectParams, Device, ImageSpec, ModelKind, Resize, StageSpec, TextDetectParams,
    TextRecognizeParams,
};
use crate::engine::ort::{OrtConfig, OrtEngine};
use crate::engine::{Engine, EngineError, Feed, NoopEngine};
use crate::frame::{Frame, Kept, KeptBatch, Object, StageOutput, TextLine};
use crate::gpu::GpuSession;
use crate::postprocess::{classify, ctc, detect, image, text_detect};

use crate::engine::{StageError, StageRunner};

/// The GPU session of worker `worker` of a GPU stage (`None` for other devices): its GPU, the
/// stage's precision and largest batch, the engine cache, and the image size for the
/// optimisation profile of an input the model leaves dynamic.
pub fn gpu_session(spec: &StageSpec, worker: usize, cache: &Path) -> Option<GpuSession> {
    let (backend, index) = spec.device.gpu_of_worker(worker)?;
    let Device::Gpu { precision, .. } = &spec.device else {
        return None;
    };
    let first = spec.split.as_ref().is_none_or(|s| s.first);
    let input_hint = spec.model.image.as_ref().filter(|_| first).map(|im| {
        let (w, h) = (i64::from(im.width), i64::from(im.height));
        match im.layout {
            crate::config::Layout::NCHW => vec![3, h, w],
            crate::config::Layout::NHWC => vec![h, w, 3],
        }
    });
    Some(GpuSession {
        backend,
        index,
        precision: *precision,
        cache: cache.to_path_buf(),
        max_batch: spec.max_batch,
        blocks: spec.split.as_ref().map(|s| s.blocks),
        input_hint,
    })
}

/// Loads the engine of a stage and wraps it in the runner for its model kind; `gpu` is the
/// worker's GPU session (from [`gpu_session`]) on GPU stages. `keep`: a stage running the first
/// blocks of a cut model leaves its activations where its engine computed them (on its GPU, or
/// in ONNX Runtime's host memory) for the next stage's engines, which run in this process.
pub fn build_runner(
    spec: &StageSpec,
    library: Option<&Path>,
    link: Option<crate::device::emulated::Link>,
    gpu: Option<GpuSession>,
    keep: bool,
) -> Result<Box<dyn StageRunner>, EngineError> {
    if let (Device::Emulated { class }, Some(profile)) = (&spec.device, &spec.profile) {
        let mut d = crate::device::emulated::EmulatedDevice::new(
            class,
            crate::device::emulated::EmulatedCosts {
                blocks: profile.blocks,
                latency: profile.latency.clone(),
                transfer: profile.transfer.clone(),
            },
        )
        .sending_while_computing(profile.send_while_computing);
        if let Some(l) = link {
            d = d.with_link(l);
        }
        return Ok(Box::new(d));
    }
    let m = &spec.model;
    let ort = |model: &Path, input: Option<String>, gpu: Option<GpuSession>| {
        OrtEngine::load(&OrtConfig {
            model: model.to_path_buf(),
            input,
            threads: spec.threads,
            library: library.map(Path::to_path_buf),
            spin: false,
            optimize: true,
            gpu,
        })
    };
    let engine: Box<dyn Engine> = match (&spec.split, m.backend) {
        (Some(split), _) => {
            let mut engines = Vec::new();
            for (k, f) in split.files.iter().enumerate() {
                // Each block of the range is its own session (and TensorRT engine).
                let b = split.blocks[0] + k;
                let g = gpu.clone().map(|g| GpuSession {
                    blocks: Some([b, b + 1]),
                    input_hint: g.input_hint.filter(|_| k == 0),
                    ..g
                });
                engines.push(ort(f, None, g)?);
            }
            Box::new(Chain { engines })
        }
        (None, Backend::Noop) => Box::new(NoopEngine::default()),
        (None, Backend::Onnxruntime) => Box::new(ort(
            &m.onnx.clone().unwrap_or_default(),
            m.input.clone(),
            gpu,
        )?),
    };
    let image = m.image.clone().unwrap_or_else(ImageSpec::passthrough);
    let input = match &spec.split {
        Some(split) if !split.first => Input::Activation,
        _ if m.kind == ModelKind::Detect => Input::Fitted(m.detect.resize, m.detect.pad),
        _ => Input::Image,
    };
    if let Some(split) = spec.split.as_ref().filter(|s| !s.last) {
        return Ok(Box::new(Partial {
            engine,
            image,
            input,
            blocks: split.blocks,
            keep,
        }));
    }
    Ok(match m.kind {
        // Not a batch-in, batch-out stage: the pipeline runs it with `build_recurrent`.
        ModelKind::Recurrent => {
            return Err(EngineError::Load {
                model: m.path.display().to_string(),
                message: "a recurrent cell runs in a recurrent stage, not in a batch worker".into(),
            });
        }
        ModelKind::Passthrough => Box::new(Passthrough),
        ModelKind::Classify => Box::new(Classify {
            engine,
            image,
            input,
            top_k: m.classify.top_k,
            labels: m.classify.names.clone(),
        }),
        ModelKind::Detect => {
            let labels = &m.detect.names;
            let allowed =
                crate::config::class_filter(&m.detect.classes, labels).map_err(|message| {
                    EngineError::Load {
                        model: m.path.display().to_string(),
                        message,
                    }
                })?;
            Box::new(Detect {
                engine,
                image,
                input,
                params: m.detect.clone(),
                labels: labels.iter().map(|l| l.as_str().into()).collect(),
                allowed,
            })
        }
        ModelKind::TextDetect => Box::new(TextDetect {
            engine,
            image,
            input,
            params: m.text_detect.clone(),
        }),
        ModelKind::TextRecognize => {
            let key = &m.text_recognize.charset_metadata_key;
            let charset: Vec<String> = engine
                .metadata(key)
                .ok_or_else(|| EngineError::Load {
                    model: m.onnx.clone().unwrap_or_default().display().to_string(),
                    message: format!("no `{key}` metadata with the character list"),
                })?
                .lines()
                .map(str::to_string)
                .collect();
            Box::new(TextRecognize {
                engine,
                image,
                params: m.text_recognize.clone(),
                charset,
                boxes_from: spec.boxes_from.unwrap_or(0),
            })
        }
    })
}

/// Loads a recurrent stage's cell (one per worker).
pub fn build_recurrent(
    spec: &StageSpec,
    library: Option<&Path>,
) -> Result<crate::recurrent::Recurrent, EngineError> {
    let m = &spec.model;
    let engine = OrtEngine::load(&OrtConfig {
        model: m.onnx.clone().unwrap_or_default(),
        input: None,
        threads: spec.threads,
        library: library.map(Path::to_path_buf),
        spin: false,
        optimize: true,
        gpu: None,
    })?;
    crate::recurrent::Recurrent::new(
        Box::new(engine),
        m,
        crate::recurrent::RecurrentSettings {
            batching: spec.batching,
            max_batch: spec.max_batch,
            drop_late: spec.policy == crate::batcher::PolicyKind::Deadline,
            margin: crate::clock::nanos(spec.margin),
            boxes_from: spec.boxes_from,
        },
    )
}

/// Does nothing: for measuring the pipeline itself.
struct Passthrough;

impl StageRunner for Passthrough {
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
        for f in frames {
            f.outputs.push(StageOutput::Nothing);
        }
        Ok(())
    }
}

/// What a stage feeds its engine.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Input {
    /// The frames' images, normalised (already the input's size).
    Image,
    /// The frames' images at any size, fitted to the input (and the border's pixel value).
    Fitted(Resize, f32),
    /// The activations an earlier stage (running the first blocks of the model) left.
    Activation,
}

/// Blocks of a cut model run one after the other, as one engine.
struct Chain {
    engines: Vec<OrtEngine>,
}

impl Chain {
    /// Runs `feed` through every engine but the last, each keeping its output where it
    /// computed it for the next: the samples the last engine is fed.
    fn through_all_but_last(&mut self, feed: Feed<'_>) -> Result<Option<Vec<Kept>>, EngineError> {
        let n = self.engines.len();
        let mut kept: Option<Vec<Kept>> = None;
        for e in &mut self.engines[..n.saturating_sub(1)] {
            let out = match &kept {
                Some(k) => e.infer_keeping(Feed::Kept(&k.iter().collect::<Vec<_>>()))?,
                None => e.infer_keeping(feed.clone())?,
            };
            kept = Some(Kept::all(&out));
        }
        Ok(kept)
    }

    /// Runs `feed` through every engine but the last, then `last` on the last one.
    fn then_last<T>(
        &mut self,
        feed: Feed<'_>,
        last: impl FnOnce(&mut OrtEngine, Feed<'_>) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let kept = self.through_all_but_last(feed.clone())?;
        let refs: Vec<&Kept> = kept.iter().flatten().collect();
        let e = self.engines.last_mut().expect("a chain has engines");
        match kept {
            Some(_) => last(e, Feed::Kept(&refs)),
            None => last(e, feed),
        }
    }
}

impl Engine for Chain {
    fn info(&self) -> &crate::engine::EngineInfo {
        self.engines[0].info()
    }

    fn infer(
        &mut self,
        input: ndarray::ArrayViewD<'_, f32>,
    ) -> Result<Vec<ndarray::ArrayD<f32>>, EngineError> {
        self.infer_feed(Feed::Host(input))
    }

    fn metadata(&self, key: &str) -> Option<String> {
        self.engines.iter().find_map(|e| e.metadata(key))
    }

    fn infer_feed(&mut self, feed: Feed<'_>) -> Result<Vec<ndarray::ArrayD<f32>>, EngineError> {
        self.then_last(feed, |e, f| e.infer_feed(f))
    }

    fn infer_keeping(&mut self, feed: Feed<'_>) -> Result<Arc<dyn KeptBatch>, EngineError> {
        self.then_last(feed, |e, f| e.infer_keeping(f))
    }
}

/// What a stage feeds its engine for a batch.
enum Fed {
    /// A tensor in host memory.
    Host(ndarray::ArrayD<f32>),
    /// The activations the previous stage's engines kept.
    Kept(Vec<Kept>),
}

/// The batch a stage feeds its engine: its frames' images, or the activations the stage before
/// left on them (taken off the frames).
fn batch_feed(image: &ImageSpec, input: Input, frames: &mut [Frame]) -> Result<Fed, StageError> {
    Ok(match input {
        Input::Image => {
            let images: Vec<&crate::frame::Image> =
                frames.iter().map(|f| f.image.as_ref()).collect();
            Fed::Host(image::batch_tensor(&images, image).into_dyn())
        }
        Input::Fitted(resize, pad) => {
            let mut t = image::batch_zeros(frames.len(), image);
            for (i, f) in frames.iter().enumerate() {
                let fit = detect::Fit::new(
                    (f.image.width, f.image.height),
                    (image.width, image.height),
                    resize,
                );
                detect::fill(&f.image, &fit, image, pad, t.index_axis_mut(Axis(0), i));
            }
            Fed::Host(t.into_dyn())
        }
        Input::Activation if frames.iter().all(|f| f.kept.is_some()) => {
            Fed::Kept(frames.iter_mut().filter_map(|f| f.kept.take()).collect())
        }
        Input::Activation => {
            let missing =
                || StageError::Output("a frame has no activation from the previous blocks".into());
            let views: Vec<ndarray::ArrayD<f32>> = frames
                .iter_mut()
                .map(|f| match (f.activation.take(), f.kept.take()) {
                    (Some(a), _) => Ok(a),
                    (None, Some(k)) => k
                        .batch
                        .sample_to_host(k.index)
                        .map_err(|e| StageError::Engine(EngineError::Infer(e))),
                    (None, None) => Err(missing()),
                })
                .collect::<Result<_, _>>()?;
            let views: Vec<ndarray::ArrayViewD<'_, f32>> = views.iter().map(|a| a.view()).collect();
            Fed::Host(
                ndarray::stack(Axis(0), &views).map_err(|e| {
                    StageError::Output(format!("activations of different shapes: {e}"))
                })?,
            )
        }
    })
}

/// Runs the batch through the engine and returns its first output.
fn infer_batch(
    engine: &mut dyn Engine,
    image: &ImageSpec,
    input: Input,
    frames: &mut [Frame],
) -> Result<ndarray::ArrayD<f32>, StageError> {
    let mut outs = match batch_feed(image, input, frames)? {
        Fed::Host(x) => engine.infer_feed(Feed::Host(x.view()))?,
        Fed::Kept(k) => engine.infer_feed(Feed::Kept(&k.iter().collect::<Vec<_>>()))?,
    };
    if outs.is_empty() {
        return Err(StageError::Output("the model returned no outputs".into()));
    }
    let out = outs.swap_remove(0);
    if out.shape().first() != Some(&frames.len()) {
        return Err(StageError::Output(format!(
            "first output has shape {:?} for a batch of {}",
            out.shape(),
            frames.len()
        )));
    }
    Ok(out)
}

/// The first blocks of a cut model: leaves each frame's activation for the next stage, kept
/// where the engine computed it (`keep`) or copied to the host.
struct Partial {
    engine: Box<dyn Engine>,
    image: ImageSpec,
    input: Input,
    blocks: [usize; 2],
    keep: bool,
}

impl StageRunner for Partial {
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
        if !self.keep {
            let out = infer_batch(self.engine.as_mut(), &self.image, self.input, frames)?;
            for (i, f) in frames.iter_mut().enumerate() {
                let a = out.index_axis(Axis(0), i).to_owned();
                f.outputs
                    .push(StageOutput::Partial(crate::frame::PartialRun {
                        blocks: self.blocks,
                        shape: a.shape().to_vec(),
                    }));
                f.activation = Some(a);
            }
            return Ok(());
        }
        let batch = match batch_feed(&self.image, self.input, frames)? {
            Fed::Host(x) => self.engine.infer_keeping(Feed::Host(x.view()))?,
            Fed::Kept(k) => self
                .engine
                .infer_keeping(Feed::Kept(&k.iter().collect::<Vec<_>>()))?,
        };
        if batch.len() != frames.len() {
            return Err(StageError::Output(format!(
                "first output has {} samples for a batch of {}",
                batch.len(),
                frames.len()
            )));
        }
        let shape = batch.sample_shape().to_vec();
        for (k, f) in Kept::all(&batch).into_iter().zip(frames.iter_mut()) {
            f.outputs
                .push(StageOutput::Partial(crate::frame::PartialRun {
                    blocks: self.blocks,
                    shape: shape.clone(),
                }));
            f.activation = None;
            f.kept = Some(k);
        }
        Ok(())
    }
}

/// Classifier: top-k classes per frame.
struct Classify {
    engine: Box<dyn Engine>,
    image: ImageSpec,
    input: Input,
    top_k: usize,
    labels: Vec<String>,
}

impl StageRunner for Classify {
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
        let out = infer_batch(self.engine.as_mut(), &self.image, self.input, frames)?;
        let n = frames.len();
        let per_frame = out.len() / n.max(1);
        let flat = out.into_shape_with_order((n, per_frame)).ok();
        let out = match flat {
            Some(a) => a,
            None => {
                return Err(StageError::Output(
                    "cannot flatten the classifier output".into(),
                ));
            }
        };
        for (f, row) in frames.iter_mut().zip(out.outer_iter()) {
            let row: Vec<f32> = row.iter().copied().collect();
            f.outputs.push(StageOutput::Classes(classify::top_k(
                &row,
                self.top_k,
                &self.labels,
            )));
        }
        Ok(())
    }
}

/// DB text detector: text boxes per frame.
struct TextDetect {
    engine: Box<dyn Engine>,
    image: ImageSpec,
    input: Input,
    params: TextDetectParams,
}

impl StageRunner for TextDetect {
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
        let out = infer_batch(self.engine.as_mut(), &self.image, self.input, frames)?;
        if out.ndim() != 4 {
            return Err(StageError::Output(format!(
                "expected an N x 1 x H x W map, got {:?}",
                out.shape()
            )));
        }
        let (mh, mw) = (out.shape()[2], out.shape()[3]);
        for (i, f) in frames.iter_mut().enumerate() {
            let map = out.slice(s![i, 0, .., ..]);
            let map: Vec<f32> = map.iter().copied().collect();
            let boxes = text_detect::boxes(
                &map,
                mw,
                mh,
                f.image.width as f32,
                f.image.height as f32,
                &self.params,
            );
            f.outputs.push(StageOutput::TextBoxes(boxes));
        }
        Ok(())
    }
}

/// Single-shot object detector: labelled boxes per frame, in frame pixels.
struct Detect {
    engine: Box<dyn Engine>,
    image: ImageSpec,
    input: Input,
    params: DetectParams,
    labels: Vec<std::sync::Arc<str>>,
    allowed: Vec<bool>,
}

impl StageRunner for Detect {
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
        let out = infer_batch(self.engine.as_mut(), &self.image, self.input, frames)?;
        if out.ndim() != 3 {
            return Err(StageError::Output(format!(
                "expected an N x boxes x attributes (or N x attributes x boxes) output, got {:?}",
                out.shape()
            )));
        }
        let dims = (self.image.width, self.image.height);
        let d = detect::Decode {
            format: self.params.format,
            normalized: self.params.normalized,
            input: dims,
            score: self.params.score,
            allowed: &self.allowed,
        };
        for (i, f) in frames.iter_mut().enumerate() {
            let found = detect::decode(
                out.index_axis(Axis(0), i)
                    .into_dimensionality()
                    .map_err(|e| StageError::Output(e.to_string()))?,
                &d,
            )
            .map_err(StageError::Output)?;
            let kept = detect::nms(found, self.params.iou, self.params.max_objects);
            let fit = detect::Fit::new((f.image.width, f.image.height), dims, self.params.resize);
            let objects = kept
                .into_iter()
                .map(|c| {
                    let [x0, y0, x1, y1] = c.corners;
                    Object {
                        label: self
                            .labels
                            .get(c.class)
                            .cloned()
                            .unwrap_or_else(|| format!("class_{}", c.class).into()),
                        class_id: c.class,
                        score: c.score,
                        bbox: fit.box_to_frame(x0, y0, x1, y1),
                        track_id: None,
                    }
                })
                .collect();
            f.outputs.push(StageOutput::Objects(objects));
        }
        Ok(())
    }
}

/// CTC text recogniser over crops of an earlier stage's text boxes.
struct TextRecognize {
    engine: Box<dyn Engine>,
    image: ImageSpec,
    params: TextRecognizeParams,
    charset: Vec<String>,
    boxes_from: usize,
}

/// One crop waiting for recognition.
struct Crop {
    frame: usize,
    order: usize,
    bbox: crate::frame::BBox,
    pixels: Vec<u8>,
    width: usize,
}

impl StageRunner for TextRecognize {
    fn run(&mut self, frames: &mut [Frame]) -> Result<(), StageError> {
        let h = self.image.height as usize;
        let mut crops = Vec::new();
        for (fi, f) in frames.iter().enumerate() {
            let Some(StageOutput::TextBoxes(boxes)) = f.outputs.get(self.boxes_from) else {
                return Err(StageError::Output(format!(
                    "frame has no text boxes from stage {}",
                    self.boxes_from
                )));
            };
            for (order, b) in boxes.iter().enumerate() {
                let ratio = b.bbox.w / b.bbox.h.max(1.0);
                let width =
                    ((h as f32 * ratio).ceil() as usize).clamp(1, self.params.max_width as usize);
                crops.push(Crop {
                    frame: fi,
                    order,
                    bbox: b.bbox,
                    pixels: image::crop_resize(&f.image, &b.bbox, width, h),
                    width,
                });
            }
        }
        // Similar widths together, so that little of each batch is padding.
        crops.sort_by_key(|c| c.width);
        let mut lines: Vec<Vec<(usize, TextLine)>> = vec![Vec::new(); frames.len()];
        for chunk in crops.chunks(self.params.max_crops) {
            let w = chunk
                .iter()
                .map(|c| c.width)
                .max()
                .unwrap_or(1)
                .max(self.image.width as usize);
            let mut input = Array4::<f32>::zeros((chunk.len(), 3, h, w));
            for (i, c) in chunk.iter().enumerate() {
                let mut slot = input.index_axis_mut(Axis(0), i);
                image::fill_crop(
                    &c.pixels,
                    c.width,
                    &self.image,
                    slot.slice_mut(s![.., .., 0..c.width]),
                );
            }
            let mut outs = self.engine.infer(input.view().into_dyn())?;
            if outs.is_empty() || outs[0].ndim() != 3 || outs[0].shape()[0] != chunk.len() {
                return Err(StageError::Output("expected an N x T x C output".into()));
            }
            let out = outs.swap_remove(0);
            let classes = out.shape()[2];
            for (i, c) in chunk.iter().enumerate() {
                let probs: Vec<f32> = out.index_axis(Axis(0), i).iter().copied().collect();
                let (text, score) = ctc::greedy_decode(&probs, classes, &self.charset);
                let text = text.trim().to_string();
                if !text.is_empty() && score >= self.params.min_score {
                    lines[c.frame].push((
                        c.order,
                        TextLine {
                            text,
                            score,
                            bbox: c.bbox,
                        },
                    ));
                }
            }
        }
        for (f, mut l) in frames.iter_mut().zip(lines) {
            l.sort_by_key(|(order, _)| *order);
            f.outputs
                .push(StageOutput::Texts(l.into_iter().map(|(_, t)| t).collect()));
        }
        Ok(())
    }
}
