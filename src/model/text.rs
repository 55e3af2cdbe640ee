//! Prompt → conditioning, as diffusers' pipelines build it: SD1/SD2 use the text encoder's last
//! hidden state; SDXL concatenates both encoders' penultimate hidden states and takes the second
//! encoder's projected pooled output.
use super::clip::{ClipOutput, ClipOutputGrads, ClipSaved, ClipTextModel};
use super::load::{Family, StableDiffusion};
use super::tokenizer::ClipTokenizer;
use crate::model::layers::Grads;
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
            encoders[0].final_layer_norm.forward(&outs[0].penultimate)?
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

    /// A1111-style long-prompt token ids: per tokenizer, one 77-id row per chunk of at most 75
    /// tokens (see `a1111_chunks`), each `[bos, tokens, eos, pad...]`.
    pub fn chunked_ids(&self, prompt: &str, vocab: &[usize]) -> Result<Vec<Vec<Vec<u32>>>> {
        let mut out = vec![];
        for ((tok, pad), &v) in self.tokenizers.iter().zip(vocab) {
            let parts = split_break(prompt).iter().map(|p| tok.encode_raw(p)).collect::<Result<Vec<_>>>()?;
            let comma = tok.encode_raw(",")?.first().copied();
            let rows = a1111_chunks(&parts, comma)
                .into_iter()
                .map(|chunk| {
                    let mut ids = Vec::with_capacity(77);
                    ids.push(tok.bos_id());
                    ids.extend(chunk);
                    ids.push(tok.eos_id());
                    ids.resize(77, *pad);
                    // a tiny model's vocabulary may be smaller than CLIP's: fold ids into it
                    ids.into_iter().map(|i| if (i as usize) < v { i } else { i % v as u32 }).collect()
                })
                .collect();
            out.push(rows);
        }
        Ok(out)
    }

    /// Inference with prompts of any length, as Automatic1111 encodes them: each chunk of 75
    /// tokens is encoded on its own and the chunks are concatenated along the sequence
    /// ([B, 77·chunks, D]); prompts with fewer chunks are padded with the empty prompt's chunk.
    /// SDXL's pooled embedding comes from the first chunk. Prompts of at most 75 tokens give
    /// exactly what `encode` (diffusers) gives.
    pub fn encode_chunked(&self, encoders: &[ClipTextModel], prompts: &[String]) -> Result<Conditioning> {
        let dev = encoders[0].token_embedding.device();
        let vocab: Vec<usize> = encoders.iter().map(|e| e.config.vocab_size).collect();
        let per_prompt = prompts.iter().map(|p| self.chunked_ids(p, &vocab)).collect::<Result<Vec<_>>>()?;
        let empty = self.chunked_ids("", &vocab)?;
        let chunks = per_prompt.iter().flat_map(|t| t.iter().map(|c| c.len())).max().unwrap_or(1);
        let mut ids = vec![];
        for k in 0..self.tokenizers.len() {
            let mut rows: Vec<u32> = vec![];
            for p in &per_prompt {
                for c in 0..chunks {
                    rows.extend(p[k].get(c).unwrap_or(&empty[k][0]));
                }
            }
            ids.push(Tensor::from_vec(rows, (prompts.len() * chunks, 77), dev)?);
        }
        let outs =
            encoders.iter().zip(&ids).map(|(e, i)| e.forward(i)).collect::<candle_core::Result<Vec<_>>>()?;
        let c = self.assemble(&outs, encoders)?;
        let (n, d) = (prompts.len(), c.context.dim(D::Minus1)?);
        let context = c.context.reshape((n, chunks * 77, d))?;
        let pooled = match c.pooled {
            Some(p) => Some(p.reshape((n, chunks, ()))?.narrow(1, 0, 1)?.squeeze(1)?),
            None => None,
        };
        Ok(Conditioning { context, pooled })
    }

    /// Training the text encoder(s): forward keeping what backward needs, and the token ids
    /// [B, 77] of each encoder.
    pub fn encode_train(
        &self,
        encoders: &[ClipTextModel],
        prompts: &[String],
    ) -> Result<(Conditioning, Vec<ClipSaved>, Vec<Tensor>)> {
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
        Ok((self.assemble(&outs, encoders)?, saved, ids))
    }

    /// Backward from the conditioning's gradients into the text encoders' adapters; returns
    /// each encoder's token-embedding gradient [B, 77, D].
    pub fn backward_train(
        &self,
        encoders: &[ClipTextModel],
        saved: Vec<ClipSaved>,
        d_context: &Tensor,
        d_pooled: Option<&Tensor>,
        g: &mut Grads,
    ) -> Result<Vec<Tensor>> {
        if self.family == Family::Sdxl {
            let w0 = encoders[0].config.hidden_size;
            let w1 = d_context.dim(D::Minus1)? - w0;
            let parts = [d_context.narrow(D::Minus1, 0, w0)?, d_context.narrow(D::Minus1, w0, w1)?];
            let mut out = vec![];
            for (i, (e, s)) in encoders.iter().zip(saved).enumerate() {
                let d = ClipOutputGrads {
                    penultimate: Some(parts[i].clone()),
                    pooled: if i == 1 { d_pooled.cloned() } else { None },
                    ..Default::default()
                };
                out.push(e.backward(s, d, g)?);
            }
            return Ok(out);
        }
        let s = saved.into_iter().next().expect("one text encoder");
        let d = if self.clip_skip >= 2 {
            // d through the final LayerNorm applied to the penultimate state: recompute it
            let e = &encoders[0];
            let pen = s.penultimate().clone();
            let (_, ln) = e.final_layer_norm.forward_train(&pen)?;
            ClipOutputGrads {
                penultimate: Some(e.final_layer_norm.backward(ln, d_context, g)?),
                ..Default::default()
            }
        } else {
            ClipOutputGrads { last_hidden_state: Some(d_context.clone()), ..Default::default() }
        };
        Ok(vec![encoders[0].backward(s, d, g)?])
    }
}

