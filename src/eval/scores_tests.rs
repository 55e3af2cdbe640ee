//! Tests of the procedural scorer: accuracy on clean and degraded renders of the world, and the
//! two demo scores.
use super::*;
use crate::eval::metrics::*;
use crate::eval::world::{scenes, Asked, Concept, Scene, Texture};
use crate::util::interval95;
use rand::{Rng, SeedableRng};

/// The world's scenes moved anywhere in the image at any angle and size 0.4–0.7: a generated image
/// need not be centred and upright, so the scorer is tested on more than the datasets hold.
fn scenes_anywhere(seed: u64, n: usize) -> Vec<Scene> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xa11);
    scenes(seed, n, &[])
        .into_iter()
        .map(|s| {
            let size = rng.random_range(0.4..=0.7);
            let r = size / 2.0;
            let (cx, cy) = (rng.random_range(r..=1.0 - r), rng.random_range(r..=1.0 - r));
            Scene { size, cx, cy, rotation: rng.random_range(0.0..std::f64::consts::TAU), ..s }
        })
        .collect()
}

/// Share of scenes whose shape / colour / background are recognised, printing the confusions.
fn accuracy(scs: &[Scene], degrade: impl Fn(usize, RgbImage) -> RgbImage) -> (f64, f64, f64) {
    let (mut shape, mut colour, mut bg) = (0, 0, 0);
    for (i, s) in scs.iter().enumerate() {
        let img = degrade(i, s.render(64));
        let d = classify(&img);
        shape += (d.shape == Some(s.shape)) as usize;
        colour += (d.colour == Some(s.colour)) as usize;
        bg += (d.background == Some(s.background)) as usize;
        if d.shape != Some(s.shape) || d.colour != Some(s.colour) {
            eprintln!("{:?} {:?} -> {:?} {:?}", s, measure(&img).and_then(|m| m.features), d.shape, d.colour);
        }
    }
    let n = scs.len() as f64;
    (shape as f64 / n, colour as f64 / n, bg as f64 / n)
}

#[test]
fn features_of_renders() {
    // Per shape: mean and range of (solidity, fill, hole) over random scenes; PROTOTYPES come from
    // here.
    let all = scenes_anywhere(11, 600);
    for (shape, degraded) in Shape::ALL.into_iter().flat_map(|s| [(s, false), (s, true)]) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let fs: Vec<Features> = all
            .iter()
            .filter(|s| s.shape == shape)
            .map(|s| if degraded { add_noise(&blur3(&s.render(64)), 15.0, &mut rng) } else { s.render(64) })
            .filter_map(|img| measure(&img).and_then(|m| m.features))
            .collect();
        let stat = |f: &dyn Fn(&Features) -> f64| {
            let v: Vec<f64> = fs.iter().map(f).collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let (lo, hi) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            format!("{mean:.3} [{lo:.3}, {hi:.3}]")
        };
        eprintln!(
            "{:9} {} n={:3} solidity {} fill {} hole {} points {}",
            shape.name(),
            if degraded { "blur+noise" } else { "clean     " },
            fs.len(),
            stat(&|f| f.solidity),
            stat(&|f| f.fill),
            stat(&|f| f.hole),
            stat(&|f| f.points as f64)
        );
    }
}

#[test]
fn clean_renders_are_recognised() {
    let scs = scenes_anywhere(2024, 300);
    let (shape, colour, bg) = accuracy(&scs, |_, img| img);
    eprintln!("clean: shape {shape:.3} colour {colour:.3} background {bg:.3}");
    assert!(shape >= 0.97 && colour >= 0.97 && bg >= 0.97, "shape {shape} colour {colour} bg {bg}");
}

#[test]
fn blurred_noisy_renders_are_recognised() {
    let scs = scenes_anywhere(2025, 300);
    let (shape, colour, bg) = accuracy(&scs, |i, img| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        add_noise(&blur3(&img), 15.0, &mut rng)
    });
    eprintln!("blur+noise: shape {shape:.3} colour {colour:.3} background {bg:.3}");
    assert!(shape >= 0.90 && colour >= 0.90 && bg >= 0.90, "shape {shape} colour {colour} bg {bg}");
}

