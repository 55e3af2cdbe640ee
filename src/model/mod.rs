//! The frozen Stable Diffusion networks, each with an explicit forward and backward.
pub mod blocks;
pub mod clip;
pub mod config;
pub mod layers;
pub mod load;
pub mod text;
pub mod tiny;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_train;
pub mod weights;
