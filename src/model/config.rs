//! Model configs, deserialised from diffusers' / transformers' config.json. Field names are the
//! config keys; defaults are diffusers' defaults.
use serde::{Deserialize, Serialize};

/// A config value that is either one number for every block or one per block.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Many(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Many(v) => v[i.min(v.len() - 1)],
        }
    }
    pub fn expand(&self, n: usize) -> Vec<usize> {
        (0..n).map(|i| self.get(i)).collect()
    }
}

fn d_true() -> bool {
    true
}
fn d_4() -> usize {
    4
}
fn d_2() -> usize {
    2
}
fn d_32() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_head_8() -> PerBlock {
    PerBlock::One(8)
}
fn d_tlpb() -> PerBlock {
    PerBlock::One(1)
}
fn d_cross() -> usize {
    1280
}
fn d_boc() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_down() -> Vec<String> {
    ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        .map(String::from)
        .to_vec()
}
fn d_up() -> Vec<String> {
    ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"].map(String::from).to_vec()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct UNetConfig {
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_boc")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_2")]
    pub layers_per_block: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    #[serde(default = "d_tlpb")]
    pub transformer_layers_per_block: PerBlock,
    /// Misnamed in diffusers: this is the number of heads unless `num_attention_heads` is set.
    #[serde(default = "d_head_8")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// As diffusers reads it: absent means the cross-attention mid block, `null` means none
    /// (pruned U-Nets such as BK-SDM's small variants).
    #[serde(default = "d_mid_block", deserialize_with = "null_is_none")]
    pub mid_block_type: Option<String>,
}

fn d_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}

fn null_is_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)
}

impl UNetConfig {
    pub fn heads(&self) -> PerBlock {
        self.num_attention_heads.clone().unwrap_or_else(|| self.attention_head_dim.clone())
    }

    /// Refuses variants this project does not implement, with a message saying which key.
    pub fn validate(&self) -> Result<(), String> {
        if self.class_embed_type.is_some() {
            return Err("class_embed_type is not supported (upscaler / unCLIP U-Nets)".into());
        }
        if self.time_cond_proj_dim.is_some() {
            return Err("time_cond_proj_dim is not supported (LCM-distilled U-Nets)".into());
        }
        match self.addition_embed_type.as_deref() {
            None | Some("text_time") => {}
            Some(t) => return Err(format!("addition_embed_type `{t}` is not supported")),
        }
        if let Some(m) = self.mid_block_type.as_deref() {
            if m != "UNetMidBlock2DCrossAttn" {
                return Err(format!("mid_block_type `{m}` is not supported"));
            }
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !["DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]
                .contains(&t.as_str())
            {
                return Err(format!("block type `{t}` is not supported"));
            }
        }
        Ok(())
    }
}

fn d_scale() -> f64 {
    0.18215
}
fn d_vae_boc() -> Vec<usize> {
    vec![64]
}
fn d_1() -> usize {
    1
}
fn d_3() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct VaeConfig {
    /// One DownEncoderBlock2D / UpDecoderBlock2D per entry of `block_out_channels`; written out
    /// so diffusers builds the same model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub down_block_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    #[serde(default = "d_vae_boc")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub force_upcast: Option<bool>,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_inter() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_pos() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eos() -> i64 {
    2
}

/// transformers' CLIPTextConfig.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default)]
    pub projection_dim: Option<usize>,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// transformers pools at argmax(input_ids) when this is 2 (the legacy configs), else at the
    /// first eos token.
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

impl ClipTextConfig {
    pub fn with_projection(&self) -> bool {
        self.architectures.as_ref().is_some_and(|a| a.iter().any(|s| s == "CLIPTextModelWithProjection"))
    }
}

impl VaeConfig {
    /// Fills the block-type lists diffusers needs from the number of blocks.
    pub fn with_block_types(mut self) -> Self {
        let n = self.block_out_channels.len();
        self.down_block_types = vec!["DownEncoderBlock2D".into(); n];
        self.up_block_types = vec!["UpDecoderBlock2D".into(); n];
        self
    }
}

#[cfg(test)]
mod tests {
    use super::UNetConfig;

    /// diffusers' reading: a missing key is the cross-attention mid block, null is none; and what
    /// we write reads back the same way in diffusers.
    #[test]
    fn mid_block_type_null_means_no_mid_block() {
        let mut j = serde_json::to_value(crate::model::tiny::tiny_sd1().unet).unwrap();
        let o = j.as_object_mut().unwrap();
        o.remove("mid_block_type");
        let absent: UNetConfig = serde_json::from_value(j.clone()).unwrap();
        assert_eq!(absent.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
        let written = serde_json::to_value(&absent).unwrap();
        assert_eq!(written["mid_block_type"], "UNetMidBlock2DCrossAttn");
        j["mid_block_type"] = serde_json::Value::Null;
        let none: UNetConfig = serde_json::from_value(j).unwrap();
        assert_eq!(none.mid_block_type, None);
        assert!(serde_json::to_value(&none).unwrap()["mid_block_type"].is_null());
        // `bench --write-model` writes the type out, as diffusers' save_pretrained does
        for c in [crate::model::tiny::sd15(), crate::model::tiny::sdxl()] {
            assert_eq!(serde_json::to_value(&c.unet).unwrap()["mid_block_type"], "UNetMidBlock2DCrossAttn");
        }
        let w = crate::model::weights::Weights::meta();
        crate::model::unet::UNet2DConditionModel::load(&none, &w).unwrap();
        assert!(w.recorded().iter().all(|(n, _)| !n.starts_with("mid_block")));
    }
}
