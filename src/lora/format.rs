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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    Kohya,
    Peft,
    DiffusersLegacy,
}

impl std::str::FromStr for LoraFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "kohya" => Ok(Self::Kohya),
            "peft" | "diffusers" => Ok(Self::Peft),
            _ => Err(format!("unknown LoRA format `{s}` (kohya, peft)")),
        }
    }
}

/// One module's adapter as stored in a file.
#[derive(Clone)]
pub struct LoraTensors {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
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
}

/// Splits a tensor name into (module stem, role) for every naming we read.
fn split_key(k: &str) -> Option<(String, &'static str, LoraFormat)> {
    const SUFFIXES: &[(&str, &str, LoraFormat)] = &[
        (".lora_down.weight", "down", LoraFormat::Kohya),
        (".lora_up.weight", "up", LoraFormat::Kohya),
        (".alpha", "alpha", LoraFormat::Kohya),
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

/// (down, up, alpha) of one module while reading.
type Parts = (Option<Tensor>, Option<Tensor>, Option<f64>);

pub fn read(path: &Path) -> Result<LoraFile> {
    crate::model::weights::check_safetensors(path)?;
    let data = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&data)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&data, &Device::Cpu)?;
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let mut format = None;
    let mut unknown = vec![];
    for name in st.names() {
        let t = &tensors[name];
        match split_key(name) {
            Some((stem, role, f)) => {
                format = format.or(Some(f));
                let e = parts.entry(stem).or_default();
                match role {
                    "down" => e.0 = Some(t.to_dtype(DType::F64)?),
                    "up" => e.1 = Some(t.to_dtype(DType::F64)?),
                    _ => e.2 = Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0]),
                }
            }
            None => unknown.push(name.to_string()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        bail!(
            "{}: {} tensors are not LoRA weights this tool understands (e.g. `{}`) — is this a LoRA file (LoHa/LoKr/DoRA are not supported)?",
            path.display(),
            unknown.len(),
            unknown[0]
        );
    }
    let format = format.with_context(|| format!("{}: no LoRA tensors in this file", path.display()))?;
    let mut modules = BTreeMap::new();
    for (stem, (d, u, a)) in parts {
        match (d, u) {
            (Some(down), Some(up)) => {
                modules.insert(stem, LoraTensors { down, up, alpha: a });
            }
            _ => bail!(
                "{}: module `{stem}` lacks its down or up weight — the file is incomplete",
                path.display()
            ),
        }
    }
    // PEFT keeps one alpha for the whole adapter in the header.
    if format == LoraFormat::Peft {
        if let Some(m) = metadata.get("lora_adapter_metadata") {
            let j: serde_json::Value = serde_json::from_str(m).unwrap_or_default();
            for (stem, t) in modules.iter_mut() {
                let comp = stem.split('.').next().unwrap_or("unet");
                if let Some(a) = j.get(format!("{comp}.lora_alpha")).and_then(|v| v.as_f64()) {
                    t.alpha = Some(a);
                }
            }
        }
    }
    Ok(LoraFile { format, modules, metadata })
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
    let mut missing = vec![];
    for (stem, t) in &file.modules {
        match by_name.get(stem) {
            Some((c, p)) => out.push((c.clone(), p.clone(), t.clone())),
            None => missing.push(stem.clone()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "{origin}: {} of {} LoRA modules match no layer of this {} model (first: `{}`) — was the LoRA trained for another base model family?",
            missing.len(),
            file.modules.len(),
            family.name(),
            missing[0]
        );
    }
    Ok(out)
}

/// Writes adapters (component, info) to `path` atomically (temp file, then rename).
pub fn write(
    path: &Path,
    adapters: &[(String, AdapterInfo)],
    family: Family,
    layout: &UnetLayout,
    format: LoraFormat,
    dtype: DType,
    mut metadata: HashMap<String, String>,
) -> Result<()> {
    let kohya = KohyaNames::new(family, layout);
    let mut tensors: Vec<(String, Tensor)> = vec![];
    for (comp, a) in adapters {
        let (down, up) = (a.down.as_tensor().to_dtype(dtype)?, a.up.as_tensor().to_dtype(dtype)?);
        match format {
            LoraFormat::Kohya => {
                let n = kohya
                    .name(comp, &a.path)
                    .with_context(|| format!("{comp} `{}` has no kohya name", a.path))?;
                tensors.push((format!("{n}.lora_down.weight"), down));
                tensors.push((format!("{n}.lora_up.weight"), up));
                tensors.push((
                    format!("{n}.alpha"),
                    Tensor::new(a.alpha as f32, &Device::Cpu)?.to_dtype(dtype)?,
                ));
            }
            _ => {
                // PEFT names follow the module tree of the library that loads them; transformers 5
                // (what a current diffusers install brings) has no `text_model.` level.
                let path = a.path.strip_prefix("text_model.").unwrap_or(&a.path);
                tensors.push((format!("{comp}.{path}.lora_A.weight"), down));
                tensors.push((format!("{comp}.{path}.lora_B.weight"), up));
            }
        }
    }
    if format != LoraFormat::Kohya {
        metadata.insert("lora_adapter_metadata".into(), peft_metadata(adapters));
    }
    metadata.entry("format".into()).or_insert_with(|| "pt".into());
    save_atomic(path, &tensors, &metadata)
}

fn peft_metadata(adapters: &[(String, AdapterInfo)]) -> String {
    let mut j = serde_json::Map::new();
    let mut comps: Vec<&String> = adapters.iter().map(|(c, _)| c).collect();
    comps.dedup();
    for comp in comps {
        let mine: Vec<&AdapterInfo> = adapters.iter().filter(|(c, _)| c == comp).map(|(_, a)| a).collect();
        let mut targets: Vec<String> =
            mine.iter().map(|a| a.path.strip_prefix("text_model.").unwrap_or(&a.path).to_string()).collect();
        targets.sort();
        let (r, alpha) = (mine[0].rank(), mine[0].alpha);
        j.insert(format!("{comp}.r"), r.into());
        j.insert(format!("{comp}.lora_alpha"), alpha.into());
        j.insert(format!("{comp}.target_modules"), targets.into());
        j.insert(format!("{comp}.peft_type"), "LORA".into());
        j.insert(format!("{comp}.bias"), "none".into());
        j.insert(format!("{comp}.use_dora"), false.into());
        j.insert(format!("{comp}.init_lora_weights"), true.into());
        j.insert(format!("{comp}.rank_pattern"), serde_json::json!({}));
        j.insert(format!("{comp}.alpha_pattern"), serde_json::json!({}));
    }
    serde_json::Value::Object(j).to_string()
}

/// safetensors with metadata, written to a temporary file and renamed so a killed run never
/// leaves a truncated file behind. The header is written with sorted keys: the same tensors and
/// metadata always give the same bytes (the safetensors crate writes metadata in hash order).
pub fn save_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n])?;
    if !metadata.is_empty() {
        let sorted: BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), serde_json::to_value(sorted)?);
    }
    let mut h = serde_json::to_vec(&header)?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    crate::util::write_atomic(path, &out)
}

/// The U-Net layout kohya names need (SDXL's SGM block indices); the family's standard one when no
/// U-Net is loaded.
pub fn unet_layout(sd: &StableDiffusion) -> UnetLayout {
    match &sd.unet {
        Some(u) => UnetLayout::from_block_types(u.config.layers_per_block, &u.config.up_block_types),
        None => UnetLayout::standard(sd.family),
    }
}
