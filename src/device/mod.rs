//! Devices that pools are made of.
//!
//! - `cpu`: real inference with the ONNX Runtime engine on worker threads.
//! - `emulated:<class>` (e.g. `emulated:T4`): behaves like a device of that class: holds each
//!   batch for the profiled latency of its block range at that batch size (plus the transfer of
//!   the cut to the next stage), so heterogeneous pools run, are tested and are measured on a
//!   machine without a GPU. See [`emulated`].
//! - `cuda:N` / `tensorrt:N`: not part of this build; asking for one is a config error that says
//!   so, never a crash.

pub mod emulated;

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
}

impl Device {
    /// Parses `cpu` or `emulated:<class>`; the error says what was expected.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            d if d.starts_with("cuda:") || d.starts_with("tensorrt:") => Err(format!(
                "device `{d}` needs a GPU backend, which this build does not include; use `cpu` or `emulated:<class>`"
            )),
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
                "unknown device `{d}`, expected `cpu` or `emulated:<class>`"
            )),
        }
    }

    /// The profile class of the device (`cpu`, `T4`, ...).
    pub fn class(&self) -> &str {
        match self {
            Device::Cpu => "cpu",
            Device::Emulated { class } => class,
        }
    }
}

impl std::fmt::Display for Device {
    /// As written in a pipeline file: `cpu` or `emulated:<class>`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Emulated { class } => write!(f, "emulated:{class}"),
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
        assert!(Device::parse("cuda:0").unwrap_err().contains("GPU backend"));
        assert!(
            Device::parse("gpu")
                .unwrap_err()
                .contains("unknown device `gpu`")
        );
    }
}
