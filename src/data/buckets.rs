//! Aspect-ratio buckets: each image trains at the bucket whose aspect ratio is closest to its
//! own, with sides a multiple of `step` and area at most resolution². Images are never
//! upscaled: an image smaller than the resolution gets a smaller bucket.
use anyhow::{bail, Result};

pub type Bucket = (u32, u32);

/// All (w, h) with sides multiples of `step` in [step, 4·res], area ≤ res², keeping only the
/// largest bucket of each aspect ratio.
pub fn buckets(resolution: u32, step: u32) -> Vec<Bucket> {
    let max_area = (resolution as u64).pow(2);
    let mut out = vec![];
    let mut w = step;
    while w <= resolution * 4 {
        let h = ((max_area / w as u64) as u32 / step) * step;
        if h >= step && h <= resolution * 4 {
            out.push((w, h));
        }
        w += step;
    }
    out
}

/// The side every bucket is a multiple of, for a model whose latents are `vae_factor` times
/// smaller than the image and whose U-Net halves them `unet_halvings` times: each U-Net level's
/// feature map must halve exactly, or it meets its skip connection one cell off. At 256 px and
/// above at least 64 (kohya's bucket step), below at least 8.
pub fn bucket_step(resolution: u32, vae_factor: u32, unet_halvings: u32) -> u32 {
    let cell = vae_factor << unet_halvings;
    cell.max(if resolution >= 256 { 64 } else { 8 })
}

/// The bucket for an image of `size`: closest aspect ratio (in log space) among buckets that fit
/// inside the image.
pub fn assign(size: (u32, u32), resolution: u32, step: u32, path: &std::path::Path) -> Result<Bucket> {
    let (w, h) = size;
    if w < step || h < step {
        bail!(
            "{}: {w}×{h} is smaller than the smallest bucket ({step}×{step}) — use a larger image or a smaller --resolution",
            path.display()
        );
    }
    let ar = (w as f64 / h as f64).ln();
    let res = resolution.min(((w as u64 * h as u64) as f64).sqrt() as u32);
    let fits = |b: &Bucket| b.0 <= w && b.1 <= h;
    let mut cands: Vec<Bucket> = buckets(res.max(step), step).into_iter().filter(fits).collect();
    if cands.is_empty() {
        cands.push(((w / step) * step, (h / step) * step));
    }
    let score = |b: &Bucket| ((b.0 as f64 / b.1 as f64).ln() - ar).abs() - 1e-9 * (b.0 * b.1) as f64;
    Ok(*cands.iter().min_by(|a, b| score(a).total_cmp(&score(b))).expect("non-empty"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn buckets_respect_area_and_step() {
        for b in buckets(512, 64) {
            assert!(b.0 % 64 == 0 && b.1 % 64 == 0 && b.0 * b.1 <= 512 * 512, "{b:?}");
        }
        assert!(buckets(512, 64).contains(&(512, 512)));
        assert!(buckets(1024, 64).contains(&(1024, 1024)));
    }

    #[test]
    fn assignment_follows_aspect_and_never_upscales() {
        let p = Path::new("x.png");
        assert_eq!(assign((1024, 1024), 512, 64, p).unwrap(), (512, 512));
        let (w, h) = assign((1600, 900), 512, 64, p).unwrap();
        assert!(w > h && w * h <= 512 * 512);
        assert_eq!(assign((300, 300), 512, 64, p).unwrap(), (256, 256));
        assert!(assign((40, 500), 512, 64, p).is_err());
    }
}
