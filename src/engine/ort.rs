//! ONNX Runtime backend (`ort` crate, `load-dynamic`: the library is found at run time).

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use ndarray::{ArrayD, ArrayViewD, ArrayViewMutD, Axis};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynTensor, DynTensorValueType, Tensor, TensorRef, ValueType};

use super::{Engine, EngineError, EngineInfo, Feed, Place, TensorInfo};
use crate::frame::{Kept, KeptBatch};
use crate::gpu::GpuSession;

/// The file name `setup.sh` installs.
pub const LIB_NAME: &str = "libonnxruntime.so";

/// Where to look for the ONNX Runtime library. A path named by the pipeline file (`onnxruntime`)
/// or by `ORT_DYLIB_PATH` is the only candidate: a user who names a library means that one. Else:
/// `engines/lib/` of the repository the binary was built in (`target/*/poolpipe`), then
/// `engines/lib/` under the current folder.
pub fn candidate_paths(configured: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = configured {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return vec![PathBuf::from(p)];
    }
    let mut c = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // target/release/poolpipe, or target/release/deps/<test binary>
        for up in exe.ancestors().skip(1).take(4) {
            c.push(up.join("engines/lib").join(LIB_NAME));
        }
    }
    c.push(PathBuf::from("engines/lib").join(LIB_NAME));
    if cfg!(feature = "gpu") {
        // A GPU build prefers ONNX Runtime's GPU build (`./setup.sh gpu`), which runs CPU
        // sessions as well.
        let gpu: Vec<PathBuf> = c
            .iter()
            .filter_map(|p| Some(p.parent()?.with_file_name("lib-gpu").join(LIB_NAME)))
            .collect();
        c.splice(0..0, gpu);
    }
    c
}

/// The execution providers of a GPU session, and (TensorRT) its engine cache folder.
#[cfg(feature = "gpu")]
fn gpu_providers(
    g: &GpuSession,
    cfg: &OrtConfig,
    library: &Path,
) -> Result<(Vec<ort::ep::ExecutionProviderDispatch>, Option<PathBuf>), EngineError> {
    let input = if g.backend == crate::gpu::GpuBackend::TensorRt {
        // The optimisation profile needs the input's name and shape (read once per model file).
        static INPUTS: OnceLock<crate::gpu::FileMemo<Vec<TensorInfo>>> = OnceLock::new();
        let info = crate::gpu::by_file(INPUTS.get_or_init(Default::default), &cfg.model, |m| {
            describe(m, cfg.library.as_deref()).map(|d| d.info().inputs.clone())
        })?;
        match &cfg.input {
            Some(n) => info.into_iter().find(|i| &i.name == n),
            None => info.into_iter().next(),
        }
    } else {
        None
    };
    let dir = library.parent().unwrap_or(Path::new("."));
    Ok(crate::gpu::prepare_session(
        g,
        dir,
        &cfg.model,
        input
            .as_ref()
            .map(|i| (i.name.as_str(), i.shape.as_slice())),
    )?)
}

#[cfg(not(feature = "gpu"))]
fn gpu_providers(
    _g: &GpuSession,
    _cfg: &OrtConfig,
    _library: &Path,
) -> Result<(Vec<ort::ep::ExecutionProviderDispatch>, Option<PathBuf>), EngineError> {
    Err(crate::gpu::GpuError::NotBuilt.into())
}

/// Whether a folder has no files (or does not exist).
fn is_empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

static ENV: OnceLock<Result<(PathBuf, ort::environment::Environment), String>> = OnceLock::new();

/// Loads the ONNX Runtime library once per process; later calls return the first result.
pub fn init(
    configured: Option<&Path>,
) -> Result<(PathBuf, ort::environment::Environment), EngineError> {
    ENV.get_or_init(|| {
        let candidates = candidate_paths(configured);
        let Some(found) = candidates.iter().find(|p| p.is_file()) else {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            return Err(format!(
                "{LIB_NAME} not found (looked in: {}). Run ./setup.sh, which installs it into engines/lib, \
                 or set ORT_DYLIB_PATH to the library",
                looked.join(", ")
            ));
        };
        let builder = ort::init_from(found).map_err(|e| format!("cannot load {}: {e}", found.display()))?;
        let env = builder
            .with_name("poolpipe")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("cannot start ONNX Runtime from {}: {e}", found.display()))?;
        tracing::debug!(path = %found.display(), "Loaded ONNX Runtime.");
        Ok((found.clone(), env))
    })
    .clone()
    .map_err(EngineError::Runtime)
}

