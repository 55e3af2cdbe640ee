//! DPMSolverMultistepScheduler with algorithm dpmsolver++ and solver order 2 ("DPM++ 2M"), on the
//! spaced training sigmas or on Karras sigmas ("DPM++ 2M Karras").
use super::noise::NoiseSource;
use super::schedule::{self, Prediction, Spacing};
use super::Scheduler;
use crate::model::load::SchedulerConfig;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// `DPMSolverMultistepScheduler.set_timesteps` without Karras sigmas: integer timesteps.
fn dpm_timesteps(spacing: Spacing, steps: usize, train: usize, offset: usize) -> Vec<i64> {
    // lambda_min_clipped = -inf (the default) clips nothing: the schedule ends at `train`
    let last = train;
    match spacing {
        Spacing::Linspace => {
            let v = schedule::np_linspace(0.0, (last - 1) as f64, steps + 1);
            v.iter().rev().take(steps).map(|t| t.round_ties_even() as i64).collect()
        }
        Spacing::Leading => {
            let ratio = last / (steps + 1);
            (1..=steps).rev().map(|i| (i * ratio + offset) as i64).collect()
        }
        Spacing::Trailing => schedule::np_arange_down(last as f64, train as f64 / steps as f64)
            .iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect(),
    }
}

/// (α_t, σ_t) of the VP process at noise level σ, float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α − log σ (half the log-SNR).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

pub struct DpmSolverScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    karras: bool,
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    /// The data predictions x̂_0 of the previous and current step.
    model_outputs: [Option<Tensor>; 2],
    lower_order_nums: usize,
}

impl DpmSolverScheduler {
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        schedule::check_unsupported(
            cfg,
            &[
                "thresholding",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "use_lu_lambdas",
                "use_flow_sigmas",
            ],
        )?;
        if steps == 0 {
            bail!("DPM++ 2M needs at least one step");
        }
        let spacing = schedule::spacing(cfg)?;
        let mut ac = schedule::alphas_cumprod(cfg)?;
        if schedule::extra_bool(cfg, "rescale_betas_zero_snr", false) {
            let last = ac.len() - 1;
            ac[last] = 2f32.powi(-24);
        }
        let train_sigmas = schedule::sigma_table(&ac);
        let log_sigmas: Vec<f32> = train_sigmas.iter().map(|s| s.ln()).collect();
        let (timesteps, mut sigmas): (Vec<f64>, Vec<f64>) = if karras {
            let n = train_sigmas.len();
            let sigmas = schedule::karras_sigmas(train_sigmas[0] as f64, train_sigmas[n - 1] as f64, steps);
            // rounded, except for the cosine schedule, whose timesteps are truncated to int64
            let cosine = cfg.beta_schedule == "squaredcos_cap_v2";
            let to_int = |t: f64| if cosine { t.trunc() } else { t.round_ties_even() };
            let ts = sigmas.iter().map(|&s| to_int(schedule::sigma_to_t(s, &log_sigmas))).collect();
            (ts, sigmas)
        } else {
            let ts = dpm_timesteps(spacing, steps, cfg.num_train_timesteps, cfg.steps_offset);
            let sigmas = ts.iter().map(|&t| schedule::interp(t as f64, &train_sigmas)).collect();
            (ts.into_iter().map(|t| t as f64).collect(), sigmas)
        };
        let final_sigmas_type = schedule::extra_str(cfg, "final_sigmas_type", "zero");
        sigmas.push(match final_sigmas_type.as_str() {
            "zero" => 0.0,
            "sigma_min" => train_sigmas[0] as f64,
            s => bail!("final_sigmas_type `{s}` is not supported (zero, sigma_min)"),
        });
        let heun = match schedule::extra_str(cfg, "solver_type", "midpoint").as_str() {
            "midpoint" => false,
            "heun" => true,
            s => bail!("DPM-Solver solver_type `{s}` is not supported (midpoint, heun)"),
        };
        Ok(Self {
            timesteps,
            sigmas: sigmas.iter().map(|&s| s as f32).collect(),
            prediction: schedule::prediction(cfg)?,
            karras,
            heun,
            lower_order_final: schedule::extra_bool(cfg, "lower_order_final", true),
            euler_at_final: schedule::extra_bool(cfg, "euler_at_final", false),
            final_sigma_zero: final_sigmas_type == "zero",
            model_outputs: [None, None],
            lower_order_nums: 0,
        })
    }

    /// The model output as a data prediction x̂_0 (DPM-Solver++ works on x̂_0).
    fn convert_model_output(&self, model_out: &Tensor, i: usize, x: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(match self.prediction {
            Prediction::Epsilon => schedule::div(&(x - (model_out * sigma_t as f64)?)?, alpha_t)?,
            Prediction::V => ((x * alpha_t as f64)? - (model_out * sigma_t as f64)?)?,
        })
    }

    /// DPM-Solver++ first order (= DDIM in x̂_0 form).
    fn first_order(&self, i: usize, x: &Tensor, m0: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        let a = sigma_t / sigma_s;
        let b = alpha_t * ((-h).exp() - 1.0);
        Ok(((x * a as f64)? - (m0 * b as f64)?)?)
    }

    /// DPM-Solver++(2M): second order from the current and the previous x̂_0.
    fn second_order(&self, i: usize, x: &Tensor, m0: &Tensor, m1: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (lambda_t, lambda_s0, lambda_s1) =
            (lambda(alpha_t, sigma_t), lambda(alpha_s0, sigma_s0), lambda(alpha_s1, sigma_s1));
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = ((m0 - m1)? * (1.0 / r0) as f64)?;
        let a = sigma_t / sigma_s0;
        let b = alpha_t * ((-h).exp() - 1.0);
        let x_t = ((x * a as f64)? - (m0 * b as f64)?)?;
        Ok(if self.heun {
            let c = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
            (x_t + (d1 * c as f64)?)?
        } else {
            (x_t - (d1 * (0.5 * b) as f64)?)?
        })
    }
}

impl Scheduler for DpmSolverScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_out: &Tensor, i: usize, x: &Tensor, _: &mut dyn NoiseSource) -> Result<Tensor> {
        let n = self.timesteps.len();
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let m0 = self.convert_model_output(model_out, i, x)?;
        self.model_outputs[0] = self.model_outputs[1].take();
        self.model_outputs[1] = Some(m0.clone());
        let prev = match &self.model_outputs[0] {
            Some(m1) if self.lower_order_nums >= 1 && !lower_order_final => {
                self.second_order(i, x, &m0, m1)?
            }
            _ => self.first_order(i, x, &m0)?,
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev)
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn a1111_name(&self) -> &'static str {
        if self.karras {
            "DPM++ 2M Karras"
        } else {
            "DPM++ 2M"
        }
    }
}
