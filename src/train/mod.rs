//! Training: noise schedule, optimizer, the loop, checkpoints.
pub mod adafactor;
pub mod args;
pub mod batches;
pub mod config;
pub mod ema;
pub mod metadata;
pub mod noise;
pub mod optim;
pub mod optimizer;
pub mod prodigy;
pub mod samples;
pub mod setup;
pub mod state;
pub mod step;
pub mod trainer;
