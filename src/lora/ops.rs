//! What the toolbox does to LoRA files: find their base family, convert, resize by SVD, extract
//! from a fine-tuned model, and bake into base weights.
use super::apply::model_targets;
pub use super::format::LycorisEntry;
use super::format::{resolve_all, Entry, LoraFile, LoraTensors, Targets};
use super::svd::svd;
use crate::model::load::ldm_keys::UnetLayout;
use crate::model::load::{Family, StableDiffusion};
use crate::model::tiny;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};

/// The base family a LoRA was made for: from its names (SDXL's two text encoders, SGM blocks),
/// its metadata, or the width of the cross-attention context it adapts.
pub fn detect_family(file: &LoraFile) -> Family {
    let stems = || file.modules.keys().chain(file.lycoris.keys());
    if stems()
        .any(|s| s.starts_with("lora_te1_") || s.starts_with("lora_te2_") || s.starts_with("text_encoder_2."))
        || stems()
            .any(|s| s.contains("input_blocks") || s.contains("output_blocks") || s.contains("middle_block"))
    {
        return Family::Sdxl;
    }
    match file.metadata.get("ss_base_model_version").map(String::as_str) {
        Some(v) if v.starts_with("sdxl") => return Family::Sdxl,
        Some(v) if v.starts_with("sd_v2") => return Family::Sd2,
        _ => {}
    }
    for (stem, t) in &file.modules {
        if stem.contains("attn2") && (stem.ends_with("to_k") || stem.ends_with("to_v")) {
            match t.down.dims().get(1) {
                Some(2048) => return Family::Sdxl,
                Some(1024) => return Family::Sd2,
                _ => {}
            }
        }
    }
    Family::Sd1
}

/// The U-Net shape whose module paths cover every model of the family (all blocks with
/// attention, ten transformer layers each), for tools that run without a model.
fn superset(family: Family) -> tiny::PipelineConfig {
    let mut cfg = if family == Family::Sdxl { tiny::sdxl() } else { tiny::sd15() };
    let n = cfg.unet.block_out_channels.len();
    cfg.unet.down_block_types = vec!["CrossAttnDownBlock2D".into(); n];
    cfg.unet.up_block_types = vec!["CrossAttnUpBlock2D".into(); n];
    cfg.unet.transformer_layers_per_block = crate::model::config::PerBlock::One(10);
    cfg.unet.attention_head_dim = crate::model::config::PerBlock::One(8);
    cfg
}

/// The kohya naming layout that goes with `standard_targets`.
pub fn standard_layout(family: Family) -> UnetLayout {
    let u = superset(family).unet;
    UnetLayout::from_block_types(u.layers_per_block, &u.up_block_types)
}

/// Module paths of the family's networks (a superset of every variant), for tools that run
/// without a model.
pub fn standard_targets(family: Family) -> Result<Targets> {
    let cfg = superset(family);
    let w = crate::model::weights::Weights::meta();
    let mut sd = StableDiffusion {
        family,
        unet: Some(crate::model::unet::UNet2DConditionModel::load(&cfg.unet, &w)?),
        vae: None,
        text_encoders: cfg
            .text_encoders
            .iter()
            .map(|c| crate::model::clip::ClipTextModel::load(c, &w))
            .collect::<candle_core::Result<_>>()?,
        tokenizer_dirs: vec![],
        scheduler: Default::default(),
        source: String::new(),
        lora_switch: crate::model::layers::adapter::switch(),
        files: Default::default(),
    };
    Ok(model_targets(&mut sd))
}

/// A LoRA file's modules as (component, path, tensors), resolved against the standard
/// architecture of its family; LyCORIS modules are refused (the toolbox's transforms are LoRA's).
pub fn standard_entries(file: &LoraFile, origin: &str) -> Result<(Family, Vec<Entry>)> {
    let (family, entries, lycoris) = standard_all(file, origin)?;
    if let Some((_, _, l)) = lycoris.first() {
        anyhow::bail!(
            "{origin}: holds LyCORIS {} modules, which `generate`, `merge` and `inspect` read but `convert`, `resize` and `extract` do not (they handle LoRA and DoRA)",
            l.kind()
        );
    }
    Ok((family, entries))
}

/// The LoRA and the LyCORIS modules of a file, resolved as `standard_entries` does.
pub fn standard_all(file: &LoraFile, origin: &str) -> Result<(Family, Vec<Entry>, Vec<LycorisEntry>)> {
    let family = detect_family(file);
    let targets = standard_targets(family)?;
    let (entries, lycoris) = resolve_all(file, &targets, family, &standard_layout(family), origin)?;
    Ok((family, entries, lycoris))
}

