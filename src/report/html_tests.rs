//! Tests of the HTML report: structure of the written page, grids, encoders and formatting.
use super::*;
use crate::report::plot::{RAW_STROKE, SMOOTH_STROKE};

fn solid(c: [u8; 3], side: u32) -> RgbImage {
    RgbImage::from_pixel(side, side, Rgb(c))
}

fn sample_report() -> Report {
    Report {
        title: "Teach a <star> & keep the rest".into(),
        notes: vec!["Preview only".into()],
        settings: vec![("rank".into(), "16".into()), ("lr".into(), "1e-4".into())],
        losses: (0..75).map(|i| 0.3 / (1.0 + i as f64 / 10.0)).collect(),
        val_losses: vec![],
        eval_loss: Some((0.25, 0.2)),
        grids: vec![
            ("before".into(), grid(&[solid([255, 0, 0], 8), solid([0, 255, 0], 8)], 2)),
            ("after".into(), grid(&[solid([0, 0, 255], 8)], 1)),
            ("base vs LoRA".into(), grid_rows(&[&[solid([1, 1, 1], 8)], &[solid([2, 2, 2], 8)]])),
        ],
        scores: Some(Scores {
            target: "star".into(),
            learned: Some(0.875),
            learned_base: Some(0.05),
            learned_of: 8,
            followed: Some((0.625, 0.0)),
            forgetting: Some(Forgetting {
                labelled: 8,
                accuracy_base: 0.95,
                accuracy_lora: 0.935,
                drop_points: 1.5,
                mean_pixel_distance: 7.94,
            }),
            misses: vec![
                Miss {
                    group: "target",
                    column: 3,
                    prompt: "a red star on a blue background".into(),
                    base: "red circle on blue".into(),
                    lora: "red square on blue".into(),
                },
                Miss {
                    group: "control",
                    column: 1,
                    prompt: "a <green> ring".into(),
                    base: "green ring on ?".into(),
                    lora: "yellow ring on ?".into(),
                },
            ],
        }),
        lora_bytes: 3_355_443,
        seconds: 245.0,
        images_per_second: 4.25,
        epochs: Some(2.5),
    }
}

#[test]
fn written_page_has_plot_grids_scores_and_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    sample_report().write(&path).unwrap();
    let html = std::fs::read_to_string(&path).unwrap();
    // Only the report, no temporary file left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"));
    assert_eq!(html.matches("<svg").count(), 1);
    // One point per step in the raw and the smoothed line (plus each legend swatch).
    let points = |stroke: &str| -> Vec<usize> {
        html.split("<polyline")
            .skip(1)
            .filter(|p| p[..p.find("/>").unwrap()].contains(stroke))
            .map(|p| {
                let a = p.find("points=\"").unwrap() + 8;
                p[a..a + p[a..].find('"').unwrap()].split_whitespace().count()
            })
            .collect()
    };
    assert_eq!(points(RAW_STROKE), [75, 2]);
    assert_eq!(points(SMOOTH_STROKE), [75, 2]);
    assert_eq!(html.matches("<img src=\"data:image/png;base64,").count(), 3);
    for label in ["before", "after", "base vs LoRA"] {
        assert!(html.contains(&format!("<figcaption>{label}</figcaption>")), "{label}");
    }
    for number in [
        "87.5 %",
        "62.5 %",
        "1.5 points",
        "95.0 %",
        "93.5 %",
        "7.9 / 255",
        "3.2 MiB",
        "3,355,443 bytes",
        "75 steps, 2.5 epochs",
    ] {
        assert!(html.contains(number), "{number}");
    }
    for text in [
        "4 min 05 s",
        "75 steps",
        "4.25",
        "0.2500 → 0.2000",
        "-20.0 %",
        "of 8 samples for the new prompt show a star (base: 5.0 %); 95 % interval 53–98 %",
        "Preview only",
    ] {
        assert!(html.contains(text), "{text}");
    }
    // one row per miss, the prompt escaped
    assert!(html.contains("<h3>Misses</h3>"));
    assert!(html.contains(
        "<tr><th>target 3</th><td>a red star on a blue background</td><td>red circle on blue</td><td>red square on blue</td></tr>"
    ));
    assert!(html.contains("<th>control 1</th><td>a &lt;green&gt; ring</td>"));
    assert!(html.contains("<th>rank</th><td>16</td>"));
    // Title escaped; self-contained: no external reference of any kind.
    assert!(html.contains("Teach a &lt;star&gt; &amp; keep the rest"));
    for external in ["http://", "https://", "<script", "<link", "@import", "url("] {
        let hits: Vec<_> =
            html.match_indices(external).map(|(i, _)| &html[i.saturating_sub(40)..i + 40]).collect();
        // plotters names the SVG namespace, which is an identifier, not a fetch.
        assert!(
            hits.iter().all(|h| h.contains("xmlns=\"http://www.w3.org/2000/svg\"")),
            "{external}: {hits:?}"
        );
    }
}

