//! sdlora: fine-tune Stable Diffusion with LoRA.
//!
//! The pipeline reads top-down: `model` (frozen networks with explicit forward/backward),
//! `lora` (adapters and their file formats). Beside it: `demo` (the tiny procedural world and
//! its exact scores) and `report` (the self-contained HTML training report).
pub mod cli;
pub mod data;
pub mod demo;
pub mod lora;
pub mod model;
pub mod report;
pub mod sample;
pub mod train;
pub mod util;

pub use candle_core::{DType, Device, Result, Tensor};
