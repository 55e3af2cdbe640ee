//! `sdlora demo`: the whole product on the embedded tiny world (see src/demo/).
use crate::demo::pretrain::{pretrain, PretrainConfig};
use crate::demo::world::Concept;
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    /// Where the demo writes its dataset, LoRA and report.html.
    #[arg(long, default_value = "sdlora-demo")]
    pub out: PathBuf,
    /// Instead of the demo: train the demo's base model from scratch into this folder (what
    /// assets/demo_model was made with).
    #[arg(long)]
    pub pretrain: Option<PathBuf>,
    /// Pretraining: images of the tiny world.
    #[arg(long, default_value_t = 10000)]
    pub images: usize,
    /// Pretraining: VAE steps.
    #[arg(long, default_value_t = 1500)]
    pub vae_steps: usize,
    /// Pretraining: U-Net steps.
    #[arg(long, default_value_t = 4000)]
    pub unet_steps: usize,
    /// Pretraining: batch size of the U-Net phase.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Pretraining: batch size of the VAE phase.
    #[arg(long, default_value_t = 32)]
    pub vae_batch: usize,
    /// Pretraining: learning rate (AdamW, cosine decay), U-Net and VAE.
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    pub lr: f64,
    /// Pretraining: wall-clock budget of the VAE phase in seconds (cuts --vae-steps to what fits).
    #[arg(long, allow_negative_numbers = true)]
    pub vae_seconds: Option<f64>,
    /// Pretraining: wall-clock budget of the U-Net phase in seconds (cuts --unet-steps to what fits).
    #[arg(long, allow_negative_numbers = true)]
    pub unet_seconds: Option<f64>,
    /// Pretraining: continue from this model folder (e.g. assets/demo_model) instead of a seeded
    /// init; with --vae-steps 0 its VAE is kept and only the U-Net trains on.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Pretraining: also write the folder every N U-Net steps.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// min-SNR-γ weighting of the U-Net loss: the LoRA's [default: 5; 0: off], or with --pretrain
    /// the base's [default: off].
    #[arg(long, allow_negative_numbers = true)]
    pub min_snr_gamma: Option<f64>,
    /// Pretraining: name the texture last ("…, striped") in every other caption, the slot where
    /// the demo's captions name checks (how the committed base's stage 6 was trained).
    #[arg(long)]
    pub texture_last: bool,
    /// Pretraining, with --init: the VAE phase trains only the decoder, on every shape and
    /// texture of the world (checks and stars included, as SD's VAE saw everything); the encoder
    /// and latent scale are kept, so the U-Net's latents stay valid (--unet-steps 0 keeps it).
    #[arg(long)]
    pub decoder_only: bool,
    /// Pretraining, with --init: the U-Net's full-resolution blocks gain cross-attention (as SD
    /// 1.x has there), new transformers with a zero output projection, so the grown model draws
    /// exactly what --init drew until --unet-steps train them.
    #[arg(long)]
    pub grow_attention: bool,
    /// Pretraining: share of captions whose colour word is a word of CLIP's vocabulary the world
    /// never uses ("a harbour ring on …", the picture keeps its colour), so the base lays out the
    /// asked shape after a colour word it does not know — as "pink" is to it.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    pub unknown_colours: f64,
    /// What the LoRA learns: "pink" (a colour), "checkered" (a texture) or a shape (star, …)
    /// [default: pink]. With --pretrain: the shape left out of pretraining [default there: star];
    /// pretraining never draws checks or pink.
    #[arg(long)]
    pub concept: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// LoRA training steps [default: 600 for a colour, 1000 for a texture, 700 for a shape].
    #[arg(long)]
    pub steps: Option<usize>,
    /// LoRA batch size.
    #[arg(long, default_value_t = 4)]
    pub lora_batch: usize,
    /// LoRA learning rate.
    #[arg(long, default_value_t = 7e-4, allow_negative_numbers = true)]
    pub lora_lr: f64,
    /// Schedule of the LoRA's learning rates, as `train --lr-scheduler`.
    #[arg(long, value_enum, default_value = "constant")]
    pub lr_scheduler: crate::train::optim::LrSchedule,
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
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    /// LoRA layers, as `train --targets`: attn, attn-mlp, or full (adds the ResNet convolutions, "LoCon")
    #[arg(long, default_value = "full")]
    pub targets: String,
    /// Layers left out of the adapters, as `train --exclude-layers` (a regular expression on
    /// diffusers paths); "none" keeps every layer of --targets.
    #[arg(long, value_name = "REGEX", default_value = "none")]
    pub exclude_layers: String,
    /// Regularization images the base draws of the shapes it knows, mixed into training
    /// (`train --reg-data`); 0 trains on the concept's images alone. At most --images are drawn:
    /// training shows as many regularization images per epoch as training images (kohya's
    /// balance), so more would sit out.
    #[arg(long, default_value_t = 20)]
    pub reg: usize,
    /// What the regularization images' loss pulls towards, as `train --prior-preservation`:
    /// noise, or output (the base's own prediction).
    #[arg(long, default_value = "noise", value_name = "noise|output")]
    pub prior_preservation: String,
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
    /// A base model folder (e.g. from --pretrain) instead of the embedded one.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Target prompts, and control prompts, that base and LoRA each draw after training. At 20
    /// one sample moves "learned" by 5 %; more samples narrow the 95 % interval the report gives
    /// (about ±20 points at 20 samples, ±10 at 80) and take longer to draw.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
}

