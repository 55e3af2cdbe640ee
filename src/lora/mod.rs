//! Low-rank adapters: the only trainable parameters.
pub mod adapter;
pub mod attach;

pub use adapter::{AdapterGrads, Lora};
pub use attach::{attach, AdapterInfo, Init, LoraSpec};
