//! `[[sink]]` settings: the raw TOML shape, and its validation into a [`SinkSpec`] without
//! connecting to anything. Credentials are held in [`Secret`]s, whose `Debug` and `Display` print
//! `<redacted>`, so no log line, error or status report can carry them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::template::Template;

/// Sink types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// JSON lines to stdout (`path = "-"`) or a file.
    Jsonl,
    /// MQTT 3.1.1 broker (QoS 0 or 1).
    Mqtt,
    /// NATS, core or JetStream.
    Nats,
    /// Redis Streams (`XADD`).
    Redis,
    /// Kafka (or a Kafka-compatible broker).
    Kafka,
    /// HTTP webhook: POST of JSON arrays.
    Http,
}

impl SinkKind {
    /// The name used in files and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Mqtt => "mqtt",
            Self::Nats => "nats",
            Self::Redis => "redis",
            Self::Kafka => "kafka",
            Self::Http => "http",
        }
    }
}

/// What a sink does with a new result when its buffer is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Wait for room: the publisher (and so the pipeline) slows down; late frames are then
    /// dropped upstream and counted there.
    Block,
    /// Drop the oldest buffered result to make room.
    DropOldest,
    /// Drop the new result.
    DropNewest,
}

/// `[[sink]]` as written. Which keys apply depends on `type`; see [`allowed_keys`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Sink type.
    #[serde(rename = "type")]
    pub kind: SinkKind,
    /// Name in logs and counters (default: the type, with an index when repeated).
    pub name: Option<String>,
    /// `jsonl`: `-` for stdout, else a file path (created or truncated).
    pub path: Option<String>,
    /// Broker or endpoint address: `mqtt://host:port`, `nats://host:port`, `redis://host:port/db`,
    /// `kafka://host:port[,host:port]`, `http(s)://host:port/path`.
    pub url: Option<String>,
    /// MQTT topic / NATS subject / Redis stream key / Kafka topic template.
    pub topic: Option<String>,
    /// Kafka record key template (default `{stream}`).
    pub key: Option<String>,
    /// MQTT QoS, 0 or 1 (default 1).
    pub qos: Option<u8>,
    /// MQTT client id (default `poolpipe-<pipeline>-<sink>`).
    pub client_id: Option<String>,
    /// NATS: publish through JetStream and wait for its acknowledgements.
    pub jetstream: Option<bool>,
    /// NATS JetStream stream to create if missing, over the topic template's subjects.
    pub stream: Option<String>,
    /// Redis: `XADD ... MAXLEN ~ n` (default 100000; 0 = unbounded).
    pub maxlen: Option<u64>,
    /// Kafka: create the topic (1 partition, replication 1) if the broker does not have it.
    pub create_topic: Option<bool>,
    /// User name (MQTT, NATS, Redis ACL, Kafka SASL/PLAIN).
    pub username: Option<String>,
    /// Environment variable holding the user name.
    pub username_env: Option<String>,
    /// Password. Prefer `password_env`.
    pub password: Option<String>,
    /// Environment variable holding the password.
    pub password_env: Option<String>,
    /// Token (NATS token auth, HTTP bearer token). Prefer `token_env`.
    pub token: Option<String>,
    /// Environment variable holding the token.
    pub token_env: Option<String>,
    /// PEM file of CA certificates to trust (MQTT, NATS); turns TLS on.
    pub tls_ca_file: Option<String>,
    /// PEM client certificate (with `tls_key_file`) for mutual TLS (MQTT, NATS).
    pub tls_cert_file: Option<String>,
    /// PEM client key.
    pub tls_key_file: Option<String>,
    /// Results held while the destination is slow or down (default 10000).
    pub buffer: Option<usize>,
    /// `block`, `drop_oldest` (default) or `drop_newest`.
    pub when_full: Option<WhenFull>,
    /// Most results per delivery (one HTTP POST, one Kafka produce, one pipelined XADD run).
    pub batch: Option<usize>,
    /// First retry delay, ms (default 100).
    pub retry_initial_ms: Option<u64>,
    /// Longest retry delay, ms (default 5000).
    pub retry_max_ms: Option<u64>,
    /// Time allowed for one connection attempt or delivery, ms (default 5000).
    pub timeout_ms: Option<u64>,
    /// At shutdown, time allowed to deliver what is buffered, ms (default 5000).
    pub flush_timeout_ms: Option<u64>,
}

