//! `poolpipe validate` (the pipeline file alone) and `poolpipe check` (then each sink's
//! destination, once).

use std::path::Path;

use super::CliError;
use crate::config::{self, Pipeline};

/// Loads and validates a pipeline file; the error lists every problem.
fn load(path: &Path) -> Result<Pipeline, CliError> {
    config::load_pipeline(path).map_err(|e| {
        CliError::Invalid(format!("{e}\n{}: {} problem(s)", path.display(), e.0.len()))
    })
}

/// `poolpipe validate`.
pub fn validate(path: &Path) -> Result<(), CliError> {
    let p = load(path)?;
    println!(
        "{}: ok ({} sources, {} stages, {} sinks)",
        path.display(),
        p.sources.len(),
        p.stages.len(),
        p.sinks.len()
    );
    Ok(())
}

/// `poolpipe check`: one line per sink, `ok` or `FAILED: why`.
pub fn check(path: &Path) -> Result<(), CliError> {
    let p = load(path)?;
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