#[test]
fn plain_and_noise_images_show_no_shape() {
    let plain = RgbImage::from_pixel(64, 64, Rgb(Colour::Blue.rgb()));
    assert_eq!(classify(&plain), Detected { background: Some(Colour::Blue), ..Default::default() });
    // Loud noise on grey: no plain border, no shape.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let noise = add_noise(&RgbImage::from_pixel(64, 64, Rgb([128, 128, 128])), 80.0, &mut rng);
    let d = classify(&noise);
    assert_eq!((d.shape, d.background), (None, None), "{d:?}");
    // Too small to be more than a speck.
    assert_eq!(classify(&RgbImage::new(4, 4)), Detected::default());
}

/// What an untrained model draws: smooth random colour fields at several scales, and speckle on a
/// plain background. None of it may count as a shape, or "learned" would score noise.
#[test]
fn structured_noise_shows_no_shape() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let mut shapes = 0;
    let n = 60;
    for i in 0..n {
        let bg = Colour::ALL[i % 8].rgb();
        let mut img =
            add_noise(&RgbImage::from_pixel(64, 64, Rgb(bg)), 40.0 + 40.0 * (i % 3) as f64, &mut rng);
        for _ in 0..(i % 4) * 3 {
            img = blur3(&img);
        }
        if i % 2 == 1 {
            // stretch the smoothed field's contrast back up: blobs of colour everywhere
            img = RgbImage::from_fn(64, 64, |x, y| {
                let p = img.get_pixel(x, y).0;
                Rgb(std::array::from_fn(|k| {
                    (p[k] as f64 - bg[k] as f64).mul_add(4.0, bg[k] as f64).clamp(0.0, 255.0) as u8
                }))
            });
        }
        if classify(&img).shape.is_some() {
            shapes += 1;
        }
    }
    assert!(shapes * 20 <= n, "{shapes} of {n} noise images read as a shape");
}

#[test]
fn learned_is_the_share_of_samples_showing_what_was_asked() {
    let render = |scs: &[Scene]| scs.iter().map(|s| s.render(64)).collect::<Vec<_>>();
    let asked = |scs: &[Scene]| scs.iter().map(|s| s.asked()).collect::<Vec<_>>();
    let stars = scenes(3, 6, &[Shape::Star]);
    assert_eq!(learned(&render(&stars), &asked(&stars)), 1.0);
    // circles drawn where stars were asked for
    let circles: Vec<Scene> = stars.iter().map(|s| Scene { shape: Shape::Circle, ..*s }).collect();
    assert_eq!(learned(&render(&circles), &asked(&stars)), 0.0);
    let mixed: Vec<Scene> = stars[..3].iter().chain(&circles[3..]).copied().collect();
    assert_eq!(learned(&render(&mixed), &asked(&stars)), 0.5);
    assert_eq!(learned(&[], &[]), 0.0);
    // a texture concept: the asked shape in checks counts, the shape without them does not
    let checks = Concept::Texture(Texture::Checks).scenes(4, 8, &[Shape::Circle, Shape::Square, Shape::Ring]);
    assert_eq!(learned(&render(&checks), &asked(&checks)), 1.0);
    let plain: Vec<Scene> = checks.iter().map(|s| s.with_texture(Texture::Plain)).collect();
    assert_eq!(learned(&render(&plain), &asked(&checks)), 0.0);
    // a colour concept: the asked shape counts only in pink, where a known colour's shape would
    let pink = Concept::Colour(Colour::Pink).scenes(5, 8, &[Shape::Circle, Shape::Square, Shape::Cross]);
    assert_eq!(learned(&render(&pink), &asked(&pink)), 1.0);
    let red: Vec<Scene> = pink.iter().map(|s| s.with_colour(Colour::Red)).collect();
    assert_eq!(learned(&render(&red), &asked(&red)), 1.0);
    assert_eq!(learned(&render(&red), &asked(&pink)), 0.0);
}