/// A credential: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a credential.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The value, for handing to a client library; never for logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// User name and password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// User.
    pub username: String,
    /// Password.
    pub password: Secret,
}

/// TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Trusted CA certificates (PEM).
    pub ca: PathBuf,
    /// Client certificate and key (PEM), for mutual TLS.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Host and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Where a validated sink delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// JSON lines to stdout.
    Stdout,
    /// JSON lines to a file.
    File(PathBuf),
    /// MQTT.
    Mqtt {
        /// Broker.
        addr: HostPort,
        /// Topic template.
        topic: Template,
        /// 0 or 1.
        qos: u8,
        /// Client id.
        client_id: String,
        /// Credentials.
        login: Option<Login>,
        /// TLS.
        tls: Option<TlsFiles>,
    },
    /// NATS.
    Nats {
        /// Server.
        addr: HostPort,
        /// Subject template.
        subject: Template,
        /// JetStream acknowledgements.
        jetstream: bool,
        /// JetStream stream to create if missing.
        stream: Option<String>,
        /// User and password.
        login: Option<Login>,
        /// Token.
        token: Option<Secret>,
        /// TLS.
        tls: Option<TlsFiles>,
    },
    /// Redis Streams.
    Redis {
        /// Server.
        addr: HostPort,
        /// Database number.
        db: i64,
        /// Stream key template.
        key: Template,
        /// Approximate MAXLEN; 0 = unbounded.
        maxlen: u64,
        /// ACL user (optional) and password.
        login: Option<Login>,
    },
    /// Kafka.
    Kafka {
        /// Bootstrap brokers.
        brokers: Vec<HostPort>,
        /// Topic template.
        topic: Template,
        /// Record key template.
        key: Template,
        /// Create missing topics.
        create_topic: bool,
        /// SASL/PLAIN credentials.
        login: Option<Login>,
    },
    /// HTTP webhook.
    Http {
        /// Endpoint, `http(s)://host:port/path`.
        url: String,
        /// Bearer token.
        token: Option<Secret>,
    },
}

/// Buffering and retry settings, common to all sinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Buffer capacity in results.
    pub buffer: usize,
    /// Policy when full.
    pub when_full: WhenFull,
    /// Most results per delivery.
    pub batch: usize,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// One attempt's time limit.
    pub timeout: Duration,
    /// Shutdown flush limit.
    pub flush_timeout: Duration,
}

impl Default for Delivery {
    fn default() -> Self {
        Self {
            buffer: 10_000,
            when_full: WhenFull::DropOldest,
            batch: 64,
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_millis(5000),
            timeout: Duration::from_millis(5000),
            flush_timeout: Duration::from_millis(5000),
        }
    }
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
            target: Target::File(path.into()),
            delivery: Delivery::default(),
        }
    }

    /// Where it delivers, for logs: never includes credentials.
    pub fn describe(&self) -> String {
        match &self.target {
            Target::Stdout => "stdout".into(),
            Target::File(p) => p.display().to_string(),
            Target::Mqtt { addr, topic, .. } => format!("mqtt://{addr} topic {topic}"),
            Target::Nats {
                addr,
                subject,
                jetstream,
                ..
            } => format!(
                "nats://{addr} subject {subject}{}",
                if *jetstream { " (JetStream)" } else { "" }
            ),
            Target::Redis { addr, db, key, .. } => format!("redis://{addr}/{db} stream {key}"),
            Target::Kafka { brokers, topic, .. } => {
                let b: Vec<String> = brokers.iter().map(ToString::to_string).collect();
                format!("kafka://{} topic {topic}", b.join(","))
            }
            Target::Http { url, .. } => url.clone(),
        }
    }
}

