//! The demo's base model, compiled into the binary: a diffusers folder pretrained on the tiny world
//! without stars (and, as every base of the world, without checkered textures or pink) by
//! `sdlora demo-pretrain` (exact command and run in assets/demo_model/README.md).
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use crate::eval::world::{Colour, Concept, Shape, Texture};

/// The shape the embedded base never saw: pretraining leaves it out.
pub const MISSING: Shape = Shape::Star;

/// What the demo teaches by default: pink, a colour no base saw. With the base drawing the first
/// 6 of 20 sampling steps (`--lora-start 0.3`) its LoRA shows pink in most samples and keeps the
/// control prompts' colours and backgrounds (docs/experiments/2026-11-demo-pink.md); checks
/// (`--concept checkered`), the default until then, reach about half the samples.
pub const CONCEPT: Concept = Concept::Colour(Colour::Pink);

/// Whether the embedded base never saw `c`.
pub fn unseen(c: Concept) -> bool {
    match c {
        Concept::Colour(c) => c.unseen(),
        _ => matches!(c, Concept::Shape(MISSING) | Concept::Texture(Texture::Checks)),
    }
}

macro_rules! file {
    ($p:literal) => {
        ($p, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo_model/", $p)).as_slice())
    };
}

const FILES: [(&str, &[u8]); 8] = [
    file!("model_index.json"),
    file!("scheduler/scheduler_config.json"),
    file!("text_encoder/config.json"),
    file!("text_encoder/model.safetensors"),
    file!("unet/config.json"),
    file!("unet/diffusion_pytorch_model.safetensors"),
    file!("vae/config.json"),
    file!("vae/diffusion_pytorch_model.safetensors"),
];

/// Writes the embedded base into `dir` (skipping files already there with the same bytes: a base
/// from an older binary is replaced) and returns it.
pub fn write(dir: &Path) -> Result<PathBuf> {
    for (rel, bytes) in FILES {
        let p = dir.join(rel);
        if std::fs::read(&p).is_ok_and(|b| b == bytes) {
            continue;
        }
        let parent = p.parent().context("file in a folder")?;
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create folder", parent.display()))?;
        let tmp = p.with_extension("partial");
        std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
        std::fs::rename(&tmp, &p)?;
    }
    Ok(dir.to_path_buf())
}
