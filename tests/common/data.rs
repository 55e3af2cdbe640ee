//! A tiny model and a tiny dataset, made on the fly.
use sdlora::train::config::TrainArgs;
use std::path::Path;

/// Writes the tiny SD1-shaped random model (real CLIP vocabulary) to `dir`.
pub fn tiny_model(dir: &Path) {
    sdlora::model::tiny::write_random_pipeline(
        dir,
        &sdlora::model::tiny::tiny_sd1(),
        7,
        candle_core::DType::F32,
    )
    .unwrap();
}

/// `n` 32×32 images of coloured discs on coloured backgrounds, with captions.
pub fn tiny_dataset(dir: &Path, n: usize) {
    sdlora::cli::bench::write_discs(dir, n).unwrap();
}

/// A temporary folder holding the tiny model (`model/`) and a dataset of `images` (`data/`).
pub struct Fixture {
    _tmp: tempfile::TempDir,
    pub root: std::path::PathBuf,
}

impl Fixture {
    pub fn new(images: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        tiny_model(&root.join("model"));
        tiny_dataset(&root.join("data"), images);
        Self { _tmp: tmp, root }
    }
}

/// `train` arguments for a short run of the tiny model: rank 2 at lr 1e-3, 32 px.
pub fn train_args(model: &Path, data: &Path, out: &Path, steps: usize) -> TrainArgs {
    TrainArgs {
        model: Some(model.display().to_string()),
        data: Some(data.to_path_buf()),
        output: Some(out.to_path_buf()),
        steps: Some(steps),
        rank: Some(2),
        lr: Some(1e-3),
        resolution: Some(32),
        ..Default::default()
    }
}

/// The tensor names in a safetensors file.
pub fn tensor_names(p: &Path) -> Vec<String> {
    let data = std::fs::read(p).unwrap();
    safetensors::SafeTensors::deserialize(&data).unwrap().names().into_iter().map(String::from).collect()
}
