//! DDIMScheduler (η = 0): deterministic, one model call per step.
use super::noise::NoiseSource;
use super::schedule::{self, Prediction, Spacing};
use super::Scheduler;
use crate::model::load::SchedulerConfig;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    /// num_train_timesteps // steps: how far back each step looks, whatever the spacing.
    step_ratio: i64,
    prediction: Prediction,
    clip_sample: Option<f32>,
}

/// `DDIMScheduler.set_timesteps`: integer timesteps, high to low.
pub fn ddim_timesteps(spacing: Spacing, steps: usize, train: usize, offset: usize) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => schedule::np_linspace(0.0, (train - 1) as f64, steps)
            .iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = train / steps;
            (0..steps).rev().map(|i| (i * ratio + offset) as i64).collect()
        }
        Spacing::Trailing => schedule::np_arange_down(train as f64, train as f64 / steps as f64)
            .iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
    }
}

impl DdimScheduler {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        schedule::check_unsupported(cfg, &["thresholding"])?;
        let train = cfg.num_train_timesteps;
        if steps == 0 || steps > train {
            bail!("DDIM needs between 1 and {train} steps, got {steps}");
        }
        let alphas_cumprod = schedule::alphas_cumprod(cfg)?;
        // DDIMScheduler's own default for set_alpha_to_one is true; model configs state it
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let spacing = schedule::spacing(cfg)?;
        let timesteps =
            ddim_timesteps(spacing, steps, train, cfg.steps_offset).into_iter().map(|t| t as f64).collect();
        let clip_sample = schedule::extra_bool(cfg, "clip_sample", false)
            .then(|| schedule::extra_f64(cfg, "clip_sample_range").unwrap_or(1.0) as f32);
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            step_ratio: (train / steps) as i64,
            prediction: schedule::prediction(cfg)?,
            clip_sample,
        })
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        schedule::alpha_at(&self.alphas_cumprod, self.final_alpha_cumprod, t)
    }
}

impl Scheduler for DdimScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_out: &Tensor, i: usize, x: &Tensor, _: &mut dyn NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[i] as i64;
        let prev_t = t - self.step_ratio;
        let alpha_prod_t = self.alpha_at(t)?;
        let alpha_prod_t_prev = self.alpha_at(prev_t)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sa, sb) = (alpha_prod_t.sqrt() as f64, beta_prod_t.sqrt() as f64);
        // predicted x_0 and ε, formula (12) of the DDIM paper
        let (mut x0, eps) = match self.prediction {
            Prediction::Epsilon => (schedule::div(&(x - (model_out * sb)?)?, sa as f32)?, model_out.clone()),
            Prediction::V => (((x * sa)? - (model_out * sb)?)?, ((model_out * sa)? + (x * sb)?)?),
        };
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r, r)?;
        }
        let dir = (eps * ((1.0 - alpha_prod_t_prev).sqrt() as f64))?;
        Ok(((x0 * (alpha_prod_t_prev.sqrt() as f64))? + dir)?)
    }

    fn a1111_name(&self) -> &'static str {
        "DDIM"
    }
}
