//! A word's token embedding trained beside the LoRA ("pivotal tuning": diffusers' advanced
//! script's `--train_text_encoder_ti`, kohya's textual inversion with `--init_word`), stored in
//! the LoRA file as Automatic1111's bundled embedding: `bundle_emb.WORD.string_to_param.*`
//! [1, D] (SD 1.x/2.x), `bundle_emb.WORD.clip_l` / `.clip_g` (SDXL).
//!
//! The word must be one token of CLIP's vocabulary, so the embedding is that token's row of each
//! text encoder's embedding table: prompts without the word encode exactly as before, and a
//! prompt with it reads the trained vector at every sampling step, also the steps the base draws
//! alone (`--lora-start`): it belongs to the prompt, not to the adapters.
use crate::model::clip::ClipTextModel;
use crate::model::text::PromptEncoder;
use crate::model::tokenizer::ClipTokenizer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

/// The names a bundled embedding's vectors take, one per text encoder.
pub fn bundle_keys(word: &str, encoders: usize) -> Vec<String> {
    match encoders {
        1 => vec![format!("bundle_emb.{word}.string_to_param.*")],
        _ => vec![format!("bundle_emb.{word}.clip_l"), format!("bundle_emb.{word}.clip_g")],
    }
}

/// (word, encoder index) of a bundled-embedding tensor name; `None` for any other name.
pub fn parse_key(name: &str) -> Option<(String, usize)> {
    let rest = name.strip_prefix("bundle_emb.")?;
    for (suffix, k) in [(".string_to_param.*", 0), (".clip_l", 0), (".clip_g", 1)] {
        if let Some(word) = rest.strip_suffix(suffix) {
            return Some((word.to_string(), k));
        }
    }
    None
}

/// The row of `word` in an embedding table of `vocab` rows: its one token of `tok`, folded into
/// a tiny model's vocabulary as `PromptEncoder::ids` folds it.
pub fn token_of(tok: &ClipTokenizer, vocab: usize, word: &str) -> Result<u32> {
    let ids = tok.encode_raw(word)?;
    match ids[..] {
        [id] => Ok(id % vocab as u32),
        _ => bail!(
            "`{word}` is {} tokens in CLIP's vocabulary; an embedding is trained for a one-token word — pick a shorter or more common word",
            ids.len()
        ),
    }
}

/// `table` [N, D] with row `token` replaced by `v` (D values, any shape or dtype).
pub fn with_row(table: &Tensor, token: u32, v: &Tensor) -> Result<Tensor> {
    let d = table.dims2()?.1;
    if v.elem_count() != d {
        bail!("{} values for a table {d} wide — use it with the model it was trained on", v.elem_count());
    }
    let row = v.to_dtype(table.dtype())?.to_device(table.device())?.reshape((1, d))?;
    let id = token as usize;
    Ok(table.slice_assign(&[id..id + 1, 0..d], &row)?)
}

/// Replaces row `token` of the encoder's embedding table with `v` [D].
pub fn set_row(te: &mut ClipTextModel, token: u32, v: &Tensor) -> Result<()> {
    // detached: a trained vector is a variable, and a table recording ops would chain every
    // step's table to the last one
    te.token_embedding = with_row(&te.token_embedding, token, &v.detach())?.detach();
    Ok(())
}

/// A word whose embedding trains: its token and one f32 vector per text encoder.
pub struct TrainedWord {
    pub word: String,
    pub tokens: Vec<u32>,
    pub vectors: Vec<Var>,
}

impl TrainedWord {
    /// Starts `word` from the embedding of `init` (kohya's `--init_word`; several words,
    /// comma-separated: their mean), or from its own.
    pub fn new(
        prompts: &PromptEncoder,
        encoders: &mut [ClipTextModel],
        word: &str,
        init: Option<&str>,
    ) -> Result<Self> {
        let (mut tokens, mut vectors) = (vec![], vec![]);
        for (k, te) in encoders.iter_mut().enumerate() {
            let vocab = te.config.vocab_size;
            let token = token_of(&prompts.tokenizers[k].0, vocab, word).context("--train-embedding")?;
            let from = match init {
                Some(words) => words
                    .split(',')
                    .map(|w| token_of(&prompts.tokenizers[k].0, vocab, w.trim()).context("--init-word"))
                    .collect::<Result<Vec<u32>>>()?,
                None => vec![token],
            };
            let rows = Tensor::new(from.as_slice(), te.token_embedding.device())?;
            let v = te.token_embedding.index_select(&rows, 0)?.to_dtype(DType::F32)?.mean(0)?;
            set_row(te, token, &v)?;
            tokens.push(token);
            vectors.push(Var::from_tensor(&v)?);
        }
        Ok(Self { word: word.to_string(), tokens, vectors })
    }

