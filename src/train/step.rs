//! One micro-step: draw a batch (latents, captions, noise, timesteps), add the preservation
//! rows, forward through the U-Net (and the text encoders when they train), the weighted loss,
//! and in `Mode::Train` the backward into the adapters' gradients.
use super::batches::{augment_caption, dop_caption, randn, rng_for};
use super::config::{Preservation, TrainConfig};
use super::setup::Run;
use crate::data::prepare::Sample;
use crate::model::layers::Grads;
use crate::model::text::Conditioning;
use crate::model::unet::UNetInput;
use anyhow::Result;
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::Rng;
use std::collections::HashMap;

/// What a micro-step computes beyond the loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// Forward and backward; the gradients are scaled by `scale` (1 / gradient accumulation).
    Train { scale: f64 },
    /// Forward only, without dropout or preservation rows by the trigger word: the fixed-seed
    /// evaluation loss.
    Evaluate,
}

/// Text conditionings by caption, kept for the whole run (the text encoders are frozen unless
/// they train, and then this cache is not used).
pub type TextCache = HashMap<String, Conditioning>;

/// The loss of one micro-batch `idx` at micro-step `k`; in `Mode::Train` its gradients are
/// added to `g`.
pub fn micro_step(
    run: &Run,
    cfg: &TrainConfig,
    idx: &[usize],
    k: u64,
    text: &mut TextCache,
    g: &mut Grads,
    mode: Mode,
) -> Result<f64> {
    let mut rng = rng_for(cfg.seed, "micro", k);
    // LoRA dropout masks for this micro-step (none while evaluating)
    let dropout_seed = match mode {
        Mode::Train { .. } => rng_for(cfg.seed, "dropout", k).random::<u64>() >> 1,
        Mode::Evaluate => u64::MAX,
    };
    run.switch.set_dropout_seed(dropout_seed);
    let mut b = Batch::draw(run, cfg, idx, &mut rng)?;
    if let (Some(w), Mode::Train { .. }) = (&cfg.dop_trigger, mode) {
        b.add_dop_rows(run, w, &cfg.dop_class, &mut rng)?;
    }
    b.predict_preserved_targets(run, cfg, text)?;

    let encoders = &run.sd.text_encoders;
    let (cond, te_saved) = if run.train_text {
        let (c, s, ids) = run.prompts.encode_train(encoders, &b.captions)?;
        (c, Some((s, ids)))
    } else {
        (base_conditioning(run, &b.captions, text)?, None)
    };
    let unet = run.sd.unet.as_ref().expect("loaded");
    let input = b.unet_input(&cond);
    let (pred, saved) = match mode {
        // nothing kept for a backward: at full size that is gigabytes
        Mode::Evaluate => (unet.forward(&input)?, None),
        Mode::Train { .. } => unet.forward_train(&input).map(|(p, s)| (p, Some(s)))?,
    };
    let diff = (pred.to_dtype(DType::F32)? - &b.target)?;
    let weights = Tensor::from_vec(b.loss_weights(run, cfg), (b.of.len(), 1, 1, 1), &run.device)?;
    // kohya's masked loss: the squared error weighed per latent pixel, then the same mean
    let mdiff = match &b.mask {
        Some(m) => diff.broadcast_mul(m)?,
        None => diff.clone(),
    };
    // per-row MSE times its weight, summed over rows and divided by the drawn samples
    let per_row = (&diff * &mdiff)?.mean((1, 2, 3))?;
    let loss = (per_row * weights.flatten_all()?)?.sum_all()?.to_scalar::<f32>()? as f64 / b.n as f64;
    let (Mode::Train { scale }, Some(saved)) = (mode, saved) else { return Ok(loss) };

    let n_el = diff.elem_count() / b.of.len();
    let dpred = (mdiff.broadcast_mul(&weights)? * (2.0 * scale * loss_scale(run) / (n_el * b.n) as f64))?;
    let d = unet.backward(saved, &dpred.to_dtype(pred.dtype())?, g)?;
    if let Some((s, ids)) = te_saved {
        let d_embeds =
            run.prompts.backward_train(encoders, s, &d.encoder_hidden_states, d.text_embeds.as_ref(), g)?;
        if let Some(e) = &run.embedding {
            for (k, (ids, d)) in ids.iter().zip(&d_embeds).enumerate() {
                g.add_weight(e.vectors[k].as_tensor(), e.grad(k, ids, d)?)?;
            }
        }
    }
    Ok(loss)
}

