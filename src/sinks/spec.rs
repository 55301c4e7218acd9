//! `[[sink]]` tables: read part by part (the head, the delivery keys, and the sink type's own
//! groups of keys, each with its own type in the sink's folder), and validated into a
//! [`SinkSpec`] without connecting to anything.

use std::path::PathBuf;

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::http::config::{HttpConfig, HttpSettings};
use super::jsonl::config::{JsonlConfig, JsonlSettings};
use super::kafka::config::{KafkaConfig, KafkaSettings};
use super::mqtt::config::{MqttConfig, MqttSettings};
use super::nats::config::{NatsConfig, NatsSettings};
use super::redis::config::{RedisConfig, RedisSettings};
pub use super::settings::{
    BufferType, Ctx, Delivery, DeliveryConfig, HostPort, Login, LoginConfig, PartReader, Problem,
    Secret, SinkKind, TlsConfig, TlsFiles, TokenConfig, Url, WhenFull, parse_url, redact,
};

/// The keys every sink has: its type and name.
#[derive(Debug, Clone, Deserialize)]
pub struct SinkHead {
    /// Sink type.
    #[serde(rename = "type")]
    pub kind: SinkKind,
    /// Name in logs and counters (default: the type, with an index when repeated).
    pub name: Option<String>,
}

impl SinkHead {
    /// Its keys, as written.
    pub const KEYS: &'static [&'static str] = &["type", "name"];
}

/// A sink type's own keys, as written.
#[derive(Debug, Clone)]
pub enum KindConfig {
    /// See [`JsonlConfig`].
    Jsonl(JsonlConfig),
    /// See [`MqttConfig`].
    Mqtt(MqttConfig),
    /// See [`NatsConfig`].
    Nats(NatsConfig),
    /// See [`RedisConfig`].
    Redis(RedisConfig),
    /// See [`KafkaConfig`].
    Kafka(KafkaConfig),
    /// See [`HttpConfig`].
    Http(HttpConfig),
}

impl KindConfig {
    /// Reads the keys of a sink of `kind`.
    pub fn read(kind: SinkKind, r: &mut impl PartReader) -> Option<Self> {
        Some(match kind {
            SinkKind::Jsonl => Self::Jsonl(JsonlConfig::read(r)?),
            SinkKind::Mqtt => Self::Mqtt(MqttConfig::read(r)?),
            SinkKind::Nats => Self::Nats(NatsConfig::read(r)?),
            SinkKind::Redis => Self::Redis(RedisConfig::read(r)?),
            SinkKind::Kafka => Self::Kafka(KafkaConfig::read(r)?),
            SinkKind::Http => Self::Http(HttpConfig::read(r)?),
        })
    }
}

/// The keys a sink of `kind` accepts beyond its head and the delivery keys.
pub fn kind_keys(kind: SinkKind) -> Vec<&'static str> {
    match kind {
        SinkKind::Jsonl => JsonlConfig::keys(),
        SinkKind::Mqtt => MqttConfig::keys(),
        SinkKind::Nats => NatsConfig::keys(),
        SinkKind::Redis => RedisConfig::keys(),
        SinkKind::Kafka => KafkaConfig::keys(),
        SinkKind::Http => HttpConfig::keys(),
    }
}

/// Every sink type.
const KINDS: [SinkKind; 6] = [
    SinkKind::Jsonl,
    SinkKind::Mqtt,
    SinkKind::Nats,
    SinkKind::Redis,
    SinkKind::Kafka,
    SinkKind::Http,
];

/// `[[sink]]` as written.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// Sink type.
    pub kind: SinkKind,
    /// Name in logs and counters (default: the type, with an index when repeated).
    pub name: Option<String>,
    /// Buffering and retries.
    pub delivery: DeliveryConfig,
    /// The type's own keys.
    pub settings: KindConfig,
}

impl SinkConfig {
    /// Reads every part of a `[[sink]]` table; `None` when one has a value of the wrong type
    /// (reported by the reader; every part is read, so every such value is reported).
    pub fn read(r: &mut impl PartReader) -> Option<Self> {
        let head: Option<SinkHead> = r.read();
        let delivery: Option<DeliveryConfig> = r.read();
        let head = head?;
        let settings = KindConfig::read(head.kind, r);
        Some(Self {
            kind: head.kind,
            name: head.name,
            delivery: delivery?,
            settings: settings?,
        })
    }
}

