//! What a LoRA learned and what it cost: each target and control prompt drawn by the base and by
//! base + LoRA with the same seed (`evaluate`). Prompts in the tiny world's caption form are also
//! scored exactly: `world` is that world (flat shapes, their captions and renderer), `scores`
//! reads what an image shows without a learned model, `metrics` turns readings into the
//! learned / forgotten numbers.
pub mod evaluate;
pub mod metrics;
pub mod scores;
pub mod world;
