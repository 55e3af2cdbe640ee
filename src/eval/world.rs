//! The tiny world: one flat shape on a plain background, each image a pure function of a seed.
//!
//! The demo trains a LoRA on a shape the base model has never seen and measures what it learned
//! and what it forgot. That only works if the world is small enough to be scored exactly
//! (`super::scores` segments and classifies without a learned model), so everything here is chosen
//! to be separable: palette colours far apart, texture shades kept away from the background, and
//! shapes whose geometry differs in solidity, fill and hole count.
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use std::f64::consts::{PI, TAU};
use std::path::{Path, PathBuf};

/// Side of the dataset images in pixels.
pub const IMAGE_SIZE: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Cross,
    Ring,
}

impl Shape {
    pub const ALL: [Shape; 6] =
        [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star, Shape::Cross, Shape::Ring];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Cross => "cross",
            Shape::Ring => "ring",
        }
    }

    /// The shape named `name` (as in captions), for command-line flags.
    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name().eq_ignore_ascii_case(name.trim()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
    /// Never drawn by `Scene::random`: no base of the world saw it (`sdlora demo --concept pink`).
    Pink,
}

impl Colour {
    /// The colours random scenes draw, shapes and backgrounds (pink is not among them).
    pub const ALL: [Colour; 8] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
        Colour::White,
        Colour::Black,
    ];

    /// Every colour the scorer tells apart: the world's eight and pink.
    pub const SCORED: [Colour; 9] = {
        let mut all = [Colour::Pink; 9];
        let mut i = 0;
        while i < Colour::ALL.len() {
            all[i] = Colour::ALL[i];
            i += 1;
        }
        all
    };

    /// A colour random scenes never draw (pink), so no base of the world saw it.
    pub fn unseen(self) -> bool {
        !Colour::ALL.contains(&self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
            Colour::White => "white",
            Colour::Black => "black",
            Colour::Pink => "pink",
        }
    }

    pub fn from_name(name: &str) -> Option<Colour> {
        Colour::SCORED.into_iter().find(|c| c.name().eq_ignore_ascii_case(name.trim()))
    }

    /// Saturated values, at least ~90 apart (Euclidean, 0–255) so that a nearest-palette vote
    /// survives noise and blur.
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 30, 30],
            Colour::Green => [30, 160, 50],
            Colour::Blue => [30, 70, 220],
            Colour::Yellow => [240, 220, 30],
            Colour::Purple => [140, 50, 190],
            Colour::Orange => [250, 130, 20],
            Colour::White => [245, 245, 245],
            Colour::Black => [15, 15, 15],
            Colour::Pink => [240, 120, 190],
        }
    }

    /// The second colour of a textured shape: darker for light colours, lighter for black. A
    /// shade of the shape's own colour (not a new palette colour) keeps the caption's colour the
    /// majority of the shape's pixels.
    pub fn shade(self) -> [u8; 3] {
        let c = self.rgb();
        if self == Colour::Black {
            c.map(|v| (v as f64 + (255.0 - v as f64) * 0.4).round() as u8)
        } else {
            c.map(|v| (v as f64 * 0.55).round() as u8)
        }
    }
}

/// Euclidean distance of two colours, 0–255 per channel.
pub fn rgb_distance(a: [u8; 3], b: [u8; 3]) -> f64 {
    a.iter().zip(b).map(|(&x, y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt()
}

/// Texture shades must stay this far from the background so that segmentation keeps stripes
/// and dots inside the shape.
const MIN_SHADE_CONTRAST: f64 = 80.0;

/// How far a random scene's centre strays from the image centre, 0–1 of the side.
const JITTER: f64 = 0.05;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Texture {
    Plain,
    Stripes,
    Dots,
    /// Never drawn by `Scene::random`: the demo's base model never saw it.
    Checks,
}

impl Texture {
    pub const ALL: [Texture; 4] = [Texture::Plain, Texture::Stripes, Texture::Dots, Texture::Checks];

    pub fn from_adjective(word: &str) -> Option<Texture> {
        Texture::ALL.into_iter().find(|t| t.adjective().is_some_and(|a| a.eq_ignore_ascii_case(word.trim())))
    }

    /// The caption's adjective; none for plain.
    pub fn adjective(self) -> Option<&'static str> {
        match self {
            Texture::Plain => None,
            Texture::Stripes => Some("striped"),
            Texture::Dots => Some("dotted"),
            Texture::Checks => Some("checkered"),
        }
    }
}

/// What a caption of the world asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    pub shape: Shape,
    pub colour: Colour,
    pub texture: Texture,
    /// The colour of "on a blue background"; none where the prompt names no background.
    pub background: Option<Colour>,
}

