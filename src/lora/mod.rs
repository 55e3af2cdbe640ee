//! LoRA files and what is done with them: targets, attaching adapters to a model, kohya/PEFT
//! formats and names, merge, resize, extract, trained embeddings. The adapter layer itself
//! (forward, backward, `Grads`) lives with the layers in `model::layers::adapter`.
pub mod apply;
pub mod attach;
pub mod embedding;
pub mod factors;
pub mod format;
pub mod lycoris;
pub mod merge;
pub mod names;
pub mod ops;
pub mod svd;
pub mod targets;

pub use attach::{attach, AdapterInfo, Init, LoraSpec};
