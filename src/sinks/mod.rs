//! Where results go. Each published frame becomes one JSON object (schema in the README);
//! sinks receive it as one line of text.

pub mod jsonl;

use crate::config::SinkSpec;

/// Errors of sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Writing failed.
    #[error("sink {sink}: {source}")]
    Io {
        /// Which sink.
        sink: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A destination for results.
pub trait Sink: Send {
    /// Name for logs.
    fn name(&self) -> &str;
    /// Delivers one result (a JSON object without a trailing newline).
    fn publish(&mut self, json: &str) -> Result<(), SinkError>;
    /// Pushes out anything buffered.
    fn flush(&mut self) -> Result<(), SinkError>;
}

/// Opens a sink (creating its file), before any frame flows.
pub fn open(spec: &SinkSpec) -> Result<Box<dyn Sink>, SinkError> {
    Ok(match spec {
        SinkSpec::Stdout => Box::new(jsonl::JsonlSink::stdout()),
        SinkSpec::File(p) => Box::new(jsonl::JsonlSink::file(p)?),
    })
}

/// RFC 3339 UTC time with milliseconds, e.g. `2026-11-28T13:20:33.123Z`.
pub fn rfc3339_millis(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_872_033_123);
        assert_eq!(rfc3339_millis(t), "2026-11-28T13:20:33.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339_millis(leap), "2000-02-29T00:00:00.000Z");
    }
}
