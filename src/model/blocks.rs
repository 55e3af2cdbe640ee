//! The building blocks shared by the U-Net and the VAE: ResnetBlock2D, Transformer2DModel with
//! its BasicTransformerBlocks, and the resamplers. Each backward mirrors its forward bottom-up.
use super::layers::load::{conv, group_norm, layer_norm, linear};
use super::layers::{
    geglu, join, upsample_nearest2x, upsample_nearest2x_backward, Attention, AttentionSaved, Conv2d,
    Conv2dSaved, GroupNorm, LayerMut, LayerNorm, Linear, LinearSaved, NormSaved, Visit, DIFFUSERS_NAMES,
};
use super::weights::Weights;
use crate::model::layers::Grads;
use candle_core::{Result, Tensor};

// ---------------------------------------------------------------------------------------------
// ResnetBlock2D

pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

pub struct ResnetSaved {
    norm1: NormSaved,
    conv1: Conv2dSaved,
    temb: Option<LinearSaved>,
    norm2: NormSaved,
    conv2: Conv2dSaved,
    shortcut: Option<Conv2dSaved>,
}

impl ResnetBlock2D {
    pub fn load(
        w: &Weights,
        cin: usize,
        cout: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(&w.pp("norm1"), groups, cin, eps)?,
            conv1: conv(&w.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: temb.map(|t| linear(&w.pp("time_emb_proj"), t, cout, true)).transpose()?,
            norm2: group_norm(&w.pp("norm2"), groups, cout, eps)?,
            conv2: conv(&w.pp("conv2"), cout, cout, 3, 1, 1)?,
            conv_shortcut: (cin != cout)
                .then(|| conv(&w.pp("conv_shortcut"), cin, cout, 1, 1, 0))
                .transpose()?,
        })
    }

    /// `temb` is silu(time embedding) [B, T], shared by all blocks.
    pub fn forward_train(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<(Tensor, ResnetSaved)> {
        let (h, norm1) = self.norm1.forward_train(x, true)?;
        let (mut h, conv1) = self.conv1.forward_train(&h)?;
        let mut temb_saved = None;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let (t, s) = proj.forward_train(t)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
            temb_saved = Some(s);
        }
        let (h, norm2) = self.norm2.forward_train(&h, true)?;
        let (h, conv2) = self.conv2.forward_train(&h)?;
        let (sc, shortcut) = match &self.conv_shortcut {
            Some(c) => {
                let (y, s) = c.forward_train(x)?;
                (y, Some(s))
            }
            None => (x.clone(), None),
        };
        let saved = ResnetSaved { norm1, conv1, temb: temb_saved, norm2, conv2, shortcut };
        Ok(((sc + h)?, saved))
    }

    /// Returns (dx, d temb) where d temb is the gradient w.r.t. silu(time embedding).
    pub fn backward(&self, s: ResnetSaved, dy: &Tensor, g: &mut Grads) -> Result<(Tensor, Option<Tensor>)> {
        let dsc = match (&self.conv_shortcut, s.shortcut) {
            (Some(c), Some(cs)) => c.backward(cs, dy, g)?,
            _ => dy.clone(),
        };
        let dh = self.conv2.backward(s.conv2, dy, g)?;
        let dh = self.norm2.backward(s.norm2, &dh, g)?;
        let mut dtemb = None;
        if let (Some(proj), Some(ts)) = (&self.time_emb_proj, s.temb) {
            dtemb = Some(proj.backward(ts, &dh.sum((2, 3))?, g)?);
        }
        let dh = self.conv1.backward(s.conv1, &dh, g)?;
        let dx = self.norm1.backward(s.norm1, &dh, g)?;
        Ok(((dx + dsc)?, dtemb))
    }
}

impl Visit for ResnetBlock2D {
    fn visit(&mut self, p: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        self.conv1.visit(&join(p, "conv1"), f);
        self.time_emb_proj.visit(&join(p, "time_emb_proj"), f);
        self.conv2.visit(&join(p, "conv2"), f);
        self.conv_shortcut.visit(&join(p, "conv_shortcut"), f);
    }
}

// ---------------------------------------------------------------------------------------------
// BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward, each pre-norm.

pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    /// ff.net.0.proj: dim → 2·inner (hidden, gate).
    pub ff_proj: Linear,
    /// ff.net.2: inner → dim.
    pub ff_out: Linear,
}