    /// The gradient of encoder `k`'s vector: the token embeddings' gradient [B, L, D] summed
    /// over the positions holding the word's token.
    pub fn grad(&self, k: usize, ids: &Tensor, d_embeds: &Tensor) -> Result<Tensor> {
        let at = ids.to_dtype(DType::U32)?.eq(self.tokens[k])?.to_dtype(DType::F32)?.unsqueeze(2)?;
        Ok(d_embeds.to_dtype(DType::F32)?.broadcast_mul(&at)?.sum((0, 1))?)
    }

    /// Writes the vectors into the encoders' tables (after an optimizer step or a resume).
    pub fn install(&self, encoders: &mut [ClipTextModel]) -> Result<()> {
        for ((te, &token), v) in encoders.iter_mut().zip(&self.tokens).zip(&self.vectors) {
            set_row(te, token, v.as_tensor())?;
        }
        Ok(())
    }

    /// The bundled-embedding tensors to write into the LoRA file, [1, D] each.
    pub fn tensors(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        bundle_keys(&self.word, self.vectors.len())
            .into_iter()
            .zip(&self.vectors)
            .map(|(k, v)| {
                Ok((k, v.as_tensor().to_dtype(dtype)?.to_device(&candle_core::Device::Cpu)?.unsqueeze(0)?))
            })
            .collect()
    }
}

/// Installs a LoRA file's bundled embeddings (`(word, encoder, [1, D])`) into the model's text
/// encoders. `file` names the LoRA in errors.
pub fn install_bundled(
    prompts: &PromptEncoder,
    encoders: &mut [ClipTextModel],
    bundled: &[(String, usize, Tensor)],
    file: &str,
) -> Result<()> {
    for (word, k, t) in bundled {
        let Some(te) = encoders.get_mut(*k) else {
            bail!("{file}: embedding `{word}` is for a second text encoder this model lacks — use the LoRA with the model it was trained on")
        };
        let d = te.config.hidden_size;
        if t.elem_count() > d && t.elem_count() % d == 0 {
            bail!(
                "{file}: embedding `{word}` has {} vectors; only one-vector embeddings (one-token words) are read — use the LoRA without its embedding in a tool that reads those",
                t.elem_count() / d
            );
        }
        if t.elem_count() != d {
            bail!(
                "{file}: embedding `{word}` has {} values, this model's text encoder {d} (one vector of its width) — use the LoRA with the model it was trained on",
                t.elem_count()
            );
        }
        let token = token_of(&prompts.tokenizers[*k].0, te.config.vocab_size, word)
            .with_context(|| format!("{file}: embedding `{word}`"))?;
        set_row(te, token, &t.flatten_all()?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bundle_names_read_back_as_written() {
        for n in [1, 2] {
            let keys = bundle_keys("pink", n);
            let back: Vec<_> = keys.iter().map(|k| parse_key(k)).collect();
            let want: Vec<_> = (0..n).map(|k| Some(("pink".to_string(), k))).collect();
            assert_eq!(back, want, "{keys:?}");
        }
        assert_eq!(parse_key("lora_te_text_model_encoder_layers_0_mlp_fc1.alpha"), None);
        assert_eq!(parse_key("bundle_emb.pink.other"), None);
    }

    #[test]
    fn the_gradient_sums_the_positions_of_the_word() {
        let word = TrainedWord { word: "w".into(), tokens: vec![5], vectors: vec![] };
        let ids = Tensor::new(&[[1u32, 5, 2, 5], [5, 3, 3, 3]], &Device::Cpu).unwrap();
        let d = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().sin().unwrap().reshape((2, 4, 3)).unwrap();
        let g: Vec<f32> = word.grad(0, &ids, &d).unwrap().to_vec1().unwrap();
        let rows: Vec<Vec<Vec<f32>>> = d.to_vec3().unwrap();
        for (j, gj) in g.iter().enumerate() {
            let want = rows[0][1][j] + rows[0][3][j] + rows[1][0][j];
            assert!((gj - want).abs() < 1e-6, "{j}: {gj} vs {want}");
        }
    }
}
