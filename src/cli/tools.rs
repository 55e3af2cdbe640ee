//! The LoRA toolbox: `convert`, `inspect`, `resize`, `extract`, `merge`.
use crate::lora::format::{read, write_entries, write_tensors, Entry, LoraFormat, WriteAs};
use crate::lora::merge::{merge_loras, read_model, write_folder, write_single_file};
use crate::lora::ops::{extract, resize, standard_entries, standard_layout};
use crate::model::Precision;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct ConvertArgs {
    /// LoRA to convert (kohya, PEFT/diffusers or legacy diffusers names).
    pub input: PathBuf,
    /// Where to write the converted LoRA.
    pub output: PathBuf,
    /// Target format: kohya (A1111, ComfyUI, diffusers) or peft (diffusers' own). A trained
    /// embedding (`train --train-embedding`) stays bundled in kohya's file, which Automatic1111
    /// reads; for peft it is written beside it as `<output>_<word>_emb.safetensors`, which
    /// diffusers' `load_textual_inversion` reads (diffusers rejects it inside a LoRA file).
    #[arg(long, value_enum, default_value = "kohya")]
    pub to: LoraFormat,
}

#[derive(Args)]
pub struct InspectArgs {
    /// LoRA file to describe.
    pub input: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ResizeArgs {
    pub input: PathBuf,
    pub output: PathBuf,
    /// New rank (modules already at or below it keep theirs).
    #[arg(long)]
    pub rank: usize,
    /// Precision of the written LoRA: f16, bf16, f32.
    #[arg(long, value_enum, default_value = "f16")]
    pub save_dtype: Precision,
}

#[derive(Args)]
pub struct ExtractArgs {
    /// The model before fine-tuning (folder, single file or cached hub id).
    #[arg(long)]
    pub base: String,
    /// The fine-tuned model.
    #[arg(long)]
    pub tuned: String,
    /// For single-file models: a diffusers folder whose config.json files to use instead of those
    /// inferred from the weights — for non-standard sizes.
    #[arg(long, value_name = "DIR")]
    pub model_config: Option<PathBuf>,
    /// Where to write the LoRA.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Rank of the extracted LoRA.
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    /// Skip layers whose difference is below this (relative Frobenius norm).
    #[arg(long, default_value_t = 1e-6)]
    pub min_diff: f64,
    #[arg(long, value_enum, default_value = "f16")]
    pub save_dtype: Precision,
}

#[derive(Args)]
pub struct MergeArgs {
    /// Base model (folder, single file or cached hub id).
    #[arg(long)]
    pub model: String,
    /// LoRA to bake in, as path[:scale] (scale 1 if omitted); repeat for several.
    #[arg(long = "lora", required = true)]
    pub loras: Vec<String>,
    /// Output: a folder (diffusers layout) or a .safetensors single file (original layout).
    #[arg(long, short)]
    pub output: PathBuf,
    /// For a single-file --model: a diffusers folder whose config.json files (and scheduler and
    /// tokenizers) to use instead of those inferred from the weights — for non-standard sizes.
    #[arg(long, value_name = "DIR", visible_alias = "config")]
    pub model_config: Option<PathBuf>,
}

/// `path.safetensors:0.8` → (path, 0.8)
fn check_out(input: &std::path::Path, output: &std::path::Path) -> Result<()> {
    if input == output {
        bail!("{}: output would overwrite the input — choose another file name", output.display());
    }
    Ok(())
}

pub fn convert(a: &ConvertArgs) -> Result<()> {
    check_out(&a.input, &a.output)?;
    let to = a.to;
    let file = read(&a.input)?;
    let (family, entries) = standard_entries(&file, &a.input.display().to_string())?;
    let dtype = file.modules.values().next().map(|t| t.down.dtype()).unwrap_or(candle_core::DType::F32);
    let dtype = if dtype == candle_core::DType::F64 { stored_dtype(&a.input)? } else { dtype };
    let how = WriteAs { family, layout: &standard_layout(family), format: to, dtype };
    // diffusers refuses a LoRA file with any other tensor in it, so for diffusers a bundled
    // embedding goes to a file of its own; kohya's names keep it bundled, as Automatic1111 reads it
    let bundled = to == LoraFormat::Kohya;
    let extra = if bundled { file.embedding_tensors(family, dtype)? } else { vec![] };
    write_tensors(&a.output, &entries, extra, how, file.metadata.clone())?;
    println!(
        "wrote {} ({} modules, {} format, {})",
        a.output.display(),
        entries.len(),
        crate::util::choice_name(&a.to),
        family.name()
    );
    if !bundled {
        write_embeddings_apart(&file, family, dtype, &a.output)?;
    }
    Ok(())
}

/// Each bundled embedding of `file` as `<output stem>_<word>_emb.safetensors` in the layout of
/// diffusers' advanced training script (`clip_l`, and `clip_g` for SDXL: [1, width] each).
fn write_embeddings_apart(
    file: &crate::lora::format::LoraFile,
    family: crate::model::load::Family,
    dtype: candle_core::DType,
    output: &std::path::Path,
) -> Result<()> {
    let mut words: Vec<&str> = file.embeddings.iter().map(|(w, _, _)| w.as_str()).collect();
    words.sort();
    words.dedup();
    for word in words {
        let mut tensors = vec![];
        for (_, k, t) in file.embeddings.iter().filter(|(w, _, _)| w == word) {
            let name = if *k == 0 { "clip_l" } else { "clip_g" };
            tensors.push((name.to_string(), t.reshape((1, t.elem_count()))?.to_dtype(dtype)?));
        }
        let stem = output.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let path = output.with_file_name(format!("{stem}_{word}_emb.safetensors"));
        crate::model::weights::save_atomic(&path, &tensors, &Default::default())?;
        let te2 = match family {
            crate::model::load::Family::Sdxl => {
                ", and [\"clip_g\"] with text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2"
            }
            _ => "",
        };
        println!(
            "wrote {}: the embedding of \"{word}\", which diffusers loads apart from the LoRA: \
             pipe.load_textual_inversion(load_file(path)[\"clip_l\"], token=\"<{word}>\", \
             text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer){te2}; then write <{word}> \
             where the captions said {word}",
            path.display()
        );
    }
    Ok(())
}

/// The dtype the file stores its LoRA weights in (we read them as f64).
fn stored_dtype(path: &std::path::Path) -> Result<candle_core::DType> {
    let data = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&data)?;
    let d = st.tensors().into_iter().find(|(k, _)| !k.ends_with(".alpha")).map(|(_, v)| v.dtype());
    Ok(match d {
        Some(safetensors::Dtype::F16) => candle_core::DType::F16,
        Some(safetensors::Dtype::BF16) => candle_core::DType::BF16,
        _ => candle_core::DType::F32,
    })
}

