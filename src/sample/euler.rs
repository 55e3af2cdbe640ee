//! EulerDiscreteScheduler: Euler steps of the probability-flow ODE in σ (k-diffusion's
//! `sample_euler`), optionally on Karras sigmas.
use super::noise::NoiseSource;
use super::schedule::{self, Prediction, Spacing};
use super::Scheduler;
use crate::model::load::SchedulerConfig;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// `EulerDiscreteScheduler.set_timesteps` (and EulerAncestral's): float32 timesteps, high to low.
pub fn euler_timesteps(spacing: Spacing, steps: usize, train: usize, offset: usize) -> Vec<f32> {
    match spacing {
        Spacing::Linspace => {
            schedule::np_linspace(0.0, (train - 1) as f64, steps).iter().rev().map(|&t| t as f32).collect()
        }
        Spacing::Leading => {
            let ratio = train / steps;
            (0..steps).rev().map(|i| (i * ratio) as f32 + offset as f32).collect()
        }
        Spacing::Trailing => schedule::np_arange_down(train as f64, train as f64 / steps as f64)
            .iter()
            .map(|t| t.round_ties_even() as f32 - 1.0)
            .collect(),
    }
}

/// The float32 training sigmas of a sigma-based scheduler (ᾱ of the last timestep floored at 2⁻²⁴
/// under zero-terminal-SNR rescaling, so that σ_max stays finite).
pub fn training_sigmas(cfg: &SchedulerConfig) -> Result<Vec<f32>> {
    let mut ac = schedule::alphas_cumprod(cfg)?;
    if schedule::extra_bool(cfg, "rescale_betas_zero_snr", false) {
        let last = ac.len() - 1;
        ac[last] = 2f32.powi(-24);
    }
    Ok(schedule::sigma_table(&ac))
}

/// √(σ² + 1) in float32, the input scaling of the σ-parameterised samplers.
pub fn input_scale(sigma: f32) -> f32 {
    (sigma * sigma + 1.0).sqrt()
}

/// The denoised estimate x̂_0 from the model output at noise level σ.
pub fn denoised(pred: Prediction, model_out: &Tensor, x: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(match pred {
        Prediction::Epsilon => (x - (model_out * sigma as f64)?)?,
        Prediction::V => {
            let c_out = -sigma / input_scale(sigma);
            let c_skip = sigma * sigma + 1.0;
            ((model_out * c_out as f64)? + schedule::div(x, c_skip)?)?
        }
    })
}

pub struct EulerScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: Prediction,
    karras: bool,
}

impl EulerScheduler {
    /// `karras` overrides the config's `use_karras_sigmas` when given.
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: Option<bool>) -> Result<Self> {
        schedule::check_unsupported(cfg, &["use_exponential_sigmas", "use_beta_sigmas"])?;
        if steps == 0 {
            bail!("Euler needs at least one step");
        }
        if schedule::extra_str(cfg, "timestep_type", "discrete") != "discrete" {
            bail!("Euler with timestep_type `continuous` is not supported");
        }
        let karras = karras.unwrap_or_else(|| schedule::extra_bool(cfg, "use_karras_sigmas", false));
        let spacing = schedule::spacing(cfg)?;
        let train_sigmas = training_sigmas(cfg)?;
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
        let mut timesteps: Vec<f64> =
            euler_timesteps(spacing, steps, cfg.num_train_timesteps, cfg.steps_offset)
                .into_iter()
                .map(|t| t as f64)
                .collect();
        let mut sigmas: Vec<f64> = match schedule::extra_str(cfg, "interpolation_type", "linear").as_str() {
            "linear" => timesteps.iter().map(|&t| schedule::interp(t, &train_sigmas)).collect(),
            "log_linear" => {
                // from σ_max down to σ_min in log space, steps + 1 values (then the final σ)
                let (start, end) = (train_sigmas[train_sigmas.len() - 1].ln(), train_sigmas[0].ln());
                schedule::linspace_f32(start as f64, end as f64, steps + 1)
                    .iter()
                    .map(|l| l.exp() as f64)
                    .collect()
            }
            s => bail!("Euler interpolation_type `{s}` is not supported (linear, log_linear)"),
        };
        if karras {
            let n = sigmas.len();
            let lo = schedule::extra_f64(cfg, "sigma_min").unwrap_or(sigmas[n - 1]);
            let hi = schedule::extra_f64(cfg, "sigma_max").unwrap_or(sigmas[0]);
            sigmas = schedule::karras_sigmas(lo, hi, steps);
            // fractional timesteps, stored as float32
            timesteps = sigmas.iter().map(|&s| schedule::sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
        }
        let last = match schedule::extra_str(cfg, "final_sigmas_type", "zero").as_str() {
            "zero" => 0.0,
            "sigma_min" => train_sigmas[0] as f64,
            s => bail!("final_sigmas_type `{s}` is not supported (zero, sigma_min)"),
        };
        sigmas.push(last);
        let sigmas: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        let max = schedule::max_f32(&sigmas);
        let init_noise_sigma = if spacing == Spacing::Leading { input_scale(max) } else { max };
        Ok(Self { timesteps, sigmas, init_noise_sigma, prediction: schedule::prediction(cfg)?, karras })
    }
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        schedule::div(x, input_scale(self.sigmas[i]))
    }

    fn step(&mut self, model_out: &Tensor, i: usize, x: &Tensor, _: &mut dyn NoiseSource) -> Result<Tensor> {
        // s_churn = 0: σ̂ = σ, no noise
        let sigma = self.sigmas[i];
        let x0 = denoised(self.prediction, model_out, x, sigma)?;
        let derivative = schedule::div(&(x - x0)?, sigma)?;
        let dt = self.sigmas[i + 1] - sigma;
        Ok((x + (derivative * dt as f64)?)?)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn a1111_name(&self) -> &'static str {
        if self.karras {
            "Euler Karras"
        } else {
            "Euler"
        }
    }
}
