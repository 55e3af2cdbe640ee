//! UNet2DConditionModel (SD 1.x, SD 2.x, SDXL) with an explicit backward pass.
//!
//! Reads like diffusers' forward: time embedding (+ SDXL's text_time embedding), conv_in, down
//! blocks pushing skip connections, the mid block, up blocks popping them, conv_out. The
//! backward walks the same path in reverse and returns the gradients w.r.t. the inputs; adapter
//! gradients accumulate in `Grads`. With `gradient_checkpointing` each block keeps only
//! its inputs and re-runs its forward inside the backward.
use super::blocks::{ResnetBlock2D, ResnetSaved, Transformer2D, Transformer2DSaved, Upsample2D};
use super::config::UNetConfig;
use super::layers::load::{conv, group_norm, linear};
use super::layers::{
    join, silu_backward, Conv2d, Conv2dSaved, GroupNorm, LayerMut, Linear, LinearSaved, NormSaved, Visit,
};
use super::weights::Weights;
use crate::model::layers::Grads;
use candle_core::{DType, Result, Tensor};

pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
    pub downsampler: Option<Conv2d>,
}

pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
    pub upsampler: Option<Upsample2D>,
}

pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Transformer2D,
}

/// Linear → SiLU → Linear, as TimestepEmbedding.
pub struct Mlp {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_embedding: Mlp,
    pub add_embedding: Option<Mlp>,
    pub down_blocks: Vec<DownBlock>,
    /// None for configs with `"mid_block_type": null`.
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub gradient_checkpointing: bool,
}

/// Inputs of one U-Net call. SDXL also takes the pooled text embedding and the six
/// micro-conditioning numbers (original size, crop top-left, target size).
pub struct UNetInput<'a> {
    pub sample: &'a Tensor,
    /// [B], f32 timesteps.
    pub timestep: &'a Tensor,
    pub encoder_hidden_states: &'a Tensor,
    pub text_embeds: Option<&'a Tensor>,
    pub time_ids: Option<&'a Tensor>,
}

/// Gradients w.r.t. the U-Net's differentiable inputs.
pub struct UNetInputGrads {
    pub sample: Tensor,
    pub encoder_hidden_states: Tensor,
    pub text_embeds: Option<Tensor>,
}

/// Sinusoidal timestep features, as diffusers' `get_timestep_embedding`, computed with the same
/// f32 operations as PyTorch (f64 for an f64 model) so that large timesteps round alike.
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    dtype: DType,
) -> Result<Tensor> {
    let half = dim / 2;
    let exponent = (Tensor::arange(0u32, half as u32, t.device())?.to_dtype(dtype)? * -(10000f64.ln()))?;
    let freqs = (exponent / (half as f64 - shift))?.exp()?.unsqueeze(0)?;
    let args = t.to_dtype(dtype)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)
    } else {
        Tensor::cat(&[sin, cos], 1)
    }
}

pub struct MlpSaved {
    l1: LinearSaved,
    pre: Tensor,
    l2: LinearSaved,
}

impl Mlp {
    fn load(w: &Weights, i: usize, h: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(&w.pp("linear_1"), i, h, true)?,
            linear_2: linear(&w.pp("linear_2"), h, h, true)?,
        })
    }
    fn forward_train(&self, x: &Tensor) -> Result<(Tensor, MlpSaved)> {
        let (pre, l1) = self.linear_1.forward_train(x)?;
        let (y, l2) = self.linear_2.forward_train(&pre.silu()?)?;
        Ok((y, MlpSaved { l1, pre, l2 }))
    }
    fn backward(&self, s: MlpSaved, dy: &Tensor, g: &mut Grads) -> Result<Tensor> {
        let dh = self.linear_2.backward(s.l2, dy, g)?;
        self.linear_1.backward(s.l1, &silu_backward(&s.pre, &dh)?, g)
    }
}

