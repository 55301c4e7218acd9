//! NVIDIA GPUs: `cuda:N` and `tensorrt:N` devices, what the machine has, and the options each
//! stage's ONNX Runtime session gets on one.
//!
//! Everything that touches the driver sits behind the `gpu` cargo feature and loads its library at
//! run time (`libcuda.so.1` through cudarc, `libnvidia-ml.so.1` through NVML, TensorRT by name), so
//! a build with the feature starts on a machine without a GPU and says what is missing. Without the
//! feature every GPU request is [`GpuError::NotBuilt`]. The option mapping (precision, TensorRT
//! cache keys and optimisation profiles, provider libraries) is pure and tested everywhere.

use std::path::{Path, PathBuf};

/// ONNX Runtime execution provider of a GPU stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GpuBackend {
    /// CUDA provider (`cuda:N`).
    Cuda,
    /// TensorRT provider first, CUDA for what TensorRT cannot take (`tensorrt:N`).
    TensorRt,
}

impl GpuBackend {
    /// The device prefix in pipeline files.
    pub fn prefix(self) -> &'static str {
        match self {
            GpuBackend::Cuda => "cuda",
            GpuBackend::TensorRt => "tensorrt",
        }
    }

    /// Provider libraries (next to `libonnxruntime.so`) that a session on this backend loads.
    pub fn provider_libs(self) -> &'static [&'static str] {
        match self {
            GpuBackend::Cuda => &[
                "libonnxruntime_providers_shared.so",
                "libonnxruntime_providers_cuda.so",
            ],
            GpuBackend::TensorRt => &[
                "libonnxruntime_providers_shared.so",
                "libonnxruntime_providers_cuda.so",
                "libonnxruntime_providers_tensorrt.so",
            ],
        }
    }
}

/// Numeric precision of a GPU stage (`precision = "fp32" | "tf32" | "fp16"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// IEEE fp32 throughout (TF32 off): outputs match the CPU's to about 1e-5.
    #[default]
    Fp32,
    /// fp32 tensors, TF32 tensor-core math for matrix products and convolutions.
    Tf32,
    /// TensorRT builds fp16 kernels where they are faster (TensorRT only).
    Fp16,
}

impl Precision {
    /// Parses `fp32`, `tf32` or `fp16`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "tf32" => Ok(Precision::Tf32),
            "fp16" => Ok(Precision::Fp16),
            _ => Err(format!(
                "unknown precision `{s}`, expected `fp32`, `tf32` or `fp16`"
            )),
        }
    }

    /// As written in a pipeline file.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Tf32 => "tf32",
            Precision::Fp16 => "fp16",
        }
    }
}

/// The message of a build without the `gpu` feature.
pub const NOT_BUILT: &str =
    "this build has no GPU support; build with --features gpu (./setup.sh gpu)";

/// Why a GPU cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// Built without the `gpu` feature.
    #[error("{NOT_BUILT}")]
    NotBuilt,
    /// The NVIDIA driver's library cannot be loaded.
    #[error(
        "no NVIDIA driver: {lib} cannot be loaded{detail}; install the NVIDIA driver, or use `cpu` or `emulated:<class>`"
    )]
    NoDriver {
        /// The library looked for.
        lib: String,
        /// What the loader said (with a leading `: `), if anything.
        detail: String,
    },
    /// The device names a GPU the machine does not have.
    #[error("{device}: this machine has {count} GPU{}", if *count == 1 { "" } else { "s" })]
    Absent {
        /// As written (`cuda:3`).
        device: String,
        /// GPUs present.
        count: usize,
    },
    /// ONNX Runtime's GPU provider (or a CUDA library it needs) is missing.
    #[error(
        "{device}: {lib} is missing (looked in {dir}){detail}; run ./setup.sh gpu, which installs it into engines/lib-gpu"
    )]
    ProviderMissing {
        /// The device.
        device: String,
        /// The library.
        lib: String,
        /// Where it was looked for.
        dir: String,
        /// What the loader said (with a leading `: `), if anything.
        detail: String,
    },
    /// TensorRT is not installed.
    #[error(
        "{device}: TensorRT's {lib} cannot be loaded{detail}; install TensorRT 10 (NVIDIA's packages; it is not on PyPI or Debian) or use cuda:{index}, which works without it"
    )]
    TensorRtMissing {
        /// The device.
        device: String,
        /// GPU index, for the suggestion.
        index: u32,
        /// The library.
        lib: String,
        /// What the loader said.
        detail: String,
    },
    /// The driver answered with an error.
    #[error("NVIDIA driver: {0}")]
    Driver(String),
}

