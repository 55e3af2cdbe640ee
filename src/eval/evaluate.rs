//! After training: what the LoRA learned and what it cost, on prompts the user names
//! (`--target-prompts`, `--control-prompts`). Each prompt is drawn by the base and by base + LoRA
//! with the same seed. Prompts in the tiny world's caption form ("a red striped star on a blue
//! background") are also scored by the exact procedural scorer (`crate::eval::scores`); any
//! prompt counts towards the mean pixel distance, the one measure that needs no labels.
use crate::eval::metrics::{
    checks_as_asked, describe, draws_right, followed, forgotten, learned, mean_abs_difference, shows_detected,
};
use crate::eval::scores::{classify, Detected};
use crate::eval::world::Asked;
use crate::model::load::{load, LoadOptions};
use crate::report::{grid_rows, Forgetting, Miss, Scores};
use crate::sample::pipeline::{sample_images, Sampling};
use anyhow::Result;
use image::RgbImage;
use std::path::Path;

pub struct Evaluation {
    pub scores: Scores,
    /// (title, [base row; LoRA row]) for the report.
    pub grids: Vec<(String, RgbImage)>,
    pub base_knows: BaseKnows,
}

/// On the tiny-world control prompts, the share of base samples that show the asked colour, the
/// asked shape, the asked background, and checks exactly where asked, each on its own.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BaseKnows {
    pub colour: f64,
    pub shape: f64,
    pub background: f64,
    pub checks: f64,
}

/// A grid's title with its prompts, column by column, so the reader knows what was asked for.
fn titled(what: &str, prompts: &[(String, u64)]) -> String {
    let cols: Vec<String> = prompts.iter().enumerate().map(|(i, (p, _))| format!("{}. {p}", i + 1)).collect();
    format!("{what} — {}", cols.join("; "))
}

fn miss(group: &'static str, i: usize, prompt: &str, base: &RgbImage, lora: Detected) -> Miss {
    let (base, lora) = (describe(&classify(base)), describe(&lora));
    Miss { group, column: i + 1, prompt: prompt.to_string(), base, lora }
}

/// Samples `target` and `control` prompts (seed = `seed` + index) with and without the LoRA.
pub fn evaluate(
    model: &str,
    load_options: &LoadOptions,
    lora: &Path,
    target: &[(String, u64)],
    control: &[(String, u64)],
    side: u32,
    how: Sampling,
) -> Result<Evaluation> {
    // one load: every prompt with the base, then the same prompts and seeds with the LoRA applied
    let mut sd = load(model, load_options)?;
    let all: Vec<(String, u64)> = target.iter().chain(control).cloned().collect();
    let mut base_all = sample_images(&sd, &all, side, how)?;
    crate::lora::apply::apply_file(&mut sd, lora, 1.0, 0)?;
    let mut with_all = sample_images(&sd, &all, side, how)?;
    let (c_base, c_with) = (base_all.split_off(target.len()), with_all.split_off(target.len()));
    let (t_base, t_with) = (base_all, with_all);
    let mut grids = vec![];
    let mut scores = Scores {
        target: String::new(),
        learned: None,
        learned_base: None,
        learned_of: 0,
        followed: None,
        forgetting: None,
        misses: vec![],
    };
    let mut base_knows = BaseKnows::default();
    if !target.is_empty() {
        let (base, with) = (&t_base, &t_with);
        let wanted: Vec<(usize, Asked)> =
            target.iter().enumerate().filter_map(|(i, (p, _))| Some((i, Asked::parse(p)?))).collect();
        if !wanted.is_empty() {
            let pick = |imgs: &[RgbImage]| wanted.iter().map(|&(i, _)| imgs[i].clone()).collect::<Vec<_>>();
            let asked: Vec<Asked> = wanted.iter().map(|&(_, a)| a).collect();
            scores.learned = Some(learned(&pick(with), &asked));
            scores.learned_base = Some(learned(&pick(base), &asked));
            scores.learned_of = asked.len();
            scores.followed = Some((followed(&pick(with), &asked), followed(&pick(base), &asked)));
            let mut names: Vec<String> = asked.iter().map(|a| a.describe()).collect();
            names.sort_unstable();
            names.dedup();
            scores.target = names.join(", ");
            for &(i, a) in &wanted {
                let d = classify(&with[i]);
                if !shows_detected(&d, a) {
                    scores.misses.push(miss("target", i, &target[i].0, &base[i], d));
                }
            }
        }
        grids.push((
            titled("target prompts: base (top) vs LoRA (bottom), same seeds", target),
            grid_rows(&[base, with]),
        ));
    }
    if !control.is_empty() {
        let (base, with) = (&c_base, &c_with);
        let labelled: Vec<(usize, Asked)> =
            control.iter().enumerate().filter_map(|(i, (p, _))| Some((i, Asked::parse(p)?))).collect();
        let pick = |imgs: &[RgbImage]| labelled.iter().map(|&(i, _)| imgs[i].clone()).collect::<Vec<_>>();
        let expected: Vec<Asked> = labelled.iter().map(|&(_, e)| e).collect();
        let mut f: Forgetting = forgotten(&pick(base), &pick(with), &expected);
        f.mean_pixel_distance =
            base.iter().zip(with).map(|(a, b)| mean_abs_difference(a, b)).sum::<f64>() / base.len() as f64;
        if !labelled.is_empty() {
            let seen: Vec<(Detected, Asked)> =
                labelled.iter().map(|&(i, a)| (classify(&base[i]), a)).collect();
            for (&(i, a), (b, _)) in labelled.iter().zip(&seen) {
                let d = classify(&with[i]);
                if draws_right(b, a) && !draws_right(&d, a) {
                    scores.misses.push(miss("control", i, &control[i].0, &base[i], d));
                }
            }
            let share = |ok: &dyn Fn(&Detected, Asked) -> bool| {
                seen.iter().filter(|(d, a)| ok(d, *a)).count() as f64 / seen.len() as f64
            };
            base_knows = BaseKnows {
                colour: share(&|d, a| d.colour == Some(a.colour)),
                shape: share(&|d, a| d.shape == Some(a.shape)),
                background: share(&|d, a| a.background.is_none_or(|b| d.background == Some(b))),
                checks: share(&|d, a| checks_as_asked(d, a)),
            };
        }
        scores.forgetting = Some(f);
        grids.push((
            titled("control prompts: base (top) vs LoRA (bottom), same seeds", control),
            grid_rows(&[base, with]),
        ));
    }
    Ok(Evaluation { scores, grids, base_knows })
}
