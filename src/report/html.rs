//! `report.html`: one self-contained page per training run — settings, loss plot (inline SVG),
//! sample grids (PNG data URIs) and the demo's scores. No external URL, script or font, so the
//! file opens offline, survives being mailed, and cannot leak anything when opened.
use super::plot::loss_svg;
use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use std::fmt::Write as _;
use std::path::Path;

/// What the LoRA learned and what it cost, as measured on target and control prompts
/// (`eval`), for the scores section.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// What the LoRA was taught, as shown in the text: "star".
    pub target: String,
    /// Share (0–1) of the target prompt's samples classified as the target (none without
    /// target prompts in the tiny world's caption form).
    pub learned: Option<f64>,
    /// The same share for the base model's samples of the same prompts and seeds: what
    /// "learned" starts from (≈ 0 for a concept the base never saw).
    pub learned_base: Option<f64>,
    /// How many samples `learned` was measured on (its 95 % interval follows from it).
    pub learned_of: usize,
    /// Shares (0–1) of the same samples, LoRA's and base's, that follow the whole prompt: the
    /// concept and the asked shape, colour and background (`demo::metrics::follows`).
    pub followed: Option<(f64, f64)>,
    pub forgetting: Option<Forgetting>,
    /// The samples these scores count against the LoRA, as the scorer read them.
    pub misses: Vec<Miss>,
}

/// A target sample that does not show the concept, or a control sample the base drew right and
/// the LoRA did not.
#[derive(Debug, Clone, PartialEq)]
pub struct Miss {
    /// "target" or "control", and the sample's column in that grid (from 1).
    pub group: &'static str,
    pub column: usize,
    pub prompt: String,
    /// What the scorer read in the base's and the LoRA's sample (`demo::metrics::describe`).
    pub base: String,
    pub lora: String,
}

/// What training cost on prompts the LoRA was not about.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forgetting {
    /// Control images with an expected shape and colour (the accuracies are over these).
    pub labelled: usize,
    /// Share of control images showing the expected shape and colour on the expected background,
    /// checkered only if asked, base model / with LoRA.
    pub accuracy_base: f64,
    pub accuracy_lora: f64,
    /// (base − LoRA) × 100: percentage points lost (negative = improved).
    pub drop_points: f64,
    /// Mean absolute difference per channel between paired images, 0–255: how much the LoRA changed
    /// pictures it should have left alone.
    pub mean_pixel_distance: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub title: String,
    /// Highlighted paragraphs under the title (e.g. that a page is a preview).
    pub notes: Vec<String>,
    /// Run settings as (name, value) rows, in display order.
    pub settings: Vec<(String, String)>,
    /// Loss per optimizer step.
    pub losses: Vec<f64>,
    /// (step, loss on held-out images), when measured.
    pub val_losses: Vec<(usize, f64)>,
    /// Fixed-set loss before and after training, when measured.
    pub eval_loss: Option<(f64, f64)>,
    /// Labelled sample grids in display order ("before", "step 500", "after", "base vs LoRA").
    pub grids: Vec<(String, RgbImage)>,
    pub scores: Option<Scores>,
    pub lora_bytes: u64,
    pub seconds: f64,
    pub images_per_second: f64,
    /// Passes over the data the steps made, when known.
    pub epochs: Option<f64>,
}

impl Report {
    /// The page as one HTML string.
    pub fn html(&self) -> Result<String> {
        let mut h = String::with_capacity(64 * 1024);
        let title = escape(&self.title);
        write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n"
        )?;
        for n in &self.notes {
            writeln!(h, "<p class=\"note\">{}</p>", escape(n))?;
        }

        h.push_str("<section class=\"cards\">\n");
        card(&mut h, "LoRA file", &bytes(self.lora_bytes), &format!("{} bytes", thousands(self.lora_bytes)))?;
        let epochs = self.epochs.map_or(String::new(), |e| format!(", {e:.1} epochs"));
        card(
            &mut h,
            "Training time",
            &duration(self.seconds),
            &format!("{} steps{epochs}", self.losses.len()),
        )?;
        card(&mut h, "Throughput", &format!("{:.2}", self.images_per_second), "images / second")?;
        if let Some((before, after)) = self.eval_loss {
            let change =
                if before > 0.0 { format!("{:+.1} %", (after / before - 1.0) * 100.0) } else { "".into() };
            card(&mut h, "Eval loss", &format!("{before:.4} → {after:.4}"), &change)?;
        }
        h.push_str("</section>\n");

