//! Training state for `--resume`: the adapters in f32, the optimizer's state, the EMA and the
//! step. With the step, every random choice of the run is known again (see `batches`), so
//! resuming continues bit for bit.
use super::ema::Ema;
use super::optimizer::Optimizer;
use crate::lora::embedding::TrainedWord;
use crate::lora::AdapterInfo;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `my_lora.safetensors` → `my_lora.state.safetensors`
pub fn state_path(lora: &Path) -> PathBuf {
    lora.with_extension("state.safetensors")
}

fn layout(adapters: &[(String, AdapterInfo)], word: Option<&TrainedWord>) -> String {
    let mut v: Vec<String> = adapters.iter().map(|(c, a)| format!("{c}/{}:{}", a.path, a.layout())).collect();
    v.extend(word.map(|w| format!("embedding/{}", w.word)));
    serde_json::to_string(&v).unwrap_or_default()
}

pub fn save(
    path: &Path,
    adapters: &[(String, AdapterInfo)],
    word: Option<&TrainedWord>,
    opt: &Optimizer,
    ema: Option<&Ema>,
    step: usize,
) -> Result<()> {
    let mut t: Vec<(String, Tensor)> = vec![];
    for (i, (_, a)) in adapters.iter().enumerate() {
        for (name, v) in a.params() {
            t.push((format!("adapter.{i}.{name}"), v.as_tensor().to_device(&Device::Cpu)?));
        }
    }
    for (k, v) in word.iter().flat_map(|w| &w.vectors).enumerate() {
        t.push((format!("embedding.{k}"), v.as_tensor().to_device(&Device::Cpu)?));
    }
    let (tensors, scalars) = opt.state();
    let ema_tensors = ema.map(|e| e.tensors()).unwrap_or_default();
    for (k, v) in tensors.into_iter().chain(ema_tensors) {
        t.push((k, v.to_device(&Device::Cpu)?));
    }
    let mut meta = HashMap::from([
        ("step".to_string(), step.to_string()),
        ("optimizer".to_string(), opt.kind().name()),
        ("layout".to_string(), layout(adapters, word)),
    ]);
    meta.extend(scalars);
    if let Some(e) = ema {
        meta.insert("ema_steps".into(), e.steps.to_string());
    }
    crate::model::weights::save_atomic(path, &t, &meta)
}

/// The step a state file was saved at, read from its header; None for anything else.
pub fn saved_step(path: &Path) -> Option<usize> {
    crate::model::weights::check_safetensors(path).ok()?;
    let meta = crate::model::weights::read_metadata(path).ok()?;
    meta.get("layout")?;
    meta.get("step")?.parse().ok()
}

/// `--resume latest` or `--resume FOLDER`: the newest training state of the LoRA `output` (its
/// final state or a step checkpoint `NAME-stepNNNNNN.state.safetensors`) in `dir`, by saved step.
/// States that do not read whole are passed over.
pub fn find_latest(dir: &Path, output: &Path) -> Result<PathBuf> {
    let stem = output.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let checkpoint =
        regex::Regex::new(&format!(r"^{}-step\d{{6}}\.state\.safetensors$", regex::escape(&stem)))?;
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("--resume {}: cannot list the folder", dir.display()))?;
    let best = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            name == format!("{stem}.state.safetensors") || checkpoint.is_match(&name)
        })
        .filter_map(|p| Some((saved_step(&p)?, p)))
        .max_by_key(|(step, _)| *step);
    match best {
        Some((_, p)) => Ok(p),
        None => bail!(
            "--resume: no training state of {} in {} (looked for {stem}.state.safetensors and {stem}-stepNNNNNN.state.safetensors) — give the state file, or train without --resume",
            output.display(),
            dir.display()
        ),
    }
}

/// What `--resume` names: a state file, `latest` (the newest state beside `output`) or a folder
/// to look in.
pub fn resolve(resume: &Path, output: &Path) -> Result<PathBuf> {
    if resume == Path::new("latest") && !resume.exists() {
        let dir = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        return find_latest(dir, output);
    }
    if resume.is_dir() {
        return find_latest(resume, output);
    }
    Ok(resume.to_path_buf())
}

/// Restores adapters, optimizer and EMA; returns the step to continue from.
pub fn load(
    path: &Path,
    adapters: &[(String, AdapterInfo)],
    word: Option<&TrainedWord>,
    opt: &mut Optimizer,
    ema: Option<&mut Ema>,
) -> Result<usize> {
    let data = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let meta = crate::model::header::check_bytes(&data, &path.display().to_string())?.metadata;
    // a LoRA given instead of its state is the usual mistake: point at the state beside it
    let beside = state_path(path);
    let hint = match beside.is_file() {
        true => format!(" — resume from {}, written beside the LoRA", beside.display()),
        false => " — resume from the .state.safetensors file a run writes beside its LoRA".into(),
    };
    let get = |k: &str| {
        meta.get(k)
            .with_context(|| format!("{}: not an sdlora training state (no `{k}`){hint}", path.display()))
    };
    if get("layout")? != &layout(adapters, word) {
        bail!(
            "{}: this state was saved for other LoRA layers or rank — resume with the same --model, --adapter, --targets, --exclude-layers, --rank, --text-encoder-lr and --train-embedding",
            path.display()
        );
    }
    let step: usize = get("step")?.parse()?;
    // states written before --optimizer existed are AdamW's
    let saved = meta.get("optimizer").map_or("adamw", |s| s.as_str());
    if saved != opt.kind().name() {
        bail!(
            "{}: this state was saved with --optimizer {saved} — resume with --optimizer {saved}",
            path.display()
        );
    }
    match (meta.get("ema_steps"), &ema) {
        (Some(_), None) => {
            bail!("{}: this state was saved with --ema-decay — resume with it", path.display())
        }
        (None, Some(_)) => bail!(
            "{}: this state was saved without --ema-decay — resume without it (or start a new run)",
            path.display()
        ),
        _ => {}
    }
    let t = candle_core::safetensors::load_buffer(&data, &Device::Cpu)?;
    let take = |k: &str| t.get(k).cloned().with_context(|| format!("{}: missing tensor {k}", path.display()));
    for (i, (_, a)) in adapters.iter().enumerate() {
        for (name, v) in a.params() {
            v.set(&take(&format!("adapter.{i}.{name}"))?.to_device(v.device())?)?;
        }
    }
    for (k, v) in word.iter().flat_map(|w| &w.vectors).enumerate() {
        v.set(&take(&format!("embedding.{k}"))?.to_device(v.device())?)?;
    }
    let scalar = |k: &str| -> Result<String> { Ok(get(k)?.clone()) };
    opt.restore(&take, &scalar).with_context(|| format!("{}: optimizer state", path.display()))?;
    if let Some(e) = ema {
        let steps = get("ema_steps")?.parse()?;
        e.restore(steps, &take).with_context(|| format!("{}: EMA", path.display()))?;
    }
    Ok(step)
}
