//! CLIP text encoder (transformers' CLIPTextModel / CLIPTextModelWithProjection) with an
//! explicit backward, for text-encoder LoRA.
use super::config::ClipTextConfig;
use super::layers::load::{layer_norm, linear};
use super::layers::{
    gelu_backward, join, quick_gelu, quick_gelu_backward, Attention, AttentionSaved, LayerMut, LayerNorm,
    Linear, LinearSaved, NormSaved, Visit, CLIP_NAMES,
};
use super::weights::Weights;
use crate::model::layers::Grads;
use candle_core::{DType, IndexOp, Result, Tensor};

pub struct ClipLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: Attention,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    quick: bool,
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub token_embedding: Tensor,
    pub position_embedding: Tensor,
    pub layers: Vec<ClipLayer>,
    pub final_layer_norm: LayerNorm,
    pub text_projection: Option<Linear>,
}

pub struct ClipOutput {
    pub last_hidden_state: Tensor,
    /// hidden_states[-2]: the output of the second-to-last layer, before the final LayerNorm.
    pub penultimate: Tensor,
    /// Pooled output at the end token (projected for CLIPTextModelWithProjection).
    pub pooled: Tensor,
}

/// Gradients flowing into the encoder's outputs; any may be absent.
#[derive(Default)]
pub struct ClipOutputGrads {
    pub last_hidden_state: Option<Tensor>,
    pub penultimate: Option<Tensor>,
    pub pooled: Option<Tensor>,
}

struct LayerSaved {
    n1: NormSaved,
    attn: AttentionSaved,
    n2: NormSaved,
    fc1: LinearSaved,
    pre: Tensor,
    fc2: LinearSaved,
}

pub struct ClipSaved {
    penultimate: Tensor,
    layers: Vec<LayerSaved>,
    final_ln: NormSaved,
    proj: Option<LinearSaved>,
    /// One-hot [B, L, 1] of the pooled position.
    pool_mask: Tensor,
}

impl ClipLayer {
    fn forward_train(&self, x: &Tensor) -> Result<(Tensor, LayerSaved)> {
        let (h, n1) = self.layer_norm1.forward_train(x)?;
        let (h, attn) = self.self_attn.forward_train(&h, None)?;
        let x = (x + h)?;
        let (h, n2) = self.layer_norm2.forward_train(&x)?;
        let (pre, fc1) = self.fc1.forward_train(&h)?;
        let act = if self.quick { quick_gelu(&pre)? } else { pre.gelu_erf()? };
        let (h, fc2) = self.fc2.forward_train(&act)?;
        Ok(((x + h)?, LayerSaved { n1, attn, n2, fc1, pre, fc2 }))
    }

    fn backward(&self, s: LayerSaved, dy: &Tensor, g: &mut Grads) -> Result<Tensor> {
        let dh = self.fc2.backward(s.fc2, dy, g)?;
        let dh = if self.quick { quick_gelu_backward(&s.pre, &dh)? } else { gelu_backward(&s.pre, &dh)? };
        let dh = self.fc1.backward(s.fc1, &dh, g)?;
        let dx = (dy + self.layer_norm2.backward(s.n2, &dh, g)?)?;
        let (dh, _) = self.self_attn.backward(s.attn, &dx, g)?;
        &dx + self.layer_norm1.backward(s.n1, &dh, g)?
    }
}

impl ClipSaved {
    pub fn penultimate(&self) -> &Tensor {
        &self.penultimate
    }
}

