//! The driver side of [`super`] (feature `gpu`): cudarc for the device count, NVML for names,
//! memory and telemetry, and the ONNX Runtime providers of a session. Every library is loaded at
//! run time and its absence is a [`GpuError`], never a panic.

use std::path::Path;
use std::sync::OnceLock;

use ort::ep::{ArbitrarilyConfigurableExecutionProvider, ExecutionProviderDispatch};

use super::{
    GpuBackend, GpuError, GpuInfo, GpuSession, TENSORRT_LIBS, cache_key, check_index,
    check_provider_libs, class_of, cuda_options, profile_shapes, tensorrt_options,
};

/// The driver library cudarc loads.
const LIBCUDA: &str = "libcuda.so.1";
/// The NVML library.
const LIBNVML: &str = "libnvidia-ml.so.1";

/// Loads a shared library by name or path (kept loaded for the process, once per name), or
/// says why not.
pub fn load_library(name: &str) -> Result<(), String> {
    type Loaded = std::collections::HashMap<String, libloading::Library>;
    static LOADED: OnceLock<std::sync::Mutex<Loaded>> = OnceLock::new();
    let mut loaded = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if loaded.contains_key(name) {
        return Ok(());
    }
    // SAFETY: loading a library runs its initialisers; these are NVIDIA's and ONNX Runtime's own
    // libraries, loaded exactly as their users load them.
    let lib = unsafe { libloading::Library::new(name) }.map_err(|e| e.to_string())?;
    loaded.insert(name.to_string(), lib);
    Ok(())
}

/// The driver's library loads, or [`GpuError::NoDriver`] naming it.
fn probe_driver(lib: &str) -> Result<(), GpuError> {
    load_library(lib).map_err(|e| GpuError::NoDriver {
        lib: lib.to_string(),
        detail: format!(" ({e})"),
    })
}

/// GPUs the CUDA driver sees.
pub fn count() -> Result<usize, GpuError> {
    static COUNT: OnceLock<Result<usize, GpuError>> = OnceLock::new();
    COUNT
        .get_or_init(|| {
            probe_driver(LIBCUDA)?;
            // SAFETY: checked just above that the library loads, so cudarc does not panic.
            if !unsafe { cudarc::driver::sys::is_culib_present() } {
                return Err(GpuError::NoDriver {
                    lib: LIBCUDA.into(),
                    detail: String::new(),
                });
            }
            cudarc::driver::result::init().map_err(|e| GpuError::Driver(format!("cuInit: {e}")))?;
            let n = cudarc::driver::result::device::get_count()
                .map_err(|e| GpuError::Driver(format!("cuDeviceGetCount: {e}")))?;
            Ok(n.max(0) as usize)
        })
        .clone()
}