#[test]
fn followed_also_asks_for_the_colour_and_background() {
    let render = |scs: &[Scene]| scs.iter().map(|s| s.render(64)).collect::<Vec<_>>();
    let checks = Concept::Texture(Texture::Checks).scenes(4, 8, &[Shape::Circle, Shape::Square, Shape::Ring]);
    let asked: Vec<Asked> = checks.iter().map(|s| s.asked()).collect();
    assert_eq!(followed(&render(&checks), &asked), 1.0);
    let other = |s: &Scene| Colour::ALL.into_iter().find(|&c| c != s.colour && c != s.background).unwrap();
    // the checkered shapes on other backgrounds: the concept is shown, the prompt not followed
    let moved: Vec<Scene> = checks
        .iter()
        .map(|s| Scene { background: other(s), texture: Texture::Plain, ..*s }.with_texture(Texture::Checks))
        .collect();
    assert!(moved.iter().zip(&checks).all(|(m, s)| m.background != s.background && m.colour == s.colour));
    assert_eq!(learned(&render(&moved), &asked), 1.0);
    assert_eq!(followed(&render(&moved), &asked), 0.0);
    // in another known colour: "learned" leaves a known colour to "forgotten", the prompt is not followed
    let recoloured: Vec<Scene> = checks.iter().map(|s| s.with_colour(other(s))).collect();
    assert!(recoloured.iter().zip(&checks).all(|(r, s)| r.colour != s.colour));
    assert_eq!(learned(&render(&recoloured), &asked), 1.0);
    assert_eq!(followed(&render(&recoloured), &asked), 0.0);
}

#[test]
fn forgotten_compares_paired_images() {
    let control = scenes(5, 8, &[Shape::Circle, Shape::Square]);
    let expected: Vec<Asked> = control.iter().map(|s| s.asked()).collect();
    let base: Vec<RgbImage> = control.iter().map(|s| s.render(64)).collect();

    let same = forgotten(&base, &base, &expected);
    assert_eq!((same.accuracy_base, same.accuracy_lora, same.drop_points), (1.0, 1.0, 0.0));
    assert_eq!(same.mean_pixel_distance, 0.0);

    // The LoRA turned half the control shapes into stars: 50 points forgotten.
    let lora: Vec<RgbImage> = control
        .iter()
        .enumerate()
        .map(|(i, s)| if i % 2 == 0 { Scene { shape: Shape::Star, ..*s }.render(64) } else { s.render(64) })
        .collect();
    let half = forgotten(&base, &lora, &expected);
    assert_eq!((half.accuracy_lora, half.drop_points), (0.5, 50.0));
    assert!(half.mean_pixel_distance > 1.0 && half.mean_pixel_distance < 100.0, "{half:?}");

    // Checks on every other control shape: a texture forgotten is forgotten too.
    let checked: Vec<RgbImage> = control
        .iter()
        .enumerate()
        .map(|(i, s)| if i % 2 == 0 { s.with_texture(Texture::Checks) } else { *s }.render(64))
        .collect();
    assert_eq!(forgotten(&base, &checked, &expected).drop_points, 50.0);

    // A palette colour that is neither the scene's shape nor its background.
    let other = |s: &Scene| Colour::ALL.into_iter().find(|&c| c != s.colour && c != s.background).unwrap();

    // A quarter of the backgrounds repainted, the shapes untouched: a background forgotten counts.
    let repainted: Vec<RgbImage> = control
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if i % 4 == 0 { Scene { background: other(s), texture: Texture::Plain, ..*s } } else { *s }
                .render(64)
        })
        .collect();
    assert_eq!(forgotten(&base, &repainted, &expected).drop_points, 25.0);

    // Every colour changed: nothing right, and the pixel distance grows.
    let recoloured: Vec<RgbImage> = control
        .iter()
        .map(|s| Scene { colour: other(s), texture: Texture::Plain, ..*s }.render(64))
        .collect();
    let all = forgotten(&base, &recoloured, &expected);
    assert_eq!(all.drop_points, 100.0);
    assert!(all.mean_pixel_distance > half.mean_pixel_distance * 0.5);
}

