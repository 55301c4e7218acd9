//! Clusters: device classes with counts and the link bandwidth of each GPU.
//!
//! On the command line: `--cluster L4:25,T4:75 --bandwidth-gbps 10`. As a file
//! (`configs/cluster-*.toml`):
//!
//! ```toml
//! bandwidth_gbps = 10.0
//!
//! [classes]   # device class = count, in any order
//! L4 = 25
//! T4 = 75
//! ```

use std::path::Path;

use serde::Deserialize;

use super::PlanError;

/// One device class and how many devices of it there are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassSpec {
    /// Class name as in the profiles (`L4`, `T4`, `cpu`...).
    pub name: String,
    /// Devices.
    pub count: u32,
}

/// Devices available to the planner.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// Classes in the order given.
    pub classes: Vec<ClassSpec>,
    /// Link bandwidth of each GPU, Gbit/s (each direction).
    pub bandwidth_gbps: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    bandwidth_gbps: f64,
    classes: toml::Table,
}

impl Cluster {
    /// Parses `CLASS:COUNT,CLASS:COUNT,...`.
    pub fn parse_spec(spec: &str, bandwidth_gbps: f64) -> Result<Cluster, PlanError> {
        let mut classes: Vec<ClassSpec> = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, count) = part.split_once(':').ok_or_else(|| {
                PlanError::Input(format!(
                    "--cluster: `{part}` is not CLASS:COUNT (e.g. L4:25)"
                ))
            })?;
            let count: u32 = count.trim().parse().map_err(|_| {
                PlanError::Input(format!(
                    "--cluster: the count in `{part}` is not a whole number"
                ))
            })?;
            push_class(&mut classes, name.trim(), count)
                .map_err(|m| PlanError::Input(format!("--cluster: {m}")))?;
        }
        if classes.is_empty() {
            return Err(PlanError::Input(
                "--cluster names no device class (e.g. L4:25,T4:75)".into(),
            ));
        }
        Ok(Cluster {
            classes,
            bandwidth_gbps,
        })
    }

    /// Reads a cluster file.
    pub fn load(path: &Path) -> Result<Cluster, PlanError> {
        let err = |message: String| PlanError::ClusterFile {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let file: ClusterFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let mut classes = Vec::new();
        for (name, v) in &file.classes {
            let count = v
                .as_integer()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    err(format!(
                        "`classes.{name}`: expected a device count (a whole number >= 0), got {v}"
                    ))
                })?;
            push_class(&mut classes, name, count).map_err(|m| err(format!("`classes`: {m}")))?;
        }
        if classes.is_empty() {
            return Err(err("`classes` names no device class".into()));
        }
        Ok(Cluster {
            classes,
            bandwidth_gbps: file.bandwidth_gbps,
        })
    }

    /// `L4:25,T4:75 at 10 Gbit/s`.
    pub fn describe(&self) -> String {
        format!(
            "{} at {} Gbit/s",
            self.classes
                .iter()
                .map(|c| format!("{}:{}", c.name, c.count))
                .collect::<Vec<_>>()
                .join(","),
            self.bandwidth_gbps
        )
    }

    /// Bytes per second of one GPU's link.
    pub fn link_bytes_per_sec(&self) -> f64 {
        self.bandwidth_gbps * 1e9 / 8.0
    }
}

fn push_class(classes: &mut Vec<ClassSpec>, name: &str, count: u32) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty class name".into());
    }
    if classes.iter().any(|c| c.name == name) {
        return Err(format!("class `{name}` is given twice"));
    }
    classes.push(ClassSpec {
        name: name.to_string(),
        count,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs_and_files() {
        let c = Cluster::parse_spec("L4:25, T4:75", 10.0).unwrap();
        assert_eq!(c.classes.len(), 2);
        assert_eq!(c.classes[1].name, "T4");
        assert_eq!(c.classes[1].count, 75);
        assert_eq!(c.describe(), "L4:25,T4:75 at 10 Gbit/s");
        for bad in ["L4", "L4:x", "L4:1,L4:2", ""] {
            assert!(Cluster::parse_spec(bad, 10.0).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "bandwidth_gbps = 6\n[classes]\nV100 = 25\nP4 = 75\n").unwrap();
        let c = Cluster::load(&f).unwrap();
        assert_eq!(c.describe(), "V100:25,P4:75 at 6 Gbit/s");
        std::fs::write(&f, "bandwidth_gbps = 6\n[classes]\nV100 = -1\n").unwrap();
        let e = Cluster::load(&f).unwrap_err().to_string();
        assert!(e.contains("classes.V100"), "{e}");
        std::fs::write(&f, "bandwith_gbps = 6\n[classes]\nV100 = 1\n").unwrap();
        let e = Cluster::load(&f).unwrap_err().to_string();
        assert!(e.contains("bandwith_gbps") && e.contains("line 1"), "{e}");
    }
}