/// Automatic1111's `BREAK`: a word of its own that starts a new chunk.
pub fn split_break(prompt: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    for (i, word) in prompt.split(|c: char| c.is_whitespace()).enumerate() {
        if word == "BREAK" {
            parts.push(String::new());
            continue;
        }
        let last = parts.last_mut().expect("one part");
        if i > 0 && !last.is_empty() {
            last.push(' ');
        }
        last.push_str(word);
    }
    parts.iter().map(|p| p.trim().to_string()).collect()
}

/// Automatic1111's chunking (`FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`, without
/// emphasis or embeddings): chunks of at most 75 tokens; when a chunk fills up and its last comma
/// is at most 20 tokens back, the tokens after that comma move to the next chunk. Each part (the
/// prompt split at BREAK) starts a new chunk. Always at least one chunk.
pub fn a1111_chunks(parts: &[Vec<u32>], comma: Option<u32>) -> Vec<Vec<u32>> {
    const CHUNK: usize = 75;
    const BACKTRACK: usize = 20;
    let mut chunks: Vec<Vec<u32>> = vec![];
    let mut chunk: Vec<u32> = vec![];
    let mut last_comma: Option<usize> = None;
    for (k, part) in parts.iter().enumerate() {
        if k > 0 {
            chunks.push(std::mem::take(&mut chunk));
            last_comma = None;
        }
        for &token in part {
            if Some(token) == comma {
                last_comma = Some(chunk.len());
            } else if let Some(lc) = last_comma.filter(|&lc| chunk.len() == CHUNK && CHUNK - lc <= BACKTRACK)
            {
                let moved = chunk.split_off(lc + 1);
                chunks.push(std::mem::replace(&mut chunk, moved));
                last_comma = None;
            }
            if chunk.len() == CHUNK {
                chunks.push(std::mem::take(&mut chunk));
                last_comma = None;
            }
            chunk.push(token);
        }
    }
    if !chunk.is_empty() || chunks.is_empty() {
        chunks.push(chunk);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_75_with_comma_backtrack() {
        let ids: Vec<u32> = (0..160).collect();
        let c = a1111_chunks(std::slice::from_ref(&ids), None);
        assert_eq!(c.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![75, 75, 10]);
        assert_eq!(c.concat(), ids);
        // a comma (id 7) at position 60: the chunk breaks after it
        let mut with_comma = ids.clone();
        with_comma[60] = 7;
        let c = a1111_chunks(&[with_comma.clone()], Some(7));
        assert_eq!(c[0].len(), 61);
        assert_eq!(c.concat(), with_comma);
        // too far back (position 40): no backtrack
        let mut far = ids.clone();
        far[40] = 7;
        assert_eq!(a1111_chunks(&[far], Some(7))[0].len(), 75);
        assert_eq!(a1111_chunks(&[], None), vec![Vec::<u32>::new()]);
        assert_eq!(a1111_chunks(&[vec![1, 2], vec![3]], None), vec![vec![1, 2], vec![3]]);
    }

    #[test]
    fn break_splits_words_only() {
        assert_eq!(split_break("a cat BREAK a dog"), vec!["a cat", "a dog"]);
        assert_eq!(split_break("BREAKFAST"), vec!["BREAKFAST"]);
        assert_eq!(split_break("x"), vec!["x"]);
    }
}
