//! What does an image show? Exact, procedural measurement for the tiny world — no learned
//! classifier, so the demo's scores cannot share a model's blind spots.
//!
//! The world guarantees: a plain background (its border), one shape far from it in colour
//! (≥ ~80 in RGB distance, texture shades included), shapes that differ in geometry. So:
//! background = median of the border; foreground = pixels far from it, cleaned by a majority
//! filter and reduced to the largest connected blob; colour = majority vote of the blob's interior
//! over the palette (and its texture shades); shape = holes, the outline's number of points
//! (radial profile), solidity (area / convex hull) and fill (area / circumscribed disc), compared
//! with each shape's typical values; texture = which of the blob's interior pixels are nearer the
//! colour's shade than the colour, and how that pattern runs (see `texture_of`).
use super::world::{rgb_distance, Colour, Shape, Texture, PERIOD};
use image::{Rgb, RgbImage};
use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Detected {
    pub shape: Option<Shape>,
    pub colour: Option<Colour>,
    pub background: Option<Colour>,
    pub texture: Option<Texture>,
}

/// Geometry of the foreground blob (holes filled), exposed for diagnostics and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features {
    /// Blob area (holes filled) / image area.
    pub area: f64,
    /// Area / convex hull area (of pixel squares): ~0.93 for the convex shapes at 64 pixels,
    /// ~0.7 for the star, ~0.76 for the cross.
    pub solidity: f64,
    /// Area / disc through the farthest pixel: ~0.94 circle, 0.69 square, 0.5 triangle.
    pub fill: f64,
    /// Largest hole / blob area (holes filled): ~0.2 for the ring (0.30 ideal, less once edges
    /// blur), 0 otherwise.
    pub hole: f64,
    /// Points of the outline: 0 circle, 3 triangle, 4 square and cross, 5 star.
    pub points: usize,
    /// Radius of the circumscribed disc, pixels.
    pub radius: f64,
}

/// A pixel belongs to the foreground when it is this far (RGB, 0–255) from the background: half
/// the world's minimum contrast, so anti-aliased edges split evenly and σ=15 noise rarely crosses.
const FOREGROUND_DISTANCE: f64 = 40.0;
/// Blobs smaller than this share of the image are noise, not a shape (the smallest shape of the
/// world covers ~5 %).
const MIN_AREA: f64 = 0.015;
/// Blobs larger than this mean the background estimate failed.
const MAX_AREA: f64 = 0.85;
/// Foreground outside the largest blob, as a share of the blob: the world draws one shape, so
/// more than this is clutter (a failed sample, structured noise), not a shape.
const MAX_CLUTTER: f64 = 0.25;

/// Measures what `img` shows. Any field is `None` where the image does not show it clearly (an
/// empty or cluttered border, no blob, or a blob unlike every shape).
pub fn classify(img: &RgbImage) -> Detected {
    let Some(m) = measure(img) else { return Detected::default() };
    Detected {
        shape: m.features.and_then(shape_of),
        colour: m.colour,
        background: m.background,
        texture: m.texture,
    }
}

/// Intermediate results of `classify`.
#[derive(Debug, Clone)]
pub struct Measured {
    pub background: Option<Colour>,
    pub colour: Option<Colour>,
    pub features: Option<Features>,
    pub texture: Option<Texture>,
}

