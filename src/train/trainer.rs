//! The training loop. One step: draw micro-batches and run each forward and backward
//! (`step::micro_step`), the optimizer step, then the hooks: progress, sample grids, checkpoints.
use super::batches::BatchOrder;
use super::config::TrainConfig;
use super::optim::{clip_grad_norm, lr_at};
use super::setup::Run;
use super::step::{loss_scale, micro_step, Mode, TextCache};
use super::{metadata, state};
use crate::lora::format::{unet_layout, write, WriteAs};
use crate::model::layers::Grads;
use crate::report::Report;
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// What a finished run reports.
pub struct Summary {
    pub steps: usize,
    pub losses: Vec<f64>,
    /// Loss on a fixed set of (image, timestep, noise) before and after training (None with
    /// `--eval-samples 0`).
    pub eval_before: Option<f64>,
    pub eval_after: Option<f64>,
    pub seconds: f64,
    pub images_per_second: f64,
    pub lora_path: PathBuf,
    pub lora_bytes: u64,
    pub skipped_steps: usize,
    /// `--val-data`: (step, validation loss), step 0 before training.
    pub val_losses: Vec<(usize, f64)>,
    /// Sample grids ([base | LoRA] rows) by step, when sample prompts were given.
    pub grids: Vec<(usize, image::RgbImage)>,
}

impl Summary {
    /// A report with this run's numbers; settings, grids and scores are the caller's.
    pub fn report(&self, title: impl Into<String>) -> Report {
        let s = self;
        let mut notes = vec![];
        if s.skipped_steps > 0 {
            notes.push(format!(
                "{} of {} steps were skipped (non-finite loss or gradients) and are missing from the plot.",
                s.skipped_steps, s.steps
            ));
        }
        Report {
            title: title.into(),
            notes,
            losses: s.losses.clone(),
            val_losses: s.val_losses.clone(),
            eval_loss: s.eval_before.zip(s.eval_after),
            lora_bytes: s.lora_bytes,
            seconds: s.seconds,
            images_per_second: s.images_per_second,
            grids: s
                .grids
                .iter()
                .map(|(step, g)| {
                    (
                        if *step == 0 {
                            "before training: [base | base]".to_string()
                        } else {
                            format!("step {step}: [base | LoRA]")
                        },
                        g.clone(),
                    )
                })
                .collect(),
            ..Report::default()
        }
    }
}

/// What the training loop reports as it goes.
pub enum Progress {
    /// A finished optimizer step: its number, its loss, images per second so far, and the
    /// U-Net adapters' learning rate as the optimizer applies it (Prodigy's d·lr).
    Step { step: usize, loss: f64, images_per_second: f64, lr: f64 },
    /// `done` of `total` forwards of a fixed-seed evaluation or validation loss.
    Evaluating { done: usize, total: usize },
}

/// Reports `done`/`total` evaluation forwards.
pub type Tick<'a> = &'a mut dyn FnMut(usize, usize);

/// Fixed-seed evaluation loss over (up to) `--eval-samples` training samples (no regularization
/// images), 2 timesteps each; None when that is 0.
pub fn eval_loss(run: &Run, cfg: &TrainConfig, tick: Tick) -> Result<Option<f64>> {
    let picked: Vec<usize> = (0..run.samples.len())
        .filter(|&i| run.items[run.samples[i].item].is_training())
        .take(cfg.eval_samples)
        .collect();
    if picked.is_empty() {
        return Ok(None);
    }
    fixed_loss(run, cfg, &picked, 2, 0x5eed, 1000, tick).map(Some)
}

/// `--val-data`: the mean loss of the held-out images at fixed noise and timesteps (3 each), or
/// None without them.
pub fn val_loss(run: &Run, cfg: &TrainConfig, tick: Tick) -> Result<Option<f64>> {
    let held: Vec<usize> = (0..run.samples.len()).filter(|&i| run.items[run.samples[i].item].val).collect();
    if held.is_empty() {
        return Ok(None);
    }
    fixed_loss(run, cfg, &held, 3, 0x7a1, 5000, tick).map(Some)
}

/// The mean loss of `samples`, `draws` fixed (noise, timestep) draws each from a seed of its own
/// (`salt`) and micro-steps from `k0`, without augmentation.
fn fixed_loss(
    run: &Run,
    cfg: &TrainConfig,
    samples: &[usize],
    draws: u64,
    salt: u64,
    k0: u64,
    tick: Tick,
) -> Result<f64> {
    let cfg2 = TrainConfig {
        flip: false,
        caption_dropout: 0.0,
        shuffle_tags: false,
        seed: cfg.seed ^ salt,
        // every timestep, so runs with --min/--max-timestep compare with those without
        min_timestep: 0,
        max_timestep: None,
        ..cfg.clone()
    };
    let mut total = 0.0;
    let n = samples.len() * draws as usize;
    for (i, &s) in samples.iter().enumerate() {
        for j in 0..draws {
            tick(i * draws as usize + j as usize, n);
            total += loss_of(run, &cfg2, &[s], k0 + draws * i as u64 + j)?;
        }
    }
    tick(n, n);
    Ok(total / (draws * samples.len() as u64) as f64)
}

