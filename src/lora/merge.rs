//! `merge`: LoRAs baked into a model's weights, written as a diffusers folder or as one
//! single-file checkpoint in the original LDM/SGM naming.
use super::format::{read, resolve_all};
use super::ops::merged;
use crate::model::load::ldm_keys::{plan_to_ldm, UnetLayout};
use crate::model::load::{folder, single_file, Family};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

const COMPONENTS: [&str; 4] = ["unet", "vae", "text_encoder", "text_encoder_2"];

/// Every weight of a model by component (diffusers names), with its configs.
pub struct ModelTensors {
    pub family: Family,
    pub comps: BTreeMap<String, HashMap<String, Tensor>>,
    pub configs: HashMap<String, serde_json::Value>,
    /// The source folder (tokenizer, scheduler and model_index.json are copied from it).
    pub folder: Option<PathBuf>,
}

impl ModelTensors {
    /// The U-Net layout kohya names are written against.
    pub fn layout(&self) -> UnetLayout {
        let cfg = self
            .configs
            .get("unet")
            .and_then(|v| serde_json::from_value::<crate::model::config::UNetConfig>(v.clone()).ok());
        match cfg {
            Some(u) => UnetLayout::from_block_types(u.layers_per_block, &u.up_block_types),
            None => UnetLayout::standard(self.family),
        }
    }
}

pub fn read_model(source: &str, config: Option<&Path>) -> Result<ModelTensors> {
    let path = Path::new(source);
    let dir =
        if path.is_dir() { Some(path.to_path_buf()) } else { crate::model::load::hub::resolve(source)? };
    if let Some(dir) = dir {
        let mut comps = BTreeMap::new();
        let mut configs = HashMap::new();
        for c in COMPONENTS {
            let d = dir.join(c);
            if !d.is_dir() {
                continue;
            }
            let stem = if c.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" };
            let mut m = HashMap::new();
            for f in folder::component_files(&d, stem, false)? {
                if f.extension().is_some_and(|e| e == "safetensors") {
                    m.extend(candle_core::safetensors::load(&f, &Device::Cpu)?);
                } else {
                    m.extend(crate::model::load::ckpt::read_pickle(&f, None)?);
                }
            }
            if c.starts_with("text_encoder") {
                // one naming for both transformers layouts: with the `text_model.` level
                m = m
                    .into_iter()
                    .map(|(k, t)| {
                        if k.starts_with("text_model.") || k.starts_with("text_projection") {
                            (k, t)
                        } else {
                            (format!("text_model.{k}"), t)
                        }
                    })
                    .collect();
            }
            comps.insert(c.to_string(), m);
            configs.insert(c.to_string(), folder::read_json(&d.join("config.json"))?);
        }
        let unet_cfg = serde_json::from_value(configs.get("unet").cloned().context("no unet")?)?;
        let family = crate::model::load::family_of(&unet_cfg, comps.contains_key("text_encoder_2"));
        return Ok(ModelTensors { family, comps, configs, folder: Some(dir) });
    }
    if !path.is_file() {
        bail!("{source}: no such model file or folder");
    }
    let (family, comps) = single_file::read_components(path)?;
    let (_, mut u, v, tes) = single_file::infer_configs(path)?;
    // a written config needs a size (diffusers' pipelines draw at sample_size × VAE scale); the
    // weights do not tell it, so the family's usual one
    u.sample_size.get_or_insert(if family == crate::model::load::Family::Sdxl { 128 } else { 64 });
    let mut configs: HashMap<String, serde_json::Value> = HashMap::new();
    configs.insert("unet".into(), serde_json::to_value(u)?);
    configs.insert("vae".into(), serde_json::to_value(v)?);
    for (i, t) in tes.iter().enumerate() {
        configs.insert(COMPONENTS[2 + i].into(), serde_json::to_value(t)?);
    }
    if let Some(cfg) = config {
        for c in COMPONENTS {
            let p = cfg.join(c).join("config.json");
            if p.exists() {
                configs.insert(c.into(), folder::read_json(&p)?);
            }
        }
    }
    Ok(ModelTensors {
        family,
        comps: comps.into_iter().collect(),
        configs,
        folder: config.map(Path::to_path_buf),
    })
}

