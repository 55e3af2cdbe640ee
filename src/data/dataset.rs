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
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

/// `10_mydog` → (10, "mydog")
fn repeats_of(dir: &Path) -> Option<(usize, String)> {
    let name = dir.file_name()?.to_str()?;
    let (n, rest) = name.split_once('_')?;
    Some((n.parse().ok()?, rest.to_string()))
}

/// Scans `root` (and its `N_name` sub-folders). `default_caption` is used for images without a
/// caption file; kohya's folder name (after `N_`) is the fallback.
pub fn scan(root: &Path, default_caption: Option<&str>) -> Result<Vec<Item>> {
    if !root.is_dir() {
        bail!("{}: not a folder — --data takes a folder of images with .txt captions", root.display());
    }
    let mut dirs = vec![(root.to_path_buf(), 1usize, None::<String>)];
    for e in std::fs::read_dir(root).with_context(|| format!("{}: cannot list", root.display()))? {
        let p = e?.path();
        if p.is_dir() {
            if let Some((n, name)) = repeats_of(&p) {
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
        for p in entries.into_iter().filter(|p| is_image(p)) {
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
            items.push(Item { image: p, caption, repeats, size });
        }
    }
    if items.is_empty() {
        bail!(
            "{}: no images found ({}) — put your training images there",
            root.display(),
            IMAGE_EXTS.join(", ")
        );
    }
    Ok(items)
}

fn unreadable(p: &Path, e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{}: unreadable image ({e}) — re-export it as PNG or JPEG", p.display())
}

/// The file's decoder (format guessed from its bytes) and its EXIF orientation.
fn open_decoder(p: &Path) -> Result<(impl image::ImageDecoder, image::metadata::Orientation)> {
    use image::ImageDecoder;
    let mut dec = image::ImageReader::open(p)
        .map_err(|e| unreadable(p, &e))?
        .with_guessed_format()
        .map_err(|e| unreadable(p, &e))?
        .into_decoder()
        .map_err(|e| unreadable(p, &e))?;
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

/// Decodes an image upright (EXIF orientation applied) as RGB; alpha is composited on white and
/// grayscale, CMYK and 16-bit images are converted.
pub fn load_rgb(p: &Path) -> Result<image::RgbImage> {
    let (dec, o) = open_decoder(p)?;
    let mut img = image::DynamicImage::from_decoder(dec).map_err(|e| unreadable(p, &e))?;
    img.apply_orientation(o);
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
