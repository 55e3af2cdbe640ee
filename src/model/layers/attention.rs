//! Multi-head attention (self or cross, optionally causal), diffusers' `Attention` and CLIP's
//! `CLIPAttention` alike. On the CPU in f32/f64 the core runs blocked (`flash`: no L×S matrix);
//! elsewhere scores and softmax are computed in f32 and the probability matrix is kept for the
//! backward.
use super::flash;
use super::linear::{Linear, LinearSaved};
use super::Grads;
use super::{acc, softmax_last};
use candle_core::{DType, Result, Tensor, D};

pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub causal: bool,
    /// Module names of (q, k, v, out) in the checkpoint, for LoRA naming.
    pub names: [&'static str; 4],
}

pub const DIFFUSERS_NAMES: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
pub const CLIP_NAMES: [&str; 4] = ["q_proj", "k_proj", "v_proj", "out_proj"];

pub struct AttentionSaved {
    lin: [LinearSaved; 4],
    core: Core,
    cross: bool,
}

/// What the core's backward needs.
enum Core {
    /// Head-split q, k, v and the probabilities.
    Materialised { q: Tensor, k: Tensor, v: Tensor, p: Tensor },
    /// q, k, v as the projections gave them, the head-major output and its log-sum-exp.
    Blocked { q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor },
}

/// Whether the blocked CPU kernel runs this attention.
fn blocked(q: &Tensor) -> bool {
    q.device().is_cpu() && matches!(q.dtype(), DType::F32 | DType::F64)
}

/// [B, L, H·D] → [B, H, L, D]
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    x.reshape((b, l, heads, c / heads))?.transpose(1, 2)?.contiguous()
}

/// [B, H, L, D] → [B, L, H·D]
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * d))
}

fn causal_mask(l: usize, s: usize, x: &Tensor) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..l).flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (l, s), x.device())?.to_dtype(x.dtype())
}

impl Attention {
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward_train(x, context)?.0)
    }

    /// x [B, L, C]; context [B, S, C_ctx] for cross-attention.
    pub fn forward_train(&self, x: &Tensor, context: Option<&Tensor>) -> Result<(Tensor, AttentionSaved)> {
        let ctx = context.unwrap_or(x);
        let (q, sq) = self.to_q.forward_train(x)?;
        let (k, sk) = self.to_k.forward_train(ctx)?;
        let (v, sv) = self.to_v.forward_train(ctx)?;
        let (o, core) = if blocked(&q) {
            let (o, lse) = match q.dtype() {
                DType::F32 => flash::forward::<f32>(&q, &k, &v, self.heads, self.causal, flash::BLOCKS)?,
                _ => flash::forward::<f64>(&q, &k, &v, self.heads, self.causal, flash::BLOCKS)?,
            };
            (merge_heads(&o)?, Core::Blocked { q, k, v, o, lse })
        } else {
            self.materialised(q, k, v)?
        };
        let (y, so) = self.to_out.forward_train(&o)?;
        let saved = AttentionSaved { lin: [sq, sk, sv, so], core, cross: context.is_some() };
        Ok((y, saved))
    }

    /// softmax(scale · q kᵀ) v with the probabilities kept, q, k, v [B, L, H·D].
    fn materialised(&self, q: Tensor, k: Tensor, v: Tensor) -> Result<(Tensor, Core)> {
        let (q, k, v) =
            (split_heads(&q, self.heads)?, split_heads(&k, self.heads)?, split_heads(&v, self.heads)?);
        let scale = (q.dim(D::Minus1)? as f64).powf(-0.5);
        // scores in f32 even for bf16/f16 activations (as flash attention accumulates): rounding
        // logits of size ~10 to bf16 moves the probabilities by several percent
        let f = acc(q.dtype());
        let mut scores = (q.to_dtype(f)?.matmul(&k.to_dtype(f)?.t()?)? * scale)?;
        if self.causal {
            let (l, s) = (scores.dim(2)?, scores.dim(3)?);
            scores = scores.broadcast_add(&causal_mask(l, s, &scores)?)?;
        }
        // p stays in f32: the softmax backward's (dp − Σ dp·p) cancels, and f16 p costs 1 % there
        let p = softmax_last(&scores)?;
        let o = merge_heads(&p.to_dtype(q.dtype())?.matmul(&v)?)?;
        Ok((o, Core::Materialised { q, k, v, p }))
    }

    /// Returns (dx, dcontext); dcontext is `Some` for cross-attention.
    pub fn backward(
        &self,
        s: AttentionSaved,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let [sq, sk, sv, so] = s.lin;
        let dout = self.to_out.backward(so, dy, grads)?;
        let (dq, dk, dv) = match s.core {
            Core::Blocked { q, k, v, o, lse } => {
                let (h, c) = (self.heads, self.causal);
                let (dq, dk, dv) = match q.dtype() {
                    DType::F32 => flash::backward::<f32>(&q, &k, &v, &o, &lse, &dout, h, c, flash::BLOCKS)?,
                    _ => flash::backward::<f64>(&q, &k, &v, &o, &lse, &dout, h, c, flash::BLOCKS)?,
                };
                (merge_heads(&dq)?, merge_heads(&dk)?, merge_heads(&dv)?)
            }
            Core::Materialised { q, k, v, p } => {
                let dout = split_heads(&dout, self.heads)?;
                let scale = (q.dim(D::Minus1)? as f64).powf(-0.5);
                // o = p v, p = softmax(scale · q kᵀ)
                let dp = dout.matmul(&v.t()?)?;
                let dv = p.to_dtype(dout.dtype())?.t()?.matmul(&dout)?;
                let f = acc(p.dtype());
                let (pf, dpf) = (p.to_dtype(f)?, dp.to_dtype(f)?);
                let ds = (&pf * dpf.broadcast_sub(&(&dpf * &pf)?.sum_keepdim(D::Minus1)?)?)?;
                let ds = (ds * scale)?.to_dtype(q.dtype())?;
                (merge_heads(&ds.matmul(&k)?)?, merge_heads(&ds.t()?.matmul(&q)?)?, merge_heads(&dv)?)
            }
        };
        let dx = self.to_q.backward(sq, &dq, grads)?;
        let dctx = (self.to_k.backward(sk, &dk, grads)? + self.to_v.backward(sv, &dv, grads)?)?;
        if s.cross {
            Ok((dx, Some(dctx)))
        } else {
            Ok(((dx + dctx)?, None))
        }
    }
}
