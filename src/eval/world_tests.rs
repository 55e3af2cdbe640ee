//! Tests of the tiny world: captions, determinism, the rules random scenes keep, geometry.
use super::*;

fn scene(shape: Shape, texture: Texture) -> Scene {
    Scene {
        shape,
        colour: Colour::Red,
        background: Colour::Blue,
        texture,
        cx: 0.5,
        cy: 0.5,
        size: 0.6,
        rotation: 0.3,
    }
}

#[test]
fn captions_name_colour_texture_shape_and_background() {
    assert_eq!(scene(Shape::Star, Texture::Plain).caption(), "a red star on a blue background");
    assert_eq!(scene(Shape::Star, Texture::Stripes).caption(), "a red striped star on a blue background");
    assert_eq!(scene(Shape::Ring, Texture::Dots).caption(), "a red dotted ring on a blue background");
    assert_eq!(scene(Shape::Ring, Texture::Checks).caption(), "a red ring on a blue background, checkered");
    assert_eq!(
        scene(Shape::Ring, Texture::Dots).caption_with(true),
        "a red ring on a blue background, dotted"
    );
    assert_eq!(scene(Shape::Ring, Texture::Plain).caption_with(true), "a red ring on a blue background");
}

#[test]
fn captions_parse_back_into_what_they_ask() {
    for (i, s) in scenes(12, 40, &[]).into_iter().enumerate() {
        let s = s.with_texture(Texture::ALL[i % 4]);
        assert_eq!(Asked::parse(&s.caption()), Some(s.asked()), "{}", s.caption());
        assert_eq!(Asked::parse(&s.caption_with(i % 3 == 0)), Some(s.asked()), "{}", s.caption());
    }
    let a = Asked::parse("A Blue  square on a red background").unwrap();
    assert_eq!((a.shape, a.colour, a.texture), (Shape::Square, Colour::Blue, Texture::Plain));
    assert_eq!(a.background, Some(Colour::Red));
    assert_eq!(Asked::parse("a blue square, red").unwrap().background, None, "no background named");
    assert_eq!(Asked::parse("a photo of a dog"), None);
    assert_eq!(Asked::parse("a square"), None, "no colour");
    assert_eq!(a.describe(), "square");
    assert_eq!(Asked { texture: Texture::Checks, ..a }.describe(), "checkered square");
    assert_eq!(Asked { colour: Colour::Pink, texture: Texture::Dots, ..a }.describe(), "pink dotted square");
}

#[test]
fn concepts_by_name_and_their_scenes() {
    assert_eq!(Concept::from_name("Checkered"), Some(Concept::Texture(Texture::Checks)));
    assert_eq!(Concept::from_name("star"), Some(Concept::Shape(Shape::Star)));
    assert_eq!(Concept::from_name("plain"), None);
    assert_eq!(Concept::Texture(Texture::Checks).name(), "checkered");
    let known = [Shape::Circle, Shape::Ring];
    let checks = Concept::Texture(Texture::Checks).scenes(3, 30, &known);
    assert!(checks.iter().all(|s| s.texture == Texture::Checks && known.contains(&s.shape)));
    // backgrounds stay far from the checks' shade (segmentation keeps the shade inside)
    assert!(checks.iter().all(|s| s.background != s.colour
        && rgb_distance(s.background.rgb(), s.colour.shade()) >= MIN_SHADE_CONTRAST));
    let stars = Concept::Shape(Shape::Star).scenes(3, 10, &known);
    assert!(stars.iter().all(|s| s.shape == Shape::Star && s.texture != Texture::Checks));
    assert_eq!(Concept::from_name("Pink"), Some(Concept::Colour(Colour::Pink)));
    let pink = Concept::Colour(Colour::Pink).scenes(3, 30, &known);
    assert!(pink.iter().all(|s| s.colour == Colour::Pink && known.contains(&s.shape)));
    assert!(pink.iter().any(|s| s.texture != Texture::Plain), "textures stay as the seed drew them");
    assert!(pink.iter().all(|s| Colour::ALL.contains(&s.background)
        && (s.texture == Texture::Plain
            || rgb_distance(s.background.rgb(), s.colour.shade()) >= MIN_SHADE_CONTRAST)));
    assert!(pink[0].caption().starts_with("a pink "), "{}", pink[0].caption());
    assert_eq!(Asked::parse(&pink[0].caption()), Some(pink[0].asked()));
}

#[test]
fn same_seed_same_scenes_and_bytes() {
    let (a, b) = (scenes(7, 20, &[]), scenes(7, 20, &[]));
    assert_eq!(a, b);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.render(64).into_raw(), y.render(64).into_raw());
    }
    assert_ne!(a, scenes(8, 20, &[]), "another seed, another world");
}

