//! sdlora: fine-tune Stable Diffusion with LoRA.
//!
//! Modules are layers; each uses only those above it in this list (a test checks it):
//!
//! - `util`: atomic writes, small statistics.
//! - `report`: the self-contained HTML training report; takes plain data.
//! - `model`: configs, loading, and the frozen networks (U-Net, VAE, CLIP) built from layers that
//!   each have a forward and an explicit backward; the LoRA adapter is one of those layers.
//! - `lora`: which layers get adapters, attaching them, kohya/PEFT files, merge, resize, extract.
//! - `data`: image folders and captions to cached latents and buckets.
//! - `sample`: schedulers and the text-to-image pipeline.
//! - `train`: settings, setup, the training loop, optimizer, checkpoints.
//! - `eval`: base against base + LoRA on target and control prompts; the tiny world's exact scorer.
//! - `demo`: the embedded tiny-world demo and the pretraining of its base model.
//! - `cli`: one module per subcommand.
//! - `fuzz`: fuzz targets over every reader of outside bytes (`fuzz/`, FUZZING.md).
pub mod cli;
pub mod data;
pub mod demo;
pub mod eval;
#[doc(hidden)]
pub mod fuzz;
pub mod lora;
pub mod model;
pub mod report;
pub mod sample;
pub mod train;
pub mod util;

pub use candle_core::{DType, Device, Result, Tensor};
