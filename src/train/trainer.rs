//! The training loop. One step: draw a batch, noise its latents at random timesteps, predict
//! the noise, backward through the frozen U-Net into the adapters, AdamW.
use super::batches::{augment_caption, dop_caption, randn, rng_for, BatchOrder};
use super::config::{parse_dtype, TrainConfig};
use super::optim::{clip_grad_norm, lr_at};
use super::setup::Run;
use super::{metadata, state};
use crate::lora::format::{unet_layout, write, LoraFormat, WriteAs};
use crate::lora::AdapterGrads;
use crate::model::text::Conditioning;
use crate::model::unet::UNetInput;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rand::Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What a finished run reports.
pub struct Summary {
    pub steps: usize,
    pub losses: Vec<f64>,
    /// Loss on a fixed set of (image, timestep, noise) before and after training.
    pub eval_before: f64,
    pub eval_after: f64,
    pub seconds: f64,
    pub images_per_second: f64,
    pub lora_path: PathBuf,
    pub lora_bytes: u64,
    pub skipped_steps: usize,
    /// Sample grids ([base | LoRA] rows) by step, when sample prompts were given.
    pub grids: Vec<(usize, image::RgbImage)>,
}

/// One micro-batch's loss and the gradients it adds to `g`.
fn micro_step(
    run: &Run,
    cfg: &TrainConfig,
    idx: &[usize],
    k: u64,
    text: &mut HashMap<String, Conditioning>,
    g: &mut AdapterGrads,
    scale: f64,
) -> Result<f64> {
    let sched = &run.sched;
    let mut rng = rng_for(cfg.seed, "micro", k);
    // LoRA dropout masks for this micro-step (none while evaluating)
    let dseed = if scale == 0.0 { u64::MAX } else { rng_for(cfg.seed, "dropout", k).random::<u64>() >> 1 };
    run.switch.set_dropout_seed(dseed);
    let dev = &run.device;
    let samples: Vec<&crate::data::prepare::Sample> = idx.iter().map(|&i| &run.samples[i]).collect();
    let latents: Vec<Tensor> = if cfg.random_crop {
        samples.iter().map(|s| random_crop_latent(run, s, cfg.flip, &mut rng)).collect::<Result<_>>()?
    } else {
        samples
            .iter()
            .map(|s| match (&s.latent_flipped, cfg.flip && rng.random::<bool>()) {
                (Some(f), true) => f.clone(),
                _ => s.latent.clone(),
            })
            .collect()
    };
    let x0 = Tensor::stack(&latents, 0)?.to_device(dev)?;
    let preserve =
        |s: &&crate::data::prepare::Sample| cfg.prior_preservation == "output" && run.items[s.item].reg;
    let mut captions: Vec<String> = samples
        .iter()
        .map(|s| {
            // guidance weighs the unconditional prediction (cfg − 1)×: output preservation keeps
            // it too, on every other draw of a reg image
            if preserve(s) && rng.random::<bool>() {
                return String::new();
            }
            augment_caption(&s.caption, &mut rng, cfg.caption_dropout, cfg.shuffle_tags, cfg.keep_tokens)
        })
        .collect();
    let mut noise = randn(&mut rng, x0.dims(), dev)?;
    if cfg.noise_offset > 0.0 {
        let (b, c) = (x0.dim(0)?, x0.dim(1)?);
        noise = noise.broadcast_add(&(randn(&mut rng, &[b, c, 1, 1], dev)? * cfg.noise_offset)?)?;
    }
    let range = cfg.timesteps(sched.len())?;
    let t: Vec<usize> = (0..idx.len()).map(|_| rng.random_range(range.clone())).collect();
    let xt = sched.add_noise(&x0, &noise, &t)?;
    let ids: Vec<f32> = samples
        .iter()
        .flat_map(|s| {
            [s.original_hw.0, s.original_hw.1, s.crop_tl.0, s.crop_tl.1, s.bucket.1, s.bucket.0]
                .map(|v| v as f32)
        })
        .collect();
    let time_ids = Tensor::from_vec(ids, (idx.len(), 6), dev)?;
    let timestep = Tensor::from_vec(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), t.len(), dev)?;
    let target = sched.target(&x0, &noise, &t)?;
    // differential output preservation: training rows once more, the trigger taken out of their
    // captions, the base's prediction their target (rows n.. of the batch; not while evaluating)
    let n = idx.len();
    let dop: Vec<(usize, String)> = match &cfg.dop_trigger {
        Some(w) if scale != 0.0 => (0..n)
            .filter(|&i| !run.items[samples[i].item].reg)
            .filter_map(|i| dop_caption(&captions[i], w, &cfg.dop_class, &mut rng).map(|c| (i, c)))
            .collect(),
        _ => vec![],
    };
    // the drawn sample behind each row
    let of: Vec<usize> = (0..n).chain(dop.iter().map(|d| d.0)).collect();
    let (xt, timestep, time_ids, mut target) = if dop.is_empty() {
        (xt, timestep, time_ids, target)
    } else {
        let ix = Tensor::from_vec(of.iter().map(|&i| i as u32).collect::<Vec<_>>(), of.len(), dev)?;
        let pick = |x: &Tensor| x.index_select(&ix, 0);
        (pick(&xt)?, pick(&timestep)?, pick(&time_ids)?, pick(&target)?)
    };
    captions.extend(dop.into_iter().map(|d| d.1));
    let preserved: Vec<usize> = (0..of.len()).filter(|&r| r >= n || preserve(&samples[r])).collect();
    if !preserved.is_empty() {
        let rows = BaseRows { rows: &preserved, xt: &xt, timestep: &timestep, time_ids: &time_ids };
        target = rows.predict_into(run, &captions, text, &target)?;
    }

    let encoders = &run.sd.text_encoders;
    let (cond, te_saved) = if run.train_text {
        let (c, s, ids) = run.prompts.encode_train(encoders, &captions)?;
        (c, Some((s, ids)))
    } else {
        (base_conditioning(run, &captions, text)?, None)
    };
    let unet = run.sd.unet.as_ref().expect("loaded");
    let (pred, saved) = unet.forward_train(&unet_input(&xt, &timestep, &cond, &time_ids))?;
    // per-sample MSE, min-SNR weighted, averaged over the batch
    let diff = (pred.to_dtype(DType::F32)? - &target)?;
    let n_el = diff.elem_count() / of.len();
    // min-SNR-γ, times --prior-loss-weight for regularization images (kohya's loss_weights) and
    // --dop-weight for preservation rows; the sum over rows is divided by the drawn samples
    let w: Vec<f32> = of
        .iter()
        .enumerate()
        .map(|(r, &i)| {
            let snr = cfg.min_snr_gamma.map(|gm| sched.min_snr_weight(t[i], gm)).unwrap_or(1.0);
            let prior = match (r >= n, run.items[samples[i].item].reg) {
                (true, _) => cfg.dop_weight,
                (false, true) => cfg.prior_loss_weight,
                (false, false) => 1.0,
            };
            (snr * prior) as f32
        })
        .collect();
    let w = Tensor::from_vec(w, (of.len(), 1, 1, 1), dev)?;
    let per = diff.sqr()?.mean((1, 2, 3))?;
    let loss = (per * w.flatten_all()?)?.sum_all()?.to_scalar::<f32>()? as f64 / n as f64;
    if scale == 0.0 {
        return Ok(loss); // evaluation: no backward
    }
    let dpred = (diff.broadcast_mul(&w)? * (2.0 * scale * loss_scale(run) / (n_el * n) as f64))?;
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

