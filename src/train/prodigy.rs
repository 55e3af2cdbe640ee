//! Prodigy (Mishchenko & Defazio, 2023): Adam whose step size `d` is estimated from how far
//! the parameters have moved against their gradients, so the learning rate stays near 1.
//! prodigyopt 1.1's arithmetic, on all parameters as one flat vector (Prodigy's sums run over
//! every parameter anyway).
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};

/// prodigyopt's keyword arguments (slice_p and fsdp_in_use aside).
#[derive(Debug, Clone, PartialEq)]
pub struct ProdigySettings {
    pub beta1: f64,
    pub beta2: f64,
    /// None: √beta2.
    pub beta3: Option<f64>,
    pub eps: f64,
    pub weight_decay: f64,
    pub decouple: bool,
    pub use_bias_correction: bool,
    pub safeguard_warmup: bool,
    pub d0: f64,
    pub d_coef: f64,
    pub growth_rate: f64,
}

impl Default for ProdigySettings {
    fn default() -> Self {
        ProdigySettings {
            beta1: 0.9,
            beta2: 0.999,
            beta3: None,
            eps: 1e-8,
            weight_decay: 0.0,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
        }
    }
}

pub struct Prodigy {
    pub settings: ProdigySettings,
    /// The step-size estimate and what it is built from (the saved state's scalars).
    pub d: f64,
    pub d_max: f64,
    pub d_numerator: f64,
    /// Steps taken.
    pub k: usize,
    /// Flat state over all parameters: exp_avg, exp_avg_sq, s and the starting point p0.
    pub m: Tensor,
    pub v: Tensor,
    pub s: Tensor,
    pub p0: Tensor,
}

/// All of `ts` as one flat detached vector of `dtype`.
pub fn flat(ts: impl Iterator<Item = Tensor>, dtype: DType) -> Result<Tensor> {
    let v: Vec<Tensor> =
        ts.map(|t| t.detach().to_dtype(dtype)?.flatten_all()).collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&v, 0)?)
}

/// Writes the flat vector `new` back into `params`, in order.
pub fn unflat(params: &[Var], new: &Tensor) -> Result<()> {
    let mut off = 0;
    for p in params {
        let n = p.elem_count();
        p.set(&new.narrow(0, off, n)?.reshape(p.shape())?)?;
        off += n;
    }
    Ok(())
}

impl Prodigy {
    pub fn new(params: &[Var], settings: ProdigySettings) -> Result<Self> {
        let dtype = params.first().map_or(DType::F32, |p| p.dtype());
        let p0 = flat(params.iter().map(|p| p.as_tensor().clone()), dtype)?;
        let z = p0.zeros_like()?;
        Ok(Prodigy {
            d: settings.d0,
            d_max: settings.d0,
            d_numerator: 0.0,
            k: 0,
            m: z.clone(),
            v: z.clone(),
            s: z,
            p0,
            settings,
        })
    }

    /// One step at learning rate `lrs` (one rate for every parameter, as prodigyopt requires).
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lrs: &[f64]) -> Result<()> {
        let lr = lrs.first().copied().unwrap_or(0.0);
        if lrs.iter().any(|&l| l != lr) {
            bail!("Prodigy estimates one step size for all parameters: give every parameter the same learning rate");
        }
        if params.is_empty() {
            return Ok(());
        }
        let c = &self.settings;
        let (b1, b2) = (c.beta1, c.beta2);
        let b3 = c.beta3.unwrap_or(b2.sqrt());
        let k = self.k as i32;
        let bias_correction =
            if c.use_bias_correction { (1.0 - b2.powi(k + 1)).sqrt() / (1.0 - b1.powi(k + 1)) } else { 1.0 };
        let d = self.d;
        let dlr = d * lr * bias_correction;
        let dtype = self.m.dtype();
        let p = flat(params.iter().map(|p| p.as_tensor().clone()), dtype)?;
        let mut g = flat(grads.iter().cloned(), dtype)?;
        if c.weight_decay != 0.0 && !c.decouple {
            g = (g + (&p * c.weight_decay)?)?;
        }
        let dot = (&g * (&self.p0 - &p)?)?.sum_all()?;
        let m = ((&self.m * b1)? + (&g * (d * (1.0 - b1)))?)?;
        let v = ((&self.v * b2)? + (g.sqr()? * (d * d * (1.0 - b2)))?)?;
        let s_rate = (d / c.d0) * if c.safeguard_warmup { d } else { dlr };
        let s = ((&self.s * b3)? + (&g * s_rate)?)?;
        let sums = Tensor::stack(&[dot, s.abs()?.sum_all()?], 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let delta_numerator = (d / c.d0) * dlr * sums[0];
        let d_denom = sums[1];
        (self.m, self.v, self.s) = (m, v, s);
        if d_denom == 0.0 {
            // no gradient yet: prodigyopt returns before touching d or the parameters
            return Ok(());
        }
        let mut d_new = d;
        if lr > 0.0 {
            let numerator = self.d_numerator * b3 + delta_numerator;
            let d_hat = c.d_coef * numerator / d_denom;
            if d == c.d0 {
                d_new = d.max(d_hat);
            }
            self.d_max = self.d_max.max(d_hat);
            d_new = self.d_max.min(d_new * c.growth_rate);
            self.d_numerator = numerator;
        }
        self.d = d_new;
        let denom = (self.v.sqrt()? + d_new * c.eps)?;
        let mut p = p;
        if c.weight_decay != 0.0 && c.decouple {
            p = (&p + (&p * (-c.weight_decay * dlr))?)?;
        }
        let p = if b1 > 0.0 {
            (p - ((&self.m / denom)? * dlr)?)?
        } else {
            (p - ((&g / denom)? * (dlr * d_new))?)?
        };
        unflat(params, &p)?;
        self.k += 1;
        Ok(())
    }
}
