//! AdamW with f32 moments over the adapter parameters, and learning-rate schedules.
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: usize,
    /// (m, v) per parameter, in parameter order: views into `flat` once a step has run.
    moments: Vec<(Tensor, Tensor)>,
    /// All moments as two flat vectors, so that a step is a dozen whole-vector ops rather than a
    /// dozen per parameter (hundreds of parameters: the op count, not the arithmetic, is what a
    /// GPU's launches and the CPU's thread hand-offs pay for).
    flat: Option<(Tensor, Tensor)>,
    /// Per-element learning-rate ratios when the parameters' rates differ, for `lrs`' pattern.
    ratios: Option<(Vec<f64>, Tensor)>,
}

impl AdamW {
    pub fn new(params: &[Var], weight_decay: f64) -> Result<Self> {
        let moments = params.iter().map(|p| Ok((p.zeros_like()?, p.zeros_like()?))).collect::<Result<_>>()?;
        Ok(Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            moments,
            flat: None,
            ratios: None,
        })
    }

    pub fn moments(&self) -> &[(Tensor, Tensor)] {
        &self.moments
    }

    /// Replaces the moments (resume); they must match the parameters' shapes.
    pub fn set_moments(&mut self, moments: Vec<(Tensor, Tensor)>) {
        self.moments = moments;
        self.flat = None;
    }

    /// One update, parameter k at learning rate `lrs[k]` (decoupled weight decay,
    /// bias-corrected moments — torch.optim.AdamW's arithmetic).
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lrs: &[f64]) -> Result<()> {
        if params.len() != self.moments.len() || grads.len() != params.len() || lrs.len() != params.len() {
            bail!("optimizer state has {} parameters, the model {}", self.moments.len(), params.len());
        }
        if params.is_empty() {
            return Ok(());
        }
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        let dtype = params[0].dtype();
        if params.iter().any(|p| p.dtype() != dtype || !p.device().same_device(params[0].device())) {
            bail!("AdamW: all parameters must share one dtype and device");
        }
        // detached throughout: a recorded op graph would chain every step to the last
        let flatten = |ts: &mut dyn Iterator<Item = Tensor>| -> Result<Tensor> {
            let v: Vec<Tensor> =
                ts.map(|t| t.detach().to_dtype(dtype)?.flatten_all()).collect::<candle_core::Result<_>>()?;
            Ok(Tensor::cat(&v, 0)?)
        };
        let (m, v) = match self.flat.take() {
            Some(f) => f,
            None => (
                flatten(&mut self.moments.iter().map(|(m, _)| m.clone()))?,
                flatten(&mut self.moments.iter().map(|(_, v)| v.clone()))?,
            ),
        };
        let g = flatten(&mut grads.iter().cloned())?;
        let p = flatten(&mut params.iter().map(|p| p.as_tensor().clone()))?;
        let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
        let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let denom = ((&v / bc2)?.sqrt()? + self.eps)?;
        let update = ((&m / bc1)? / denom)?;
        let max_lr = lrs.iter().cloned().fold(0.0, f64::max);
        let new = if lrs.iter().all(|&l| l == lrs[0]) {
            let lr = lrs[0];
            ((p * (1.0 - lr * self.weight_decay))? - (update * lr)?)?
        } else {
            let want: Vec<f64> = lrs.iter().map(|l| l / max_lr).collect();
            if self.ratios.as_ref().is_none_or(|(r, _)| *r != want) {
                let parts: Vec<Tensor> = params
                    .iter()
                    .zip(&want)
                    .map(|(p, &r)| Tensor::full(r, p.elem_count(), p.device())?.to_dtype(dtype))
                    .collect::<candle_core::Result<_>>()?;
                self.ratios = Some((want, Tensor::cat(&parts, 0)?));
            }
            let lr = (&self.ratios.as_ref().expect("just set").1 * max_lr)?;
            ((p * lr.affine(-self.weight_decay, 1.0)?)? - (update * lr)?)?
        };
        let mut off = 0;
        for (k, param) in params.iter().enumerate() {
            let (n, shape) = (param.elem_count(), param.shape().clone());
            param.set(&new.narrow(0, off, n)?.reshape(shape.clone())?)?;
            self.moments[k] =
                (m.narrow(0, off, n)?.reshape(shape.clone())?, v.narrow(0, off, n)?.reshape(shape)?);
            off += n;
        }
        self.flat = Some((m, v));
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Linear,
    Cosine,
}

