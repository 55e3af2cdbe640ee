//! LoRA files: kohya's format (the default we write), PEFT/diffusers (`--format peft`), and
//! diffusers' legacy names on reading. Keys are resolved against the model's own module paths,
//! so every tensor either lands on a layer or is reported.
use super::attach::AdapterInfo;
use super::names::KohyaNames;
use crate::model::load::ldm_keys::UnetLayout;
use crate::model::load::Family;
use crate::model::load::StableDiffusion;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A LoRA file's key layout. kohya and peft are written; the legacy diffusers layout is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraFormat {
    Kohya,
    #[value(alias = "diffusers")]
    #[serde(alias = "diffusers")]
    Peft,
    #[value(skip)]
    #[serde(skip)]
    DiffusersLegacy,
}

/// One module's adapter as stored in a file.
#[derive(Clone)]
pub struct LoraTensors {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
    /// DoRA's magnitude per output channel, [out] (kohya/LyCORIS `dora_scale`, PEFT
    /// `lora_magnitude_vector`).
    pub magnitude: Option<Tensor>,
}

impl LoraTensors {
    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(0)
    }
    /// alpha / rank, alpha defaulting to the rank (scale 1).
    pub fn scale(&self) -> f64 {
        self.alpha.map(|a| a / self.rank() as f64).unwrap_or(1.0)
    }
}

pub struct LoraFile {
    pub format: LoraFormat,
    /// Module stem as written in the file (kohya name, or `unet.<path>` for PEFT).
    pub modules: BTreeMap<String, LoraTensors>,
    pub metadata: HashMap<String, String>,
    /// Bundled embeddings (`super::embedding`): (word, text encoder index, vector).
    pub embeddings: Vec<(String, usize, Tensor)>,
    /// LyCORIS LoHa / LoKr modules by stem (kohya names): merged whole, never trained.
    pub lycoris: BTreeMap<String, super::lycoris::Lycoris>,
}

impl LoraFile {
    /// The file's bundled embeddings under their Automatic1111 names, for writing a copy.
    pub fn embedding_tensors(&self, family: Family, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        let encoders = if family == Family::Sdxl { 2 } else { 1 };
        self.embeddings
            .iter()
            .map(|(w, k, t)| {
                let name = super::embedding::bundle_keys(w, encoders).swap_remove(*k);
                Ok((name, t.to_dtype(dtype)?))
            })
            .collect()
    }

    /// The format to write a transformed copy in: the same, with legacy names written as PEFT.
    pub fn format_for_write(&self) -> LoraFormat {
        if self.format == LoraFormat::DiffusersLegacy {
            LoraFormat::Peft
        } else {
            self.format
        }
    }
}

/// Splits a tensor name into (module stem, role) for every naming we read.
fn split_key(k: &str) -> Option<(String, &'static str, LoraFormat)> {
    const SUFFIXES: &[(&str, &str, LoraFormat)] = &[
        (".lora_down.weight", "down", LoraFormat::Kohya),
        (".lora_up.weight", "up", LoraFormat::Kohya),
        (".alpha", "alpha", LoraFormat::Kohya),
        (".dora_scale", "magnitude", LoraFormat::Kohya),
        (".lora_magnitude_vector", "magnitude", LoraFormat::Peft),
        (".lora_magnitude_vector.weight", "magnitude", LoraFormat::Peft),
        (".lora_A.weight", "down", LoraFormat::Peft),
        (".lora_B.weight", "up", LoraFormat::Peft),
        (".lora.down.weight", "down", LoraFormat::DiffusersLegacy),
        (".lora.up.weight", "up", LoraFormat::DiffusersLegacy),
        (".lora_linear_layer.down.weight", "down", LoraFormat::DiffusersLegacy),
        (".lora_linear_layer.up.weight", "up", LoraFormat::DiffusersLegacy),
    ];
    for (suf, role, f) in SUFFIXES {
        if let Some(stem) = k.strip_suffix(suf) {
            // attention-processor era: `attn1.processor.to_q_lora.down.weight`
            let stem = stem.replace(".processor.", ".").replace("_lora", "");
            return Some((stem, role, *f));
        }
    }
    if let Some(stem) = k.strip_suffix("_lora.down.weight") {
        return Some((stem.replace(".processor.", "."), "down", LoraFormat::DiffusersLegacy));
    }
    if let Some(stem) = k.strip_suffix("_lora.up.weight") {
        return Some((stem.replace(".processor.", "."), "up", LoraFormat::DiffusersLegacy));
    }
    None
}