/// Per block: everything its backward needs, or only its inputs when checkpointing.
enum Kept<S> {
    Full(S),
    Inputs(Tensor, Vec<Tensor>),
}

type LayerSaved = (ResnetSaved, Option<Transformer2DSaved>);

pub struct DownSaved {
    layers: Vec<LayerSaved>,
    down: Option<Conv2dSaved>,
}

pub struct UpSaved {
    layers: Vec<(LayerSaved, usize)>,
    up: Option<Conv2dSaved>,
}

/// Accumulates an optional sum of gradients.
fn add_opt(acc: &mut Option<Tensor>, g: Option<Tensor>) -> Result<()> {
    if let Some(g) = g {
        *acc = Some(match acc.take() {
            None => g,
            Some(a) => (a + g)?,
        });
    }
    Ok(())
}

/// Backward through resnet (+ attention): returns dx and accumulates d temb, d ctx.
fn layer_backward(
    r: &ResnetBlock2D,
    a: Option<&Transformer2D>,
    s: LayerSaved,
    dy: Tensor,
    dtemb: &mut Option<Tensor>,
    dctx: &mut Option<Tensor>,
    g: &mut Grads,
) -> Result<Tensor> {
    let (rs, as_) = s;
    let mut d = dy;
    if let (Some(a), Some(as_)) = (a, as_) {
        let (dx, dc) = a.backward(as_, &d, g)?;
        d = dx;
        add_opt(dctx, Some(dc))?;
    }
    let (dx, dt) = r.backward(rs, &d, g)?;
    add_opt(dtemb, dt)?;
    Ok(dx)
}

fn layer_forward(
    r: &ResnetBlock2D,
    a: Option<&Transformer2D>,
    x: &Tensor,
    temb: &Tensor,
    ctx: &Tensor,
) -> Result<(Tensor, LayerSaved)> {
    let (h, rs) = r.forward_train(x, Some(temb))?;
    match a {
        Some(a) => {
            let (h, s) = a.forward_train(&h, ctx)?;
            Ok((h, (rs, Some(s))))
        }
        None => Ok((h, (rs, None))),
    }
}

impl DownBlock {
    /// Returns (h, outputs pushed as skip connections, saved).
    fn forward_train(
        &self,
        x: &Tensor,
        temb: &Tensor,
        ctx: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>, DownSaved)> {
        let mut h = x.clone();
        let (mut skips, mut layers) = (vec![], vec![]);
        for (i, r) in self.resnets.iter().enumerate() {
            let (y, s) = layer_forward(r, self.attentions.get(i), &h, temb, ctx)?;
            h = y;
            skips.push(h.clone());
            layers.push(s);
        }
        let mut down = None;
        if let Some(c) = &self.downsampler {
            let (y, s) = c.forward_train(&h)?;
            h = y;
            skips.push(h.clone());
            down = Some(s);
        }
        Ok((h, skips, DownSaved { layers, down }))
    }

    /// `dskips[k]` is the total gradient of skip output k (the block's last output included).
    fn backward(
        &self,
        s: DownSaved,
        mut dskips: Vec<Tensor>,
        dtemb: &mut Option<Tensor>,
        dctx: &mut Option<Tensor>,
        g: &mut Grads,
    ) -> Result<Tensor> {
        let mut d: Option<Tensor> = None;
        if let (Some(c), Some(ds)) = (&self.downsampler, s.down) {
            let dy = dskips.pop().expect("one skip per output");
            d = Some(c.backward(ds, &dy, g)?);
        }
        for (i, ls) in s.layers.into_iter().enumerate().rev() {
            let mut dy = dskips.pop().expect("one skip per output");
            if let Some(dn) = d.take() {
                dy = (dy + dn)?;
            }
            d = Some(layer_backward(&self.resnets[i], self.attentions.get(i), ls, dy, dtemb, dctx, g)?);
        }
        Ok(d.expect("a block has at least one layer"))
    }
}