/// A micro-batch ready for the U-Net. Rows 0..n are the drawn samples; rows n.. are their copies
/// with the trigger word taken out (`--dop-trigger`). `of[row]` is the drawn sample behind a row.
struct Batch<'a> {
    samples: Vec<&'a Sample>,
    n: usize,
    of: Vec<usize>,
    /// Timestep of each drawn sample.
    t: Vec<usize>,
    captions: Vec<String>,
    xt: Tensor,
    timestep: Tensor,
    time_ids: Tensor,
    target: Tensor,
    /// `--masked-loss`: each row's loss weight per latent pixel, [rows, 1, h, w].
    mask: Option<Tensor>,
}

impl<'a> Batch<'a> {
    /// Latents (cropped and flipped as asked), captions (augmented), noise and timesteps, all from
    /// `rng` in a fixed order: the same micro-step draws the same batch, also after a resume.
    fn draw(run: &'a Run, cfg: &TrainConfig, idx: &[usize], rng: &mut StdRng) -> Result<Self> {
        let dev = &run.device;
        let samples: Vec<&Sample> = idx.iter().map(|&i| &run.samples[i]).collect();
        let (latents, masks): (Vec<Tensor>, Vec<Option<Tensor>>) = if cfg.random_crop {
            let drawn =
                samples.iter().map(|s| random_crop_latent(run, cfg, s, rng)).collect::<Result<Vec<_>>>()?;
            drawn.into_iter().unzip()
        } else {
            samples
                .iter()
                .map(|s| match (&s.latent_flipped, cfg.flip && rng.random::<bool>()) {
                    (Some(f), true) => (f.clone(), s.mask_flipped.clone()),
                    _ => (s.latent.clone(), s.mask.clone()),
                })
                .unzip()
        };
        let x0 = Tensor::stack(&latents, 0)?.to_device(dev)?;
        // images without a mask count whole
        let mask = match masks.iter().any(Option::is_some) {
            true => {
                let full = |l: &Tensor| Tensor::ones((1, l.dim(1)?, l.dim(2)?), DType::F32, l.device());
                let m: Vec<Tensor> = masks
                    .iter()
                    .zip(&latents)
                    .map(|(m, l)| m.clone().map_or_else(|| full(l), Ok))
                    .collect::<candle_core::Result<_>>()?;
                Some(Tensor::stack(&m, 0)?.to_device(dev)?)
            }
            false => None,
        };
        let captions: Vec<String> = samples
            .iter()
            .map(|s| {
                // guidance weighs the unconditional prediction (cfg − 1)×: output preservation
                // keeps it too, on every other draw of a reg image
                if preserved_by_output(run, cfg, s) && rng.random::<bool>() {
                    return String::new();
                }
                augment_caption(&s.caption, rng, cfg.caption_dropout, cfg.shuffle_tags, cfg.keep_tokens)
            })
            .collect();
        let mut noise = randn(rng, x0.dims(), dev)?;
        if cfg.noise_offset > 0.0 {
            let (b, c) = (x0.dim(0)?, x0.dim(1)?);
            noise = noise.broadcast_add(&(randn(rng, &[b, c, 1, 1], dev)? * cfg.noise_offset)?)?;
        }
        let sched = &run.sched;
        let range = cfg.timesteps(sched.len())?;
        let t: Vec<usize> = (0..idx.len()).map(|_| rng.random_range(range.clone())).collect();
        // SDXL's micro-conditioning: original size, crop corner, target size
        let ids: Vec<f32> = samples
            .iter()
            .flat_map(|s| {
                [s.original_hw.0, s.original_hw.1, s.crop_tl.0, s.crop_tl.1, s.bucket.1, s.bucket.0]
                    .map(|v| v as f32)
            })
            .collect();
        let n = idx.len();
        Ok(Batch {
            xt: sched.add_noise(&x0, &noise, &t)?,
            timestep: Tensor::from_vec(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), n, dev)?,
            time_ids: Tensor::from_vec(ids, (n, 6), dev)?,
            target: sched.target(&x0, &noise, &t)?,
            mask,
            samples,
            n,
            of: (0..n).collect(),
            t,
            captions,
        })
    }

    /// Differential output preservation: each training row (not a regularization image) once
    /// more, the trigger `word` taken out of its caption (or replaced by one of `class`).
    fn add_dop_rows(&mut self, run: &Run, word: &str, class: &str, rng: &mut StdRng) -> Result<()> {
        let dop: Vec<(usize, String)> = (0..self.n)
            .filter(|&i| !run.items[self.samples[i].item].reg)
            .filter_map(|i| dop_caption(&self.captions[i], word, class, rng).map(|c| (i, c)))
            .collect();
        if dop.is_empty() {
            return Ok(());
        }
        self.of.extend(dop.iter().map(|d| d.0));
        let ix = Tensor::from_vec(
            self.of.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            self.of.len(),
            &run.device,
        )?;
        self.xt = self.xt.index_select(&ix, 0)?;
        self.timestep = self.timestep.index_select(&ix, 0)?;
        self.time_ids = self.time_ids.index_select(&ix, 0)?;
        self.target = self.target.index_select(&ix, 0)?;
        self.mask = self.mask.as_ref().map(|m| m.index_select(&ix, 0)).transpose()?;
        self.captions.extend(dop.into_iter().map(|d| d.1));
        Ok(())
    }

    /// The target of every preservation row (the trigger's copies, and regularization images
    /// under `--prior-preservation output`) becomes the base model's own prediction for the same
    /// noisy latent, timestep and caption: one forward with every adapter off, no gradients.
    fn predict_preserved_targets(
        &mut self,
        run: &Run,
        cfg: &TrainConfig,
        text: &mut TextCache,
    ) -> Result<()> {
        let rows: Vec<usize> = (0..self.of.len())
            .filter(|&r| r >= self.n || preserved_by_output(run, cfg, self.samples[r]))
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let ix =
            Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &run.device)?;
        let caps: Vec<String> = rows.iter().map(|&r| self.captions[r].clone()).collect();
        let cond = base_conditioning(run, &caps, text)?;
        let (xt, timestep, time_ids) = (
            self.xt.index_select(&ix, 0)?,
            self.timestep.index_select(&ix, 0)?,
            self.time_ids.index_select(&ix, 0)?,
        );
        let unet = run.sd.unet.as_ref().expect("loaded");
        let input = UNetInput {
            sample: &xt,
            timestep: &timestep,
            encoder_hidden_states: &cond.context,
            text_embeds: cond.pooled.as_ref(),
            time_ids: Some(&time_ids),
        };
        let base = run.switch.off_while(|| unet.forward(&input))?.to_dtype(DType::F32)?;
        let rows_out = (0..self.target.dim(0)?)
            .map(|i| match rows.iter().position(|&r| r == i) {
                Some(j) => base.get(j),
                None => self.target.get(i),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.target = Tensor::stack(&rows_out, 0)?;
        Ok(())
    }

    /// Each row's loss weight: min-SNR-γ, times `--prior-loss-weight` for regularization images
    /// (kohya's loss_weights) and `--dop-weight` for the trigger's copies.
    fn loss_weights(&self, run: &Run, cfg: &TrainConfig) -> Vec<f32> {
        self.of
            .iter()
            .enumerate()
            .map(|(r, &i)| {
                let snr = cfg.min_snr_gamma.map(|gm| run.sched.min_snr_weight(self.t[i], gm)).unwrap_or(1.0);
                let prior = match (r >= self.n, run.items[self.samples[i].item].reg) {
                    (true, _) => cfg.dop_weight,
                    (false, true) => cfg.prior_loss_weight,
                    (false, false) => 1.0,
                };
                (snr * prior) as f32
            })
            .collect()
    }

    fn unet_input<'b>(&'b self, cond: &'b Conditioning) -> UNetInput<'b> {
        UNetInput {
            sample: &self.xt,
            timestep: &self.timestep,
            encoder_hidden_states: &cond.context,
            text_embeds: cond.pooled.as_ref(),
            time_ids: Some(&self.time_ids),
        }
    }
}

