//! EulerAncestralDiscreteScheduler ("Euler a"): an Euler step down to σ_down, then fresh noise
//! of scale σ_up, so that the marginal noise level lands on the next σ.
use super::euler::{denoised, euler_timesteps, input_scale, training_sigmas};
use super::noise::NoiseSource;
use super::schedule::{self, Prediction, Spacing};
use super::Scheduler;
use crate::model::load::SchedulerConfig;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: Prediction,
}

impl EulerAncestralScheduler {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            bail!("Euler a needs at least one step");
        }
        let spacing = schedule::spacing(cfg)?;
        let train_sigmas = training_sigmas(cfg)?;
        let ts = euler_timesteps(spacing, steps, cfg.num_train_timesteps, cfg.steps_offset);
        let mut sigmas: Vec<f32> =
            ts.iter().map(|&t| schedule::interp(t as f64, &train_sigmas) as f32).collect();
        sigmas.push(0.0);
        let max = schedule::max_f32(&sigmas);
        let init_noise_sigma = if spacing == Spacing::Leading { input_scale(max) } else { max };
        Ok(Self {
            timesteps: ts.into_iter().map(|t| t as f64).collect(),
            sigmas,
            init_noise_sigma,
            prediction: schedule::prediction(cfg)?,
        })
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        schedule::div(x, input_scale(self.sigmas[i]))
    }

    fn step(
        &mut self,
        model_out: &Tensor,
        i: usize,
        x: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let (sigma_from, sigma_to) = (self.sigmas[i], self.sigmas[i + 1]);
        let x0 = denoised(self.prediction, model_out, x, sigma_from)?;
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = schedule::div(&(x - x0)?, sigma_from)?;
        let dt = sigma_down - sigma_from;
        let prev = (x + (derivative * dt as f64)?)?;
        // drawn at every step, the last one too (where σ_up = 0), as diffusers does
        let n = noise.randn(model_out.dims(), model_out.device())?;
        Ok((prev + (n * sigma_up as f64)?)?)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn a1111_name(&self) -> &'static str {
        "Euler a"
    }
}
