//! `[[sink]] type = "kafka"`: its keys, and their validation into [`KafkaSettings`].

use crate::sinks::settings::{
    Ctx, HostPort, Login, LoginConfig, Problem, SinkKind, events_template, sink_config, sink_keys,
    template, url,
};
use crate::sinks::template::Template;

sink_keys! {
    /// The Kafka sink's own keys.
    pub struct KafkaKeys {
        /// Bootstrap brokers: `kafka://host:port[,host:port]`.
        pub url: Option<String>,
        /// Topic template.
        pub topic: Option<String>,
        /// Topic template of rule events (default `events.{stream}.{rule}`).
        pub events_topic: Option<String>,
        /// Record key template (default `{stream}`).
        pub key: Option<String>,
        /// Create the topic (1 partition, replication 1) if the broker does not have it.
        pub create_topic: Option<bool>,
    }
}

sink_config! {
    /// A Kafka sink's keys, as written.
    pub struct KafkaConfig {
        /// Its own keys.
        pub keys: KafkaKeys,
        /// SASL/PLAIN credentials.
        pub login: LoginConfig,
    }
}

/// Where a Kafka sink delivers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSettings {
    /// Bootstrap brokers.
    pub brokers: Vec<HostPort>,
    /// Topic template.
    pub topic: Template,
    /// Topic template of rule events.
    pub events_topic: Template,
    /// Record key template.
    pub key: Template,
    /// Create missing topics.
    pub create_topic: bool,
    /// SASL/PLAIN credentials.
    pub login: Option<Login>,
}

impl KafkaConfig {
    /// Validates the keys.
    pub fn validate(&self, ctx: &Ctx<'_>, problems: &mut Vec<Problem>) -> Option<KafkaSettings> {
        let c = &self.keys;
        let u = url(
            c.url.as_deref(),
            SinkKind::Kafka,
            &["kafka"],
            9092,
            problems,
        );
        let topic = template(c.topic.as_deref(), "topic", problems);
        let events_topic = events_template(
            c.events_topic.as_deref(),
            "events.{stream}.{rule}",
            problems,
        );
        for (k, t) in [("topic", &topic), ("events_topic", &events_topic)] {
            if let Some(t) = t
                && !t
                    .literal_text()
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch))
            {
                problems.push((
                    k.into(),
                    "Kafka topic names allow only letters, digits, `.`, `_` and `-`".into(),
                ));
            }
        }
        let key = template(
            Some(c.key.as_deref().unwrap_or("{stream}")),
            "key",
            problems,
        );
        let login = self.login.validate(u.as_ref(), false, ctx, problems);
        Some(KafkaSettings {
            brokers: u?.hosts,
            topic: topic?,
            events_topic: events_topic?,
            key: key?,
            create_topic: c.create_topic.unwrap_or(false),
            login,
        })
    }
}
