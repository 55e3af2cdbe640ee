//! Conv2d with optional LoRA adapters (1×1 and k×k, "LoCon").
//!
//! The input gradient is a plain convolution of the (stride-dilated) output gradient with the
//! flipped, transposed kernel, so it runs on the same im2col+GEMM path as the forward instead
//! of candle's naive conv_transpose2d.
//!
//! On the CPU in f32, stride-1 k×k convolutions, their input and kernel gradients go through
//! `conv_taps` (one GEMM per kernel tap); strided ones through `im2col`.
use super::adapter::{adapters_backward, add_adapters, Base, LoraSaved, Op};
use super::{Grads, Lora};
use candle_core::{DType, Result, Tensor};

pub struct Conv2d {
    /// [out, in, kh, kw], frozen.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    pub adapters: Vec<Lora>,
}

pub struct Conv2dSaved {
    x: Option<Tensor>,
    adapters: Vec<LoraSaved>,
    /// The input's shape: a strided conv's output does not tell it.
    x_dims: Vec<usize>,
}

impl Conv2d {
    /// Replaces the frozen kernel (a LyCORIS module merged in), stored as `new` stores it.
    pub fn set_weight(&mut self, weight: Tensor) {
        self.weight = Self::new(weight, None, self.stride, self.padding).weight;
    }

    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Self {
        // the CPU f32 stride-1 path multiplies by one tap of the kernel at a time: stored
        // tap-major, each tap is a contiguous matrix (shape-only placeholders and trained
        // kernels, whose gradients follow the variable itself, are left alone)
        let taps = weight.dims().len() == 4
            && weight.dim(2).is_ok_and(|k| k > 1)
            && weight.dim(2).ok() == weight.dim(3).ok();
        let weight = if taps
            && stride == 1
            && cpu_f32(&weight, &weight)
            && weight.is_contiguous()
            && !weight.is_variable()
        {
            super::conv_taps::tap_major(&weight).unwrap_or(weight)
        } else {
            weight
        };
        Self { weight, bias, stride, padding, adapters: vec![] }
    }

    pub fn kernel_size(&self) -> usize {
        self.weight.dim(2).unwrap_or(1)
    }

    fn op(&self) -> Op {
        Op::Conv { stride: self.stride, padding: self.padding }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_train(x)?.0)
    }

    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, Conv2dSaved)> {
        // detached: candle would otherwise record a graph for variable (trainable) tensors
        let wx = conv2d(x, &self.weight.detach(), self.padding, self.stride)?;
        let y = match &self.bias {
            Some(b) => wx.broadcast_add(&b.detach().reshape((1, (), 1, 1))?)?,
            None => wx.clone(),
        };
        let base = Base { weight: &self.weight, out: &wx };
        let (y, adapters) = add_adapters(&self.adapters, self.op(), x, base, y)?;
        let x_dims = x.dims().to_vec();
        let x = (!self.adapters.is_empty() || self.weight.is_variable()).then(|| x.clone());
        Ok((y, Conv2dSaved { x, adapters, x_dims }))
    }

    pub fn backward(&self, s: Conv2dSaved, dy: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let mut dx = self.op().input_grad(dy, &self.weight.detach(), &s.x_dims)?;
        let Some(x) = &s.x else { return Ok(dx) };
        if self.weight.is_variable() {
            // full training: the base kernel and bias are variables
            grads.add_weight(&self.weight, self.op().weight_grad(x, dy, self.weight.dims())?)?;
            if let Some(b) = &self.bias {
                grads.add_weight(b, dy.sum((0, 2, 3))?)?;
            }
        }
        if let Some(da) =
            adapters_backward(&self.adapters, (self.op(), &self.weight), s.adapters, x, dy, grads)?
        {
            dx = (dx + da)?;
        }
        Ok(dx)
    }
}

/// [N, C, H, W] → [C, N·H·W]
fn channels_by_rest(x: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    x.transpose(0, 1)?.contiguous()?.reshape((c, ()))
}

/// Inserts (stride − 1) zeros between rows and columns: [N,C,H,W] → [N,C,(H−1)s+1,(W−1)s+1].
fn dilate(x: &Tensor, stride: usize) -> Result<Tensor> {
    if stride == 1 {
        return Ok(x.clone());
    }
    let (n, c, h, w) = x.dims4()?;
    let x = x.unsqueeze(3)?.pad_with_zeros(3, 0, stride - 1)?.reshape((n, c, h * stride, w))?;
    let x = x.unsqueeze(4)?.pad_with_zeros(4, 0, stride - 1)?.reshape((n, c, h * stride, w * stride))?;
    x.narrow(2, 0, (h - 1) * stride + 1)?.narrow(3, 0, (w - 1) * stride + 1)
}