/// (down, up, alpha, magnitude) of one module while reading.
type Parts = (Option<Tensor>, Option<Tensor>, Option<f64>, Option<Tensor>);

pub fn read(path: &Path) -> Result<LoraFile> {
    let data = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse(&data, &path.display().to_string())
}

/// A LoRA file's bytes: format detected, keys parsed, every module checked whole (down and up
/// of agreeing rank, a one-value alpha, finite values). `file` names it in errors.
pub fn parse(data: &[u8], file: &str) -> Result<LoraFile> {
    let header = crate::model::header::check_bytes(data, file)?;
    let metadata = header.metadata;
    let tensors = candle_core::safetensors::load_buffer(data, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{file}: cannot read tensors: {e}"))?;
    let mut names: Vec<&str> = header.tensors.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let mut format = None;
    let mut unknown = vec![];
    let mut embeddings = vec![];
    let mut lycoris: BTreeMap<String, super::lycoris::Lycoris> = BTreeMap::new();
    for name in names {
        let t = &tensors[name];
        let sum = t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if !sum.is_finite() {
            bail!("{file}: tensor `{name}` holds NaN or infinite values — the LoRA is broken (a diverged run?); use an earlier checkpoint");
        }
        if let Some((word, k)) = super::embedding::parse_key(name) {
            embeddings.push((word, k, t.to_dtype(DType::F32)?));
            continue;
        }
        if let Some((stem, part)) = super::lycoris::split(name) {
            format = format.or(Some(LoraFormat::Kohya));
            let e = lycoris
                .entry(stem.to_string())
                .or_insert_with(|| super::lycoris::Lycoris { parts: BTreeMap::new(), alpha: None });
            e.parts.insert(part, t.to_dtype(DType::F64)?);
            continue;
        }
        match split_key(name) {
            Some((stem, role, f)) => {
                format = format.or(Some(f));
                let e = parts.entry(stem).or_default();
                match role {
                    "down" => e.0 = Some(t.to_dtype(DType::F64)?),
                    "up" => e.1 = Some(t.to_dtype(DType::F64)?),
                    "magnitude" => e.3 = Some(t.to_dtype(DType::F64)?.flatten_all()?),
                    _ => match t.elem_count() {
                        1 => e.2 = Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0]),
                        n => {
                            bail!("{file}: `{name}` holds {n} values, an alpha is one — the file is damaged")
                        }
                    },
                }
            }
            None => unknown.push(name.to_string()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "{file}: {} tensors are not LoRA weights this tool understands (e.g. `{}`) — is this a LoRA file (LyCORIS's LoHa and LoKr are not supported)?",
            unknown.len(),
            unknown[0]
        );
    }
    let format = format.with_context(|| format!("{file}: no LoRA tensors in this file"))?;
    let mut modules = BTreeMap::new();
    for (stem, (d, u, a, m)) in parts {
        if let (None, None, Some(l)) = (&d, &u, lycoris.get_mut(&stem)) {
            l.alpha = a;
            if m.is_some() {
                bail!("{file}: module `{stem}`: DoRA on a LyCORIS {} module is not supported", l.kind());
            }
            continue;
        }
        match (d, u) {
            (Some(down), Some(up)) => {
                check_pair(&down, &up)
                    .map_err(|e| anyhow::anyhow!("{file}: module `{stem}`: {e} — the file is damaged"))?;
                if let Some(m) = m.as_ref().filter(|m| m.elem_count() != up.dim(0).unwrap_or(0)) {
                    bail!(
                        "{file}: module `{stem}`: a DoRA magnitude of {} values for {} output channels — the file is damaged",
                        m.elem_count(),
                        up.dim(0)?
                    );
                }
                modules.insert(stem, LoraTensors { down, up, alpha: a, magnitude: m });
            }
            _ => bail!("{file}: module `{stem}` lacks its down or up weight — the file is incomplete"),
        }
    }
    // PEFT keeps one alpha for the whole adapter in the header.
    if format == LoraFormat::Peft {
        if let Some(m) = metadata.get("lora_adapter_metadata") {
            let j: serde_json::Value = serde_json::from_str(m).unwrap_or_default();
            for (stem, t) in modules.iter_mut() {
                let (comp, module) = stem.split_once('.').unwrap_or(("unet", stem));
                let pattern = j
                    .get(format!("{comp}.alpha_pattern"))
                    .and_then(|p| p.get(module))
                    .and_then(|v| v.as_f64());
                if let Some(a) = pattern.or(j.get(format!("{comp}.lora_alpha")).and_then(|v| v.as_f64())) {
                    t.alpha = Some(a);
                }
            }
        }
    }
    for (stem, l) in &lycoris {
        if modules.contains_key(stem) {
            bail!("{file}: module `{stem}` holds both LoRA and {} tensors — the file is damaged", l.kind());
        }
        l.check().map_err(|e| anyhow::anyhow!("{file}: module `{stem}`: {e}"))?;
    }
    Ok(LoraFile { format, modules, metadata, embeddings, lycoris })
}

