//! `[[sink]] type = "nats"`: its keys, and their validation into [`NatsSettings`].

use crate::sinks::settings::{
    Ctx, HostPort, Login, LoginConfig, Problem, Secret, SinkKind, TlsConfig, TlsFiles, TokenConfig,
    events_template, sink_config, sink_keys, template, url,
};
use crate::sinks::template::Template;

sink_keys! {
    /// The NATS sink's own keys.
    pub struct NatsKeys {
        /// Server address: `nats://host:port` (`tls://` with TLS).
        pub url: Option<String>,
        /// Subject template.
        pub topic: Option<String>,
        /// Subject template of rule events (default `events.{stream}.{rule}`).
        pub events_topic: Option<String>,
        /// Publish through JetStream and wait for its acknowledgements.
        pub jetstream: Option<bool>,
        /// JetStream stream to create if missing, over the topic template's subjects.
        pub stream: Option<String>,
    }
}

sink_config! {
    /// A NATS sink's keys, as written.
    pub struct NatsConfig {
        /// Its own keys.
        pub keys: NatsKeys,
        /// User and password.
        pub login: LoginConfig,
        /// Token.
        pub token: TokenConfig,
        /// TLS files.
        pub tls: TlsConfig,
    }
}

/// Where a NATS sink delivers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSettings {
    /// Server.
    pub addr: HostPort,
    /// Subject template.
    pub subject: Template,
    /// Subject template of rule events.
    pub events_subject: Template,
    /// Wait for JetStream acknowledgements.
    pub jetstream: bool,
    /// JetStream stream to create if missing.
    pub stream: Option<String>,
    /// User and password.
    pub login: Option<Login>,
    /// Token.
    pub token: Option<Secret>,
    /// TLS.
    pub tls: Option<TlsFiles>,
}

impl NatsConfig {
    /// Validates the keys.
    pub fn validate(&self, ctx: &Ctx<'_>, problems: &mut Vec<Problem>) -> Option<NatsSettings> {
        let c = &self.keys;
        let u = url(
            c.url.as_deref(),
            SinkKind::Nats,
            &["nats", "tls"],
            4222,
            problems,
        );
        let subject = template(c.topic.as_deref(), "topic", problems);
        let events_subject = events_template(
            c.events_topic.as_deref(),
            "events.{stream}.{rule}",
            problems,
        );
        for (key, t) in [("topic", &subject), ("events_topic", &events_subject)] {
            if let Some(t) = t
                && (t.literal_text().contains(['*', '>', ' '])
                    || t.with_wildcards("x").split('.').any(str::is_empty))
            {
                problems.push((
                    key.into(),
                    "NATS subjects to publish to cannot contain *, >, spaces or empty tokens"
                        .into(),
                ));
            }
        }
        let jetstream = c.jetstream.unwrap_or(false);
        if c.stream.is_some() && !jetstream {
            problems.push(("stream".into(), "needs jetstream = true".into()));
        }
        let login = self.login.validate(u.as_ref(), false, ctx, problems);
        let token = self.token.validate(ctx, problems);
        if login.is_some() && token.is_some() {
            problems.push(("token".into(), "give a token or a user, not both".into()));
        }
        let tls = self.tls.validate(ctx, problems);
        Some(NatsSettings {
            addr: u?.hosts.remove(0),
            subject: subject?,
            events_subject: events_subject?,
            jetstream,
            stream: c.stream.clone(),
            login,
            token,
            tls,
        })
    }
}
