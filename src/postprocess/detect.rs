//! Single-shot detectors: fitting frames to the input (letterbox or stretch), decoding the output
//! layouts of the YOLO families, class-aware non-maximum suppression, and boxes back in frame
//! pixels.

use ndarray::{ArrayView2, ArrayViewMut3};

use crate::config::{DetectFormat, ImageSpec, Layout, Resize};
use crate::frame::{BBox, Image};

/// How a frame maps onto the model input: input = frame x scale + offset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// Frame size.
    pub src: (u32, u32),
    /// Input size.
    pub dst: (u32, u32),
    /// Horizontal and vertical scale (equal for a letterbox).
    pub scale: (f32, f32),
    /// Where the scaled frame starts in the input.
    pub offset: (u32, u32),
    /// Size of the scaled frame in the input.
    pub inner: (u32, u32),
}

impl Fit {
    /// The fit of a `src` frame into a `dst` input.
    pub fn new(src: (u32, u32), dst: (u32, u32), resize: Resize) -> Self {
        let (sw, sh) = (src.0.max(1) as f32, src.1.max(1) as f32);
        match resize {
            Resize::Stretch => Self {
                src,
                dst,
                scale: (dst.0 as f32 / sw, dst.1 as f32 / sh),
                offset: (0, 0),
                inner: dst,
            },
            Resize::Letterbox => {
                let s = (dst.0 as f32 / sw).min(dst.1 as f32 / sh);
                let inner = (
                    ((sw * s).round() as u32).clamp(1, dst.0),
                    ((sh * s).round() as u32).clamp(1, dst.1),
                );
                Self {
                    src,
                    dst,
                    // The scale actually applied, so that the inverse is exact at the edges.
                    scale: (inner.0 as f32 / sw, inner.1 as f32 / sh),
                    offset: ((dst.0 - inner.0) / 2, (dst.1 - inner.1) / 2),
                    inner,
                }
            }
        }
    }

    /// A point of the input in frame pixels (not clamped).
    pub fn to_frame(&self, x: f32, y: f32) -> (f32, f32) {
        (
            (x - self.offset.0 as f32) / self.scale.0,
            (y - self.offset.1 as f32) / self.scale.1,
        )
    }

    /// A point of the frame in input pixels.
    pub fn to_input(&self, x: f32, y: f32) -> (f32, f32) {
        (
            x * self.scale.0 + self.offset.0 as f32,
            y * self.scale.1 + self.offset.1 as f32,
        )
    }

    /// A box given by its corners in input pixels, in frame pixels, clipped to the frame.
    pub fn box_to_frame(&self, x0: f32, y0: f32, x1: f32, y1: f32) -> BBox {
        let (w, h) = (self.src.0 as f32, self.src.1 as f32);
        let (a, b) = self.to_frame(x0, y0);
        let (c, d) = self.to_frame(x1, y1);
        let (a, b) = (a.clamp(0.0, w), b.clamp(0.0, h));
        let (c, d) = (c.clamp(0.0, w), d.clamp(0.0, h));
        BBox {
            x: a,
            y: b,
            w: (c - a).max(0.0),
            h: (d - b).max(0.0),
        }
    }
}

