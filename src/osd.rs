//! On-screen display: a frame's results drawn on a copy of its image (boxes with labels and
//! scores, recognised text, a classifier's top class, track ids) under a header line with the
//! stream, the capture time and the frame's latency. Pure: a canvas in, pixels out; the font is
//! the system's DejaVu Sans (installed by the setup), and without it boxes are still drawn.

use std::sync::OnceLock;

use ab_glyph::{Font, FontVec, PxScale, ScaleFont, point};

use crate::frame::{BBox, Image, PixelFormat, StageOutput};

/// Where the font is looked for, in order.
pub const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// The system font, loaded once (None when none of [`FONT_PATHS`] reads).
pub fn system_font() -> Option<&'static FontVec> {
    static FONT: OnceLock<Option<FontVec>> = OnceLock::new();
    FONT.get_or_init(|| {
        FONT_PATHS
            .iter()
            .find_map(|p| FontVec::try_from_vec(std::fs::read(p).ok()?).ok())
    })
    .as_ref()
}

/// What the display's header says of a published frame besides the frame itself.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Overlay {
    /// Capture to publication, milliseconds.
    pub e2e_ms: f64,
    /// The stream's share of frames on time so far (0..=1), when known.
    pub attainment: Option<f64>,
}

/// The header line of a frame of `stream`: its name, number, capture time (UTC), end-to-end
/// latency and the stream's SLO attainment so far.
pub fn header(stream: &str, f: &crate::frame::Frame, o: &Overlay) -> String {
    let at = crate::sinks::rfc3339_millis(f.captured_wall);
    // `2026-12-03T08:15:01.234Z` -> `08:15:01.234`
    let time = at.get(11..23).unwrap_or(&at);
    let mut h = format!("{stream}  #{}  {time} UTC  {:.0} ms", f.seq, o.e2e_ms);
    if let Some(a) = o.attainment {
        h.push_str(&format!("  SLO {:.1}%", 100.0 * a));
    }
    h
}

/// An RGB picture to draw on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canvas {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `height * width * 3` bytes, RGB, row-major.
    pub data: Vec<u8>,
}

/// RGB.
pub type Color = [u8; 3];

/// What to draw and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Style {
    /// Box outline thickness, pixels.
    pub thickness: u32,
    /// Label text height, pixels.
    pub font_px: f32,
    /// Colours by class (class id modulo their number); text boxes take the first.
    pub palette: Vec<Color>,
    /// Draw the header line.
    pub header: bool,
}

impl Default for Style {
    fn default() -> Self {
        Style {
            thickness: 2,
            font_px: 14.0,
            palette: vec![
                [255, 56, 56],
                [72, 249, 10],
                [0, 194, 255],
                [255, 178, 29],
                [207, 210, 49],
                [146, 204, 23],
                [61, 219, 134],
                [132, 56, 255],
            ],
            header: true,
        }
    }
}

/// One thing to draw: a box (when there is one) and its label.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// Where, in image pixels (None: a label for the whole frame, such as a class).
    pub bbox: Option<BBox>,
    /// The label.
    pub label: String,
    /// Palette index.
    pub color: usize,
}

/// Which results are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Show {
    /// Boxes of objects and of text.
    pub boxes: bool,
    /// Each object's label, score and track id.
    pub labels: bool,
    /// Recognised text.
    pub text: bool,
    /// The top class of classifiers and recurrent cells.
    pub classes: bool,
}

impl Show {
    /// Everything.
    pub const ALL: Show = Show {
        boxes: true,
        labels: true,
        text: true,
        classes: true,
    };
}

/// The marks of a frame's stage outputs: objects (`label 0.87 #12`), text boxes, recognised
/// text, the top class of classifiers and recurrent cells.
pub fn marks(outputs: &[StageOutput]) -> Vec<Mark> {
    marks_with(outputs, Show::ALL)
}

/// The marks of what `show` names.
pub fn marks_with(outputs: &[StageOutput], show: Show) -> Vec<Mark> {
    let mut out = Vec::new();
    for o in outputs {
        match o {
            StageOutput::Objects(objs) if show.boxes => out.extend(objs.iter().map(|ob| Mark {
                bbox: Some(ob.bbox),
                label: match (show.labels, ob.track_id) {
                    (false, _) => String::new(),
                    (true, Some(id)) => format!("{} {:.2} #{id}", ob.label, ob.score),
                    (true, None) => format!("{} {:.2}", ob.label, ob.score),
                },
                color: ob.class_id,
            })),
            StageOutput::TextBoxes(b) if show.boxes => out.extend(b.iter().map(|t| Mark {
                bbox: Some(t.bbox),
                label: String::new(),
                color: 0,
            })),
            StageOutput::Texts(lines) if show.text => out.extend(lines.iter().map(|t| Mark {
                bbox: Some(t.bbox),
                label: t.text.clone(),
                color: 1,
            })),
            StageOutput::Classes(c) if show.classes => out.extend(c.first().map(|c| Mark {
                bbox: None,
                label: format!("{} {:.2}", c.label, c.score),
                color: c.id,
            })),
            StageOutput::State(s) if show.classes => out.extend(s.top.as_ref().map(|c| Mark {
                bbox: None,
                label: format!("{} {:.2}", c.label, c.score),
                color: c.id,
            })),
            _ => {}
        }
    }
    out
}

