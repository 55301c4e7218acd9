//! Where results go. Each published frame becomes one JSON object (schema in the README), handed
//! to every sink: JSON lines (stdout or a file), MQTT, NATS (core or JetStream), Redis Streams,
//! Kafka, or an HTTP webhook.
//!
//! Every sink is a [`delivery::Transport`] behind the same reliability layer
//! ([`delivery::SinkHandle`]): a bounded buffer with a `when_full` policy, a delivery thread with
//! capped exponential backoff and jitter, at-least-once delivery in offer order, and counters
//! (delivered, retries, resent = possible duplicates, dropped by cause, left at shutdown).

pub mod delivery;
pub mod disk;
pub mod http;
pub mod jsonl;
pub mod kafka;
pub mod message;
pub mod mqtt;
pub mod nats;
pub mod redis;
pub mod settings;
pub mod spec;
pub mod template;

use std::sync::Arc;

pub use delivery::{Message, SinkCounters, SinkHandle, SinkSummary};
pub use spec::{SinkKind, SinkSpec, Target};

use delivery::{FailureKind, Transport};

/// Errors of sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The sink could not be set up (file, TLS, thread).
    #[error("sink {sink}: {message}")]
    Open {
        /// Which sink.
        sink: String,
        /// Why.
        message: String,
    },
    /// The destination refused the credentials (or TLS) at start-up.
    #[error("sink {sink} ({target}): {message}")]
    Refused {
        /// Which sink.
        sink: String,
        /// Where it delivers (no credentials).
        target: String,
        /// Why.
        message: String,
    },
    /// `check`: the destination could not be reached.
    #[error("sink {sink} ({target}): {message}")]
    Unreachable {
        /// Which sink.
        sink: String,
        /// Where it delivers (no credentials).
        target: String,
        /// Why.
        message: String,
    },
}

impl SinkError {
    /// Why, without the sink's name.
    pub fn reason(&self) -> &str {
        match self {
            Self::Open { message, .. }
            | Self::Refused { message, .. }
            | Self::Unreachable { message, .. } => message,
        }
    }
}

/// rustls needs a process-wide crypto provider; poolpipe uses ring.
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn transport(spec: &SinkSpec, pipeline: &str) -> Result<Box<dyn Transport>, SinkError> {
    let open_err = |e: std::io::Error| SinkError::Open {
        sink: spec.name.clone(),
        message: e.to_string(),
    };
    let d = &spec.delivery;
    let run = settings::SinkRun {
        pipeline: pipeline.to_string(),
        batch: d.batch,
        timeout: d.timeout,
    };
    Ok(match &spec.target {
        Target::Jsonl(jsonl::config::JsonlSettings::Stdout) => Box::new(jsonl::JsonlSink::stdout()),
        Target::Jsonl(jsonl::config::JsonlSettings::File(p)) => {
            Box::new(jsonl::JsonlSink::file(&spec.name, p)?)
        }
        Target::Mqtt(s) => Box::new(mqtt::MqttSink::new(s.clone(), run).map_err(open_err)?),
        Target::Nats(s) => Box::new(nats::NatsSink::new(s.clone(), run).map_err(open_err)?),
        Target::Redis(s) => Box::new(redis::RedisSink::new(s.clone(), run)),
        Target::Kafka(s) => Box::new(kafka::KafkaSink::new(s.clone(), run).map_err(open_err)?),
        Target::Http(h) => Box::new(http::HttpSink::new(
            h.url.clone(),
            h.token.clone(),
            d.timeout,
        )),
    })
}

/// Opens a sink before any frame flows: creates its file or tries its broker once. Refused
/// credentials stop here with an error naming the sink; an unreachable broker is logged and
/// retried in the background while results buffer.
pub fn open(spec: &SinkSpec, pipeline: &str) -> Result<SinkHandle, SinkError> {
    let mut t = transport(spec, pipeline)?;
    let connected = match t.connect() {
        Ok(()) => true,
        Err(f) if f.kind == FailureKind::Auth => {
            return Err(SinkError::Refused {
                sink: spec.name.clone(),
                target: spec.describe(),
                message: f.message,
            });
        }
        Err(f) => {
            tracing::warn!(sink = %spec.name, target = %spec.describe(), error = %f, "Sink not reachable yet; buffering results and retrying.");
            false
        }
    };
    tracing::debug!(sink = %spec.name, target = %spec.describe(), "Sink open.");
    SinkHandle::start(
        spec.name.clone(),
        t,
        connected,
        &spec.delivery,
        Arc::new(SinkCounters::default()),
    )
    .map_err(|e| SinkError::Open {
        sink: spec.name.clone(),
        message: e.to_string(),
    })
}

/// `poolpipe check`: connects to the destination once (an HTTP sink POSTs an empty array).
pub fn check(spec: &SinkSpec, pipeline: &str) -> Result<(), SinkError> {
    if let Target::Http(h) = &spec.target {
        let h = http::HttpSink::new(h.url.clone(), h.token.clone(), spec.delivery.timeout);
        return h.post("[]".into(), 0).map_err(|f| SinkError::Unreachable {
            sink: spec.name.clone(),
            target: spec.describe(),
            message: f.message,
        });
    }
    if let Target::Jsonl(jsonl::config::JsonlSettings::File(_)) = &spec.target {
        // Creating the file would truncate results of an earlier run; validation checked the folder.
        return Ok(());
    }
    let mut t = transport(spec, pipeline)?;
    let r = t.connect();
    t.disconnect();
    r.map_err(|f| SinkError::Unreachable {
        sink: spec.name.clone(),
        target: spec.describe(),
        message: f.message,
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
