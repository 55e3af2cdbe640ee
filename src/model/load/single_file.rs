//! Single-file checkpoints (`.safetensors` / `.ckpt` as shared on civitai and the Hub): keys in
//! the original LDM/SGM naming are renamed into diffusers' layout (`ldm_keys`), and the configs
//! are the family's standard ones with every size read off the tensors — or, with
//! `LoadOptions::config`, taken from a diffusers folder (as diffusers' `from_single_file(config=)`).
use super::ldm_keys::{detect_family, plan, Source};
use super::{folder, Family, LoadOptions, SchedulerConfig, StableDiffusion};
use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipTextConfig, PerBlock, UNetConfig, VaeConfig};
use crate::model::tiny;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::model::weights::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// All tensors of the file, by their original names.
fn read_all(path: &Path) -> Result<HashMap<String, Tensor>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "safetensors" {
        crate::model::weights::check_safetensors(path)?;
        // SAFETY: read-only mapping of a file the user gave us.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
            .map_err(|e| anyhow::anyhow!("{}: cannot read safetensors: {e}", path.display()))?;
        st.tensors().into_iter().map(|(k, _)| Ok((k.clone(), st.load(&k, &Device::Cpu)?))).collect()
    } else if ["ckpt", "pt", "pth", "bin"].contains(&ext.as_str()) {
        Ok(super::ckpt::read_pickle(path, None)?.into_iter().collect())
    } else {
        bail!("{}: unknown checkpoint type (expected .safetensors or .ckpt)", path.display())
    }
}

/// Tensors by diffusers name, by component (`unet`, `vae`, `text_encoder`, `text_encoder_2`).
type Components = HashMap<String, HashMap<String, Tensor>>;

/// Renames the checkpoint's tensors into per-component diffusers-named maps.
fn split(path: &Path, mut all: HashMap<String, Tensor>) -> Result<(Family, Components)> {
    let keys: Vec<&str> = all.keys().map(String::as_str).collect();
    let family = detect_family(&keys).with_context(|| {
        format!("{}: not a Stable Diffusion 1.x/2.x/XL checkpoint (unknown key layout) — is it a LoRA or another model type?", path.display())
    })?;
    let p = plan(family, &keys).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out: HashMap<String, HashMap<String, Tensor>> = HashMap::new();
    for (comp, key, src) in p.tensors {
        let t = all
            .get(src.ldm_key())
            .with_context(|| format!("{}: tensor `{}` missing", path.display(), src.ldm_key()))?;
        let t = match &src {
            Source::Same(_) => t.clone(),
            Source::Reshape(_) => t.flatten_from(1)?,
            Source::Chunk { index, of, .. } => {
                let n = t.dim(0)? / of;
                t.narrow(0, index * n, n)?
            }
            Source::Transpose(_) => t.t()?.contiguous()?,
        };
        out.entry(comp).or_default().insert(key, t);
    }
    all.clear();
    Ok((family, out))
}

fn dim(m: &HashMap<String, Tensor>, key: &str, d: usize) -> Option<usize> {
    m.get(key).and_then(|t| t.dim(d).ok())
}

fn count_prefixed(m: &HashMap<String, Tensor>, f: impl Fn(usize) -> String) -> usize {
    (0..).take_while(|&i| m.keys().any(|k| k.starts_with(&f(i)))).count()
}