/// down [r, in] or [r, in, kh, kw], up [out, r] or [out, r, 1, 1], with r > 0.
fn check_pair(down: &Tensor, up: &Tensor) -> Result<()> {
    let (d, u) = (down.dims(), up.dims());
    let ok = match (d.len(), u.len()) {
        (2, 2) => d[0] == u[1],
        (4, 4) => d[0] == u[1] && u[2] == 1 && u[3] == 1,
        (4, 2) | (2, 4) => d[0] == u[1] && u[2..].iter().all(|&x| x == 1) && d[2..].iter().all(|&x| x == 1),
        _ => false,
    };
    if !ok || d[0] == 0 || d.contains(&0) || u.contains(&0) {
        bail!("down {d:?} and up {u:?} do not make a low-rank pair");
    }
    Ok(())
}

/// The component-qualified module paths a model offers adapters on: (component, path).
pub type Targets = Vec<(String, String)>;

/// Maps every module of the file to (component, module path). Unmatched modules are an error
/// that names them.
pub fn resolve(
    file: &LoraFile,
    targets: &Targets,
    family: Family,
    layout: &UnetLayout,
    origin: &str,
) -> Result<Vec<(String, String, LoraTensors)>> {
    Ok(resolve_all(file, targets, family, layout, origin)?.0)
}

/// `resolve` for the LoRA modules and the LyCORIS ones.
pub fn resolve_all(
    file: &LoraFile,
    targets: &Targets,
    family: Family,
    layout: &UnetLayout,
    origin: &str,
) -> Result<(Vec<Entry>, Vec<LycorisEntry>)> {
    // kohya names (and their accepted aliases) of every target.
    let mut by_name = KohyaNames::new(family, layout).index(targets);
    for (comp, path) in targets {
        by_name.insert(format!("{comp}.{path}"), (comp.clone(), path.clone()));
        if let Some(p) = path.strip_prefix("text_model.") {
            // transformers 5 dropped the `text_model.` level from CLIPTextModel
            by_name.insert(format!("{comp}.{p}"), (comp.clone(), path.clone()));
        }
        if comp == "unet" {
            by_name.insert(path.clone(), (comp.clone(), path.clone())); // legacy keys without prefix
        }
    }
    let mut out = vec![];
    let mut lyc = vec![];
    let mut missing = vec![];
    for (stem, t) in &file.modules {
        match by_name.get(stem) {
            Some((c, p)) => out.push((c.clone(), p.clone(), t.clone())),
            None => missing.push(stem.clone()),
        }
    }
    for (stem, t) in &file.lycoris {
        match by_name.get(stem) {
            Some((c, p)) => lyc.push((c.clone(), p.clone(), t.clone())),
            None => missing.push(stem.clone()),
        }
    }
    if !missing.is_empty() {
        let theirs = super::ops::detect_family(file);
        if theirs != family
            && !(theirs == Family::Sd2 && family == Family::Sd1)
            && !(theirs == Family::Sd1 && family == Family::Sd2)
        {
            bail!(
                "{origin}: this LoRA is for {} but the model is {} — use a LoRA trained on the same base family",
                theirs.name(),
                family.name()
            );
        }
        bail!(
            "{origin}: {} of {} LoRA modules match no layer of this {} model (first: `{}`) — was the LoRA trained for another base model?",
            missing.len(),
            file.modules.len() + file.lycoris.len(),
            family.name(),
            missing[0]
        );
    }
    Ok((out, lyc))
}