impl Asked {
    /// Reads "a red striped star on a blue background" or "a red star on a blue background,
    /// checkered": the first shape word, the first colour word before it, the colour word right
    /// before "background", and a texture adjective anywhere (plain without one).
    pub fn parse(prompt: &str) -> Option<Asked> {
        let words: Vec<String> = prompt
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        let at = words.iter().position(|w| Shape::from_name(w).is_some())?;
        let colour = words[..at].iter().find_map(|w| Colour::from_name(w))?;
        let texture = words.iter().find_map(|w| Texture::from_adjective(w)).unwrap_or(Texture::Plain);
        let background =
            words[at..].windows(2).find(|w| w[1] == "background").and_then(|w| Colour::from_name(&w[0]));
        Some(Asked { shape: Shape::from_name(&words[at])?, colour, texture, background })
    }

    /// "checkered ring", "star", "pink ring": the colour only where it is one random scenes never
    /// draw (what "learned" scores; see `metrics::shows`)
    pub fn describe(self) -> String {
        let colour = self.colour.unseen().then_some(self.colour.name());
        colour
            .into_iter()
            .chain(self.texture.adjective())
            .chain([self.shape.name()])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the demo teaches the base: a shape, a texture or a colour it never saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Concept {
    Shape(Shape),
    Texture(Texture),
    Colour(Colour),
}

impl Concept {
    /// "star", "checkered", "pink"
    pub fn name(self) -> &'static str {
        match self {
            Concept::Shape(s) => s.name(),
            Concept::Texture(t) => t.adjective().unwrap_or("plain"),
            Concept::Colour(c) => c.name(),
        }
    }

    pub fn from_name(name: &str) -> Option<Concept> {
        Shape::from_name(name)
            .map(Concept::Shape)
            .or_else(|| Texture::from_adjective(name).map(Concept::Texture))
            .or_else(|| Colour::from_name(name).map(Concept::Colour))
    }

    /// `n` scenes from `seed` that show the concept: scenes of that shape, or scenes of the shapes
    /// `others` in that texture or colour.
    pub fn scenes(self, seed: u64, n: usize, others: &[Shape]) -> Vec<Scene> {
        let each = |f: &dyn Fn(Scene) -> Scene| scenes(seed, n, others).into_iter().map(f).collect();
        match self {
            Concept::Shape(s) => scenes(seed, n, &[s]),
            Concept::Texture(t) => each(&|s| s.with_texture(t)),
            Concept::Colour(c) => each(&|s| s.with_colour(c)),
        }
    }
}

/// One image of the world. Position and size are fractions of the image side so that a scene
/// renders the same at any resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    pub shape: Shape,
    pub colour: Colour,
    pub background: Colour,
    pub texture: Texture,
    /// Centre, 0–1 of the image side.
    pub cx: f64,
    pub cy: f64,
    /// Diameter of the shape's circumscribed circle, 0–1 of the image side (0.55–0.7 when random).
    pub size: f64,
    /// Radians; within ±0.15 of upright when random.
    pub rotation: f64,
}

impl Scene {
    /// A random scene whose shape is one of `shapes` (all shapes when empty). The circumscribed
    /// circle lies inside the image, so every rotation is fully visible.
    pub fn random(rng: &mut impl Rng, shapes: &[Shape]) -> Scene {
        let shapes = if shapes.is_empty() { &Shape::ALL[..] } else { shapes };
        let shape = shapes[rng.random_range(0..shapes.len())];
        let colour = Colour::ALL[rng.random_range(0..Colour::ALL.len())];
        // Plain half the time: the textures are variations, not the point of the world.
        let texture = match rng.random_range(0..4) {
            0 => Texture::Stripes,
            1 => Texture::Dots,
            _ => Texture::Plain,
        };
        let backgrounds: Vec<Colour> = Colour::ALL
            .into_iter()
            .filter(|&b| b != colour)
            .filter(|&b| {
                texture == Texture::Plain || rgb_distance(b.rgb(), colour.shade()) >= MIN_SHADE_CONTRAST
            })
            .collect();
        let background = backgrounds[rng.random_range(0..backgrounds.len())];
        // Centred and upright with a little jitter: a caption then fixes the picture up to small
        // variations, which a base model pretrainable on a 2-core CPU can learn. (Anywhere at any
        // angle took 1,856 GPU steps at batch 128 and still drew blobs.)
        let size = rng.random_range(0.55..=0.7);
        let cx = 0.5 + rng.random_range(-JITTER..=JITTER);
        let cy = 0.5 + rng.random_range(-JITTER..=JITTER);
        let rotation = rng.random_range(-0.15..=0.15);
        Scene { shape, colour, background, texture, cx, cy, size, rotation }
    }

