//! `[[sink]] type = "redis"`: its keys, and their validation into [`RedisSettings`].

use crate::sinks::settings::{
    Ctx, HostPort, Login, LoginConfig, Problem, SinkKind, events_template, sink_config, sink_keys,
    template, url,
};
use crate::sinks::template::Template;

sink_keys! {
    /// The Redis sink's own keys.
    pub struct RedisKeys {
        /// Server address: `redis://host:port/db`.
        pub url: Option<String>,
        /// Stream key template.
        pub topic: Option<String>,
        /// Stream key template of rule events (default `events:{stream}:{rule}`).
        pub events_topic: Option<String>,
        /// `XADD ... MAXLEN ~ n` (default 100000; 0 = unbounded).
        pub maxlen: Option<u64>,
    }
}

sink_config! {
    /// A Redis sink's keys, as written.
    pub struct RedisConfig {
        /// Its own keys.
        pub keys: RedisKeys,
        /// ACL user (optional) and password.
        pub login: LoginConfig,
    }
}

/// Where a Redis sink delivers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// Server.
    pub addr: HostPort,
    /// Database number.
    pub db: i64,
    /// Stream key template.
    pub key: Template,
    /// Stream key template of rule events.
    pub events_key: Template,
    /// Approximate MAXLEN; 0 = unbounded.
    pub maxlen: u64,
    /// ACL user (optional) and password.
    pub login: Option<Login>,
}

impl RedisConfig {
    /// Validates the keys.
    pub fn validate(&self, ctx: &Ctx<'_>, problems: &mut Vec<Problem>) -> Option<RedisSettings> {
        let c = &self.keys;
        let u = url(
            c.url.as_deref(),
            SinkKind::Redis,
            &["redis"],
            6379,
            problems,
        );
        let key = template(c.topic.as_deref(), "topic", problems);
        let events_key = events_template(
            c.events_topic.as_deref(),
            "events:{stream}:{rule}",
            problems,
        );
        // Redis needs no user: a password alone authenticates the default user.
        let login = self.login.validate(u.as_ref(), true, ctx, problems);
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
        Some(RedisSettings {
            addr: u?.hosts.remove(0),
            db,
            key: key?,
            events_key: events_key?,
            maxlen: c.maxlen.unwrap_or(100_000),
            login,
        })
    }
}