/// dx of y = conv(x, w, stride, padding) for an input of spatial size `in_hw`.
pub fn conv_input_grad(
    dy: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
    in_hw: (usize, usize),
) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    let (_, _, ho, wo) = dy.dims4()?;
    let own = cpu_f32(dy, w) && kh == kw;
    if own && stride == 1 {
        return super::conv_taps::input_grad(dy, w, padding);
    }
    let d = dilate(dy, stride)?;
    let pad_lo = kh - 1 - padding;
    let pad_hi_h = in_hw.0 + padding - (ho - 1) * stride - 1;
    let pad_hi_w = in_hw.1 + padding - (wo - 1) * stride - 1;
    let d = d.pad_with_zeros(2, pad_lo, pad_hi_h)?.pad_with_zeros(3, kw - 1 - padding, pad_hi_w)?;
    if own {
        // padded already: the mirrored kernel's own padding k − 1 − p must be 0
        return super::conv_taps::input_grad(&d, w, kh - 1);
    }
    let wf = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
    conv2d(&d, &wf.to_dtype(d.dtype())?, 0, 1)
}

/// Whether the own im2col path applies: both operands f32 on the CPU.
fn cpu_f32(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cpu() && a.dtype() == DType::F32 && b.dtype() == DType::F32
}

/// y = conv(x, w) with x [N, C, H, W] and w [O, C, KH, KW], no groups or dilation.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if !cpu_f32(x, w) || (kh == 1 && kw == 1 && stride == 1 && padding == 0) {
        // 1×1: candle's conv is already one GEMM
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (_, c, h, wd) = x.dims4()?;
    let (_, c2, _, _) = w.dims4()?;
    if c != c2 || h + 2 * padding < kh || wd + 2 * padding < kw {
        // let candle word the shape error
        return x.conv2d(w, padding, stride, 1, 1);
    }
    if stride == 1 && kh == kw {
        return super::conv_taps::conv2d(x, w, padding);
    }
    super::im2col::conv2d(x, w, padding, stride)
}

/// Gradient of a conv kernel of shape `wdims` from its input x and output gradient dy: on the
/// CPU in f32 one GEMM per tap on the padded grid (stride 1) or per image over its im2col matrix
/// (stride 2), else by windows.
pub fn kernel_grad(
    x: &Tensor,
    dy: &Tensor,
    wdims: (usize, usize, usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if cpu_f32(x, dy) {
        if stride == 1 && wdims.2 == wdims.3 {
            return super::conv_taps::kernel_grad(x, dy, wdims, padding);
        }
        return super::im2col::kernel_grad(x, dy, wdims, stride, padding);
    }
    kernel_grad_by_windows(x, dy, wdims, stride, padding)
}

/// dW[:, :, i, j] = dy · window(i, j)ᵀ, one candle GEMM per kernel tap (any device and dtype).
pub fn kernel_grad_by_windows(
    x: &Tensor,
    dy: &Tensor,
    wdims: (usize, usize, usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (o, c, kh, kw) = wdims;
    let (_, _, ho, wo) = dy.dims4()?;
    let xp = x.pad_with_zeros(2, padding, padding + stride)?.pad_with_zeros(3, padding, padding + stride)?;
    let dyc = channels_by_rest(dy)?;
    let mut taps = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        for j in 0..kw {
            let win = strided_window(&xp, i, j, stride, ho, wo)?;
            taps.push(dyc.matmul(&channels_by_rest(&win)?.t()?)?);
        }
    }
    Tensor::stack(&taps, 2)?.reshape((o, c, kh, kw))
}

/// xp[:, :, i + s·a, j + s·b] for a < ho, b < wo.
fn strided_window(xp: &Tensor, i: usize, j: usize, s: usize, ho: usize, wo: usize) -> Result<Tensor> {
    let (n, c, _, _) = xp.dims4()?;
    let t = xp.narrow(2, i, ho * s)?.narrow(3, j, wo * s)?;
    if s == 1 {
        return Ok(t);
    }
    t.reshape((n, c, ho, s, wo, s))?.narrow(3, 0, 1)?.narrow(5, 0, 1)?.reshape((n, c, ho, wo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Frozen 3×3 kernels are stored tap-major; a trained kernel stays the variable it was built
    /// from, or its gradient would go to a copy the optimizer never sees.
    #[test]
    fn only_frozen_kernels_are_stored_tap_major() {
        let w = crate::model::weights::random_tensor(1, "w", &(4, 3, 3, 3).into(), DType::F32, &Device::Cpu)
            .unwrap();
        assert!(!Conv2d::new(w.clone(), None, 1, 1).weight.is_contiguous());
        let v = Var::from_tensor(&w).unwrap();
        let c = Conv2d::new(v.as_tensor().clone(), None, 1, 1);
        assert!(c.weight.is_variable() && c.weight.id() == v.as_tensor().id());
    }
}