pub fn measure(img: &RgbImage) -> Option<Measured> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < 8 || h < 8 {
        return None;
    }
    // Everything is measured on a 3×3-smoothed copy: it divides pixel noise by three (a sampler's
    // grain, σ up to ~30, then stays below the foreground distance) and moves edges by less than
    // a pixel, which the shape features tolerate.
    let px: Vec<[u8; 3]> = blur3(img).pixels().map(|p| p.0).collect();
    let (bg, border_uniform) = border_colour(&px, w, h);
    let background = if border_uniform { Some(nearest(bg, &palette())) } else { None };
    let far: Vec<bool> = px.iter().map(|&p| rgb_distance(p, bg) > FOREGROUND_DISTANCE).collect();
    let mask = majority3(&far, w, h);
    let blob = largest_component(&mask, w, h);
    let area = blob.iter().filter(|&&b| b).count();
    if (area as f64) < MIN_AREA * (w * h) as f64 {
        return Some(Measured { background, colour: None, features: None, texture: None });
    }
    let dominant = dominant_colour(&px, &blob, w, h, background);
    let colour = Some(dominant);
    let (filled, hole) = fill_holes(&blob, w, h);
    let features = geometry(&filled, w, h, hole);
    // No shape without a plain background to stand on, nor in clutter: noise must not score.
    let clutter = (mask.iter().filter(|&&b| b).count() - area) as f64 / area as f64;
    let clean = features.area <= MAX_AREA && border_uniform && clutter <= MAX_CLUTTER;
    let texture = if clean { texture_of(img, &blob, w, features.radius, dominant, bg) } else { None };
    Some(Measured { background, colour, features: clean.then_some(features), texture })
}

/// The palette as (colour, rgb) prototypes.
fn palette() -> Vec<(Colour, [u8; 3])> {
    Colour::SCORED.iter().map(|&c| (c, c.rgb())).collect()
}

fn nearest(p: [u8; 3], protos: &[(Colour, [u8; 3])]) -> Colour {
    let d = |q: &[u8; 3]| rgb_distance(p, *q);
    protos.iter().min_by(|a, b| d(&a.1).total_cmp(&d(&b.1))).expect("non-empty palette").0
}

/// Median of the 2-pixel border per channel (robust to a shape touching the edge), and whether
/// most of the border is that colour.
fn border_colour(px: &[[u8; 3]], w: usize, h: usize) -> ([u8; 3], bool) {
    let border: Vec<[u8; 3]> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .filter(|&(x, y)| x < 2 || y < 2 || x >= w - 2 || y >= h - 2)
        .map(|(x, y)| px[y * w + x])
        .collect();
    let mut bg = [0u8; 3];
    for (k, b) in bg.iter_mut().enumerate() {
        let mut ch: Vec<u8> = border.iter().map(|p| p[k]).collect();
        ch.sort_unstable();
        *b = ch[ch.len() / 2];
    }
    let close = border.iter().filter(|&&p| rgb_distance(p, bg) <= FOREGROUND_DISTANCE).count();
    (bg, close * 4 >= border.len() * 3)
}

/// 3×3 majority filter (outside the image counts as background): removes noise specks and fills
/// pinholes without moving straight edges.
fn majority3(m: &[bool], w: usize, h: usize) -> Vec<bool> {
    let mut out = vec![false; m.len()];
    for y in 0..h {
        for x in 0..w {
            let mut n = 0;
            for yy in y.saturating_sub(1)..(y + 2).min(h) {
                for xx in x.saturating_sub(1)..(x + 2).min(w) {
                    n += m[yy * w + xx] as u32;
                }
            }
            out[y * w + x] = n >= 5;
        }
    }
    out
}

