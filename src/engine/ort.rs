//! ONNX Runtime backend (`ort` crate, `load-dynamic`: the library is found at run time).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ndarray::{ArrayD, ArrayViewD};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorRef, ValueType};

use super::{Engine, EngineError, EngineInfo, TensorInfo};
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
    /// The session (`run` needs `&mut`).
    session: Session,
    /// Name of the input fed with the batch.
    input: String,
    /// Inputs and outputs.
    info: EngineInfo,
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
        Ok(Self {
            session,
            input,
            info,
        })
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
        let tensor =
            TensorRef::from_array_view(input).map_err(|e| EngineError::Input(e.to_string()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(|e| EngineError::Infer(e.to_string()))?;
        owned(&outputs)
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
}