impl Canvas {
    /// A copy of a frame's image, as RGB.
    pub fn from_image(img: &Image) -> Canvas {
        let mut data = img.data.as_ref().as_ref().to_vec();
        if img.format == PixelFormat::BGR {
            for px in data.chunks_exact_mut(3) {
                px.swap(0, 2);
            }
        }
        Canvas {
            width: img.width,
            height: img.height,
            data,
        }
    }

    /// A canvas of one colour.
    pub fn filled(width: u32, height: u32, color: Color) -> Canvas {
        Canvas {
            width,
            height,
            data: color
                .iter()
                .copied()
                .cycle()
                .take(width as usize * height as usize * 3)
                .collect(),
        }
    }

    /// The pixel at `(x, y)`.
    pub fn pixel(&self, x: u32, y: u32) -> Color {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    /// Blends `color` into `(x, y)` with opacity `a` (pixels outside are ignored).
    fn blend(&mut self, x: i64, y: i64, color: Color, a: f32) {
        if x < 0 || y < 0 || x >= i64::from(self.width) || y >= i64::from(self.height) {
            return;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        let a = a.clamp(0.0, 1.0);
        for (k, c) in color.iter().enumerate() {
            let old = f32::from(self.data[i + k]);
            self.data[i + k] = (old + (f32::from(*c) - old) * a).round() as u8;
        }
    }

    /// Fills `[x0, x1) x [y0, y1)`, clipped to the canvas.
    pub fn fill(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: Color) {
        let (x0, x1) = (x0.max(0), x1.min(i64::from(self.width)));
        let (y0, y1) = (y0.max(0), y1.min(i64::from(self.height)));
        for y in y0..y1 {
            for x in x0..x1 {
                self.blend(x, y, color, 1.0);
            }
        }
    }

    /// The outline of `bbox`, `thickness` pixels inwards from its edges, clipped.
    pub fn rect(&mut self, bbox: &BBox, thickness: u32, color: Color) {
        let x0 = bbox.x.round() as i64;
        let y0 = bbox.y.round() as i64;
        let x1 = (bbox.x + bbox.w).round() as i64;
        let y1 = (bbox.y + bbox.h).round() as i64;
        let t = i64::from(thickness.max(1));
        self.fill(x0, y0, x1, (y0 + t).min(y1), color);
        self.fill(x0, (y1 - t).max(y0), x1, y1, color);
        self.fill(x0, y0, (x0 + t).min(x1), y1, color);
        self.fill((x1 - t).max(x0), y0, x1, y1, color);
    }

    /// Width in pixels of `text` at `px`.
    pub fn text_width(font: &FontVec, px: f32, text: &str) -> f32 {
        let f = font.as_scaled(PxScale::from(px));
        text.chars().map(|c| f.h_advance(f.glyph_id(c))).sum()
    }

    /// Writes `text` with its top-left corner at `(x, y)`, `px` high.
    pub fn text(&mut self, font: &FontVec, px: f32, x: f32, y: f32, text: &str, color: Color) {
        let scaled = font.as_scaled(PxScale::from(px));
        let mut caret = x;
        let baseline = y + scaled.ascent();
        for c in text.chars() {
            let id = scaled.glyph_id(c);
            let glyph = id.with_scale_and_position(PxScale::from(px), point(caret, baseline));
            caret += scaled.h_advance(id);
            if let Some(outline) = font.outline_glyph(glyph) {
                let b = outline.px_bounds();
                outline.draw(|gx, gy, cov| {
                    self.blend(
                        b.min.x as i64 + i64::from(gx),
                        b.min.y as i64 + i64::from(gy),
                        color,
                        cov,
                    );
                });
            }
        }
    }

    /// A label on a filled band: white text on `color`, at `(x, y)` (moved inside the canvas).
    fn label(&mut self, font: &FontVec, px: f32, x: f32, y: f32, text: &str, color: Color) {
        let w = Self::text_width(font, px, text) + 4.0;
        let h = px + 4.0;
        let x = x.min(self.width as f32 - w).max(0.0);
        let y = y.min(self.height as f32 - h).max(0.0);
        self.fill(x as i64, y as i64, (x + w) as i64, (y + h) as i64, color);
        self.text(font, px, x + 2.0, y + 2.0, text, [255, 255, 255]);
    }

    /// Draws `marks` and, with `style.header`, the `header` line at the top.
    pub fn draw(&mut self, marks: &[Mark], header: &str, style: &Style, font: Option<&FontVec>) {
        let pick = |i: usize| style.palette[i % style.palette.len().max(1)];
        let mut whole = Vec::new();
        for m in marks {
            let color = pick(m.color);
            match &m.bbox {
                Some(b) => {
                    self.rect(b, style.thickness, color);
                    if let (Some(f), false) = (font, m.label.is_empty()) {
                        // Above the box when there is room, else inside its top.
                        let y = if b.y >= style.font_px + 4.0 {
                            b.y - style.font_px - 4.0
                        } else {
                            b.y
                        };
                        self.label(f, style.font_px, b.x, y, &m.label, color);
                    }
                }
                None => whole.push((m.label.as_str(), color)),
            }
        }
        let Some(f) = font else { return };
        let mut y = 0.0;
        if style.header && !header.is_empty() {
            self.label(f, style.font_px, 0.0, 0.0, header, [0, 0, 0]);
            y += style.font_px + 4.0;
        }
        for (text, color) in whole {
            self.label(f, style.font_px, 0.0, y, text, color);
            y += style.font_px + 4.0;
        }
    }

    /// The canvas as a JPEG of this quality (1..=100).
    pub fn jpeg(&self, quality: u8) -> Result<Vec<u8>, image::ImageError> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
            .encode(&self.data, self.width, self.height, image::ColorType::Rgb8)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RED: Color = [255, 0, 0];
    const GREY: Color = [40, 40, 40];

    fn bbox(x: f32, y: f32, w: f32, h: f32) -> BBox {
        BBox { x, y, w, h }
    }

    #[test]
    fn a_box_outline_lands_on_its_edges_and_nowhere_else() {
        let mut c = Canvas::filled(40, 30, GREY);
        c.rect(&bbox(10.0, 5.0, 20.0, 10.0), 2, RED);
        // Edges: left column 10..12, right 28..30, top rows 5..7, bottom 13..15.
        for (x, y) in [
            (10, 5),
            (11, 10),
            (29, 10),
            (28, 14),
            (20, 5),
            (20, 6),
            (20, 13),
        ] {
            assert_eq!(c.pixel(x, y), RED, "({x}, {y})");
        }
        // Inside and outside stay.
        for (x, y) in [(20, 10), (12, 7), (9, 5), (30, 10), (20, 4), (20, 15)] {
            assert_eq!(c.pixel(x, y), GREY, "({x}, {y})");
        }
    }

    #[test]
    fn a_box_over_the_border_is_clipped() {
        let mut c = Canvas::filled(20, 20, GREY);
        c.rect(&bbox(-5.0, 15.0, 10.0, 10.0), 1, RED);
        // Its top edge at y = 15 from x = 0 to 4; its right edge at x = 4 down to the border.
        assert_eq!(c.pixel(0, 15), RED);
        assert_eq!(c.pixel(4, 19), RED);
        assert_eq!(c.pixel(5, 15), GREY);
        assert_eq!(c.data.len(), 20 * 20 * 3);
    }

    #[test]
    fn labels_write_text_and_bgr_frames_come_out_rgb() {
        let Some(font) = system_font() else {
            eprintln!("SKIPPED: no DejaVu Sans at {FONT_PATHS:?}");
            return;
        };
        let mut c = Canvas::filled(120, 60, GREY);
        let marks = vec![Mark {
            bbox: Some(bbox(10.0, 30.0, 50.0, 20.0)),
            label: "person 0.91".into(),
            color: 0,
        }];
        c.draw(&marks, "cam-1 12:00:00", &Style::default(), Some(font));
        // The label band above the box holds the palette colour and white glyph pixels.
        let band: Vec<Color> = (12..28)
            .flat_map(|y| (10..60).map(move |x| (x, y)))
            .map(|(x, y)| c.pixel(x, y))
            .collect();
        assert!(band.contains(&[255, 56, 56]), "label background");
        assert!(
            band.iter().any(|p| p.iter().all(|v| *v > 200)),
            "white text pixels"
        );
        // The header band at the top is black with text.
        assert_eq!(c.pixel(0, 0), [0, 0, 0]);
        let img = Image {
            width: 1,
            height: 1,
            format: PixelFormat::BGR,
            data: Box::new(vec![1u8, 2, 3]),
        };
        assert_eq!(Canvas::from_image(&img).data, vec![3, 2, 1]);
        let jpeg = c.jpeg(80).unwrap();
        assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
    }
}
