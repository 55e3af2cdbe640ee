//! Linear layer y = x Wᵀ + b, with optional LoRA adapters.
use super::adapter::{adapters_backward, add_adapters, Base, LoraSaved, Op};
use super::{Grads, Lora};
use candle_core::{Result, Tensor};

pub struct Linear {
    /// [out, in], frozen.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapters: Vec<Lora>,
}

/// For frozen W, dx = dy W needs nothing from the forward; only adapters keep their input.
pub struct LinearSaved {
    x: Option<Tensor>,
    adapters: Vec<LoraSaved>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias, adapters: vec![] }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    /// Inference forward.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train(x)?.0)
    }

    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, LinearSaved)> {
        // detached: candle would otherwise record a graph for variable (trainable) tensors
        let wx = matmul_wt(x, &self.weight.detach())?;
        let y = match &self.bias {
            Some(b) => wx.broadcast_add(&b.detach())?,
            None => wx.clone(),
        };
        let base = Base { weight: &self.weight, out: &wx };
        let (y, adapters) = add_adapters(&self.adapters, Op::Matmul, x, base, y)?;
        let x = (!self.adapters.is_empty() || self.trains_base()).then(|| x.clone());
        Ok((y, LinearSaved { x, adapters }))
    }

    /// Full training: the base weights are variables and get gradients too.
    fn trains_base(&self) -> bool {
        self.weight.is_variable()
    }

    pub fn backward(&self, s: LinearSaved, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let mut dx = Op::Matmul.input_grad(dy, &self.weight.detach(), &[])?;
        let Some(x) = &s.x else { return Ok(dx) };
        if self.trains_base() {
            grads.add_weight(&self.weight, Op::Matmul.weight_grad(x, dy, self.weight.dims())?)?;
            if let Some(b) = &self.bias {
                grads.add_weight(b, flatten2(dy)?.sum(0)?)?;
            }
        }
        if let Some(da) =
            adapters_backward(&self.adapters, (Op::Matmul, &self.weight), s.adapters, x, dy, grads)?
        {
            dx = (dx + da)?;
        }
        Ok(dx)
    }
}

/// x [.., in] · Wᵀ [in, out] over the flattened leading dims.
pub fn matmul_wt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let lead: Vec<usize> = dims[..dims.len() - 1].to_vec();
    let x2 = x.reshape(((), inner))?;
    let y = x2.matmul(&w.t()?)?;
    let mut out = lead;
    out.push(w.dim(0)?);
    y.reshape(out)
}

pub fn flatten2(x: &Tensor) -> Result<Tensor> {
    let inner = x.dim(candle_core::D::Minus1)?;
    x.reshape(((), inner))
}
