//! `--masked-loss`: which pixels of a training image count. A mask is OneTrainer's
//! `<image stem>-masklabel.png` beside the image (white counts, black does not), else the image's
//! alpha channel; it is resized, cropped and flipped with its image, then averaged down to the
//! latent's resolution, where it weighs the loss (kohya's masked loss).
use super::dataset::load_upright;
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

const SUFFIX: &str = "-masklabel";

/// Whether `p` is a mask (`…-masklabel.png`) rather than a training image.
pub fn is_mask(p: &Path) -> bool {
    p.file_stem().and_then(|s| s.to_str()).is_some_and(|s| s.ends_with(SUFFIX))
}

/// `photos/cat.jpg` → `photos/cat-masklabel.png`
pub fn mask_path(image: &Path) -> PathBuf {
    let stem = image.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    image.with_file_name(format!("{stem}{SUFFIX}.png"))
}

/// The mask of `image` at its size (`size`, upright), or None when it has neither a mask file
/// nor an alpha channel.
pub fn load(image: &Path, size: (u32, u32)) -> Result<Option<image::GrayImage>> {
    let file = mask_path(image);
    let mask = if file.is_file() {
        load_upright(&file)?.to_luma8()
    } else {
        let img = load_upright(image)?;
        if !img.color().has_alpha() {
            return Ok(None);
        }
        let rgba = img.to_rgba8();
        image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| image::Luma([rgba.get_pixel(x, y)[3]]))
    };
    if mask.dimensions() == size {
        return Ok(Some(mask));
    }
    Ok(Some(image::imageops::resize(&mask, size.0, size.1, image::imageops::FilterType::Triangle)))
}

/// A bucket-sized mask averaged over `f`×`f` blocks (torch's area interpolation), in [0, 1]:
/// [1, h/f, w/f].
pub fn to_latent(mask: &image::GrayImage, f: u32) -> Result<Tensor> {
    let (w, h) = (mask.width() / f, mask.height() / f);
    let mut out = Vec::with_capacity((w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            let mut sum = 0u32;
            for dy in 0..f {
                for dx in 0..f {
                    sum += mask.get_pixel(x * f + dx, y * f + dy)[0] as u32;
                }
            }
            out.push(sum as f32 / (255 * f * f) as f32);
        }
    }
    Ok(Tensor::from_vec(out, (1, h as usize, w as usize), &Device::Cpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_average_to_latent_resolution() {
        let m =
            image::GrayImage::from_fn(4, 2, |x, y| image::Luma([if x < 2 { 255 } else { (y * 100) as u8 }]));
        let t = to_latent(&m, 2).unwrap();
        assert_eq!(t.dims(), [1, 1, 2]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - 1.0).abs() < 1e-6 && (v[1] - 200.0 / 1020.0).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn masks_are_not_images() {
        assert!(is_mask(Path::new("a/cat-masklabel.png")) && !is_mask(Path::new("a/cat.png")));
        assert_eq!(mask_path(Path::new("a/cat.jpg")), Path::new("a/cat-masklabel.png"));
    }
}
