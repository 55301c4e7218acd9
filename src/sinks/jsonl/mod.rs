//! JSON lines to stdout or a file. Write errors (a full disk) are retried like a broker outage,
//! except that a standard output whose reader went away (`poolpipe run ... | head`) never comes
//! back: its results are refused (counted), and [`stdout_closed`] tells the run to stop.

pub mod config;

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::SinkError;
use super::delivery::{Failure, FailureKind, Message, Transport};

/// Set once a write to standard output found its reader gone.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether a sink writing to standard output found that its reader went away (the process's
/// standard output is a closed pipe): a run then stops as if told to.
pub fn stdout_closed() -> bool {
    STDOUT_CLOSED.load(Ordering::SeqCst)
}

/// Writes one JSON object per line.
pub struct JsonlSink {
    /// Buffered output.
    out: BufWriter<Box<dyn Write + Send>>,
    /// It is standard output.
    stdout: bool,
}

impl JsonlSink {
    /// Results to standard output.
    pub fn stdout() -> Self {
        Self {
            out: BufWriter::new(Box::new(std::io::stdout())),
            stdout: true,
        }
    }

    /// Results to a file (created or truncated).
    pub fn file(name: &str, path: &Path) -> Result<Self, SinkError> {
        let f = std::fs::File::create(path).map_err(|e| SinkError::Open {
            sink: name.to_string(),
            message: format!("cannot create {}: {e}", path.display()),
        })?;
        Ok(Self {
            out: BufWriter::new(Box::new(f)),
            stdout: false,
        })
    }
}

impl Transport for JsonlSink {
    fn connect(&mut self) -> Result<(), Failure> {
        Ok(())
    }

    fn send(&mut self, batch: &[Message]) -> Result<(), Failure> {
        let mut r = Ok(());
        for m in batch {
            r = r
                .and_then(|()| self.out.write_all(m.payload.as_bytes()))
                .and_then(|()| self.out.write_all(b"\n"));
        }
        // A batch is delivered once it is in the file (or pipe), so readers see results as they come.
        r.and_then(|()| self.out.flush()).map_err(|e| {
            if self.stdout && e.kind() == std::io::ErrorKind::BrokenPipe {
                if !STDOUT_CLOSED.swap(true, Ordering::SeqCst) {
                    tracing::warn!("Standard output was closed by its reader; stopping the run.");
                }
                Failure {
                    kind: FailureKind::Rejected,
                    rejected: batch.len(),
                    ..Failure::retriable(format!("standard output was closed by its reader ({e})"))
                }
            } else {
                Failure::retriable(e.to_string())
            }
        })
    }

    fn disconnect(&mut self) {
        let _ = self.out.flush();
    }
}
