//! Pointwise activations: forward is candle's op, backward is the analytic derivative.
use super::acc;
use candle_core::{Result, Tensor};

/// d silu(x)/dx = s · (1 + x · (1 − s)), s = sigmoid(x).
pub fn silu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let s = sigmoid(x)?;
    let one_minus_s = s.affine(-1.0, 1.0)?;
    let d = (&s * (x * one_minus_s)?.affine(1.0, 1.0)?)?;
    dy * d
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Exact (erf) GELU derivative: Φ(x) + x · φ(x), in `acc` precision.
pub fn gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(acc(dt))?;
    let cdf = ((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = (x.sqr()? * -0.5)?.exp()? * (1.0 / (2.0 * std::f64::consts::PI).sqrt());
    let d = (cdf? + (&x * pdf?)?)?;
    (dy.to_dtype(acc(dt))? * d)?.to_dtype(dt)
}

/// CLIP's quick_gelu: x · sigmoid(1.702 x).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * sigmoid(&(x * 1.702)?)?
}

pub fn quick_gelu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let s = sigmoid(&(x * 1.702)?)?;
    let d = (&s + ((x * 1.702)? * (&s * s.affine(-1.0, 1.0)?)?)?)?;
    dy * d
}
