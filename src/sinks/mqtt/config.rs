//! `[[sink]] type = "mqtt"`: its keys, and their validation into [`MqttSettings`].

use crate::sinks::settings::{
    Ctx, HostPort, Login, LoginConfig, Problem, SinkKind, TlsConfig, TlsFiles, events_template,
    sink_config, sink_keys, template, url,
};
use crate::sinks::template::Template;

sink_keys! {
    /// The MQTT sink's own keys.
    pub struct MqttKeys {
        /// Broker address: `mqtt://host:port` (`mqtts://` with TLS).
        pub url: Option<String>,
        /// Topic template.
        pub topic: Option<String>,
        /// Topic template of rule events (default `events/{stream}/{rule}`).
        pub events_topic: Option<String>,
        /// QoS, 0 or 1 (default 1).
        pub qos: Option<u8>,
        /// Client id (default `poolpipe-<pipeline>-<sink>`).
        pub client_id: Option<String>,
    }
}

sink_config! {
    /// An MQTT sink's keys, as written.
    pub struct MqttConfig {
        /// Its own keys.
        pub keys: MqttKeys,
        /// User and password.
        pub login: LoginConfig,
        /// TLS files.
        pub tls: TlsConfig,
    }
}

/// Where an MQTT sink delivers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSettings {
    /// Broker.
    pub addr: HostPort,
    /// Topic template.
    pub topic: Template,
    /// Topic template of rule events.
    pub events_topic: Template,
    /// 0 or 1.
    pub qos: u8,
    /// Client id.
    pub client_id: String,
    /// Credentials.
    pub login: Option<Login>,
    /// TLS.
    pub tls: Option<TlsFiles>,
}

impl MqttConfig {
    /// Validates the keys of the sink named `name`.
    pub fn validate(
        &self,
        name: &str,
        ctx: &Ctx<'_>,
        problems: &mut Vec<Problem>,
    ) -> Option<MqttSettings> {
        let c = &self.keys;
        let u = url(
            c.url.as_deref(),
            SinkKind::Mqtt,
            &["mqtt", "mqtts", "tcp", "ssl"],
            1883,
            problems,
        );
        let topic = template(c.topic.as_deref(), "topic", problems);
        let events_topic = events_template(
            c.events_topic.as_deref(),
            "events/{stream}/{rule}",
            problems,
        );
        for (key, t) in [("topic", &topic), ("events_topic", &events_topic)] {
            if let Some(t) = t
                && t.literal_text().contains(['+', '#'])
            {
                problems.push((
                    key.into(),
                    "MQTT topics to publish to cannot contain the wildcards + or #".into(),
                ));
            }
        }
        let qos = c.qos.unwrap_or(1);
        if qos > 1 {
            problems.push(("qos".into(), "0 (at most once) or 1 (at least once)".into()));
        }
        let login = self.login.validate(u.as_ref(), false, ctx, problems);
        let tls = self.tls.validate(ctx, problems);
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
        Some(MqttSettings {
            addr: u?.hosts.remove(0),
            topic: topic?,
            events_topic: events_topic?,
            qos,
            client_id,
            login,
            tls,
        })
    }
}
