//! AutoencoderKL: images ⇄ latents, built from the same layers as the U-Net. LoRA training only
//! runs it forward (latents are cached first); the demo's base model trains it from scratch,
//! so its one forward can also keep what the backward needs.
use super::blocks::{ResnetBlock2D, ResnetSaved, Upsample2D};
use super::config::VaeConfig;
use super::layers::load::{conv, group_norm, linear};
use super::layers::{
    Attention, AttentionSaved, Conv2d, Conv2dSaved, Grads, GroupNorm, NormSaved, DIFFUSERS_NAMES,
};
use super::weights::Weights;
use candle_core::{Result, Tensor};

const EPS: f64 = 1e-6;

/// UNetMidBlock2D without time embedding: resnet, single-head spatial attention, resnet.
pub struct VaeMid {
    pub resnets: Vec<ResnetBlock2D>,
    pub attn_norm: GroupNorm,
    pub attn: Attention,
}

pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<(Vec<ResnetBlock2D>, Option<Conv2d>)>,
    pub mid_block: VaeMid,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMid,
    pub up_blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    pub decoder: Decoder,
}

impl VaeMid {
    fn load(w: &Weights, c: usize, groups: usize) -> Result<Self> {
        let a = w.pp("attentions.0");
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::load(&w.pp("resnets.0"), c, c, None, groups, EPS)?,
                ResnetBlock2D::load(&w.pp("resnets.1"), c, c, None, groups, EPS)?,
            ],
            attn_norm: group_norm(&a.pp("group_norm"), groups, c, EPS)?,
            attn: Attention {
                to_q: linear(&a.pp("to_q"), c, c, true)?,
                to_k: linear(&a.pp("to_k"), c, c, true)?,
                to_v: linear(&a.pp("to_v"), c, c, true)?,
                to_out: linear(&a.pp("to_out.0"), c, c, true)?,
                heads: 1,
                causal: false,
                names: DIFFUSERS_NAMES,
            },
        })
    }
}

/// What `VaeMid`'s backward needs.
pub struct MidSaved {
    r0: ResnetSaved,
    norm: NormSaved,
    attn: AttentionSaved,
    r1: ResnetSaved,
    shape: (usize, usize, usize, usize),
}

type BlockSaved = (Vec<ResnetSaved>, Option<(Conv2dSaved, (usize, usize))>);

/// What the encoder's backward needs.
pub struct EncoderSaved {
    conv_in: Conv2dSaved,
    blocks: Vec<BlockSaved>,
    mid: MidSaved,
    norm_out: NormSaved,
    conv_out: Conv2dSaved,
    quant: Option<Conv2dSaved>,
}

/// What the decoder's backward needs.
pub struct DecoderSaved {
    post_quant: Option<Conv2dSaved>,
    conv_in: Conv2dSaved,
    mid: MidSaved,
    blocks: Vec<(Vec<ResnetSaved>, Option<Conv2dSaved>)>,
    norm_out: NormSaved,
    conv_out: Conv2dSaved,
}

impl VaeMid {
    /// resnet, attention over all positions, resnet; `keep` as for `AutoencoderKL::encode_run`.
    fn run(&self, x: &Tensor, keep: bool) -> Result<(Tensor, Option<MidSaved>)> {
        let (h, r0) = self.resnets[0].forward_train(x, None)?;
        let r0 = keep.then_some(r0);
        let shape = h.dims4()?;
        let (b, c, hh, ww) = shape;
        let (t, norm) = self.attn_norm.forward_train(&h, false)?;
        let norm = keep.then_some(norm);
        let (t, attn) =
            self.attn.forward_train(&t.reshape((b, c, hh * ww))?.transpose(1, 2)?.contiguous()?, None)?;
        let attn = keep.then_some(attn);
        let t = t.transpose(1, 2)?.reshape((b, c, hh, ww))?;
        let (y, r1) = self.resnets[1].forward_train(&(t + h)?, None)?;
        let saved = match (r0, norm, attn) {
            (Some(r0), Some(norm), Some(attn)) => Some(MidSaved { r0, norm, attn, r1, shape }),
            _ => None,
        };
        Ok((y, saved))
    }

    fn backward(&self, s: MidSaved, dy: &Tensor, g: &mut Grads) -> Result<Tensor> {
        let (b, c, hh, ww) = s.shape;
        let d = self.resnets[1].backward(s.r1, dy, g)?.0;
        let dt = d.reshape((b, c, hh * ww))?.transpose(1, 2)?.contiguous()?;
        let (dt, _) = self.attn.backward(s.attn, &dt, g)?;
        let dt = dt.transpose(1, 2)?.reshape((b, c, hh, ww))?;
        let dh = (self.attn_norm.backward(s.norm, &dt, g)? + d)?;
        Ok(self.resnets[0].backward(s.r0, &dh, g)?.0)
    }
}