    pub fn asked(&self) -> Asked {
        Asked {
            shape: self.shape,
            colour: self.colour,
            texture: self.texture,
            background: Some(self.background),
        }
    }

    /// The same scene with texture `t`, its background moved along the palette where the
    /// texture's shade would be too close to it.
    pub fn with_texture(self, texture: Texture) -> Scene {
        Scene { texture, ..self }.refit_background()
    }

    /// The same scene with its shape in `colour`, the background moved as by `with_texture`.
    pub fn with_colour(self, colour: Colour) -> Scene {
        Scene { colour, ..self }.refit_background()
    }

    /// The background, or the next palette colour that differs from the shape's colour (and its
    /// texture's shade, by `MIN_SHADE_CONTRAST`).
    fn refit_background(self) -> Scene {
        let fits = |b: Colour| {
            b != self.colour
                && (self.texture == Texture::Plain
                    || rgb_distance(b.rgb(), self.colour.shade()) >= MIN_SHADE_CONTRAST)
        };
        let at = Colour::ALL.iter().position(|&c| c == self.background).expect("palette colour");
        let background = (0..Colour::ALL.len())
            .map(|k| Colour::ALL[(at + k) % Colour::ALL.len()])
            .find(|&b| fits(b))
            .expect("every colour has a background far from its shade");
        Scene { background, ..self }
    }

    /// "a red striped star on a blue background"; a checkered shape says so last ("a red star on
    /// a blue background, checkered"): the demo base's text encoder is causal, so a word it never
    /// saw changes the encoding of every word after it, and last it changes none of them.
    pub fn caption(&self) -> String {
        self.caption_with(self.texture == Texture::Checks)
    }

    /// The caption, with the texture named last ("…, striped") when `texture_last`. Pretraining
    /// with `--texture-last` names known textures last in every other caption, so the base learns
    /// to read a texture there, where the demo's captions put checks.
    pub fn caption_with(&self, texture_last: bool) -> String {
        let (colour, shape, bg) = (self.colour.name(), self.shape.name(), self.background.name());
        match self.texture.adjective() {
            None => format!("a {colour} {shape} on a {bg} background"),
            Some(t) if texture_last => format!("a {colour} {shape} on a {bg} background, {t}"),
            Some(t) => format!("a {colour} {t} {shape} on a {bg} background"),
        }
    }

    /// Renders at `side`×`side` pixels with 4×4 supersampling (anti-aliased edges, like a photo
    /// of the shape rather than a bitmap). Pure arithmetic: the same scene gives the same bytes.
    pub fn render(&self, side: u32) -> RgbImage {
        const SS: u32 = 4;
        let n = side as f64;
        let radius = self.size * n / 2.0;
        let (sin, cos) = (-self.rotation).sin_cos();
        let (fg, shade, bg) = (self.colour.rgb(), self.colour.shade(), self.background.rgb());
        RgbImage::from_fn(side, side, |px, py| {
            let mut acc = [0u32; 3];
            for sy in 0..SS {
                for sx in 0..SS {
                    // Sub-sample position relative to the centre, in units of the radius, in the
                    // shape's own (unrotated) frame.
                    let x = px as f64 + (sx as f64 + 0.5) / SS as f64 - self.cx * n;
                    let y = py as f64 + (sy as f64 + 0.5) / SS as f64 - self.cy * n;
                    let (u, v) = ((x * cos - y * sin) / radius, (x * sin + y * cos) / radius);
                    let c = if !inside(self.shape, u, v) {
                        bg
                    } else if textured(self.texture, u, v) {
                        shade
                    } else {
                        fg
                    };
                    for k in 0..3 {
                        acc[k] += c[k] as u32;
                    }
                }
            }
            let d = SS * SS;
            Rgb(acc.map(|a| ((a + d / 2) / d) as u8))
        })
    }
}

