//! From what `scores::classify` reads in each sample to the demo's numbers: "learned" (the new
//! concept's samples that show it), "followed" (the whole prompt), and "forgotten" (control
//! samples the LoRA broke, against the base's own with the same seeds), with the interval that
//! tells a real change from a lucky seed.
use super::scores::{classify, Detected};
use super::world::{Asked, Colour, Texture};
use crate::report::Forgetting;
use image::RgbImage;
/// Whether `d` is checkered exactly when `asked` says so. Of the textures only checks are scored:
/// generated stripes and dots are too soft to tell apart reliably, checks' diagonal wave is not.
pub fn checks_as_asked(d: &Detected, asked: Asked) -> bool {
    d.texture.map(|t| t == Texture::Checks) == Some(asked.texture == Texture::Checks)
}

/// Whether `img` shows the shape `asked` names, checkered if asked, and in the asked colour where
/// that is one the world's scenes never draw (a known colour is scored as forgetting).
pub fn shows(img: &RgbImage, asked: Asked) -> bool {
    shows_detected(&classify(img), asked)
}

/// Whether `img` shows what `asked` names (`shows`), from its classification.
pub fn shows_detected(d: &Detected, asked: Asked) -> bool {
    let colour_ok = !asked.colour.unseen() || d.colour == Some(asked.colour);
    d.shape == Some(asked.shape) && checks_as_asked(d, asked) && colour_ok
}

/// Whether a control sample classified as `d` is drawn right: the asked shape and colour,
/// checkered only if asked, on the asked background.
pub fn draws_right(d: &Detected, a: Asked) -> bool {
    d.shape == Some(a.shape)
        && d.colour == Some(a.colour)
        && checks_as_asked(d, a)
        && a.background.is_none_or(|b| d.background == Some(b))
}

/// What the scorer read in a sample, for the report: "white square on blue", ", checkered"
/// when it found checks, "?" for what it could not tell.
pub fn describe(d: &Detected) -> String {
    let colour = |c: Option<Colour>| c.map_or("?", |c| c.name());
    let checks = if d.texture == Some(Texture::Checks) { ", checkered" } else { "" };
    format!("{} {} on {}{checks}", colour(d.colour), d.shape.map_or("?", |s| s.name()), colour(d.background))
}

/// Whether `img` follows its whole prompt: what `shows` asks, and also the asked colour and
/// background. A LoRA that draws its concept on a repainted background shows the concept but
/// breaks the rest of the prompt, which "learned" alone would not tell.
pub fn follows(img: &RgbImage, asked: Asked) -> bool {
    let d = classify(img);
    shows_detected(&d, asked)
        && d.colour == Some(asked.colour)
        && asked.background.is_none_or(|b| d.background == Some(b))
}

/// Share of `samples` that show what their prompt `asked[i]` names: the demo's "learned" score
/// for images generated from the new concept's prompts.
pub fn learned(samples: &[RgbImage], asked: &[Asked]) -> f64 {
    share(samples, asked, shows)
}

/// Share of `samples` that follow their whole prompt `asked[i]` (`follows`).
pub fn followed(samples: &[RgbImage], asked: &[Asked]) -> f64 {
    share(samples, asked, follows)
}

fn share(samples: &[RgbImage], asked: &[Asked], ok: fn(&RgbImage, Asked) -> bool) -> f64 {
    assert_eq!(samples.len(), asked.len(), "each sample pairs with what its prompt asked");
    if samples.is_empty() {
        return 0.0;
    }
    samples.iter().zip(asked).filter(|&(s, &a)| ok(s, a)).count() as f64 / samples.len() as f64
}

/// Compares base and base+LoRA images generated with the same prompts and seeds: `base[i]`,
/// `lora[i]` and `expected[i]` (what the control prompt asks for) belong together.
pub fn forgotten(base: &[RgbImage], lora: &[RgbImage], expected: &[Asked]) -> Forgetting {
    assert!(
        base.len() == lora.len() && base.len() == expected.len(),
        "forgotten: {} base, {} LoRA images and {} expectations must pair up",
        base.len(),
        lora.len(),
        expected.len()
    );
    let accuracy = |imgs: &[RgbImage]| {
        let ok = imgs.iter().zip(expected).filter(|(img, &a)| draws_right(&classify(img), a)).count();
        ok as f64 / imgs.len().max(1) as f64
    };
    let (accuracy_base, accuracy_lora) = (accuracy(base), accuracy(lora));
    let mean_pixel_distance = if base.is_empty() {
        0.0
    } else {
        base.iter().zip(lora).map(|(a, b)| mean_abs_difference(a, b)).sum::<f64>() / base.len() as f64
    };
    Forgetting {
        labelled: expected.len(),
        accuracy_base,
        accuracy_lora,
        drop_points: (accuracy_base - accuracy_lora) * 100.0,
        mean_pixel_distance,
    }
}

/// Mean |a − b| over pixels and channels (0–255); images of different sizes are compared after
/// resizing `b` to `a`.
pub fn mean_abs_difference(a: &RgbImage, b: &RgbImage) -> f64 {
    let resized;
    let b = if a.dimensions() == b.dimensions() {
        b
    } else {
        resized = image::imageops::resize(b, a.width(), a.height(), image::imageops::FilterType::Triangle);
        &resized
    };
    let n = a.as_raw().len().max(1) as f64;
    a.as_raw().iter().zip(b.as_raw()).map(|(&x, &y)| (x as f64 - y as f64).abs()).sum::<f64>() / n
}