/// The NVML handle, initialised once.
fn nvml() -> Result<&'static nvml_wrapper::Nvml, GpuError> {
    static NVML: OnceLock<Result<nvml_wrapper::Nvml, GpuError>> = OnceLock::new();
    NVML.get_or_init(|| {
        probe_driver(LIBNVML)?;
        nvml_wrapper::Nvml::init().map_err(|e| GpuError::Driver(format!("NVML: {e}")))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Every GPU with its name, memory, compute capability, driver and telemetry, read now.
pub fn list() -> Result<Vec<GpuInfo>, GpuError> {
    let nvml = nvml()?;
    let driver = nvml.sys_driver_version().unwrap_or_default();
    let n = nvml
        .device_count()
        .map_err(|e| GpuError::Driver(format!("NVML: {e}")))?;
    let mut out = Vec::with_capacity(n as usize);
    for index in 0..n {
        let d = nvml
            .device_by_index(index)
            .map_err(|e| GpuError::Driver(format!("NVML device {index}: {e}")))?;
        let name = d.name().unwrap_or_else(|_| "unknown".into());
        let mem = d.memory_info().ok();
        let cc = d
            .cuda_compute_capability()
            .map(|c| (c.major, c.minor))
            .unwrap_or((0, 0));
        out.push(GpuInfo {
            index,
            class: class_of(&name),
            name,
            memory_total: mem.as_ref().map_or(0, |m| m.total),
            memory_used: mem.as_ref().map_or(0, |m| m.used),
            compute_capability: cc,
            driver: driver.clone(),
            utilization: d.utilization_rates().ok().map(|u| f64::from(u.gpu) / 100.0),
            temperature_c: d
                .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                .ok(),
        });
    }
    Ok(out)
}

/// Telemetry of every GPU, read now; empty where there is no driver.
pub fn telemetry() -> Vec<GpuInfo> {
    list().unwrap_or_default()
}

/// Checks everything a session on `s` needs and returns its execution providers (each failing the
/// session rather than falling back to the CPU): the GPU exists, the provider and CUDA libraries
/// load (preloaded from `ort_dir` where `./setup.sh gpu` put them), TensorRT is there for
/// `tensorrt:N`. For TensorRT also returns the engine cache folder of this model.
pub fn prepare_session(
    s: &GpuSession,
    ort_dir: &Path,
    model: &Path,
    input: Option<(&str, &[i64])>,
) -> Result<(Vec<ExecutionProviderDispatch>, Option<std::path::PathBuf>), GpuError> {
    let device = s.device();
    check_index(&device, s.index, count()?)?;
    check_provider_libs(&device, s.backend, ort_dir)?;
    // The libraries the CUDA provider loads, in load order (ort's lists for this ONNX Runtime).
    for lib in ort::ep::cuda::CUDA_DYLIBS
        .iter()
        .chain(ort::ep::cuda::CUDNN_DYLIBS)
    {
        let local = ort_dir.join(lib);
        let name = if local.is_file() {
            local.display().to_string()
        } else {
            (*lib).to_string()
        };
        load_library(&name).map_err(|e| GpuError::ProviderMissing {
            device: device.clone(),
            lib: (*lib).to_string(),
            dir: format!("{} and the system's library path", ort_dir.display()),
            detail: format!(": {e}"),
        })?;
    }
    let cuda = cuda_options(s)
        .into_iter()
        .fold(ort::ep::CUDA::default(), |ep, (k, v)| {
            ep.with_arbitrary_config(k, v)
        })
        .build()
        .error_on_failure();
    if s.backend == GpuBackend::Cuda {
        return Ok((vec![cuda], None));
    }
    for lib in TENSORRT_LIBS {
        load_library(lib).map_err(|e| GpuError::TensorRtMissing {
            device: device.clone(),
            index: s.index,
            lib: (*lib).to_string(),
            detail: format!(" ({e})"),
        })?;
    }
    let gpu = super::info(&device, s.index)?;
    static CHECKSUMS: OnceLock<super::FileMemo<u32>> = OnceLock::new();
    let checksum = super::by_file(CHECKSUMS.get_or_init(Default::default), model, |m| {
        std::fs::read(m).map(|b| crc32fast::hash(&b)).map_err(|e| {
            GpuError::Driver(format!(
                "cannot read {} for its cache key: {e}",
                m.display()
            ))
        })
    })?;
    let key = cache_key(
        model,
        checksum,
        s.blocks,
        s.max_batch,
        s.precision,
        &gpu.class,
        gpu.compute_capability,
    );
    let dir = s.cache.join(key);
    std::fs::create_dir_all(&dir).map_err(|e| {
        GpuError::Driver(format!(
            "cannot create the engine cache {}: {e}",
            dir.display()
        ))
    })?;
    let profile = input.and_then(|(name, shape)| {
        profile_shapes(
            name,
            shape.get(1..).unwrap_or_default(),
            s.input_hint.as_deref(),
            s.max_batch,
        )
    });
    if profile.is_none() {
        tracing::info!(model = %model.display(), "TensorRT: the input's size is dynamic and not given; engines are built per shape as frames arrive");
    }
    let trt = tensorrt_options(s, &dir, profile.as_ref())
        .into_iter()
        .fold(ort::ep::TensorRT::default(), |ep, (k, v)| {
            ep.with_arbitrary_config(k, v)
        })
        .build()
        .error_on_failure();
    Ok((vec![trt, cuda], Some(dir)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_driver_library_is_named() {
        let e = probe_driver("libcuda-absent-for-this-test.so.1").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("no NVIDIA driver: libcuda-absent-for-this-test.so.1 cannot be loaded"),
            "{msg}"
        );
        assert!(msg.contains("install the NVIDIA driver"), "{msg}");
    }

    /// On a machine without the driver (CI) every query says so; with one, they answer.
    #[test]
    fn queries_follow_the_driver() {
        match load_library(LIBCUDA) {
            Err(_) => {
                assert!(
                    matches!(count(), Err(GpuError::NoDriver { .. })),
                    "{:?}",
                    count()
                );
                assert!(
                    super::super::check_devices(&[("cuda:0".into(), 0)])
                        .unwrap_err()
                        .to_string()
                        .contains("no NVIDIA driver")
                );
            }
            Ok(()) => {
                let n = count().unwrap();
                let e = super::super::check_devices(&[("cuda:99".into(), 99)]).unwrap_err();
                assert_eq!(
                    e.to_string(),
                    format!(
                        "cuda:99: this machine has {n} GPU{}",
                        if n == 1 { "" } else { "s" }
                    )
                );
            }
        }
        if load_library(LIBNVML).is_err() {
            assert!(matches!(list(), Err(GpuError::NoDriver { .. })));
            assert!(telemetry().is_empty());
        }
    }
}