/// scale · up · down in the shape of the adapted weight ([out, in] or [out, in, kh, kw]).
pub fn delta(t: &LoraTensors, weight_shape: &[usize], multiplier: f64) -> Result<Tensor> {
    let r = t.rank();
    let up = t.up.to_dtype(DType::F64)?.reshape(((), r))?;
    let down = t.down.to_dtype(DType::F64)?.reshape((r, ()))?;
    Ok((up.matmul(&down)? * (t.scale() * multiplier))?.reshape(weight_shape)?)
}

/// The base weight `w` with the module merged in at `multiplier`: w + multiplier·scale·up·down,
/// or for DoRA w + multiplier·(m·(w + scale·up·down)/‖w + scale·up·down‖ − w), the norm per
/// output channel (ComfyUI's weight_decompose, without its 1e-7 guard). In f64.
pub fn merged(t: &LoraTensors, w: &Tensor, multiplier: f64) -> Result<Tensor> {
    let w64 = w.to_dtype(DType::F64)?;
    let Some(m) = &t.magnitude else { return Ok((&w64 + delta(t, w.dims(), multiplier)?)?) };
    let o = w.dim(0)?;
    let calc = (&w64 + delta(t, w.dims(), 1.0)?)?.reshape((o, ()))?;
    let norm = calc.sqr()?.sum_keepdim(1)?.sqrt()?;
    let g = m.to_dtype(DType::F64)?.reshape((o, 1))?.div(&norm)?;
    let decomposed = calc.broadcast_mul(&g)?.reshape(w.dims())?;
    Ok((&w64 + ((decomposed - &w64)? * multiplier)?)?)
}

/// Reduces a module to `rank` by SVD of its update; returns it with the share of the update's
/// squared Frobenius norm that is kept. The new alpha equals the new rank (scale 1).
pub fn resize(t: &LoraTensors, rank: usize) -> Result<(LoraTensors, f64)> {
    let (down_shape, up_shape) = (t.down.dims().to_vec(), t.up.dims().to_vec());
    let r = rank.min(t.rank());
    let full = delta(t, &[up_shape[0], down_shape[1..].iter().product::<usize>()], 1.0)?;
    let (u, s, vt, total) = svd(&full, r, 0)?;
    let kept: f64 = s.iter().map(|x| x * x).sum();
    let sq: Vec<f64> = s.iter().map(|x| x.sqrt()).collect();
    let sq = Tensor::from_vec(sq, r, &Device::Cpu)?;
    let up = u.broadcast_mul(&sq.unsqueeze(0)?)?;
    let down = vt.broadcast_mul(&sq.unsqueeze(1)?)?;
    let mut ds = down_shape.clone();
    ds[0] = r;
    let mut us = up_shape.clone();
    us[1] = r;
    let out = LoraTensors {
        down: down.reshape(ds)?.to_dtype(DType::F32)?,
        up: up.reshape(us)?.to_dtype(DType::F32)?,
        alpha: Some(r as f64),
        // DoRA keeps its magnitudes: the direction is what the rank approximates
        magnitude: t.magnitude.clone(),
    };
    Ok((out, if total > 0.0 { kept / total } else { 1.0 }))
}

/// A rank-`rank` LoRA approximating `tuned − base` for one weight; returns it with the share
/// of the difference's squared Frobenius norm it captures.
pub fn extract(base: &Tensor, tuned: &Tensor, rank: usize) -> Result<(LoraTensors, f64)> {
    let shape = base.dims().to_vec();
    let diff = (tuned.to_dtype(DType::F64)? - base.to_dtype(DType::F64)?)?.reshape((shape[0], ()))?;
    let (out, inn) = diff.dims2()?;
    let r = rank.min(out).min(inn);
    let (u, s, vt, total) = svd(&diff, r, 0)?;
    let kept: f64 = s.iter().map(|x| x * x).sum();
    let sq = Tensor::from_vec(s.iter().map(|x| x.sqrt()).collect::<Vec<_>>(), r, &Device::Cpu)?;
    let up = u.broadcast_mul(&sq.unsqueeze(0)?)?;
    let down = vt.broadcast_mul(&sq.unsqueeze(1)?)?;
    let (ds, us): (Vec<usize>, Vec<usize>) = if shape.len() == 4 {
        (vec![r, shape[1], shape[2], shape[3]], vec![shape[0], r, 1, 1])
    } else {
        (vec![r, shape[1]], vec![shape[0], r])
    };
    let t = LoraTensors {
        down: down.reshape(ds)?.to_dtype(DType::F32)?,
        up: up.reshape(us)?.to_dtype(DType::F32)?,
        alpha: Some(r as f64),
        magnitude: None,
    };
    Ok((t, if total > 0.0 { kept / total } else { 1.0 }))
}