/// 4-connected components of `m` where `m[i] == value`, labelled from 1 (0 = not `value`).
fn components(m: &[bool], w: usize, h: usize, value: bool) -> (Vec<u32>, Vec<usize>) {
    let mut label = vec![0u32; m.len()];
    let mut sizes = vec![0usize];
    let mut stack = vec![];
    for start in 0..m.len() {
        if m[start] != value || label[start] != 0 {
            continue;
        }
        let id = sizes.len() as u32;
        sizes.push(0);
        label[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            sizes[id as usize] += 1;
            let (x, y) = (i % w, i / w);
            let mut visit = |j: usize| {
                if m[j] == value && label[j] == 0 {
                    label[j] = id;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
    }
    (label, sizes)
}

fn largest_component(m: &[bool], w: usize, h: usize) -> Vec<bool> {
    let (label, sizes) = components(m, w, h, true);
    let Some(best) = (1..sizes.len()).max_by_key(|&i| sizes[i]) else { return vec![false; m.len()] };
    label.iter().map(|&l| l == best as u32).collect()
}

/// The blob with its holes filled, and the largest hole's share of the filled area. A hole is a
/// background region that does not reach the image border.
fn fill_holes(blob: &[bool], w: usize, h: usize) -> (Vec<bool>, f64) {
    let (label, sizes) = components(blob, w, h, false);
    let mut touches = vec![false; sizes.len()];
    for y in 0..h {
        for x in 0..w {
            if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
                touches[label[y * w + x] as usize] = true;
            }
        }
    }
    let filled: Vec<bool> = blob.iter().zip(&label).map(|(&b, &l)| b || !touches[l as usize]).collect();
    let area = filled.iter().filter(|&&b| b).count().max(1);
    let hole = (1..sizes.len()).filter(|&i| !touches[i]).map(|i| sizes[i]).max().unwrap_or(0);
    (filled, hole as f64 / area as f64)
}

/// Majority vote of the blob's interior pixels (edges blend into the background) over the palette
/// and its texture shades, the background's own colour excluded.
fn dominant_colour(px: &[[u8; 3]], blob: &[bool], w: usize, h: usize, bg: Option<Colour>) -> Colour {
    let protos: Vec<(Colour, [u8; 3])> = Colour::SCORED
        .iter()
        .filter(|&&c| Some(c) != bg)
        .flat_map(|&c| [(c, c.rgb()), (c, c.shade())])
        .collect();
    let inner = erode(blob, w, h);
    let interior: Vec<usize> = (0..blob.len()).filter(|&i| inner[i]).collect();
    let pixels: Vec<usize> =
        if interior.len() >= 20 { interior } else { (0..blob.len()).filter(|&i| blob[i]).collect() };
    let mut votes = [0usize; Colour::SCORED.len()];
    for i in pixels {
        let c = nearest(px[i], &protos);
        votes[Colour::SCORED.iter().position(|&k| k == c).expect("palette colour")] += 1;
    }
    let best = (0..votes.len()).max_by_key(|&i| votes[i]).expect("non-empty palette");
    Colour::SCORED[best]
}

/// A texture's strongest wave must swing the interior this much (0 = the colour, 1 = its shade):
/// the world's textures swing ~0.5, the base's softest ~0.1, a plain shape's noise ~0.03.
const PLAIN_SWING: f64 = 0.08;
/// Checks when their diagonal wave beats the waves of stripes and dots by this much: a generated
/// shape's uneven shading has some of every wave.
const CHECK_MARGIN: f64 = 1.25;
/// A checkerboard's two diagonal waves are equally strong; stripes running along one diagonal
/// (what an undertrained LoRA draws for checks) have only one. In 79 of 80 of the base VAE's
/// reconstructions of real checks the weaker is ≥ 0.54 of the stronger (a narrow cross: 0.35).
const BOTH_DIAGONALS: f64 = 0.5;

/// The texture of a blob of colour `colour` and circumscribed radius `radius` (pixels), read from
/// the unsmoothed image: each interior pixel (two pixels inside the outline, where the background
/// does not blend in) is placed between the colour (0) and its shade (1), and the waves of the
/// world's textures are looked for in that field. The textures repeat every `PERIOD` radii:
/// stripes make one wave going down, dots the same wave going down and going across, and checks
/// (cells of one period, so the pattern repeats after two) a wave of twice that length running
/// along each diagonal, where stripes and dots have none. Each wave is searched over ±15 % in scale
/// and ±0.15 rad of rotation (the world's shapes are upright within that).
fn texture_of(
    img: &RgbImage,
    blob: &[bool],
    w: usize,
    radius: f64,
    colour: Colour,
    bg: [u8; 3],
) -> Option<Texture> {
    let h = blob.len() / w;
    let inner = erode(&erode(blob, w, h), w, h);
    let f64s = |c: [u8; 3]| c.map(f64::from);
    let (fg, shade, bg) = (f64s(colour.rgb()), f64s(colour.shade()), f64s(bg));
    let dot = |x: [f64; 3], y: [f64; 3]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    let minus = |x: [f64; 3], y: [f64; 3]| -> [f64; 3] { std::array::from_fn(|k| x[k] - y[k]) };
    // pixel − colour = t·(shade − colour) + u·(background − colour): blur at the outline mixes in
    // the background, which u takes up, so only the texture moves t
    let (a, b) = (minus(shade, fg), minus(bg, fg));
    let (aa, ab, bb) = (dot(a, a), dot(a, b), dot(b, b));
    let det = aa * bb - ab * ab;
    let mut field: Vec<(f64, f64, f64)> = (0..blob.len())
        .filter(|&i| inner[i])
        .map(|i| {
            let d = minus(f64s([0, 1, 2].map(|k| img.as_raw()[3 * i + k])), fg);
            // shade and background in about the same direction: t alone
            let t =
                if det > 0.05 * aa * bb { (bb * dot(a, d) - ab * dot(b, d)) / det } else { dot(a, d) / aa };
            ((i % w) as f64, (i / w) as f64, t)
        })
        .collect();
    if field.len() < 30 {
        return None;
    }
    let mean = field.iter().map(|f| f.2).sum::<f64>() / field.len() as f64;
    field.iter_mut().for_each(|f| f.2 -= mean);
    // amplitude of the best-fitting wave exp(i k·p) of `cycles` periods per PERIOD radii along
    // direction (dx, dy) of the shape's frame
    let swing = |cycles: f64, dir: (f64, f64)| {
        let mut best: f64 = 0.0;
        for scale in [0.85, 0.92, 1.0, 1.08, 1.16] {
            for rot in [-0.15, -0.075, 0.0, 0.075, 0.15_f64] {
                let (sin, cos) = rot.sin_cos();
                let k = std::f64::consts::TAU * cycles / (PERIOD * radius * scale);
                let (kx, ky) = (k * (dir.0 * cos - dir.1 * sin), k * (dir.0 * sin + dir.1 * cos));
                let (re, im) = field.iter().fold((0.0, 0.0), |(re, im), &(x, y, t)| {
                    let (s, c) = (kx * x + ky * y).sin_cos();
                    (re + t * c, im + t * s)
                });
                best = best.max(2.0 * (re * re + im * im).sqrt() / field.len() as f64);
            }
        }
        best
    };
    let down = swing(1.0, (0.0, 1.0));
    let across = swing(1.0, (1.0, 0.0));
    let d = std::f64::consts::FRAC_1_SQRT_2;
    // a check pattern's wave: half a cycle per period along each axis, i.e. along a diagonal
    let (falling, rising) = (swing(d, (d, d)), swing(d, (d, -d)));
    let diagonal = falling.max(rising);
    let checkered = diagonal >= PLAIN_SWING
        && diagonal >= CHECK_MARGIN * down.max(across)
        && falling.min(rising) >= BOTH_DIAGONALS * diagonal;
    Some(if checkered {
        Texture::Checks
    } else if down.max(across) < PLAIN_SWING {
        Texture::Plain
    } else if across < 0.5 * down {
        Texture::Stripes
    } else {
        Texture::Dots
    })
}

/// Pixels of `m` whose four neighbours are all in `m`.
fn erode(m: &[bool], w: usize, h: usize) -> Vec<bool> {
    (0..m.len())
        .map(|i| {
            let (x, y) = (i % w, i / w);
            m[i] && x > 0 && y > 0 && x + 1 < w && y + 1 < h && m[i - 1] && m[i + 1] && m[i - w] && m[i + w]
        })
        .collect()
}

/// Area, solidity and fill of a filled blob. Pixels are unit squares: the hull is taken over
/// their corners and the circumscribed radius to their far corners, so a perfect small square
/// measures solidity 1, not more.
fn geometry(filled: &[bool], w: usize, h: usize, hole: f64) -> Features {
    let idx: Vec<(f64, f64)> = (0..filled.len())
        .filter(|&i| filled[i])
        .map(|i| ((i % w) as f64 + 0.5, (i / w) as f64 + 0.5))
        .collect();
    let area = idx.len() as f64;
    let (cx, cy) = idx.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y)).to_owned();
    let (cx, cy) = (cx / area, cy / area);
    // Pixel centres on the blob's boundary carry its outline; their corners bound the hull.
    let mut corners = vec![];
    let mut rmax: f64 = 0.0;
    for &(x, y) in &idx {
        let (ix, iy) = (x as usize, y as usize);
        let edge = ix == 0 || iy == 0 || ix + 1 == w || iy + 1 == h || {
            let f = |xx: usize, yy: usize| filled[yy * w + xx];
            !(f(ix - 1, iy) && f(ix + 1, iy) && f(ix, iy - 1) && f(ix, iy + 1))
        };
        if edge {
            for (dx, dy) in [(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)] {
                corners.push((x + dx, y + dy));
            }
            // Distance to the pixel's centre plus half a pixel: the disc through the outline.
            rmax = rmax.max(((x - cx).powi(2) + (y - cy).powi(2)).sqrt() + 0.5);
        }
    }
    let hull = hull_area(&mut corners).max(area);
    Features {
        area: area / (w * h) as f64,
        solidity: area / hull,
        fill: area / (std::f64::consts::PI * rmax * rmax),
        hole,
        points: points(filled, w, h, (cx, cy)),
        radius: rmax,
    }
}

