//! `poolpipe bench osd`: what drawing a frame's results costs, per frame, on the CPU: a copy of
//! a 768x576 frame (the bundled sample's size) with 12 labelled boxes, a class line and the
//! header ([`crate::osd`]), and the same encoded as a JPEG (what a snapshot or an MJPEG preview
//! sends).

use std::time::Instant;

use serde::Serialize;

use crate::frame::{BBox, Class, Image, Object, PixelFormat, StageOutput};
use crate::osd::{self, Canvas, Style};

/// Medians over the iterations, microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Frame size.
    pub width: u32,
    /// Frame size.
    pub height: u32,
    /// Boxes drawn.
    pub boxes: usize,
    /// Iterations.
    pub iterations: usize,
    /// Whether text was drawn (the system font was found).
    pub text: bool,
    /// Copy of the frame as RGB.
    pub copy_us: f64,
    /// Copy and draw.
    pub draw_us: f64,
    /// Copy, draw and encode as JPEG (quality 85).
    pub jpeg_us: f64,
    /// JPEG size, bytes.
    pub jpeg_bytes: usize,
}

/// Runs the measurement.
pub fn run(iterations: usize) -> anyhow::Result<Report> {
    let (w, h) = (768u32, 576u32);
    // A gradient, so that the encoder has something to encode.
    let data: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [(x % 256) as u8, (y % 256) as u8, 128]))
        .collect();
    let image = Image {
        width: w,
        height: h,
        format: PixelFormat::BGR,
        data: Box::new(data),
    };
    let objects: Vec<Object> = (0..12)
        .map(|i| Object {
            label: "person".into(),
            class_id: i % 3,
            score: 0.9,
            bbox: BBox {
                x: 30.0 + 55.0 * i as f32,
                y: 150.0 + 10.0 * i as f32,
                w: 40.0,
                h: 110.0,
            },
            track_id: Some(i as u64),
        })
        .collect();
    let outputs = vec![
        StageOutput::Objects(objects),
        StageOutput::Classes(vec![Class {
            id: 3,
            label: "street".into(),
            score: 0.8,
        }]),
    ];
    let font = osd::system_font();
    let style = Style::default();
    let (mut copy, mut draw, mut jpeg) = (Vec::new(), Vec::new(), Vec::new());
    let mut bytes = 0;
    for _ in 0..iterations.max(1) {
        let t = Instant::now();
        let c = Canvas::from_image(&image);
        copy.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(&c);
        let drawn = || {
            let mut c = Canvas::from_image(&image);
            let header = "cam #1  12.0 ms in stages";
            c.draw(&osd::marks(&outputs), header, &style, font);
            c
        };
        let t = Instant::now();
        std::hint::black_box(drawn());
        draw.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let j = drawn().jpeg(85)?;
        jpeg.push(t.elapsed().as_secs_f64() * 1e6);
        bytes = j.len();
    }
    Ok(Report {
        width: w,
        height: h,
        boxes: 12,
        iterations: iterations.max(1),
        text: font.is_some(),
        copy_us: super::median_of(&copy).unwrap_or(0.0),
        draw_us: super::median_of(&draw).unwrap_or(0.0),
        jpeg_us: super::median_of(&jpeg).unwrap_or(0.0),
        jpeg_bytes: bytes,
    })
}

impl Report {
    /// The table.
    pub fn table(&self) -> String {
        format!(
            "on-screen display, {}x{} frame, {} labelled boxes{}, median of {}:\n  copy as RGB      {:>9.1} us\n  copy + draw      {:>9.1} us\n  + JPEG (q 85)    {:>9.1} us  ({} bytes)\n",
            self.width,
            self.height,
            self.boxes,
            if self.text {
                ""
            } else {
                " (no font: boxes only)"
            },
            self.iterations,
            self.copy_us,
            self.draw_us,
            self.jpeg_us,
            self.jpeg_bytes
        )
    }
}
