//! Where weights come from: a diffusers folder, a single-file checkpoint (`.safetensors` /
//! `.ckpt` in the original LDM/SGM naming), or a Hugging Face Hub id resolved from the local
//! cache. Everything ends as the same `StableDiffusion` bundle.
pub mod ckpt;
pub mod folder;
pub mod hub;
pub mod ldm_keys;
pub mod single_file;

use super::clip::ClipTextModel;
use super::config::{ClipTextConfig, UNetConfig, VaeConfig};
use super::unet::UNet2DConditionModel;
use super::vae::AutoencoderKL;
use anyhow::Result;
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

impl Family {
    pub fn name(&self) -> &'static str {
        match self {
            Family::Sd1 => "sd1",
            Family::Sd2 => "sd2",
            Family::Sdxl => "sdxl",
        }
    }
}

fn d_steps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.00085
}
fn d_beta_end() -> f64 {
    0.012
}
fn d_schedule() -> String {
    "scaled_linear".into()
}
fn d_pred() -> String {
    "epsilon".into()
}
fn d_spacing() -> String {
    "leading".into()
}

/// The noise schedule of the model (scheduler/scheduler_config.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    #[serde(default = "d_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_schedule")]
    pub beta_schedule: String,
    #[serde(default = "d_pred")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    /// Every other setting of the file (`use_karras_sigmas`, `final_sigmas_type`, ...), for the
    /// samplers of `sdlora generate`.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// What the U-Net predicts: the noise, or v (SD 2.x 768 models). The scheduler config's
/// `prediction_type` names it; single files carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum PredictionType {
    #[value(name = "epsilon")]
    #[serde(rename = "epsilon")]
    Epsilon,
    #[value(name = "v_prediction")]
    #[serde(rename = "v_prediction")]
    VPrediction,
}

impl PredictionType {
    pub fn name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

/// Which parts to load, in which precision, where.
#[derive(Clone)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    pub unet: bool,
    pub vae: bool,
    pub text_encoders: bool,
    /// Overrides the scheduler's prediction type (single files carry none).
    pub prediction_type: Option<PredictionType>,
    /// For single files: a diffusers folder whose configs to use instead of inferring them.
    pub config: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            unet: true,
            vae: true,
            text_encoders: true,
            prediction_type: None,
            config: None,
        }
    }
}

/// A Stable Diffusion model: whichever networks were asked for, plus the noise schedule.
pub struct StableDiffusion {
    pub family: Family,
    pub unet: Option<UNet2DConditionModel>,
    pub vae: Option<AutoencoderKL>,
    pub text_encoders: Vec<ClipTextModel>,
    /// Folders holding vocab.json/merges.txt, one per text encoder, when the model has them.
    pub tokenizer_dirs: Vec<Option<PathBuf>>,
    pub scheduler: SchedulerConfig,
    /// What the user pointed at, for messages and metadata.
    pub source: String,
    /// Shared by every adapter put on this model (LoRA files applied, adapters in training):
    /// switched off, the model computes what its base alone does. Sampling uses it to leave the
    /// first steps to the base (`GenerateOptions::lora_start`), training for base predictions.
    pub lora_switch: crate::model::layers::adapter::Switch,
    /// The files the weights came from, so caches can key on their content.
    pub files: Files,
}

/// The files a model's components were read from (empty for a model built in memory).
#[derive(Clone, Debug, Default)]
pub struct Files {
    pub unet: Vec<PathBuf>,
    pub vae: Vec<PathBuf>,
    /// Text encoders' weights and tokenizers' vocabularies.
    pub text_encoders: Vec<PathBuf>,
}

impl StableDiffusion {
    /// The first weight holding NaN or infinity, as "file: tensor `name`", scanning the files the
    /// model came from: run when a forward pass came out non-finite, to name the culprit.
    pub fn non_finite_weight(&self) -> Option<String> {
        let f = &self.files;
        let mut seen = std::collections::HashSet::new();
        for p in f.unet.iter().chain(&f.vae).chain(&f.text_encoders) {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !seen.insert(p.clone()) || !["safetensors", "ckpt", "pt", "pth", "bin"].contains(&ext) {
                continue;
            }
            let tensors: Vec<(String, candle_core::Tensor)> = if ext == "safetensors" {
                crate::model::weights::load_checked(p).ok()?.into_iter().collect()
            } else {
                ckpt::read_pickle(p, None).ok()?
            };
            let mut tensors = tensors;
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, t) in tensors {
                if !t.dtype().is_float() {
                    continue;
                }
                // NaN and inf survive a sum (a max would skip NaN)
                let finite = t.to_dtype(DType::F32).and_then(|t| t.sum_all()?.to_scalar::<f32>());
                if finite.is_ok_and(|m| !m.is_finite()) {
                    return Some(format!("{}: tensor `{name}`", p.display()));
                }
            }
        }
        None
    }
}

