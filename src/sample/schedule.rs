//! What every sampler derives from the model's scheduler config, computed as diffusers computes
//! it: the float32 noise tables of torch, numpy's float64 linspace/arange/interp with
//! round-half-to-even, Karras sigmas and the sigma → timestep inversion.
use crate::model::load::SchedulerConfig;
use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    V,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// A setting of scheduler_config.json that `SchedulerConfig` has no field for.
pub fn extra_bool(cfg: &SchedulerConfig, key: &str, default: bool) -> bool {
    cfg.extra.get(key).and_then(|v| v.as_bool()).unwrap_or(default)
}

pub fn extra_str(cfg: &SchedulerConfig, key: &str, default: &str) -> String {
    cfg.extra.get(key).and_then(|v| v.as_str()).unwrap_or(default).to_string()
}

pub fn extra_f64(cfg: &SchedulerConfig, key: &str) -> Option<f64> {
    cfg.extra.get(key).and_then(|v| v.as_f64())
}

pub fn prediction(cfg: &SchedulerConfig) -> Result<Prediction> {
    match cfg.prediction_type.as_str() {
        "epsilon" => Ok(Prediction::Epsilon),
        "v_prediction" => Ok(Prediction::V),
        p => bail!("prediction_type `{p}` is not supported for sampling (epsilon, v_prediction)"),
    }
}

pub fn spacing(cfg: &SchedulerConfig) -> Result<Spacing> {
    match cfg.timestep_spacing.as_str() {
        "leading" => Ok(Spacing::Leading),
        "trailing" => Ok(Spacing::Trailing),
        "linspace" => Ok(Spacing::Linspace),
        s => bail!("timestep_spacing `{s}` is not supported (leading, trailing, linspace)"),
    }
}

/// Refuses settings that change the math and that these samplers do not implement.
pub fn check_unsupported(cfg: &SchedulerConfig, keys: &[&str]) -> Result<()> {
    for k in keys {
        if extra_bool(cfg, k, false) {
            bail!("scheduler setting `{k}: true` is not supported by sdlora's samplers");
        }
    }
    Ok(())
}

/// `torch.linspace(start, end, n, dtype=float32)` (the scalar formula: from the start for the
/// first half, from the end for the second).
/// ᾱ_t, with t < 0 meaning the step past the last (DDIM/PNDM's `final_alpha_cumprod`).
pub fn alpha_at(alphas_cumprod: &[f32], final_alpha_cumprod: f32, t: i64) -> Result<f32> {
    if t < 0 {
        return Ok(final_alpha_cumprod);
    }
    match alphas_cumprod.get(t as usize) {
        Some(&a) => Ok(a),
        None => bail!("timestep {t} is outside the training schedule"),
    }
}

pub fn linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n == 1 {
        return vec![s];
    }
    let step = (e - s) / (n - 1) as f32;
    (0..n).map(|i| if i < n / 2 { s + step * i as f32 } else { e - step * (n - 1 - i) as f32 }).collect()
}

/// `numpy.linspace(start, stop, n)` (float64).
pub fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    let step = (stop - start) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
    v[n - 1] = stop;
    v
}

/// `numpy.arange(start, 0, -step)` for float64 `step` > 0.
pub fn np_arange_down(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / -step).ceil().max(0.0) as usize;
    // numpy fills with the difference of its first two values, not with `step` itself
    let delta = (start + -step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// The training schedule ᾱ_t as diffusers' schedulers hold it (float32, cumprod accumulated in
/// float64 as torch does on the CPU). Zero-terminal-SNR rescaling included; the 2⁻²⁴ floor that
/// the sigma-based schedulers put on the last value is theirs to apply.
pub fn alphas_cumprod(cfg: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = cfg.num_train_timesteps;
    if n < 2 {
        bail!("num_train_timesteps {n} is too small");
    }
    let trained = cfg.extra.get("trained_betas").and_then(|v| v.as_array());
    let mut betas: Vec<f32> = if let Some(t) = trained {
        t.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect()
    } else {
        match cfg.beta_schedule.as_str() {
            "linear" => linspace_f32(cfg.beta_start, cfg.beta_end, n),
            "scaled_linear" => {
                linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n).iter().map(|b| b * b).collect()
            }
            "squaredcos_cap_v2" => {
                let ab = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - ab(t2) / ab(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            s => bail!("beta_schedule `{s}` is not supported (scaled_linear, linear, squaredcos_cap_v2)"),
        }
    };
    if extra_bool(cfg, "rescale_betas_zero_snr", false) {
        betas = rescale_zero_terminal_snr(&betas);
    }
    Ok(cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>()))
}

fn cumprod(x: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    x.iter()
        .map(|&a| {
            acc *= a as f64;
            acc as f32
        })
        .collect()
}

/// Zero terminal SNR (Lin et al. 2023, algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = cumprod(&betas.iter().map(|b| 1.0 - b).collect::<Vec<f32>>());
    let mut s: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    let k = s0 / (s0 - st);
    for v in &mut s {
        *v = (*v - st) * k;
    }
    let ab: Vec<f32> = s.iter().map(|v| v * v).collect();
    let mut alphas = vec![ab[0]];
    alphas.extend(ab.windows(2).map(|w| w[1] / w[0]));
    alphas.iter().map(|a| 1.0 - a).collect()
}

/// σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), float32.
pub fn sigma_table(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// `numpy.interp(x, arange(len(fp)), fp)`.
pub fn interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// diffusers' `_sigma_to_t`: the (fractional) timestep of `sigma` by linear interpolation in
/// log σ over the training table, with numpy's mixed float32/float64 arithmetic.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // the last index whose log σ is <= log_sigma (0 if none), at most n - 2
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l as f64 >= 0.0).count();
    let low_idx = count.saturating_sub(1).min(n - 2);
    let (low, high) = (log_sigmas[low_idx], log_sigmas[low_idx + 1]);
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * (low_idx + 1) as f64
}

/// Karras et al. (2022) noise levels: ρ = 7 interpolation between σ_max and σ_min.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n).iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// x / s elementwise with an IEEE division, as torch divides by a 0-d tensor (candle's `x / f64`
/// multiplies by the reciprocal, which rounds differently).
pub fn div(x: &Tensor, s: f32) -> Result<Tensor> {
    Ok(x.broadcast_div(&Tensor::new(s, x.device())?.to_dtype(x.dtype())?)?)
}

/// The largest value, for `init_noise_sigma`.
pub fn max_f32(v: &[f32]) -> f32 {
    v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_arange_down(1000.0, 250.0), vec![1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(np_arange_down(1000.0, 1000.0 / 3.0).len(), 3);
        assert_eq!(interp(1.5, &[1.0, 2.0, 4.0]), 3.0);
        let ls: Vec<f32> = [0.1f32, 0.5, 1.0, 2.0].iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(0.5, &ls) - 1.0).abs() < 1e-6);
        assert!((sigma_to_t(0.5f64.sqrt(), &ls) - 1.5).abs() < 1e-6);
        assert_eq!(sigma_to_t(10.0, &ls), 3.0);
        assert_eq!(sigma_to_t(0.01, &ls), 0.0);
    }
}
