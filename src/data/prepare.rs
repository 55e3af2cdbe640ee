//! Turning each image into the latent the U-Net trains on: bucket, resize to cover, crop,
//! encode with the VAE — cached on disk by a hash of the image bytes, the VAE and the crop, so a
//! second run skips the VAE.
use super::buckets::{assign, Bucket};
use super::dataset::{load_rgb, Item};
use crate::model::vae::AutoencoderKL;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// One training image, ready: its latent (and the flipped one when flips are on).
pub struct Sample {
    pub item: usize,
    pub caption: String,
    pub bucket: Bucket,
    /// (height, width) of the original image, for SDXL's micro-conditioning.
    pub original_hw: (u32, u32),
    /// Crop's top-left (y, x) in the resized image.
    pub crop_tl: (u32, u32),
    pub latent: Tensor,
    pub latent_flipped: Option<Tensor>,
    /// `--masked-loss`: the loss weight of each latent pixel, [1, h, w] (and flipped).
    pub mask: Option<Tensor>,
    pub mask_flipped: Option<Tensor>,
}

/// Resize so the image covers the bucket, then crop it there (centre, or at `offset` ∈ [0,1]²).
pub fn fit_to_bucket(img: &image::RgbImage, b: Bucket, offset: (f64, f64)) -> (image::RgbImage, (u32, u32)) {
    fit(img, b, offset, image::imageops::FilterType::Lanczos3)
}

/// The same resize and crop for an image's mask (a filter that cannot ring past 0 and 255).
pub fn fit_mask_to_bucket(mask: &image::GrayImage, b: Bucket, offset: (f64, f64)) -> image::GrayImage {
    fit(mask, b, offset, image::imageops::FilterType::Triangle).0
}

type Image<P> = image::ImageBuffer<P, Vec<<P as image::Pixel>::Subpixel>>;

fn fit<P: image::Pixel + 'static>(
    img: &Image<P>,
    b: Bucket,
    offset: (f64, f64),
    filter: image::imageops::FilterType,
) -> (Image<P>, (u32, u32)) {
    let (w, h) = img.dimensions();
    let s = (b.0 as f64 / w as f64).max(b.1 as f64 / h as f64);
    let (rw, rh) = (((w as f64 * s).round() as u32).max(b.0), ((h as f64 * s).round() as u32).max(b.1));
    let resized = image::imageops::resize(img, rw, rh, filter);
    let x = ((rw - b.0) as f64 * offset.0).round() as u32;
    let y = ((rh - b.1) as f64 * offset.1).round() as u32;
    (image::imageops::crop_imm(&resized, x, y, b.0, b.1).to_image(), (y, x))
}

/// RGB image → [1, 3, H, W] in [-1, 1].
pub fn to_tensor(img: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .unsqueeze(0)?
        .contiguous()?)
}

pub struct Encoder<'a> {
    pub vae: &'a AutoencoderKL,
    /// Identifies the VAE in cache keys.
    pub fingerprint: String,
    pub cache_dir: Option<PathBuf>,
    /// (latents read from the cache, latents computed by the VAE)
    pub counts: std::cell::Cell<(usize, usize)>,
}

impl Encoder<'_> {
    /// Pixels per latent pixel along a side.
    pub fn downscale(&self) -> u32 {
        1 << self.vae.config.block_out_channels.len().saturating_sub(1)
    }

    /// Scaled latent of an image (cached).
    pub fn encode(&self, img: &image::RgbImage, key_extra: &str) -> Result<Tensor> {
        // the pixels after resize, crop and flip stand for the image bytes, its size, crop and flip
        let mut h = Sha256::new();
        h.update(img.as_raw());
        let pixels: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let key =
            format!("latent|{pixels}|{}x{}|{}|{key_extra}", img.width(), img.height(), self.fingerprint);
        let path = self.cache_dir.as_ref().map(|d| super::cache::entry_path(d, "", &key));
        let f = self.downscale() as usize;
        let want = [self.vae.config.latent_channels, img.height() as usize / f, img.width() as usize / f];
        if let Some(p) = &path {
            let hit = super::cache::get(p, &key).and_then(|mut m| m.remove("latent"));
            // a latent of the wrong shape cannot come from this image: treat it as damaged
            if let Some(t) = hit.filter(|t| t.dims() == want) {
                let (h, e) = self.counts.get();
                self.counts.set((h + 1, e));
                return Ok(t);
            }
        }
        let (h, e) = self.counts.get();
        self.counts.set((h, e + 1));
        let dev = self.vae.decoder.conv_in.weight.device().clone();
        let z = self.vae.encode_mean(&to_tensor(img, &dev)?)?;
        let z = (z.to_dtype(DType::F32)? * self.vae.config.scaling_factor)?
            .squeeze(0)?
            .to_device(&Device::Cpu)?;
        if let Some(p) = &path {
            super::cache::put(p, &key, &[("latent".into(), z.clone())]);
        }
        Ok(z)
    }
}

/// Buckets, crops and encodes every item, and with `masked` reads its mask. `progress` is
/// called after each image.
pub fn prepare(
    items: &[Item],
    resolution: u32,
    step: u32,
    (flip, masked): (bool, bool),
    enc: &Encoder,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Sample>> {
    let mut out = vec![];
    for (i, it) in items.iter().enumerate() {
        let bucket = assign(it.size, resolution, step, &it.image)?;
        let img = load_rgb(&it.image)?;
        let (cropped, crop_tl) = fit_to_bucket(&img, bucket, (0.5, 0.5));
        let latent = enc.encode(&cropped, "center")?;
        let latent_flipped = if flip {
            Some(enc.encode(&image::imageops::flip_horizontal(&cropped), "center-flip")?)
        } else {
            None
        };
        let mask = match masked {
            true => {
                super::mask::load(&it.image, it.size)?.map(|m| fit_mask_to_bucket(&m, bucket, (0.5, 0.5)))
            }
            false => None,
        };
        let f = enc.downscale();
        let mask_flipped = match (&mask, flip) {
            (Some(m), true) => Some(super::mask::to_latent(&image::imageops::flip_horizontal(m), f)?),
            _ => None,
        };
        let mask = mask.map(|m| super::mask::to_latent(&m, f)).transpose()?;
        out.push(Sample {
            item: i,
            caption: it.caption.clone(),
            bucket,
            original_hw: (it.size.1, it.size.0),
            crop_tl,
            latent,
            latent_flipped,
            mask,
            mask_flipped,
        });
        progress(i + 1);
    }
    Ok(out)
}
