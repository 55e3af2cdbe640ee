//! The frozen Stable Diffusion networks, each with an explicit forward and backward.
pub mod blocks;
pub mod config;
pub mod layers;
pub mod unet;
pub mod weights;