/// Keys that each sink type accepts, beyond `type`, `name` and the delivery keys.
pub fn allowed_keys(kind: SinkKind) -> &'static [&'static str] {
    match kind {
        SinkKind::Jsonl => &["path"],
        SinkKind::Mqtt => &[
            "url",
            "topic",
            "qos",
            "client_id",
            "username",
            "username_env",
            "password",
            "password_env",
            "tls_ca_file",
            "tls_cert_file",
            "tls_key_file",
        ],
        SinkKind::Nats => &[
            "url",
            "topic",
            "jetstream",
            "stream",
            "username",
            "username_env",
            "password",
            "password_env",
            "token",
            "token_env",
            "tls_ca_file",
            "tls_cert_file",
            "tls_key_file",
        ],
        SinkKind::Redis => &[
            "url",
            "topic",
            "maxlen",
            "username",
            "username_env",
            "password",
            "password_env",
        ],
        SinkKind::Kafka => &[
            "url",
            "topic",
            "key",
            "create_topic",
            "username",
            "username_env",
            "password",
            "password_env",
        ],
        SinkKind::Http => &["url", "token", "token_env"],
    }
}

/// Keys every sink accepts.
pub const COMMON_KEYS: [&str; 9] = [
    "type",
    "name",
    "buffer",
    "when_full",
    "batch",
    "retry_initial_ms",
    "retry_max_ms",
    "timeout_ms",
    "flush_timeout_ms",
];

/// One problem: the key (relative to the sink's table) and the message.
pub type Problem = (String, String);

/// Context a sink is validated in.
pub struct Ctx<'a> {
    /// Pipeline name (for default client ids).
    pub pipeline: &'a str,
    /// Folder relative paths resolve from.
    pub dir: &'a Path,
    /// Looks up environment variables (a closure so tests need not touch the process env).
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// Validates one sink. `present` lists the keys written in its table; `name` is its resolved name.
pub fn validate(
    c: &SinkConfig,
    present: &[String],
    name: String,
    ctx: &Ctx<'_>,
) -> Result<SinkSpec, Vec<Problem>> {
    let mut problems: Vec<Problem> = Vec::new();
    let allowed = allowed_keys(c.kind);
    for k in present {
        if !COMMON_KEYS.contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
            problems.push((
                k.clone(),
                format!("`{k}` does not apply to {} sinks", c.kind.as_str()),
            ));
        }
    }
    let delivery = delivery(c, &mut problems);
    let target = target(c, &name, ctx, &mut problems);
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

fn delivery(c: &SinkConfig, problems: &mut Vec<Problem>) -> Delivery {
    let d = Delivery::default();
    let mut positive = |key: &str, v: Option<u64>, default: u64| -> u64 {
        match v {
            Some(0) => {
                problems.push((key.into(), "must be at least 1".into()));
                default
            }
            Some(v) => v,
            None => default,
        }
    };
    let buffer = positive("buffer", c.buffer.map(|v| v as u64), d.buffer as u64) as usize;
    // Kafka: produce requests of 64 results hit a ~40 ms stall per request against tansu that
    // 512 do not (`bench sinks`), and Kafka is built for large produce requests anyway.
    let default_batch = if c.kind == SinkKind::Kafka {
        512
    } else {
        d.batch
    };
    let batch = positive("batch", c.batch.map(|v| v as u64), default_batch as u64) as usize;
    let ms = |v: Duration| v.as_millis() as u64;
    let retry_initial = positive("retry_initial_ms", c.retry_initial_ms, ms(d.retry_initial));
    let retry_max = positive("retry_max_ms", c.retry_max_ms, ms(d.retry_max));
    let timeout = positive("timeout_ms", c.timeout_ms, ms(d.timeout));
    let flush_timeout = c.flush_timeout_ms.unwrap_or(ms(d.flush_timeout));
    if retry_max < retry_initial {
        problems.push((
            "retry_max_ms".into(),
            format!("must be at least retry_initial_ms ({retry_initial})"),
        ));
    }
    if c.kind == SinkKind::Mqtt && batch > 1000 {
        problems.push((
            "batch".into(),
            "at most 1000 for mqtt (results in flight)".into(),
        ));
    }
    Delivery {
        buffer,
        when_full: c.when_full.unwrap_or(d.when_full),
        batch,
        retry_initial: Duration::from_millis(retry_initial),
        retry_max: Duration::from_millis(retry_max),
        timeout: Duration::from_millis(timeout),
        flush_timeout: Duration::from_millis(flush_timeout),
    }
}