impl UpBlock {
    fn forward_train(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        ctx: &Tensor,
    ) -> Result<(Tensor, UpSaved)> {
        let mut h = x.clone();
        let mut layers = vec![];
        for (i, r) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("as many skips as up-block layers");
            let c = h.dim(1)?;
            let (y, s) = layer_forward(r, self.attentions.get(i), &Tensor::cat(&[&h, &skip], 1)?, temb, ctx)?;
            h = y;
            layers.push((s, c));
        }
        let mut up = None;
        if let Some(u) = &self.upsampler {
            let (y, s) = u.forward_train(&h)?;
            h = y;
            up = Some(s);
        }
        Ok((h, UpSaved { layers, up }))
    }

    /// Returns (dx, d skips in the order they were popped).
    fn backward(
        &self,
        s: UpSaved,
        dy: &Tensor,
        dtemb: &mut Option<Tensor>,
        dctx: &mut Option<Tensor>,
        g: &mut Grads,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut d = dy.clone();
        if let (Some(u), Some(us)) = (&self.upsampler, s.up) {
            d = u.backward(us, &d, g)?;
        }
        let mut dskips = vec![];
        for (i, (ls, c)) in s.layers.into_iter().enumerate().rev() {
            let dcat = layer_backward(&self.resnets[i], self.attentions.get(i), ls, d, dtemb, dctx, g)?;
            let total = dcat.dim(1)?;
            dskips.push(dcat.narrow(1, c, total - c)?);
            d = dcat.narrow(1, 0, c)?;
        }
        dskips.reverse();
        Ok((d, dskips))
    }
}

impl MidBlock {
    fn forward_train(&self, x: &Tensor, temb: &Tensor, ctx: &Tensor) -> Result<(Tensor, Vec<LayerSaved>)> {
        let (h, s0) = layer_forward(&self.resnets[0], Some(&self.attention), x, temb, ctx)?;
        let (h, s1) = layer_forward(&self.resnets[1], None, &h, temb, ctx)?;
        Ok((h, vec![s0, s1]))
    }

    fn backward(
        &self,
        mut s: Vec<LayerSaved>,
        dy: &Tensor,
        dtemb: &mut Option<Tensor>,
        dctx: &mut Option<Tensor>,
        g: &mut Grads,
    ) -> Result<Tensor> {
        let s1 = s.pop().expect("two layers");
        let s0 = s.pop().expect("two layers");
        let d = layer_backward(&self.resnets[1], None, s1, dy.clone(), dtemb, dctx, g)?;
        layer_backward(&self.resnets[0], Some(&self.attention), s0, d, dtemb, dctx, g)
    }
}

pub struct EmbSaved {
    emb: Tensor,
    time: MlpSaved,
    add: Option<(MlpSaved, usize)>,
}

pub struct UNetSaved {
    emb: EmbSaved,
    temb: Tensor,
    ctx: Tensor,
    conv_in: Conv2dSaved,
    down: Vec<(Kept<DownSaved>, usize)>,
    mid: Option<Kept<Vec<LayerSaved>>>,
    up: Vec<(Kept<UpSaved>, usize)>,
    norm_out: NormSaved,
    conv_out: Conv2dSaved,
}