impl SinkConfig {
    /// Reads a `[[sink]]` table that is already parsed (benchmarks, tests): the first value of
    /// the wrong type is the error.
    pub fn from_table(table: &toml::Table) -> Result<Self, String> {
        struct Reader<'t> {
            table: &'t toml::Table,
            error: Option<String>,
        }
        impl PartReader for Reader<'_> {
            fn read<T: DeserializeOwned>(&mut self) -> Option<T> {
                match self.table.clone().try_into() {
                    Ok(t) => Some(t),
                    Err(e) => {
                        self.error.get_or_insert_with(|| e.to_string());
                        None
                    }
                }
            }
        }
        let mut r = Reader { table, error: None };
        let c = SinkConfig::read(&mut r);
        c.ok_or_else(|| r.error.unwrap_or_default())
    }
}

/// Where a validated sink delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// JSON lines to stdout or a file.
    Jsonl(JsonlSettings),
    /// MQTT.
    Mqtt(MqttSettings),
    /// NATS.
    Nats(NatsSettings),
    /// Redis Streams.
    Redis(RedisSettings),
    /// Kafka.
    Kafka(KafkaSettings),
    /// HTTP webhook.
    Http(HttpSettings),
}

/// A validated sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSpec {
    /// Name in logs and counters.
    pub name: String,
    /// Type.
    pub kind: SinkKind,
    /// Destination.
    pub target: Target,
    /// Buffering and retries.
    pub delivery: Delivery,
}

impl SinkSpec {
    /// JSON lines to a file with default delivery settings (benches, tests).
    pub fn jsonl_file(path: impl Into<PathBuf>) -> Self {
        Self {
            name: "jsonl".into(),
            kind: SinkKind::Jsonl,
            target: Target::Jsonl(JsonlSettings::File(path.into())),
            delivery: Delivery::default(),
        }
    }

    /// The file it writes, for a `jsonl` sink to a file.
    pub fn file(&self) -> Option<&std::path::Path> {
        match &self.target {
            Target::Jsonl(JsonlSettings::File(p)) => Some(p),
            _ => None,
        }
    }

    /// Where it delivers, for logs: never includes credentials.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Jsonl(JsonlSettings::Stdout) => "stdout".into(),
            Target::Jsonl(JsonlSettings::File(p)) => p.display().to_string(),
            Target::Mqtt(m) => format!("mqtt://{} topic {}", m.addr, m.topic),
            Target::Nats(n) => format!(
                "nats://{} subject {}{}",
                n.addr,
                n.subject,
                if n.jetstream { " (JetStream)" } else { "" }
            ),
            Target::Redis(r) => format!("redis://{}/{} stream {}", r.addr, r.db, r.key),
            Target::Kafka(k) => {
                let b: Vec<String> = k.brokers.iter().map(ToString::to_string).collect();
                format!("kafka://{} topic {}", b.join(","), k.topic)
            }
            Target::Http(h) => h.url.clone(),
        }
    }
}