/// Whether this build has GPU support.
pub const fn built() -> bool {
    cfg!(feature = "gpu")
}

/// Checks a GPU index against the GPUs present.
pub fn check_index(device: &str, index: u32, count: usize) -> Result<(), GpuError> {
    if (index as usize) < count {
        Ok(())
    } else {
        Err(GpuError::Absent {
            device: device.to_string(),
            count,
        })
    }
}

/// Checks that every provider library of `backend` is in `dir` (the folder of the ONNX Runtime
/// library in use).
pub fn check_provider_libs(device: &str, backend: GpuBackend, dir: &Path) -> Result<(), GpuError> {
    for lib in backend.provider_libs() {
        if !dir.join(lib).is_file() {
            return Err(GpuError::ProviderMissing {
                device: device.to_string(),
                lib: (*lib).to_string(),
                dir: dir.display().to_string(),
                detail: String::new(),
            });
        }
    }
    Ok(())
}

/// TensorRT 10 libraries the TensorRT provider loads.
pub const TENSORRT_LIBS: &[&str] = &["libnvinfer.so.10", "libnvonnxparser.so.10"];

/// One GPU as the driver describes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GpuInfo {
    /// Index (`cuda:N`).
    pub index: u32,
    /// Product name, e.g. `NVIDIA H200`.
    pub name: String,
    /// Profile class: the name without the vendor and form factor, e.g. `H200`.
    pub class: String,
    /// Memory in bytes.
    pub memory_total: u64,
    /// Memory in use, bytes.
    pub memory_used: u64,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Driver version.
    pub driver: String,
    /// Busy share of the last sample period, 0..=1.
    pub utilization: Option<f64>,
    /// Core temperature, degrees Celsius.
    pub temperature_c: Option<u32>,
}

/// The profile class of a GPU product name: `NVIDIA H200` -> `H200`, `Tesla T4` -> `T4`,
/// `NVIDIA GeForce RTX 4090` -> `RTX4090`, `NVIDIA A100-SXM4-80GB` -> `A100`.
pub fn class_of(name: &str) -> String {
    let words: Vec<&str> = name
        .split_whitespace()
        .filter(|w| !matches!(*w, "NVIDIA" | "Tesla" | "GeForce" | "Quadro"))
        .collect();
    let joined = words.join("");
    let base = joined.split('-').next().unwrap_or_default();
    let class: String = base.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    if class.is_empty() {
        "GPU".into()
    } else {
        class
    }
}

/// What a TensorRT (or CUDA) session on a GPU is built with.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSession {
    /// Provider.
    pub backend: GpuBackend,
    /// GPU index.
    pub index: u32,
    /// Precision.
    pub precision: Precision,
    /// Root of the TensorRT engine cache.
    pub cache: PathBuf,
    /// Largest batch the stage runs (the optimisation profile's maximum).
    pub max_batch: usize,
    /// Block range of a cut model this session runs, if any.
    pub blocks: Option<[usize; 2]>,
    /// The input's non-batch dimensions where the model leaves them dynamic (from the stage's
    /// image size), to complete the optimisation profile.
    pub input_hint: Option<Vec<i64>>,
}

impl GpuSession {
    /// The device as written (`tensorrt:1`).
    pub fn device(&self) -> String {
        format!("{}:{}", self.backend.prefix(), self.index)
    }
}

/// TensorRT optimisation profile shapes `(min, opt, max)` of one input, in ONNX Runtime's
/// `name:1x3x224x224` form: batch 1, `max_batch / 2` (at least 1) and `max_batch`. `dims` are the
/// input's dimensions after the batch; `None` where one stays unknown (dynamic in the model and
/// not given by `hint`): TensorRT then builds per shape as it meets them.
pub fn profile_shapes(
    input: &str,
    dims: &[i64],
    hint: Option<&[i64]>,
    max_batch: usize,
) -> Option<(String, String, String)> {
    let mut full = Vec::with_capacity(dims.len());
    for (i, &d) in dims.iter().enumerate() {
        let d = if d > 0 {
            d
        } else {
            hint.and_then(|h| h.get(i)).copied().filter(|&h| h > 0)?
        };
        full.push(d.to_string());
    }
    let rest = full.join("x");
    let shape = |b: usize| {
        if rest.is_empty() {
            format!("{input}:{b}")
        } else {
            format!("{input}:{b}x{rest}")
        }
    };
    let max = max_batch.max(1);
    Some((shape(1), shape((max / 2).max(1)), shape(max)))
}