impl UNet2DConditionModel {
    pub fn load(config: &UNetConfig, w: &Weights) -> Result<Self> {
        config.validate().map_err(|e| candle_core::Error::Msg(format!("{}: {e}", w.origin())))?;
        let c = config;
        let n = c.block_out_channels.len();
        let boc = &c.block_out_channels;
        let heads = c.heads().expand(n);
        let tlpb = c.transformer_layers_per_block.expand(n);
        let ted = boc[0] * 4;
        let (groups, eps, ctx) = (c.norm_num_groups, c.norm_eps, c.cross_attention_dim);
        let resnet = |w: &Weights, i, o| ResnetBlock2D::load(w, i, o, Some(ted), groups, eps);
        let attn =
            |w: &Weights, ch, h, l| Transformer2D::load(w, ch, ctx, h, l, groups, c.use_linear_projection);

        let mut down_blocks = vec![];
        let mut prev = boc[0];
        for (i, ty) in c.down_block_types.iter().enumerate() {
            let wb = w.pp(format!("down_blocks.{i}"));
            let out = boc[i];
            let cross = ty.starts_with("CrossAttn");
            let mut b = DownBlock { resnets: vec![], attentions: vec![], downsampler: None };
            for j in 0..c.layers_per_block {
                b.resnets.push(resnet(&wb.pp(format!("resnets.{j}")), if j == 0 { prev } else { out }, out)?);
                if cross {
                    b.attentions.push(attn(&wb.pp(format!("attentions.{j}")), out, heads[i], tlpb[i])?);
                }
            }
            if i + 1 < n {
                b.downsampler = Some(conv(&wb.pp("downsamplers.0.conv"), out, out, 3, 2, 1)?);
            }
            down_blocks.push(b);
            prev = out;
        }

        let last = boc[n - 1];
        let wm = w.pp("mid_block");
        let mid_block = match c.mid_block_type {
            Some(_) => Some(MidBlock {
                resnets: vec![
                    resnet(&wm.pp("resnets.0"), last, last)?,
                    resnet(&wm.pp("resnets.1"), last, last)?,
                ],
                attention: attn(&wm.pp("attentions.0"), last, heads[n - 1], tlpb[n - 1])?,
            }),
            None => None,
        };

        let mut up_blocks = vec![];
        let mut prev_out = boc[n - 1];
        for (i, ty) in c.up_block_types.iter().enumerate() {
            let wb = w.pp(format!("up_blocks.{i}"));
            let r = n - 1 - i;
            let (out, input) = (boc[r], boc[r.saturating_sub(1)]);
            let cross = ty.starts_with("CrossAttn");
            let mut b = UpBlock { resnets: vec![], attentions: vec![], upsampler: None };
            for j in 0..=c.layers_per_block {
                let skip = if j == c.layers_per_block { input } else { out };
                let res_in = if j == 0 { prev_out } else { out };
                b.resnets.push(resnet(&wb.pp(format!("resnets.{j}")), res_in + skip, out)?);
                if cross {
                    b.attentions.push(attn(&wb.pp(format!("attentions.{j}")), out, heads[r], tlpb[r])?);
                }
            }
            if i + 1 < n {
                b.upsampler =
                    Some(Upsample2D { conv: conv(&wb.pp("upsamplers.0.conv"), out, out, 3, 1, 1)? });
            }
            up_blocks.push(b);
            prev_out = out;
        }

        let add_embedding = match c.addition_embed_type.as_deref() {
            Some("text_time") => {
                let dim = c.projection_class_embeddings_input_dim.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{}: text_time U-Net without projection_class_embeddings_input_dim",
                        w.origin()
                    ))
                })?;
                Some(Mlp::load(&w.pp("add_embedding"), dim, ted)?)
            }
            _ => None,
        };
        Ok(Self {
            config: config.clone(),
            conv_in: conv(&w.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?,
            time_embedding: Mlp::load(&w.pp("time_embedding"), boc[0], ted)?,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&w.pp("conv_norm_out"), groups, boc[0], eps)?,
            conv_out: conv(&w.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
            gradient_checkpointing: false,
        })
    }

    fn embed(&self, inp: &UNetInput) -> Result<(Tensor, EmbSaved)> {
        let c = &self.config;
        let dt = self.conv_in.weight.dtype();
        let acc = super::layers::acc(dt);
        let t =
            timestep_embedding(inp.timestep, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, acc)?;
        let (mut emb, time) = self.time_embedding.forward_train(&t.to_dtype(dt)?)?;
        let mut add = None;
        if let Some(mlp) = &self.add_embedding {
            let missing = || candle_core::Error::Msg("SDXL U-Net needs text_embeds and time_ids".into());
            let text = inp.text_embeds.ok_or_else(missing)?;
            let ids = inp.time_ids.ok_or_else(missing)?;
            let b = ids.dim(0)?;
            let dim = c.addition_time_embed_dim.unwrap_or(256);
            let tid = timestep_embedding(&ids.flatten_all()?, dim, c.flip_sin_to_cos, c.freq_shift, acc)?
                .reshape((b, ()))?;
            let x = Tensor::cat(&[&text.to_dtype(dt)?, &tid.to_dtype(dt)?], 1)?;
            let (aug, s) = mlp.forward_train(&x)?;
            emb = (emb + aug)?;
            add = Some((s, text.dim(1)?));
        }
        Ok((emb.silu()?, EmbSaved { emb, time, add }))
    }

    /// Inference forward: the predicted noise (or v). Keeps nothing for a backward (each block's
    /// saved state is dropped as soon as the block is done), so memory stays that of one block.
    pub fn forward(&self, inp: &UNetInput) -> Result<Tensor> {
        Ok(self.run(inp, true)?.0)
    }

    pub fn forward_train(&self, inp: &UNetInput) -> Result<(Tensor, UNetSaved)> {
        self.run(inp, self.gradient_checkpointing)
    }

    /// `ck`: keep only each block's inputs (gradient checkpointing) instead of its saved state.
    fn run(&self, inp: &UNetInput, ck: bool) -> Result<(Tensor, UNetSaved)> {
        let (temb, emb) = self.embed(inp)?;
        let ctx = inp.encoder_hidden_states.to_dtype(temb.dtype())?;
        let (mut h, conv_in) = self.conv_in.forward_train(&inp.sample.to_dtype(temb.dtype())?)?;
        let mut skips = vec![h.clone()];
        let mut down = vec![];
        for b in &self.down_blocks {
            let input = h.clone();
            let (y, s, saved) = b.forward_train(&h, &temb, &ctx)?;
            let pos = skips.len();
            skips.extend(s);
            h = y;
            down.push((if ck { Kept::Inputs(input, vec![]) } else { Kept::Full(saved) }, pos));
        }
        let mut mid = None;
        if let Some(m) = &self.mid_block {
            let input = h.clone();
            let (y, saved) = m.forward_train(&h, &temb, &ctx)?;
            h = y;
            mid = Some(if ck { Kept::Inputs(input, vec![]) } else { Kept::Full(saved) });
        }
        let mut up = vec![];
        for b in &self.up_blocks {
            let pos = skips.len();
            let used = skips[pos - b.resnets.len()..].to_vec();
            let input = h.clone();
            let (y, saved) = b.forward_train(&h, &mut skips, &temb, &ctx)?;
            h = y;
            up.push((if ck { Kept::Inputs(input, used) } else { Kept::Full(saved) }, pos));
        }
        let (h, norm_out) = self.conv_norm_out.forward_train(&h, true)?;
        let (out, conv_out) = self.conv_out.forward_train(&h)?;
        let saved = UNetSaved { emb, temb, ctx, conv_in, down, mid, up, norm_out, conv_out };
        Ok((out, saved))
    }

    /// Backward from d output: returns the input gradients; adapter gradients go to `g`.
    pub fn backward(&self, s: UNetSaved, dout: &Tensor, g: &mut Grads) -> Result<UNetInputGrads> {
        let (temb, ctx) = (&s.temb, &s.ctx);
        let (mut dtemb, mut dctx) = (None, None);
        let d = self.conv_out.backward(s.conv_out, &dout.to_dtype(temb.dtype())?, g)?;
        let mut d = self.conv_norm_out.backward(s.norm_out, &d, g)?;
        let total_skips = s.up.first().map(|(_, p)| *p).unwrap_or(1);
        let mut dskips: Vec<Option<Tensor>> = vec![None; total_skips];
        for (b, (kept, pos)) in self.up_blocks.iter().zip(s.up).rev() {
            let saved = match kept {
                Kept::Full(x) => x,
                Kept::Inputs(x, mut used) => b.forward_train(&x, &mut used, temb, ctx)?.1,
            };
            let (dx, ds) = b.backward(saved, &d, &mut dtemb, &mut dctx, g)?;
            // popped from the end: the k-th popped skip sat at position pos-1-k
            for (k, dsk) in ds.into_iter().enumerate() {
                add_opt(&mut dskips[pos - 1 - k], Some(dsk))?;
            }
            d = dx;
        }
        if let (Some(m), Some(kept)) = (&self.mid_block, s.mid) {
            let saved = match kept {
                Kept::Full(x) => x,
                Kept::Inputs(x, _) => m.forward_train(&x, temb, ctx)?.1,
            };
            d = m.backward(saved, &d, &mut dtemb, &mut dctx, g)?;
        }
        for (b, (kept, pos)) in self.down_blocks.iter().zip(s.down).rev() {
            let saved = match kept {
                Kept::Full(x) => x,
                Kept::Inputs(x, _) => b.forward_train(&x, temb, ctx)?.2,
            };
            let n = b.resnets.len() + b.downsampler.is_some() as usize;
            let mut ds: Vec<Tensor> =
                dskips.drain(pos..pos + n).map(|t| t.expect("every skip is consumed")).collect();
            let last = ds.pop().expect("n ≥ 1");
            ds.push((last + &d)?);
            d = b.backward(saved, ds, &mut dtemb, &mut dctx, g)?;
        }
        let d0 = (d + dskips.pop().flatten().expect("conv_in output is skip 0"))?;
        let sample = self.conv_in.backward(s.conv_in, &d0, g)?;
        let text_embeds = self.embed_backward(s.emb, dtemb, g)?;
        let encoder_hidden_states = match dctx {
            Some(c) => c,
            None => ctx.zeros_like()?,
        };
        Ok(UNetInputGrads { sample, encoder_hidden_states, text_embeds })
    }

    fn embed_backward(&self, s: EmbSaved, dtemb: Option<Tensor>, g: &mut Grads) -> Result<Option<Tensor>> {
        let Some(dtemb) = dtemb else { return Ok(None) };
        let demb = silu_backward(&s.emb, &dtemb)?;
        self.time_embedding.backward(s.time, &demb, g)?;
        match (&self.add_embedding, s.add) {
            (Some(mlp), Some((ms, text_dim))) => {
                Ok(Some(mlp.backward(ms, &demb, g)?.narrow(1, 0, text_dim)?))
            }
            _ => Ok(None),
        }
    }
}

