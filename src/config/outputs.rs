//! `[[output]]`: annotated video out of a running pipeline (see [`crate::outputs`]).
//!
//! ```toml
//! [[output]]
//! type = "jpeg"             # "jpeg" snapshots, "file" (MP4 recordings) or "rtsp"
//! streams = ["gate"]        # default: every stream
//! folder = "snapshots"      # jpeg and file
//! every_s = 10              # jpeg: one per stream every 10 s ...
//! classes = ["person"]      # ... and/or when a result has one of these classes
//! # text = true             # ... or when text was recognised
//! draw = ["boxes", "labels", "text", "classes", "header"]
//! colors = ["#ff3838", "#48f90a"]   # by class id; text boxes take the first
//! font_px = 14
//! ```

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::SourceSpec;
use super::load::Validator;

/// What an output makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// JPEG snapshots in a folder.
    Jpeg,
    /// MP4 recordings in a folder, rotated by duration or size.
    File,
    /// An H.264 stream served over RTSP.
    Rtsp,
}

impl OutputKind {
    /// The name in a pipeline file.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::Jpeg => "jpeg",
            OutputKind::File => "file",
            OutputKind::Rtsp => "rtsp",
        }
    }
}

/// What the display draws (all by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrawItem {
    /// Box outlines.
    Boxes,
    /// Each box's label, score and track id.
    Labels,
    /// Recognised text.
    Text,
    /// A classifier's top class.
    Classes,
    /// The stream, frame number and time in stages.
    Header,
}

/// One `[[output]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OutputConfig {
    #[serde(rename = "type")]
    kind: OutputKind,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    streams: Option<Vec<String>>,
    #[serde(default)]
    folder: Option<PathBuf>,
    #[serde(default)]
    every_s: Option<f64>,
    #[serde(default)]
    classes: Option<Vec<String>>,
    #[serde(default)]
    text: Option<bool>,
    #[serde(default)]
    quality: Option<u32>,
    #[serde(default)]
    segment_s: Option<f64>,
    #[serde(default)]
    max_mb: Option<u64>,
    #[serde(default)]
    bitrate_kbps: Option<u32>,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    draw: Option<Vec<DrawItem>>,
    #[serde(default)]
    colors: Option<Vec<String>>,
    #[serde(default)]
    font_px: Option<f32>,
    #[serde(default)]
    thickness: Option<u32>,
    #[serde(default)]
    queue: Option<usize>,
}

/// When a `jpeg` output writes a snapshot of a stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotWhen {
    /// At most one per stream this often (None: only on a match).
    pub every: Option<Duration>,
    /// A result with a box or top class of one of these labels.
    pub classes: Vec<String>,
    /// A result with recognised text.
    pub text: bool,
}

/// A validated `[[output]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputSpec {
    /// Name (counters and logs).
    pub name: String,
    /// What it makes.
    pub kind: OutputKind,
    /// The streams it takes (empty: every stream, including ones added while running).
    pub streams: Vec<String>,
    /// Where `jpeg` and `file` write.
    pub folder: PathBuf,
    /// `jpeg`: when.
    pub when: SnapshotWhen,
    /// `jpeg`: quality 1..=100.
    pub quality: u8,
    /// `file`: a new file after this long.
    pub segment: Duration,
    /// `file`: a new file after this many bytes (0: no limit).
    pub max_bytes: u64,
    /// `file`, `rtsp`: H.264 bit rate.
    pub bitrate_kbps: u32,
    /// `rtsp`: the address and port the server listens on (each stream at `/NAME`).
    pub address: String,
    /// `rtsp`: port.
    pub port: u16,
    /// What is drawn.
    pub draw: Vec<DrawItem>,
    /// Colours of boxes and labels by class (class id modulo their number; text boxes take the
    /// first, recognised text the second); empty: the display's own.
    pub colors: Vec<[u8; 3]>,
    /// Label text height, pixels.
    pub font_px: f32,
    /// Box outline thickness, pixels.
    pub thickness: u32,
    /// Frames that may wait for the output; beyond them its frames are dropped (and counted).
    pub queue: usize,
}

