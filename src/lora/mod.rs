//! Low-rank adapters: the only trainable parameters.
pub mod adapter;
pub mod apply;
pub mod attach;
pub mod embedding;
pub mod format;
pub mod merge;
pub mod names;
pub mod ops;
pub mod svd;
pub mod targets;

pub use adapter::{AdapterGrads, Lora};
pub use attach::{attach, AdapterInfo, Init, LoraSpec};