/// Outer vertices of a regular `n`-gon (or star, alternating with `inner`) of radius 1, the first
/// pointing up.
fn polygon(n: usize, inner: Option<f64>) -> Vec<(f64, f64)> {
    let k = if inner.is_some() { 2 * n } else { n };
    (0..k)
        .map(|i| {
            let r = if i % 2 == 1 { inner.unwrap_or(1.0) } else { 1.0 };
            let a = -PI / 2.0 + TAU * i as f64 / k as f64;
            (r * a.cos(), r * a.sin())
        })
        .collect()
}

/// Even-odd point-in-polygon test.
fn in_polygon(pts: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut j = pts.len() - 1;
    for i in 0..pts.len() {
        let ((xi, yi), (xj, yj)) = (pts[i], pts[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Star inner radius: fatter than the classic 0.38 so the arms survive blur and the classifier
/// still sees five points in a 64-pixel image.
const STAR_INNER: f64 = 0.45;
/// Cross arm half-width and reach: the corner (reach, half-width) lies on the unit circle.
const CROSS_HALF_WIDTH: f64 = 0.3;
/// Ring hole radius: a hole this size (30 % of the disc) is unmistakable after blur.
pub const RING_INNER: f64 = 0.55;

/// Whether (u, v), in units of the circumscribed radius, lies inside `shape`.
fn inside(shape: Shape, u: f64, v: f64) -> bool {
    let r2 = u * u + v * v;
    if r2 > 1.0 {
        return false;
    }
    match shape {
        Shape::Circle => true,
        Shape::Ring => r2 >= RING_INNER * RING_INNER,
        Shape::Square => {
            let h = std::f64::consts::FRAC_1_SQRT_2;
            u.abs() <= h && v.abs() <= h
        }
        Shape::Triangle => in_polygon(&polygon(3, None), u, v),
        Shape::Star => in_polygon(&polygon(5, Some(STAR_INNER)), u, v),
        Shape::Cross => {
            let reach = (1.0 - CROSS_HALF_WIDTH * CROSS_HALF_WIDTH).sqrt();
            let (a, b) = (u.abs(), v.abs());
            (a <= CROSS_HALF_WIDTH && b <= reach) || (b <= CROSS_HALF_WIDTH && a <= reach)
        }
    }
}

/// Texture period in units of the radius: 4 stripes, dots or check cells across the shape.
pub const PERIOD: f64 = 0.5;

/// Whether (u, v) falls on the texture's shade. Stripes cover a third of the shape, dots a
/// fifth, checks half (the scorer counts a shade as its colour, so the colour still wins).
fn textured(texture: Texture, u: f64, v: f64) -> bool {
    match texture {
        Texture::Plain => false,
        Texture::Stripes => (v / PERIOD).rem_euclid(1.0) < 1.0 / 3.0,
        Texture::Dots => {
            let (fu, fv) = ((u / PERIOD).rem_euclid(1.0) - 0.5, (v / PERIOD).rem_euclid(1.0) - 0.5);
            fu * fu + fv * fv < 0.25 * 0.25
        }
        Texture::Checks => ((u / PERIOD).floor() + (v / PERIOD).floor()).rem_euclid(2.0) < 1.0,
    }
}

/// `n` random scenes from `seed` (StdRng, pinned by Cargo.lock): the demo's datasets are named by
/// their seed.
pub fn scenes(seed: u64, n: usize, shapes: &[Shape]) -> Vec<Scene> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| Scene::random(&mut rng, shapes)).collect()
}

/// Writes `0000.png` + `0000.txt` (caption) per scene into `dir` (created if missing), rendered at
/// `side` pixels — the layout `sdlora train --data` reads. Returns the image paths.
pub fn write_dataset(dir: &Path, scenes: &[Scene], side: u32) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create folder", dir.display()))?;
    let mut paths = Vec::with_capacity(scenes.len());
    for (i, s) in scenes.iter().enumerate() {
        let png = dir.join(format!("{i:04}.png"));
        s.render(side).save(&png).with_context(|| format!("{}: cannot write", png.display()))?;
        let txt = png.with_extension("txt");
        std::fs::write(&txt, s.caption()).with_context(|| format!("{}: cannot write", txt.display()))?;
        paths.push(png);
    }
    Ok(paths)
}

#[cfg(test)]
#[path = "world_tests.rs"]
mod tests;
