//! `[[sink]] type = "jsonl"`: its key, and its validation into [`JsonlSettings`].

use std::path::{Path, PathBuf};

use crate::sinks::settings::{Ctx, Problem, sink_config, sink_keys};

sink_keys! {
    /// The JSON lines sink's own keys.
    pub struct JsonlKeys {
        /// `-` for stdout (default), else a file path (created or truncated).
        pub path: Option<String>,
    }
}

sink_config! {
    /// A JSON lines sink's keys, as written.
    pub struct JsonlConfig {
        /// Its own keys.
        pub keys: JsonlKeys,
    }
}

/// Where a JSON lines sink writes, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonlSettings {
    /// Standard output.
    Stdout,
    /// A file.
    File(PathBuf),
}

impl JsonlConfig {
    /// Validates the keys: a file's folder must exist.
    pub fn validate(&self, ctx: &Ctx<'_>, problems: &mut Vec<Problem>) -> Option<JsonlSettings> {
        let path = self.keys.path.as_deref().unwrap_or("-");
        if path == "-" {
            return Some(JsonlSettings::Stdout);
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
            _ => Some(JsonlSettings::File(p)),
        }
    }
}
