//! Prompt → conditioning, as diffusers' pipelines build it: SD1/SD2 use the text encoder's last
//! hidden state; SDXL concatenates both encoders' penultimate hidden states and takes the second
//! encoder's projected pooled output.
use super::clip::{ClipOutput, ClipOutputGrads, ClipSaved, ClipTextModel};
use super::load::{Family, StableDiffusion};
use super::tokenizer::ClipTokenizer;
use crate::lora::AdapterGrads;
use anyhow::Result;
use candle_core::{Device, Tensor, D};
use std::path::Path;

pub struct PromptEncoder {
    /// One tokenizer per text encoder, with its padding id.
    pub tokenizers: Vec<(ClipTokenizer, u32)>,
    pub family: Family,
    /// 1 = last layer (default); 2 = penultimate layer (A1111's "clip skip 2"), SD1/SD2 only.
    pub clip_skip: usize,
}

/// The U-Net's text inputs: context [B, 77, D] and, for SDXL, the pooled embedding.
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
}

/// The padding id a tokenizer folder declares (`!` = 0 for OpenCLIP-style, else end-of-text).
fn pad_id(dir: Option<&Path>, default: u32) -> u32 {
    let Some(dir) = dir else { return default };
    let Ok(t) = std::fs::read_to_string(dir.join("special_tokens_map.json")) else { return default };
    let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
    let pad = v["pad_token"].as_str().or(v["pad_token"]["content"].as_str());
    match pad {
        Some("!") => 0,
        Some("<|endoftext|>") => 49407,
        _ => default,
    }
}

impl PromptEncoder {
    pub fn new(sd: &StableDiffusion, clip_skip: usize) -> Result<Self> {
        let mut tokenizers = vec![];
        for (i, dir) in sd.tokenizer_dirs.iter().enumerate() {
            let tok = match dir {
                Some(d) => ClipTokenizer::from_folder(d)?,
                None => ClipTokenizer::embedded()?,
            };
            // SD2's and SDXL's second (OpenCLIP) tokenizer pad with "!" (id 0)
            let default = if sd.family == Family::Sd2 || i == 1 { 0 } else { 49407 };
            tokenizers.push((tok, pad_id(dir.as_deref(), default)));
        }
        Ok(Self { tokenizers, family: sd.family, clip_skip: clip_skip.max(1) })
    }

    /// Token ids [B, 77] for each text encoder.
    pub fn ids(&self, prompts: &[String], vocab: &[usize], device: &Device) -> Result<Vec<Tensor>> {
        let mut out = vec![];
        for ((tok, pad), &v) in self.tokenizers.iter().zip(vocab) {
            let mut rows = vec![];
            for p in prompts {
                let ids = tok.encode(p, 77, *pad)?;
                // a tiny model's vocabulary may be smaller than CLIP's: fold ids into it
                rows.extend(ids.into_iter().map(|i| if (i as usize) < v { i } else { i % v as u32 }));
            }
            out.push(Tensor::from_vec(rows, (prompts.len(), 77), device)?);
        }
        Ok(out)
    }

    /// Picks the U-Net context and pooled output from the encoders' outputs.
    pub fn assemble(&self, outs: &[ClipOutput], encoders: &[ClipTextModel]) -> Result<Conditioning> {
        if self.family == Family::Sdxl {
            let ctx = Tensor::cat(&[&outs[0].penultimate, &outs[1].penultimate], D::Minus1)?;
            return Ok(Conditioning { context: ctx, pooled: Some(outs[1].pooled.clone()) });
        }
        let ctx = if self.clip_skip >= 2 {
            encoders[0].final_layer_norm.fwd(&outs[0].penultimate)?
        } else {
            outs[0].last_hidden_state.clone()
        };
        Ok(Conditioning { context: ctx, pooled: None })
    }

    /// Inference: prompts → conditioning.
    pub fn encode(&self, encoders: &[ClipTextModel], prompts: &[String]) -> Result<Conditioning> {
        let dev = encoders[0].token_embedding.device();
        let vocab: Vec<usize> = encoders.iter().map(|e| e.config.vocab_size).collect();
        let ids = self.ids(prompts, &vocab, dev)?;
        let outs =
            encoders.iter().zip(&ids).map(|(e, i)| e.forward(i)).collect::<candle_core::Result<Vec<_>>>()?;
        self.assemble(&outs, encoders)
    }

    /// Training the text encoder(s): forward keeping what backward needs.
    pub fn encode_train(
        &self,
        encoders: &[ClipTextModel],
        prompts: &[String],
    ) -> Result<(Conditioning, Vec<ClipSaved>)> {
        let dev = encoders[0].token_embedding.device();
        let vocab: Vec<usize> = encoders.iter().map(|e| e.config.vocab_size).collect();
        let ids = self.ids(prompts, &vocab, dev)?;
        let mut outs = vec![];
        let mut saved = vec![];
        for (e, i) in encoders.iter().zip(&ids) {
            let (o, s) = e.forward_train(i, &e.embed_tokens(i)?)?;
            outs.push(o);
            saved.push(s);
        }
        Ok((self.assemble(&outs, encoders)?, saved))
    }

    /// Backward from the conditioning's gradients into the text encoders' adapters.
    pub fn backward_train(
        &self,
        encoders: &[ClipTextModel],
        saved: Vec<ClipSaved>,
        d_context: &Tensor,
        d_pooled: Option<&Tensor>,
        g: &mut AdapterGrads,
    ) -> Result<()> {
        if self.family == Family::Sdxl {
            let w0 = encoders[0].config.hidden_size;
            let w1 = d_context.dim(D::Minus1)? - w0;
            let parts = [d_context.narrow(D::Minus1, 0, w0)?, d_context.narrow(D::Minus1, w0, w1)?];
            for (i, (e, s)) in encoders.iter().zip(saved).enumerate() {
                let d = ClipOutputGrads {
                    penultimate: Some(parts[i].clone()),
                    pooled: if i == 1 { d_pooled.cloned() } else { None },
                    ..Default::default()
                };
                e.backward(s, d, g)?;
            }
            return Ok(());
        }
        let s = saved.into_iter().next().expect("one text encoder");
        let d = if self.clip_skip >= 2 {
            // d through the final LayerNorm applied to the penultimate state: recompute it
            let e = &encoders[0];
            let pen = s.penultimate().clone();
            let (_, ln) = e.final_layer_norm.forward(&pen)?;
            ClipOutputGrads {
                penultimate: Some(e.final_layer_norm.backward(ln, d_context, g)?),
                ..Default::default()
            }
        } else {
            ClipOutputGrads { last_hidden_state: Some(d_context.clone()), ..Default::default() }
        };
        encoders[0].backward(s, d, g)?;
        Ok(())
    }
}
