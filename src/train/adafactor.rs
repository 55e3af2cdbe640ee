//! Adafactor (Shazeer & Stern, 2018): second moments kept as row and column means for every
//! parameter of two or more dimensions (factored over the last two), updates clipped by their
//! RMS, optionally a relative step size. transformers.optimization.Adafactor's arithmetic, as
//! kohya's sd-scripts uses it; no host reads, so a GPU step never waits.
use anyhow::{bail, Result};
use candle_core::{Tensor, Var, D};

/// transformers' Adafactor keyword arguments. The defaults differ from transformers' in the
/// three switches: a fixed learning rate (--lr, the schedule) as LoRA guides set them.
#[derive(Debug, Clone, PartialEq)]
pub struct AdafactorSettings {
    /// (regularisation of the squared gradient, floor of the parameter scale)
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    /// First moment (momentum) when set.
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    /// Step sizes relative to the parameter's RMS.
    pub scale_parameter: bool,
    /// The step size is min(1e-2, 1/√step) (or 1e-6·step with warmup_init) instead of --lr.
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorSettings {
    fn default() -> Self {
        AdafactorSettings {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: false,
            relative_step: false,
            warmup_init: false,
        }
    }
}

/// One parameter's state: factored (row, col) or full second moment, and the first moment.
pub struct Moments {
    pub row: Option<Tensor>,
    pub col: Option<Tensor>,
    pub v: Option<Tensor>,
    pub m: Option<Tensor>,
}

pub struct Adafactor {
    pub settings: AdafactorSettings,
    pub step: usize,
    pub state: Vec<Moments>,
}

fn rms(t: &Tensor) -> Result<Tensor> {
    Ok(t.sqr()?.mean_all()?.sqrt()?)
}

impl Adafactor {
    pub fn new(params: &[Var], settings: AdafactorSettings) -> Result<Self> {
        let state = params
            .iter()
            .map(|p| {
                let dims = p.dims();
                let zeros = |d: &[usize]| Tensor::zeros(d, p.dtype(), p.device());
                let (row, col, v) = if dims.len() >= 2 {
                    let n = dims.len();
                    let col_dims: Vec<usize> = dims[..n - 2].iter().chain(&dims[n - 1..]).copied().collect();
                    (Some(zeros(&dims[..n - 1])?), Some(zeros(&col_dims)?), None)
                } else {
                    (None, None, Some(p.zeros_like()?))
                };
                let m = settings.beta1.map(|_| p.zeros_like()).transpose()?;
                Ok(Moments { row, col, v, m })
            })
            .collect::<Result<_>>()?;
        Ok(Adafactor { settings, step: 0, state })
    }

    /// The step size of step `step` (1-based) before the parameter scale.
    pub fn step_size_at(&self, step: usize, lr: f64) -> f64 {
        Self::step_size(&self.settings, step, lr)
    }

    /// The step size of step `step` before the parameter scale: `lr`, or the relative step.
    fn step_size(c: &AdafactorSettings, step: usize, lr: f64) -> f64 {
        if !c.relative_step {
            return lr;
        }
        let min_step = if c.warmup_init { 1e-6 * step as f64 } else { 1e-2 };
        min_step.min(1.0 / (step as f64).sqrt())
    }

    /// One step, parameter k at learning rate `lrs[k]` (with relative_step a rate of 0 still
    /// freezes a parameter, any other takes Adafactor's own).
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lrs: &[f64]) -> Result<()> {
        self.step += 1;
        let c = self.settings.clone();
        let beta2t = 1.0 - (self.step as f64).powf(c.decay_rate);
        for ((p, g), (st, &lr)) in params.iter().zip(grads).zip(self.state.iter_mut().zip(lrs)) {
            if lr == 0.0 {
                continue;
            }
            let x = p.as_tensor().detach();
            let g = g.detach().to_dtype(x.dtype())?;
            let mut size =
                Tensor::new(Self::step_size(&c, self.step, lr), x.device())?.to_dtype(x.dtype())?;
            if c.scale_parameter {
                size = size.broadcast_mul(&rms(&x)?.maximum(c.eps.1)?)?;
            }
            let sq = (g.sqr()? + c.eps.0)?;
            let mut update = match (&st.row, &st.col, &st.v) {
                (Some(row), Some(col), _) => {
                    let row = ((row * beta2t)? + (sq.mean(D::Minus1)? * (1.0 - beta2t))?)?;
                    let col = ((col * beta2t)? + (sq.mean(D::Minus2)? * (1.0 - beta2t))?)?;
                    let r = row
                        .broadcast_div(&row.mean_keepdim(D::Minus1)?)?
                        .sqrt()?
                        .recip()?
                        .unsqueeze(D::Minus1)?;
                    let cf = col.unsqueeze(D::Minus2)?.sqrt()?.recip()?;
                    let u = r.broadcast_mul(&cf)?.mul(&g)?;
                    (st.row, st.col) = (Some(row), Some(col));
                    u
                }
                (_, _, Some(v)) => {
                    let v = ((v * beta2t)? + (sq * (1.0 - beta2t))?)?;
                    let u = v.sqrt()?.recip()?.mul(&g)?;
                    st.v = Some(v);
                    u
                }
                _ => unreachable!("a parameter's second moment is factored or full"),
            };
            let clip = (rms(&update)? / c.clip_threshold)?.maximum(1.0)?;
            update = update.broadcast_div(&clip)?.broadcast_mul(&size)?;
            if let (Some(b1), Some(m)) = (c.beta1, &st.m) {
                let m = ((m * b1)? + (update * (1.0 - b1))?)?;
                update = m.clone();
                st.m = Some(m);
            }
            let mut x = x;
            if c.weight_decay != 0.0 {
                x = (&x + x.broadcast_mul(&(&size * -c.weight_decay)?)?)?;
            }
            p.set(&(x - update)?)?;
        }
        Ok(())
    }

    /// The state tensors by name, in parameter order (for the training state).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for (j, st) in self.state.iter().enumerate() {
            for (name, t) in [("row", &st.row), ("col", &st.col), ("v", &st.v), ("m", &st.m)] {
                if let Some(t) = t {
                    out.push((format!("adafactor.{j}.{name}"), t.clone()));
                }
            }
        }
        out
    }

    /// Restores the state tensors `tensors` wrote, through `take(name)`.
    pub fn restore(&mut self, take: &dyn Fn(&str) -> Result<Tensor>) -> Result<()> {
        for (j, st) in self.state.iter_mut().enumerate() {
            for (name, t) in [("row", &mut st.row), ("col", &mut st.col), ("v", &mut st.v), ("m", &mut st.m)]
            {
                if let Some(t) = t {
                    let saved = take(&format!("adafactor.{j}.{name}"))?;
                    if saved.dims() != t.dims() {
                        bail!(
                            "adafactor.{j}.{name}: saved as {:?}, the parameter needs {:?}",
                            saved.dims(),
                            t.dims()
                        );
                    }
                    *t = saved.to_dtype(t.dtype())?.to_device(t.device())?;
                }
            }
        }
        Ok(())
    }
}
