//! Images and captions → cached latents and per-step batches.
pub mod buckets;
pub mod cache;
pub mod dataset;
pub mod mask;
pub mod prepare;