#[test]
fn pixel_distance_and_degradations() {
    let (black, white) = (RgbImage::new(8, 8), RgbImage::from_pixel(16, 16, Rgb([255; 3])));
    assert_eq!(mean_abs_difference(&black, &white), 255.0);
    let img = scenes(9, 1, &[])[0].render(32);
    assert_eq!(mean_abs_difference(&img, &img), 0.0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    assert_eq!(add_noise(&img, 0.0, &mut rng), img);
    let flat = RgbImage::from_pixel(8, 8, Rgb([10, 20, 30]));
    assert_eq!(blur3(&flat), flat);
    let noisy = add_noise(&flat, 15.0, &mut rng);
    let spread = mean_abs_difference(&flat, &noisy);
    // E|N(0, 15)| = 15·√(2/π) ≈ 12 (less where 0 clamps the red channel).
    assert!(spread > 9.0 && spread < 14.0, "{spread}");
}

/// Upright scenes of the world (textures drawn as the datasets draw them) in every texture.
fn textured_scenes(seed: u64, n: usize) -> Vec<Scene> {
    scenes(seed, n, &[]).into_iter().enumerate().map(|(i, s)| s.with_texture(Texture::ALL[i % 4])).collect()
}

fn texture_accuracy(scs: &[Scene], degrade: impl Fn(usize, RgbImage) -> RgbImage) -> f64 {
    let mut right = 0;
    for (i, s) in scs.iter().enumerate() {
        let got = classify(&degrade(i, s.render(64))).texture;
        right += (got == Some(s.texture)) as usize;
        if got != Some(s.texture) {
            eprintln!("{:?} {:?} {:?} -> {got:?}", s.shape, s.colour, s.texture);
        }
    }
    right as f64 / scs.len() as f64
}

#[test]
fn textures_of_clean_and_degraded_renders_are_recognised() {
    let clean = texture_accuracy(&textured_scenes(31, 240), |_, img| img);
    let degraded = texture_accuracy(&textured_scenes(32, 240), |i, img| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        add_noise(&blur3(&img), 10.0, &mut rng)
    });
    eprintln!("texture: clean {clean:.3} blur+noise {degraded:.3}");
    assert!(clean >= 0.97 && degraded >= 0.9, "clean {clean} blur+noise {degraded}");
}

/// `s` with stripes along one diagonal of its frame, at the wave a checkerboard of the world has
/// along that diagonal and covering half the shape as checks do: what an undertrained LoRA draws
/// when asked for checks.
fn diagonal_stripes(s: &Scene, rising: bool) -> RgbImage {
    let plain = s.with_texture(Texture::Plain).render(64);
    let (n, radius) = (64.0, s.size * 32.0);
    let (sin, cos) = (-s.rotation).sin_cos();
    RgbImage::from_fn(64, 64, |px, py| {
        let p = *plain.get_pixel(px, py);
        let (x, y) = (px as f64 + 0.5 - s.cx * n, py as f64 + 0.5 - s.cy * n);
        let (u, v) = ((x * cos - y * sin) / radius, (x * sin + y * cos) / radius);
        let along = if rising { u - v } else { u + v };
        // the checks' diagonal wave has phase π(u ± v)/PERIOD: a period of 2·PERIOD
        let shaded = (along / (2.0 * crate::eval::world::PERIOD)).rem_euclid(1.0) < 0.5;
        if p.0 == s.colour.rgb() && shaded {
            image::Rgb(s.colour.shade())
        } else {
            p
        }
    })
}