pub struct TransformerBlockSaved {
    n1: NormSaved,
    a1: AttentionSaved,
    n2: NormSaved,
    a2: AttentionSaved,
    n3: NormSaved,
    proj: LinearSaved,
    /// The projection's output, GEGLU's input.
    geglu_in: Tensor,
    out: LinearSaved,
}

fn attention(w: &Weights, dim: usize, ctx: usize, heads: usize, bias: bool) -> Result<Attention> {
    Ok(Attention {
        to_q: linear(&w.pp("to_q"), dim, dim, bias)?,
        to_k: linear(&w.pp("to_k"), ctx, dim, bias)?,
        to_v: linear(&w.pp("to_v"), ctx, dim, bias)?,
        to_out: linear(&w.pp("to_out.0"), dim, dim, true)?,
        heads,
        causal: false,
        names: DIFFUSERS_NAMES,
    })
}

impl BasicTransformerBlock {
    pub fn load(w: &Weights, dim: usize, ctx: usize, heads: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: layer_norm(&w.pp("norm1"), dim, 1e-5)?,
            attn1: attention(&w.pp("attn1"), dim, dim, heads, false)?,
            norm2: layer_norm(&w.pp("norm2"), dim, 1e-5)?,
            attn2: attention(&w.pp("attn2"), dim, ctx, heads, false)?,
            norm3: layer_norm(&w.pp("norm3"), dim, 1e-5)?,
            ff_proj: linear(&w.pp("ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: linear(&w.pp("ff.net.2"), inner, dim, true)?,
        })
    }

    pub fn forward_train(&self, x: &Tensor, ctx: &Tensor) -> Result<(Tensor, TransformerBlockSaved)> {
        let (h, n1) = self.norm1.forward_train(x)?;
        let (h, a1) = self.attn1.forward_train(&h, None)?;
        let x = (x + h)?;
        let (h, n2) = self.norm2.forward_train(&x)?;
        let (h, a2) = self.attn2.forward_train(&h, Some(ctx))?;
        let x = (x + h)?;
        let (h, n3) = self.norm3.forward_train(&x)?;
        let (h, proj) = self.ff_proj.forward_train(&h)?;
        let (ff, out) = self.ff_out.forward_train(&geglu::forward(&h)?)?;
        let saved = TransformerBlockSaved { n1, a1, n2, a2, n3, proj, geglu_in: h, out };
        let h = ff;
        Ok(((x + h)?, saved))
    }

    /// Returns (dx, d context).
    pub fn backward(&self, s: TransformerBlockSaved, dy: &Tensor, g: &mut Grads) -> Result<(Tensor, Tensor)> {
        let dh = self.ff_out.backward(s.out, dy, g)?;
        let dh = self.ff_proj.backward(s.proj, &geglu::backward(&s.geglu_in, &dh)?, g)?;
        let dx = (dy + self.norm3.backward(s.n3, &dh, g)?)?;
        let (dh, dctx) = self.attn2.backward(s.a2, &dx, g)?;
        let dx = (&dx + self.norm2.backward(s.n2, &dh, g)?)?;
        let (dh, _) = self.attn1.backward(s.a1, &dx, g)?;
        let dx = (&dx + self.norm1.backward(s.n1, &dh, g)?)?;
        Ok((dx, dctx.expect("cross-attention returns a context gradient")))
    }
}

impl Visit for BasicTransformerBlock {
    fn visit(&mut self, p: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        self.attn1.visit(&join(p, "attn1"), f);
        self.attn2.visit(&join(p, "attn2"), f);
        self.ff_proj.visit(&join(p, "ff.net.0.proj"), f);
        self.ff_out.visit(&join(p, "ff.net.2"), f);
    }
}

// ---------------------------------------------------------------------------------------------
// Transformer2DModel: GroupNorm, proj_in (1×1 conv for SD1, Linear for SD2/SDXL), blocks,
// proj_out, residual.

pub enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

enum ProjSaved {
    Conv(Conv2dSaved),
    Linear(LinearSaved),
}

pub struct Transformer2D {
    pub norm: GroupNorm,
    pub proj_in: Proj,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Proj,
}

pub struct Transformer2DSaved {
    norm: NormSaved,
    proj_in: ProjSaved,
    blocks: Vec<TransformerBlockSaved>,
    proj_out: ProjSaved,
    hw: (usize, usize),
}

/// [B, C, H, W] ↔ [B, H·W, C]
fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
}

