//! The tiny world demo: a procedural dataset of flat shapes (`world`) and exact, non-learned
//! scoring of generated images (`scores` reads each image, `metrics` turns that into the
//! demo's numbers), so that "the LoRA learned the new shape and forgot
//! nothing else" is a measured number rather than a judgement by eye.
pub mod base;
pub mod metrics;
pub mod pretrain;
pub mod run;
pub mod scores;
pub mod world;