/// One ONNX Runtime session.
pub struct OrtEngine {
    /// Host buffers the batches go through (dropped before the session whose allocator made
    /// them).
    staging: Option<Staging>,
    /// The session (`run` needs `&mut`).
    session: Session,
    /// Name of the input fed with the batch.
    input: String,
    /// Inputs and outputs.
    info: EngineInfo,
    /// Where the session computes.
    place: Place,
    /// Set once keeping an output, or reading kept ones where they are, failed where the plain
    /// way worked: from then on this engine gives its outputs to the host.
    keep_failed: bool,
}

/// Host buffers a GPU session's batches go through: page-locked (CUDA pinned) memory, which
/// the GPU copies from and to directly and asynchronously, where ordinary memory would first be
/// copied once more by the driver. The input buffer is reused from batch to batch.
struct Staging {
    /// The input batch's buffer, and its shape (dropped before its allocator).
    buffer: Option<(Vec<usize>, Tensor<f32>)>,
    /// Allocates the input buffer.
    input: Allocator,
    /// Where the outputs are written.
    output: MemoryInfo<'static>,
}

impl Staging {
    /// CUDA pinned memory of GPU `gpu`, from `session`'s allocators.
    fn pinned(session: &Session, gpu: u32) -> ort::Result<Self> {
        let id = gpu as i32;
        Ok(Self {
            buffer: None,
            input: Allocator::new(
                session,
                MemoryInfo::new(
                    AllocationDevice::CUDA_PINNED,
                    id,
                    AllocatorType::Device,
                    MemoryType::CPUInput,
                )?,
            )?,
            output: MemoryInfo::new(
                AllocationDevice::CUDA_PINNED,
                id,
                AllocatorType::Device,
                MemoryType::CPUOutput,
            )?,
        })
    }

    /// Ordinary host memory through the same steps (what a CPU session needs no staging for;
    /// it exercises them where there is no GPU).
    fn host() -> ort::Result<Self> {
        Ok(Self {
            buffer: None,
            input: Allocator::default(),
            output: cpu_memory()?,
        })
    }

    /// The input buffer holding a copy of `x`, made anew only when the shape changes.
    fn fill(&mut self, x: ArrayViewD<'_, f32>) -> ort::Result<&Tensor<f32>> {
        if self
            .buffer
            .as_ref()
            .is_none_or(|(shape, _)| shape.as_slice() != x.shape())
        {
            self.buffer = None;
            let t = Tensor::<f32>::new(&self.input, x.shape().to_vec())?;
            self.buffer = Some((x.shape().to_vec(), t));
        }
        let (shape, t) = self.buffer.as_mut().expect("made above");
        let (_, data) = t.try_extract_tensor_mut::<f32>()?;
        ArrayViewMutD::from_shape(shape.clone(), data)
            .map_err(|e| ort::Error::new(e.to_string()))?
            .assign(&x);
        Ok(t)
    }
}

/// Host memory as ONNX Runtime names it.
fn cpu_memory() -> ort::Result<MemoryInfo<'static>> {
    MemoryInfo::new(
        AllocationDevice::CPU,
        0,
        AllocatorType::Device,
        MemoryType::Default,
    )
}

/// The memory of `place` as ONNX Runtime names it.
fn memory_of(place: Place) -> ort::Result<MemoryInfo<'static>> {
    match place {
        Place::Cpu => cpu_memory(),
        Place::Gpu(n) => MemoryInfo::new(
            AllocationDevice::CUDA,
            n as i32,
            AllocatorType::Device,
            MemoryType::Default,
        ),
    }
}