/// Whether a sample's target is the base's prediction (`--prior-preservation output` on a
/// regularization image).
fn preserved_by_output(run: &Run, cfg: &TrainConfig, s: &Sample) -> bool {
    cfg.prior_preservation == Preservation::Output && run.items[s.item].reg
}

/// The base model's conditioning of `captions` (the text encoder's adapters switched off),
/// cached in memory and on disk: it never changes during a run.
fn base_conditioning(run: &Run, captions: &[String], text: &mut TextCache) -> Result<Conditioning> {
    let dev = &run.device;
    for c in captions {
        if !text.contains_key(c) {
            // a trained embedding changes the encoder's table: such runs keep their encodings
            // off the disk cache, which other runs read
            let disk = run.embedding.is_none();
            let cond = match run.text_cache.get(c, dev).filter(|_| disk) {
                Some(x) => x,
                None => {
                    let encode = || run.prompts.encode(&run.sd.text_encoders, std::slice::from_ref(c));
                    let x = run.switch.off_while(encode)?;
                    if disk {
                        run.text_cache.put(c, &x);
                    }
                    x
                }
            };
            text.insert(c.clone(), cond);
        }
    }
    let ctx = Tensor::cat(&captions.iter().map(|c| &text[c].context).collect::<Vec<_>>(), 0)?;
    let pooled = text[&captions[0]]
        .pooled
        .as_ref()
        .map(|_| {
            Tensor::cat(
                &captions.iter().map(|c| text[c].pooled.as_ref().expect("sdxl")).collect::<Vec<_>>(),
                0,
            )
        })
        .transpose()?;
    Ok(Conditioning { context: ctx, pooled })
}