/// Number of points (tips, corners, arms) of the outline: the radial profile — distance from the
/// centroid to the blob's farthest pixel along each of 180 rays — is split at half-way between its
/// minimum and maximum, and the runs above count. Unlike solidity this does not shift under blur:
/// a blurred star still has five tips, a blurred cross four arms.
fn points(filled: &[bool], w: usize, h: usize, (cx, cy): (f64, f64)) -> usize {
    const RAYS: usize = 180;
    let profile: Vec<f64> = (0..RAYS)
        .map(|i| {
            let (dy, dx) = (std::f64::consts::TAU * i as f64 / RAYS as f64).sin_cos();
            let (mut r, mut far) = (0.0, 0.0);
            loop {
                let (x, y) = (cx + r * dx, cy + r * dy);
                if x < 0.0 || y < 0.0 || x >= w as f64 || y >= h as f64 {
                    break far;
                }
                if filled[y as usize * w + x as usize] {
                    far = r;
                }
                r += 0.25;
            }
        })
        .collect();
    // Smooth over ±2 rays (±4°): pixel steps, not shape, make the finest wiggles.
    let smooth: Vec<f64> =
        (0..RAYS).map(|i| (0..5).map(|k| profile[(i + RAYS + k - 2) % RAYS]).sum::<f64>() / 5.0).collect();
    let (lo, hi) = smooth.iter().fold((f64::MAX, f64::MIN), |(a, b), &r| (a.min(r), b.max(r)));
    // A circle's profile is flat up to pixel steps: no points.
    if hi <= 0.0 || (hi - lo) / hi < 0.12 {
        return 0;
    }
    // Hysteresis around the mid level so that noise on a slope is not counted twice.
    let (mid, band) = ((hi + lo) / 2.0, (hi - lo) * 0.1);
    let start = (0..RAYS).min_by(|&a, &b| smooth[a].total_cmp(&smooth[b])).expect("rays");
    let (mut above, mut runs) = (false, 0);
    for k in 0..RAYS {
        let r = smooth[(start + k) % RAYS];
        if !above && r > mid + band {
            (above, runs) = (true, runs + 1);
        } else if above && r < mid - band {
            above = false;
        }
    }
    runs
}