/// Writes the frame, fitted (bilinear, half-pixel centres) and normalised as `spec` says, into
/// one batch slot (C, H, W or H, W, C); the rest of the slot is `pad` (a pixel value). The
/// channels are swapped when the frame's order is not the model's.
pub fn fill(img: &Image, fit: &Fit, spec: &ImageSpec, pad: f32, mut out: ArrayViewMut3<'_, f32>) {
    let (iw, ih) = (img.width as usize, img.height as usize);
    let (dw, dh) = (fit.dst.0 as usize, fit.dst.1 as usize);
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * spec.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| spec.mean[c] / spec.std[c]);
    let order: [usize; 3] = if img.format == spec.pixel_format {
        [0, 1, 2]
    } else {
        [2, 1, 0]
    };
    for c in 0..3 {
        let v = pad * scale[c] - shift[c];
        match spec.layout {
            Layout::NCHW => out.index_axis_mut(ndarray::Axis(0), c).fill(v),
            Layout::NHWC => out.index_axis_mut(ndarray::Axis(2), c).fill(v),
        }
    }
    if iw == 0 || ih == 0 {
        return;
    }
    let (nw, nh) = (fit.inner.0 as usize, fit.inner.1 as usize);
    let (ox, oy) = (fit.offset.0 as usize, fit.offset.1 as usize);
    let taps = |n: usize, src: usize| -> Vec<(usize, usize, f32)> {
        let step = src as f32 / n as f32;
        (0..n)
            .map(|i| {
                let f = ((i as f32 + 0.5) * step - 0.5).clamp(0.0, (src - 1) as f32);
                let a = f.floor() as usize;
                (a, (a + 1).min(src - 1), f - a as f32)
            })
            .collect()
    };
    let xs = taps(nw, iw);
    let ys = taps(nh, ih);
    let data = img.bytes();
    let mut row = vec![[0f32; 3]; nw];
    for (y, &(y0, y1, wy)) in ys.iter().enumerate() {
        let (r0, r1) = (&data[y0 * iw * 3..], &data[y1 * iw * 3..]);
        for (px, &(x0, x1, wx)) in row.iter_mut().zip(&xs) {
            for (c, v) in px.iter_mut().enumerate() {
                let sc = order[c];
                let top = r0[x0 * 3 + sc] as f32 * (1.0 - wx) + r0[x1 * 3 + sc] as f32 * wx;
                let bot = r1[x0 * 3 + sc] as f32 * (1.0 - wx) + r1[x1 * 3 + sc] as f32 * wx;
                *v = (top * (1.0 - wy) + bot * wy) * scale[c] - shift[c];
            }
        }
        match spec.layout {
            Layout::NCHW => {
                for c in 0..3 {
                    let mut dst = out.slice_mut(ndarray::s![c, oy + y, ox..ox + nw]);
                    for (d, px) in dst.iter_mut().zip(&row) {
                        *d = px[c];
                    }
                }
            }
            Layout::NHWC => {
                let mut dst = out.slice_mut(ndarray::s![oy + y, ox..ox + nw, ..]);
                for (mut d, px) in dst.outer_iter_mut().zip(&row) {
                    for c in 0..3 {
                        d[c] = px[c];
                    }
                }
            }
        }
    }
    debug_assert!(ox + nw <= dw && oy + nh <= dh);
}

/// A detection before suppression, corners in input pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Class index.
    pub class: usize,
    /// Score.
    pub score: f32,
    /// Left, top, right, bottom.
    pub corners: [f32; 4],
}

impl Candidate {
    /// Intersection over union with another candidate.
    pub fn iou(&self, o: &Candidate) -> f32 {
        crate::frame::iou(&self.corners, &o.corners)
    }
}

/// What decoding needs to know besides the tensor.
#[derive(Debug, Clone, Copy)]
pub struct Decode<'a> {
    /// Output layout.
    pub format: DetectFormat,
    /// Coordinates are fractions of the input size.
    pub normalized: bool,
    /// Input size (for normalized coordinates).
    pub input: (u32, u32),
    /// Lowest score kept.
    pub score: f32,
    /// Classes kept (indexed by class; empty: all).
    pub allowed: &'a [bool],
}

