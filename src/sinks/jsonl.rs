//! JSON lines to stdout or a file.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::{Sink, SinkError};

/// Writes one JSON object per line.
pub struct JsonlSink {
    /// `stdout` or the file path.
    name: String,
    /// Buffered output.
    out: BufWriter<Box<dyn Write + Send>>,
    /// Flush after every line (stdout, so that a reader sees results as they come).
    line_flush: bool,
}

impl JsonlSink {
    /// Results to standard output.
    pub fn stdout() -> Self {
        Self {
            name: "stdout".into(),
            out: BufWriter::new(Box::new(std::io::stdout())),
            line_flush: true,
        }
    }

    /// Results to a file (created or truncated).
    pub fn file(path: &Path) -> Result<Self, SinkError> {
        let name = path.display().to_string();
        let f = std::fs::File::create(path).map_err(|source| SinkError::Io {
            sink: name.clone(),
            source,
        })?;
        Ok(Self {
            name,
            out: BufWriter::new(Box::new(f)),
            line_flush: false,
        })
    }
}

impl Sink for JsonlSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn publish(&mut self, json: &str) -> Result<(), SinkError> {
        let r = self
            .out
            .write_all(json.as_bytes())
            .and_then(|_| self.out.write_all(b"\n"));
        let r = if self.line_flush {
            r.and_then(|_| self.out.flush())
        } else {
            r
        };
        r.map_err(|source| SinkError::Io {
            sink: self.name.clone(),
            source,
        })
    }

    fn flush(&mut self) -> Result<(), SinkError> {
        self.out.flush().map_err(|source| SinkError::Io {
            sink: self.name.clone(),
            source,
        })
    }
}
