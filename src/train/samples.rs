//! Sample grids during training (`--sample-prompts`, `--sample-every`): each prompt rendered
//! with the same seed before training (the base model: a new LoRA starts at zero) and at each
//! sampling step, written as `<output>-samples-stepNNNNNN.png` rows of [base | LoRA].
use super::config::TrainConfig;
use super::setup::Run;
use anyhow::{Context, Result};
use image::RgbImage;
use std::path::{Path, PathBuf};

pub fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{}: cannot read prompts", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if prompts.is_empty() {
        anyhow::bail!("{}: no prompts (one per line; # starts a comment)", path.display());
    }
    Ok(prompts)
}

/// One image per prompt with the run's current adapters, seed = training seed.
pub fn render(run: &Run, cfg: &TrainConfig, prompts: &[String]) -> Result<Vec<RgbImage>> {
    let rows: Vec<(String, u64)> = prompts.iter().map(|p| (p.clone(), cfg.seed)).collect();
    crate::sample::pipeline::sample_images(&run.sd, &rows, run.resolution, cfg.sampling())
}

/// Rows of [base | now], one per prompt.
pub fn grid(base: &[RgbImage], now: &[RgbImage]) -> RgbImage {
    let rows: Vec<Vec<RgbImage>> = base.iter().zip(now).map(|(b, n)| vec![b.clone(), n.clone()]).collect();
    let refs: Vec<&[RgbImage]> = rows.iter().map(|r| r.as_slice()).collect();
    crate::report::html::grid_rows(&refs)
}

pub fn grid_path(out: &Path, step: usize) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "lora".into());
    out.with_file_name(format!("{stem}-samples-step{step:06}.png"))
}