/// Validates one sink. `present` lists the keys written in its table; `name` is its resolved name.
pub fn validate(
    c: &SinkConfig,
    present: &[String],
    name: String,
    ctx: &Ctx<'_>,
) -> Result<SinkSpec, Vec<Problem>> {
    let mut problems: Vec<Problem> = Vec::new();
    let own = kind_keys(c.kind);
    let accepted = |k: &str| {
        SinkHead::KEYS.contains(&k) || DeliveryConfig::KEYS.contains(&k) || own.contains(&k)
    };
    for k in present {
        if accepted(k) {
            continue;
        }
        let elsewhere = KINDS.iter().any(|t| kind_keys(*t).contains(&k.as_str()));
        let message = if elsewhere {
            format!("`{k}` does not apply to {} sinks", c.kind.as_str())
        } else {
            let all: Vec<String> = [SinkHead::KEYS, DeliveryConfig::KEYS, &own]
                .concat()
                .iter()
                .map(|k| format!("`{k}`"))
                .collect();
            format!(
                "unknown key `{k}`; {} sinks take {}",
                c.kind.as_str(),
                all.join(", ")
            )
        };
        problems.push((k.clone(), message));
    }
    let delivery = c.delivery.validate(c.kind, &name, ctx, &mut problems);
    let target = match &c.settings {
        KindConfig::Jsonl(k) => k.validate(ctx, &mut problems).map(Target::Jsonl),
        KindConfig::Mqtt(k) => k.validate(&name, ctx, &mut problems).map(Target::Mqtt),
        KindConfig::Nats(k) => k.validate(ctx, &mut problems).map(Target::Nats),
        KindConfig::Redis(k) => k.validate(ctx, &mut problems).map(Target::Redis),
        KindConfig::Kafka(k) => k.validate(ctx, &mut problems).map(Target::Kafka),
        KindConfig::Http(k) => k.validate(ctx, &mut problems).map(Target::Http),
    };
    match target {
        Some(target) if problems.is_empty() => Ok(SinkSpec {
            name,
            kind: c.kind,
            target,
            delivery,
        }),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(toml_text: &str) -> (SinkConfig, Vec<String>) {
        let v: toml::Table = toml::from_str(toml_text).unwrap();
        let keys = v.keys().cloned().collect();
        (SinkConfig::from_table(&v).unwrap(), keys)
    }

    fn check(text: &str) -> Result<SinkSpec, Vec<Problem>> {
        let env = |k: &str| (k == "PW").then(|| "hunter2".to_string());
        let ctx = Ctx {
            pipeline: "p",
            dir: Path::new("."),
            env: &env,
            data_dir: None,
        };
        let (c, keys) = cfg(text);
        validate(&c, &keys, "s".into(), &ctx)
    }

    #[test]
    fn disk_buffer_keys_are_checked() {
        let s =
            check("type = \"jsonl\"\nname = \"out\"\nbuffer_type = \"disk\"\nmax_bytes = 1048576")
                .unwrap();
        let d = s.delivery.disk.expect("a disk buffer");
        assert_eq!(d.max_bytes, 1 << 20);
        assert_eq!(d.segment_bytes, 128 << 10);
        assert_eq!(d.dir, Path::new("./poolpipe-data/p/s"));
        let keys = |text: &str| -> Vec<String> {
            check(text)
                .unwrap_err()
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys("type = \"jsonl\"\nmax_bytes = 1048576"), ["max_bytes"]);
        assert_eq!(
            keys("type = \"jsonl\"\nbuffer_type = \"disk\"\nbuffer = 5\nmax_bytes = 100"),
            ["buffer", "max_bytes"]
        );
    }

    #[test]
    fn a_full_mqtt_sink_validates() {
        let s = check(
            r#"type = "mqtt"
url = "mqtt://127.0.0.1:1884"
topic = "cameras/{stream}/text"
username = "cam"
password_env = "PW"
when_full = "block"
buffer = 5"#,
        )
        .unwrap();
        let Target::Mqtt(m) = &s.target else {
            panic!("{s:?}")
        };
        assert_eq!(m.addr.port, 1884);
        assert_eq!(m.qos, 1);
        assert_eq!(m.login.as_ref().unwrap().password.expose(), "hunter2");
        assert_eq!(s.delivery.when_full, WhenFull::Block);
        assert_eq!(s.delivery.buffer, 5);
        assert!(
            !format!("{s:?}").contains("hunter2"),
            "Debug leaks the password"
        );
    }

    #[test]
    fn bad_settings_are_named_by_key() {
        let keys = |t: &str| -> Vec<String> {
            check(t).unwrap_err().into_iter().map(|(k, _)| k).collect()
        };
        assert_eq!(
            keys("type = \"mqtt\"\nurl = \"http://x\"\ntopic = \"a\""),
            ["url"]
        );
        assert_eq!(
            keys("type = \"mqtt\"\nurl = \"mqtt://x:99999\"\ntopic = \"a\""),
            ["url"]
        );
        assert_eq!(
            keys("type = \"mqtt\"\nurl = \"mqtt://x\"\ntopic = \"a/{camera}\""),
            ["topic"]
        );
        assert_eq!(
            keys("type = \"mqtt\"\nurl = \"mqtt://x\"\ntopic = \"a/#\""),
            ["topic"]
        );
        assert_eq!(
            keys("type = \"redis\"\nurl = \"redis://x\"\ntopic = \"a\"\nqos = 1"),
            ["qos"]
        );
        assert_eq!(
            keys("type = \"nats\"\nurl = \"nats://x\"\ntopic = \"a\"\ntoken_env = \"NOPE\""),
            ["token_env"]
        );
        assert_eq!(
            keys("type = \"http\"\nurl = \"https://u:p@x/hook\""),
            ["url"]
        );
        assert_eq!(
            keys("type = \"kafka\"\nurl = \"kafka://a:1,b:2\"\ntopic = \"a/b\""),
            ["topic"]
        );
        assert_eq!(keys("type = \"jsonl\"\nbuffer = 0"), ["buffer"]);
    }

    #[test]
    fn messages_never_carry_passwords() {
        let e = check("type = \"redis\"\nurl = \"redis://u:sekrit@host:notaport\"\ntopic = \"a\"")
            .unwrap_err();
        let text = format!("{e:?}");
        assert!(!text.contains("sekrit"), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
    }

    #[test]
    fn kafka_takes_a_broker_list() {
        let s =
            check("type = \"kafka\"\nurl = \"kafka://a:1,b\"\ntopic = \"cams.{stream}\"").unwrap();
        let Target::Kafka(k) = s.target else { panic!() };
        assert_eq!(k.brokers[1].port, 9092);
    }
}
