//! Putting LoRA files onto a loaded model (for generation, parity checks and merging), without
//! touching the base weights: each file becomes one more adapter on its layers.
use super::attach::AdapterInfo;
use super::format::{read, resolve_all, unet_layout, LoraTensors, Targets};
use crate::model::layers::adapter::{Lora, Switch};
use crate::model::layers::{LayerMut, Visit};
use crate::model::load::StableDiffusion;
use anyhow::{bail, Result};
use candle_core::Var;
use std::collections::HashMap;
use std::path::Path;

/// Every (component, module path) of the loaded networks that can carry an adapter.
pub fn model_targets(sd: &mut StableDiffusion) -> Targets {
    let mut out = vec![];
    each_component(sd, &mut |comp, m| {
        m.visit("", &mut |p, _| out.push((comp.to_string(), p.to_string())));
    });
    out
}

/// Calls `f` with each loaded network and its component name.
pub fn each_component(sd: &mut StableDiffusion, f: &mut dyn FnMut(&str, &mut dyn Visit)) {
    if let Some(u) = &mut sd.unet {
        f("unet", u);
    }
    for (i, te) in sd.text_encoders.iter_mut().enumerate() {
        f(if i == 0 { "text_encoder" } else { "text_encoder_2" }, te);
    }
}

/// Reads a LoRA file and adds it to the model at `multiplier`, as adapters numbered from
/// `first_id` (so it can also be trained further); LyCORIS LoHa/LoKr modules are merged into the
/// weights. Returns the attached adapters.
pub fn apply_file(
    sd: &mut StableDiffusion,
    path: &Path,
    multiplier: f64,
    first_id: usize,
) -> Result<Vec<(String, AdapterInfo)>> {
    Ok(apply(sd, path, multiplier, first_id, true)?.adapters)
}

/// What `apply` put on a model.
pub struct Applied {
    pub adapters: Vec<(String, AdapterInfo)>,
    /// LyCORIS modules merged into the base weights (these cannot be switched off).
    pub merged: usize,
}

/// `apply_file`; with `merge` false LyCORIS modules become adapters too (which can be switched
/// off, as `generate --lora-start` does, or trained), at the price of a weight-sized product
/// per layer and forward.
pub fn apply(
    sd: &mut StableDiffusion,
    path: &Path,
    multiplier: f64,
    first_id: usize,
    merge: bool,
) -> Result<Applied> {
    let file = read(path)?;
    let targets = model_targets(sd);
    let (entries, lycoris) =
        resolve_all(&file, &targets, sd.family, &unet_layout(sd), &path.display().to_string())?;
    let merged = if merge { merge_lycoris(sd, &lycoris, multiplier, path)? } else { 0 };
    let mut by_comp: HashMap<String, HashMap<String, LoraTensors>> = HashMap::new();
    for (c, p, t) in entries {
        by_comp.entry(c).or_default().insert(p, t);
    }
    let mut err = None;
    let mut out = vec![];
    let switch = sd.lora_switch.clone();
    let mut factored: HashMap<String, HashMap<String, &super::lycoris::Lycoris>> = HashMap::new();
    for (c, p, l) in lycoris.iter().filter(|_| !merge) {
        factored.entry(c.clone()).or_default().insert(p.clone(), l);
    }
    each_component(sd, &mut |comp, m| {
        let (map, fmap) = (by_comp.get(comp), factored.get(comp));
        if map.is_none() && fmap.is_none() {
            return;
        }
        m.visit("", &mut |p, layer| {
            if let Some(l) = fmap.and_then(|f| f.get(p)) {
                let id = first_id + out.len();
                match add_factored(layer, l, multiplier, id, &switch) {
                    Ok((f, empty)) => {
                        // no alpha in the file means scale 1: alpha = rank says the same
                        let alpha = l.alpha.unwrap_or_else(|| f.rank().map_or(1.0, |r| r as f64));
                        let info = AdapterInfo {
                            path: p.to_string(),
                            id,
                            down: empty.clone(),
                            up: empty,
                            alpha,
                            magnitude: None,
                            lycoris: Some(f),
                        };
                        out.push((comp.to_string(), info));
                    }
                    Err(e) => {
                        err.get_or_insert(anyhow::anyhow!("{}: module `{p}`: {e}", path.display()));
                    }
                }
                return;
            }
            if let Some(t) = map.and_then(|m| m.get(p)) {
                match add(layer, t, multiplier, first_id + out.len(), &switch) {
                    Ok((down, up, magnitude)) => {
                        let alpha = t.alpha.unwrap_or(t.rank() as f64);
                        let id = first_id + out.len();
                        let info = AdapterInfo {
                            path: p.to_string(),
                            id,
                            down,
                            up,
                            alpha,
                            magnitude,
                            lycoris: None,
                        };
                        out.push((comp.to_string(), info));
                    }
                    Err(e) => {
                        err.get_or_insert(anyhow::anyhow!("{}: module `{p}`: {e}", path.display()));
                    }
                }
            }
        });
    });
    if let Some(e) = err {
        return Err(e);
    }
    // a bundled embedding is part of the prompt: whole at any multiplier, as Automatic1111 has it
    if !file.embeddings.is_empty() {
        let prompts = crate::model::text::PromptEncoder::new(sd, 1)?;
        let name = path.display().to_string();
        super::embedding::install_bundled(&prompts, &mut sd.text_encoders, &file.embeddings, &name)?;
    }
    Ok(Applied { adapters: out, merged })
}

