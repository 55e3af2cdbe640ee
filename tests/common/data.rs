//! A tiny model and a tiny dataset, made on the fly.
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