/// Area of the convex hull (Andrew's monotone chain + shoelace).
fn hull_area(pts: &mut [(f64, f64)]) -> f64 {
    pts.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
    let cross =
        |o: (f64, f64), a: (f64, f64), b: (f64, f64)| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    let mut hull: Vec<(f64, f64)> = Vec::with_capacity(pts.len() + 1);
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(f64, f64)>> =
            if pass == 0 { Box::new(pts.iter()) } else { Box::new(pts.iter().rev()) };
        for &p in iter {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0.0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    let n = hull.len();
    (0..n).map(|i| hull[i].0 * hull[(i + 1) % n].1 - hull[(i + 1) % n].0 * hull[i].1).sum::<f64>().abs() / 2.0
}

/// (solidity, fill) of each hole-free shape, half-way between the means measured on clean and on
/// blurred+noisy renders (the test `features_of_renders` prints them), and its point count; the
/// ring is recognised by its hole.
const PROTOTYPES: [(Shape, f64, f64, usize); 5] = [
    (Shape::Circle, 0.965, 0.94, 0),
    (Shape::Square, 0.938, 0.69, 4),
    (Shape::Triangle, 0.918, 0.50, 3),
    (Shape::Star, 0.705, 0.55, 5),
    (Shape::Cross, 0.766, 0.665, 4),
];
/// A blob farther than this from every prototype is not a shape of the world.
const MAX_PROTOTYPE_DISTANCE: f64 = 0.2;
/// A hole this large (the ring's measures 0.15–0.29) marks a ring; stripes and dots never leave
/// one.
const RING_HOLE: f64 = 0.12;

fn shape_of(f: Features) -> Option<Shape> {
    if f.hole >= RING_HOLE {
        return (f.fill > 0.7 && f.solidity > 0.85).then_some(Shape::Ring);
    }
    // The point count decides between shapes that solidity and fill confuse after blur (star and
    // cross); solidity and fill decide between equal counts (square and cross). A count that no
    // shape has (a blob from a failed sample) falls back to the nearest prototype.
    let d = |p: &&(Shape, f64, f64, usize)| ((f.solidity - p.1).powi(2) + (f.fill - p.2).powi(2)).sqrt();
    let nearest = |it: &mut dyn Iterator<Item = &(Shape, f64, f64, usize)>| {
        it.min_by(|a, b| d(a).total_cmp(&d(b))).filter(|p| d(p) <= MAX_PROTOTYPE_DISTANCE).map(|p| p.0)
    };
    nearest(&mut PROTOTYPES.iter().filter(|p| p.3 == f.points)).or_else(|| nearest(&mut PROTOTYPES.iter()))
}

/// 3×3 box blur (edges replicate): a stand-in for a generated image's softness.
pub fn blur3(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let mut acc = [0u32; 3];
        for dy in -1..=1 {
            for dx in -1..=1 {
                let (xx, yy) = ((x as i64 + dx).clamp(0, w - 1), (y as i64 + dy).clamp(0, h - 1));
                let p = img.get_pixel(xx as u32, yy as u32).0;
                for k in 0..3 {
                    acc[k] += p[k] as u32;
                }
            }
        }
        Rgb(acc.map(|a| ((a + 4) / 9) as u8))
    })
}

/// Adds independent Gaussian noise of standard deviation `sigma` (0–255 scale) to every channel.
pub fn add_noise(img: &RgbImage, sigma: f64, rng: &mut impl Rng) -> RgbImage {
    let mut out = img.clone();
    for v in out.iter_mut() {
        // Box–Muller; one normal per draw keeps it simple.
        let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        *v = (*v as f64 + sigma * z).round().clamp(0.0, 255.0) as u8;
    }
    out
}

#[cfg(test)]
#[path = "scores_tests.rs"]
mod tests;
