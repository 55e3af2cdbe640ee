//! After training: what the LoRA learned and what it cost, on prompts the user names
//! (`--target-prompts`, `--control-prompts`). Each prompt is drawn by the base and by base + LoRA
//! with the same seed. Prompts in the tiny world's caption form ("a red striped star on a blue
//! background") are also scored by the exact procedural scorer (`crate::demo::scores`); any
//! prompt counts towards the mean pixel distance, the one measure that needs no labels.
use crate::demo::scores::{classify, forgotten, mean_abs_difference, Forgetting};
use crate::demo::world::{Colour, Shape};
use crate::model::load::{load, LoadOptions, StableDiffusion};
use crate::report::html::{grid_rows, Scores};
use crate::sample::pipeline::{generate_each, GenerateOptions};
use anyhow::{Context, Result};
use image::RgbImage;
use std::path::Path;

/// The shape and colour a tiny-world caption asks for: the first shape word and the first colour
/// word before it ("on a blue background" names the background, not the shape).
pub fn parse_caption(prompt: &str) -> Option<(Shape, Colour)> {
    let words: Vec<String> = prompt
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let at = words.iter().position(|w| Shape::from_name(w).is_some())?;
    let colour = words[..at].iter().find_map(|w| Colour::from_name(w))?;
    Some((Shape::from_name(&words[at])?, colour))
}

/// One image per (prompt, seed) with the model as it is (base, or base + applied LoRA).
pub(crate) fn sample(
    sd: &StableDiffusion,
    prompts: &[(String, u64)],
    side: u32,
    steps: usize,
) -> Result<Vec<RgbImage>> {
    let opts = GenerateOptions { steps, width: side as usize, height: side as usize, ..Default::default() };
    generate_each(sd, &opts, prompts)?
        .into_iter()
        .map(|g| RgbImage::from_raw(g.width, g.height, g.rgb).context("image buffer"))
        .collect()
}

pub struct Evaluation {
    pub scores: Scores,
    /// (title, [base row; LoRA row]) for the report.
    pub grids: Vec<(String, RgbImage)>,
    /// On the parseable control prompts, what the base draws right: (colour, shape) shares.
    pub base_knows: (f64, f64),
}

/// A grid's title with its prompts, column by column, so the reader knows what was asked for.
fn titled(what: &str, prompts: &[(String, u64)]) -> String {
    let cols: Vec<String> = prompts.iter().enumerate().map(|(i, (p, _))| format!("{}. {p}", i + 1)).collect();
    format!("{what} — {}", cols.join("; "))
}

/// Samples `target` and `control` prompts (seed = `seed` + index) with and without the LoRA.
pub fn evaluate(
    model: &str,
    lora: &Path,
    target: &[(String, u64)],
    control: &[(String, u64)],
    side: u32,
    steps: usize,
) -> Result<Evaluation> {
    // one load: every prompt with the base, then the same prompts and seeds with the LoRA applied
    let mut sd = load(model, &LoadOptions::default())?;
    let all: Vec<(String, u64)> = target.iter().chain(control).cloned().collect();
    let mut base_all = sample(&sd, &all, side, steps)?;
    crate::lora::apply::apply_file(&mut sd, lora, 1.0, 0)?;
    let mut with_all = sample(&sd, &all, side, steps)?;
    let (c_base, c_with) = (base_all.split_off(target.len()), with_all.split_off(target.len()));
    let (t_base, t_with) = (base_all, with_all);
    let mut grids = vec![];
    let mut scores = Scores { target: String::new(), learned: None, forgetting: None };
    let mut base_knows = (0.0, 0.0);
    if !target.is_empty() {
        let (base, with) = (&t_base, &t_with);
        let wanted: Vec<(usize, Shape)> =
            target.iter().enumerate().filter_map(|(i, (p, _))| Some((i, parse_caption(p)?.0))).collect();
        if !wanted.is_empty() {
            let hits = wanted.iter().filter(|&&(i, s)| classify(&with[i]).shape == Some(s)).count();
            scores.learned = Some(hits as f64 / wanted.len() as f64);
            let mut names: Vec<&str> = wanted.iter().map(|(_, s)| s.name()).collect();
            names.sort_unstable();
            names.dedup();
            scores.target = names.join(", ");
        }
        grids.push((
            titled("target prompts: base (top) vs LoRA (bottom), same seeds", target),
            grid_rows(&[base, with]),
        ));
    }
    if !control.is_empty() {
        let (base, with) = (&c_base, &c_with);
        let labelled: Vec<(usize, (Shape, Colour))> =
            control.iter().enumerate().filter_map(|(i, (p, _))| Some((i, parse_caption(p)?))).collect();
        let pick = |imgs: &[RgbImage]| labelled.iter().map(|&(i, _)| imgs[i].clone()).collect::<Vec<_>>();
        let expected: Vec<(Shape, Colour)> = labelled.iter().map(|&(_, e)| e).collect();
        let mut f: Forgetting = forgotten(&pick(base), &pick(with), &expected);
        f.mean_pixel_distance =
            base.iter().zip(with).map(|(a, b)| mean_abs_difference(a, b)).sum::<f64>() / base.len() as f64;
        if !labelled.is_empty() {
            let share = |ok: &dyn Fn(usize, (Shape, Colour)) -> bool| {
                labelled.iter().filter(|&&(i, e)| ok(i, e)).count() as f64 / labelled.len() as f64
            };
            base_knows = (
                share(&|i, (_, c)| classify(&base[i]).colour == Some(c)),
                share(&|i, (s, _)| classify(&base[i]).shape == Some(s)),
            );
        }
        scores.forgetting = Some(f);
        grids.push((
            titled("control prompts: base (top) vs LoRA (bottom), same seeds", control),
            grid_rows(&[base, with]),
        ));
    }
    Ok(Evaluation { scores, grids, base_knows })
}
