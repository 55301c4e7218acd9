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

use ndarray::{ArrayD, ArrayViewD};

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
