//! The DDPM forward process and training targets, from the model's scheduler config.
use crate::model::load::SchedulerConfig;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// ᾱ_t for t in 0..T, as diffusers' DDPMScheduler computes them (in f64 here; diffusers
/// computes betas in f32 — the difference is below 1e-7).
pub struct NoiseSchedule {
    pub alphas_cumprod: Vec<f64>,
    pub v_prediction: bool,
}

impl NoiseSchedule {
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let n = cfg.num_train_timesteps;
        let betas: Vec<f64> = match cfg.beta_schedule.as_str() {
            "scaled_linear" => {
                let (a, b) = (cfg.beta_start.sqrt(), cfg.beta_end.sqrt());
                (0..n).map(|i| (a + (b - a) * i as f64 / (n - 1) as f64).powi(2)).collect()
            }
            "linear" => (0..n)
                .map(|i| cfg.beta_start + (cfg.beta_end - cfg.beta_start) * i as f64 / (n - 1) as f64)
                .collect(),
            s => bail!("beta_schedule `{s}` is not supported (scaled_linear, linear)"),
        };
        let mut acc = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let v_prediction = match cfg.prediction_type.as_str() {
            "epsilon" => false,
            "v_prediction" => true,
            p => bail!("prediction_type `{p}` is not supported (epsilon, v_prediction)"),
        };
        Ok(Self { alphas_cumprod, v_prediction })
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// Per-sample sqrt(ᾱ_t) and sqrt(1 − ᾱ_t) as [B, 1, 1, 1] tensors.
    fn coefs(&self, t: &[usize], dev: &Device) -> Result<(Tensor, Tensor)> {
        let a: Vec<f32> = t.iter().map(|&i| self.alphas_cumprod[i].sqrt() as f32).collect();
        let s: Vec<f32> = t.iter().map(|&i| (1.0 - self.alphas_cumprod[i]).sqrt() as f32).collect();
        let b = t.len();
        Ok((Tensor::from_vec(a, (b, 1, 1, 1), dev)?, Tensor::from_vec(s, (b, 1, 1, 1), dev)?))
    }

    /// x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let (a, s) = self.coefs(t, x0.device())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// What the network learns to predict: ε, or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        if !self.v_prediction {
            return Ok(noise.clone());
        }
        let (a, s) = self.coefs(t, x0.device())?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// SNR(t) = ᾱ_t / (1 − ᾱ_t)
    pub fn snr(&self, t: usize) -> f64 {
        self.alphas_cumprod[t] / (1.0 - self.alphas_cumprod[t])
    }

    /// min-SNR-γ loss weight (Hang et al. 2023), as diffusers' train_text_to_image_lora:
    /// min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction.
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let snr = self.snr(t);
        if self.v_prediction {
            snr.min(gamma) / (snr + 1.0)
        } else {
            snr.min(gamma) / snr
        }
    }
}
