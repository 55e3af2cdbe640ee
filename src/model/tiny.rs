//! Random-weight models written as diffusers folders: the tiny models of the tests, the
//! full-size ones of `sdlora bench`, and the starting point of the demo's base model.
use super::clip::ClipTextModel;
use super::config::{ClipTextConfig, UNetConfig, VaeConfig};
use super::load::SchedulerConfig;
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKL;
use super::weights::{random_tensor, Weights};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The configs of a whole pipeline.
#[derive(Clone)]
pub struct PipelineConfig {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoders: Vec<ClipTextConfig>,
    pub scheduler: SchedulerConfig,
}

/// Every (name, shape) a component's loader asks for.
pub fn shapes(build: impl FnOnce(&Weights) -> candle_core::Result<()>) -> Result<Vec<(String, Vec<usize>)>> {
    let w = Weights::meta();
    build(&w)?;
    Ok(w.recorded())
}

pub fn unet_shapes(c: &UNetConfig) -> Result<Vec<(String, Vec<usize>)>> {
    shapes(|w| UNet2DConditionModel::load(c, w).map(|_| ()))
}

pub fn vae_shapes(c: &VaeConfig) -> Result<Vec<(String, Vec<usize>)>> {
    shapes(|w| AutoencoderKL::load(c, w).map(|_| ()))
}

pub fn clip_shapes(c: &ClipTextConfig) -> Result<Vec<(String, Vec<usize>)>> {
    shapes(|w| ClipTextModel::load(c, w).map(|_| ()))
}

pub fn count(shapes: &[(String, Vec<usize>)]) -> usize {
    shapes.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

fn write_component(
    dir: &Path,
    file: &str,
    config: &impl serde::Serialize,
    shapes: &[(String, Vec<usize>)],
    seed: u64,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let tensors: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(n, s)| Ok((n.clone(), random_tensor(seed, n, &s.as_slice().into(), dtype, &Device::Cpu)?)))
        .collect::<Result<_>>()?;
    crate::model::weights::save_atomic(&dir.join(file), &tensors, &Default::default())?;
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config)?)?;
    Ok(())
}

/// Writes a complete diffusers folder with seeded random weights.
pub fn write_random_pipeline(dir: &Path, cfg: &PipelineConfig, seed: u64, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    write_component(
        &dir.join("unet"),
        "diffusion_pytorch_model.safetensors",
        &cfg.unet,
        &unet_shapes(&cfg.unet)?,
        seed,
        dtype,
    )?;
    write_component(
        &dir.join("vae"),
        "diffusion_pytorch_model.safetensors",
        &cfg.vae.clone().with_block_types(),
        &vae_shapes(&cfg.vae)?,
        seed + 1,
        dtype,
    )?;
    let names = ["text_encoder", "text_encoder_2"];
    for (i, c) in cfg.text_encoders.iter().enumerate() {
        write_component(
            &dir.join(names[i]),
            "model.safetensors",
            c,
            &clip_shapes(c)?,
            seed + 2 + i as u64,
            dtype,
        )?;
    }
    write_index(dir, cfg)
}

/// The folder's scheduler/scheduler_config.json and model_index.json.
pub fn write_index(dir: &Path, cfg: &PipelineConfig) -> Result<()> {
    std::fs::create_dir_all(dir.join("scheduler"))?;
    std::fs::write(
        dir.join("scheduler/scheduler_config.json"),
        serde_json::to_string_pretty(&cfg.scheduler)?,
    )?;
    let class =
        if cfg.text_encoders.len() > 1 { "StableDiffusionXLPipeline" } else { "StableDiffusionPipeline" };
    let index = serde_json::json!({"_class_name": class, "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]});
    std::fs::write(dir.join("model_index.json"), serde_json::to_string_pretty(&index)?)?;
    Ok(())
}

/// A small SD1-shaped pipeline with CLIP's full vocabulary, for training tests: it takes real
/// prompts through the real tokenizer.
pub fn tiny_sd1() -> PipelineConfig {
    let unet = serde_json::from_str(
        r#"{"block_out_channels":[16,32],"layers_per_block":1,"norm_num_groups":8,"cross_attention_dim":16,
            "attention_head_dim":2,"down_block_types":["CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D"],"sample_size":8}"#,
    )
    .expect("valid config");
    let vae = serde_json::from_str(
        r#"{"block_out_channels":[8,16],"layers_per_block":1,"latent_channels":4,"norm_num_groups":4,"sample_size":32}"#,
    )
    .expect("valid config");
    let te = serde_json::from_str(
        r#"{"vocab_size":49408,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":2,"num_attention_heads":2,
            "max_position_embeddings":77,"hidden_act":"quick_gelu","eos_token_id":49407,"architectures":["CLIPTextModel"]}"#,
    )
    .expect("valid config");
    PipelineConfig { unet, vae, text_encoders: vec![te], scheduler: SchedulerConfig::default() }
}