/// A LyCORIS module placed: (component, module path, tensors).
pub type LycorisEntry = (String, String, super::lycoris::Lycoris);

/// One module's adapter on its way to a file: (component, module path, tensors).
pub type Entry = (String, String, LoraTensors);

/// Trained adapters as file entries.
pub fn entries(adapters: &[(String, AdapterInfo)]) -> Vec<Entry> {
    adapters
        .iter()
        .filter(|(_, a)| a.lycoris.is_none())
        .map(|(c, a)| {
            let t = LoraTensors {
                down: a.down.as_tensor().clone(),
                up: a.up.as_tensor().clone(),
                alpha: Some(a.alpha),
                magnitude: a.magnitude.as_ref().map(|m| m.as_tensor().clone()),
            };
            (c.clone(), a.path.clone(), t)
        })
        .collect()
}

/// How a LoRA file is written: for the model family and U-Net layout, in `format` and `dtype`.
pub struct WriteAs<'a> {
    pub family: Family,
    pub layout: &'a UnetLayout,
    pub format: LoraFormat,
    pub dtype: DType,
}

/// Writes adapters (component, info) and `extra` tensors (bundled embeddings) to `path`
/// atomically (temp file, then rename).
pub fn write(
    path: &Path,
    adapters: &[(String, AdapterInfo)],
    mut extra: Vec<(String, Tensor)>,
    how: WriteAs,
    metadata: HashMap<String, String>,
) -> Result<()> {
    // LoHa / LoKr: LyCORIS's part names after the kohya module name, and an alpha
    let kohya = KohyaNames::new(how.family, how.layout);
    for (comp, a) in adapters {
        let Some(f) = &a.lycoris else { continue };
        if how.format != LoraFormat::Kohya {
            bail!("LoHa and LoKr are written in LyCORIS's kohya layout only (diffusers does not load them): leave out --format peft");
        }
        let n =
            kohya.name(comp, &a.path).with_context(|| format!("{comp} `{}` has no kohya name", a.path))?;
        for (part, v) in &f.vars {
            extra.push((format!("{n}.{part}"), v.as_tensor().to_dtype(how.dtype)?.to_device(&Device::Cpu)?));
        }
        extra.push((format!("{n}.alpha"), Tensor::new(a.alpha as f32, &Device::Cpu)?.to_dtype(how.dtype)?));
    }
    write_tensors(path, &entries(adapters), extra, how, metadata)
}

pub fn write_entries(
    path: &Path,
    entries: &[Entry],
    family: Family,
    layout: &UnetLayout,
    format: LoraFormat,
    dtype: DType,
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_tensors(path, entries, vec![], WriteAs { family, layout, format, dtype }, metadata)
}

/// `write_entries` with `extra` tensors (bundled embeddings) beside the adapters.
pub fn write_tensors(
    path: &Path,
    entries: &[Entry],
    mut tensors: Vec<(String, Tensor)>,
    how: WriteAs,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let WriteAs { family, layout, format, dtype } = how;
    let kohya = KohyaNames::new(family, layout);
    for (comp, mpath, t) in entries {
        let (down, up) = (t.down.to_dtype(dtype)?, t.up.to_dtype(dtype)?);
        match format {
            LoraFormat::Kohya => {
                let n =
                    kohya.name(comp, mpath).with_context(|| format!("{comp} `{mpath}` has no kohya name"))?;
                let alpha = t.alpha.unwrap_or(t.rank() as f64);
                tensors.push((format!("{n}.lora_down.weight"), down));
                tensors.push((format!("{n}.lora_up.weight"), up));
                tensors
                    .push((format!("{n}.alpha"), Tensor::new(alpha as f32, &Device::Cpu)?.to_dtype(dtype)?));
                if let Some(m) = &t.magnitude {
                    // LyCORIS's layout (wd_on_out): [out, 1] or [out, 1, 1, 1], what ComfyUI reads
                    let mut shape = vec![1; t.down.rank()];
                    shape[0] = m.elem_count();
                    tensors.push((format!("{n}.dora_scale"), m.reshape(shape)?.to_dtype(dtype)?));
                }
            }
            _ => {
                // PEFT names follow the module tree of the library that loads them; transformers 5
                // (what a current diffusers install brings) has no `text_model.` level.
                let p = peft_path(mpath);
                tensors.push((format!("{comp}.{p}.lora_A.weight"), down));
                tensors.push((format!("{comp}.{p}.lora_B.weight"), up));
                if let Some(m) = &t.magnitude {
                    // peft's: [out] for a Linear, [1, out, 1, 1] for a Conv2d
                    let shape = match t.down.rank() {
                        4 => vec![1, m.elem_count(), 1, 1],
                        _ => vec![m.elem_count()],
                    };
                    // diffusers' U-Net loader takes peft's own name; its text-encoder loader
                    // (transformers') only `.weight` after it (diffusers 0.42, transformers 5)
                    let key = match comp.as_str() {
                        "unet" => format!("{comp}.{p}.lora_magnitude_vector"),
                        _ => format!("{comp}.{p}.lora_magnitude_vector.weight"),
                    };
                    tensors.push((key, m.reshape(shape)?.to_dtype(dtype)?));
                }
            }
        }
    }
    metadata.remove("lora_adapter_metadata");
    if format != LoraFormat::Kohya {
        metadata.insert("lora_adapter_metadata".into(), peft_metadata(entries));
    }
    metadata.entry("format".into()).or_insert_with(|| "pt".into());
    crate::model::weights::save_atomic(path, &tensors, &metadata)
}