#[test]
fn embedded_png_decodes_to_the_grid() {
    let r = sample_report();
    let html = r.html().unwrap();
    let start = html.find("data:image/png;base64,").unwrap() + 22;
    let b64 = &html[start..start + html[start..].find('"').unwrap()];
    let png = decode64(b64);
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(img, r.grids[0].1);
}

/// Minimal decoder for the test.
fn decode64(s: &str) -> Vec<u8> {
    let abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let vals: Vec<u32> =
        s.bytes().filter(|&b| b != b'=').map(|b| abc.find(b as char).unwrap() as u32).collect();
    let mut out = vec![];
    for c in vals.chunks(4) {
        let n = c.iter().enumerate().fold(0, |n, (i, v)| n | v << (18 - 6 * i));
        out.extend(&[(n >> 16) as u8, (n >> 8) as u8, n as u8][..c.len() - 1]);
    }
    out
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (raw, enc) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64(raw.as_bytes()), enc);
    }
    let all: Vec<u8> = (0..=255).collect();
    assert_eq!(decode64(&base64(&all)), all);
}

#[test]
fn grid_places_cells_row_by_row_in_a_frame() {
    let imgs: Vec<RgbImage> = (0..5).map(|i| solid([i * 40, 0, 0], 4)).collect();
    let g = grid(&imgs, 3);
    // 3 columns × 2 rows of 4-pixel cells with 2-pixel gaps and frame.
    assert_eq!(g.dimensions(), (2 + 3 * 6, 2 + 2 * 6));
    assert_eq!(g.get_pixel(2, 2).0, [0, 0, 0]);
    assert_eq!(g.get_pixel(8, 2).0, [40, 0, 0]);
    assert_eq!(g.get_pixel(2, 8).0, [120, 0, 0]);
    assert_eq!(g.get_pixel(0, 0).0, [60, 60, 60]);
    // The missing sixth cell stays frame-coloured.
    assert_eq!(g.get_pixel(15, 9).0, [60, 60, 60]);
    assert_eq!(grid(&imgs, 0).dimensions(), (2 + 6, 2 + 5 * 6), "cols 0 means one column");
    assert_eq!(grid(&[], 4).dimensions(), (2, 2));

    let rows = grid_rows(&[&imgs[..3], &imgs[3..4]]);
    assert_eq!(rows.dimensions(), g.dimensions());
    assert_eq!(rows.get_pixel(2, 8).0, [120, 0, 0]);
    assert_eq!(rows.get_pixel(8, 8).0, [60, 60, 60], "short row padded");
}

#[test]
fn formatting_helpers() {
    assert_eq!(bytes(512), "512 bytes");
    assert_eq!(bytes(3 * 1024 * 1024 + 300 * 1024), "3.3 MiB");
    assert_eq!(thousands(0), "0");
    assert_eq!(thousands(1000), "1,000");
    assert_eq!(thousands(123456789), "123,456,789");
    assert_eq!(duration(12.34), "12.3 s");
    assert_eq!(duration(3599.6), "1 h 00 min");
    assert_eq!(duration(3725.0), "1 h 02 min");
    assert_eq!(escape("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
}