/// Resnets in a row; their saved states only if `keep`.
fn resnets_forward(rs: &[ResnetBlock2D], mut h: Tensor, keep: bool) -> Result<(Tensor, Vec<ResnetSaved>)> {
    let mut saved = vec![];
    for r in rs {
        let (y, s) = r.forward_train(&h, None)?;
        h = y;
        if keep {
            saved.push(s);
        }
    }
    Ok((h, saved))
}

fn resnets_backward(
    rs: &[ResnetBlock2D],
    saved: Vec<ResnetSaved>,
    mut d: Tensor,
    g: &mut Grads,
) -> Result<Tensor> {
    for (r, s) in rs.iter().zip(saved).rev() {
        d = r.backward(s, &d, g)?.0;
    }
    Ok(d)
}

fn resnets(w: &Weights, n: usize, cin: usize, cout: usize, groups: usize) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|j| {
            ResnetBlock2D::load(
                &w.pp(format!("resnets.{j}")),
                if j == 0 { cin } else { cout },
                cout,
                None,
                groups,
                EPS,
            )
        })
        .collect()
}

impl AutoencoderKL {
    pub fn load(config: &VaeConfig, w: &Weights) -> Result<Self> {
        let c = config;
        let (boc, g, lat) = (&c.block_out_channels, c.norm_num_groups, c.latent_channels);
        let n = boc.len();
        let we = w.pp("encoder");
        let mut down_blocks = vec![];
        let mut prev = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let wb = we.pp(format!("down_blocks.{i}"));
            let down =
                (i + 1 < n).then(|| conv(&wb.pp("downsamplers.0.conv"), out, out, 3, 2, 0)).transpose()?;
            down_blocks.push((resnets(&wb, c.layers_per_block, prev, out, g)?, down));
            prev = out;
        }
        let encoder = Encoder {
            conv_in: conv(&we.pp("conv_in"), c.in_channels, boc[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMid::load(&we.pp("mid_block"), boc[n - 1], g)?,
            conv_norm_out: group_norm(&we.pp("conv_norm_out"), g, boc[n - 1], EPS)?,
            conv_out: conv(&we.pp("conv_out"), boc[n - 1], 2 * lat, 3, 1, 1)?,
        };
        let wd = w.pp("decoder");
        let mut up_blocks = vec![];
        let mut prev = boc[n - 1];
        for i in 0..n {
            let out = boc[n - 1 - i];
            let wb = wd.pp(format!("up_blocks.{i}"));
            let up = (i + 1 < n)
                .then(|| conv(&wb.pp("upsamplers.0.conv"), out, out, 3, 1, 1).map(|conv| Upsample2D { conv }))
                .transpose()?;
            up_blocks.push((resnets(&wb, c.layers_per_block + 1, prev, out, g)?, up));
            prev = out;
        }
        let decoder = Decoder {
            conv_in: conv(&wd.pp("conv_in"), lat, boc[n - 1], 3, 1, 1)?,
            mid_block: VaeMid::load(&wd.pp("mid_block"), boc[n - 1], g)?,
            up_blocks,
            conv_norm_out: group_norm(&wd.pp("conv_norm_out"), g, boc[0], EPS)?,
            conv_out: conv(&wd.pp("conv_out"), boc[0], c.out_channels, 3, 1, 1)?,
        };
        // Some VAEs (e.g. SD3-style) drop the quant convs; SD's have them.
        let quant_conv = w
            .contains("quant_conv.weight")
            .then(|| conv(&w.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0))
            .transpose()?;
        let post_quant_conv = w
            .contains("post_quant_conv.weight")
            .then(|| conv(&w.pp("post_quant_conv"), lat, lat, 1, 1, 0))
            .transpose()?;
        Ok(Self { config: config.clone(), encoder, quant_conv, post_quant_conv, decoder })
    }

    /// Image in [-1, 1], [B, 3, H, W] → Gaussian moments [B, 2·latent, H/8, W/8] (mean, logvar).
    pub fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.encode_run(x, false)?.0)
    }

    /// The latent distribution's mean (unscaled).
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        self.encode_moments(x)?.narrow(1, 0, self.config.latent_channels)
    }

    /// Unscaled latents → image in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.decode_run(z, false)?.0)
    }

    /// Image → moments, keeping what the backward needs.
    pub fn encode_train(&self, x: &Tensor) -> Result<(Tensor, EncoderSaved)> {
        let (y, saved) = self.encode_run(x, true)?;
        Ok((y, saved.expect("kept")))
    }

    /// Latents → image, keeping what the backward needs.
    pub fn decode_train(&self, z: &Tensor) -> Result<(Tensor, DecoderSaved)> {
        let (y, saved) = self.decode_run(z, true)?;
        Ok((y, saved.expect("kept")))
    }

    /// The encoder's forward. `keep`: return what the backward needs; without it every layer's
    /// saved state is dropped as soon as the layer is done, so inference holds one layer's.
    fn encode_run(&self, x: &Tensor, keep: bool) -> Result<(Tensor, Option<EncoderSaved>)> {
        let e = &self.encoder;
        let (mut h, conv_in) = e.conv_in.forward_train(&x.to_dtype(e.conv_in.weight.dtype())?)?;
        let mut blocks = vec![];
        for (rs, down) in &e.down_blocks {
            let (y, saved) = resnets_forward(rs, h, keep)?;
            h = y;
            let mut ds = None;
            if let Some(d) = down {
                // diffusers pads right/bottom by one, then convolves without padding
                let (_, _, hh, ww) = h.dims4()?;
                let (y, s) = d.forward_train(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
                h = y;
                ds = Some((s, (hh, ww)));
            }
            if keep {
                blocks.push((saved, ds));
            }
        }
        let (h, mid) = e.mid_block.run(&h, keep)?;
        let (h, norm_out) = e.conv_norm_out.forward_train(&h, true)?;
        let norm_out = keep.then_some(norm_out);
        let (mut h, conv_out) = e.conv_out.forward_train(&h)?;
        let mut quant = None;
        if let Some(q) = &self.quant_conv {
            let (y, s) = q.forward_train(&h)?;
            h = y;
            quant = Some(s);
        }
        let saved = match (keep, mid, norm_out) {
            (true, Some(mid), Some(norm_out)) => {
                Some(EncoderSaved { conv_in, blocks, mid, norm_out, conv_out, quant })
            }
            _ => None,
        };
        Ok((h, saved))
    }

    /// The decoder's forward; `keep` as for `encode_run`.
    fn decode_run(&self, z: &Tensor, keep: bool) -> Result<(Tensor, Option<DecoderSaved>)> {
        let dd = &self.decoder;
        let mut z = z.to_dtype(dd.conv_in.weight.dtype())?;
        let mut post_quant = None;
        if let Some(p) = &self.post_quant_conv {
            let (y, s) = p.forward_train(&z)?;
            z = y;
            post_quant = Some(s);
        }
        let (h, conv_in) = dd.conv_in.forward_train(&z)?;
        let (mut h, mid) = dd.mid_block.run(&h, keep)?;
        let mut blocks = vec![];
        for (rs, up) in &dd.up_blocks {
            let (y, saved) = resnets_forward(rs, h, keep)?;
            h = y;
            let mut us = None;
            if let Some(u) = up {
                let (y, s) = u.forward_train(&h)?;
                h = y;
                us = Some(s);
            }
            if keep {
                blocks.push((saved, us));
            }
        }
        let (h, norm_out) = dd.conv_norm_out.forward_train(&h, true)?;
        let norm_out = keep.then_some(norm_out);
        let (y, conv_out) = dd.conv_out.forward_train(&h)?;
        let saved = match (keep, mid, norm_out) {
            (true, Some(mid), Some(norm_out)) => {
                Some(DecoderSaved { post_quant, conv_in, mid, blocks, norm_out, conv_out })
            }
            _ => None,
        };
        Ok((y, saved))
    }

    pub fn encode_backward(&self, s: EncoderSaved, dy: &Tensor, g: &mut Grads) -> Result<Tensor> {
        let e = &self.encoder;
        let mut d = dy.clone();
        if let (Some(q), Some(qs)) = (&self.quant_conv, s.quant) {
            d = q.backward(qs, &d, g)?;
        }
        d = e.conv_out.backward(s.conv_out, &d, g)?;
        d = e.conv_norm_out.backward(s.norm_out, &d, g)?;
        d = e.mid_block.backward(s.mid, &d, g)?;
        for ((rs, down), (saved, ds)) in e.down_blocks.iter().zip(s.blocks).rev() {
            if let (Some(dc), Some((cs, (hh, ww)))) = (down, ds) {
                d = dc.backward(cs, &d, g)?.narrow(2, 0, hh)?.narrow(3, 0, ww)?;
            }
            d = resnets_backward(rs, saved, d, g)?;
        }
        e.conv_in.backward(s.conv_in, &d, g)
    }

    pub fn decode_backward(&self, s: DecoderSaved, dy: &Tensor, g: &mut Grads) -> Result<Tensor> {
        let dd = &self.decoder;
        let mut d = dd.conv_out.backward(s.conv_out, dy, g)?;
        d = dd.conv_norm_out.backward(s.norm_out, &d, g)?;
        for ((rs, up), (saved, us)) in dd.up_blocks.iter().zip(s.blocks).rev() {
            if let (Some(u), Some(us)) = (up, us) {
                d = u.backward(us, &d, g)?;
            }
            d = resnets_backward(rs, saved, d, g)?;
        }
        d = dd.mid_block.backward(s.mid, &d, g)?;
        d = dd.conv_in.backward(s.conv_in, &d, g)?;
        if let (Some(p), Some(ps)) = (&self.post_quant_conv, s.post_quant) {
            d = p.backward(ps, &d, g)?;
        }
        Ok(d)
    }
}