fn to_image(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &Weights,
        channels: usize,
        ctx: usize,
        heads: usize,
        layers: usize,
        groups: usize,
        linear_proj: bool,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if linear_proj {
                Proj::Linear(linear(&w.pp(name), channels, channels, true)?)
            } else {
                Proj::Conv(conv(&w.pp(name), channels, channels, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: group_norm(&w.pp("norm"), groups, channels, 1e-6)?,
            proj_in: proj("proj_in")?,
            transformer_blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &w.pp(format!("transformer_blocks.{i}")),
                        channels,
                        ctx,
                        heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn forward_train(&self, x: &Tensor, ctx: &Tensor) -> Result<(Tensor, Transformer2DSaved)> {
        let (_, _, hh, ww) = x.dims4()?;
        let (h, norm) = self.norm.forward_train(x, false)?;
        let (mut h, proj_in) = match &self.proj_in {
            Proj::Conv(c) => {
                let (y, s) = c.forward_train(&h)?;
                (to_tokens(&y)?, ProjSaved::Conv(s))
            }
            Proj::Linear(l) => {
                let (y, s) = l.forward_train(&to_tokens(&h)?)?;
                (y, ProjSaved::Linear(s))
            }
        };
        let mut blocks = Vec::with_capacity(self.transformer_blocks.len());
        for b in &self.transformer_blocks {
            let (y, s) = b.forward_train(&h, ctx)?;
            h = y;
            blocks.push(s);
        }
        let (h, proj_out) = match &self.proj_out {
            Proj::Conv(c) => {
                let (y, s) = c.forward_train(&to_image(&h, hh, ww)?)?;
                (y, ProjSaved::Conv(s))
            }
            Proj::Linear(l) => {
                let (y, s) = l.forward_train(&h)?;
                (to_image(&y, hh, ww)?, ProjSaved::Linear(s))
            }
        };
        let saved = Transformer2DSaved { norm, proj_in, blocks, proj_out, hw: (hh, ww) };
        Ok(((h + x)?, saved))
    }

    pub fn backward(&self, s: Transformer2DSaved, dy: &Tensor, g: &mut Grads) -> Result<(Tensor, Tensor)> {
        let (hh, ww) = s.hw;
        let mut dh = match (&self.proj_out, s.proj_out) {
            (Proj::Conv(c), ProjSaved::Conv(cs)) => to_tokens(&c.backward(cs, dy, g)?)?,
            (Proj::Linear(l), ProjSaved::Linear(ls)) => l.backward(ls, &to_tokens(dy)?, g)?,
            _ => unreachable!("saved projection kind matches the layer"),
        };
        let mut dctx: Option<Tensor> = None;
        for (b, bs) in self.transformer_blocks.iter().zip(s.blocks).rev() {
            let (dx, dc) = b.backward(bs, &dh, g)?;
            dh = dx;
            dctx = Some(match dctx {
                None => dc,
                Some(acc) => (acc + dc)?,
            });
        }
        let dh = match (&self.proj_in, s.proj_in) {
            (Proj::Conv(c), ProjSaved::Conv(cs)) => c.backward(cs, &to_image(&dh, hh, ww)?, g)?,
            (Proj::Linear(l), ProjSaved::Linear(ls)) => to_image(&l.backward(ls, &dh, g)?, hh, ww)?,
            _ => unreachable!("saved projection kind matches the layer"),
        };
        let dx = (self.norm.backward(s.norm, &dh, g)? + dy)?;
        Ok((dx, dctx.expect("a Transformer2D has at least one block")))
    }
}

impl Visit for Proj {
    fn visit(&mut self, p: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        match self {
            Proj::Conv(c) => c.visit(p, f),
            Proj::Linear(l) => l.visit(p, f),
        }
    }
}

impl Visit for Transformer2D {
    fn visit(&mut self, p: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        self.proj_in.visit(&join(p, "proj_in"), f);
        self.transformer_blocks.visit(&join(p, "transformer_blocks"), f);
        self.proj_out.visit(&join(p, "proj_out"), f);
    }
}

// ---------------------------------------------------------------------------------------------
// Resamplers

/// Upsample2D: nearest 2× then a 3×3 conv.
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, Conv2dSaved)> {
        self.conv.forward_train(&upsample_nearest2x(x)?)
    }

    pub fn backward(&self, s: Conv2dSaved, dy: &Tensor, g: &mut Grads) -> Result<Tensor> {
        upsample_nearest2x_backward(&self.conv.backward(s, dy, g)?)
    }
}
