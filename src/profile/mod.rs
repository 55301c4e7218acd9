//! Latency profiles: latency(model, block range, device class, share, batch size), and the bytes
//! that cross each cut.
//!
//! # File format
//!
//! A profile folder holds, as the published PPipe profiles (`../shared/data/ppipe-profiles`) do:
//!
//! - `block-timing/{model}-{class}-{share}.csv`: no header; one row per block in execution order;
//!   column `k` is the latency of that block at batch size `k + 1`, in integer microseconds.
//!   `share` is how many processes split the device (1 = the whole device).
//! - `cut-bytes/{model}.csv`: no header; row `i` is the bytes per sample of the activation that
//!   crosses the cut after block `i` (one row fewer than blocks).
//!
//! poolpipe's own measured profiles use the same layout (with class names such as `cpu`), so the
//! batcher, planner and simulator read measured and published profiles alike. A stage that runs
//! blocks `[i, j)` costs the sum of rows `i..j`; sending a batch across the cut after block `j - 1`
//! costs `bytes(j - 1) * batch / bandwidth`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of profile loading and queries.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {message}")]
    Read {
        /// Which.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A file is not in the documented format.
    #[error("{path}:{line}: {message}")]
    Format {
        /// Which file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// No profile for this model.
    #[error("no profile for model `{0}`")]
    NoModel(String),
    /// No profile for this model on this device class and share.
    #[error("model `{model}` has no profile for class `{class}` with share {share} (has: {have})")]
    NoClass {
        /// Model.
        model: String,
        /// Device class.
        class: String,
        /// Share.
        share: u32,
        /// What the profile has, e.g. `L4/1, T4/1`.
        have: String,
    },
    /// The query is outside what was profiled.
    #[error("model `{model}`: {message}")]
    OutOfRange {
        /// Model.
        model: String,
        /// What.
        message: String,
    },
}

/// Per-block latencies of one model on one device class and share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTiming {
    /// `us[block][batch - 1]`, microseconds.
    pub us: Vec<Vec<u64>>,
}

impl BlockTiming {
    /// Largest batch size profiled.
    pub fn max_batch(&self) -> usize {
        self.us.first().map_or(0, Vec::len)
    }
}

/// Everything known about one model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelProfile {
    /// Timings per (device class, share).
    pub timing: BTreeMap<(String, u32), BlockTiming>,
    /// Bytes per sample crossing the cut after each block (empty when unknown).
    pub cut_bytes: Vec<u64>,
}

impl ModelProfile {
    /// Number of blocks.
    pub fn blocks(&self) -> usize {
        self.timing.values().next().map_or(0, |t| t.us.len())
    }
}

/// Profiles of many models.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profiles {
    /// By model name.
    pub models: BTreeMap<String, ModelProfile>,
}

fn read(path: &Path) -> Result<String, ProfileError> {
    std::fs::read_to_string(path).map_err(|e| ProfileError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Parses rows of comma-separated non-negative integers.
fn parse_rows(path: &Path, text: &str) -> Result<Vec<Vec<u64>>, ProfileError> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let row: Result<Vec<u64>, _> = line.split(',').map(|v| v.trim().parse::<u64>()).collect();
        match row {
            Ok(r) => rows.push(r),
            Err(e) => {
                return Err(ProfileError::Format {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: format!("expected comma-separated integers: {e}"),
                });
            }
        }
    }
    Ok(rows)
}

/// Splits `{model}-{class}-{share}` (the model name may contain dashes).
fn split_name(stem: &str) -> Option<(&str, &str, u32)> {
    let (rest, share) = stem.rsplit_once('-')?;
    let (model, class) = rest.rsplit_once('-')?;
    Some((model, class, share.parse().ok()?))
}