impl ClipTextModel {
    /// Accepts keys with or without the `text_model.` prefix (transformers 5 saves without).
    pub fn load(config: &ClipTextConfig, w: &Weights) -> Result<Self> {
        let c = config;
        let t = if w.contains("text_model.embeddings.token_embedding.weight") {
            w.pp("text_model")
        } else {
            w.clone()
        };
        let (d, quick) = (c.hidden_size, c.hidden_act == "quick_gelu");
        if !quick && c.hidden_act != "gelu" {
            return Err(candle_core::Error::Msg(format!(
                "{}: hidden_act `{}` is not supported",
                w.origin(),
                c.hidden_act
            )));
        }
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = t.pp(format!("encoder.layers.{i}"));
                let a = l.pp("self_attn");
                Ok(ClipLayer {
                    layer_norm1: layer_norm(&l.pp("layer_norm1"), d, c.layer_norm_eps)?,
                    self_attn: Attention {
                        to_q: linear(&a.pp("q_proj"), d, d, true)?,
                        to_k: linear(&a.pp("k_proj"), d, d, true)?,
                        to_v: linear(&a.pp("v_proj"), d, d, true)?,
                        to_out: linear(&a.pp("out_proj"), d, d, true)?,
                        heads: c.num_attention_heads,
                        causal: true,
                        names: CLIP_NAMES,
                    },
                    layer_norm2: layer_norm(&l.pp("layer_norm2"), d, c.layer_norm_eps)?,
                    fc1: linear(&l.pp("mlp.fc1"), d, c.intermediate_size, true)?,
                    fc2: linear(&l.pp("mlp.fc2"), c.intermediate_size, d, true)?,
                    quick,
                })
            })
            .collect::<Result<_>>()?;
        let text_projection = match (c.with_projection(), c.projection_dim) {
            (true, Some(p)) => Some(linear(&w.pp("text_projection"), d, p, false)?),
            _ => None,
        };
        Ok(Self {
            config: config.clone(),
            token_embedding: t.get((c.vocab_size, d), "embeddings.token_embedding.weight")?,
            position_embedding: t
                .get((c.max_position_embeddings, d), "embeddings.position_embedding.weight")?,
            layers,
            final_layer_norm: layer_norm(&t.pp("final_layer_norm"), d, c.layer_norm_eps)?,
            text_projection,
        })
    }

    /// Token ids [B, L] (u32 or i64) → token embeddings [B, L, D] (before positions).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat = ids.to_dtype(DType::U32)?.flatten_all()?;
        self.token_embedding.index_select(&flat, 0)?.reshape((b, l, ()))
    }

    /// Where transformers pools: argmax of the ids for the legacy eos id 2, else the first eos.
    fn pool_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
        let eos = self.config.eos_token_id;
        Ok(rows
            .iter()
            .map(|r| {
                if eos == 2 {
                    // argmax, first occurrence of the maximum
                    let m = *r.iter().max().unwrap_or(&0);
                    r.iter().position(|&v| v == m).unwrap_or(0)
                } else {
                    r.iter().position(|&v| v == eos).unwrap_or(r.len() - 1)
                }
            })
            .collect())
    }

    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        let e = self.embed_tokens(ids)?;
        Ok(self.forward_train(ids, &e)?.0)
    }

    /// Forward from given token embeddings (so their gradient can be taken); `ids` decide the
    /// pooled position.
    pub fn forward_train(&self, ids: &Tensor, token_embeds: &Tensor) -> Result<(ClipOutput, ClipSaved)> {
        let (b, l, _) = token_embeds.dims3()?;
        let mut h = token_embeds.broadcast_add(&self.position_embedding.i(..l)?)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut penultimate = h.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let (y, s) = layer.forward_train(&h)?;
            h = y;
            layers.push(s);
            if i + 2 == self.layers.len() {
                penultimate = h.clone();
            }
        }
        let (last, final_ln) = self.final_layer_norm.forward_train(&h)?;
        let pos = self.pool_positions(ids)?;
        let mut mask = vec![0f32; b * l];
        for (r, &p) in pos.iter().enumerate() {
            mask[r * l + p] = 1.0;
        }
        let pool_mask = Tensor::from_vec(mask, (b, l, 1), last.device())?.to_dtype(last.dtype())?;
        let pooled = last.broadcast_mul(&pool_mask)?.sum(1)?;
        let (pooled, proj) = match &self.text_projection {
            Some(p) => {
                let (y, s) = p.forward_train(&pooled)?;
                (y, Some(s))
            }
            None => (pooled, None),
        };
        let out = ClipOutput { last_hidden_state: last, penultimate, pooled };
        let penultimate = out.penultimate.clone();
        Ok((out, ClipSaved { penultimate, layers, final_ln, proj, pool_mask }))
    }

    /// Returns the gradient w.r.t. the token embeddings.
    pub fn backward(&self, s: ClipSaved, d: ClipOutputGrads, g: &mut Grads) -> Result<Tensor> {
        let shape = s.pool_mask.dims().to_vec();
        let mut d_last = d.last_hidden_state;
        if let Some(dp) = d.pooled {
            let dp = match (&self.text_projection, s.proj) {
                (Some(p), Some(ps)) => p.backward(ps, &dp, g)?,
                _ => dp,
            };
            let scattered = s.pool_mask.broadcast_mul(&dp.unsqueeze(1)?)?;
            d_last = Some(match d_last {
                Some(x) => (x + scattered)?,
                None => scattered,
            });
        }
        let n = self.layers.len();
        let mut dh = match d_last {
            Some(x) => self.final_layer_norm.backward(s.final_ln, &x, g)?,
            None => Tensor::zeros(
                (shape[0], shape[1], self.config.hidden_size),
                s.pool_mask.dtype(),
                s.pool_mask.device(),
            )?,
        };
        for (i, (layer, ls)) in self.layers.iter().zip(s.layers).enumerate().rev() {
            if i + 2 == n {
                if let Some(p) = &d.penultimate {
                    dh = (dh + p)?;
                }
            }
            dh = layer.backward(ls, &dh, g)?;
        }
        if let (1, Some(p)) = (n, &d.penultimate) {
            dh = (dh + p)?; // one layer: hidden_states[-2] is the embedding output
        }
        Ok(dh)
    }
}

impl Visit for ClipTextModel {
    fn visit(&mut self, p: &str, f: &mut dyn FnMut(&str, LayerMut<'_>)) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let q = join(p, format!("text_model.encoder.layers.{i}"));
            l.self_attn.visit(&join(&q, "self_attn"), f);
            l.fc1.visit(&join(&q, "mlp.fc1"), f);
            l.fc2.visit(&join(&q, "mlp.fc2"), f);
        }
    }
}
