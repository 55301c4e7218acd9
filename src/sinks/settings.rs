//! What every sink's settings share: credentials ([`Secret`], whose `Debug` and `Display` print
//! `<redacted>`, so no log line, error or status report can carry them), logins, TLS files, URLs,
//! the delivery settings (buffer, retries, timeouts), the groups of keys several sinks accept,
//! and the helpers that validate them. Each sink's own keys are in its folder (`mqtt/config.rs`
//! and so on).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::template::Template;

/// Declares a group of `[[sink]]` keys once: the struct that serde fills from the sink's table
/// (keys of other groups are ignored), and the list of its keys, for telling which keys apply.
macro_rules! sink_keys {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, serde::Deserialize)]
        pub struct $name { $($(#[$fm])* pub $field: $ty,)* }
        impl $name {
            /// The keys, as written in a `[[sink]]` table.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($field)),*];
        }
    };
}
pub(crate) use sink_keys;

/// Reads one part of a `[[sink]]` table (all parts come from the same table; each ignores the
/// keys of the others). A part that cannot be read has been reported by the reader.
pub trait PartReader {
    /// The part, or `None` when a value in it has the wrong type.
    fn read<T: serde::de::DeserializeOwned>(&mut self) -> Option<T>;
}

/// Declares a sink type's keys once, as the groups of keys it takes (each a [`sink_keys!`]
/// struct): the struct, how it is read from a table (every group, so that every bad value is
/// reported), and the list of every key it accepts.
macro_rules! sink_config {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $field:ident : $ty:ty,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default)]
        pub struct $name { $($(#[$fm])* pub $field: $ty,)* }
        impl $name {
            /// Every key it accepts.
            pub fn keys() -> Vec<&'static str> {
                [$(<$ty>::KEYS),*].concat()
            }
            /// Reads every group of keys from the sink's table.
            pub fn read(r: &mut impl $crate::sinks::settings::PartReader) -> Option<Self> {
                $(let $field = r.read::<$ty>();)*
                Some(Self { $($field: $field?,)* })
            }
        }
    };
}
pub(crate) use sink_config;

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

/// Where a sink buffers results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferType {
    /// In memory (default): lost if the process dies.
    #[default]
    Memory,
    /// On disk, in the data folder: delivered by the next run if the process dies.
    Disk,
}

/// Which messages a sink takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Messages {
    /// Frames' results and rule events (default).
    #[default]
    All,
    /// Frames' results only.
    Results,
    /// Rule events only.
    Events,
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
    /// Which messages it takes.
    pub messages: Messages,
    /// `buffer_type = "disk"`: the buffer's folder and limits (None: in memory).
    pub disk: Option<DiskSettings>,
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
            messages: Messages::All,
            disk: None,
        }
    }
}

/// Settings of a disk buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSettings {
    /// The buffer's own folder.
    pub dir: PathBuf,
    /// Most bytes of segments on disk.
    pub max_bytes: u64,
    /// How often new writes are made durable.
    pub fsync: Duration,
    /// Bytes at which a segment is closed and a new one started.
    pub segment_bytes: u64,
}

impl DiskSettings {
    /// Settings with segments of an eighth of `max_bytes` (4 KiB to 8 MiB).
    pub fn new(dir: PathBuf, max_bytes: u64, fsync: Duration) -> Self {
        Self {
            dir,
            max_bytes,
            fsync,
            segment_bytes: (max_bytes / 8).clamp(4 << 10, 8 << 20),
        }
    }
}

/// The run-time context of a sink's transport: what is not a setting of its destination.
#[derive(Debug, Clone)]
pub struct SinkRun {
    /// Pipeline name (the `{pipeline}` field of templates, client names).
    pub pipeline: String,
    /// Most results per delivery.
    pub batch: usize,
    /// Time limit of one attempt.
    pub timeout: Duration,
}

sink_keys! {
    /// The delivery keys every sink accepts.
    pub struct DeliveryConfig {
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
        /// `all` (default), `results` (frames' results only) or `events` (rule events only).
        pub messages: Option<Messages>,
        /// `memory` (default) or `disk`: a disk buffer survives a crash of the process.
        pub buffer_type: Option<BufferType>,
        /// Disk buffer: most bytes on disk (default 268435456, 256 MiB).
        pub max_bytes: Option<u64>,
        /// Disk buffer: how often new writes are fsync'd, ms (default 100).
        pub fsync_ms: Option<u64>,
    }
}

sink_keys! {
    /// User and password keys (MQTT, NATS, Redis ACL, Kafka SASL/PLAIN).
    pub struct LoginConfig {
        /// User name.
        pub username: Option<String>,
        /// Environment variable holding the user name.
        pub username_env: Option<String>,
        /// Password. Prefer `password_env`.
        pub password: Option<String>,
        /// Environment variable holding the password.
        pub password_env: Option<String>,
    }
}

sink_keys! {
    /// TLS keys (MQTT, NATS).
    pub struct TlsConfig {
        /// PEM file of CA certificates to trust; turns TLS on.
        pub tls_ca_file: Option<String>,
        /// PEM client certificate (with `tls_key_file`) for mutual TLS.
        pub tls_cert_file: Option<String>,
        /// PEM client key.
        pub tls_key_file: Option<String>,
    }
}

