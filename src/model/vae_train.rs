//! Backward through the VAE, for training one from scratch (the demo's tiny base model). SD
//! fine-tuning never needs it: latents are encoded once and cached.
use super::blocks::{ResnetBlock2D, ResnetSaved};
use super::layers::{AttentionSaved, Conv2dSaved, NormSaved};
use super::vae::{AutoencoderKL, VaeMid};
use crate::lora::AdapterGrads;
use candle_core::{Result, Tensor};

pub struct MidSaved {
    r0: ResnetSaved,
    norm: NormSaved,
    attn: AttentionSaved,
    r1: ResnetSaved,
    shape: (usize, usize, usize, usize),
}

type BlockSaved = (Vec<ResnetSaved>, Option<(Conv2dSaved, (usize, usize))>);

pub struct EncoderSaved {
    conv_in: Conv2dSaved,
    blocks: Vec<BlockSaved>,
    mid: MidSaved,
    norm_out: NormSaved,
    conv_out: Conv2dSaved,
    quant: Option<Conv2dSaved>,
}

pub struct DecoderSaved {
    post_quant: Option<Conv2dSaved>,
    conv_in: Conv2dSaved,
    mid: MidSaved,
    blocks: Vec<(Vec<ResnetSaved>, Option<Conv2dSaved>)>,
    norm_out: NormSaved,
    conv_out: Conv2dSaved,
}

fn resnets_forward(rs: &[ResnetBlock2D], mut h: Tensor) -> Result<(Tensor, Vec<ResnetSaved>)> {
    let mut saved = vec![];
    for r in rs {
        let (y, s) = r.forward(&h, None)?;
        h = y;
        saved.push(s);
    }
    Ok((h, saved))
}

fn resnets_backward(rs: &[ResnetBlock2D], saved: Vec<ResnetSaved>, mut d: Tensor, g: &mut AdapterGrads) -> Result<Tensor> {
    for (r, s) in rs.iter().zip(saved).rev() {
        d = r.backward(s, &d, g)?.0;
    }
    Ok(d)
}

impl VaeMid {
    pub fn forward_train(&self, x: &Tensor) -> Result<(Tensor, MidSaved)> {
        let (h, r0) = self.resnets[0].forward(x, None)?;
        let shape = h.dims4()?;
        let (b, c, hh, ww) = shape;
        let (t, norm) = self.attn_norm.forward(&h, false)?;
        let (t, attn) = self.attn.forward(&t.reshape((b, c, hh * ww))?.transpose(1, 2)?.contiguous()?, None)?;
        let t = t.transpose(1, 2)?.reshape((b, c, hh, ww))?;
        let (y, r1) = self.resnets[1].forward(&(t + h)?, None)?;
        Ok((y, MidSaved { r0, norm, attn, r1, shape }))
    }

    pub fn backward(&self, s: MidSaved, dy: &Tensor, g: &mut AdapterGrads) -> Result<Tensor> {
        let (b, c, hh, ww) = s.shape;
        let d = self.resnets[1].backward(s.r1, dy, g)?.0;
        let dt = d.reshape((b, c, hh * ww))?.transpose(1, 2)?.contiguous()?;
        let (dt, _) = self.attn.backward(s.attn, &dt, g)?;
        let dt = dt.transpose(1, 2)?.reshape((b, c, hh, ww))?;
        let dh = (self.attn_norm.backward(s.norm, &dt, g)? + d)?;
        Ok(self.resnets[0].backward(s.r0, &dh, g)?.0)
    }
}

impl AutoencoderKL {
    /// Image → moments (mean ; logvar), keeping what the backward needs.
    pub fn encode_train(&self, x: &Tensor) -> Result<(Tensor, EncoderSaved)> {
        let e = &self.encoder;
        let (mut h, conv_in) = e.conv_in.forward(x)?;
        let mut blocks = vec![];
        for (rs, down) in &e.down_blocks {
            let (y, saved) = resnets_forward(rs, h)?;
            h = y;
            let mut ds = None;
            if let Some(d) = down {
                let (_, _, hh, ww) = h.dims4()?;
                let (y, s) = d.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
                h = y;
                ds = Some((s, (hh, ww)));
            }
            blocks.push((saved, ds));
        }
        let (h, mid) = e.mid_block.forward_train(&h)?;
        let (h, norm_out) = e.conv_norm_out.forward(&h, true)?;
        let (mut h, conv_out) = e.conv_out.forward(&h)?;
        let mut quant = None;
        if let Some(q) = &self.quant_conv {
            let (y, s) = q.forward(&h)?;
            h = y;
            quant = Some(s);
        }
        Ok((h, EncoderSaved { conv_in, blocks, mid, norm_out, conv_out, quant }))
    }

    pub fn encode_backward(&self, s: EncoderSaved, dy: &Tensor, g: &mut AdapterGrads) -> Result<Tensor> {
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

    /// Latents → image, keeping what the backward needs.
    pub fn decode_train(&self, z: &Tensor) -> Result<(Tensor, DecoderSaved)> {
        let dd = &self.decoder;
        let mut z = z.clone();
        let mut post_quant = None;
        if let Some(p) = &self.post_quant_conv {
            let (y, s) = p.forward(&z)?;
            z = y;
            post_quant = Some(s);
        }
        let (h, conv_in) = dd.conv_in.forward(&z)?;
        let (mut h, mid) = dd.mid_block.forward_train(&h)?;
        let mut blocks = vec![];
        for (rs, up) in &dd.up_blocks {
            let (y, saved) = resnets_forward(rs, h)?;
            h = y;
            let mut us = None;
            if let Some(u) = up {
                let (y, s) = u.forward(&h)?;
                h = y;
                us = Some(s);
            }
            blocks.push((saved, us));
        }
        let (h, norm_out) = dd.conv_norm_out.forward(&h, true)?;
        let (y, conv_out) = dd.conv_out.forward(&h)?;
        Ok((y, DecoderSaved { post_quant, conv_in, mid, blocks, norm_out, conv_out }))
    }

    pub fn decode_backward(&self, s: DecoderSaved, dy: &Tensor, g: &mut AdapterGrads) -> Result<Tensor> {
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