/// A URL split into its parts. Only what the sinks need: `scheme://[user[:pass]@]host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// Scheme, lower case.
    pub scheme: String,
    /// User from the URL.
    pub user: Option<String>,
    /// Password from the URL.
    pub password: Option<String>,
    /// Hosts with ports (several only for Kafka bootstrap lists).
    pub hosts: Vec<HostPort>,
    /// Path, starting with `/`, or empty.
    pub path: String,
}

/// Parses a URL; `default_port` applies to hosts without one.
pub fn parse_url(s: &str, default_port: u16) -> Result<Url, String> {
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("`{}` is not a URL (expected scheme://host:port)", redact(s)))?;
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+')
    {
        return Err(format!("bad scheme in `{}`", redact(s)));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        None => (None, None),
        Some(u) => match u.split_once(':') {
            Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
            None => (Some(u.to_string()), None),
        },
    };
    let mut out = Vec::new();
    for h in hosts.split(',') {
        if h.is_empty() {
            return Err(format!("no host in `{}`", redact(s)));
        }
        let (host, port) = match h.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port: u16 = port
                    .parse()
                    .map_err(|_| format!("bad port `{port}` in `{}`", redact(s)))?;
                (host, port)
            }
            _ => (h, default_port),
        };
        if host.is_empty()
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c))
        {
            return Err(format!("bad host `{host}` in `{}`", redact(s)));
        }
        out.push(HostPort {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
        });
    }
    if path.contains(char::is_whitespace) {
        return Err(format!("white space in the path of `{}`", redact(s)));
    }
    Ok(Url {
        scheme: scheme.to_ascii_lowercase(),
        user,
        password,
        hosts: out,
        path: path.to_string(),
    })
}

/// A URL with any password replaced, for messages.
pub fn redact(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let end = rest.find('/').unwrap_or(rest.len());
    match rest[..end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            format!("{scheme}://{user}:<redacted>@{host}{}", &rest[end..])
        }
        None => s.to_string(),
    }
}

fn secret(
    literal: &Option<String>,
    env_key: &Option<String>,
    key: &str,
    ctx: &Ctx<'_>,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    match (literal, env_key) {
        (Some(_), Some(_)) => {
            problems.push((
                format!("{key}_env"),
                format!("give `{key}` or `{key}_env`, not both"),
            ));
            None
        }
        (Some(v), None) => Some(Secret::new(v.clone())),
        (None, Some(var)) => match (ctx.env)(var) {
            Some(v) => Some(Secret::new(v)),
            None => {
                problems.push((
                    format!("{key}_env"),
                    format!("environment variable {var} is not set"),
                ));
                None
            }
        },
        (None, None) => None,
    }
}

fn login(
    c: &SinkConfig,
    url: Option<&Url>,
    ctx: &Ctx<'_>,
    problems: &mut Vec<Problem>,
) -> Option<Login> {
    let user = secret(&c.username, &c.username_env, "username", ctx, problems)
        .map(|s| s.expose().to_string())
        .or_else(|| url.and_then(|u| u.user.clone()));
    let password = secret(&c.password, &c.password_env, "password", ctx, problems)
        .or_else(|| url.and_then(|u| u.password.clone()).map(Secret::new));
    match (user, password) {
        (None, None) => None,
        (Some(u), None) => {
            // A password that was given but could not be read is reported once, above.
            let tried = c.password.is_some() || c.password_env.is_some();
            if c.kind != SinkKind::Redis && !tried {
                problems.push((
                    "password".into(),
                    format!("user `{u}` is given without a password (set `password_env`)"),
                ));
            }
            None
        }
        (u, Some(p)) => Some(Login {
            username: u.unwrap_or_default(),
            password: p,
        }),
    }
}

