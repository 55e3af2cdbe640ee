//! The training images: a folder of images with same-named .txt captions, kohya's `N_name`
//! sub-folders for repeats, and a default caption for images without one.
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp"];

#[derive(Debug, Clone)]
pub struct Item {
    pub image: PathBuf,
    pub caption: String,
    /// Times the image appears per epoch (kohya's `N_name` folder prefix).
    pub repeats: usize,
    /// Pixel size after EXIF orientation.
    pub size: (u32, u32),
    /// A regularization image (`--reg-data`): its loss counts `--prior-loss-weight` times.
    pub reg: bool,
    /// A held-out validation image (`--val-data`): never trained on (no repeats).
    pub val: bool,
}

pub fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

/// `10_mydog` → (10, "mydog")
pub fn folder_repeats(dir: &Path) -> Option<(usize, String)> {
    let name = dir.file_name()?.to_str()?;
    let (n, rest) = name.split_once('_')?;
    Some((n.parse().ok()?, rest.to_string()))
}

/// Scans `root` (and its `N_name` sub-folders). `default_caption` is used for images without a
/// caption file; kohya's folder name (after `N_`) is the fallback. `flag` names the option that
/// gave `root`, for the errors.
pub fn scan(root: &Path, default_caption: Option<&str>, flag: &str) -> Result<Vec<Item>> {
    if !root.is_dir() {
        bail!("{}: not a folder — {flag} takes a folder of images with .txt captions", root.display());
    }
    let mut dirs = vec![(root.to_path_buf(), 1usize, None::<String>)];
    for e in std::fs::read_dir(root).with_context(|| format!("{}: cannot list", root.display()))? {
        let p = e?.path();
        if p.is_dir() {
            if let Some((n, name)) = folder_repeats(&p) {
                dirs.push((p, n, Some(name)));
            }
        }
    }
    let mut items = vec![];
    for (dir, repeats, class) in dirs {
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(&dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for p in &entries {
            if p.extension().is_some_and(|e| e == "txt")
                && !entries.iter().any(|i| is_image(i) && i.with_extension("txt") == *p)
            {
                bail!(
                    "{}: caption without an image (expected {} or another of {:?}) — remove it or add the image",
                    p.display(),
                    p.with_extension("png").display(),
                    IMAGE_EXTS
                );
            }
        }
        // OneTrainer's masks sit beside their images: never images of their own
        for p in entries.into_iter().filter(|p| is_image(p) && !super::mask::is_mask(p)) {
            let cap_path = p.with_extension("txt");
            let caption = if cap_path.exists() {
                std::fs::read_to_string(&cap_path)
                    .with_context(|| format!("{}: cannot read caption", cap_path.display()))?
                    .trim()
                    .to_string()
            } else {
                default_caption.map(String::from).or(class.clone()).unwrap_or_default()
            };
            let size = image_size(&p)?;
            items.push(Item { image: p, caption, repeats, size, reg: false, val: false });
        }
    }
    if items.is_empty() {
        bail!(
            "{}: no images found ({}) — put images (with .txt captions) there, or point {flag} elsewhere",
            root.display(),
            IMAGE_EXTS.join(", ")
        );
    }
    Ok(items)
}

/// kohya's balance of regularization images: an epoch shows as many of them as training images
/// (repeats counted). The reg images are taken in order with their own repeats; if they fall
/// short, each gets one more repeat in turn until they match; if they are more, the rest sit out.
impl Item {
    /// A training image: neither regularization nor validation.
    pub fn is_training(&self) -> bool {
        !self.reg && !self.val
    }
}

/// The held-out images of `--val-data`: marked, and drawn zero times an epoch.
pub fn held_out(mut items: Vec<Item>) -> Vec<Item> {
    for i in &mut items {
        i.val = true;
        i.repeats = 0;
    }
    items
}

/// `--val-split`: `share` of the images (at least one) held out for validation, picked by
/// `seed`, and moved behind the ones that train (the order `--val-data` gives them).
pub fn split_off(items: Vec<Item>, share: f64, seed: u64, root: &Path) -> Result<Vec<Item>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let n = items.len();
    let k = ((share * n as f64).round() as usize).max(1);
    if k >= n {
        bail!(
            "--val-split {share}: {k} of the {n} images in {} would be held out, none left to train on — give a smaller share or more images",
            root.display()
        );
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x0a15_5b17));
    let held: std::collections::HashSet<usize> = order[..k].iter().copied().collect();
    let (train, val): (Vec<_>, Vec<_>) = items.into_iter().enumerate().partition(|(i, _)| !held.contains(i));
    let mut out: Vec<Item> = train.into_iter().map(|(_, it)| it).collect();
    out.extend(held_out(val.into_iter().map(|(_, it)| it).collect()));
    Ok(out)
}

