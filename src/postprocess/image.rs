//! Image -> tensor: normalisation into NCHW/NHWC, and bilinear crops for recognisers.

use ndarray::{Array4, ArrayViewMut3};

use crate::config::{ImageSpec, Layout};
use crate::frame::{BBox, Image};

/// Writes `(pixel / 255 - mean) / std` of one packed image into one batch slot (C, H, W or
/// H, W, C view). The image must already have the spec's size and channel order.
fn fill_one(
    img: &[u8],
    width: usize,
    spec: &ImageSpec,
    mut out: ArrayViewMut3<'_, f32>,
    layout: Layout,
) {
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * spec.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| spec.mean[c] / spec.std[c]);
    let height = img.len() / (width * 3);
    for y in 0..height {
        let row = &img[y * width * 3..(y + 1) * width * 3];
        for x in 0..width {
            for c in 0..3 {
                let v = row[x * 3 + c] as f32 * scale[c] - shift[c];
                match layout {
                    Layout::NCHW => out[[c, y, x]] = v,
                    Layout::NHWC => out[[y, x, c]] = v,
                }
            }
        }
    }
}

/// A zeroed batch tensor of `n` images of the spec's size and layout.
pub fn batch_zeros(n: usize, spec: &ImageSpec) -> Array4<f32> {
    let (h, w) = (spec.height as usize, spec.width as usize);
    match spec.layout {
        Layout::NCHW => Array4::<f32>::zeros((n, 3, h, w)),
        Layout::NHWC => Array4::<f32>::zeros((n, h, w, 3)),
    }
}

/// Builds the normalised batch tensor of whole images.
pub fn batch_tensor(images: &[&Image], spec: &ImageSpec) -> Array4<f32> {
    let (h, w) = (spec.height as usize, spec.width as usize);
    let mut t = batch_zeros(images.len(), spec);
    for (i, img) in images.iter().enumerate() {
        debug_assert_eq!((img.width as usize, img.height as usize), (w, h));
        fill_one(
            img.bytes(),
            w,
            spec,
            t.index_axis_mut(ndarray::Axis(0), i),
            spec.layout,
        );
    }
    t
}

/// Crops `bbox` from `img` and resizes it bilinearly to `out_w` x `out_h` (packed, 3 channels).
pub fn crop_resize(img: &Image, bbox: &BBox, out_w: usize, out_h: usize) -> Vec<u8> {
    let (iw, ih) = (img.width as usize, img.height as usize);
    let x0 = bbox.x.clamp(0.0, iw as f32 - 1.0);
    let y0 = bbox.y.clamp(0.0, ih as f32 - 1.0);
    let cw = bbox.w.clamp(1.0, iw as f32 - x0);
    let ch = bbox.h.clamp(1.0, ih as f32 - y0);
    let data = img.bytes();
    let mut out = vec![0u8; out_w * out_h * 3];
    let sx = cw / out_w as f32;
    let sy = ch / out_h as f32;
    for oy in 0..out_h {
        let fy = (y0 + (oy as f32 + 0.5) * sy - 0.5).clamp(0.0, ih as f32 - 1.0);
        let y1 = fy.floor() as usize;
        let y2 = (y1 + 1).min(ih - 1);
        let wy = fy - y1 as f32;
        for ox in 0..out_w {
            let fx = (x0 + (ox as f32 + 0.5) * sx - 0.5).clamp(0.0, iw as f32 - 1.0);
            let x1 = fx.floor() as usize;
            let x2 = (x1 + 1).min(iw - 1);
            let wx = fx - x1 as f32;
            for c in 0..3 {
                let p = |x: usize, y: usize| data[(y * iw + x) * 3 + c] as f32;
                let top = p(x1, y1) * (1.0 - wx) + p(x2, y1) * wx;
                let bottom = p(x1, y2) * (1.0 - wx) + p(x2, y2) * wx;
                out[(oy * out_w + ox) * 3 + c] = (top * (1.0 - wy) + bottom * wy).round() as u8;
            }
        }
    }
    out
}

/// Normalises a packed crop of width `w` into `out` (C, H, W with `out` at least `w` wide; the
/// rest of the width keeps whatever `out` holds, zero for padding).
pub fn fill_crop(crop: &[u8], w: usize, spec: &ImageSpec, out: ArrayViewMut3<'_, f32>) {
    fill_one(crop, w, spec, out, Layout::NCHW);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::PixelFormat;

    fn spec(w: u32, h: u32) -> ImageSpec {
        ImageSpec {
            width: w,
            height: h,
            pixel_format: PixelFormat::RGB,
            layout: Layout::NCHW,
            mean: [0.5, 0.5, 0.5],
            std: [0.5, 0.5, 0.5],
        }
    }

    #[test]
    fn normalises_into_nchw() {
        let img = Image::from_vec(2, 1, PixelFormat::RGB, vec![255, 0, 0, 0, 0, 255]);
        let t = batch_tensor(&[&img], &spec(2, 1));
        assert_eq!(t.shape(), &[1, 3, 1, 2]);
        assert!((t[[0, 0, 0, 0]] - 1.0).abs() < 1e-6);
        assert!((t[[0, 1, 0, 0]] + 1.0).abs() < 1e-6);
        assert!((t[[0, 2, 0, 1]] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn crop_of_uniform_region_is_uniform_and_sized() {
        let mut data = vec![0u8; 10 * 10 * 3];
        for y in 2..6 {
            for x in 2..8 {
                data[(y * 10 + x) * 3] = 200;
            }
        }
        let img = Image::from_vec(10, 10, PixelFormat::RGB, data);
        let out = crop_resize(
            &img,
            &BBox {
                x: 2.0,
                y: 2.0,
                w: 6.0,
                h: 4.0,
            },
            12,
            8,
        );
        assert_eq!(out.len(), 12 * 8 * 3);
        // Interior pixels of the crop come from the red rectangle only.
        for oy in 1..7 {
            for ox in 1..11 {
                assert_eq!(out[(oy * 12 + ox) * 3], 200, "at {ox},{oy}");
            }
        }
    }
}
