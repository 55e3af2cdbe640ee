//! `sdlora demo-pretrain` (hidden): trains the demo's base model from scratch on the tiny world,
//! as assets/demo_model was made. A research harness, not part of a user's workflow.
use crate::demo::pretrain::{pretrain, PretrainConfig};
use crate::eval::world::Concept;
use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Args)]
pub struct PretrainArgs {
    /// The model folder to write (a diffusers folder the demo reads with `demo --base`).
    #[arg(long)]
    pub out: PathBuf,
    /// Images of the tiny world.
    #[arg(long, default_value_t = 10000)]
    pub images: usize,
    /// VAE steps.
    #[arg(long, default_value_t = 1500)]
    pub vae_steps: usize,
    /// U-Net steps.
    #[arg(long, default_value_t = 4000)]
    pub unet_steps: usize,
    /// Batch size of the U-Net phase.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Batch size of the VAE phase.
    #[arg(long, default_value_t = 32)]
    pub vae_batch: usize,
    /// Learning rate (AdamW, cosine decay), U-Net and VAE.
    #[arg(long, default_value_t = 1e-3, allow_negative_numbers = true)]
    pub lr: f64,
    /// Wall-clock budget of the VAE phase in seconds (cuts --vae-steps to what fits).
    #[arg(long, allow_negative_numbers = true)]
    pub vae_seconds: Option<f64>,
    /// Wall-clock budget of the U-Net phase in seconds (cuts --unet-steps to what fits).
    #[arg(long, allow_negative_numbers = true)]
    pub unet_seconds: Option<f64>,
    /// Continue from this model folder (e.g. assets/demo_model) instead of a seeded init; with
    /// --vae-steps 0 its VAE is kept and only the U-Net trains on.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Also write the folder every N U-Net steps.
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// min-SNR-γ weighting of the U-Net loss [default: off].
    #[arg(long, allow_negative_numbers = true)]
    pub min_snr_gamma: Option<f64>,
    /// Name the texture last ("…, striped") in every other caption, the slot where the demo's
    /// captions name checks (how the committed base's stage 6 was trained).
    #[arg(long)]
    pub texture_last: bool,
    /// With --init: the VAE phase trains only the decoder, on every shape and texture of the
    /// world (checks and stars included, as SD's VAE saw everything); the encoder and latent
    /// scale are kept, so the U-Net's latents stay valid (--unet-steps 0 keeps it).
    #[arg(long)]
    pub decoder_only: bool,
    /// With --init: the U-Net's full-resolution blocks gain cross-attention (as SD 1.x has
    /// there), new transformers with a zero output projection, so the grown model draws exactly
    /// what --init drew until --unet-steps train them.
    #[arg(long)]
    pub grow_attention: bool,
    /// Share of captions whose colour word is a word of CLIP's vocabulary the world never uses
    /// ("a harbour ring on …", the picture keeps its colour), so the base lays out the asked
    /// shape after a colour word it does not know — as "pink" is to it.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE")]
    pub unknown_colours: f64,
    /// The shape left out of pretraining (pretraining never draws checks or pink) [default: star].
    #[arg(long, default_value = "star")]
    pub concept: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(a: &PretrainArgs) -> Result<()> {
    let concept = Concept::from_name(&a.concept).ok_or_else(|| {
        anyhow::anyhow!(
            "--concept `{}`: checkered, pink, or a shape: circle, square, triangle, star, cross, ring",
            a.concept
        )
    })?;
    check(a)?;
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
    pretrain(&cfg, &a.out, &mut |what, i, n, loss| {
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
    println!("wrote {} in {:.0} s", a.out.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

fn check(a: &PretrainArgs) -> Result<()> {
    if a.grow_attention && a.init.is_none() {
        anyhow::bail!("--grow-attention adds attention to a trained U-Net: give the model with --init (e.g. assets/demo_model)");
    }
    if a.decoder_only && a.init.is_none() {
        anyhow::bail!(
            "--decoder-only fine-tunes a trained VAE: give the model with --init (e.g. assets/demo_model)"
        );
    }
    if a.images == 0 || a.batch == 0 || a.vae_batch == 0 {
        anyhow::bail!("--images, --batch and --vae-batch must be at least 1");
    }
    if !(a.lr > 0.0 && a.lr.is_finite()) {
        anyhow::bail!("--lr {} must be a positive number", a.lr);
    }
    if let Some(g) = a.min_snr_gamma.filter(|g| !(*g >= 0.0 && g.is_finite())) {
        anyhow::bail!("--min-snr-gamma {g} must be 0 or more");
    }
    if !(0.0..=1.0).contains(&a.unknown_colours) {
        anyhow::bail!("--unknown-colours {} is a share of the captions: give 0 to 1", a.unknown_colours);
    }
    for (name, s) in [("--vae-seconds", a.vae_seconds), ("--unet-seconds", a.unet_seconds)] {
        if let Some(s) = s.filter(|s| !(*s > 0.0 && s.is_finite())) {
            anyhow::bail!("{name} {s} must be a positive number");
        }
    }
    Ok(())
}
