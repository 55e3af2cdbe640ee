//! Layer types with explicit forward and backward.
//!
//! Every layer, block and network follows one shape: `forward_train(x) -> (y, Saved)` keeps
//! exactly what `backward` needs, and `backward(saved, dy, grads) -> dx` returns the input
//! gradient and accumulates gradients for adapter parameters only. Frozen weights never receive
//! a gradient. `forward(x) -> y` is inference: the same computation, keeping nothing.
pub mod activation;
pub mod adapter;
pub mod attention;
pub mod conv;
mod conv_taps;
mod cpu;
pub mod dora;
mod flash;
pub mod geglu;
mod im2col;
pub mod linear;
pub mod lycoris;
pub mod norm;
pub mod resample;
mod vmath;

pub use activation::{gelu_backward, quick_gelu, quick_gelu_backward, silu_backward};
pub use adapter::{Grads, Lora, Switch};
pub use attention::{Attention, AttentionSaved, CLIP_NAMES, DIFFUSERS_NAMES};
pub use conv::{Conv2d, Conv2dSaved};
pub use linear::{Linear, LinearSaved};
pub use norm::{GroupNorm, LayerNorm, NormSaved};
pub use resample::{upsample_nearest2x, upsample_nearest2x_backward};

use candle_core::{DType, Result, Tensor};

/// The dtype for statistics and reductions: f32 for f32/f16/bf16, f64 stays f64 (used by the
/// finite-difference tests).
pub fn acc(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Softmax over the last dimension, computed and returned in `acc` precision.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(acc(x.dtype()))?;
    let max = x.max_keepdim(candle_core::D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(candle_core::D::Minus1)?;
    e.broadcast_div(&s)
}

/// A mutable reference to an adaptable layer, as handed out by `Visit`.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

/// Walks every Linear and Conv2d of a model with its diffusers module path
/// (e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).
pub trait Visit {
    fn visit(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>));
}

pub fn join(prefix: &str, name: impl std::fmt::Display) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl Visit for Linear {
    fn visit(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        f(path, LayerMut::Linear(self))
    }
}

impl Visit for Conv2d {
    fn visit(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        f(path, LayerMut::Conv(self))
    }
}

impl<T: Visit> Visit for Option<T> {
    fn visit(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        if let Some(t) = self {
            t.visit(path, f)
        }
    }
}

impl<T: Visit> Visit for Vec<T> {
    fn visit(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        for (i, t) in self.iter_mut().enumerate() {
            t.visit(&join(path, i), f)
        }
    }
}

impl Visit for Attention {
    fn visit(&mut self, path: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        let [q, k, v, o] = self.names;
        self.to_q.visit(&join(path, q), f);
        self.to_k.visit(&join(path, k), f);
        self.to_v.visit(&join(path, v), f);
        self.to_out.visit(&join(path, o), f);
    }
}

/// Loading helpers shared by the model files.
pub mod load {
    use super::{Conv2d, GroupNorm, LayerNorm, Linear};
    use crate::model::weights::Weights;
    use candle_core::Result;

    pub fn linear(w: &Weights, i: usize, o: usize, bias: bool) -> Result<Linear> {
        let b = if bias { Some(w.get(o, "bias")?) } else { None };
        Ok(Linear::new(w.get((o, i), "weight")?, b))
    }

    pub fn conv(w: &Weights, i: usize, o: usize, k: usize, stride: usize, pad: usize) -> Result<Conv2d> {
        Ok(Conv2d::new(w.get((o, i, k, k), "weight")?, Some(w.get(o, "bias")?), stride, pad))
    }

    pub fn group_norm(w: &Weights, groups: usize, c: usize, eps: f64) -> Result<GroupNorm> {
        Ok(GroupNorm { num_groups: groups, eps, weight: w.get(c, "weight")?, bias: w.get(c, "bias")? })
    }

    pub fn layer_norm(w: &Weights, c: usize, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm { eps, weight: w.get(c, "weight")?, bias: Some(w.get(c, "bias")?) })
    }
}
