//! Diagnostics: errors in config files with file, line, column, key path and what was expected.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line (0 when the problem is not tied to a place, e.g. an unreadable file).
    pub line: usize,
    /// 1-based column in characters.
    pub column: usize,
    /// Dotted key path, e.g. `source[1].max_fps` (empty for the whole file).
    pub key: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found while loading a config, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<Diagnostic>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// The text of one config file, for turning byte offsets into lines and columns and for finding
/// which key a span belongs to.
pub struct SourceText<'a> {
    /// Path shown in diagnostics.
    pub path: &'a Path,
    /// The whole file.
    pub text: &'a str,
}

impl SourceText<'_> {
    /// 1-based (line, column) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// A diagnostic at `span`.
    pub fn diag(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, column) = span.map_or((0, 0), |s| self.line_col(s.start));
        Diagnostic {
            file: self.path.to_path_buf(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Spans of every key in a parsed document, so that checks on typed config can point at the line
/// a value came from. Paths look like `pipeline.slo_ms` or `source[1].uri`.
#[derive(Debug, Default)]
pub struct SpanIndex {
    /// (path, span of the key, span of the value), in document order.
    entries: Vec<(String, Range<usize>, Range<usize>)>,
}

impl SpanIndex {
    /// Indexes every key of `table`.
    pub fn build(table: &DeTable<'_>) -> Self {
        let mut idx = SpanIndex::default();
        idx.add_table("", table);
        idx
    }

    fn add_table(&mut self, prefix: &str, table: &DeTable<'_>) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            self.entries.push((path.clone(), k.span(), v.span()));
            self.add_value(&path, v);
        }
    }

    fn add_value(&mut self, path: &str, v: &Spanned<DeValue<'_>>) {
        match v.get_ref() {
            DeValue::Table(t) => self.add_table(path, t),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    self.entries.push((p.clone(), item.span(), item.span()));
                    self.add_value(&p, item);
                }
            }
            _ => {}
        }
    }

    /// Span of the value at `path`, if the file has it.
    pub fn value_span(&self, path: &str) -> Option<Range<usize>> {
        self.entries
            .iter()
            .find(|e| e.0 == path)
            .map(|e| e.2.clone())
    }

    /// Span of the value at `path`, or of the nearest enclosing key that the file has (a value
    /// that took its default has no place of its own).
    pub fn nearest_span(&self, path: &str) -> Option<Range<usize>> {
        let mut p = path;
        loop {
            if let Some(s) = self.value_span(p) {
                return Some(s);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }

    /// The deepest key whose key or value span contains `span` (to name the key of a serde error).
    pub fn path_at(&self, span: &Range<usize>) -> Option<&str> {
        self.entries
            .iter()
            .filter(|(_, ks, vs)| {
                (ks.start <= span.start && span.end <= ks.end)
                    || (vs.start <= span.start && span.end <= vs.end)
            })
            .max_by_key(|(p, _, _)| p.len())
            .map(|(p, _, _)| p.as_str())
    }
}