pub fn inspect(a: &InspectArgs) -> Result<()> {
    let file = read(&a.input)?;
    let (family, entries, lycoris) = crate::lora::ops::standard_all(&file, &a.input.display().to_string())?;
    let dtype = stored_dtype(&a.input)?;
    let bytes = std::fs::metadata(&a.input)?.len();
    let params: usize =
        entries.iter().map(|(_, _, t)| t.down.elem_count() + t.up.elem_count()).sum::<usize>()
            + lycoris.iter().map(|(_, _, l)| l.params()).sum::<usize>();
    let mut per_comp: std::collections::BTreeMap<&str, usize> = Default::default();
    for c in entries.iter().map(|e| &e.0).chain(lycoris.iter().map(|e| &e.0)) {
        *per_comp.entry(c.as_str()).or_default() += 1;
    }
    let mut layers: Vec<serde_json::Value> = entries
        .iter()
        .map(|(c, p, t)| serde_json::json!({"component": c, "module": p, "kind": if t.magnitude.is_some() { "DoRA" } else { "LoRA" }, "rank": t.rank(), "alpha": t.alpha.unwrap_or(t.rank() as f64), "conv": t.down.rank() == 4, "dora": t.magnitude.is_some()}))
        .collect();
    layers.extend(lycoris.iter().map(
        |(c, p, l)| serde_json::json!({"component": c, "module": p, "kind": l.kind(), "alpha": l.alpha}),
    ));
    let meta: std::collections::BTreeMap<&String, &String> = file.metadata.iter().collect();
    // bundled embeddings: word, text encoder, width
    let embeddings: Vec<serde_json::Value> = file
        .embeddings
        .iter()
        .map(|(w, k, t)| serde_json::json!({"word": w, "text_encoder": k, "width": t.elem_count()}))
        .collect();
    let j = serde_json::json!({
        "file": a.input.display().to_string(), "format": format!("{:?}", file.format).to_lowercase(),
        "base_family": family.name(), "modules": per_comp, "parameters": params, "dtype": format!("{dtype:?}").to_lowercase(),
        "bytes": bytes, "layers": layers, "metadata": meta, "embeddings": embeddings,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!("{}", a.input.display());
    println!("  format       {:?}", file.format);
    println!("  base model   {}", family.name());
    println!(
        "  modules      {}",
        per_comp.iter().map(|(c, n)| format!("{c}: {n}")).collect::<Vec<_>>().join(", ")
    );
    println!("  parameters   {params}");
    println!("  dtype        {dtype:?}, {bytes} bytes");
    for (w, k, t) in &file.embeddings {
        println!("  embedding    \"{w}\" (text encoder {}, {} wide)", k + 1, t.elem_count());
    }
    let mut ranks: std::collections::BTreeMap<(usize, String), usize> = Default::default();
    for (_, _, t) in &entries {
        *ranks.entry((t.rank(), format!("{}", t.alpha.unwrap_or(t.rank() as f64)))).or_default() += 1;
    }
    for ((r, al), n) in ranks {
        println!("  rank {r:<4} alpha {al:<6} {n} modules");
    }
    let convs =
        entries.iter().filter(|(_, _, t)| t.down.rank() == 4 && t.down.dim(2).unwrap_or(1) > 1).count();
    if convs > 0 {
        println!("  3×3 conv modules (LoCon): {convs}");
    }
    for kind in ["LoHa", "LoKr"] {
        let n = lycoris.iter().filter(|(_, _, l)| l.kind() == kind).count();
        if n > 0 {
            println!("  {kind} modules (LyCORIS): {n}");
        }
    }
    let dora = entries.iter().filter(|(_, _, t)| t.magnitude.is_some()).count();
    if dora > 0 {
        println!("  DoRA modules (with a magnitude): {dora}");
    }
    for (k, v) in meta.iter().filter(|(k, _)| k.starts_with("ss_") || k.starts_with("modelspec.")) {
        let v: String = v.chars().take(100).collect();
        println!("  {k} = {v}");
    }
    Ok(())
}

pub fn resize_cmd(a: &ResizeArgs) -> Result<()> {
    if a.rank == 0 {
        bail!("--rank 0 would keep nothing of {}: give a rank of 1 or more", a.input.display());
    }
    check_out(&a.input, &a.output)?;
    let file = read(&a.input)?;
    let (family, entries) = standard_entries(&file, &a.input.display().to_string())?;
    let mut out: Vec<Entry> = vec![];
    let mut energies = vec![];
    for (c, p, t) in &entries {
        let (t2, kept) = resize(t, a.rank)?;
        energies.push(kept);
        println!("{c}/{p}: rank {} → {}, energy kept {:.2} %", t.rank(), t2.rank(), 100.0 * kept);
        out.push((c.clone(), p.clone(), t2));
    }
    let mut meta = file.metadata.clone();
    meta.insert("ss_network_dim".into(), a.rank.to_string());
    meta.insert("ss_network_alpha".into(), a.rank.to_string());
    let dtype = a.save_dtype.dtype();
    let how = WriteAs { family, layout: &standard_layout(family), format: file.format_for_write(), dtype };
    write_tensors(&a.output, &out, file.embedding_tensors(family, dtype)?, how, meta)?;
    let mean = energies.iter().sum::<f64>() / energies.len().max(1) as f64;
    let min = energies.iter().cloned().fold(1.0, f64::min);
    println!(
        "wrote {}: mean energy kept {:.2} %, worst layer {:.2} %",
        a.output.display(),
        100.0 * mean,
        100.0 * min
    );
    Ok(())
}

pub fn extract_cmd(a: &ExtractArgs) -> Result<()> {
    if a.rank == 0 {
        bail!("--rank 0 would extract nothing: give a rank of 1 or more");
    }
    let base = read_model(&a.base, a.model_config.as_deref())?;
    let tuned = read_model(&a.tuned, a.model_config.as_deref())?;
    if base.family != tuned.family {
        bail!(
            "{}: is {} but {} is {} — extract needs two models of one family",
            a.tuned,
            tuned.family.name(),
            a.base,
            base.family.name()
        );
    }
    let mut entries: Vec<Entry> = vec![];
    for (c, m) in &base.comps {
        if c == "vae" {
            continue;
        }
        let Some(tm) = tuned.comps.get(c) else { continue };
        let mut keys: Vec<&String> =
            m.keys().filter(|k| k.ends_with(".weight") && matches!(m[*k].rank(), 2 | 4)).collect();
        keys.sort();
        for k in keys {
            let (w0, w1) = (&m[k], tm.get(k).ok_or_else(|| anyhow::anyhow!("{}: no tensor {k}", a.tuned))?);
            if k.contains("embedding") || w0.dims() != w1.dims() {
                continue;
            }
            let rel = ((w1.to_dtype(candle_core::DType::F64)? - w0.to_dtype(candle_core::DType::F64)?)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?
                / w0.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.max(1e-30))
            .sqrt();
            if rel < a.min_diff {
                continue;
            }
            let (t, kept) = extract(w0, w1, a.rank)?;
            println!("{c}/{k}: difference {rel:.2e}, captured {:.2} %", 100.0 * kept);
            entries.push((c.clone(), k.trim_end_matches(".weight").to_string(), t));
        }
    }
    if entries.is_empty() {
        bail!(
            "{} and {} do not differ (above --min-diff {}) — nothing to extract",
            a.base,
            a.tuned,
            a.min_diff
        );
    }
    let layout = base.layout();
    write_entries(
        &a.output,
        &entries,
        base.family,
        &layout,
        LoraFormat::Kohya,
        a.save_dtype.dtype(),
        Default::default(),
    )?;
    println!("wrote {} ({} modules)", a.output.display(), entries.len());
    Ok(())
}

pub fn merge(a: &MergeArgs) -> Result<()> {
    let loras = a.loras.iter().map(|s| super::generate::parse_lora(s)).collect::<Result<Vec<_>>>()?;
    let mut model = read_model(&a.model, a.model_config.as_deref())?;
    let n = merge_loras(&mut model, &loras)?;
    if a.output.extension().is_some_and(|e| e == "safetensors") {
        write_single_file(&model, &a.output)?;
    } else {
        write_folder(&model, &a.output)?;
    }
    println!("wrote {} ({} modules merged from {} LoRA files)", a.output.display(), n, loras.len());
    Ok(())
}