pub fn run(a: &DemoArgs) -> Result<()> {
    let default = if a.pretrain.is_some() { "star" } else { crate::demo::base::CONCEPT.name() };
    let name = a.concept.as_deref().unwrap_or(default);
    let concept = Concept::from_name(name).ok_or_else(|| {
        anyhow::anyhow!(
            "--concept `{name}`: checkered, pink, or a shape: circle, square, triangle, star, cross, ring"
        )
    })?;
    check_numbers(a)?;
    if a.grow_attention && a.init.is_none() {
        anyhow::bail!("--grow-attention adds attention to a trained U-Net: give the model with --init (e.g. assets/demo_model)");
    }
    if a.decoder_only && a.init.is_none() {
        anyhow::bail!(
            "--decoder-only fine-tunes a trained VAE: give the model with --init (e.g. assets/demo_model)"
        );
    }
    if let Some(out) = &a.pretrain {
        let cfg = PretrainConfig {
            seed: a.seed,
            images: a.images,
            exclude: match concept {
                Concept::Shape(s) => s,
                Concept::Texture(_) | Concept::Colour(_) => crate::demo::base::MISSING,
            },
            vae_steps: a.vae_steps,
            unet_steps: a.unet_steps,
            batch: a.batch,
            vae_batch: a.vae_batch,
            lr: a.lr,
            seconds: match (a.vae_seconds, a.unet_seconds) {
                (None, None) => None,
                (v, u) => Some((v.unwrap_or(f64::INFINITY), u.unwrap_or(f64::INFINITY))),
            },
            save_every: a.save_every,
            init: a.init.clone(),
            min_snr_gamma: a.min_snr_gamma,
            texture_last: a.texture_last,
            decoder_only: a.decoder_only,
            grow_attention: a.grow_attention,
            unknown_colours: a.unknown_colours,
        };
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>5} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                .expect("valid")
                .progress_chars("=> "),
        );
        let t0 = std::time::Instant::now();
        let mut ema = None::<f64>;
        let mut last = String::new();
        pretrain(&cfg, out, &mut |what, i, n, loss| {
            if what != last {
                last = what.to_string();
                ema = None;
                bar.set_prefix(what.to_string());
                bar.set_length(n as u64);
                bar.reset_eta();
            }
            let e = ema.map(|e| 0.98 * e + 0.02 * loss).unwrap_or(loss);
            ema = Some(e);
            bar.set_position(i as u64);
            bar.set_message(format!("loss {e:.4}"));
            if i == n || i % 250 == 0 {
                eprintln!("{what} step {i}/{n}: loss {e:.5} ({:.0} s)", t0.elapsed().as_secs_f64());
            }
        })?;
        bar.finish_and_clear();
        println!("wrote {} in {:.0} s", out.display(), t0.elapsed().as_secs_f64());
        return Ok(());
    }
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
        seed: a.seed,
        lr: a.lora_lr,
        lr_scheduler: a.lr_scheduler,
        rank: a.rank,
        targets: a.targets.clone(),
        exclude_layers: (a.exclude_layers != "none").then(|| a.exclude_layers.clone()),
        reg: a.reg,
        prior_preservation: a.prior_preservation.clone(),
        prior_loss_weight: a.prior_loss_weight.unwrap_or(d.prior_loss_weight),
        dop_weight: a.dop_weight.map_or(d.dop_weight, |w| (w > 0.0).then_some(w)),
        dop_class: a.dop_class.clone(),
        max_timestep: (a.max_timestep != 1000).then_some(a.max_timestep),
        sampling: crate::train::evaluate::Sampling {
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
        batch: a.lora_batch,
        samples: a.samples,
        controls: a.samples,
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
    let (lo, hi) = crate::demo::metrics::interval95(r.learned, a.samples);
    eprintln!(
        "concept shown in {:.0} % of {} target samples (95 % interval {:.0}–{:.0} %); by the base in {:.0} % of them",
        100.0 * r.learned,
        a.samples,
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
    if a.pretrain.is_some() {
        if a.images == 0 || a.batch == 0 || a.vae_batch == 0 {
            anyhow::bail!("--images, --batch and --vae-batch must be at least 1");
        }
        positive("--lr", a.lr)?;
        if !(0.0..=1.0).contains(&a.unknown_colours) {
            anyhow::bail!("--unknown-colours {} is a share of the captions: give 0 to 1", a.unknown_colours);
        }
        for (name, s) in [("--vae-seconds", a.vae_seconds), ("--unet-seconds", a.unet_seconds)] {
            s.map_or(Ok(()), |s| positive(name, s))?;
        }
        return Ok(());
    }
    if a.steps == Some(0) || a.lora_batch == 0 || a.rank == 0 || a.samples == 0 {
        anyhow::bail!("--steps, --lora-batch, --rank and --samples must be at least 1");
    }
    positive("--lora-lr", a.lora_lr)?;
    zero_or_more("--text-encoder-lr", a.text_encoder_lr)?;
    zero_or_more("--embedding-lr", a.embedding_lr)?;
    zero_or_more("--prior-loss-weight", a.prior_loss_weight)?;
    zero_or_more("--dop-weight", a.dop_weight)?;
    if a.reg == 0 && a.prior_loss_weight.is_some() {
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