        if let Some(s) = &self.scores {
            let target = escape(&s.target);
            h.push_str("<h2>Scores</h2>\n<section class=\"cards scores\">\n");
            if let Some(l) = s.learned {
                let (lo, hi) = crate::util::interval95(l, s.learned_of);
                card(
                    &mut h,
                    "Learned",
                    &format!("{:.1} %", l * 100.0),
                    &format!(
                        "of {} samples for the new prompt show a {target}{}; 95 % interval {:.0}–{:.0} %",
                        s.learned_of,
                        s.learned_base.map_or(String::new(), |b| format!(" (base: {:.1} %)", b * 100.0)),
                        100.0 * lo,
                        100.0 * hi
                    ),
                )?;
            }
            if let Some((lora, base)) = s.followed {
                card(
                    &mut h,
                    "Whole prompt",
                    &format!("{:.1} %", lora * 100.0),
                    &format!(
                        "of the same samples show it in the asked colour on the asked background (base: {:.1} %)",
                        base * 100.0
                    ),
                )?;
            }
            if let Some(f) = s.forgetting.as_ref().filter(|f| f.labelled > 0) {
                card(
                    &mut h,
                    "Forgotten",
                    &format!("{:.1} points", f.drop_points),
                    &format!(
                        "control prompts drawn right (shape, colour, background, checks): {:.1} % base → {:.1} % with LoRA",
                        f.accuracy_base * 100.0,
                        f.accuracy_lora * 100.0
                    ),
                )?;
            }
            if let Some(f) = &s.forgetting {
                card(
                    &mut h,
                    "Mean pixel distance",
                    &format!("{:.1} / 255", f.mean_pixel_distance),
                    "base vs LoRA, same prompts and seeds",
                )?;
            }
            h.push_str(
                "</section>\n<p class=\"hint\">Shapes, colours and checks are measured \
                        procedurally (segmentation, geometry, and the checks' waves along both \
                        diagonals), not by a learned classifier.</p>\n",
            );
            if !s.misses.is_empty() {
                h.push_str(
                    "<h3>Misses</h3>\n<p class=\"hint\">Samples of the new prompt that do not show it, \
                     and control samples the base drew right and the LoRA did not, as the scorer \
                     read them; the column is the sample's in the grids below.</p>\n<table>\n\
                     <tr><th>sample</th><th>prompt</th><th>base drew</th><th>LoRA drew</th></tr>\n",
                );
                for m in &s.misses {
                    writeln!(
                        h,
                        "<tr><th>{} {}</th><td>{}</td><td>{}</td><td>{}</td></tr>",
                        m.group,
                        m.column,
                        escape(&m.prompt),
                        escape(&m.base),
                        escape(&m.lora)
                    )?;
                }
                h.push_str("</table>\n");
            }
        }

        h.push_str("<h2>Loss</h2>\n<figure class=\"plot\">\n");
        h.push_str(&loss_svg(&self.losses, &self.val_losses, 960, 380)?);
        h.push_str("\n</figure>\n");

        if !self.grids.is_empty() {
            h.push_str("<h2>Samples</h2>\n");
            for (label, img) in &self.grids {
                writeln!(
                    h,
                    "<figure class=\"grid\"><figcaption>{}</figcaption>\
                     <img src=\"data:image/png;base64,{}\" alt=\"{0}\" width=\"{}\" height=\"{}\" \
                     style=\"max-width:{}px\"></figure>",
                    escape(label),
                    base64(&png(img)?),
                    img.width(),
                    img.height(),
                    img.width() * 2
                )?;
            }
        }

        if !self.settings.is_empty() {
            h.push_str("<h2>Settings</h2>\n<table>\n");
            for (k, v) in &self.settings {
                writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v))?;
            }
            h.push_str("</table>\n");
        }
        h.push_str("</main>\n</body>\n</html>\n");
        Ok(h)
    }

    /// Writes the page to `path` atomically (a reader never sees half a report).
    pub fn write(&self, path: &Path) -> Result<()> {
        let html = self.html().with_context(|| format!("{}: cannot build the report", path.display()))?;
        crate::util::write_atomic(path, html.as_bytes())
    }
}

