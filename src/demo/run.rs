//! `sdlora demo`: the product's whole loop on the tiny world — render images of a concept,
//! train a LoRA on them through the normal `train` path, sample base vs LoRA with the same seeds,
//! measure what was learned and what was forgotten, write report.html.
//!
//! The base model is the embedded one (`base`), pretrained on the world without stars, checkered
//! textures or pink, or any folder given with `--base` (e.g. one made by `sdlora demo-pretrain`).
use crate::eval::world::{scenes, write_dataset, Colour, Concept, Shape};
use crate::model::load::{load, LoadOptions};
use crate::report::grid;
use crate::sample::pipeline::Sampling;
use crate::train::config::{TrainArgs, TrainConfig};
use crate::train::{setup, trainer};
use anyhow::{Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

pub struct DemoOptions {
    pub out: PathBuf,
    pub concept: Concept,
    pub images: usize,
    pub steps: usize,
    pub side: u32,
    pub seed: u64,
    /// LoRA learning rate and its schedule (`train --lr-scheduler`).
    pub lr: f64,
    pub lr_scheduler: crate::train::optim::LrSchedule,
    /// LoRA rank and layers (`train --targets`: attn, attn-mlp, full).
    pub rank: usize,
    pub targets: crate::lora::targets::Preset,
    /// Layers of `targets` left without adapters (`train --exclude-layers`).
    pub exclude_layers: Option<String>,
    /// Samples of the concept's prompts and of the control prompts (each drawn by base and LoRA):
    /// 20 and 20 make one sample 5 % of "learned" and 5 points of "forgotten".
    pub samples: usize,
    pub controls: usize,
    /// Sampler steps and guidance of every image the demo draws.
    pub sampling: Sampling,
    /// Regularization images the base draws of known shapes before training (`train --reg-data`,
    /// DreamBooth's prior preservation); 0: none. At most `images` are drawn: training balances
    /// them to as many as training images, as kohya does, so more would sit out.
    pub reg: usize,
    /// What the regularization images pull towards (`train --prior-preservation`): "noise" or
    /// "output" (the base's own prediction).
    pub prior_preservation: crate::train::config::Preservation,
    /// Weight of the regularization images' loss (`train --prior-loss-weight`).
    pub prior_loss_weight: f64,
    /// Differential output preservation's weight (`train --dop-trigger <concept's word>`); None: off.
    pub dop_weight: Option<f64>,
    /// What the word becomes there (`train --dop-class`).
    pub dop_class: String,
    /// min-SNR-γ weighting of the LoRA's loss (`train --min-snr-gamma`).
    pub min_snr_gamma: Option<f64>,
    /// Train on timesteps below this only (`train --max-timestep`); None: all.
    pub max_timestep: Option<usize>,
    /// Also train the text encoder's LoRA at this rate (`train --text-encoder-lr`).
    pub text_encoder_lr: Option<f64>,
    /// Also train the concept word's token embedding, from this word's, at this rate (`train
    /// --train-embedding <word> --init-word W --embedding-lr L`); None: off.
    pub embedding: Option<(String, f64)>,
    /// LoRA batch size.
    pub batch: usize,
}

impl DemoOptions {
    /// `sdlora demo`'s flags whose default is the same for every concept, with that default
    /// (shown by `demo --help`); the others depend on the concept and their help says how.
    pub fn flag_defaults(&self) -> Vec<(&'static str, String)> {
        vec![
            ("seed", self.seed.to_string()),
            ("lora_batch", self.batch.to_string()),
            ("lora_lr", self.lr.to_string()),
            ("lr_scheduler", crate::util::choice_name(&self.lr_scheduler)),
            ("rank", self.rank.to_string()),
            ("targets", self.targets.name()),
            ("reg", self.reg.to_string()),
            ("prior_preservation", self.prior_preservation.name()),
            ("samples", self.samples.to_string()),
        ]
    }

    /// The defaults for the default concept.
    pub fn new(out: PathBuf) -> Self {
        Self::for_concept(out, super::base::CONCEPT)
    }

    /// The defaults for `concept`: guidance, steps, base-drawn first steps and the embedding
    /// were each measured (docs/experiments/2026-12-07-demo-defaults.md).
    pub fn for_concept(out: PathBuf, concept: Concept) -> Self {
        let colour = matches!(concept, Concept::Colour(_));
        let texture = matches!(concept, Concept::Texture(_));
        DemoOptions {
            out,
            concept,
            images: 20,
            steps: match concept {
                Concept::Colour(_) => 600,
                Concept::Texture(_) => 1000,
                Concept::Shape(_) => 700,
            },
            side: super::pretrain::SIDE,
            seed: 1,
            lr: 7e-4,
            lr_scheduler: crate::train::optim::LrSchedule::Constant,
            rank: 8,
            targets: crate::lora::targets::Preset::Full,
            exclude_layers: None,
            samples: 20,
            controls: 20,
            sampling: Sampling {
                steps: 20,
                cfg: if colour { 3.0 } else { 5.0 },
                lora_start: if texture || colour { 0.3 } else { 0.0 },
            },
            reg: 20,
            prior_preservation: crate::train::config::Preservation::Noise,
            prior_loss_weight: if colour { 2.0 } else { 1.0 },
            dop_weight: None,
            dop_class: String::new(),
            min_snr_gamma: Some(5.0),
            max_timestep: None,
            // a colour trains its word's token embedding instead (below): prompts without the
            // word then encode exactly as the base's
            text_encoder_lr: (!colour).then_some(2e-3),
            // started among colours the base reads, so its first steps still lay out the asked
            // shape and background
            embedding: colour.then(|| {
                let others = Colour::ALL.into_iter().filter(|&c| Concept::Colour(c) != concept);
                let known: Vec<&str> = others.map(|c| c.name()).collect();
                (known.join(","), 1e-3)
            }),
            batch: 4,
        }
    }
}

pub struct DemoResult {
    pub learned: f64,
    /// The base's samples of the same prompts and seeds, scored the same way.
    pub learned_base: f64,
    /// Shares of the same samples, LoRA's and base's, that follow the whole prompt (the concept,
    /// shape, colour and background: `metrics::follows`).
    pub followed: (f64, f64),
    pub forgotten_points: f64,
    pub mean_pixel_distance: f64,
    pub lora_bytes: u64,
    pub seconds: f64,
    pub report: PathBuf,
    /// What the base draws right on the control prompts.
    pub base_knows: crate::eval::evaluate::BaseKnows,
}

/// A prompt and the seed of its sampling noise.
pub type Prompt = (String, u64);

/// The prompts and sampling seeds the demo scores for `seed`: `samples` of the concept
/// ("learned") and `controls` of what the base knows ("forgotten"), each prompt with its own
/// noise seed. Seed s ≥ 2 draws them 10,000·(s − 1) further on, so that no two demo seeds score
/// the same sample: with plain `seed + i`, target i of seed s was target i + 1 of seed s − 1,
/// prompt and noise alike, and seeds 1–5 shared 16–19 of their 20 target samples. Seed 1 keeps
/// the sets it always had.
pub fn scored_prompts(
    concept: Concept,
    seed: u64,
    samples: usize,
    controls: usize,
    known: &[Shape],
) -> (Vec<Prompt>, Vec<Prompt>) {
    // wrapping: any u64 is a valid --seed
    let at = |k: u64| seed.wrapping_add(seed.wrapping_sub(1).wrapping_mul(10_000)).wrapping_add(k);
    let target =
        (0..samples as u64).map(|i| (concept.scenes(at(100 + i), 1, known)[0].caption(), at(i))).collect();
    let control =
        scenes(at(200), controls, known).iter().zip(0u64..).map(|(s, i)| (s.caption(), at(50 + i))).collect();
    (target, control)
}

/// `progress(phase, i, n)`: n > 0 while a phase counts steps.
pub fn run(
    o: &DemoOptions,
    base: Option<&Path>,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<DemoResult> {
    let t0 = std::time::Instant::now();
    std::fs::create_dir_all(&o.out).with_context(|| format!("{}: cannot create folder", o.out.display()))?;
    let model = match base {
        Some(b) => b.to_path_buf(),
        None => super::base::write(&o.out.join("base"))?,
    };
    // the shapes the base knows: a texture is taught on them, controls and reg images show them
    let known: Vec<Shape> = Shape::ALL
        .into_iter()
        .filter(|&s| s != super::base::MISSING && Concept::Shape(s) != o.concept)
        .collect();
    progress("rendering the concept's images", 0, 0);
    let data = o.out.join("data");
    let _ = std::fs::remove_dir_all(&data);
    write_dataset(&data, &o.concept.scenes(o.seed, o.images, &known), o.side)?;

    let (target, control_prompts) = scored_prompts(o.concept, o.seed, o.samples, o.controls, &known);
    // grids during training: two of the target prompts, four times
    let during = o.out.join("sample_prompts.txt");
    let lines: Vec<&str> = target.iter().take(2).map(|(p, _)| p.as_str()).collect();
    std::fs::write(&during, lines.join("\n") + "\n")
        .with_context(|| format!("{}: cannot write", during.display()))?;

    // the base's own pictures of what it knows, so the LoRA keeps drawing them
    let reg_dir = o.out.join("reg");
    let _ = std::fs::remove_dir_all(&reg_dir);
    let mut reg_imgs = vec![];
    let n_reg = o.reg.min(o.images);
    if n_reg > 0 {
        progress("drawing regularization images with the base", 0, 0);
        let rows: Vec<(String, u64)> = scenes(o.seed + 300, n_reg, &known)
            .iter()
            .enumerate()
            .map(|(i, s)| (s.caption(), o.seed + 400 + i as u64))
            .collect();
        let sd = load(&model.display().to_string(), &LoadOptions::default())?;
        reg_imgs = crate::sample::pipeline::sample_images(&sd, &rows, o.side, o.sampling)?;
        std::fs::create_dir_all(&reg_dir).with_context(|| format!("{}: cannot create", reg_dir.display()))?;
        for (i, ((caption, _), img)) in rows.iter().zip(&reg_imgs).enumerate() {
            let png = reg_dir.join(format!("{i:04}.png"));
            img.save(&png).with_context(|| format!("{}: cannot write", png.display()))?;
            let txt = png.with_extension("txt");
            std::fs::write(&txt, caption).with_context(|| format!("{}: cannot write", txt.display()))?;
        }
    }

    progress("training the LoRA", 0, o.steps);
    let lora = o.out.join("demo_lora.safetensors");
    let args = TrainArgs {
        model: Some(model.display().to_string()),
        data: Some(data.clone()),
        output: Some(lora.clone()),
        steps: Some(o.steps),
        batch_size: Some(o.batch),
        rank: Some(o.rank),
        targets: Some(o.targets),
        exclude_layers: o.exclude_layers.clone(),
        lr: Some(o.lr),
        lr_scheduler: Some(o.lr_scheduler),
        resolution: Some(o.side),
        seed: Some(o.seed),
        // flips help even a mirrored checkerboard (docs/experiments/2026-12-07-demo-defaults.md)
        flip: Some(true),
        reg_data: (n_reg > 0).then(|| reg_dir.clone()),
        prior_preservation: (n_reg > 0).then_some(o.prior_preservation),
        prior_loss_weight: (n_reg > 0).then_some(o.prior_loss_weight),
        dop_trigger: o.dop_weight.map(|_| o.concept.name().to_string()),
        dop_weight: o.dop_weight,
        dop_class: o.dop_weight.map(|_| o.dop_class.clone()),
        min_snr_gamma: o.min_snr_gamma,
        max_timestep: o.max_timestep,
        text_encoder_lr: o.text_encoder_lr,
        train_embedding: o.embedding.as_ref().map(|_| o.concept.name().to_string()),
        init_word: o.embedding.as_ref().map(|e| e.0.clone()),
        embedding_lr: o.embedding.as_ref().map(|e| e.1),
        sample_prompts: Some(during),
        sample_every: Some((o.steps / 4).max(1)),
        sample_cfg: Some(o.sampling.cfg),
        sample_lora_start: Some(o.sampling.lora_start),
        ..Default::default()
    };
    let cfg = TrainConfig::resolve(&args)?;
    let summary = trainer::train(setup::setup(&cfg, &mut |_, _, _| {})?, &cfg, &mut |p| {
        if let trainer::Progress::Step { step, .. } = p {
            progress("training the LoRA", step, o.steps)
        }
    })?;

    progress("sampling base and LoRA with the same seeds", 0, 0);
    let model_id = model.display().to_string();
    let eval = crate::eval::evaluate::evaluate(
        &model_id,
        &Default::default(),
        &lora,
        &target,
        &control_prompts,
        o.side,
        o.sampling,
    )?;
    let learned = eval.scores.learned.unwrap_or(0.0);
    let learned_base = eval.scores.learned_base.unwrap_or(0.0);
    let followed = eval.scores.followed.unwrap_or_default();
    let forgetting = eval.scores.forgetting.context("control prompts were sampled")?;
    let base_knows = eval.base_knows;

    let mut report = summary.report(format!("sdlora demo: learning \"{}\"", o.concept.name()));
    if base.is_none() && !super::base::unseen(o.concept) {
        report.notes.push(format!(
            "The embedded base model already knows \"{}\" (it never saw stars, checkered \
             textures and pink only): \"learned\" does not measure anything new here.",
            o.concept.name(),
        ));
    }
    report.settings = vec![
        ("concept".into(), o.concept.name().into()),
        ("training images".into(), o.images.to_string()),
        ("steps".into(), o.steps.to_string()),
        ("image side".into(), format!("{} px", o.side)),
        (
            "base model".into(),
            if base.is_some() {
                model.display().to_string()
            } else {
                "embedded tiny-world base (pretrained without stars, checks and pink)".into()
            },
        ),
    ];
    let train_imgs: Vec<RgbImage> =
        o.concept.scenes(o.seed, o.images.min(8), &known).iter().map(|s| s.render(o.side)).collect();
    report.grids.insert(0, ("training images".into(), grid(&train_imgs, 8)));
    if !reg_imgs.is_empty() {
        let title = "regularization images: known shapes drawn by the base (train --reg-data)";
        report.grids.insert(1, (title.into(), grid(&reg_imgs[..reg_imgs.len().min(10)], 10)));
    }
    report.grids.extend(eval.grids);
    report.settings.push((
        "LoRA learning rate, schedule, batch".into(),
        format!("{}, {}, {}", o.lr, o.lr_scheduler.name(), o.batch),
    ));
    let layers = match &o.exclude_layers {
        Some(r) => format!("{} except `{r}`", o.targets.name()),
        None => o.targets.name(),
    };
    report.settings.push(("LoRA rank, layers".into(), format!("{}, {layers}", o.rank)));
    let te = o.text_encoder_lr.map_or("not trained".into(), |l| format!("LoRA at learning rate {l}"));
    report.settings.push(("text encoder".into(), te));
    let emb = o.embedding.as_ref().map_or("not trained".into(), |(w, l)| {
        format!("\"{}\" from \"{w}\", learning rate {l}", o.concept.name())
    });
    report.settings.push(("token embedding".into(), emb));
    let snr = o.min_snr_gamma.map_or("off".into(), |g| g.to_string());
    report.settings.push(("min-SNR-γ".into(), snr));
    let ts = o.max_timestep.map_or("all (0–999)".into(), |m| format!("0–{}", m.saturating_sub(1)));
    report.settings.push(("timesteps trained".into(), ts));
    report.settings.push((
        "regularization images (prior loss weight, loss against)".into(),
        format!(
            "{}, {}, {}",
            n_reg,
            o.prior_loss_weight,
            if o.prior_preservation == crate::train::config::Preservation::Output {
                "the base's prediction"
            } else {
                "the noise"
            }
        ),
    ));
    let dop = o
        .dop_weight
        .map_or("off".into(), |w| format!("\"{}\" → \"{}\", weight {w}", o.concept.name(), o.dop_class));
    report.settings.push(("differential output preservation".into(), dop));
    report.settings.push((
        "samples".into(),
        format!(
            "{} target + {} control, {} sampler steps each, guidance {}{}",
            o.samples,
            o.controls,
            o.sampling.steps,
            o.sampling.cfg,
            match crate::sample::pipeline::lora_start_steps(o.sampling.lora_start, o.sampling.steps) {
                Ok(n) if n > 0 => format!(", the first {n} steps by the base alone (--lora-start)"),
                _ => String::new(),
            }
        ),
    ));
    report.settings.push((
        "base model on the control prompts".into(),
        format!(
            "colour right {:.0} %, shape right {:.0} %, background right {:.0} %, checkered as asked {:.0} %",
            100.0 * base_knows.colour,
            100.0 * base_knows.shape,
            100.0 * base_knows.background,
            100.0 * base_knows.checks
        ),
    ));
    report.scores = Some(eval.scores);
    let path = o.out.join("report.html");
    report.write(&path)?;
    Ok(DemoResult {
        learned,
        learned_base,
        followed,
        forgotten_points: forgetting.drop_points,
        mean_pixel_distance: forgetting.mean_pixel_distance,
        lora_bytes: summary.lora_bytes,
        seconds: t0.elapsed().as_secs_f64(),
        report: path,
        base_knows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::world::Colour;

    #[test]
    fn demo_seeds_score_disjoint_samples_and_seed_1_keeps_its_own() {
        let known: Vec<Shape> = Shape::ALL.into_iter().filter(|&s| s != crate::demo::base::MISSING).collect();
        let pink = Concept::Colour(Colour::Pink);
        let (t1, c1) = scored_prompts(pink, 1, 20, 20, &known);
        // seed 1's sets are the ones every documented figure was measured on
        assert_eq!(t1[3], (pink.scenes(104, 1, &known)[0].caption(), 4));
        assert_eq!(c1[0], (scenes(201, 20, &known)[0].caption(), 51));
        assert!(t1.iter().all(|(p, _)| p.starts_with("a pink ")), "{t1:?}");
        let mut noise = std::collections::HashSet::new();
        for seed in 1..=5 {
            let (t, c) = scored_prompts(pink, seed, 20, 20, &known);
            assert_eq!((t.len(), c.len()), (20, 20));
            for (_, n) in t.iter().chain(&c) {
                assert!(noise.insert(*n), "seed {seed} reuses sampling seed {n}");
            }
        }
    }
}