#[test]
fn stripes_along_one_diagonal_are_not_checks() {
    let scs: Vec<Scene> = scenes(41, 80, &[]).into_iter().map(|s| s.with_texture(Texture::Checks)).collect();
    let blur_noise = |i: usize, img: &RgbImage| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
        add_noise(&blur3(img), 10.0, &mut rng)
    };
    let (mut checks, mut striped_as_checks) = (0, 0);
    for (i, s) in scs.iter().enumerate() {
        let real = s.render(64);
        let stripes = diagonal_stripes(s, i % 2 == 0);
        for (img, k) in
            [(real.clone(), 0), (blur_noise(i, &real), 0), (stripes.clone(), 1), (blur_noise(i, &stripes), 1)]
        {
            let got = classify(&img).texture == Some(Texture::Checks);
            if k == 0 {
                checks += got as usize;
            } else {
                striped_as_checks += got as usize;
            }
        }
    }
    eprintln!(
        "real checks found {checks}/160, one-diagonal stripes taken for checks {striped_as_checks}/160"
    );
    assert!(checks >= 150, "{checks}/160 checkerboards recognised");
    assert!(striped_as_checks <= 2, "{striped_as_checks}/160 one-diagonal stripes taken for checks");
}

/// Seed 1's 40 scenes of `concept` on the shapes the base knows, encoded and decoded by the
/// embedded base's VAE, and what the scorer reads in each, beside the scene.
fn through_the_base_vae(concept: Concept) -> Vec<(Scene, Detected)> {
    use crate::model::load::{load_folder, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    let base = crate::demo::base::write(dir.path()).unwrap();
    let opts = LoadOptions { unet: false, text_encoders: false, ..Default::default() };
    let sd = load_folder(&base, &opts).unwrap();
    let vae = sd.vae.as_ref().unwrap();
    let known: Vec<Shape> = Shape::ALL.into_iter().filter(|&s| s != crate::demo::base::MISSING).collect();
    let scenes = concept.scenes(1, 40, &known);
    let read = |s: &Scene| {
        let x = crate::data::prepare::to_tensor(&s.render(64), &candle_core::Device::Cpu).unwrap();
        let y = vae.decode(&vae.encode_mean(&x).unwrap()).unwrap();
        let y = ((y / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap();
        let rgb = crate::sample::pipeline::to_rgb8(&y).unwrap().remove(0);
        classify(&RgbImage::from_raw(64, 64, rgb).unwrap())
    };
    scenes.iter().map(|s| (*s, read(s))).collect()
}

/// The demo's LoRA draws through the base's VAE, so checks must be recognisable after it: real
/// checkerboards of the known shapes, encoded and decoded by the embedded base's VAE.
#[test]
fn checks_through_the_base_vae_are_recognised() {
    let read = through_the_base_vae(Concept::Texture(Texture::Checks));
    let right =
        read.iter().filter(|(s, d)| d.shape == Some(s.shape) && d.texture == Some(Texture::Checks)).count();
    eprintln!("shape and checks after the VAE: {right}/40");
    assert!(right >= 37, "{right}/40 checkered shapes recognised after the base's VAE");
}

/// Pink, the colour no base saw, must come through the base's VAE as pink on the known shapes,
/// textures included, or the demo could not score a pink LoRA.
#[test]
fn pink_through_the_base_vae_is_recognised() {
    let read = through_the_base_vae(Concept::Colour(Colour::Pink));
    let right =
        read.iter().filter(|(s, d)| d.shape == Some(s.shape) && d.colour == Some(Colour::Pink)).count();
    eprintln!("pink shapes after the VAE: {right}/40");
    assert!(right >= 37, "{right}/40 pink shapes recognised after the base's VAE");
}

#[test]
fn wilson_interval_matches_the_textbook_and_narrows_with_samples() {
    // 9 of 20: (0.258, 0.658), worked by hand from Wilson's formula
    let (lo, hi) = interval95(0.45, 20);
    assert!((lo - 0.2582).abs() < 1e-3 && (hi - 0.6579).abs() < 1e-3, "{lo} {hi}");
    let (lo80, hi80) = interval95(0.45, 80);
    assert!(lo80 > lo && hi80 < hi && lo80 < 0.45 && hi80 > 0.45, "{lo80} {hi80}");
    // all or none still leaves room on the open side, never beyond [0, 1]
    let (a, b) = interval95(1.0, 20);
    assert!(a > 0.8 && a < 1.0 && (b - 1.0).abs() < 1e-9, "{a} {b}");
    let (a, b) = interval95(0.0, 20);
    assert!(a.abs() < 1e-9 && b > 0.0 && b < 0.2, "{a} {b}");
}