/// The candidates of one image's output: `[boxes, 5 + classes]` (`yolo`) or
/// `[4 + classes, boxes]` (`yolov8`). Each box takes its best class; boxes under the score, or
/// of a class not allowed, are left out.
pub fn decode(out: ArrayView2<'_, f32>, d: &Decode<'_>) -> Result<Vec<Candidate>, String> {
    let (boxes, attrs) = match d.format {
        DetectFormat::Yolo => (out.shape()[0], out.shape()[1]),
        DetectFormat::Yolov8 => (out.shape()[1], out.shape()[0]),
    };
    let first_class = match d.format {
        DetectFormat::Yolo => 5,
        DetectFormat::Yolov8 => 4,
    };
    if attrs <= first_class {
        return Err(format!(
            "output {:?} has no class scores for the `{:?}` layout",
            out.shape(),
            d.format
        ));
    }
    let at = |b: usize, a: usize| match d.format {
        DetectFormat::Yolo => out[[b, a]],
        DetectFormat::Yolov8 => out[[a, b]],
    };
    let (sx, sy) = if d.normalized {
        (d.input.0 as f32, d.input.1 as f32)
    } else {
        (1.0, 1.0)
    };
    let mut found = Vec::new();
    for b in 0..boxes {
        let obj = if d.format == DetectFormat::Yolo {
            let o = at(b, 4);
            if o < d.score {
                continue; // class scores are at most 1
            }
            o
        } else {
            1.0
        };
        let (mut best, mut best_score) = (0, f32::NEG_INFINITY);
        for c in 0..attrs - first_class {
            let v = at(b, first_class + c);
            if v > best_score {
                (best, best_score) = (c, v);
            }
        }
        let score = obj * best_score;
        // NaN scores fail too.
        if score.partial_cmp(&d.score).is_none_or(|o| o.is_lt())
            || (!d.allowed.is_empty() && !d.allowed.get(best).copied().unwrap_or(false))
        {
            continue;
        }
        let (cx, cy, w, h) = (at(b, 0) * sx, at(b, 1) * sy, at(b, 2) * sx, at(b, 3) * sy);
        found.push(Candidate {
            class: best,
            score,
            corners: [cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0],
        });
    }
    Ok(found)
}

