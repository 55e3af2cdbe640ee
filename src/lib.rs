//! sdlora: fine-tune Stable Diffusion with LoRA.
//!
//! The pipeline reads top-down: `model` (frozen networks with explicit forward/backward),
//! `lora` (adapters and their file formats).
pub mod cli;
pub mod data;
pub mod lora;
pub mod model;
pub mod sample;
pub mod train;
pub mod util;

pub use candle_core::{DType, Device, Result, Tensor};