/// A batch output ONNX Runtime kept in the memory of the device that computed it; the next
/// stage's session reads it there.
pub struct KeptValue {
    /// The tensor (the first dimension is the batch).
    value: DynTensor,
    /// Its shape.
    shape: Vec<usize>,
    /// Where it is.
    place: Place,
    /// A host copy of a batch in device memory, made once where some reader needs one.
    host: OnceLock<Result<ArrayD<f32>, String>>,
}

impl std::fmt::Debug for KeptValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeptValue({:?} on {})", self.shape, self.place)
    }
}

impl KeptValue {
    fn new(value: DynTensor, place: Place) -> Self {
        let shape = value.shape().iter().map(|&d| d.max(0) as usize).collect();
        Self {
            value,
            shape,
            place,
            host: OnceLock::new(),
        }
    }

    /// Where it is.
    pub fn place(&self) -> Place {
        self.place
    }

    /// The whole batch copied from the device to the host (once; see `host`).
    fn download(&self) -> Result<ArrayD<f32>, String> {
        self.value
            .to(AllocationDevice::CPU, 0)
            .and_then(|v| v.try_extract_array::<f32>().map(|a| a.to_owned()))
            .map_err(|e| {
                format!(
                    "copying a kept activation from {} to the host: {e}",
                    self.place
                )
            })
    }
}

impl KeptBatch for KeptValue {
    fn len(&self) -> usize {
        self.shape.first().copied().unwrap_or(0)
    }

    fn sample_shape(&self) -> &[usize] {
        self.shape.get(1..).unwrap_or(&[])
    }

    fn sample_to_host(&self, i: usize) -> Result<ArrayD<f32>, String> {
        if i >= self.len() {
            return Err(format!("sample {i} of a batch of {}", self.len()));
        }
        if let Some(data) = self.sample_in_host_memory(i) {
            return ArrayD::from_shape_vec(self.sample_shape(), data.to_vec())
                .map_err(|e| e.to_string());
        }
        let all = self
            .host
            .get_or_init(|| self.download())
            .as_ref()
            .map_err(Clone::clone)?;
        Ok(all.index_axis(Axis(0), i).to_owned())
    }