/// The loss of training samples `samples` as micro-step `k` would draw them (noise, timesteps),
/// gradients discarded.
pub fn loss_of(run: &Run, cfg: &TrainConfig, samples: &[usize], k: u64) -> Result<f64> {
    micro_step(run, cfg, samples, k, &mut TextCache::new(), &mut Grads::default(), Mode::Evaluate)
}

/// The training loss of `samples` at micro-step `k`, preservation rows (`--dop-trigger`)
/// included, gradients computed and discarded.
pub fn train_loss_of(run: &Run, cfg: &TrainConfig, samples: &[usize], k: u64) -> Result<f64> {
    micro_step(run, cfg, samples, k, &mut TextCache::new(), &mut Grads::default(), Mode::Train { scale: 1.0 })
}

/// The training loop: draw batches, forward and backward, optimizer step, then the hooks
/// (progress, sample grids, checkpoints). `on` hears of each step and evaluation forward.
pub fn train(mut run: Run, cfg: &TrainConfig, on: &mut dyn FnMut(Progress)) -> Result<Summary> {
    let mut order = batch_order(&run, cfg);
    let epoch_len = order.epoch_len();
    let cfg = &cfg.with_epochs(epoch_len);
    let start = resume(&mut run, cfg)?;
    let mut tick = |done, total| on(Progress::Evaluating { done, total });
    let (eval_before, val) =
        with_ema(&mut run, |run| Ok((eval_loss(run, cfg, &mut tick)?, val_loss(run, cfg, &mut tick)?)))?;
    let mut val_losses: Vec<(usize, f64)> = val.map(|l| (start, l)).into_iter().collect();
    let mut grids = with_ema(&mut run, |run| SampleGrids::start(run, cfg, start))?;
    let (mut text, mut losses, mut guard) = (TextCache::new(), vec![], Guard::default());
    let (t0, mut images) = (std::time::Instant::now(), 0usize);
    for step in start..cfg.steps {
        if crate::util::stop::requested() {
            return Err(stopped(&mut run, cfg, step, start, val_losses)?.into());
        }
        let mut g = Grads::new(run.adapters.len());
        let mut loss = 0.0;
        for micro in 0..cfg.grad_accum {
            let k = (step * cfg.grad_accum + micro) as u64;
            let (_, idx) = order.get(k as usize);
            images += idx.len();
            let mode = Mode::Train { scale: 1.0 / cfg.grad_accum as f64 };
            loss += micro_step(&run, cfg, &idx, k, &mut text, &mut g, mode)? / cfg.grad_accum as f64;
        }
        let Some(lr) = optimizer_step(&mut run, cfg, &g, loss, step, &mut guard)? else {
            continue;
        };
        losses.push(loss);
        on(Progress::Step {
            step: step + 1,
            loss,
            images_per_second: images as f64 / t0.elapsed().as_secs_f64(),
            lr: run.opt.effective_lr(lr),
        });
        let done = step + 1;
        if cfg.val_every > 0 && done % cfg.val_every == 0 && done < cfg.steps {
            let mut tick = |done, total| on(Progress::Evaluating { done, total });
            let l = with_ema(&mut run, |run| val_loss(run, cfg, &mut tick))?;
            val_losses.extend(l.map(|l| (done, l)));
        }
        if cfg.sample_every > 0 && done % cfg.sample_every == 0 && done < cfg.steps {
            with_ema(&mut run, |run| grids.render(run, cfg, done))?;
        }
        // the step whose micro-batches finish an epoch ends it
        let epochs_done = |s: usize| s * cfg.grad_accum / epoch_len;
        let epoch_ends = cfg.save_every_epochs > 0
            && epochs_done(done) > epochs_done(done - 1)
            && epochs_done(done) % cfg.save_every_epochs == 0;
        let every = cfg.save_every > 0 && done % cfg.save_every == 0;
        if (every || epoch_ends) && done < cfg.steps {
            checkpoint(&mut run, cfg, done)?;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    // saved first, the LoRA before its state: the evaluation and the grids after it may be cut
    // short; from here on the weights are the LoRA's (the average, with --ema-decay)
    swap_ema(&mut run)?;
    save(&run, cfg, &cfg.output, cfg.steps)?;
    with_ema(&mut run, |run| save_state(run, &state::state_path(&cfg.output), cfg.steps))?;
    let mut tick = |done, total| on(Progress::Evaluating { done, total });
    let eval_after = eval_loss(&run, cfg, &mut tick)?;
    val_losses.extend(val_loss(&run, cfg, &mut tick)?.map(|l| (cfg.steps, l)));
    grids.render(&run, cfg, cfg.steps)?;
    Ok(Summary {
        steps: cfg.steps - start,
        losses,
        eval_before,
        eval_after,
        seconds,
        images_per_second: images as f64 / seconds.max(1e-9),
        lora_path: cfg.output.clone(),
        lora_bytes: std::fs::metadata(&cfg.output)?.len(),
        skipped_steps: guard.skipped,
        val_losses,
        grids: grids.done,
    })
}

/// A stop asked for (Ctrl-C, SIGTERM) before `step`: the LoRA and state of the steps done are
/// saved as a step checkpoint, and the error says how to go on.
fn stopped(
    run: &mut Run,
    cfg: &TrainConfig,
    step: usize,
    start: usize,
    val_losses: Vec<(usize, f64)>,
) -> Result<Interrupted> {
    if step == start {
        let state = cfg.resume.as_ref().map(|r| state::resolve(r, &cfg.output)).transpose()?;
        return Ok(Interrupted { step, state, lora: None, val_losses });
    }
    let (p, s) = checkpoint(run, cfg, step)?;
    Ok(Interrupted { step, state: Some(s), lora: Some(p), val_losses })
}

/// The LoRA and training state after `step` steps, as `-stepN` files; returns their paths.
fn checkpoint(run: &mut Run, cfg: &TrainConfig, step: usize) -> Result<(PathBuf, PathBuf)> {
    let p = step_path(&cfg.output, step);
    let s = state::state_path(&p);
    with_ema(run, |run| save(run, cfg, &p, step))?;
    save_state(run, &s, step)?;
    Ok((p, s))
}

fn save_state(run: &Run, path: &Path, step: usize) -> Result<()> {
    state::save(path, &run.adapters, run.embedding.as_ref(), &run.opt, run.ema.as_ref(), step)
}

/// Exchanges the trained weights with their moving average (nothing without --ema-decay).
fn swap_ema(run: &mut Run) -> Result<()> {
    if let Some(e) = &mut run.ema {
        e.swap(&run.params)?;
        if let Some(w) = &run.embedding {
            w.install(&mut run.sd.text_encoders)?;
        }
    }
    Ok(())
}

/// `f` on the weights a LoRA saved now would hold: the moving average with --ema-decay.
fn with_ema<T>(run: &mut Run, f: impl FnOnce(&Run) -> Result<T>) -> Result<T> {
    swap_ema(run)?;
    let out = f(run);
    swap_ema(run)?;
    out
}

/// A run stopped by the user at `step`, with the state to resume from (if any) and the LoRA of
/// that step (if one was written).
#[derive(Debug, thiserror::Error)]
#[error("stopped at step {step}")]
pub struct Interrupted {
    pub step: usize,
    pub state: Option<PathBuf>,
    pub lora: Option<PathBuf>,
    pub val_losses: Vec<(usize, f64)>,
}

/// The order in which the run draws its micro-batches, epoch by epoch.
pub fn batch_order(run: &Run, cfg: &TrainConfig) -> BatchOrder {
    let repeats: Vec<usize> = run.items.iter().map(|i| i.repeats).collect();
    BatchOrder::new(&run.samples, &repeats, cfg.batch_size, cfg.seed)
}

/// `--resume`: the adapters, embedding and optimizer state as saved; the step to go on from.
fn resume(run: &mut Run, cfg: &TrainConfig) -> Result<usize> {
    let Some(p) = &cfg.resume else { return Ok(0) };
    let p = &state::resolve(p, &cfg.output)?;
    let start = state::load(p, &run.adapters, run.embedding.as_ref(), &mut run.opt, run.ema.as_mut())?;
    eprintln!("resuming from {} (step {start})", p.display());
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
    Ok(start)
}

/// Steps skipped for a non-finite loss or gradient; five in a row end the run.
#[derive(Default)]
struct Guard {
    skipped: usize,
    in_a_row: usize,
}

/// Unscales and clips the gradients, then the optimizer on the adapters (and the trained embedding, which
/// is installed into the text encoders' table again). The step's learning rate; None: the step
/// was skipped.
fn optimizer_step(
    run: &mut Run,
    cfg: &TrainConfig,
    g: &Grads,
    loss: f64,
    step: usize,
    guard: &mut Guard,
) -> Result<Option<f64>> {
    let mut grads = vec![];
    for (_, a) in &run.adapters {
        grads.extend(a.grads(g)?);
    }
    for v in run.embedding.iter().flat_map(|e| &e.vectors) {
        grads.push(match g.weights.get(&v.as_tensor().id()) {
            Some(d) => d.clone(),
            None => v.zeros_like()?,
        });
    }
    let ls = loss_scale(run);
    if ls != 1.0 {
        grads = grads.iter().map(|g| g / ls).collect::<candle_core::Result<_>>()?;
    }
    let norm = clip_grad_norm(&mut grads, cfg.max_grad_norm)?;
    if !loss.is_finite() || !norm.is_finite() {
        guard.skipped += 1;
        guard.in_a_row += 1;
        eprintln!("warning: step {}: non-finite loss or gradient — step skipped", step + 1);
        if guard.in_a_row >= 5 {
            if let Some(w) = run.sd.non_finite_weight() {
                bail!("training diverged: {w} holds NaN or infinite values — the model file is broken, download it again");
            }
            bail!(
                "training diverged: non-finite loss for 5 steps in a row at step {} — lower --lr, or use --dtype bf16/f32 instead of f16",
                step + 1
            );
        }
        return Ok(None);
    }
    guard.in_a_row = 0;
    let lr = lr_at(cfg.lr_scheduler, cfg.lr, step, cfg.steps, cfg.warmup_steps);
    let lrs: Vec<f64> = run.lr_scale.iter().map(|s| s * lr).collect();
    run.opt.step(&run.params, &grads, &lrs)?;
    if let Some(e) = &mut run.ema {
        e.update(&run.params)?;
    }
    if let Some(e) = &run.embedding {
        e.install(&mut run.sd.text_encoders)?;
    }
    Ok(Some(lr))
}

/// `--sample-prompts`: [base | LoRA] grids with the same seeds, written as PNGs and kept for
/// the report. The base's images are drawn once, before training.
struct SampleGrids {
    prompts: Option<Vec<String>>,
    base: Vec<image::RgbImage>,
    done: Vec<(usize, image::RgbImage)>,
}

impl SampleGrids {
    fn start(run: &Run, cfg: &TrainConfig, step: usize) -> Result<Self> {
        let prompts = cfg.sample_prompts.as_deref().map(super::samples::read_prompts).transpose()?;
        let base = match &prompts {
            Some(p) => super::samples::render(run, cfg, p)?,
            None => vec![],
        };
        let mut grids = SampleGrids { prompts, base, done: vec![] };
        if grids.prompts.is_some() {
            grids.write(cfg, step, super::samples::grid(&grids.base, &grids.base))?;
        }
        Ok(grids)
    }

    fn render(&mut self, run: &Run, cfg: &TrainConfig, step: usize) -> Result<()> {
        let Some(p) = &self.prompts else { return Ok(()) };
        let g = super::samples::grid(&self.base, &super::samples::render(run, cfg, p)?);
        self.write(cfg, step, g)
    }

    fn write(&mut self, cfg: &TrainConfig, step: usize, g: image::RgbImage) -> Result<()> {
        crate::util::write_atomic(&super::samples::grid_path(&cfg.output, step), &png(&g)?)?;
        self.done.push((step, g));
        Ok(())
    }
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
    let tags = metadata::tag_frequency(run.items.iter().filter(|i| !i.reg && !i.val));
    let v = run.sd.scheduler.prediction_type == "v_prediction";
    let n_reg = run.items.iter().filter(|i| i.reg).count();
    let n_val = run.items.iter().filter(|i| i.val).count();
    let counts = (run.items.len() - n_reg - n_val, n_reg);
    let epoch_len = batch_order(run, cfg).epoch_len();
    let meta = metadata::kohya_metadata(
        cfg,
        run.sd.family,
        v,
        run.resolution,
        counts,
        &tags,
        (steps_done, epoch_len),
    );
    let dtype = cfg.save_dtype.dtype();
    let extra = run.embedding.as_ref().map(|e| e.tensors(dtype)).transpose()?.unwrap_or_default();
    let layout = unet_layout(&run.sd);
    write(
        path,
        &run.adapters,
        extra,
        WriteAs { family: run.sd.family, layout: &layout, format: cfg.format, dtype },
        meta,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_summary_carries_the_run_numbers() {
        let s = Summary {
            steps: 3,
            losses: vec![0.3, f64::NAN, 0.1],
            eval_before: Some(0.2),
            eval_after: Some(0.1),
            seconds: 1.5,
            images_per_second: 2.0,
            lora_path: "x.safetensors".into(),
            lora_bytes: 1000,
            skipped_steps: 1,
            val_losses: vec![(0, 0.25), (3, 0.15)],
            grids: vec![],
        };
        let r = s.report("run");
        assert_eq!((r.losses.len(), r.lora_bytes, r.eval_loss), (3, 1000, Some((0.2, 0.1))));
        assert!(r.notes[0].contains("1 of 3 steps were skipped"));
        let html = r.html().unwrap();
        assert!(!html.contains("<h2>Scores</h2>") && !html.contains("<h2>Samples</h2>"));
    }
}