/// SDXL has a second text encoder; SD2 is told apart from SD1 by its 1024-wide context.
pub fn family_of(unet: &UNetConfig, has_text_encoder_2: bool) -> Family {
    if has_text_encoder_2 || unet.addition_embed_type.as_deref() == Some("text_time") {
        Family::Sdxl
    } else if unet.cross_attention_dim == 1024 || unet.use_linear_projection {
        Family::Sd2
    } else {
        Family::Sd1
    }
}

/// Loads a model from a diffusers folder, a single file, or a hub id (`org/name[@revision]`).
pub fn load(source: &str, opts: &LoadOptions) -> Result<StableDiffusion> {
    let path = Path::new(source);
    let mut sd = if path.is_dir() {
        load_folder(path, opts)?
    } else if path.is_file() {
        single_file::load_single_file(path, opts)?
    } else if let Some(dir) = hub::resolve(source)? {
        load_folder(&dir, opts)?
    } else if hub::looks_like_id(source) {
        load_folder(&hub::download(source)?, opts)?
    } else {
        anyhow::bail!(
            "{source}: no such file or folder, and not a model in the Hugging Face cache ({}) — give a diffusers folder, a .safetensors/.ckpt file, or download the repo first",
            hub::cache_dir().display()
        )
    };
    sd.source = source.to_string();
    if let Some(p) = &opts.prediction_type {
        sd.scheduler.prediction_type = p.name().into();
    }
    Ok(sd)
}

pub fn load_folder(dir: &Path, opts: &LoadOptions) -> Result<StableDiffusion> {
    let index = dir.join("model_index.json");
    if !index.exists() {
        anyhow::bail!("{}: not a diffusers model folder (no model_index.json)", dir.display());
    }
    let unet_cfg: UNetConfig = folder::read_json(&dir.join("unet/config.json"))?;
    let has_te2 = dir.join("text_encoder_2").is_dir();
    let family = family_of(&unet_cfg, has_te2);
    let sched_path = dir.join("scheduler/scheduler_config.json");
    let scheduler =
        if sched_path.exists() { folder::read_json(&sched_path)? } else { SchedulerConfig::default() };
    let (dt, dev) = (opts.dtype, &opts.device);
    let unet = if opts.unet {
        let w = folder::open_weights(
            &folder::component_files(&dir.join("unet"), "diffusion_pytorch_model", false)?,
            dt,
            dev,
        )?;
        Some(UNet2DConditionModel::load(&unet_cfg, &w).map_err(|e| anyhow::anyhow!("{e}"))?)
    } else {
        None
    };
    let vae = if opts.vae {
        let cfg: VaeConfig = folder::read_json(&dir.join("vae/config.json"))?;
        let w = folder::open_weights(
            &folder::component_files(&dir.join("vae"), "diffusion_pytorch_model", false)?,
            dt,
            dev,
        )?;
        Some(AutoencoderKL::load(&cfg, &w).map_err(|e| anyhow::anyhow!("{e}"))?)
    } else {
        None
    };
    let te_names: &[&str] = if has_te2 { &["text_encoder", "text_encoder_2"] } else { &["text_encoder"] };
    let mut text_encoders = vec![];
    if opts.text_encoders {
        for name in te_names {
            let d = dir.join(name);
            let cfg: ClipTextConfig = folder::read_json(&d.join("config.json"))?;
            let w = folder::open_weights(&folder::component_files(&d, "model", false)?, dt, dev)?;
            text_encoders.push(ClipTextModel::load(&cfg, &w).map_err(|e| anyhow::anyhow!("{e}"))?);
        }
    }
    let tokenizer_dirs: Vec<Option<PathBuf>> = ["tokenizer", "tokenizer_2"][..te_names.len()]
        .iter()
        .map(|t| Some(dir.join(t)).filter(|p| p.join("vocab.json").exists()))
        .collect();
    let weights_of =
        |c: &str, stem: &str| folder::component_files(&dir.join(c), stem, false).unwrap_or_default();
    let mut te_files: Vec<PathBuf> = te_names.iter().flat_map(|n| weights_of(n, "model")).collect();
    for t in tokenizer_dirs.iter().flatten() {
        te_files.extend([t.join("vocab.json"), t.join("merges.txt")]);
    }
    Ok(StableDiffusion {
        family,
        unet,
        vae,
        text_encoders,
        tokenizer_dirs,
        scheduler,
        source: dir.display().to_string(),
        lora_switch: crate::model::layers::adapter::switch(),
        files: Files {
            unet: weights_of("unet", "diffusion_pytorch_model"),
            vae: weights_of("vae", "diffusion_pytorch_model"),
            text_encoders: te_files,
        },
    })
}