/// The engine cache key of a model on a GPU: model file name, content checksum, block range,
/// batch profile, precision, GPU class and compute capability. Anything that changes the built
/// engine changes the key, so a stale engine is never loaded.
pub fn cache_key(
    model: &Path,
    checksum: u32,
    blocks: Option<[usize; 2]>,
    max_batch: usize,
    precision: Precision,
    gpu_class: &str,
    compute_capability: (i32, i32),
) -> String {
    let stem: String = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let blocks = blocks.map_or("all".to_string(), |[a, b]| format!("b{a}-{b}"));
    format!(
        "{stem}-{checksum:08x}-{blocks}-bs1-{max_batch}-{}-{gpu_class}-sm{}{}",
        precision.name(),
        compute_capability.0,
        compute_capability.1
    )
}

/// ONNX Runtime TensorRT provider options (key, value) of a session. `profile` comes from
/// [`profile_shapes`]; `cache_dir` is the folder named by [`cache_key`].
pub fn tensorrt_options(
    s: &GpuSession,
    cache_dir: &Path,
    profile: Option<&(String, String, String)>,
) -> Vec<(&'static str, String)> {
    let flag = |b: bool| if b { "1" } else { "0" }.to_string();
    let mut o = vec![
        ("device_id", s.index.to_string()),
        ("trt_fp16_enable", flag(s.precision == Precision::Fp16)),
        ("trt_engine_cache_enable", flag(true)),
        ("trt_engine_cache_path", cache_dir.display().to_string()),
        ("trt_timing_cache_enable", flag(true)),
        ("trt_timing_cache_path", cache_dir.display().to_string()),
    ];
    if let Some((min, opt, max)) = profile {
        o.push(("trt_profile_min_shapes", min.clone()));
        o.push(("trt_profile_opt_shapes", opt.clone()));
        o.push(("trt_profile_max_shapes", max.clone()));
    }
    o
}

/// ONNX Runtime CUDA provider options of a session: the device, and TF32 only where asked for
/// (so `fp32` stages match the CPU).
pub fn cuda_options(s: &GpuSession) -> Vec<(&'static str, String)> {
    vec![
        ("device_id", s.index.to_string()),
        (
            "use_tf32",
            if s.precision == Precision::Tf32 {
                "1"
            } else {
                "0"
            }
            .to_string(),
        ),
    ]
}

/// Checks the precision against the backend: fp16 needs TensorRT.
pub fn check_precision(backend: GpuBackend, precision: Precision) -> Result<(), String> {
    if backend == GpuBackend::Cuda && precision == Precision::Fp16 {
        return Err("`fp16` needs a `tensorrt:N` device (the CUDA provider runs fp32 models in fp32 or tf32)".into());
    }
    Ok(())
}

/// What a model file gives once per process (its checksum, its inputs), reused by every session
/// opened on it while the file stays the same (same size and modification time): the workers of
/// a pool and the blocks of a cut model would otherwise each read it again.
#[cfg(feature = "gpu")]
pub(crate) type FileMemo<T> =
    std::sync::Mutex<std::collections::HashMap<(PathBuf, u64, Option<std::time::SystemTime>), T>>;

/// `f(path)`, or what it gave before for this file (see [`FileMemo`]).
#[cfg(feature = "gpu")]
pub(crate) fn by_file<T: Clone, E>(
    memo: &FileMemo<T>,
    path: &Path,
    f: impl FnOnce(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let key = std::fs::metadata(path).map_or((path.to_path_buf(), 0, None), |m| {
        (path.to_path_buf(), m.len(), m.modified().ok())
    });
    if let Some(v) = memo.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(v.clone());
    }
    let v = f(path)?;
    memo.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, v.clone());
    Ok(v)
}

#[cfg(feature = "gpu")]
mod driver;
#[cfg(feature = "gpu")]
pub use driver::{count, list, load_library, prepare_session, telemetry};

