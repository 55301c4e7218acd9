//! JSON lines to stdout or a file. Write errors (a full disk) are retried like a broker outage.

pub mod config;

use std::io::{BufWriter, Write};
use std::path::Path;

use super::SinkError;
use super::delivery::{Failure, Message, Transport};

/// Writes one JSON object per line.
pub struct JsonlSink {
    /// Buffered output.
    out: BufWriter<Box<dyn Write + Send>>,
}

impl JsonlSink {
    /// Results to standard output.
    pub fn stdout() -> Self {
        Self {
            out: BufWriter::new(Box::new(std::io::stdout())),
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
        r.and_then(|()| self.out.flush())
            .map_err(|e| Failure::retriable(e.to_string()))
    }

    fn disconnect(&mut self) {
        let _ = self.out.flush();
    }
}
