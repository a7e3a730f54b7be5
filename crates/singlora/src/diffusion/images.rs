//! Image files in and out: a folder of subject images becomes (3, s, s) tensors in [-1, 1]
//! (the shorter side resized to s with a Catmull-Rom filter, then a centre crop), and batches
//! of generated images in [-1, 1] become one PNG grid.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

use crate::error::{Error, IoContext, Result};

/// The file types a subject folder may hold.
pub const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// The images of `dir` (by extension, sorted by name); an error when there are none.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::msg(format!(
            "{}: not a directory (expected a folder of images)",
            dir.display()
        )));
    }
    let mut out = vec![];
    for entry in std::fs::read_dir(dir).at(dir)? {
        let p = entry.at(dir)?.path();
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        if p.is_file() && EXTENSIONS.contains(&ext.as_str()) {
            out.push(p);
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::msg(format!(
            "{} holds no images ({})",
            dir.display(),
            EXTENSIONS.join(", ")
        )));
    }
    Ok(out)
}

/// Reads `path` as RGB, resizes its shorter side to `size` and crops the centre square:
/// (3, size, size), f32 in [-1, 1].
pub fn load_square(path: &Path, size: usize) -> Result<Tensor> {
    let img = image::open(path)
        .map_err(|e| Error::bad_file(path, format!("could not be read as an image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::bad_file(path, "is an empty image"));
    }
    let scale = size as f64 / w.min(h) as f64;
    let (nw, nh) = (
        ((w as f64 * scale).round() as u32).max(size as u32),
        ((h as f64 * scale).round() as u32).max(size as u32),
    );
    let img = img.resize_exact(nw, nh, FilterType::CatmullRom);
    let (x0, y0) = ((nw - size as u32) / 2, (nh - size as u32) / 2);
    let img = img.crop_imm(x0, y0, size as u32, size as u32).to_rgb8();
    to_tensor(&img)
}

/// An RGB image as (3, h, w) f32 in [-1, 1].
pub fn to_tensor(img: &RgbImage) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h, w, 3), &Device::Cpu)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// (3, h, w) in [-1, 1] (any dtype or device) as an RGB image, values clamped.
pub fn to_image(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        return Err(Error::msg(format!(
            "an image tensor needs 3 channels, this one has {c}"
        )));
    }
    let v: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    let bytes = v
        .iter()
        .map(|x| ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| Error::msg("image buffer of the wrong size"))
}

/// Lays (n, 3, h, w) images in [-1, 1] out in rows of `cols` and writes a PNG atomically.
pub fn save_grid(images: &Tensor, cols: usize, path: &Path) -> Result<()> {
    let (n, _, h, w) = images.dims4()?;
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let mut grid = RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..n {
        let img = to_image(&images.get(i)?)?;
        image::imageops::replace(
            &mut grid,
            &img,
            ((i % cols) * w) as i64,
            ((i / cols) * h) as i64,
        );
    }
    let mut bytes = std::io::Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(grid)
        .write_to(&mut bytes, image::ImageFormat::Png)
        .map_err(|e| Error::bad_file(path, format!("could not be encoded as PNG: {e}")))?;
    crate::atomic::write_file(path, bytes.get_ref())
}
