//! The frozen Stable Diffusion networks, each with an explicit forward and backward.
pub mod blocks;
pub mod clip;
pub mod config;
pub mod header;
pub mod layers;
pub mod load;
pub mod text;
pub mod tiny;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

/// The precision of weights as computed (`--dtype`) or stored (`--save-dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[value(alias = "fp32", alias = "float32")]
    #[serde(alias = "fp32", alias = "float32")]
    F32,
    #[value(alias = "fp16", alias = "float16")]
    #[serde(alias = "fp16", alias = "float16")]
    F16,
    #[value(alias = "bfloat16")]
    #[serde(alias = "bfloat16")]
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::F16 => candle_core::DType::F16,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}