pub fn balance_reg(train: &[Item], mut reg: Vec<Item>) -> Vec<Item> {
    let want: usize = train.iter().map(|i| i.repeats).sum();
    let (mut n, mut used) = (0, 0);
    while used < reg.len() && n < want {
        n += reg[used].repeats;
        used += 1;
    }
    reg.truncate(used);
    let mut k = 0;
    while n < want && !reg.is_empty() {
        reg[k % used].repeats += 1;
        n += 1;
        k += 1;
    }
    for r in &mut reg {
        r.reg = true;
    }
    reg
}

fn unreadable(p: &Path, e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{}: unreadable image ({e}) — re-export it as PNG or JPEG", p.display())
}

/// The longest image side read: past it a header is more likely hostile (a "pixel flood" that
/// would claim gigabytes when decoded) than a photo, and training crops far below it anyway.
pub const MAX_SIDE: u32 = 16384;

/// The file's decoder (format guessed from its bytes) and its EXIF orientation. Sizes are
/// checked from the header, before any pixel is decoded.
fn open_decoder(p: &Path) -> Result<(impl image::ImageDecoder, image::metadata::Orientation)> {
    use image::ImageDecoder;
    let mut reader = image::ImageReader::open(p)
        .map_err(|e| unreadable(p, &e))?
        .with_guessed_format()
        .map_err(|e| unreadable(p, &e))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // an RGBA image at the largest size, 16-bit, is 2 GiB: room for any real photo
    limits.max_alloc = Some(2 << 30);
    reader.limits(limits);
    let mut dec = reader.into_decoder().map_err(|e| match e {
        image::ImageError::Limits(_) => anyhow::anyhow!(
            "{}: the image is larger than {MAX_SIDE} px a side (or claims to be) — downscale it",
            p.display()
        ),
        e => unreadable(p, &e),
    })?;
    let o = dec.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    Ok((dec, o))
}

/// Size after EXIF orientation, read from the header only.
fn image_size(p: &Path) -> Result<(u32, u32)> {
    use image::metadata::Orientation::*;
    use image::ImageDecoder;
    let (dec, o) = open_decoder(p)?;
    let (w, h) = dec.dimensions();
    Ok(match o {
        Rotate90 | Rotate270 | Rotate90FlipH | Rotate270FlipH => (h, w),
        _ => (w, h),
    })
}

/// Decodes an image as it is, EXIF orientation applied.
pub fn load_upright(p: &Path) -> Result<image::DynamicImage> {
    let (dec, o) = open_decoder(p)?;
    let mut img = image::DynamicImage::from_decoder(dec).map_err(|e| unreadable(p, &e))?;
    img.apply_orientation(o);
    Ok(img)
}

/// Decodes an image upright (EXIF orientation applied) as RGB; alpha is composited on white and
/// grayscale, CMYK and 16-bit images are converted.
pub fn load_rgb(p: &Path) -> Result<image::RgbImage> {
    let img = load_upright(p)?;
    if !img.color().has_alpha() {
        return Ok(img.to_rgb8());
    }
    let rgba = img.to_rgba8();
    let mut out = image::RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let a = p[3] as f32 / 255.0;
        for c in 0..3 {
            o[c] = (p[c] as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{balance_reg, Item};

    fn items(repeats: &[usize]) -> Vec<Item> {
        let it = |(i, &r): (usize, &usize)| Item {
            image: format!("{i}.png").into(),
            caption: String::new(),
            repeats: r,
            size: (8, 8),
            reg: false,
            val: false,
        };
        repeats.iter().enumerate().map(it).collect()
    }

    fn repeats(v: &[Item]) -> Vec<usize> {
        v.iter().map(|i| i.repeats).collect()
    }

    /// The three cases of kohya's loop: too few reg images (repeated in turn), too many (the
    /// first ones used), and reg folders with their own repeats (may overshoot, as kohya does).
    #[test]
    fn reg_images_balance_like_kohya() {
        let r = balance_reg(&items(&[10, 10, 10]), items(&[1, 1, 1, 1]));
        assert_eq!(repeats(&r), [8, 8, 7, 7]);
        assert!(r.iter().all(|i| i.reg));
        let r = balance_reg(&items(&[1, 1]), items(&[1, 1, 1, 1, 1]));
        assert_eq!(
            r.iter().map(|i| i.image.to_string_lossy().to_string()).collect::<Vec<_>>(),
            ["0.png", "1.png"]
        );
        assert_eq!(repeats(&balance_reg(&items(&[5]), items(&[3, 3, 3]))), [3, 3]);
    }
}
