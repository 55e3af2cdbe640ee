//! `sdlora demo`: the whole product on the embedded tiny world (see src/demo/).
use crate::eval::world::Concept;
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo writes its dataset, LoRA and report.html.
    #[arg(long, default_value = "sdlora-demo")]
    pub out: PathBuf,
    /// min-SNR-γ weighting of the LoRA's loss [default: 5; 0: off].
    #[arg(long, allow_negative_numbers = true)]
    pub min_snr_gamma: Option<f64>,
    /// What the LoRA learns: "pink" (a colour), "checkered" (a texture) or a shape (star, …)
    /// [default: pink].
    #[arg(long)]
    pub concept: Option<String>,
    /// Seed of the demo's images, training and samples; each seed scores its own samples.
    #[arg(long)]
    pub seed: Option<u64>,
    /// LoRA training steps [default: 600 for a colour, 1000 for a texture, 700 for a shape].
    #[arg(long)]
    pub steps: Option<usize>,
    /// LoRA batch size.
    #[arg(long)]
    pub lora_batch: Option<usize>,
    /// LoRA learning rate.
    #[arg(long, allow_negative_numbers = true)]
    pub lora_lr: Option<f64>,
    /// Schedule of the LoRA's learning rates, as `train --lr-scheduler`.
    #[arg(long, value_enum)]
    pub lr_scheduler: Option<crate::train::optim::LrSchedule>,
    /// Learning rate of the text encoder's LoRA; 0 leaves the text encoder alone [default: off for a
    /// colour, which trains its word's embedding instead (--init-word); 2e-3 otherwise].
    #[arg(long, allow_negative_numbers = true)]
    pub text_encoder_lr: Option<f64>,
    /// Also train the concept word's token embedding, starting from this word's (several,
    /// comma-separated: their mean), as `train --train-embedding <concept> --init-word`; "none"
    /// leaves it alone [default: for a colour the mean of the world's other colours, which the
    /// base can read; none otherwise].
    #[arg(long, value_name = "WORD")]
    pub init_word: Option<String>,
    /// Learning rate of that embedding [default: 1e-3].
    #[arg(long, allow_negative_numbers = true)]
    pub embedding_lr: Option<f64>,
    /// LoRA rank (network dim)
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA layers, as `train --targets`: attn, attn-mlp, or full (adds the ResNet convolutions, "LoCon")
    #[arg(long, value_enum)]
    pub targets: Option<crate::lora::targets::Preset>,
    /// Layers left out of the adapters, as `train --exclude-layers` (a regular expression on
    /// diffusers paths); "none" keeps every layer of --targets.
    #[arg(long, value_name = "REGEX", default_value = "none")]
    pub exclude_layers: String,
    /// Regularization images the base draws of the shapes it knows, mixed into training
    /// (`train --reg-data`); 0 trains on the concept's images alone. At most as many as the 20
    /// training images are drawn: training shows as many regularization images per epoch as
    /// training images (kohya's balance), so more would sit out.
    #[arg(long)]
    pub reg: Option<usize>,
    /// What the regularization images' loss pulls towards, as `train --prior-preservation`:
    /// noise, or output (the base's own prediction).
    #[arg(long, value_enum)]
    pub prior_preservation: Option<crate::train::config::Preservation>,
    /// Weight of the regularization images' loss, as `train --prior-loss-weight` [default: 2 for a
    /// colour, 1 for checkered and shapes].
    #[arg(long, allow_negative_numbers = true)]
    pub prior_loss_weight: Option<f64>,
    /// Differential output preservation, as `train --dop-trigger <concept> --dop-weight W`: each
    /// training image also trains with the concept's word taken out of its caption, towards the
    /// base's own prediction; 0 turns it off [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub dop_weight: Option<f64>,
    /// What the concept's word becomes in those captions, as `train --dop-class`: `|`-separated
    /// alternatives, e.g. "|striped|dotted" (nothing, or a texture the base knows); empty: the
    /// word is taken out.
    #[arg(long, default_value = "")]
    pub dop_class: String,
    /// Train the LoRA only on timesteps below this, as `train --max-timestep` (of 1000): the
    /// checks are drawn at low noise, the layout at high.
    #[arg(long, default_value_t = 1000)]
    pub max_timestep: usize,
    /// Classifier-free guidance of every image the demo draws (regularization images, target and
    /// control samples) [default: 3 for a colour, 5 for checkered and shapes].
    #[arg(long, allow_negative_numbers = true)]
    pub cfg: Option<f64>,
    /// Share of the sampling steps the base draws alone before the LoRA joins in, for every
    /// image drawn with the LoRA (the grids during training, target and control samples), as
    /// `generate --lora-start`: the base lays out the picture, the LoRA adds its colour or
    /// texture [default: 0.3 for a colour or a texture (the first 6 of 20 steps), 0 for a shape,
    /// which the LoRA must lay out itself].
    #[arg(long, value_name = "SHARE", allow_negative_numbers = true)]
    pub lora_start: Option<f64>,
    /// A base model folder (e.g. from `sdlora demo-pretrain`) instead of the embedded one.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Target prompts, and control prompts, that base and LoRA each draw after training. At 20
    /// one sample moves "learned" by 5 %; more samples narrow the 95 % interval the report gives
    /// (about ±20 points at 20 samples, ±10 at 80) and take longer to draw.
    #[arg(long)]
    pub samples: Option<usize>,
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let name = a.concept.as_deref().unwrap_or(crate::demo::base::CONCEPT.name());
    let concept = Concept::from_name(name).ok_or_else(|| {
        anyhow::anyhow!(
            "--concept `{name}`: checkered, pink, or a shape: circle, square, triangle, star, cross, ring"
        )
    })?;
    check_numbers(a)?;
    let d = crate::demo::run::DemoOptions::for_concept(a.out.clone(), concept);
    let trains_embedding = match a.init_word.as_deref() {
        Some(w) => w != "none",
        None => d.embedding.is_some(),
    };
    if a.embedding_lr.is_some() && !trains_embedding {
        anyhow::bail!(
            "--embedding-lr: concept {} trains no embedding here — start one with --init-word WORD",
            concept.name()
        );
    }
    let opts = crate::demo::run::DemoOptions {
        concept,
        steps: a.steps.unwrap_or(d.steps),
        seed: a.seed.unwrap_or(d.seed),
        lr: a.lora_lr.unwrap_or(d.lr),
        lr_scheduler: a.lr_scheduler.unwrap_or(d.lr_scheduler),
        rank: a.rank.unwrap_or(d.rank),
        targets: a.targets.unwrap_or(d.targets),
        exclude_layers: (a.exclude_layers != "none").then(|| a.exclude_layers.clone()),
        reg: a.reg.unwrap_or(d.reg),
        prior_preservation: a.prior_preservation.unwrap_or(d.prior_preservation),
        prior_loss_weight: a.prior_loss_weight.unwrap_or(d.prior_loss_weight),
        dop_weight: a.dop_weight.map_or(d.dop_weight, |w| (w > 0.0).then_some(w)),
        dop_class: a.dop_class.clone(),
        max_timestep: (a.max_timestep != 1000).then_some(a.max_timestep),
        sampling: crate::sample::pipeline::Sampling {
            cfg: a.cfg.unwrap_or(d.sampling.cfg),
            lora_start: a.lora_start.unwrap_or(d.sampling.lora_start),
            ..d.sampling
        },
        min_snr_gamma: a.min_snr_gamma.map_or(d.min_snr_gamma, |g| (g > 0.0).then_some(g)),
        text_encoder_lr: a.text_encoder_lr.map_or(d.text_encoder_lr, |l| (l > 0.0).then_some(l)),
        embedding: match a.init_word.as_deref() {
            Some("none") => None,
            Some(w) => {
                Some((w.to_string(), a.embedding_lr.unwrap_or(d.embedding.as_ref().map_or(1e-3, |e| e.1))))
            }
            None => d.embedding.clone().map(|(w, l)| (w, a.embedding_lr.unwrap_or(l))),
        },
        batch: a.lora_batch.unwrap_or(d.batch),
        samples: a.samples.unwrap_or(d.samples),
        controls: a.samples.unwrap_or(d.controls),
        ..d
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("demo: {msg} {bar:30} {pos}/{len} {elapsed}")
            .expect("valid")
            .progress_chars("=> "),
    );
    let mut phase = String::new();
    let r = crate::demo::run::run(&opts, a.base.as_deref(), &mut |what, i, n| {
        if what != phase {
            phase = what.to_string();
            bar.println(format!("demo: {what}"));
            bar.set_message(what.to_string());
            bar.set_length(n as u64);
        }
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let k = r.base_knows;
    eprintln!(
        "base on control prompts: colour {:.0} %, shape {:.0} %, background {:.0} %, checkered as asked {:.0} %; \
         LoRA changed them by {:.1}/255",
        100.0 * k.colour,
        100.0 * k.shape,
        100.0 * k.background,
        100.0 * k.checks,
        r.mean_pixel_distance
    );
    let (lo, hi) = crate::util::interval95(r.learned, opts.samples);
    eprintln!(
        "concept shown in {:.0} % of {} target samples (95 % interval {:.0}–{:.0} %); by the base in {:.0} % of them",
        100.0 * r.learned,
        opts.samples,
        100.0 * lo,
        100.0 * hi,
        100.0 * r.learned_base
    );
    eprintln!(
        "the whole prompt (concept, shape, colour and background) in {:.0} % of them; by the base in {:.0} %",
        100.0 * r.followed.0,
        100.0 * r.followed.1
    );
    eprintln!("report: {}", r.report.display());
    println!(
        "learned: {:.1}% forgotten: {:.1} lora_bytes: {} seconds: {:.1}",
        100.0 * r.learned,
        r.forgotten_points,
        r.lora_bytes,
        r.seconds
    );
    Ok(())
}

/// Numbers the demo cannot run with, named by the demo's own flags (`train` names its own).
fn check_numbers(a: &DemoArgs) -> Result<()> {
    let positive = |name: &str, v: f64| match v > 0.0 && v.is_finite() {
        true => Ok(()),
        false => Err(anyhow::anyhow!("{name} {v} must be a positive number")),
    };
    let zero_or_more = |name: &str, v: Option<f64>| match v.is_none_or(|v| v >= 0.0 && v.is_finite()) {
        true => Ok(()),
        false => Err(anyhow::anyhow!("{name} {} must be 0 or more", v.unwrap_or_default())),
    };
    zero_or_more("--min-snr-gamma", a.min_snr_gamma)?;
    if [a.steps, a.lora_batch, a.rank, a.samples].contains(&Some(0)) {
        anyhow::bail!("--steps, --lora-batch, --rank and --samples must be at least 1");
    }
    a.lora_lr.map_or(Ok(()), |l| positive("--lora-lr", l))?;
    zero_or_more("--text-encoder-lr", a.text_encoder_lr)?;
    zero_or_more("--embedding-lr", a.embedding_lr)?;
    zero_or_more("--prior-loss-weight", a.prior_loss_weight)?;
    zero_or_more("--dop-weight", a.dop_weight)?;
    if a.reg == Some(0) && a.prior_loss_weight.is_some() {
        anyhow::bail!(
            "--prior-loss-weight weighs the regularization images: drop it, or leave --reg above 0"
        );
    }
    if !a.dop_class.is_empty() && a.dop_weight.is_none_or(|w| w == 0.0) {
        anyhow::bail!(
            "--dop-class is what the concept's word becomes with --dop-weight: give a weight above 0"
        );
    }
    if !(1..=1000).contains(&a.max_timestep) {
        anyhow::bail!("--max-timestep {} must be 1 to 1000 (the base's training timesteps)", a.max_timestep);
    }
    if let Some(cfg) = a.cfg.filter(|c| !(*c >= 1.0 && c.is_finite())) {
        anyhow::bail!("--cfg {cfg} must be 1 (no guidance) or more");
    }
    if let Some(s) = a.lora_start.filter(|s| !(0.0..=1.0).contains(s)) {
        anyhow::bail!("--lora-start {s}: a share of the sampling steps between 0 and 1");
    }
    Ok(())
}
