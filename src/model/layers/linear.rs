//! Linear layer y = x Wᵀ + b, with optional LoRA adapters.
use crate::lora::{AdapterGrads, Lora};
use candle_core::{DType, Result, Tensor};

pub struct Linear {
    /// [out, in], frozen.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapters: Vec<Lora>,
}

/// For frozen W, dx = dy W needs nothing from the forward; only adapters keep their input.
pub struct LinearSaved {
    x: Option<Tensor>,
    hidden: Vec<Tensor>,
    masks: Vec<Option<Tensor>>,
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
    fn adapter_dtype(&self) -> DType {
        self.adapters.first().map(|a| a.down.dtype()).unwrap_or(DType::F32)
    }

    pub fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward(x)?.0)
    }

    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, LinearSaved)> {
        // detached: candle would otherwise record a graph for variable (trainable) tensors
        let mut y = matmul_wt(x, &self.weight.detach())?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.detach())?;
        }
        let mut hidden = Vec::with_capacity(self.adapters.len());
        let mut masks = Vec::with_capacity(self.adapters.len());
        if !self.adapters.is_empty() {
            let xf = x.to_dtype(self.adapter_dtype())?;
            // a switched-off adapter (a base prediction) adds nothing and saves nothing
            for a in self.adapters.iter().filter(|a| !a.is_off()) {
                let mask = a.dropout_mask(xf.dims(), &xf)?;
                let xd = match &mask {
                    Some(m) => (&xf * m)?,
                    None => xf.clone(),
                };
                masks.push(mask);
                let h = matmul_wt(&xd, &a.down.as_tensor().detach())?;
                let delta = (matmul_wt(&h, &a.up.as_tensor().detach())? * a.scale)?;
                let dt = y.dtype();
                y = (y + delta.to_dtype(dt)?)?;
                hidden.push(h);
            }
        }
        let x = (!self.adapters.is_empty() || self.trains_base()).then(|| x.clone());
        Ok((y, LinearSaved { x, hidden, masks }))
    }

    /// Full training: the base weights are variables and get gradients too.
    fn trains_base(&self) -> bool {
        self.weight.is_variable()
    }

    pub fn backward(&self, s: LinearSaved, dy: &Tensor, grads: &mut AdapterGrads) -> Result<Tensor> {
        let mut dx = dy.matmul_any(&self.weight.detach())?;
        if let (true, Some(x)) = (self.trains_base(), &s.x) {
            let (x2, dy2) = (flatten2(x)?, flatten2(dy)?);
            grads.add_weight(&self.weight, dy2.t()?.matmul(&x2)?)?;
            if let Some(b) = &self.bias {
                grads.add_weight(b, dy2.sum(0)?)?;
            }
        }
        if let (false, Some(x)) = (self.adapters.is_empty(), &s.x) {
            let xf = flatten2(&x.to_dtype(self.adapter_dtype())?)?;
            let dyf = flatten2(&dy.to_dtype(self.adapter_dtype())?)?;
            for ((a, h), mask) in self.adapters.iter().filter(|a| !a.is_off()).zip(&s.hidden).zip(&s.masks) {
                let h = flatten2(h)?;
                let mask = mask.as_ref().map(flatten2).transpose()?;
                let xf = match &mask {
                    Some(m) => (&xf * m)?,
                    None => xf.clone(),
                };
                // y = s·h Uᵀ, h = x Dᵀ  ⇒  dU = s·dyᵀ h, dh = s·dy U, dD = dhᵀ x, dx += dh D
                let d_up = (dyf.t()?.matmul(&h)? * a.scale)?;
                let dh = (dyf.matmul(&a.up.as_tensor().detach())? * a.scale)?;
                let d_down = dh.t()?.matmul(&xf)?;
                let mut dxa = dh.matmul(&a.down.as_tensor().detach())?;
                if let Some(m) = &mask {
                    dxa = (dxa * m)?;
                }
                let dxa = dxa.reshape(dx.shape())?;
                dx = (dx + dxa.to_dtype(dy.dtype())?)?;
                grads.add(a.id, d_down, d_up)?;
            }
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

fn flatten2(x: &Tensor) -> Result<Tensor> {
    let inner = x.dim(candle_core::D::Minus1)?;
    x.reshape(((), inner))
}

/// Extension: dy [.., out] · W [out, in] over flattened leading dims.
trait MatmulAny {
    fn matmul_any(&self, w: &Tensor) -> Result<Tensor>;
}

impl MatmulAny for Tensor {
    fn matmul_any(&self, w: &Tensor) -> Result<Tensor> {
        matmul_wt(self, &w.t()?)
    }
}