/// f16 has few exponent bits: gradients this small (1e-5…1e-7) would flush to zero on the way
/// back through an f16 U-Net, so they travel scaled by 2¹⁰ and are unscaled in f32 before the
/// optimizer (an overflow shows up as a non-finite step, which the guard skips).
pub fn loss_scale(run: &Run) -> f64 {
    match run.sd.unet.as_ref().map(|u| u.conv_in.weight.dtype()) {
        Some(DType::F16) => 1024.0,
        _ => 1.0,
    }
}

/// A fresh random crop of the sample's image (and maybe a flip), through the VAE, and its mask
/// cropped and flipped alike: the price of random crops is one VAE encode per image per step.
fn random_crop_latent(
    run: &Run,
    cfg: &TrainConfig,
    s: &Sample,
    rng: &mut impl Rng,
) -> Result<(Tensor, Option<Tensor>)> {
    use crate::data::prepare::{fit_mask_to_bucket, fit_to_bucket, to_tensor};
    let vae = run.sd.vae.as_ref().expect("kept for random crops");
    let item = &run.items[s.item];
    let img = crate::data::dataset::load_rgb(&item.image)?;
    let offset = (rng.random(), rng.random());
    let (mut crop, _) = fit_to_bucket(&img, s.bucket, offset);
    let mut mask = match cfg.masked_loss {
        true => {
            crate::data::mask::load(&item.image, item.size)?.map(|m| fit_mask_to_bucket(&m, s.bucket, offset))
        }
        false => None,
    };
    if cfg.flip && rng.random::<bool>() {
        crop = image::imageops::flip_horizontal(&crop);
        mask = mask.map(|m| image::imageops::flip_horizontal(&m));
    }
    let z = vae.encode_mean(&to_tensor(&crop, &run.device)?)?;
    let f = crop.width() / z.dim(3)? as u32;
    let mask = mask.map(|m| crate::data::mask::to_latent(&m, f)).transpose()?;
    Ok(((z.to_dtype(DType::F32)? * vae.config.scaling_factor)?.squeeze(0)?, mask))
}
