//! DB (Differentiable Binarization) post-processing: probability map -> text boxes.
//!
//! Follows PaddleOCR's DBPostProcess with axis-aligned boxes: threshold the map, optionally
//! dilate, find connected regions, score each by its mean probability, grow it by
//! `area * unclip_ratio / perimeter` (DB shrinks text regions by that much in training), and
//! scale to image pixels. PaddleOCR fits rotated rectangles; poolpipe keeps boxes axis-aligned,
//! which suits overlays and signs in upright cameras and keeps the code small.

use crate::config::TextDetectParams;
use crate::frame::{BBox, TextBox};

/// Text boxes in a `map_w` x `map_h` probability map, scaled to an `img_w` x `img_h` image.
pub fn boxes(
    map: &[f32],
    map_w: usize,
    map_h: usize,
    img_w: f32,
    img_h: f32,
    p: &TextDetectParams,
) -> Vec<TextBox> {
    let mut bitmap: Vec<bool> = map.iter().map(|v| *v > p.thresh).collect();
    if p.dilate {
        // 2x2 dilation: a pixel is set when it or its left, upper or upper-left neighbour is.
        let src = bitmap.clone();
        for y in 0..map_h {
            for x in 0..map_w {
                let at =
                    |dx: usize, dy: usize| x >= dx && y >= dy && src[(y - dy) * map_w + x - dx];
                bitmap[y * map_w + x] = at(0, 0) || at(1, 0) || at(0, 1) || at(1, 1);
            }
        }
    }
    let mut label = vec![false; bitmap.len()];
    let mut stack = Vec::new();
    let mut out = Vec::new();
    let (sx, sy) = (img_w / map_w as f32, img_h / map_h as f32);
    for start in 0..bitmap.len() {
        if !bitmap[start] || label[start] {
            continue;
        }
        // Flood fill (8-connected) to get the region's bounds.
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        label[start] = true;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % map_w, i / map_w);
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                    if nx < 0 || ny < 0 || nx >= map_w as i64 || ny >= map_h as i64 {
                        continue;
                    }
                    let j = ny as usize * map_w + nx as usize;
                    if bitmap[j] && !label[j] {
                        label[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        let (w, h) = ((x1 - x0 + 1) as f32, (y1 - y0 + 1) as f32);
        if w.min(h) < p.min_size {
            continue;
        }
        let mut sum = 0.0;
        for y in y0..=y1 {
            sum += map[y * map_w + x0..=y * map_w + x1].iter().sum::<f32>();
        }
        let score = sum / (w * h);
        if score < p.box_thresh {
            continue;
        }
        let d = w * h * p.unclip_ratio / (2.0 * (w + h));
        let (bx0, by0) = ((x0 as f32 - d).max(0.0), (y0 as f32 - d).max(0.0));
        let (bx1, by1) = (
            (x1 as f32 + 1.0 + d).min(map_w as f32),
            (y1 as f32 + 1.0 + d).min(map_h as f32),
        );
        if (bx1 - bx0).min(by1 - by0) < p.min_size + 2.0 {
            continue;
        }
        out.push(TextBox {
            bbox: BBox {
                x: bx0 * sx,
                y: by0 * sy,
                w: (bx1 - bx0) * sx,
                h: (by1 - by0) * sy,
            },
            score,
        });
    }
    // Reading order: top to bottom, then left to right.
    out.sort_by(|a, b| {
        (a.bbox.y, a.bbox.x)
            .partial_cmp(&(b.bbox.y, b.bbox.x))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    out.truncate(p.max_candidates);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_two_regions_grows_them_and_drops_faint_ones() {
        let (w, h) = (40, 20);
        let mut map = vec![0.0f32; w * h];
        let mut fill = |x0: usize, y0: usize, x1: usize, y1: usize, v: f32| {
            for y in y0..y1 {
                for x in x0..x1 {
                    map[y * w + x] = v;
                }
            }
        };
        fill(2, 2, 20, 8, 0.9); // a text line
        fill(25, 12, 35, 18, 0.95); // another
        fill(5, 14, 12, 18, 0.35); // above thresh but too faint for box_thresh
        let p = TextDetectParams {
            dilate: false,
            ..Default::default()
        };
        let b = boxes(&map, w, h, 80.0, 40.0, &p);
        assert_eq!(b.len(), 2, "{b:?}");
        // First box: 18 x 6 region grown by 18*6*1.6/48 = 3.6 on each side, clipped at 0, scaled x2.
        let f = b[0].bbox;
        assert!(
            (f.x - 0.0).abs() < 1e-4 && (f.y - 0.0).abs() < 1e-4,
            "{f:?}"
        );
        assert!((f.w - (20.0 + 3.6) * 2.0).abs() < 1e-3, "{f:?}");
        assert!((b[0].score - 0.9).abs() < 1e-5);
        assert!(b[1].bbox.x > 40.0);
    }
}
