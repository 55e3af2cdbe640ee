//! diffusers folder layout: model_index.json plus one sub-folder per component.
use crate::model::weights::{check_safetensors, Weights};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: invalid config: {e}", path.display()))
}

/// The weight files of a component folder: `<stem>.safetensors`, its `.fp16` variant, or their
/// sharded forms (`.safetensors.index.json`). `.bin` files are read through the safe pickle
/// reader.
pub fn component_files(dir: &Path, stem: &str, prefer_fp16: bool) -> Result<Vec<PathBuf>> {
    let mut variants = vec![format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")];
    if prefer_fp16 {
        variants.reverse();
    }
    for v in &variants {
        let p = dir.join(v);
        if p.exists() {
            return Ok(vec![p]);
        }
        let index = dir.join(format!("{v}.index.json"));
        if index.exists() {
            let j: serde_json::Value = read_json(&index)?;
            let mut files: Vec<PathBuf> = j["weight_map"]
                .as_object()
                .with_context(|| format!("{}: no weight_map", index.display()))?
                .values()
                .filter_map(|f| f.as_str().map(|f| dir.join(f)))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
    }
    for v in [format!("{stem}.bin"), format!("{stem}.fp16.bin")] {
        let p = dir.join(&v);
        if p.exists() {
            return Ok(vec![p]);
        }
    }
    if !dir.exists() {
        bail!("{}: missing component folder — is this a complete diffusers model folder?", dir.display());
    }
    bail!("{}: no {stem}.safetensors (or .fp16 / sharded / .bin variant) found", dir.display())
}

/// Opens a component's weights, whatever their container.
pub fn open_weights(files: &[PathBuf], dtype: DType, device: &Device) -> Result<Weights> {
    if files.iter().all(|f| f.extension().is_some_and(|e| e == "safetensors")) {
        for f in files {
            check_safetensors(f)?;
        }
        return Weights::from_files(files, dtype, device);
    }
    let mut map = std::collections::HashMap::new();
    for f in files {
        for (k, t) in super::ckpt::read_pickle(f, None)? {
            map.insert(k, t);
        }
    }
    let origin = files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ");
    Ok(Weights::from_map(map, &origin, dtype, device))
}
