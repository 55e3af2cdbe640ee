//! GroupNorm and LayerNorm, statistics in f32. GroupNorm can fuse the SiLU that follows it in
//! every ResNet block: the SiLU input is recomputed from the saved normalised x, so the pair
//! keeps one tensor instead of two.
use super::acc;
use super::activation::silu_backward;
use super::Grads;
use candle_core::{Result, Tensor, D};

pub struct GroupNorm {
    pub num_groups: usize,
    pub eps: f64,
    pub weight: Tensor,
    pub bias: Tensor,
}

pub struct LayerNorm {
    pub eps: f64,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// x̂ = (x − μ)·rstd (in the input's dtype) and rstd per group/row (f32).
pub struct NormSaved {
    xhat: Tensor,
    rstd: Tensor,
    silu: bool,
}

/// Normalises each row of x [rows, m]: returns (x̂, rstd), both f32.
fn normalize_rows(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?, rstd))
}

/// dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ ⊙ x̂)) per row.
fn normalize_rows_backward(xhat: &Tensor, rstd: &Tensor, dxhat: &Tensor) -> Result<Tensor> {
    let m1 = dxhat.mean_keepdim(D::Minus1)?;
    let m2 = (dxhat * xhat)?.mean_keepdim(D::Minus1)?;
    let inner = (dxhat.broadcast_sub(&m1)? - xhat.broadcast_mul(&m2)?)?;
    inner.broadcast_mul(rstd)
}

impl GroupNorm {
    fn affine_shape(&self, x: &Tensor) -> Vec<usize> {
        let mut s = vec![1; x.rank()];
        s[1] = x.dim(1).unwrap_or(1);
        s
    }

    fn scale_shift(&self, xhat: &Tensor) -> Result<Tensor> {
        let s = self.affine_shape(xhat);
        let w = self.weight.detach().to_dtype(xhat.dtype())?.reshape(s.clone())?;
        let b = self.bias.detach().to_dtype(xhat.dtype())?.reshape(s)?;
        xhat.broadcast_mul(&w)?.broadcast_add(&b)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train(x, false)?.0)
    }

    /// GroupNorm over x [N, C, ...]; with `silu`, returns silu(groupnorm(x)).
    pub fn forward_train(&self, x: &Tensor, silu: bool) -> Result<(Tensor, NormSaved)> {
        let n = x.dim(0)?;
        let xf = x.to_dtype(acc(x.dtype()))?.reshape((n, self.num_groups, ()))?;
        let (xhat, rstd) = normalize_rows(&xf, self.eps)?;
        let xhat = xhat.reshape(x.shape())?;
        let mut y = self.scale_shift(&xhat)?;
        if silu {
            y = y.silu()?;
        }
        let saved = NormSaved { xhat: xhat.to_dtype(x.dtype())?, rstd, silu };
        Ok((y.to_dtype(x.dtype())?, saved))
    }

    pub fn backward(&self, s: NormSaved, dy: &Tensor, g: &mut Grads) -> Result<Tensor> {
        let f = acc(s.xhat.dtype());
        let xhat = s.xhat.to_dtype(f)?;
        let mut dy = dy.to_dtype(f)?;
        if s.silu {
            dy = silu_backward(&self.scale_shift(&xhat)?, &dy)?;
        }
        if self.weight.is_variable() {
            let dims: Vec<usize> = (0..xhat.rank()).filter(|&d| d != 1).collect();
            g.add_weight(&self.weight, (&dy * &xhat)?.sum(dims.as_slice())?)?;
            g.add_weight(&self.bias, dy.sum(dims.as_slice())?)?;
        }
        let w = self.weight.detach().to_dtype(f)?.reshape(self.affine_shape(&xhat))?;
        let dxhat = dy.broadcast_mul(&w)?;
        let n = xhat.dim(0)?;
        let g = self.num_groups;
        let dx = normalize_rows_backward(&xhat.reshape((n, g, ()))?, &s.rstd, &dxhat.reshape((n, g, ()))?)?;
        dx.reshape(xhat.shape())?.to_dtype(s.xhat.dtype())
    }
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train(x)?.0)
    }

    /// LayerNorm over the last dimension.
    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, NormSaved)> {
        let f = acc(x.dtype());
        let (xhat, rstd) = normalize_rows(&x.to_dtype(f)?, self.eps)?;
        let mut y = xhat.broadcast_mul(&self.weight.detach().to_dtype(f)?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.detach().to_dtype(f)?)?;
        }
        let saved = NormSaved { xhat: xhat.to_dtype(x.dtype())?, rstd, silu: false };
        Ok((y.to_dtype(x.dtype())?, saved))
    }

    pub fn backward(&self, s: NormSaved, dy: &Tensor, g: &mut Grads) -> Result<Tensor> {
        let f = acc(s.xhat.dtype());
        let xhat = s.xhat.to_dtype(f)?;
        if self.weight.is_variable() {
            let d = dy.to_dtype(f)?;
            let rows = |t: &Tensor| t.reshape(((), xhat.dim(candle_core::D::Minus1)?));
            g.add_weight(&self.weight, (rows(&d)? * rows(&xhat)?)?.sum(0)?)?;
            if let Some(b) = &self.bias {
                g.add_weight(b, rows(&d)?.sum(0)?)?;
            }
        }
        let dxhat = dy.to_dtype(f)?.broadcast_mul(&self.weight.detach().to_dtype(f)?)?;
        normalize_rows_backward(&xhat, &s.rstd, &dxhat)?.to_dtype(s.xhat.dtype())
    }
}