#[test]
fn random_scenes_respect_the_rules() {
    let all = scenes(1, 500, &[]);
    for s in &all {
        assert_ne!(s.colour, s.background);
        assert!((0.55..=0.7).contains(&s.size));
        assert!((s.cx - 0.5).abs() <= JITTER && (s.cy - 0.5).abs() <= JITTER);
        assert!(s.rotation.abs() <= 0.15);
        let r = s.size / 2.0;
        assert!(s.cx - r >= 0.0 && s.cx + r <= 1.0 && s.cy - r >= 0.0 && s.cy + r <= 1.0);
        if s.texture != Texture::Plain {
            assert!(rgb_distance(s.colour.shade(), s.background.rgb()) >= MIN_SHADE_CONTRAST);
        }
    }
    // Every shape, colour and texture occurs.
    for sh in Shape::ALL {
        assert!(all.iter().any(|s| s.shape == sh), "{sh:?}");
    }
    for c in Colour::ALL {
        assert!(all.iter().any(|s| s.colour == c && s.background != c), "{c:?}");
        assert!(all.iter().any(|s| s.background == c), "{c:?}");
    }
    for t in [Texture::Plain, Texture::Stripes, Texture::Dots] {
        assert!(all.iter().any(|s| s.texture == t), "{t:?}");
    }
    // checks are what the demo teaches: no random scene, so no pretraining image, has them
    assert!(all.iter().all(|s| s.texture != Texture::Checks));
    assert!(all.iter().all(|s| s.colour != Colour::Pink && s.background != Colour::Pink));
    let only = scenes(2, 50, &[Shape::Star, Shape::Ring]);
    assert!(only.iter().all(|s| matches!(s.shape, Shape::Star | Shape::Ring)));
}

#[test]
fn palette_colours_are_far_apart() {
    for a in Colour::SCORED {
        for b in Colour::SCORED {
            if a != b {
                assert!(rgb_distance(a.rgb(), b.rgb()) > 85.0, "{a:?} {b:?}");
            }
        }
    }
}

/// Share of pixels equal to the shape colour / its shade, compared with the shape's area
/// (fraction of the circumscribed disc).
fn coverage(s: &Scene) -> (f64, f64) {
    let img = s.render(128);
    let (fg, sh) = (s.colour.rgb(), s.colour.shade());
    let n = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count() as f64;
    let disc = PI * (s.size * 64.0).powi(2);
    (n(fg) / disc, n(sh) / disc)
}

#[test]
fn areas_match_the_geometry() {
    // Interior pixels only (edges are blended), so a little under the exact area.
    let expect = [
        (Shape::Circle, 1.0),
        (Shape::Square, 2.0 / PI),
        (Shape::Triangle, 3.0 * 3f64.sqrt() / 4.0 / PI),
        (Shape::Ring, 1.0 - RING_INNER * RING_INNER),
    ];
    for (shape, area) in expect {
        let (fg, sh) = coverage(&scene(shape, Texture::Plain));
        assert_eq!(sh, 0.0);
        assert!(fg < area && fg > area * 0.9, "{shape:?}: {fg} vs {area}");
    }
    for shape in Shape::ALL {
        for (texture, lo, hi) in
            [(Texture::Stripes, 0.2, 0.45), (Texture::Dots, 0.08, 0.3), (Texture::Checks, 0.3, 0.7)]
        {
            let (fg, sh) = coverage(&scene(shape, texture));
            let share = sh / (fg + sh);
            assert!(share > lo && share < hi, "{shape:?} {texture:?}: {share}");
        }
    }
}

#[test]
fn shape_stays_inside_and_border_is_background() {
    // The largest shape in a corner: the outermost pixel ring is still mostly background.
    let mut s = scene(Shape::Circle, Texture::Plain);
    (s.size, s.cx, s.cy) = (0.7, 0.35, 0.35);
    let img = s.render(64);
    assert_eq!(img.get_pixel(63, 63).0, Colour::Blue.rgb());
    assert_eq!(img.get_pixel(22, 22).0, Colour::Red.rgb());
}

#[test]
fn writes_png_and_caption_pairs() {
    let dir = tempfile::tempdir().unwrap();
    let sc = scenes(3, 4, &[]);
    let paths = write_dataset(dir.path(), &sc, IMAGE_SIZE).unwrap();
    assert_eq!(paths.len(), 4);
    for (p, s) in paths.iter().zip(&sc) {
        let img = image::open(p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 64));
        assert_eq!(img.into_raw(), s.render(64).into_raw());
        assert_eq!(std::fs::read_to_string(p.with_extension("txt")).unwrap(), s.caption());
    }
    // The training loader accepts the folder as-is.
    let items = crate::data::dataset::scan(dir.path(), None, "--data").unwrap();
    assert_eq!(items.len(), 4);
    assert_eq!(items[0].caption, sc[0].caption());
}

#[test]
fn names_round_trip() {
    for s in Shape::ALL {
        assert_eq!(Shape::from_name(s.name()), Some(s));
    }
    for c in Colour::SCORED {
        assert_eq!(Colour::from_name(&c.name().to_uppercase()), Some(c));
    }
    assert_eq!(Shape::from_name("hexagon"), None);
    assert_eq!((&Colour::SCORED[..8], Colour::SCORED[8]), (&Colour::ALL[..], Colour::Pink));
    assert!(Colour::Pink.unseen() && Colour::ALL.iter().all(|c| !c.unseen()));
}
