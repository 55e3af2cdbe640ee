//! AutoencoderKL: images ⇄ latents. Frozen and used forward-only (latents are cached before
//! training), but built from the same layers as the U-Net.
use super::blocks::{ResnetBlock2D, Upsample2D};
use super::config::VaeConfig;
use super::layers::load::{conv, group_norm, linear};
use super::layers::{Attention, Conv2d, GroupNorm, DIFFUSERS_NAMES};
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

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.resnets[0].forward(x, None)?.0;
        let (b, c, hh, ww) = h.dims4()?;
        let t = self.attn_norm.fwd(&h)?.reshape((b, c, hh * ww))?.transpose(1, 2)?;
        let t = self.attn.fwd(&t, None)?.transpose(1, 2)?.reshape((b, c, hh, ww))?;
        self.resnets[1].forward(&(t + h)?, None).map(|r| r.0)
    }
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

fn run(rs: &[ResnetBlock2D], mut h: Tensor) -> Result<Tensor> {
    for r in rs {
        h = r.forward(&h, None)?.0;
    }
    Ok(h)
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
        let e = &self.encoder;
        let mut h = e.conv_in.fwd(&x.to_dtype(e.conv_in.weight.dtype())?)?;
        for (rs, down) in &e.down_blocks {
            h = run(rs, h)?;
            if let Some(d) = down {
                // diffusers pads right/bottom by one, then convolves without padding
                h = d.fwd(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        h = e.mid_block.forward(&h)?;
        h = e.conv_out.fwd(&e.conv_norm_out.forward(&h, true)?.0)?;
        match &self.quant_conv {
            Some(q) => q.fwd(&h),
            None => Ok(h),
        }
    }

    /// The latent distribution's mean (unscaled).
    pub fn encode_mean(&self, x: &Tensor) -> Result<Tensor> {
        self.encode_moments(x)?.narrow(1, 0, self.config.latent_channels)
    }

    /// Unscaled latents → image in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let d = &self.decoder;
        let mut z = z.to_dtype(d.conv_in.weight.dtype())?;
        if let Some(p) = &self.post_quant_conv {
            z = p.fwd(&z)?;
        }
        let mut h = d.mid_block.forward(&d.conv_in.fwd(&z)?)?;
        for (rs, up) in &d.up_blocks {
            h = run(rs, h)?;
            if let Some(u) = up {
                h = u.forward(&h)?.0;
            }
        }
        d.conv_out.fwd(&d.conv_norm_out.forward(&h, true)?.0)
    }
}
