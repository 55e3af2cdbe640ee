//! The integration tests, compiled into one test binary (as ripgrep does): each file is a
//! module, `common` holds the shared helpers and tiny-model builders.
mod backward_fd;
mod bench;
mod cli_errors;
mod common;
mod crash_safety;
mod data_and_formats;
mod demo;
mod dora;
mod full_size;
mod fuzz;
mod generate;
mod hub;
mod layering;
mod lycoris;
mod masked_loss;
mod optimizers;
mod parity;
mod schedulers;
mod settings;
mod toolbox;
mod train_e2e;
mod train_embedding;
mod train_features;
mod unet_backward;
mod validation;
