//! Topic, subject and key templates: literal text with `{field}` placeholders, e.g.
//! `cameras/{stream}/text`. Fields: `pipeline`, `stream`, and in event topics `rule`. `{{` and
//! `}}` are literal braces.

/// Template fields.
pub const FIELDS: [&str; 3] = ["pipeline", "stream", "rule"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Pipeline,
    Stream,
    Rule,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

impl Template {
    /// Parses `s`; unknown fields and unbalanced braces are errors.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty template".into());
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '{' => {
                    let mut field = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => field.push(c),
                            None => return Err(format!("unclosed `{{` in template `{s}`")),
                        }
                    }
                    let part = match field.as_str() {
                        "pipeline" => Part::Pipeline,
                        "stream" => Part::Stream,
                        "rule" => Part::Rule,
                        _ => {
                            return Err(format!(
                                "unknown template field `{{{field}}}` in `{s}`; fields: {}",
                                FIELDS.map(|f| format!("{{{f}}}")).join(", ")
                            ));
                        }
                    };
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(part);
                }
                '}' => return Err(format!("unmatched `}}` in template `{s}`")),
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Self {
            source: s.to_string(),
            parts,
        })
    }

    /// The literal text, without fields (for checking characters a broker forbids).
    pub fn literal_text(&self) -> String {
        self.parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Whether the template has no fields.
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// Whether the template uses `{rule}` (only event topics may).
    pub fn uses_rule(&self) -> bool {
        self.parts.contains(&Part::Rule)
    }

    /// The template with every field replaced by `wildcard` (e.g. NATS `*`).
    pub fn with_wildcards(&self, wildcard: &str) -> String {
        self.render_event(wildcard, wildcard, wildcard)
    }

    /// Fills in the fields of a result's topic.
    pub fn render(&self, pipeline: &str, stream: &str) -> String {
        self.render_event(pipeline, stream, "")
    }

    /// Fills in the fields of an event's topic.
    pub fn render_event(&self, pipeline: &str, stream: &str, rule: &str) -> String {
        let mut out = String::with_capacity(self.source.len() + stream.len() + rule.len());
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Pipeline => out.push_str(pipeline),
                Part::Stream => out.push_str(stream),
                Part::Rule => out.push_str(rule),
            }
        }
        out
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_and_escapes() {
        let t = Template::parse("cameras/{stream}/{pipeline}/{{x}}").unwrap();
        assert_eq!(t.render("ocr", "gate"), "cameras/gate/ocr/{x}");
        assert_eq!(t.with_wildcards("*"), "cameras/*/*/{x}");
        assert_eq!(t.literal_text(), "cameras///{x}");
        assert!(!t.is_constant());
        assert!(Template::parse("plain").unwrap().is_constant());
        let e = Template::parse("events/{stream}/{rule}").unwrap();
        assert!(e.uses_rule() && !t.uses_rule());
        assert_eq!(e.render_event("p", "gate", "line-1"), "events/gate/line-1");
    }

    #[test]
    fn refuses_unknown_fields_and_bad_braces() {
        let e = Template::parse("a/{camera}").unwrap_err();
        assert!(e.contains("unknown template field `{camera}`"), "{e}");
        assert!(e.contains("{stream}"), "{e}");
        assert!(Template::parse("a/{stream").is_err());
        assert!(Template::parse("a/}").is_err());
        assert!(Template::parse("").is_err());
    }
}
