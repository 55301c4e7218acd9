//! Devices that pools are made of.
//!
//! - `cpu`: real inference with the ONNX Runtime engine on worker threads.
//! - `emulated:<class>` (e.g. `emulated:T4`): behaves like a device of that class: holds each
//!   batch for the profiled latency of its block range at that batch size (plus the transfer of
//!   the cut to the next stage), so heterogeneous pools run, are tested and are measured on a
//!   machine without a GPU. See [`emulated`].
//! - `cuda:N` / `tensorrt:N`: ONNX Runtime's CUDA or TensorRT provider on NVIDIA GPU N (see
//!   [`crate::gpu`]); a stage may spread its workers over several (`devices = ["cuda:0", "cuda:1"]`).
//!   A build without the `gpu` feature refuses them with a config error that says how to get one.

pub mod emulated;

use crate::gpu;
pub use crate::gpu::GpuBackend;

/// Device kind of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    /// Real inference on the CPU.
    Cpu,
    /// Behaves like a device of this class: holds each batch for its profiled latency.
    Emulated {
        /// Device class, e.g. `T4`.
        class: String,
    },
    /// An NVIDIA GPU (or several: workers are spread over them in turn).
    Gpu {
        /// Provider.
        backend: GpuBackend,
        /// GPU indices, at least one.
        gpus: Vec<u32>,
        /// Numeric precision (`precision` of the stage).
        precision: gpu::Precision,
    },
}

impl Device {
    /// Parses `cpu` or `emulated:<class>`; the error says what was expected.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            d if d.starts_with("cuda:") || d.starts_with("tensorrt:") => {
                let (prefix, n) = d.split_once(':').unwrap_or_default();
                let backend = if prefix == "cuda" {
                    GpuBackend::Cuda
                } else {
                    GpuBackend::TensorRt
                };
                match n.parse::<u32>() {
                    Ok(i) if n.chars().all(|c| c.is_ascii_digit()) => Ok(Device::Gpu {
                        backend,
                        gpus: vec![i],
                        precision: gpu::Precision::default(),
                    }),
                    _ => Err(format!(
                        "device `{d}`: expected {prefix}:<GPU index>, e.g. {prefix}:0"
                    )),
                }
            }
            d if d.starts_with("emulated:") => {
                let class = &d["emulated:".len()..];
                if class.is_empty()
                    || !class
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
                {
                    return Err(format!(
                        "device `{d}`: expected emulated:<class>, e.g. emulated:T4"
                    ));
                }
                Ok(Device::Emulated {
                    class: class.to_string(),
                })
            }
            d => Err(format!(
                "unknown device `{d}`, expected `cpu`, `emulated:<class>`, `cuda:<N>` or `tensorrt:<N>`"
            )),
        }
    }

    /// Parses a list of GPU devices of one backend (`devices = ["cuda:0", "cuda:1"]`).
    pub fn parse_list(list: &[String]) -> Result<Self, String> {
        let mut backend = None;
        let mut gpus = Vec::new();
        for d in list {
            match Device::parse(d)? {
                Device::Gpu {
                    backend: b,
                    gpus: g,
                    ..
                } => {
                    if backend.is_some_and(|x| x != b) {
                        return Err(
                            "`devices` mixes cuda: and tensorrt: devices; a pool has one backend"
                                .into(),
                        );
                    }
                    if gpus.contains(&g[0]) {
                        return Err(format!("`{d}` is listed twice"));
                    }
                    backend = Some(b);
                    gpus.extend(g);
                }
                _ => {
                    return Err(format!(
                        "`devices` lists GPUs (`cuda:N` or `tensorrt:N`); `{d}` goes in `device`"
                    ));
                }
            }
        }
        match backend {
            Some(backend) => Ok(Device::Gpu {
                backend,
                gpus,
                precision: gpu::Precision::default(),
            }),
            None => Err("`devices` is empty".into()),
        }
    }

    /// The profile class of the device (`cpu`, `T4`, ...; `cuda`/`tensorrt` for GPUs, whose
    /// class is known once the driver names them).
    pub fn class(&self) -> &str {
        match self {
            Device::Cpu => "cpu",
            Device::Emulated { class } => class,
            Device::Gpu { backend, .. } => backend.prefix(),
        }
    }

    /// Whether the device runs models for real (CPU or GPU), rather than emulating latencies.
    pub fn runs_models(&self) -> bool {
        !matches!(self, Device::Emulated { .. })
    }

    /// The device of worker `w` as written (`cuda:1`), for GPU pools; `None` otherwise.
    pub fn gpu_of_worker(&self, w: usize) -> Option<(GpuBackend, u32)> {
        match self {
            Device::Gpu { backend, gpus, .. } if !gpus.is_empty() => {
                Some((*backend, gpus[w % gpus.len()]))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for Device {
    /// As written in a pipeline file: `cpu` or `emulated:<class>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Emulated { class } => write!(f, "emulated:{class}"),
            Device::Gpu { backend, gpus, .. } => {
                for (i, g) in gpus.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{}:{g}", backend.prefix())?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_kinds() {
        assert_eq!(Device::parse("cpu"), Ok(Device::Cpu));
        assert_eq!(Device::parse("emulated:T4").unwrap().class(), "T4");
        assert_eq!(
            Device::parse("emulated:T4").unwrap().to_string(),
            "emulated:T4"
        );
        assert!(
            Device::parse("emulated:")
                .unwrap_err()
                .contains("expected emulated:<class>")
        );
        assert_eq!(
            Device::parse("tensorrt:2"),
            Ok(Device::Gpu {
                backend: GpuBackend::TensorRt,
                gpus: vec![2],
                precision: gpu::Precision::Fp32,
            })
        );
        assert!(
            Device::parse("cuda:x")
                .unwrap_err()
                .contains("cuda:<GPU index>")
        );
        assert!(Device::parse("cuda:+1").is_err());
        let two = Device::parse_list(&["cuda:0".into(), "cuda:1".into()]).unwrap();
        assert_eq!(two.to_string(), "cuda:0,cuda:1");
        assert_eq!(two.gpu_of_worker(3), Some((GpuBackend::Cuda, 1)));
        assert!(Device::parse_list(&["cuda:0".into(), "tensorrt:1".into()]).is_err());
        assert!(Device::parse_list(&["cuda:0".into(), "cuda:0".into()]).is_err());
        assert!(
            Device::parse_list(&["cpu".into()])
                .unwrap_err()
                .contains("goes in `device`")
        );
        assert!(
            Device::parse("gpu")
                .unwrap_err()
                .contains("unknown device `gpu`")
        );
    }
}