/// The base model's conditioning of `captions` (the text encoder's adapters switched off),
/// cached in memory and on disk: it never changes during a run.
fn base_conditioning(
    run: &Run,
    captions: &[String],
    text: &mut HashMap<String, Conditioning>,
) -> Result<Conditioning> {
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

fn unet_input<'a>(
    xt: &'a Tensor,
    timestep: &'a Tensor,
    cond: &'a Conditioning,
    time_ids: &'a Tensor,
) -> UNetInput<'a> {
    UNetInput {
        sample: xt,
        timestep,
        encoder_hidden_states: &cond.context,
        text_embeds: cond.pooled.as_ref(),
        time_ids: Some(time_ids),
    }
}

/// Rows of a batch whose target is the base model's own prediction (`--prior-preservation
/// output`), with the U-Net inputs they share with the LoRA's forward.
struct BaseRows<'a> {
    rows: &'a [usize],
    xt: &'a Tensor,
    timestep: &'a Tensor,
    time_ids: &'a Tensor,
}

impl BaseRows<'_> {
    /// `target` with its `rows` replaced by the base's prediction for the same noisy latent,
    /// timestep and caption: one forward pass with every adapter switched off, no gradients.
    fn predict_into(
        &self,
        run: &Run,
        captions: &[String],
        text: &mut HashMap<String, Conditioning>,
        target: &Tensor,
    ) -> Result<Tensor> {
        let ix = Tensor::from_vec(
            self.rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            self.rows.len(),
            &run.device,
        )?;
        let caps: Vec<String> = self.rows.iter().map(|&r| captions[r].clone()).collect();
        let cond = base_conditioning(run, &caps, text)?;
        let (xt, timestep, time_ids) = (
            self.xt.index_select(&ix, 0)?,
            self.timestep.index_select(&ix, 0)?,
            self.time_ids.index_select(&ix, 0)?,
        );
        let unet = run.sd.unet.as_ref().expect("loaded");
        let base = run.switch.off_while(|| unet.forward(&unet_input(&xt, &timestep, &cond, &time_ids)))?;
        let base = base.to_dtype(DType::F32)?;
        let rows = (0..target.dim(0)?)
            .map(|i| match self.rows.iter().position(|&r| r == i) {
                Some(j) => base.get(j),
                None => target.get(i),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// f16 has few exponent bits: gradients this small (1e-5…1e-7) would flush to zero on the way
/// back through an f16 U-Net, so they travel scaled by 2¹⁰ and are unscaled in f32 before the
/// optimizer (an overflow shows up as a non-finite step, which the guard skips).
fn loss_scale(run: &Run) -> f64 {
    match run.sd.unet.as_ref().map(|u| u.conv_in.weight.dtype()) {
        Some(DType::F16) => 1024.0,
        _ => 1.0,
    }
}

/// A fresh random crop of the sample's image (and maybe a flip), through the VAE: the price of
/// random crops is one VAE encode per image per step.
fn random_crop_latent(
    run: &Run,
    s: &crate::data::prepare::Sample,
    flip: bool,
    rng: &mut impl Rng,
) -> Result<Tensor> {
    use crate::data::prepare::{fit_to_bucket, to_tensor};
    let vae = run.sd.vae.as_ref().expect("kept for random crops");
    let img = crate::data::dataset::load_rgb(&run.items[s.item].image)?;
    let (mut crop, _) = fit_to_bucket(&img, s.bucket, (rng.random(), rng.random()));
    if flip && rng.random::<bool>() {
        crop = image::imageops::flip_horizontal(&crop);
    }
    let z = vae.encode_mean(&to_tensor(&crop, &run.device)?)?;
    Ok((z.to_dtype(DType::F32)? * vae.config.scaling_factor)?.squeeze(0)?)
}

/// Fixed-seed evaluation loss over (up to) 4 training samples (no regularization images), 2
/// timesteps each.
pub fn eval_loss(run: &Run, cfg: &TrainConfig) -> Result<f64> {
    let picked: Vec<usize> =
        (0..run.samples.len()).filter(|&i| !run.items[run.samples[i].item].reg).take(4).collect();
    let n = picked.len();
    let mut total = 0.0;
    for (i, &s) in picked.iter().enumerate() {
        for j in 0..2u64 {
            let cfg2 = TrainConfig {
                flip: false,
                caption_dropout: 0.0,
                shuffle_tags: false,
                seed: cfg.seed ^ 0x5eed,
                // every timestep, so runs with --min/--max-timestep compare with those without
                min_timestep: 0,
                max_timestep: None,
                ..cfg.clone()
            };
            total += loss_of(run, &cfg2, &[s], 1000 + 2 * i as u64 + j)?;
        }
    }
    Ok(total / (2 * n) as f64)
}

/// The loss of training samples `samples` as micro-step `k` would draw them (noise, timesteps),
/// gradients discarded.
pub fn loss_of(run: &Run, cfg: &TrainConfig, samples: &[usize], k: u64) -> Result<f64> {
    micro_step(run, cfg, samples, k, &mut HashMap::new(), &mut AdapterGrads::default(), 0.0)
}

/// The training loss of `samples` at micro-step `k`, preservation rows (`--dop-trigger`)
/// included, gradients computed and discarded.
pub fn train_loss_of(run: &Run, cfg: &TrainConfig, samples: &[usize], k: u64) -> Result<f64> {
    micro_step(run, cfg, samples, k, &mut HashMap::new(), &mut AdapterGrads::default(), 1.0)
}

pub fn train(mut run: Run, cfg: &TrainConfig, on_step: &mut dyn FnMut(usize, f64, f64)) -> Result<Summary> {
    let mut start = 0;
    if let Some(p) = &cfg.resume {
        start = state::load(p, &run.adapters, run.embedding.as_ref(), &mut run.opt)?;
        if let Some(e) = &run.embedding {
            e.install(&mut run.sd.text_encoders)?;
        }
        if start >= cfg.steps {
            bail!(
                "{}: already at step {start} of --steps {} — raise --steps to train further",
                p.display(),
                cfg.steps
            );
        }
    }
    let eval_before = eval_loss(&run, cfg)?;
    let prompts = cfg.sample_prompts.as_deref().map(super::samples::read_prompts).transpose()?;
    let mut grids = vec![];
    let mut base_images = vec![];
    if let Some(p) = &prompts {
        base_images = super::samples::render(&run, cfg, p)?;
        let g = super::samples::grid(&base_images, &base_images);
        crate::util::write_atomic(&super::samples::grid_path(&cfg.output, start), &png(&g)?)?;
        grids.push((start, g));
    }
    let repeats: Vec<usize> = run.items.iter().map(|i| i.repeats).collect();
    let mut order = BatchOrder::new(&run.samples, &repeats, cfg.batch_size, cfg.seed);
    let mut text = HashMap::new();
    let mut losses = vec![];
    let (mut skipped, mut bad_in_a_row) = (0, 0);
    let t0 = std::time::Instant::now();
    let mut images = 0usize;
    for step in start..cfg.steps {
        let mut g = AdapterGrads::new(run.adapters.len());
        let mut loss = 0.0;
        for micro in 0..cfg.grad_accum {
            let k = (step * cfg.grad_accum + micro) as u64;
            let (_, idx) = order.get(k as usize);
            images += idx.len();
            loss += micro_step(&run, cfg, &idx, k, &mut text, &mut g, 1.0 / cfg.grad_accum as f64)?
                / cfg.grad_accum as f64;
        }
        let mut grads = vec![];
        for (_, a) in &run.adapters {
            match g.get(a.id) {
                Some((d, u)) => grads.extend([d.clone(), u.clone()]),
                None => grads.extend([a.down.zeros_like()?, a.up.zeros_like()?]),
            }
        }
        for v in run.embedding.iter().flat_map(|e| &e.vectors) {
            grads.push(match g.weights.get(&v.as_tensor().id()) {
                Some(d) => d.clone(),
                None => v.zeros_like()?,
            });
        }
        let ls = loss_scale(&run);
        if ls != 1.0 {
            grads = grads.iter().map(|g| g / ls).collect::<candle_core::Result<_>>()?;
        }
        let norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
        if !loss.is_finite() || !norm.is_finite() {
            skipped += 1;
            bad_in_a_row += 1;
            eprintln!("warning: step {}: non-finite loss or gradient — step skipped", step + 1);
            if bad_in_a_row >= 5 {
                bail!(
                    "training diverged: non-finite loss for 5 steps in a row at step {} — lower --lr, or use --dtype bf16/f32 instead of f16",
                    step + 1
                );
            }
            continue;
        }
        bad_in_a_row = 0;
        let lr = lr_at(cfg.lr_scheduler, cfg.lr, step, cfg.steps, cfg.warmup_steps);
        let lrs: Vec<f64> = run.lr_scale.iter().map(|s| s * lr).collect();
        run.opt.step(&run.params, &grads, &lrs)?;
        if let Some(e) = &run.embedding {
            e.install(&mut run.sd.text_encoders)?;
        }
        losses.push(loss);
        on_step(step + 1, loss, images as f64 / t0.elapsed().as_secs_f64());
        let done = step + 1;
        if let (Some(p), true) =
            (&prompts, cfg.sample_every > 0 && done % cfg.sample_every == 0 && done < cfg.steps)
        {
            let g = super::samples::grid(&base_images, &super::samples::render(&run, cfg, p)?);
            crate::util::write_atomic(&super::samples::grid_path(&cfg.output, done), &png(&g)?)?;
            grids.push((done, g));
        }
        if cfg.save_every > 0 && done % cfg.save_every == 0 && done < cfg.steps {
            let p = step_path(&cfg.output, done);
            save(&run, cfg, &p, done)?;
            state::save(&state::state_path(&p), &run.adapters, run.embedding.as_ref(), &run.opt, done)?;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let eval_after = eval_loss(&run, cfg)?;
    if let Some(p) = &prompts {
        let g = super::samples::grid(&base_images, &super::samples::render(&run, cfg, p)?);
        crate::util::write_atomic(&super::samples::grid_path(&cfg.output, cfg.steps), &png(&g)?)?;
        grids.push((cfg.steps, g));
    }
    save(&run, cfg, &cfg.output, cfg.steps)?;
    state::save(&state::state_path(&cfg.output), &run.adapters, run.embedding.as_ref(), &run.opt, cfg.steps)?;
    let lora_bytes = std::fs::metadata(&cfg.output)?.len();
    Ok(Summary {
        steps: cfg.steps - start,
        losses,
        eval_before,
        eval_after,
        seconds,
        images_per_second: images as f64 / seconds.max(1e-9),
        lora_path: cfg.output.clone(),
        lora_bytes,
        skipped_steps: skipped,
        grids,
    })
}

fn png(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut buf = std::io::Cursor::new(vec![]);
    img.write_to(&mut buf, image::ImageFormat::Png)?;
    Ok(buf.into_inner())
}

/// `out.safetensors` → `out-step000200.safetensors`
pub fn step_path(out: &Path, step: usize) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "lora".into());
    out.with_file_name(format!("{stem}-step{step:06}.safetensors"))
}

fn save(run: &Run, cfg: &TrainConfig, path: &Path, steps_done: usize) -> Result<()> {
    let format: LoraFormat = cfg.format.parse().map_err(anyhow::Error::msg)?;
    let tags = metadata::tag_frequency(run.items.iter().filter(|i| !i.reg));
    let v = run.sd.scheduler.prediction_type == "v_prediction";
    let n_reg = run.items.iter().filter(|i| i.reg).count();
    let counts = (run.items.len() - n_reg, n_reg);
    let meta = metadata::kohya_metadata(cfg, run.sd.family, v, run.resolution, counts, &tags, steps_done);
    let dtype = parse_dtype(&cfg.save_dtype)?;
    let extra = run.embedding.as_ref().map(|e| e.tensors(dtype)).transpose()?.unwrap_or_default();
    let layout = unet_layout(&run.sd);
    write(path, &run.adapters, extra, WriteAs { family: run.sd.family, layout: &layout, format, dtype }, meta)
}