sink_keys! {
    /// Token keys (NATS token auth, HTTP bearer token).
    pub struct TokenConfig {
        /// Token. Prefer `token_env`.
        pub token: Option<String>,
        /// Environment variable holding the token.
        pub token_env: Option<String>,
    }
}

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
    /// `--data-dir` (or POOLPIPE_DATA_DIR, read by the command line): where disk buffers live;
    /// else `poolpipe-data` beside the pipeline file.
    pub data_dir: Option<&'a Path>,
}

impl Ctx<'_> {
    /// The folder of sink `name`'s disk buffer: `<data dir>/<pipeline>/<name>`.
    pub fn buffer_dir(&self, name: &str) -> std::path::PathBuf {
        let root = match self.data_dir {
            Some(d) => d.to_path_buf(),
            None => self.dir.join("poolpipe-data"),
        };
        root.join(self.pipeline).join(name)
    }
}

impl DeliveryConfig {
    /// The delivery settings of a sink of `kind` named `name`, defaults filled in.
    pub fn validate(
        &self,
        kind: SinkKind,
        name: &str,
        ctx: &Ctx<'_>,
        problems: &mut Vec<Problem>,
    ) -> Delivery {
        let c = self;
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
        let default_batch = if kind == SinkKind::Kafka {
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
        let max_bytes = positive("max_bytes", c.max_bytes, 256 << 20);
        let fsync = positive("fsync_ms", c.fsync_ms, 100);
        if retry_max < retry_initial {
            problems.push((
                "retry_max_ms".into(),
                format!("must be at least retry_initial_ms ({retry_initial})"),
            ));
        }
        if kind == SinkKind::Mqtt && batch > 1000 {
            problems.push((
                "batch".into(),
                "at most 1000 for mqtt (results in flight)".into(),
            ));
        }
        let disk = match c.buffer_type.unwrap_or_default() {
            BufferType::Memory => {
                for (key, set) in [
                    ("max_bytes", c.max_bytes.is_some()),
                    ("fsync_ms", c.fsync_ms.is_some()),
                ] {
                    if set {
                        problems.push((
                            key.into(),
                            "applies to disk buffers only; set buffer_type = \"disk\"".into(),
                        ));
                    }
                }
                None
            }
            BufferType::Disk => {
                if c.buffer.is_some() {
                    problems.push((
                        "buffer".into(),
                        "counts results in a memory buffer; a disk buffer is bounded by max_bytes"
                            .into(),
                    ));
                }
                if max_bytes < 64 << 10 {
                    problems.push(("max_bytes".into(), "at least 65536 (64 KiB)".into()));
                }
                Some(DiskSettings::new(
                    ctx.buffer_dir(name),
                    max_bytes,
                    Duration::from_millis(fsync),
                ))
            }
        };
        Delivery {
            disk,
            buffer,
            when_full: c.when_full.unwrap_or(d.when_full),
            batch,
            retry_initial: Duration::from_millis(retry_initial),
            retry_max: Duration::from_millis(retry_max),
            timeout: Duration::from_millis(timeout),
            flush_timeout: Duration::from_millis(flush_timeout),
            messages: c.messages.unwrap_or_default(),
        }
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

/// A credential given literally (`KEY`) or through an environment variable (`KEY_env`).
pub fn secret(
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

impl LoginConfig {
    /// User and password from these keys or the URL. A user without a password is an error unless
    /// `password_optional` (Redis: an ACL user may have none).
    pub fn validate(
        &self,
        url: Option<&Url>,
        password_optional: bool,
        ctx: &Ctx<'_>,
        problems: &mut Vec<Problem>,
    ) -> Option<Login> {
        let c = self;
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
                if !password_optional && !tried {
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
}

impl TlsConfig {
    /// The TLS files, resolved from the pipeline file's folder and checked to exist.
    pub fn validate(&self, ctx: &Ctx<'_>, problems: &mut Vec<Problem>) -> Option<TlsFiles> {
        let c = self;
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
}

impl TokenConfig {
    /// The token, if one is given.
    pub fn validate(&self, ctx: &Ctx<'_>, problems: &mut Vec<Problem>) -> Option<Secret> {
        secret(&self.token, &self.token_env, "token", ctx, problems)
    }
}

/// A required template setting of results (which have no `{rule}`).
pub fn template(v: Option<&str>, key: &str, problems: &mut Vec<Problem>) -> Option<Template> {
    let Some(v) = v else {
        problems.push((key.into(), format!("missing key `{key}`")));
        return None;
    };
    let t = Template::parse(v)
        .map_err(|e| problems.push((key.into(), e)))
        .ok()?;
    if t.uses_rule() {
        problems.push((
            key.into(),
            "`{rule}` belongs in `events_topic`: results are not from a rule".into(),
        ));
        return None;
    }
    Some(t)
}

/// The `events_topic` template: where rule events go (default `default`).
pub fn events_template(
    v: Option<&str>,
    default: &str,
    problems: &mut Vec<Problem>,
) -> Option<Template> {
    Template::parse(v.unwrap_or(default))
        .map_err(|e| problems.push(("events_topic".into(), e)))
        .ok()
}

/// The required `url` of a sink of `kind`: one of `schemes`, one host unless Kafka.
pub fn url(
    value: Option<&str>,
    kind: SinkKind,
    schemes: &[&str],
    default_port: u16,
    problems: &mut Vec<Problem>,
) -> Option<Url> {
    let Some(s) = value else {
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
                    kind.as_str()
                ),
            ));
            None
        }
        Ok(u) if u.hosts.len() > 1 && kind != SinkKind::Kafka => {
            problems.push(("url".into(), "one host only".into()));
            None
        }
        Ok(u) => Some(u),
    }
}