fn tls(c: &SinkConfig, ctx: &Ctx<'_>, problems: &mut Vec<Problem>) -> Option<TlsFiles> {
    let mut file = |key: &str, v: &Option<String>| -> Option<PathBuf> {
        let p = v.as_ref()?;
        let p = if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            ctx.dir.join(p)
        };
        if !p.is_file() {
            problems.push((key.into(), format!("file {} does not exist", p.display())));
        }
        Some(p)
    };
    let ca = file("tls_ca_file", &c.tls_ca_file);
    let cert = file("tls_cert_file", &c.tls_cert_file);
    let key = file("tls_key_file", &c.tls_key_file);
    let client = match (cert, key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => {
            problems.push(("tls_key_file".into(), "needed with tls_cert_file".into()));
            None
        }
        (None, Some(_)) => {
            problems.push(("tls_cert_file".into(), "needed with tls_key_file".into()));
            None
        }
    };
    match (ca, client) {
        (Some(ca), client) => Some(TlsFiles { ca, client }),
        (None, Some(_)) => {
            problems.push((
                "tls_ca_file".into(),
                "needed for TLS (the CA that signed the server's certificate)".into(),
            ));
            None
        }
        (None, None) => None,
    }
}

fn template(v: Option<&str>, key: &str, problems: &mut Vec<Problem>) -> Option<Template> {
    let Some(v) = v else {
        problems.push((key.into(), format!("missing key `{key}`")));
        return None;
    };
    Template::parse(v)
        .map_err(|e| problems.push((key.into(), e)))
        .ok()
}

fn url(
    c: &SinkConfig,
    schemes: &[&str],
    default_port: u16,
    problems: &mut Vec<Problem>,
) -> Option<Url> {
    let Some(s) = &c.url else {
        problems.push((
            "url".into(),
            format!(
                "missing key `url` (e.g. {}://127.0.0.1:{default_port})",
                schemes[0]
            ),
        ));
        return None;
    };
    match parse_url(s, default_port) {
        Err(e) => {
            problems.push(("url".into(), e));
            None
        }
        Ok(u) if !schemes.contains(&u.scheme.as_str()) => {
            problems.push((
                "url".into(),
                format!(
                    "scheme `{}` is not one of {} for {} sinks",
                    u.scheme,
                    schemes.join(", "),
                    c.kind.as_str()
                ),
            ));
            None
        }
        Ok(u) if u.hosts.len() > 1 && c.kind != SinkKind::Kafka => {
            problems.push(("url".into(), "one host only".into()));
            None
        }
        Ok(u) => Some(u),
    }
}