/// Class-aware greedy non-maximum suppression: the best first; a candidate overlapping a kept one
/// of its class by more than `iou` is dropped. At most `max` are kept.
pub fn nms(mut c: Vec<Candidate>, iou: f32, max: usize) -> Vec<Candidate> {
    c.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Candidate> = Vec::new();
    for d in c {
        if kept.len() >= max {
            break;
        }
        if kept.iter().all(|k| k.class != d.class || k.iou(&d) <= iou) {
            kept.push(d);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::PixelFormat;
    use ndarray::{Array2, Array3};

    #[test]
    fn letterbox_round_trips_and_centres() {
        let fit = Fit::new((768, 576), (416, 416), Resize::Letterbox);
        assert_eq!(fit.inner, (416, 312));
        assert_eq!(fit.offset, (0, 52));
        for (x, y) in [(0.0, 0.0), (768.0, 576.0), (123.4, 456.7)] {
            let (a, b) = fit.to_input(x, y);
            let (c, d) = fit.to_frame(a, b);
            assert!(
                (c - x).abs() < 1e-3 && (d - y).abs() < 1e-3,
                "{x},{y} -> {c},{d}"
            );
        }
        assert_eq!(fit.to_input(0.0, 0.0), (0.0, 52.0));
        // Portrait frames get side borders.
        let p = Fit::new((300, 600), (416, 416), Resize::Letterbox);
        assert_eq!((p.inner, p.offset), ((208, 416), (104, 0)));
        // A box over the border is clipped to the frame.
        let b = fit.box_to_frame(-10.0, 40.0, 100.0, 100.0);
        assert_eq!((b.x, b.y), (0.0, 0.0));
        assert!((b.w - 100.0 / fit.scale.0).abs() < 1e-3);
        let s = Fit::new((800, 400), (400, 400), Resize::Stretch);
        assert_eq!(s.to_frame(200.0, 200.0), (400.0, 200.0));
    }

    #[test]
    fn fill_letterboxes_with_the_pad_value_and_swaps_channels() {
        // A 4x2 BGR frame: left half pure blue, right half pure red.
        let mut data = Vec::new();
        for _y in 0..2 {
            for x in 0..4 {
                data.extend_from_slice(if x < 2 { &[255, 0, 0] } else { &[0, 0, 255] });
            }
        }
        let img = Image::from_vec(4, 2, PixelFormat::BGR, data);
        let spec = ImageSpec {
            width: 8,
            height: 8,
            pixel_format: PixelFormat::RGB,
            layout: Layout::NCHW,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let fit = Fit::new((4, 2), (8, 8), Resize::Letterbox);
        assert_eq!((fit.inner, fit.offset), ((8, 4), (0, 2)));
        let mut t = Array3::<f32>::zeros((3, 8, 8));
        fill(&img, &fit, &spec, 127.5, t.view_mut());
        // Borders: rows 0-1 and 6-7.
        for y in [0, 1, 6, 7] {
            for x in 0..8 {
                assert!((t[[0, y, x]] - 0.5).abs() < 1e-6);
            }
        }
        // Model channel 0 is red: the right of the frame; channel 2 (blue) the left.
        assert!((t[[0, 3, 7]] - 1.0).abs() < 1e-6 && t[[0, 3, 0]].abs() < 1e-6);
        assert!((t[[2, 3, 0]] - 1.0).abs() < 1e-6 && t[[2, 3, 7]].abs() < 1e-6);
    }

    fn cand(class: usize, score: f32, c: [f32; 4]) -> Candidate {
        Candidate {
            class,
            score,
            corners: c,
        }
    }

    #[test]
    fn nms_keeps_the_best_of_overlapping_boxes_per_class() {
        let boxes = vec![
            cand(0, 0.6, [0.0, 0.0, 10.0, 10.0]),
            cand(0, 0.9, [1.0, 1.0, 11.0, 11.0]), // IoU with the first ~0.68
            cand(0, 0.5, [20.0, 20.0, 30.0, 30.0]),
            cand(1, 0.4, [0.0, 0.0, 10.0, 10.0]), // another class at the same place
            cand(0, 0.3, [5.0, 0.0, 15.0, 10.0]), // IoU with the best ~0.29: kept at 0.45
        ];
        let kept = nms(boxes.clone(), 0.45, 100);
        let scores: Vec<f32> = kept.iter().map(|c| c.score).collect();
        assert_eq!(scores, vec![0.9, 0.5, 0.4, 0.3]);
        assert_eq!(nms(boxes.clone(), 0.2, 100).len(), 3);
        assert_eq!(nms(boxes, 0.45, 2).len(), 2);
        let a = cand(0, 1.0, [0.0, 0.0, 10.0, 10.0]);
        assert!((a.iou(&cand(0, 1.0, [5.0, 0.0, 15.0, 10.0])) - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn both_output_layouts_decode_to_the_same_boxes() {
        // Three boxes, two classes: cx, cy, w, h, (obj,) c0, c1.
        let rows = [
            [100.0, 50.0, 20.0, 40.0, 0.9, 0.1, 0.8], // class 1, score 0.72
            [10.0, 10.0, 4.0, 4.0, 0.2, 0.9, 0.1],    // objectness too low
            [200.0, 100.0, 10.0, 10.0, 1.0, 0.5, 0.3], // class 0, score 0.5
        ];
        let yolo = Array2::from_shape_fn((3, 7), |(b, a)| rows[b][a]);
        let d = Decode {
            format: DetectFormat::Yolo,
            normalized: false,
            input: (416, 416),
            score: 0.25,
            allowed: &[],
        };
        let a = decode(yolo.view(), &d).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!((a[0].class, a[0].corners), (1, [90.0, 30.0, 110.0, 70.0]));
        assert!((a[0].score - 0.72).abs() < 1e-6);
        assert_eq!(a[1].class, 0);
        // v8: no objectness, transposed, normalised coordinates.
        let v8_rows: Vec<[f32; 6]> = rows
            .iter()
            .map(|r| {
                let s = r[4];
                [
                    r[0] / 416.0,
                    r[1] / 416.0,
                    r[2] / 416.0,
                    r[3] / 416.0,
                    r[5] * s,
                    r[6] * s,
                ]
            })
            .collect();
        let v8 = Array2::from_shape_fn((6, 3), |(a, b)| v8_rows[b][a]);
        let b = decode(
            v8.view(),
            &Decode {
                format: DetectFormat::Yolov8,
                normalized: true,
                ..d
            },
        )
        .unwrap();
        assert_eq!(b.len(), 2);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.class, y.class);
            assert!((x.score - y.score).abs() < 1e-6);
            for k in 0..4 {
                assert!((x.corners[k] - y.corners[k]).abs() < 1e-3);
            }
        }
        // The class filter drops class 1.
        let only0 = decode(
            yolo.view(),
            &Decode {
                allowed: &[true, false],
                ..d
            },
        )
        .unwrap();
        assert_eq!(only0.len(), 1);
        assert_eq!(only0[0].class, 0);
        // A tensor without class scores is an error.
        assert!(decode(Array2::<f32>::zeros((3, 5)).view(), &d).is_err());
    }
}
