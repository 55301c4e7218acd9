//! `poolpipe validate` (the pipeline file alone) and `poolpipe check` (then each sink's
//! destination, once).

use std::path::{Path, PathBuf};

use super::CliError;
use crate::config::{self, LoadOptions, Pipeline};

/// What the command line adds to a pipeline file (`run`, `validate`, `check`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LoadArgs {
    /// Serve this planner plan (`poolpipe plan --out`): its pipelines become the stages of the
    /// `[[flow]]`s that name its models (instead of `[pipeline] plan`).
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Folder of latency profiles (instead of `[pipeline] profiles` and POOLPIPE_PROFILES).
    #[arg(long)]
    pub profiles: Option<PathBuf>,
    /// Where sinks with `buffer_type = "disk"` keep their buffers (one folder per pipeline and
    /// sink); default `poolpipe-data` beside the pipeline file.
    #[arg(long, env = "POOLPIPE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl LoadArgs {
    /// As load options.
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            plan: self.plan.clone(),
            profiles: self.profiles.clone(),
            // Relative to the working folder, as given (not to the pipeline file).
            data_dir: self
                .data_dir
                .as_ref()
                .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())),
        }
    }
}

/// Loads and validates a pipeline file; the error lists every problem.
pub(super) fn load(path: &Path, args: &LoadArgs, after: &str) -> Result<Pipeline, CliError> {
    config::load_pipeline_with(path, &args.options()).map_err(|e| {
        CliError::Invalid(format!(
            "{e}\n{}: {} problem(s){after}",
            path.display(),
            e.0.len()
        ))
    })
}

/// `poolpipe validate`.
pub fn validate(path: &Path, args: &LoadArgs) -> Result<(), CliError> {
    let p = load(path, args, "")?;
    let routes = if p.routes.len() > 1 || p.flows.len() > 1 {
        format!(", {} flows on {} routes", p.flows.len(), p.routes.len())
    } else {
        String::new()
    };
    println!(
        "{}: ok ({} sources, {} stages, {} sinks{routes})",
        path.display(),
        p.sources.len(),
        p.stages.len(),
        p.sinks.len()
    );
    Ok(())
}

/// `poolpipe check`: one line per sink, `ok` or `FAILED: why`.
pub fn check(path: &Path, args: &LoadArgs) -> Result<(), CliError> {
    let p = load(path, args, "")?;
    let mut failed = 0;
    for s in &p.sinks {
        match crate::sinks::check(s, &p.name) {
            Ok(()) => println!("sink {} ({}): ok", s.name, s.describe()),
            Err(e) => {
                failed += 1;
                println!("sink {} ({}): FAILED: {}", s.name, s.describe(), e.reason());
            }
        }
    }
    if failed > 0 {
        return Err(CliError::Failed(format!(
            "{}: {failed} of {} sink(s) failed",
            path.display(),
            p.sinks.len()
        )));
    }
    Ok(())
}
