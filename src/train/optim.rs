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
    /// (m, v) per parameter, in parameter order.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: &[Var], weight_decay: f64) -> Result<Self> {
        let moments = params.iter().map(|p| Ok((p.zeros_like()?, p.zeros_like()?))).collect::<Result<_>>()?;
        Ok(Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, step: 0, moments })
    }

    /// One update, parameter k at learning rate `lrs[k]` (decoupled weight decay,
    /// bias-corrected moments — torch.optim.AdamW's arithmetic).
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lrs: &[f64]) -> Result<()> {
        if params.len() != self.moments.len() || grads.len() != params.len() {
            bail!("optimizer state has {} parameters, the model {}", self.moments.len(), params.len());
        }
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        for (((p, g), (m, v)), &lr) in params.iter().zip(grads).zip(self.moments.iter_mut()).zip(lrs) {
            // detached throughout: a recorded op graph would chain every step to the last
            let g = g.detach().to_dtype(p.dtype())?;
            *m = ((&*m * b1)? + (&g * (1.0 - b1))?)?.detach();
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?.detach();
            let denom = ((&*v / bc2)?.sqrt()? + self.eps)?;
            let update = ((&*m / bc1)? / denom)?;
            let decayed = (p.as_tensor().detach() * (1.0 - lr * self.weight_decay))?;
            p.set(&(decayed - (update * lr)?)?.detach())?;
        }
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