impl OutputSpec {
    /// Whether it takes frames of `stream`.
    pub fn takes(&self, stream: &str) -> bool {
        self.streams.is_empty() || self.streams.iter().any(|s| s == stream)
    }
}

impl Validator<'_, '_> {
    /// The `[[output]]` tables: keys that apply to the kind, streams that exist, values in range.
    pub(super) fn outputs(&mut self, sources: Option<&[SourceSpec]>) -> Option<Vec<OutputSpec>> {
        let mut out = Vec::new();
        let mut ok = true;
        let mut seen = HashSet::new();
        let mut rtsp_ports: HashSet<(String, u16)> = HashSet::new();
        let mut of_kind: std::collections::HashMap<OutputKind, usize> = Default::default();
        for (base, value) in self.items_optional("output") {
            let Some(c) = self.part::<OutputConfig>(&base, value) else {
                ok = false;
                continue;
            };
            let errors = self.errors.len();
            let kind = c.kind;
            let n = of_kind.entry(kind).or_default();
            *n += 1;
            let name = c.name.clone().unwrap_or_else(|| {
                if *n == 1 {
                    kind.as_str().to_string()
                } else {
                    format!("{}-{n}", kind.as_str())
                }
            });
            self.check_name(&format!("{base}.name"), &name, &mut seen, "output");
            let streams = c.streams.clone().unwrap_or_default();
            if let Some(sources) = sources {
                for s in &streams {
                    if !sources.iter().any(|x| &x.name == s) {
                        let have: Vec<&str> = sources.iter().map(|x| x.name.as_str()).collect();
                        self.err(
                            &format!("{base}.streams"),
                            format!(
                                "no stream named `{s}`; the file's streams are: {}",
                                have.join(", ")
                            ),
                        );
                    }
                }
            }
            // Keys that belong to another kind.
            fn only(key: &'static str, kinds: &[OutputKind]) -> (&'static str, Vec<OutputKind>) {
                (key, kinds.to_vec())
            }
            let applies = [
                only("folder", &[OutputKind::Jpeg, OutputKind::File]),
                only("every_s", &[OutputKind::Jpeg]),
                only("classes", &[OutputKind::Jpeg]),
                only("text", &[OutputKind::Jpeg]),
                only("quality", &[OutputKind::Jpeg]),
                only("segment_s", &[OutputKind::File]),
                only("max_mb", &[OutputKind::File]),
                only("bitrate_kbps", &[OutputKind::File, OutputKind::Rtsp]),
                only("address", &[OutputKind::Rtsp]),
                only("port", &[OutputKind::Rtsp]),
            ];
            for (key, kinds) in applies {
                if self.has(&format!("{base}.{key}")) && !kinds.contains(&kind) {
                    self.err(
                        &format!("{base}.{key}"),
                        format!("`{key}` does not apply to a `{}` output", kind.as_str()),
                    );
                }
            }
            let folder = match (&c.folder, kind) {
                (Some(f), _) => self.resolve(f),
                (None, OutputKind::Rtsp) => PathBuf::new(),
                (None, _) => {
                    self.err(
                        &base,
                        format!(
                            "a `{}` output needs `folder` (where it writes)",
                            kind.as_str()
                        ),
                    );
                    PathBuf::new()
                }
            };
            let every = match c.every_s {
                Some(s) if !(s.is_finite() && s > 0.0 && s <= 86_400.0) => {
                    self.err(
                        &format!("{base}.every_s"),
                        format!("{s}: expected seconds in (0, 86400]"),
                    );
                    None
                }
                Some(s) => Some(Duration::from_secs_f64(s)),
                None => None,
            };
            let when = SnapshotWhen {
                every,
                classes: c.classes.clone().unwrap_or_default(),
                text: c.text.unwrap_or(false),
            };
            if kind == OutputKind::Jpeg
                && when.every.is_none()
                && when.classes.is_empty()
                && !when.text
            {
                self.err(
                    &base,
                    "a `jpeg` output needs `every_s`, `classes` or `text = true` (when to write a snapshot)",
                );
            }
            let quality = c.quality.unwrap_or(85);
            if !(1..=100).contains(&quality) {
                self.err(
                    &format!("{base}.quality"),
                    format!("{quality}: expected 1..=100"),
                );
            }
            let segment_s = c.segment_s.unwrap_or(300.0);
            if !(segment_s.is_finite() && (1.0..=86_400.0).contains(&segment_s)) {
                self.err(
                    &format!("{base}.segment_s"),
                    format!("{segment_s}: expected seconds in [1, 86400]"),
                );
            }
            let bitrate_kbps = c.bitrate_kbps.unwrap_or(2000);
            if !(100..=100_000).contains(&bitrate_kbps) {
                self.err(
                    &format!("{base}.bitrate_kbps"),
                    format!("{bitrate_kbps}: expected 100..=100000"),
                );
            }
            let address = c.address.clone().unwrap_or_else(|| "127.0.0.1".into());
            let port = c.port.unwrap_or(8554);
            if kind == OutputKind::Rtsp {
                if address.parse::<std::net::IpAddr>().is_err() {
                    self.err(
                        &format!("{base}.address"),
                        format!("`{address}` is not an IP address"),
                    );
                }
                if port == 0 || !rtsp_ports.insert((address.clone(), port)) {
                    self.err(
                        &format!("{base}.port"),
                        format!("port {port}: expected a port no other `rtsp` output uses"),
                    );
                }
            }
            let mut colors = Vec::new();
            for c in c.colors.iter().flatten() {
                match parse_color(c) {
                    Some(rgb) => colors.push(rgb),
                    None => self.err(
                        &format!("{base}.colors"),
                        format!("`{c}` is not a colour: expected \"#RRGGBB\""),
                    ),
                }
            }
            let font_px = c.font_px.unwrap_or(14.0);
            if !(font_px.is_finite() && (6.0..=200.0).contains(&font_px)) {
                self.err(
                    &format!("{base}.font_px"),
                    format!("{font_px}: expected 6..=200 pixels"),
                );
            }
            let thickness = c.thickness.unwrap_or(2);
            if !(1..=50).contains(&thickness) {
                self.err(
                    &format!("{base}.thickness"),
                    format!("{thickness}: expected 1..=50 pixels"),
                );
            }
            let queue = c.queue.unwrap_or(8);
            if !(1..=1024).contains(&queue) {
                self.err(
                    &format!("{base}.queue"),
                    format!("{queue}: expected 1..=1024 frames"),
                );
            }
            if self.errors.len() > errors {
                ok = false;
                continue;
            }
            out.push(OutputSpec {
                name,
                kind,
                streams,
                folder,
                when,
                quality: quality as u8,
                segment: Duration::from_secs_f64(segment_s),
                max_bytes: c.max_mb.unwrap_or(0) * 1_000_000,
                bitrate_kbps,
                address,
                port,
                draw: c.draw.clone().unwrap_or_else(|| {
                    vec![
                        DrawItem::Boxes,
                        DrawItem::Labels,
                        DrawItem::Text,
                        DrawItem::Classes,
                        DrawItem::Header,
                    ]
                }),
                colors,
                font_px,
                thickness,
                queue,
            });
        }
        ok.then_some(out)
    }
}

/// `#RRGGBB` as RGB.
fn parse_color(s: &str) -> Option<[u8; 3]> {
    let hex = s.strip_prefix('#').filter(|h| h.len() == 6)?;
    let byte = |i: usize| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok();
    Some([byte(0)?, byte(2)?, byte(4)?])
}

#[cfg(test)]
mod tests {
    use super::parse_color;

    #[test]
    fn colours_are_hex_triplets() {
        assert_eq!(parse_color("#ff3800"), Some([255, 56, 0]));
        assert_eq!(parse_color("#FF3800"), Some([255, 56, 0]));
        assert_eq!(parse_color("ff3800"), None);
        assert_eq!(parse_color("#ff380"), None);
        assert_eq!(parse_color("#gg3800"), None);
    }
}
