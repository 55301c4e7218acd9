//! `[[sink]] type = "http"`: its keys, and their validation into [`HttpSettings`].

use crate::sinks::settings::{
    Ctx, Problem, Secret, SinkKind, TokenConfig, sink_config, sink_keys, url,
};

sink_keys! {
    /// The HTTP sink's own keys.
    pub struct HttpKeys {
        /// Endpoint: `http(s)://host:port/path`.
        pub url: Option<String>,
    }
}

sink_config! {
    /// An HTTP sink's keys, as written.
    pub struct HttpConfig {
        /// Its own keys.
        pub keys: HttpKeys,
        /// Bearer token.
        pub token: TokenConfig,
    }
}

/// Where an HTTP sink delivers, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    /// Endpoint, `http(s)://host:port/path`.
    pub url: String,
    /// Bearer token.
    pub token: Option<Secret>,
}

impl HttpConfig {
    /// Validates the keys.
    pub fn validate(&self, ctx: &Ctx<'_>, problems: &mut Vec<Problem>) -> Option<HttpSettings> {
        let c = &self.keys;
        let u = url(
            c.url.as_deref(),
            SinkKind::Http,
            &["http", "https"],
            80,
            problems,
        );
        let token = self.token.validate(ctx, problems);
        if u.as_ref()
            .is_some_and(|u| u.password.is_some() || u.user.is_some())
        {
            problems.push((
                "url".into(),
                "put credentials in `token_env`, not in the URL".into(),
            ));
        }
        u?;
        Some(HttpSettings {
            url: c.url.clone()?,
            token,
        })
    }
}