/// The weight key of a module path in a component's map (text encoders are saved with or
/// without the `text_model.` level).
fn weight_key(m: &HashMap<String, Tensor>, path: &str) -> Option<String> {
    let k = format!("{path}.weight");
    if m.contains_key(&k) {
        return Some(k);
    }
    path.strip_prefix("text_model.").map(|p| format!("{p}.weight")).filter(|k| m.contains_key(k))
}

/// Adds scale · ΔW of each LoRA to the weights. Returns how many modules were changed.
pub fn merge_loras(model: &mut ModelTensors, loras: &[(PathBuf, f64)]) -> Result<usize> {
    // targets: every 2-D/4-D weight, as module paths (text encoders with `text_model.`)
    let mut targets = vec![];
    for (c, m) in &model.comps {
        if c == "vae" {
            continue;
        }
        for (k, t) in m {
            if let (Some(p), 2 | 4) = (k.strip_suffix(".weight"), t.rank()) {
                let p = if c.starts_with("text_encoder")
                    && !p.starts_with("text_model.")
                    && p.starts_with("encoder.")
                {
                    format!("text_model.{p}")
                } else {
                    p.to_string()
                };
                targets.push((c.clone(), p));
            }
        }
    }
    let layout = model.layout();
    let mut n = 0;
    for (path, scale) in loras {
        let file = read(path)?;
        let (entries, lycoris) =
            resolve_all(&file, &targets, model.family, &layout, &path.display().to_string())?;
        for (comp, mpath, l) in lycoris {
            let m = model.comps.get_mut(&comp).expect("target component");
            let key = weight_key(m, &mpath).expect("target weight");
            let w = &m[&key];
            let new_w = (w.to_dtype(candle_core::DType::F64)? + (l.delta(w.dims())? * *scale)?)?
                .to_dtype(w.dtype())?;
            m.insert(key, new_w);
            n += 1;
        }
        for (comp, mpath, t) in entries {
            let m = model.comps.get_mut(&comp).expect("target component");
            let key = weight_key(m, &mpath).expect("target weight");
            let w = &m[&key];
            let new_w = merged(&t, w, *scale)?.to_dtype(w.dtype())?;
            m.insert(key, new_w);
            n += 1;
        }
        for (word, k, v) in &file.embeddings {
            merge_embedding(model, word, *k, v)
                .with_context(|| format!("{}: embedding `{word}`", path.display()))?;
            n += 1;
        }
    }
    Ok(n)
}

/// A bundled embedding becomes its word's row of the text encoder's token embedding table: in
/// the merged model every prompt encodes as with the LoRA file applied.
fn merge_embedding(model: &mut ModelTensors, word: &str, k: usize, v: &Tensor) -> Result<()> {
    let comp = ["text_encoder", "text_encoder_2"].get(k).context("no such text encoder")?;
    let tok = match model.folder.as_ref().map(|f| f.join(["tokenizer", "tokenizer_2"][k])) {
        Some(d) if d.is_dir() => crate::model::tokenizer::ClipTokenizer::from_folder(&d)?,
        _ => crate::model::tokenizer::ClipTokenizer::embedded()?,
    };
    let m = model.comps.get_mut(*comp).with_context(|| format!("the model has no {comp}"))?;
    let key = ["text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"]
        .into_iter()
        .find(|k| m.contains_key(*k))
        .with_context(|| format!("the model's {comp} has no token embedding table"))?;
    let table = &m[key];
    let id = crate::lora::embedding::token_of(&tok, table.dims2()?.0, word)?;
    let merged = crate::lora::embedding::with_row(table, id, v)
        .with_context(|| format!("embedding `{word}` into the model's {comp}"))?;
    m.insert(key.to_string(), merged);
    Ok(())
}

/// Writes a diffusers folder (configs, weights, and the source's scheduler/tokenizer files).
/// scheduler_config.json of the family's original repository (SD 1.5 and 2.x: PNDM; SDXL: Euler).
fn original_scheduler(family: Family) -> serde_json::Value {
    let mut v = serde_json::json!({
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "clip_sample": false,
        "trained_betas": null,
        "prediction_type": "epsilon"
    });
    if family == Family::Sdxl {
        v["_class_name"] = "EulerDiscreteScheduler".into();
        v["interpolation_type"] = "linear".into();
        v["timestep_spacing"] = "leading".into();
        v["use_karras_sigmas"] = false.into();
        v["sample_max_value"] = 1.0.into();
    }
    v
}