/// Stable Diffusion 1.5's configs (stable-diffusion-v1-5/stable-diffusion-v1-5).
pub fn sd15() -> PipelineConfig {
    let unet = serde_json::from_str(r#"{"cross_attention_dim":768,"sample_size":64}"#).expect("valid config");
    let vae = serde_json::from_str(
        r#"{"block_out_channels":[128,256,512,512],"layers_per_block":2,"latent_channels":4,"norm_num_groups":32,"sample_size":512}"#,
    )
    .expect("valid config");
    let te = serde_json::from_str(
        r#"{"vocab_size":49408,"hidden_size":768,"intermediate_size":3072,"num_hidden_layers":12,"num_attention_heads":12,
            "max_position_embeddings":77,"hidden_act":"quick_gelu","eos_token_id":2,"architectures":["CLIPTextModel"]}"#,
    )
    .expect("valid config");
    PipelineConfig { unet, vae, text_encoders: vec![te], scheduler: SchedulerConfig::default() }
}

/// Stable Diffusion XL base 1.0's configs (stabilityai/stable-diffusion-xl-base-1.0).
pub fn sdxl() -> PipelineConfig {
    let unet = serde_json::from_str(
        r#"{"block_out_channels":[320,640,1280],"down_block_types":["DownBlock2D","CrossAttnDownBlock2D","CrossAttnDownBlock2D"],
            "up_block_types":["CrossAttnUpBlock2D","CrossAttnUpBlock2D","UpBlock2D"],"attention_head_dim":[5,10,20],
            "transformer_layers_per_block":[1,2,10],"cross_attention_dim":2048,"use_linear_projection":true,
            "addition_embed_type":"text_time","addition_time_embed_dim":256,"projection_class_embeddings_input_dim":2816,
            "sample_size":128}"#,
    )
    .expect("valid config");
    let mut cfg = sd15();
    cfg.vae.scaling_factor = 0.13025;
    cfg.vae.sample_size = Some(1024);
    let te2 = serde_json::from_str(
        r#"{"vocab_size":49408,"hidden_size":1280,"intermediate_size":5120,"num_hidden_layers":32,"num_attention_heads":20,
            "max_position_embeddings":77,"hidden_act":"gelu","eos_token_id":2,"projection_dim":1280,
            "architectures":["CLIPTextModelWithProjection"]}"#,
    )
    .expect("valid config");
    cfg.text_encoders[0].hidden_act = "quick_gelu".into();
    PipelineConfig {
        unet,
        vae: cfg.vae,
        text_encoders: vec![cfg.text_encoders[0].clone(), te2],
        scheduler: cfg.scheduler,
    }
}

/// A small SDXL-shaped pipeline (two text encoders, text_time embedding) with CLIP's vocabulary.
pub fn tiny_sdxl() -> PipelineConfig {
    let mut c = tiny_sd1();
    c.unet = serde_json::from_str(
        r#"{"block_out_channels":[16,32],"layers_per_block":1,"norm_num_groups":8,"cross_attention_dim":32,
            "attention_head_dim":[1,2],"transformer_layers_per_block":[1,2],"use_linear_projection":true,
            "down_block_types":["DownBlock2D","CrossAttnDownBlock2D"],"up_block_types":["CrossAttnUpBlock2D","UpBlock2D"],
            "addition_embed_type":"text_time","addition_time_embed_dim":8,"projection_class_embeddings_input_dim":64,
            "sample_size":8}"#,
    )
    .expect("valid config");
    let te2 = serde_json::from_str(
        r#"{"vocab_size":49408,"hidden_size":16,"intermediate_size":32,"num_hidden_layers":2,"num_attention_heads":2,
            "max_position_embeddings":77,"hidden_act":"gelu","eos_token_id":49407,"projection_dim":16,
            "architectures":["CLIPTextModelWithProjection"]}"#,
    )
    .expect("valid config");
    c.text_encoders.push(te2);
    c
}
