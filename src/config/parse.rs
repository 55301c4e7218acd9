//! Reading TOML files into diagnostics-aware documents: the parsed file with the spans of its
//! keys, one component deserialised with errors that name the key, and reading a file with an
//! error that names what it was meant to be. Pipeline files and model manifests share these.

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::diag::{ConfigErrors, Diagnostic, SourceText, SpanIndex};

/// A parsed TOML file with the spans of its keys.
pub(crate) struct ParsedFile<'a> {
    /// Path and text, for positions.
    pub src: SourceText<'a>,
    /// The document.
    pub table: Spanned<DeTable<'a>>,
    /// Spans of every key.
    pub index: SpanIndex,
}

impl<'a> ParsedFile<'a> {
    /// Parses `text`; syntax errors are all reported (the parser recovers where it can).
    pub fn parse(path: &'a Path, text: &'a str) -> Result<Self, ConfigErrors> {
        let src = SourceText { path, text };
        let (table, errors) = DeTable::parse_recoverable(text);
        if !errors.is_empty() {
            return Err(ConfigErrors(
                errors
                    .iter()
                    .map(|e| src.diag(e.span(), "", format!("TOML syntax: {}", e.message().trim())))
                    .collect(),
            ));
        }
        let index = SpanIndex::build(table.get_ref());
        Ok(Self { src, table, index })
    }

    /// The whole document as a value.
    pub fn root_value(&self) -> Spanned<DeValue<'a>> {
        Spanned::new(
            self.table.span(),
            DeValue::Table(self.table.get_ref().clone()),
        )
    }

    /// A diagnostic for the value at `key` (or the nearest enclosing key the file has).
    pub fn diag_at(&self, key: &str, message: impl Into<String>) -> Diagnostic {
        // A key the file does not have (a missing section) is reported at the top of the file.
        self.src
            .diag(self.index.nearest_span(key).or(Some(0..0)), key, message)
    }
}

/// Deserialises one component, turning a serde error into a diagnostic that names the key.
pub(crate) fn deserialize_part<'a, T: Deserialize<'a>>(
    parsed: &ParsedFile<'a>,
    base: &str,
    value: Spanned<DeValue<'a>>,
) -> Result<T, Diagnostic> {
    let whole = value.span();
    T::deserialize(ValueDeserializer::from(value)).map_err(|e| {
        let span = e.span().unwrap_or(whole);
        let key = parsed.index.path_at(&span).unwrap_or(base).to_string();
        parsed
            .src
            .diag(Some(span), key, clean_serde_message(e.message()))
    })
}

/// serde's messages say `variant` and `field`; users wrote values and keys.
fn clean_serde_message(m: &str) -> String {
    m.trim()
        .replace("unknown variant", "unknown value")
        .replace("unknown field", "unknown key")
        .replace("missing field", "missing key")
}

/// Reads a config file; failure is a diagnostic naming `what` the file was meant to be.
pub(crate) fn read_config(path: &Path, what: &str) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Diagnostic {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read {what}: {e}"),
        }])
    })
}