/// Writes the model as a diffusers folder: into a temporary sibling first, renamed into place
/// when whole, so a stopped merge leaves no half-written model. `out` must not exist or be empty.
pub fn write_folder(model: &ModelTensors, out: &Path) -> Result<()> {
    if out.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        anyhow::bail!("{}: the folder exists and is not empty — choose a new folder", out.display());
    }
    let name = out.file_name().with_context(|| format!("{}: not a folder name", out.display()))?;
    let tmp = out.with_file_name(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let res = write_folder_into(model, &tmp).and_then(|_| {
        std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot create the folder", out.display()))
    });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

fn write_folder_into(model: &ModelTensors, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create folder", out.display()))?;
    for (c, m) in &model.comps {
        let d = out.join(c);
        std::fs::create_dir_all(&d)?;
        let file = if c.starts_with("text_encoder") {
            "model.safetensors"
        } else {
            "diffusion_pytorch_model.safetensors"
        };
        let tensors: Vec<(String, Tensor)> = m.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        crate::model::weights::save_atomic(&d.join(file), &tensors, &HashMap::new())?;
        if let Some(cfg) = model.configs.get(c) {
            crate::util::write_atomic(&d.join("config.json"), serde_json::to_string_pretty(cfg)?.as_bytes())?;
        }
    }
    if let Some(src) = &model.folder {
        for sub in ["scheduler", "tokenizer", "tokenizer_2"] {
            if src.join(sub).is_dir() {
                std::fs::create_dir_all(out.join(sub))?;
                for e in std::fs::read_dir(src.join(sub))? {
                    let e = e?;
                    std::fs::copy(e.path(), out.join(sub).join(e.file_name()))?;
                }
            }
        }
        if src.join("model_index.json").exists() {
            std::fs::copy(src.join("model_index.json"), out.join("model_index.json"))?;
        }
    }
    if !out.join("scheduler").is_dir() {
        // a single file holds no scheduler: the one of the family's original repository, which
        // diffusers' from_single_file takes too
        std::fs::create_dir_all(out.join("scheduler"))?;
        let json = serde_json::to_string_pretty(&original_scheduler(model.family))?;
        crate::util::write_atomic(&out.join("scheduler/scheduler_config.json"), json.as_bytes())?;
    }
    if !out.join("model_index.json").exists() {
        let class = if model.family == Family::Sdxl {
            "StableDiffusionXLPipeline"
        } else {
            "StableDiffusionPipeline"
        };
        let mut index = serde_json::json!({"_class_name": class});
        let libs = [
            ("unet", "diffusers", "UNet2DConditionModel"),
            ("vae", "diffusers", "AutoencoderKL"),
            ("text_encoder", "transformers", "CLIPTextModel"),
            ("text_encoder_2", "transformers", "CLIPTextModelWithProjection"),
        ];
        for (c, lib, class) in libs {
            if model.comps.contains_key(c) {
                index[c] = serde_json::json!([lib, class]);
            }
        }
        let scheduler = original_scheduler(model.family)["_class_name"].clone();
        index["scheduler"] = serde_json::json!(["diffusers", scheduler]);
        crate::util::write_atomic(
            &out.join("model_index.json"),
            serde_json::to_string_pretty(&index)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Writes one single-file checkpoint with the original LDM/SGM key names.
pub fn write_single_file(model: &ModelTensors, out: &Path) -> Result<()> {
    use crate::model::load::ldm_keys::Source;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut chunks: BTreeMap<String, Vec<(usize, Tensor)>> = BTreeMap::new();
    for (c, m) in &model.comps {
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        let plan =
            plan_to_ldm(model.family, c, &keys).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
        for (k, src) in plan {
            let t = &m[&k];
            match src {
                Source::Same(l) => {
                    tensors.insert(l, t.clone());
                }
                Source::Reshape(l) => {
                    tensors.insert(l, t.unsqueeze(2)?.unsqueeze(3)?);
                }
                Source::Transpose(l) => {
                    tensors.insert(l, t.t()?.contiguous()?);
                }
                Source::Chunk { key, index, .. } => chunks.entry(key).or_default().push((index, t.clone())),
            }
        }
    }
    for (k, mut parts) in chunks {
        parts.sort_by_key(|(i, _)| *i);
        tensors.insert(k, Tensor::cat(&parts.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)?);
    }
    let tensors: Vec<(String, Tensor)> = tensors.into_iter().collect();
    crate::model::weights::save_atomic(out, &tensors, &HashMap::new())
}