/// GPUs present. Without the `gpu` feature: [`GpuError::NotBuilt`].
#[cfg(not(feature = "gpu"))]
pub fn count() -> Result<usize, GpuError> {
    Err(GpuError::NotBuilt)
}

/// Every GPU with its name, memory and telemetry. Without the `gpu` feature:
/// [`GpuError::NotBuilt`].
#[cfg(not(feature = "gpu"))]
pub fn list() -> Result<Vec<GpuInfo>, GpuError> {
    Err(GpuError::NotBuilt)
}

/// Telemetry of every GPU, read now (empty without the feature or a driver).
#[cfg(not(feature = "gpu"))]
pub fn telemetry() -> Vec<GpuInfo> {
    Vec::new()
}

/// GPU `index` as the driver describes it, or why it cannot be (`device` names it in the error).
pub fn info(device: &str, index: u32) -> Result<GpuInfo, GpuError> {
    let all = list()?;
    let count = all.len();
    all.into_iter()
        .find(|g| g.index == index)
        .ok_or_else(|| GpuError::Absent {
            device: device.to_string(),
            count,
        })
}

/// The devices a pipeline asks for exist: the driver loads and each index is below the count.
/// What `validate` can check without starting anything.
pub fn check_devices(devices: &[(String, u32)]) -> Result<(), GpuError> {
    if devices.is_empty() {
        return Ok(());
    }
    let n = count()?;
    for (device, index) in devices {
        check_index(device, *index, n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(backend: GpuBackend, precision: Precision) -> GpuSession {
        GpuSession {
            backend,
            index: 1,
            precision,
            cache: PathBuf::from("/c"),
            max_batch: 8,
            blocks: Some([0, 2]),
            input_hint: None,
        }
    }

    #[test]
    fn precision_parses_and_fp16_needs_tensorrt() {
        assert_eq!(Precision::parse("fp16"), Ok(Precision::Fp16));
        assert!(Precision::parse("int8").unwrap_err().contains("`fp32`"));
        assert!(check_precision(GpuBackend::Cuda, Precision::Fp16).is_err());
        assert!(check_precision(GpuBackend::TensorRt, Precision::Fp16).is_ok());
        assert!(check_precision(GpuBackend::Cuda, Precision::Tf32).is_ok());
    }

    #[test]
    fn index_out_of_range_names_the_count() {
        assert_eq!(check_index("cuda:0", 0, 1), Ok(()));
        assert_eq!(
            check_index("cuda:3", 3, 1).unwrap_err().to_string(),
            "cuda:3: this machine has 1 GPU"
        );
        assert_eq!(
            check_index("tensorrt:2", 2, 2).unwrap_err().to_string(),
            "tensorrt:2: this machine has 2 GPUs"
        );
    }

    #[test]
    fn missing_provider_library_is_named_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_provider_libs("cuda:0", GpuBackend::Cuda, dir.path()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("libonnxruntime_providers_shared.so"), "{msg}");
        assert!(msg.contains("./setup.sh gpu"), "{msg}");
        for lib in GpuBackend::Cuda.provider_libs() {
            std::fs::write(dir.path().join(lib), b"").unwrap();
        }
        check_provider_libs("cuda:0", GpuBackend::Cuda, dir.path()).unwrap();
        let msg = check_provider_libs("tensorrt:0", GpuBackend::TensorRt, dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("libonnxruntime_providers_tensorrt.so"),
            "{msg}"
        );
    }

    #[test]
    fn profile_shapes_span_batch_one_to_max() {
        let p = profile_shapes("x", &[3, 224, 224], None, 8).unwrap();
        assert_eq!(
            p,
            (
                "x:1x3x224x224".into(),
                "x:4x3x224x224".into(),
                "x:8x3x224x224".into()
            )
        );
        // Dynamic height and width come from the hint; without one there is no profile.
        assert_eq!(profile_shapes("x", &[3, -1, -1], None, 4), None);
        let p = profile_shapes("x", &[3, -1, -1], Some(&[3, 576, 768]), 1).unwrap();
        assert_eq!(p.0, "x:1x3x576x768");
        assert_eq!(p.1, "x:1x3x576x768");
        assert_eq!(profile_shapes("v", &[], None, 2).unwrap().2, "v:2");
    }

    #[test]
    fn cache_key_changes_with_everything_that_changes_the_engine() {
        let m = Path::new("/e/det.blocks/block1 v2.onnx");
        let base = cache_key(m, 0xabc, Some([1, 2]), 8, Precision::Fp16, "H200", (9, 0));
        assert_eq!(base, "block1_v2-00000abc-b1-2-bs1-8-fp16-H200-sm90");
        let variants = [
            cache_key(m, 0xabd, Some([1, 2]), 8, Precision::Fp16, "H200", (9, 0)),
            cache_key(m, 0xabc, Some([0, 2]), 8, Precision::Fp16, "H200", (9, 0)),
            cache_key(m, 0xabc, None, 8, Precision::Fp16, "H200", (9, 0)),
            cache_key(m, 0xabc, Some([1, 2]), 16, Precision::Fp16, "H200", (9, 0)),
            cache_key(m, 0xabc, Some([1, 2]), 8, Precision::Fp32, "H200", (9, 0)),
            cache_key(m, 0xabc, Some([1, 2]), 8, Precision::Fp16, "L4", (9, 0)),
            cache_key(m, 0xabc, Some([1, 2]), 8, Precision::Fp16, "H200", (8, 9)),
        ];
        for v in &variants {
            assert_ne!(v, &base);
        }
    }

    #[test]
    fn provider_options_map_precision_cache_and_profile() {
        let s = session(GpuBackend::TensorRt, Precision::Fp16);
        let prof = profile_shapes("x", &[3, 32, 32], None, s.max_batch);
        let o = tensorrt_options(&s, Path::new("/c/k"), prof.as_ref());
        let get = |k: &str| o.iter().find(|(key, _)| *key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("device_id"), Some("1"));
        assert_eq!(get("trt_fp16_enable"), Some("1"));
        assert_eq!(get("trt_engine_cache_enable"), Some("1"));
        assert_eq!(get("trt_engine_cache_path"), Some("/c/k"));
        assert_eq!(get("trt_profile_max_shapes"), Some("x:8x3x32x32"));
        let o = tensorrt_options(
            &session(GpuBackend::TensorRt, Precision::Fp32),
            Path::new("/c/k"),
            None,
        );
        assert!(o.iter().any(|(k, v)| *k == "trt_fp16_enable" && v == "0"));
        assert!(!o.iter().any(|(k, _)| k.starts_with("trt_profile")));
        let c = cuda_options(&session(GpuBackend::Cuda, Precision::Fp32));
        assert!(c.contains(&("use_tf32", "0".to_string())));
        let c = cuda_options(&session(GpuBackend::Cuda, Precision::Tf32));
        assert!(c.contains(&("use_tf32", "1".to_string())));
    }

    #[test]
    fn gpu_classes_from_product_names() {
        assert_eq!(class_of("NVIDIA H200"), "H200");
        assert_eq!(class_of("Tesla T4"), "T4");
        assert_eq!(class_of("NVIDIA A100-SXM4-80GB"), "A100");
        assert_eq!(class_of("NVIDIA GeForce RTX 4090"), "RTX4090");
        assert_eq!(class_of("NVIDIA L4"), "L4");
        assert_eq!(class_of(""), "GPU");
    }

    #[cfg(feature = "gpu")]
    #[test]
    fn a_model_file_is_read_once_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.onnx");
        std::fs::write(&f, b"abc").unwrap();
        let memo = FileMemo::<usize>::default();
        let mut reads = 0;
        let mut read = |p: &Path| -> Result<usize, std::io::Error> {
            reads += 1;
            Ok(std::fs::read(p)?.len())
        };
        assert_eq!(by_file(&memo, &f, &mut read).unwrap(), 3);
        assert_eq!(by_file(&memo, &f, &mut read).unwrap(), 3);
        std::fs::write(&f, b"abcdef").unwrap();
        assert_eq!(by_file(&memo, &f, &mut read).unwrap(), 6);
        assert_eq!(reads, 2);
    }

    #[cfg(not(feature = "gpu"))]
    #[test]
    fn without_the_feature_every_gpu_request_says_how_to_get_one() {
        assert_eq!(count(), Err(GpuError::NotBuilt));
        assert_eq!(list(), Err(GpuError::NotBuilt));
        assert!(telemetry().is_empty());
        let msg = check_devices(&[("cuda:0".into(), 0)])
            .unwrap_err()
            .to_string();
        assert_eq!(msg, NOT_BUILT);
        assert!(check_devices(&[]).is_ok());
    }
}