impl Visit for Mlp {
    fn visit(&mut self, p: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        self.linear_1.visit(&join(p, "linear_1"), f);
        self.linear_2.visit(&join(p, "linear_2"), f);
    }
}

impl Visit for UNet2DConditionModel {
    fn visit(&mut self, p: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        self.conv_in.visit(&join(p, "conv_in"), f);
        self.time_embedding.visit(&join(p, "time_embedding"), f);
        self.add_embedding.visit(&join(p, "add_embedding"), f);
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            let q = join(p, format!("down_blocks.{i}"));
            b.resnets.visit(&join(&q, "resnets"), f);
            b.attentions.visit(&join(&q, "attentions"), f);
            b.downsampler.visit(&join(&q, "downsamplers.0.conv"), f);
        }
        if let Some(m) = &mut self.mid_block {
            m.resnets.visit(&join(p, "mid_block.resnets"), f);
            m.attention.visit(&join(p, "mid_block.attentions.0"), f);
        }
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            let q = join(p, format!("up_blocks.{i}"));
            b.resnets.visit(&join(&q, "resnets"), f);
            b.attentions.visit(&join(&q, "attentions"), f);
            if let Some(u) = &mut b.upsampler {
                u.conv.visit(&join(&q, "upsamplers.0.conv"), f);
            }
        }
        self.conv_out.visit(&join(p, "conv_out"), f);
    }
}