fn target(
    c: &SinkConfig,
    name: &str,
    ctx: &Ctx<'_>,
    problems: &mut Vec<Problem>,
) -> Option<Target> {
    match c.kind {
        SinkKind::Jsonl => {
            let path = c.path.as_deref().unwrap_or("-");
            if path == "-" {
                return Some(Target::Stdout);
            }
            let p = if Path::new(path).is_absolute() {
                PathBuf::from(path)
            } else {
                ctx.dir.join(path)
            };
            match p.parent() {
                Some(d) if !d.as_os_str().is_empty() && !d.is_dir() => {
                    problems.push((
                        "path".into(),
                        format!("folder {} does not exist", d.display()),
                    ));
                    None
                }
                _ => Some(Target::File(p)),
            }
        }
        SinkKind::Mqtt => {
            let u = url(c, &["mqtt", "mqtts", "tcp", "ssl"], 1883, problems);
            let topic = template(c.topic.as_deref(), "topic", problems);
            if let Some(t) = &topic
                && t.literal_text().contains(['+', '#'])
            {
                problems.push((
                    "topic".into(),
                    "MQTT topics to publish to cannot contain the wildcards + or #".into(),
                ));
            }
            let qos = c.qos.unwrap_or(1);
            if qos > 1 {
                problems.push(("qos".into(), "0 (at most once) or 1 (at least once)".into()));
            }
            let login = login(c, u.as_ref(), ctx, problems);
            let tls = tls(c, ctx, problems);
            if let Some(u) = &u
                && matches!(u.scheme.as_str(), "mqtts" | "ssl")
                && tls.is_none()
            {
                problems.push((
                    "tls_ca_file".into(),
                    format!("{}:// needs tls_ca_file", u.scheme),
                ));
            }
            let client_id = c
                .client_id
                .clone()
                .unwrap_or_else(|| format!("poolpipe-{}-{name}", ctx.pipeline));
            Some(Target::Mqtt {
                addr: u?.hosts.remove(0),
                topic: topic?,
                qos,
                client_id,
                login,
                tls,
            })
        }
        SinkKind::Nats => {
            let u = url(c, &["nats", "tls"], 4222, problems);
            let subject = template(c.topic.as_deref(), "topic", problems);
            if let Some(t) = &subject
                && (t.literal_text().contains(['*', '>', ' '])
                    || t.with_wildcards("x").split('.').any(str::is_empty))
            {
                problems.push((
                    "topic".into(),
                    "NATS subjects to publish to cannot contain *, >, spaces or empty tokens"
                        .into(),
                ));
            }
            let jetstream = c.jetstream.unwrap_or(false);
            if c.stream.is_some() && !jetstream {
                problems.push(("stream".into(), "needs jetstream = true".into()));
            }
            let login = login(c, u.as_ref(), ctx, problems);
            let token = secret(&c.token, &c.token_env, "token", ctx, problems);
            if login.is_some() && token.is_some() {
                problems.push(("token".into(), "give a token or a user, not both".into()));
            }
            let tls = tls(c, ctx, problems);
            Some(Target::Nats {
                addr: u?.hosts.remove(0),
                subject: subject?,
                jetstream,
                stream: c.stream.clone(),
                login,
                token,
                tls,
            })
        }
        SinkKind::Redis => {
            let u = url(c, &["redis"], 6379, problems);
            let key = template(c.topic.as_deref(), "topic", problems);
            let login = login(c, u.as_ref(), ctx, problems);
            let db = match u.as_ref().map(|u| u.path.trim_start_matches('/')) {
                None | Some("") => 0,
                Some(d) => match d.parse::<i64>() {
                    Ok(d) if d >= 0 => d,
                    _ => {
                        problems.push((
                            "url".into(),
                            format!("the path must be a database number, not `{d}`"),
                        ));
                        0
                    }
                },
            };
            Some(Target::Redis {
                addr: u?.hosts.remove(0),
                db,
                key: key?,
                maxlen: c.maxlen.unwrap_or(100_000),
                login,
            })
        }
        SinkKind::Kafka => {
            let u = url(c, &["kafka"], 9092, problems);
            let topic = template(c.topic.as_deref(), "topic", problems);
            if let Some(t) = &topic
                && !t
                    .literal_text()
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
            {
                problems.push((
                    "topic".into(),
                    "Kafka topic names allow only letters, digits, `.`, `_` and `-`".into(),
                ));
            }
            let key = template(
                Some(c.key.as_deref().unwrap_or("{stream}")),
                "key",
                problems,
            );
            let login = login(c, u.as_ref(), ctx, problems);
            Some(Target::Kafka {
                brokers: u?.hosts,
                topic: topic?,
                key: key?,
                create_topic: c.create_topic.unwrap_or(false),
                login,
            })
        }
        SinkKind::Http => {
            let u = url(c, &["http", "https"], 80, problems);
            let token = secret(&c.token, &c.token_env, "token", ctx, problems);
            if u.as_ref()
                .is_some_and(|u| u.password.is_some() || u.user.is_some())
            {
                problems.push((
                    "url".into(),
                    "put credentials in `token_env`, not in the URL".into(),
                ));
            }
            u?;
            Some(Target::Http {
                url: c.url.clone()?,
                token,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> (SinkConfig, Vec<String>) {
        let v: toml::Table = toml::from_str(toml_text).unwrap();
        let keys = v.keys().cloned().collect();
        (v.try_into().unwrap(), keys)
    }

    fn check(text: &str) -> Result<SinkSpec, Vec<Problem>> {
        let env = |k: &str| (k == "PW").then(|| "hunter2".to_string());
        let ctx = Ctx {
            pipeline: "p",
            dir: Path::new("."),
            env: &env,
        };
        let (c, keys) = cfg(text);
        validate(&c, &keys, "s".into(), &ctx)
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
        let Target::Mqtt {
            addr, login, qos, ..
        } = &s.target
        else {
            panic!("{s:?}")
        };
        assert_eq!(addr.port, 1884);
        assert_eq!(*qos, 1);
        assert_eq!(login.as_ref().unwrap().password.expose(), "hunter2");
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
        let Target::Kafka { brokers, .. } = s.target else {
            panic!()
        };
        assert_eq!(brokers[1].port, 9092);
    }
}
