//! The synchronous `Engine` trait and its backends.
//!
//! An engine instance is owned by one worker thread of a stage's pool and fed batches through a
//! bounded channel, so nothing else ever blocks on inference. Backends:
//!
//! - [`ort::OrtEngine`]: ONNX Runtime on the CPU, loaded at run time from the shared library that
//!   `./setup.sh` puts in `engines/lib` (or wherever `ORT_DYLIB_PATH` points);
//! - [`NoopEngine`]: does nothing, to measure the pipeline's own overhead.
//!
//! GPU stages (`cuda:N`, `tensorrt:N`) are [`ort::OrtEngine`]s with ONNX Runtime's CUDA or
//! TensorRT provider (feature `gpu`; see [`crate::gpu`]), behind the same trait.

pub mod ort;
mod runner;

pub use runner::{Pending, StageError, StageRunner};

use std::sync::Arc;

use ndarray::{ArrayD, ArrayViewD, Axis};

use crate::frame::{Kept, KeptBatch};

/// Name and shape of a model input or output; `-1` marks a dynamic dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name in the model.
    pub name: String,
    /// Dimensions, `-1` where dynamic.
    pub shape: Vec<i64>,
}

/// What an engine takes and gives.
#[derive(Debug, Clone, Default)]
pub struct EngineInfo {
    /// Model inputs.
    pub inputs: Vec<TensorInfo>,
    /// Model outputs.
    pub outputs: Vec<TensorInfo>,
}

/// Errors of engines.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("ONNX Runtime library: {0}")]
    Runtime(String),
    /// A model could not be loaded.
    #[error("cannot load model {model}: {message}")]
    Load {
        /// The model file.
        model: String,
        /// Why.
        message: String,
    },
    /// Inference failed.
    #[error("inference failed: {0}")]
    Infer(String),
    /// The input does not fit the model.
    #[error("bad input: {0}")]
    Input(String),
    /// The GPU the session asks for cannot be used.
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
}

/// Where an engine computes, and so where the outputs it keeps are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Place {
    /// Host memory.
    Cpu,
    /// The memory of GPU N.
    Gpu(u32),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Cpu => f.write_str("cpu"),
            Place::Gpu(n) => write!(f, "gpu {n}"),
        }
    }
}

/// What a batch is fed from.
#[derive(Debug, Clone)]
pub enum Feed<'a> {
    /// A tensor in host memory (the first dimension is the batch).
    Host(ArrayViewD<'a, f32>),
    /// Samples that engines kept where they computed them, one per frame of the batch.
    Kept(&'a [&'a Kept]),
}

/// A batch in host memory kept for the next engine: what an engine that cannot keep its
/// outputs elsewhere keeps.
#[derive(Debug)]
pub struct HostBatch(pub ArrayD<f32>);

impl HostBatch {
    /// The first of a run's outputs, kept in host memory.
    pub fn first_of(outputs: Vec<ArrayD<f32>>) -> Result<Arc<dyn KeptBatch>, EngineError> {
        let first = outputs
            .into_iter()
            .next()
            .ok_or_else(|| EngineError::Infer("the model returned no outputs".into()))?;
        Ok(Arc::new(HostBatch(first)))
    }
}

impl KeptBatch for HostBatch {
    fn len(&self) -> usize {
        self.0.shape().first().copied().unwrap_or(0)
    }

    fn sample_shape(&self) -> &[usize] {
        self.0.shape().get(1..).unwrap_or(&[])
    }

    fn sample_to_host(&self, i: usize) -> Result<ArrayD<f32>, String> {
        if i >= self.len() {
            return Err(format!("sample {i} of a batch of {}", self.len()));
        }
        Ok(self.0.index_axis(Axis(0), i).to_owned())
    }

    fn sample_in_host_memory(&self, i: usize) -> Option<&[f32]> {
        let per: usize = self.sample_shape().iter().product();
        let all = self.0.as_slice()?;
        all.get(i * per..(i + 1) * per)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The kept samples `kept`, stacked in host memory (one copy of each: read in place where they
/// are in host memory, else copied there first).
pub fn kept_to_host(kept: &[&Kept]) -> Result<ArrayD<f32>, EngineError> {
    let Some(first) = kept.first() else {
        return Err(EngineError::Input("an empty batch".into()));
    };
    let sample = first.batch.sample_shape().to_vec();
    let per: usize = sample.iter().product();
    let mut flat = Vec::with_capacity(per * kept.len());
    for k in kept {
        if k.batch.sample_shape() != sample.as_slice() {
            return Err(EngineError::Input(format!(
                "activations of different shapes: {:?} and {:?}",
                sample,
                k.batch.sample_shape()
            )));
        }
        match k.batch.sample_in_host_memory(k.index) {
            Some(data) => flat.extend_from_slice(data),
            None => {
                let a = k
                    .batch
                    .sample_to_host(k.index)
                    .map_err(EngineError::Infer)?;
                flat.extend(a.iter().copied());
            }
        }
    }
    let mut shape = vec![kept.len()];
    shape.extend(sample);
    ArrayD::from_shape_vec(shape, flat).map_err(|e| EngineError::Input(e.to_string()))
}

/// A loaded model that runs batches synchronously.
pub trait Engine: Send {
    /// Inputs and outputs of the model.
    fn info(&self) -> &EngineInfo;
    /// Runs one batch (the first dimension of `input` is the batch) and returns every output.
    fn infer(&mut self, input: ArrayViewD<'_, f32>) -> Result<Vec<ArrayD<f32>>, EngineError>;
    /// Runs one batch fed to several named inputs (a recurrent cell: the step input and its
    /// states) and returns every output, in the model's order.
    fn infer_named(
        &mut self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
    ) -> Result<Vec<ArrayD<f32>>, EngineError> {
        match inputs {
            [(_, x)] => self.infer(x.view()),
            _ => Err(EngineError::Input(format!(
                "this engine takes one input, not {}",
                inputs.len()
            ))),
        }
    }
    /// A custom metadata value stored in the model file.
    fn metadata(&self, key: &str) -> Option<String>;

    /// Runs one batch fed from the host or from samples engines kept, and returns every output
    /// in host memory. Kept samples go through the host here; engines that read them where they
    /// are say so.
    fn infer_feed(&mut self, feed: Feed<'_>) -> Result<Vec<ArrayD<f32>>, EngineError> {
        match feed {
            Feed::Host(x) => self.infer(x),
            Feed::Kept(k) => self.infer(kept_to_host(k)?.view()),
        }
    }

    /// Runs one batch and keeps its first output for the next engine, where this engine
    /// computed it (in host memory, here).
    fn infer_keeping(&mut self, feed: Feed<'_>) -> Result<Arc<dyn KeptBatch>, EngineError> {
        HostBatch::first_of(self.infer_feed(feed)?)
    }
}

/// An engine that computes nothing and returns no outputs.
#[derive(Debug, Default)]
pub struct NoopEngine {
    /// Empty description.
    info: EngineInfo,
}

impl Engine for NoopEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn infer(&mut self, _input: ArrayViewD<'_, f32>) -> Result<Vec<ArrayD<f32>>, EngineError> {
        Ok(Vec::new())
    }

    fn metadata(&self, _key: &str) -> Option<String> {
        None
    }
}
