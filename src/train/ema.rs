//! An exponential moving average of the trained parameters (`--ema-decay`), diffusers'
//! EMAModel arithmetic: after each optimizer step `shadow -= (1 - decay) · (shadow - param)`, with
//! decay 0 (a copy) until `--ema-start-step` and then min(decay, (1 + n) / (10 + n)) over the n
//! steps since, so the average does not drag in the untrained start.
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

pub struct Ema {
    pub decay: f64,
    /// diffusers' update_after_step.
    pub start_step: usize,
    /// Optimizer steps averaged so far (diffusers' optimization_step).
    pub steps: usize,
    pub shadow: Vec<Tensor>,
}

impl Ema {
    pub fn new(params: &[Var], decay: f64, start_step: usize) -> Result<Self> {
        let shadow =
            params.iter().map(|p| p.as_tensor().detach().copy()).collect::<candle_core::Result<_>>()?;
        Ok(Ema { decay, start_step, steps: 0, shadow })
    }

    /// The decay of optimizer step `steps` (1-based).
    pub fn decay_at(&self, steps: usize) -> f64 {
        let n = steps.saturating_sub(self.start_step + 1);
        if n == 0 {
            return 0.0;
        }
        ((1 + n) as f64 / (10 + n) as f64).min(self.decay)
    }

    /// Averages in the parameters after an optimizer step.
    pub fn update(&mut self, params: &[Var]) -> Result<()> {
        self.steps += 1;
        let rate = 1.0 - self.decay_at(self.steps);
        for (s, p) in self.shadow.iter_mut().zip(params) {
            *s = (&*s - ((&*s - p.as_tensor())? * rate)?)?;
        }
        Ok(())
    }

    /// Exchanges the parameters' values with the averages: called twice, everything is back.
    pub fn swap(&mut self, params: &[Var]) -> Result<()> {
        for (s, p) in self.shadow.iter_mut().zip(params) {
            let raw = p.as_tensor().detach().copy()?;
            p.set(s)?;
            *s = raw;
        }
        Ok(())
    }

    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow.iter().enumerate().map(|(j, s)| (format!("ema.{j}"), s.clone())).collect()
    }

    pub fn restore(&mut self, steps: usize, take: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        for (j, s) in self.shadow.iter_mut().enumerate() {
            let saved = take(&format!("ema.{j}"))?;
            if saved.dims() != s.dims() {
                bail!("ema.{j}: saved as {:?}, the parameter needs {:?}", saved.dims(), s.dims());
            }
            *s = saved.to_dtype(s.dtype())?.to_device(s.device())?;
        }
        self.steps = steps;
        Ok(())
    }
}