fn peft_path(p: &str) -> &str {
    p.strip_prefix("text_model.").unwrap_or(p)
}

/// PEFT's adapter config per component: the common rank and alpha, with `rank_pattern` /
/// `alpha_pattern` for modules that differ (e.g. after `resize`).
fn peft_metadata(entries: &[Entry]) -> String {
    let mut j = serde_json::Map::new();
    let mut comps: Vec<&String> = entries.iter().map(|(c, _, _)| c).collect();
    comps.sort();
    comps.dedup();
    for comp in comps {
        let mine: Vec<&Entry> = entries.iter().filter(|(c, _, _)| c == comp).collect();
        let mut targets: Vec<String> = mine.iter().map(|(_, p, _)| peft_path(p).to_string()).collect();
        targets.sort();
        let most = |f: &dyn Fn(&LoraTensors) -> f64| -> f64 {
            let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
            mine.iter().for_each(|(_, _, t)| *counts.entry(f(t).to_bits()).or_default() += 1);
            f64::from_bits(*counts.iter().max_by_key(|(_, n)| **n).expect("non-empty").0)
        };
        let rank_of = |t: &LoraTensors| t.rank() as f64;
        let alpha_of = |t: &LoraTensors| t.alpha.unwrap_or(t.rank() as f64);
        let (r, alpha) = (most(&rank_of), most(&alpha_of));
        let (mut rp, mut ap) = (serde_json::Map::new(), serde_json::Map::new());
        for (_, p, t) in &mine {
            if rank_of(t) != r {
                rp.insert(peft_path(p).to_string(), (t.rank()).into());
            }
            if alpha_of(t) != alpha {
                ap.insert(peft_path(p).to_string(), alpha_of(t).into());
            }
        }
        j.insert(format!("{comp}.r"), (r as usize).into());
        j.insert(format!("{comp}.lora_alpha"), alpha.into());
        j.insert(format!("{comp}.target_modules"), targets.into());
        j.insert(format!("{comp}.peft_type"), "LORA".into());
        j.insert(format!("{comp}.bias"), "none".into());
        j.insert(format!("{comp}.use_dora"), mine.iter().any(|(_, _, t)| t.magnitude.is_some()).into());
        j.insert(format!("{comp}.init_lora_weights"), true.into());
        j.insert(format!("{comp}.rank_pattern"), rp.into());
        j.insert(format!("{comp}.alpha_pattern"), ap.into());
    }
    serde_json::Value::Object(j).to_string()
}

/// The U-Net layout kohya names need (SDXL's SGM block indices); the family's standard one when no
/// U-Net is loaded.
pub fn unet_layout(sd: &StableDiffusion) -> UnetLayout {
    match &sd.unet {
        Some(u) => UnetLayout::from_block_types(u.config.layers_per_block, &u.config.up_block_types),
        None => UnetLayout::standard(sd.family),
    }
}