    fn sample_in_host_memory(&self, i: usize) -> Option<&[f32]> {
        if i >= self.len() || !self.value.memory_info().is_cpu_accessible() {
            return None;
        }
        let per: usize = self.sample_shape().iter().product();
        let (_, data) = self.value.try_extract_tensor::<f32>().ok()?;
        data.get(i * per..(i + 1) * per)
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Copies the samples `kept` into one batch tensor in host memory (for a batch that is not one
/// whole kept batch: other frames, another order). Samples in host memory are read where they
/// are; samples on a GPU are copied to the host first (a GPU session then copies the batch to
/// its GPU). ONNX Runtime cannot read a slice of a tensor in place: binding a borrowed view
/// makes it clone the view, and in `ort` 2.0.0-rc.15 that clone deadlocks on its own lock.
pub fn gather(kept: &[&Kept]) -> Result<Tensor<f32>, EngineError> {
    Tensor::from_array(super::kept_to_host(kept)?)
        .map_err(|e| EngineError::Infer(format!("gathering kept activations: {e}")))
}

/// What a bound run gives.
enum Bound {
    /// Every output, in host memory (and the fallback's outputs).
    Host(Vec<ArrayD<f32>>),
    /// The first output, where the session computed it.
    Kept(DynTensor),
}

impl Bound {
    /// The outputs of a run that was asked for host outputs.
    fn into_host(self) -> Vec<ArrayD<f32>> {
        match self {
            Bound::Host(out) => out,
            Bound::Kept(v) => unreachable!("a run for host outputs kept {v:?}"),
        }
    }
}

/// How to load an ONNX model.
#[derive(Debug, Clone)]
pub struct OrtConfig {
    /// The ONNX file.
    pub model: PathBuf,
    /// Name of the input to feed (default: the first).
    pub input: Option<String>,
    /// Intra-op threads.
    pub threads: usize,
    /// Library location from the pipeline file, if any.
    pub library: Option<PathBuf>,
    /// Full graph optimisation (off: the graph runs as written, which makes outputs of a model
    /// and of its blocks bit-comparable).
    pub optimize: bool,
    /// Let idle intra-op threads spin. Fastest for one model alone on a machine; several stages
    /// sharing cores run better without (a spinning thread burns a core another stage needs).
    pub spin: bool,
    /// Run on a GPU (`cuda:N`, `tensorrt:N`) instead of the CPU. The session fails rather than
    /// fall back to the CPU when the GPU's provider cannot be registered.
    pub gpu: Option<GpuSession>,
}

fn shape_of(t: &ValueType) -> Vec<i64> {
    match t {
        ValueType::Tensor { shape, .. } => shape.iter().copied().collect(),
        _ => Vec::new(),
    }
}

impl OrtEngine {
    /// Loads a model.
    pub fn load(cfg: &OrtConfig) -> Result<Self, EngineError> {
        let (library, env) = init(cfg.library.as_deref())?;
        let load_err = |e: String| EngineError::Load {
            model: cfg.model.display().to_string(),
            message: e,
        };
        let (providers, cache) = match &cfg.gpu {
            Some(g) => gpu_providers(g, cfg, &library)?,
            None => (Vec::new(), None),
        };
        let fresh_cache = cache.as_deref().is_some_and(is_empty_dir);
        let started = std::time::Instant::now();
        let session = Session::builder(&env)
            .and_then(|b| {
                if providers.is_empty() {
                    Ok(b)
                } else {
                    Ok(b.with_execution_providers(&providers)?)
                }
            })
            .and_then(|b| {
                let level = if cfg.optimize {
                    GraphOptimizationLevel::Level3
                } else {
                    GraphOptimizationLevel::Disable
                };
                Ok(b.with_optimization_level(level)?)
            })
            .and_then(|b| Ok(b.with_intra_threads(cfg.threads.max(1))?))
            .and_then(|b| Ok(b.with_inter_threads(1)?))
            .and_then(|b| Ok(b.with_intra_op_spinning(cfg.spin)?))
            .and_then(|mut b| b.commit_from_file(&cfg.model))
            .map_err(|e| match &cfg.gpu {
                Some(g) => load_err(format!("on {}: {e}", g.device())),
                None => load_err(e.to_string()),
            })?;
        if let Some(g) = &cfg.gpu {
            let secs = started.elapsed().as_secs_f64();
            match &cache {
                Some(dir) if fresh_cache => tracing::info!(
                    model = %cfg.model.display(), device = %g.device(), seconds = secs, cache = %dir.display(),
                    "Built the TensorRT engine (first build; later starts load it from the cache)."
                ),
                Some(dir) => tracing::info!(
                    model = %cfg.model.display(), device = %g.device(), seconds = secs, cache = %dir.display(),
                    "Loaded the TensorRT engine from the cache."
                ),
                None => {
                    tracing::info!(model = %cfg.model.display(), device = %g.device(), seconds = secs, "Session on the GPU.")
                }
            }
        }
        let describe = |outlets: &[ort::value::Outlet]| -> Vec<TensorInfo> {
            outlets
                .iter()
                .map(|o| TensorInfo {
                    name: o.name().to_string(),
                    shape: shape_of(o.dtype()),
                })
                .collect()
        };
        let info = EngineInfo {
            inputs: describe(session.inputs()),
            outputs: describe(session.outputs()),
        };
        let input = match &cfg.input {
            Some(name) if info.inputs.iter().any(|i| &i.name == name) => name.clone(),
            Some(name) => {
                let have: Vec<&str> = info.inputs.iter().map(|i| i.name.as_str()).collect();
                return Err(load_err(format!(
                    "no input named `{name}` (the model has: {})",
                    have.join(", ")
                )));
            }
            None => info
                .inputs
                .first()
                .map(|i| i.name.clone())
                .ok_or_else(|| load_err("the model has no inputs".into()))?,
        };
        let place = cfg.gpu.as_ref().map_or(Place::Cpu, |g| Place::Gpu(g.index));
        let staging = match place {
            Place::Gpu(n) => Staging::pinned(&session, n)
                .inspect_err(|e| tracing::warn!(model = %cfg.model.display(), error = %e, "No pinned host buffers for this GPU session: batches go through ordinary memory."))
                .ok(),
            Place::Cpu => None,
        };
        Ok(Self {
            staging,
            session,
            input,
            info,
            place,
            keep_failed: false,
        })
    }

    /// Sends batches through reused host buffers as a GPU session does (there page-locked),
    /// here in ordinary memory: to run those steps where there is no GPU.
    pub fn with_host_staging(mut self) -> Result<Self, EngineError> {
        self.staging = Some(Staging::host().map_err(|e| EngineError::Runtime(e.to_string()))?);
        Ok(self)
    }

    /// Sends a GPU session's batches through ordinary host memory (to measure what the pinned
    /// buffers gain).
    pub fn without_staging(mut self) -> Self {
        self.staging = None;
        self
    }

    /// Runs one batch with its input and outputs bound where they are and where they go: the
    /// input from the host (through the staging buffer, if any) or from kept samples (read in
    /// place when they are one whole batch kept on this session's device, else gathered onto
    /// it); the first output kept on the device (`keep`), or every output to the host (into
    /// staging memory, if any).
    fn run_bound(&mut self, feed: Feed<'_>, keep: bool) -> Result<Bound, EngineError> {
        let err = |e: ort::Error| EngineError::Infer(e.to_string());
        let mut binding = self.session.create_binding().map_err(err)?;
        let gathered;
        match feed {
            Feed::Host(x) => match self.staging.as_mut() {
                Some(st) => binding
                    .bind_input(&self.input, st.fill(x).map_err(err)?)
                    .map_err(err)?,
                None => {
                    // An owned copy: a borrowed view would be cloned by the binding (see
                    // `gather`).
                    let t = Tensor::from_array(x.as_standard_layout().into_owned())
                        .map_err(|e| EngineError::Input(e.to_string()))?;
                    binding.bind_input(&self.input, &t).map_err(err)?;
                }
            },
            Feed::Kept(kept) => {
                let whole = Kept::whole_batch(kept);
                match whole
                    .as_ref()
                    .and_then(|b| b.as_any().downcast_ref::<KeptValue>())
                {
                    // Read where it is: on this session's device, or on another GPU (ONNX
                    // Runtime copies it device to device), or from the host to a GPU. A CPU
                    // session cannot reach a GPU's memory.
                    Some(v) if !(self.place == Place::Cpu && v.place != Place::Cpu) => {
                        binding.bind_input(&self.input, &v.value).map_err(err)?
                    }
                    _ => {
                        gathered = gather(kept)?;
                        binding.bind_input(&self.input, &gathered).map_err(err)?;
                    }
                }
            }
        }
        let first = self
            .info
            .outputs
            .first()
            .ok_or_else(|| EngineError::Infer("the model has no outputs".into()))?
            .name
            .clone();
        if keep {
            binding
                .bind_output_to_device(&first, &memory_of(self.place).map_err(err)?)
                .map_err(err)?;
        } else {
            let host = match &self.staging {
                Some(st) => st.output.clone(),
                None => cpu_memory().map_err(err)?,
            };
            for o in &self.info.outputs {
                binding.bind_output_to_device(&o.name, &host).map_err(err)?;
            }
        }
        let mut outputs = self.session.run_binding(&binding).map_err(err)?;
        if keep {
            let v = outputs
                .remove(&first)
                .ok_or_else(|| EngineError::Infer(format!("no output `{first}`")))?
                .downcast::<DynTensorValueType>()
                .map_err(err)?;
            Ok(Bound::Kept(v))
        } else {
            owned(&outputs).map(Bound::Host)
        }
    }

    /// The plain way: the batch in host memory, every output back to the host.
    fn run_plain(&mut self, input: ArrayViewD<'_, f32>) -> Result<Vec<ArrayD<f32>>, EngineError> {
        // ONNX Runtime reads a view in place only where it is contiguous.
        let input = input.as_standard_layout();
        let tensor = TensorRef::from_array_view(input.view())
            .map_err(|e| EngineError::Input(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(|e| EngineError::Infer(e.to_string()))?;
        owned(&outputs)
    }

    /// A bound run ([`run_bound`](Self::run_bound)), or, where it fails and the plain way
    /// works, the plain way's outputs: then it says so once (`what` failed) and this engine
    /// runs the plain way from then on. A batch the plain way cannot run either fails with the
    /// plain way's error.
    fn bound_or_plain(
        &mut self,
        feed: Feed<'_>,
        keep: bool,
        what: &str,
    ) -> Result<Bound, EngineError> {
        let failed = match self.run_bound(feed.clone(), keep) {
            Ok(b) => return Ok(b),
            Err(e) => e,
        };
        let plain = match feed {
            Feed::Host(x) => self.run_plain(x)?,
            Feed::Kept(k) => self.run_plain(super::kept_to_host(k)?.view())?,
        };
        tracing::warn!(place = %self.place, error = %failed, "{what} failed where the plain way worked: this engine's batches now go through ordinary host memory.");
        self.staging = None;
        self.keep_failed = true;
        Ok(Bound::Host(plain))
    }
}

/// Every output of a run, copied out of the session, in the model's order.
fn owned(outputs: &ort::session::SessionOutputs<'_>) -> Result<Vec<ArrayD<f32>>, EngineError> {
    let mut out = Vec::with_capacity(outputs.len());
    for (_, v) in outputs.iter() {
        let a = v
            .try_extract_array::<f32>()
            .map_err(|e| EngineError::Infer(e.to_string()))?;
        out.push(a.to_owned());
    }
    Ok(out)
}

/// Opens a model only to read its tensors and metadata (one thread, no graph optimisation).
pub fn describe(model: &Path, library: Option<&Path>) -> Result<OrtEngine, EngineError> {
    OrtEngine::load(&OrtConfig {
        model: model.to_path_buf(),
        input: None,
        threads: 1,
        library: library.map(Path::to_path_buf),
        optimize: false,
        gpu: None,
        spin: false,
    })
}

impl Engine for OrtEngine {
    fn info(&self) -> &EngineInfo {
        &self.info
    }

    fn infer(&mut self, input: ArrayViewD<'_, f32>) -> Result<Vec<ArrayD<f32>>, EngineError> {
        if self.staging.is_none() {
            return self.run_plain(input);
        }
        let what = "Staging the batch through pinned buffers";
        Ok(self
            .bound_or_plain(Feed::Host(input), false, what)?
            .into_host())
    }

    fn infer_named(
        &mut self,
        inputs: &[(&str, ArrayViewD<'_, f32>)],
    ) -> Result<Vec<ArrayD<f32>>, EngineError> {
        let mut feed = Vec::with_capacity(inputs.len());
        for (name, view) in inputs {
            let t = TensorRef::from_array_view(view.view())
                .map_err(|e| EngineError::Input(format!("{name}: {e}")))?;
            feed.push((
                std::borrow::Cow::Borrowed(*name),
                ort::session::SessionInputValue::from(t),
            ));
        }
        let outputs = self
            .session
            .run(feed)
            .map_err(|e| EngineError::Infer(e.to_string()))?;
        owned(&outputs)
    }

    fn metadata(&self, key: &str) -> Option<String> {
        self.session.metadata().ok()?.custom(key)
    }

    fn infer_feed(&mut self, feed: Feed<'_>) -> Result<Vec<ArrayD<f32>>, EngineError> {
        match feed {
            Feed::Host(x) => self.infer(x),
            Feed::Kept(k) if self.keep_failed => self.run_plain(super::kept_to_host(k)?.view()),
            Feed::Kept(_) => {
                let what = "Reading kept activations where they are";
                Ok(self.bound_or_plain(feed, false, what)?.into_host())
            }
        }
    }

    fn infer_keeping(&mut self, feed: Feed<'_>) -> Result<Arc<dyn KeptBatch>, EngineError> {
        if self.keep_failed {
            return super::HostBatch::first_of(self.infer_feed(feed)?);
        }
        let what = "Keeping the output where it was computed";
        match self.bound_or_plain(feed, true, what)? {
            Bound::Kept(v) => Ok(Arc::new(KeptValue::new(v, self.place))),
            Bound::Host(out) => super::HostBatch::first_of(out),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::engine::HostBatch;
    use ndarray::{Array2, ArrayD};
    use onnx_protobuf::{
        GraphProto, Message, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto,
        ValueInfoProto, tensor_shape_proto, type_proto,
    };

    /// Writes `y = a * x + b` (x: N x 4, float) as an ONNX model at `path`.
    pub(crate) fn affine_model(path: &Path, a: f32, b: f32) {
        let vi = |name: &str| {
            let mut shape = onnx_protobuf::TensorShapeProto::new();
            for d in [
                tensor_shape_proto::dimension::Value::DimParam("N".into()),
                tensor_shape_proto::dimension::Value::DimValue(4),
            ] {
                let mut dim = tensor_shape_proto::Dimension::new();
                dim.value = Some(d);
                shape.dim.push(dim);
            }
            let mut t = type_proto::Tensor::new();
            t.elem_type = 1;
            t.shape = Some(shape).into();
            let mut tp = TypeProto::new();
            tp.value = Some(type_proto::Value::TensorType(t));
            let mut v = ValueInfoProto::new();
            v.name = name.into();
            v.type_ = Some(tp).into();
            v
        };
        let scalar = |name: &str, x: f32| {
            let mut t = TensorProto::new();
            t.name = name.into();
            t.data_type = 1;
            t.float_data = vec![x];
            t
        };
        let node = |op: &str, i: [&str; 2], o: &str| {
            let mut n = NodeProto::new();
            n.op_type = op.into();
            n.input = i.iter().map(|s| s.to_string()).collect();
            n.output = vec![o.into()];
            n
        };
        let mut g = GraphProto::new();
        g.name = "affine".into();
        g.input = vec![vi("x")];
        g.output = vec![vi("y")];
        g.initializer = vec![scalar("a", a), scalar("b", b)];
        g.node = vec![node("Mul", ["x", "a"], "ax"), node("Add", ["ax", "b"], "y")];
        let mut m = ModelProto::new();
        m.ir_version = 8;
        let mut op = OperatorSetIdProto::new();
        op.version = 13;
        m.opset_import = vec![op];
        m.graph = Some(g).into();
        std::fs::write(path, m.write_to_bytes().unwrap()).unwrap();
    }

    /// A CPU engine of `y = a * x + b`.
    pub(crate) fn affine(dir: &Path, a: f32, b: f32) -> OrtEngine {
        let path = dir.join(format!("affine-{a}-{b}.onnx"));
        affine_model(&path, a, b);
        OrtEngine::load(&OrtConfig {
            model: path,
            input: None,
            threads: 1,
            library: None,
            optimize: false,
            spin: false,
            gpu: None,
        })
        .unwrap()
    }

    fn batch(rows: usize) -> ArrayD<f32> {
        Array2::from_shape_fn((rows, 4), |(i, j)| (4 * i + j) as f32).into_dyn()
    }

    fn values(a: &ArrayD<f32>) -> Vec<f32> {
        a.iter().copied().collect()
    }

    #[test]
    fn kept_outputs_feed_the_next_engine_in_place_gathered_or_through_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let (mut head, mut tail) = (affine(dir.path(), 2.0, 1.0), affine(dir.path(), 3.0, 0.0));
        let x = batch(3);
        let kept = head.infer_keeping(Feed::Host(x.view())).unwrap();
        let v = kept
            .as_any()
            .downcast_ref::<KeptValue>()
            .expect("ONNX Runtime kept its output");
        assert_eq!(v.place(), Place::Cpu);
        assert_eq!((kept.len(), kept.sample_shape()), (3, &[4][..]));
        assert_eq!(
            values(&kept.sample_to_host(1).unwrap()),
            vec![9.0, 11.0, 13.0, 15.0]
        );
        assert!(kept.sample_to_host(3).is_err());
        let all = Kept::all(&kept);
        let expect = |rows: &[usize]| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| (0..4).map(move |j| 3.0 * (2.0 * (4 * r + j) as f32 + 1.0)))
                .collect()
        };

        // The whole batch, in order: read where it is.
        let refs: Vec<&Kept> = all.iter().collect();
        assert!(Kept::whole_batch(&refs).is_some());
        let out = tail.infer_feed(Feed::Kept(&refs)).unwrap();
        assert_eq!(values(&out[0]), expect(&[0, 1, 2]));

        // Some of it, out of order: gathered into a new batch.
        let some = [&all[2], &all[0]];
        assert!(Kept::whole_batch(&some).is_none());
        let out = tail.infer_feed(Feed::Kept(&some)).unwrap();
        assert_eq!(values(&out[0]), expect(&[2, 0]));

        // Mixed with a sample kept in host memory by an engine that cannot keep its own.
        let host: Arc<dyn KeptBatch> = Arc::new(HostBatch(batch(2).mapv(|x| 2.0 * x + 1.0)));
        let other = Kept::all(&host);
        let mixed = [&other[1], &all[1]];
        let out = tail.infer_feed(Feed::Kept(&mixed)).unwrap();
        assert_eq!(values(&out[0]), expect(&[1, 1]));

        // Kept in, kept out: three engines in a row without the host.
        let again = tail.infer_keeping(Feed::Kept(&refs)).unwrap();
        assert!(again.as_any().is::<KeptValue>());
        let last = Kept::all(&again);
        let out = head
            .infer_feed(Feed::Kept(&last.iter().collect::<Vec<_>>()))
            .unwrap();
        let want: Vec<f32> = expect(&[0, 1, 2]).iter().map(|y| 2.0 * y + 1.0).collect();
        assert_eq!(values(&out[0]), want);
        assert!(
            !tail.keep_failed && !head.keep_failed,
            "nothing fell back to the plain way"
        );
    }

    #[test]
    fn kept_samples_of_different_shapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut tail = affine(dir.path(), 1.0, 0.0);
        let a: Arc<dyn KeptBatch> = Arc::new(HostBatch(batch(1)));
        let b: Arc<dyn KeptBatch> = Arc::new(HostBatch(ArrayD::zeros(ndarray::IxDyn(&[1, 5]))));
        let (a, b) = (Kept::all(&a), Kept::all(&b));
        let e = gather(&[&a[0], &b[0]]).unwrap_err();
        assert!(e.to_string().contains("different shapes"), "{e}");
        assert!(tail.infer_feed(Feed::Kept(&[&a[0], &b[0]])).is_err());
    }

    #[test]
    fn batches_staged_through_reused_host_buffers_give_the_plain_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let mut plain = affine(dir.path(), 2.0, 1.0);
        let mut staged = affine(dir.path(), 2.0, 1.0).with_host_staging().unwrap();
        for rows in [3, 3, 1, 5] {
            let x = batch(rows);
            let want = plain.infer(x.view()).unwrap();
            assert_eq!(staged.infer(x.view()).unwrap(), want, "batch of {rows}");
            assert_eq!(
                staged.staging.as_ref().unwrap().buffer.as_ref().unwrap().0,
                vec![rows, 4],
                "the buffer has the batch's shape"
            );
        }
        // A view that is not contiguous in memory (every other column of a wider array).
        let wide = Array2::from_shape_fn((2, 8), |(i, j)| (8 * i + j) as f32);
        let x = wide.slice(ndarray::s![.., ..;2]).into_dyn();
        assert!(!x.is_standard_layout());
        let want = plain.infer(x.to_owned().view()).unwrap();
        assert_eq!(staged.infer(x.view()).unwrap(), want);
        assert_eq!(
            plain.infer(x.view()).unwrap(),
            want,
            "the plain way reads it too"
        );
        assert!(
            staged.staging.is_some() && !staged.keep_failed,
            "staging never fell back"
        );
    }
}