/// Pixel-art scaling (64-pixel samples shown at up to 2× stay crisp), system fonts only.
const STYLE: &str = "
body{margin:0;background:#f5f6f8;color:#1d2330;font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif}
main{max-width:1000px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:26px;margin:8px 0 12px}
h2{font-size:19px;margin:28px 0 10px;border-bottom:1px solid #dde1e8;padding-bottom:4px}
.note{background:#fff4d6;border:1px solid #f0d48a;border-radius:6px;padding:8px 12px;margin:8px 0}
.hint{color:#5b6475;font-size:13px;margin:6px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:12px 0}
.card{flex:1 1 200px;background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 14px}
.card .k{color:#5b6475;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:22px;font-weight:600;margin:2px 0}
.card .s{color:#5b6475;font-size:13px}
.scores .card{border-left:4px solid #1446a0}
figure{margin:0 0 16px}
figure.plot{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:6px}
figure.plot svg{display:block;width:100%;height:auto}
figure.grid figcaption{font-weight:600;margin:0 0 4px}
figure.grid img{display:block;width:100%;height:auto;image-rendering:pixelated}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e8;min-width:60%}
th,td{text-align:left;padding:5px 12px;border-bottom:1px solid #eef0f4;vertical-align:top}
th{font-weight:500;color:#5b6475;white-space:nowrap}
td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;word-break:break-all}
";

fn card(h: &mut String, key: &str, value: &str, sub: &str) -> std::fmt::Result {
    writeln!(
        h,
        "<div class=\"card\"><div class=\"k\">{}</div><div class=\"v\">{}</div><div class=\"s\">{}</div></div>",
        escape(key),
        escape(value),
        escape(sub)
    )
}

/// Lays `images` out left to right, `cols` per row, on a dark frame 2 pixels wide. Cells take the
/// largest image's size; smaller images sit in their cell's top-left corner.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    const GAP: u32 = 2;
    const FRAME: Rgb<u8> = Rgb([60, 60, 60]);
    if images.is_empty() {
        return RgbImage::from_pixel(GAP, GAP, FRAME);
    }
    let cols = cols.clamp(1, images.len()) as u32;
    let rows = images.len().div_ceil(cols as usize) as u32;
    let cw = images.iter().map(|i| i.width()).max().unwrap_or(0);
    let ch = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let mut out = RgbImage::from_pixel(GAP + cols * (cw + GAP), GAP + rows * (ch + GAP), FRAME);
    for (k, img) in images.iter().enumerate() {
        let (c, r) = (k as u32 % cols, k as u32 / cols);
        image::imageops::replace(&mut out, img, (GAP + c * (cw + GAP)) as i64, (GAP + r * (ch + GAP)) as i64);
    }
    out
}

/// Rows of images, one grid row each (e.g. base samples over LoRA samples with the same seeds).
pub fn grid_rows(rows: &[&[RgbImage]]) -> RgbImage {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    // Short rows are padded with frame-coloured cells so columns stay aligned.
    let blank = rows
        .iter()
        .flat_map(|r| r.iter())
        .next()
        .map(|i| RgbImage::from_pixel(i.width(), i.height(), Rgb([60, 60, 60])));
    let mut cells = vec![];
    for r in rows {
        cells.extend(r.iter().cloned());
        cells.extend(std::iter::repeat_n(blank.clone(), cols - r.len()).flatten());
    }
    grid(&cells, cols)
}

fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).context("cannot encode a sample grid as PNG")?;
    Ok(buf.into_inner())
}

/// Standard base64 with padding (RFC 4648 §4) — twenty lines instead of a dependency.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Escapes text for HTML element content and quoted attributes.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// "3.2 MiB"
fn bytes(n: u64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB"];
    let (mut v, mut u) = (n as f64, 0);
    while v >= 1024.0 && u + 1 < units.len() {
        (v, u) = (v / 1024.0, u + 1);
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// "3355443" → "3,355,443"
fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// "12.3 s", "4 min 05 s", "1 h 02 min"
fn duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "–".into();
    }
    let t = s.round() as u64;
    match t {
        _ if s < 60.0 => format!("{s:.1} s"),
        _ if t < 3600 => format!("{} min {:02} s", t / 60, t % 60),
        _ => format!("{} h {:02} min", t / 3600, t % 3600 / 60),
    }
}

#[cfg(test)]
#[path = "html_tests.rs"]
mod tests;