/// The family's U-Net config with the sizes found in the weights.
fn infer_unet(family: Family, m: &HashMap<String, Tensor>, pooled_dim: Option<usize>) -> Result<UNetConfig> {
    let mut c = match family {
        Family::Sdxl => tiny::sdxl().unet,
        _ => tiny::sd15().unet,
    };
    // pruned U-Nets (BK-SDM) have no mid block: diffusers' config says so with null
    c.mid_block_type =
        m.keys().any(|k| k.starts_with("mid_block.")).then(|| "UNetMidBlock2DCrossAttn".into());
    let n = count_prefixed(m, |i| format!("down_blocks.{i}."));
    c.block_out_channels =
        (0..n).map(|i| dim(m, &format!("down_blocks.{i}.resnets.0.conv1.weight"), 0).unwrap_or(0)).collect();
    c.layers_per_block = count_prefixed(m, |j| format!("down_blocks.0.resnets.{j}."));
    let cross = |i: usize, up: bool| {
        m.keys().any(|k| k.starts_with(&format!("{}_blocks.{i}.attentions.", if up { "up" } else { "down" })))
    };
    c.down_block_types = (0..n)
        .map(|i| if cross(i, false) { "CrossAttnDownBlock2D" } else { "DownBlock2D" }.to_string())
        .collect();
    c.up_block_types =
        (0..n).map(|i| if cross(i, true) { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string()).collect();
    c.in_channels = dim(m, "conv_in.weight", 1).unwrap_or(4);
    c.out_channels = dim(m, "conv_out.weight", 0).unwrap_or(4);
    let attn_key = m.keys().find(|k| k.ends_with("attn2.to_k.weight")).cloned();
    if let Some(k) = attn_key {
        c.cross_attention_dim = dim(m, &k, 1).unwrap_or(c.cross_attention_dim);
    }
    let proj = m.keys().find(|k| k.ends_with("attentions.0.proj_in.weight")).cloned();
    c.use_linear_projection = proj.map(|k| m[&k].rank() == 2).unwrap_or(false);
    let tlpb: Vec<usize> = (0..n)
        .map(|i| {
            count_prefixed(m, |b| format!("down_blocks.{i}.attentions.0.transformer_blocks.{b}.")).max(1)
        })
        .collect();
    c.transformer_layers_per_block = PerBlock::Many(tlpb);
    // Heads are not in the weights: SD1 uses 8 heads, SD2 and SDXL heads of width 64.
    c.attention_head_dim = match family {
        Family::Sd1 => PerBlock::One(8),
        _ => PerBlock::Many(c.block_out_channels.iter().map(|&ch| (ch / 64).max(1)).collect()),
    };
    if family == Family::Sd2 {
        c.addition_embed_type = None;
    }
    // the weights do not tell the image size (SD2 comes at 512 and 768): the family's default
    c.sample_size = None;
    if family == Family::Sdxl {
        let add_in = dim(m, "add_embedding.linear_1.weight", 1).unwrap_or(2816);
        c.projection_class_embeddings_input_dim = Some(add_in);
        c.addition_time_embed_dim = Some((add_in - pooled_dim.unwrap_or(1280)) / 6);
    }
    Ok(c)
}

fn infer_vae(family: Family, m: &HashMap<String, Tensor>) -> VaeConfig {
    let mut c = tiny::sd15().vae;
    let n = count_prefixed(m, |i| format!("encoder.down_blocks.{i}."));
    c.block_out_channels = (0..n)
        .map(|i| dim(m, &format!("encoder.down_blocks.{i}.resnets.0.conv2.weight"), 0).unwrap_or(0))
        .collect();
    c.layers_per_block = count_prefixed(m, |j| format!("encoder.down_blocks.0.resnets.{j}."));
    c.latent_channels = dim(m, "decoder.conv_in.weight", 1).unwrap_or(4);
    if family == Family::Sdxl {
        c.scaling_factor = 0.13025;
    }
    c
}

fn infer_clip(m: &HashMap<String, Tensor>, quick_gelu: bool, projection: bool) -> ClipTextConfig {
    let mut c = tiny::sd15().text_encoders[0].clone();
    c.vocab_size = dim(m, "text_model.embeddings.token_embedding.weight", 0).unwrap_or(49408);
    c.hidden_size = dim(m, "text_model.embeddings.token_embedding.weight", 1).unwrap_or(768);
    c.max_position_embeddings = dim(m, "text_model.embeddings.position_embedding.weight", 0).unwrap_or(77);
    c.intermediate_size = dim(m, "text_model.encoder.layers.0.mlp.fc1.weight", 0).unwrap_or(3072);
    c.num_hidden_layers = count_prefixed(m, |i| format!("text_model.encoder.layers.{i}."));
    c.num_attention_heads = (c.hidden_size / 64).max(1);
    c.hidden_act = if quick_gelu { "quick_gelu" } else { "gelu" }.into();
    if projection {
        c.projection_dim = dim(m, "text_projection.weight", 0);
        c.architectures = Some(vec!["CLIPTextModelWithProjection".into()]);
    }
    c
}

/// A single file's tensors, renamed into diffusers' layout, by component.
pub fn read_components(path: &Path) -> Result<(Family, Components)> {
    split(path, read_all(path)?)
}

/// The configs this loader would infer for a single file (no config folder).
pub fn infer_configs(path: &Path) -> Result<(Family, UNetConfig, VaeConfig, Vec<ClipTextConfig>)> {
    let (family, comps) = split(path, read_all(path)?)?;
    let empty = HashMap::new();
    let comp = |c: &str| comps.get(c).unwrap_or(&empty);
    let mut tes = vec![infer_clip(comp("text_encoder"), family != Family::Sd2, false)];
    if family == Family::Sdxl {
        tes.push(infer_clip(comp("text_encoder_2"), false, true));
    }
    let pooled = tes.get(1).and_then(|c| c.projection_dim);
    Ok((family, infer_unet(family, comp("unet"), pooled)?, infer_vae(family, comp("vae")), tes))
}

pub fn load_single_file(path: &Path, opts: &LoadOptions) -> Result<StableDiffusion> {
    let (family, comps) = split(path, read_all(path)?)?;
    let empty = HashMap::new();
    let comp = |c: &str| comps.get(c).unwrap_or(&empty);
    let cfg_dir = opts.config.as_deref();
    let read_cfg =
        |sub: &str| -> Option<std::path::PathBuf> { cfg_dir.map(|d| d.join(sub).join("config.json")) };
    let origin = path.display().to_string();
    let weights =
        |m: &HashMap<String, Tensor>| Weights::from_map(m.clone(), &origin, opts.dtype, &opts.device);
    let err = |e: candle_core::Error| anyhow::anyhow!("{e}");

    let te_names: &[&str] =
        if family == Family::Sdxl { &["text_encoder", "text_encoder_2"] } else { &["text_encoder"] };
    let mut te_cfgs = vec![];
    for (i, name) in te_names.iter().enumerate() {
        te_cfgs.push(match read_cfg(name) {
            Some(p) => folder::read_json(&p)?,
            None => {
                infer_clip(comp(name), family == Family::Sd1 || (family == Family::Sdxl && i == 0), i == 1)
            }
        });
    }
    let pooled = te_cfgs.get(1).and_then(|c: &ClipTextConfig| c.projection_dim);
    let unet_cfg = match read_cfg("unet") {
        Some(p) => folder::read_json(&p)?,
        None => infer_unet(family, comp("unet"), pooled)?,
    };
    let unet = opts
        .unet
        .then(|| UNet2DConditionModel::load(&unet_cfg, &weights(comp("unet"))).map_err(err))
        .transpose()?;
    let vae = if opts.vae {
        let cfg = match read_cfg("vae") {
            Some(p) => folder::read_json(&p)?,
            None => infer_vae(family, comp("vae")),
        };
        Some(AutoencoderKL::load(&cfg, &weights(comp("vae"))).map_err(err)?)
    } else {
        None
    };
    let mut text_encoders = vec![];
    if opts.text_encoders {
        for (name, cfg) in te_names.iter().zip(&te_cfgs) {
            text_encoders.push(ClipTextModel::load(cfg, &weights(comp(name))).map_err(err)?);
        }
    }
    let scheduler = match cfg_dir.map(|d| d.join("scheduler/scheduler_config.json")).filter(|p| p.exists()) {
        Some(p) => folder::read_json(&p)?,
        None => SchedulerConfig::default(),
    };
    Ok(StableDiffusion {
        family,
        unet,
        vae,
        text_encoders,
        tokenizer_dirs: te_names.iter().map(|_| None).collect(),
        scheduler,
        source: origin,
        lora_switch: crate::model::layers::adapter::switch(),
        files: super::Files {
            unet: vec![path.to_path_buf()],
            vae: vec![path.to_path_buf()],
            text_encoders: vec![path.to_path_buf()],
        },
    })
}
