//! Low-rank adapters: the only trainable parameters.
pub mod adapter;
pub mod apply;
pub mod attach;
pub mod format;
pub mod names;
pub mod targets;

pub use adapter::{AdapterGrads, Lora};
pub use attach::{attach, AdapterInfo, Init, LoraSpec};