impl LrSchedule {
    /// The name `--lr-scheduler` takes, kohya's `ss_lr_scheduler` value.
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::Linear => "linear",
            LrSchedule::Cosine => "cosine",
        }
    }
}

/// Learning rate at `step` (0-based) of `total`: linear warmup, then the schedule.
pub fn lr_at(schedule: LrSchedule, base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Linear => base * (1.0 - p),
        LrSchedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

/// Clips the global L2 norm of `grads` to `max`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max: f64) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    // one device→host read for all of them: a read per tensor stalls a GPU hundreds of times a step
    let sums: Vec<Tensor> = grads
        .iter()
        .map(|g| g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64))
        .collect::<candle_core::Result<_>>()?;
    let norm = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt();
    if max > 0.0 && norm > max {
        let s = max / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// torch.optim.AdamW's update written out per element in f64, as the reference.
    fn reference(p: &mut [f64], m: &mut [f64], v: &mut [f64], g: &[f64], lr: f64, wd: f64, t: i32) {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            let (mh, vh) = (m[i] / (1.0 - b1.powi(t)), v[i] / (1.0 - b2.powi(t)));
            p[i] -= lr * mh / (vh.sqrt() + eps);
        }
    }

    #[test]
    fn flat_adamw_equals_the_per_element_algorithm() {
        let shapes: [&[usize]; 3] = [&[3, 4], &[5], &[2, 3, 2]];
        let val = |k: usize, i: usize, s: f64| ((k * 31 + i * 7) as f64 * 0.37 + s).sin();
        for equal_rates in [true, false] {
            let params: Vec<Var> = shapes
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let n: usize = s.iter().product();
                    let data: Vec<f64> = (0..n).map(|i| val(k, i, 0.0)).collect();
                    Var::from_tensor(&Tensor::from_vec(data, *s, &Device::Cpu).unwrap()).unwrap()
                })
                .collect();
            let mut want: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = params
                .iter()
                .map(|p| {
                    let x = p.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    let z = vec![0.0; x.len()];
                    (x, z.clone(), z)
                })
                .collect();
            let mut opt = AdamW::new(&params, 0.01).unwrap();
            for t in 1..=3 {
                let lrs: Vec<f64> = (0..params.len())
                    .map(|k| if equal_rates { 1e-2 } else { 1e-2 * (k + 1) as f64 })
                    .collect();
                let grads: Vec<Tensor> = params
                    .iter()
                    .enumerate()
                    .map(|(k, p)| {
                        let g: Vec<f64> = (0..p.elem_count()).map(|i| val(k, i, t as f64)).collect();
                        Tensor::from_vec(g, p.shape(), &Device::Cpu).unwrap()
                    })
                    .collect();
                opt.step(&params, &grads, &lrs).unwrap();
                for (k, (p, m, v)) in want.iter_mut().enumerate() {
                    let g = grads[k].flatten_all().unwrap().to_vec1::<f64>().unwrap();
                    reference(p, m, v, &g, lrs[k], 0.01, t);
                }
            }
            for (k, (p, m, _)) in want.iter().enumerate() {
                let got = params[k].as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let got_m = opt.moments()[k].0.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                for i in 0..p.len() {
                    assert!((got[i] - p[i]).abs() < 1e-12, "param {k}[{i}]: {} vs {}", got[i], p[i]);
                    assert!((got_m[i] - m[i]).abs() < 1e-12, "moment {k}[{i}]");
                }
            }
        }
    }
}