/// A LyCORIS module as an adapter (its factors as variables, in the adapters' dtype).
fn add_factored(
    layer: LayerMut<'_>,
    l: &super::lycoris::Lycoris,
    multiplier: f64,
    id: usize,
    switch: &Switch,
) -> Result<(crate::model::layers::lycoris::Factors, Var)> {
    let w = match &layer {
        LayerMut::Linear(x) => &x.weight,
        LayerMut::Conv(x) => &x.weight,
    };
    l.delta(w.dims())?; // the factors fit the layer
    let f = l.factors(crate::model::layers::acc(w.dtype()), w.device())?;
    let empty = Var::from_tensor(&candle_core::Tensor::zeros(0, f.vars[0].1.dtype(), w.device())?)?;
    let lora = Lora {
        id,
        down: empty.clone(),
        up: empty.clone(),
        scale: l.scale(&f) * multiplier,
        magnitude: None,
        strength: 1.0,
        lycoris: Some(f.clone()),
        dropout: 0.0,
        switch: switch.clone(),
    };
    match layer {
        LayerMut::Linear(x) => x.adapters.push(lora),
        LayerMut::Conv(x) => x.adapters.push(lora),
    }
    Ok((f, empty))
}

/// W += multiplier · ΔW for each LyCORIS module, in the weight's dtype.
fn merge_lycoris(
    sd: &mut StableDiffusion,
    lycoris: &[super::ops::LycorisEntry],
    multiplier: f64,
    path: &Path,
) -> Result<usize> {
    let mut by_comp: HashMap<&str, HashMap<&str, &super::lycoris::Lycoris>> = HashMap::new();
    for (c, p, l) in lycoris {
        by_comp.entry(c.as_str()).or_default().insert(p.as_str(), l);
    }
    let (mut n, mut err) = (0, None);
    each_component(sd, &mut |comp, m| {
        let Some(map) = by_comp.get(comp) else { return };
        m.visit("", &mut |p, layer| {
            let Some(l) = map.get(p) else { return };
            let w = match &layer {
                LayerMut::Linear(x) => &x.weight,
                LayerMut::Conv(x) => &x.weight,
            };
            let new = l.delta(w.dims()).and_then(|d| {
                let w64 = w.to_dtype(candle_core::DType::F64)?;
                Ok((w64 + (d * multiplier)?)?.to_dtype(w.dtype())?)
            });
            match (new, layer) {
                (Ok(new), LayerMut::Linear(x)) => x.weight = new,
                (Ok(new), LayerMut::Conv(x)) => x.set_weight(new),
                (Err(e), _) => {
                    err.get_or_insert(anyhow::anyhow!("{}: module `{p}`: {e}", path.display()));
                    return;
                }
            }
            n += 1;
        });
    });
    match err {
        Some(e) => Err(e),
        None => Ok(n),
    }
}

fn add(
    layer: LayerMut<'_>,
    t: &LoraTensors,
    multiplier: f64,
    id: usize,
    switch: &Switch,
) -> Result<(Var, Var, Option<Var>)> {
    let r = t.rank();
    // adapters are f32 whatever the base dtype (f64 stays f64 for the reference checks)
    let dtype = crate::model::layers::acc(match &layer {
        LayerMut::Linear(l) => l.weight.dtype(),
        LayerMut::Conv(c) => c.weight.dtype(),
    });
    let (down_shape, up_shape): (Vec<usize>, Vec<usize>) = match &layer {
        LayerMut::Linear(l) => (vec![r, l.in_features()], vec![l.out_features(), r]),
        LayerMut::Conv(c) => {
            let (o, i, kh, kw) = c.weight.dims4()?;
            (vec![r, i, kh, kw], vec![o, r, 1, 1])
        }
    };
    // 1×1 convs and Linears are stored either 2-D or 4-D depending on the writer.
    let fit = |x: &candle_core::Tensor, shape: &[usize], what: &str| -> Result<candle_core::Tensor> {
        if x.elem_count() != shape.iter().product::<usize>() {
            bail!("lora {what} has shape {:?}, expected {:?}", x.dims(), shape);
        }
        Ok(x.reshape(shape)?.to_dtype(dtype)?)
    };
    let down = Var::from_tensor(&fit(&t.down, &down_shape, "down")?)?;
    let up = Var::from_tensor(&fit(&t.up, &up_shape, "up")?)?;
    // DoRA: the multiplier is a strength, the share of the way to the decomposed weight
    let magnitude = t.magnitude.as_ref().map(|m| fit(m, &[up_shape[0]], "magnitude")).transpose()?;
    let magnitude = magnitude.map(|m| Var::from_tensor(&m)).transpose()?;
    let (scale, strength) = match magnitude {
        Some(_) => (t.scale(), multiplier),
        None => (t.scale() * multiplier, 1.0),
    };
    let lora = Lora {
        id,
        down: down.clone(),
        up: up.clone(),
        scale,
        magnitude: magnitude.clone(),
        strength,
        lycoris: None,
        dropout: 0.0,
        switch: switch.clone(),
    };
    match layer {
        LayerMut::Linear(l) => l.adapters.push(lora),
        LayerMut::Conv(c) => c.adapters.push(lora),
    }
    Ok((down, up, magnitude))
}
