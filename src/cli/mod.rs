//! The command line: one module per subcommand.
pub mod generate;
pub mod train;

use clap::{Parser, Subcommand};

/// Fine-tune Stable Diffusion (SD 1.x, 2.x, SDXL) with LoRA, and use the result.
///
/// Typical use:
///   sdlora train --model ./stable-diffusion-v1-5 --data ./my_images --output my_lora.safetensors
///
/// Each command has its own --help.
#[derive(Parser)]
#[command(name = "sdlora", version, about, long_about, verbatim_doc_comment)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing buys nothing
pub enum Command {
    /// Train a LoRA on a folder of captioned images.
    ///
    /// The result is a kohya-format .safetensors that diffusers, ComfyUI and Automatic1111 load
    /// as is. Settings can also come from --config train.toml (same names, `_` for `-`).
    Train(crate::train::config::TrainArgs),
    /// Generate images from a prompt, optionally with LoRAs.
    ///
    /// Writes PNGs carrying Automatic1111's generation parameters (prompt, sampler, seed, model
    /// and LoRA hashes), which A1111's PNG Info, ComfyUI and Civitai read.
    Generate(generate::GenerateArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => train::run(&a),
        Command::Generate(a) => generate::run(&a),
    }
}