impl Profiles {
    /// Loads every profile in a folder. With `only`, loads just those models.
    pub fn load_dir(dir: &Path, only: Option<&[&str]>) -> Result<Self, ProfileError> {
        let timing_dir = dir.join("block-timing");
        let entries = std::fs::read_dir(&timing_dir).map_err(|e| ProfileError::Read {
            path: timing_dir.clone(),
            message: e.to_string(),
        })?;
        let mut p = Profiles::default();
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".csv"))
            else {
                continue;
            };
            let Some((model, class, share)) = split_name(stem) else {
                return Err(ProfileError::Format {
                    path: path.clone(),
                    line: 0,
                    message: "file name is not {model}-{class}-{share}.csv".into(),
                });
            };
            if only.is_some_and(|o| !o.contains(&model)) {
                continue;
            }
            let rows = parse_rows(&path, &read(&path)?)?;
            let width = rows.first().map_or(0, Vec::len);
            if rows.is_empty() || width == 0 || rows.iter().any(|r| r.len() != width) {
                return Err(ProfileError::Format {
                    path: path.clone(),
                    line: 1,
                    message:
                        "expected one row per block, each with the same number of batch columns"
                            .into(),
                });
            }
            let entry = p.models.entry(model.to_string()).or_default();
            if let Some(existing) = entry.timing.values().next()
                && existing.us.len() != rows.len()
            {
                return Err(ProfileError::Format {
                    path: path.clone(),
                    line: 0,
                    message: format!(
                        "{} blocks, but other files of `{model}` have {}",
                        rows.len(),
                        existing.us.len()
                    ),
                });
            }
            entry
                .timing
                .insert((class.to_string(), share), BlockTiming { us: rows });
        }
        for (model, profile) in p.models.iter_mut() {
            let path = dir.join("cut-bytes").join(format!("{model}.csv"));
            if path.is_file() {
                let rows = parse_rows(&path, &read(&path)?)?;
                profile.cut_bytes = rows
                    .into_iter()
                    .filter_map(|r| r.first().copied())
                    .collect();
            }
        }
        Ok(p)
    }

    /// The profile of a model.
    pub fn model(&self, model: &str) -> Result<&ModelProfile, ProfileError> {
        self.models
            .get(model)
            .ok_or_else(|| ProfileError::NoModel(model.to_string()))
    }

    /// The timing table of a model on a class and share.
    pub fn timing(
        &self,
        model: &str,
        class: &str,
        share: u32,
    ) -> Result<&BlockTiming, ProfileError> {
        let m = self.model(model)?;
        m.timing
            .get(&(class.to_string(), share))
            .ok_or_else(|| ProfileError::NoClass {
                model: model.to_string(),
                class: class.to_string(),
                share,
                have: m
                    .timing
                    .keys()
                    .map(|(c, s)| format!("{c}/{s}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Latency of running blocks `blocks` of `model` at `batch` on `class`/`share`.
    pub fn latency(
        &self,
        model: &str,
        class: &str,
        share: u32,
        blocks: Range<usize>,
        batch: usize,
    ) -> Result<Duration, ProfileError> {
        let t = self.timing(model, class, share)?;
        if blocks.is_empty() || blocks.end > t.us.len() {
            return Err(ProfileError::OutOfRange {
                model: model.into(),
                message: format!(
                    "blocks {}..{} (the model has {} blocks)",
                    blocks.start,
                    blocks.end,
                    t.us.len()
                ),
            });
        }
        if batch == 0 || batch > t.max_batch() {
            return Err(ProfileError::OutOfRange {
                model: model.into(),
                message: format!(
                    "batch {batch} (profiled: 1..={} on {class}/{share})",
                    t.max_batch()
                ),
            });
        }
        Ok(Duration::from_micros(
            t.us[blocks].iter().map(|row| row[batch - 1]).sum(),
        ))
    }

    /// Bytes per sample of the cut after block `after_block` of `model`, where known.
    pub fn cut_bytes(&self, model: &str, after_block: usize) -> Option<u64> {
        self.models.get(model)?.cut_bytes.get(after_block).copied()
    }

    /// Time to send a batch across the cut after block `after_block` over a link of `gbps`
    /// gigabits per second (zero when the bytes of the cut are unknown or the link is infinite).
    pub fn transfer(
        &self,
        model: &str,
        after_block: usize,
        batch: usize,
        gbps: f64,
    ) -> Result<Duration, ProfileError> {
        self.model(model)?;
        let Some(bytes) = self.cut_bytes(model, after_block) else {
            return Ok(Duration::ZERO);
        };
        if gbps <= 0.0 || !gbps.is_finite() {
            return Ok(Duration::ZERO);
        }
        Ok(Duration::from_secs_f64(
            bytes as f64 * batch as f64 * 8.0 / (gbps * 1e9),
        ))
    }
}

/// The published profiles shipped beside the repository, if present (tests and benchmarks).
pub fn shared_profiles_dir() -> Option<PathBuf> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let d = here.parent()?.join("shared/data/ppipe-profiles");
    d.is_dir().then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic() -> (tempfile::TempDir, Profiles) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("block-timing")).unwrap();
        std::fs::create_dir_all(dir.path().join("cut-bytes")).unwrap();
        std::fs::write(
            dir.path().join("block-timing/my-net-v2-cpu-1.csv"),
            "100,150,200\n10,20,30\n1,2,3\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("block-timing/my-net-v2-T4-2.csv"),
            "50,60,70\n5,6,7\n1,1,1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("cut-bytes/my-net-v2.csv"),
            "1000000\n250000\n",
        )
        .unwrap();
        let p = Profiles::load_dir(dir.path(), None).unwrap();
        (dir, p)
    }

    #[test]
    fn sums_block_rows_and_splits_dashed_model_names() {
        let (_d, p) = synthetic();
        assert_eq!(p.model("my-net-v2").unwrap().blocks(), 3);
        assert_eq!(
            p.latency("my-net-v2", "cpu", 1, 0..2, 3).unwrap(),
            Duration::from_micros(230)
        );
        assert_eq!(
            p.latency("my-net-v2", "T4", 2, 1..3, 1).unwrap(),
            Duration::from_micros(6)
        );
        // 250 kB x 4 frames over 10 Gbit/s = 0.8 ms.
        assert_eq!(
            p.transfer("my-net-v2", 1, 4, 10.0).unwrap(),
            Duration::from_micros(800)
        );
        assert_eq!(
            p.transfer("my-net-v2", 2, 4, 10.0).unwrap(),
            Duration::ZERO,
            "no cut after the last block"
        );
    }

    #[test]
    fn clear_errors_for_what_is_not_profiled() {
        let (_d, p) = synthetic();
        let e = p.latency("my-net-v2", "L4", 1, 0..1, 1).unwrap_err();
        assert_eq!(
            e.to_string(),
            "model `my-net-v2` has no profile for class `L4` with share 1 (has: T4/2, cpu/1)"
        );
        assert!(
            p.latency("my-net-v2", "cpu", 1, 0..1, 4)
                .unwrap_err()
                .to_string()
                .contains("batch 4 (profiled: 1..=3")
        );
        assert!(
            p.latency("my-net-v2", "cpu", 1, 2..4, 1)
                .unwrap_err()
                .to_string()
                .contains("blocks 2..4")
        );
        assert_eq!(
            p.latency("nope", "cpu", 1, 0..1, 1).unwrap_err(),
            ProfileError::NoModel("nope".into())
        );
    }

    #[test]
    fn malformed_files_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("block-timing")).unwrap();
        std::fs::write(dir.path().join("block-timing/m-cpu-1.csv"), "1,2\n3,x\n").unwrap();
        let e = Profiles::load_dir(dir.path(), None).unwrap_err();
        assert!(matches!(e, ProfileError::Format { line: 2, .. }), "{e}");
    }

    #[test]
    fn reads_the_published_profiles() {
        let Some(dir) = shared_profiles_dir() else {
            eprintln!("skipped: ../shared/data/ppipe-profiles is absent");
            return;
        };
        let p = Profiles::load_dir(&dir, Some(&["wide_resnet101_2"])).unwrap();
        let m = p.model("wide_resnet101_2").unwrap();
        assert_eq!(m.blocks(), 10);
        assert_eq!(m.cut_bytes.len(), 9);
        for class in ["L4", "T4", "V100", "P4"] {
            let whole1 = p.latency("wide_resnet101_2", class, 1, 0..10, 1).unwrap();
            let whole8 = p.latency("wide_resnet101_2", class, 1, 0..10, 8).unwrap();
            assert!(
                whole8 > whole1,
                "{class}: batch 8 takes longer than batch 1"
            );
            assert!(whole8 < whole1 * 8, "{class}: batching pays");
        }
        let all = Profiles::load_dir(&dir, None).unwrap();
        assert_eq!(all.models.len(), 28, "28 CNNs published");
    }
}
