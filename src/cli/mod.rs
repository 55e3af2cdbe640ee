//! The command line: one module per subcommand.
pub mod bench;
mod bench_step;
pub mod demo;
pub mod demo_pretrain;
pub mod generate;
pub mod tools;
pub mod train;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

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
pub enum Command {
    /// Train a LoRA on a folder of captioned images.
    ///
    /// The result is a kohya-format .safetensors that diffusers, ComfyUI and Automatic1111 load
    /// as is. Settings can also come from --config train.toml (same names, `_` for `-`).
    Train(Box<crate::train::config::TrainArgs>),
    /// Bake LoRAs (with scales) into a model: a diffusers folder or a single .safetensors.
    Merge(tools::MergeArgs),
    /// Convert a LoRA between kohya and PEFT/diffusers naming (lossless).
    Convert(tools::ConvertArgs),
    /// Describe a LoRA: format, base family, layers, rank/alpha, size, training metadata.
    Inspect(tools::InspectArgs),
    /// Reduce a LoRA's rank by SVD, reporting the energy kept per layer.
    Resize(tools::ResizeArgs),
    /// Extract a LoRA from the difference of a fine-tuned model and its base (SVD).
    Extract(tools::ExtractArgs),
    /// The whole product on an embedded tiny world: learn a new concept, measure what was
    /// learned and what was forgotten, write report.html.
    Demo(Box<demo::DemoArgs>),
    /// Benchmark inputs: random-weight models of the real architectures, a procedural dataset.
    #[command(hide = true)]
    Bench(bench::BenchArgs),
    /// Train the demo's base model from scratch on the tiny world (how assets/demo_model was
    /// made).
    #[command(hide = true)]
    DemoPretrain(Box<demo_pretrain::PretrainArgs>),
    /// Generate images from a prompt, optionally with LoRAs.
    ///
    /// Writes PNGs carrying Automatic1111's generation parameters (prompt, sampler, seed, model
    /// and LoRA hashes), which A1111's PNG Info, ComfyUI and Civitai read.
    Generate(generate::GenerateArgs),
}

/// The command line as parsed from the process's arguments (`--help` and errors exit).
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// The command-line definition, with the defaults of `train` and `demo` written into their help
/// from `TrainConfig::default()` and `DemoOptions`, the one place each is set. A default that
/// depends on the model, the device or the concept is not among them; its help says it in words.
pub fn command() -> clap::Command {
    let train = serde_json::to_value(crate::train::config::TrainConfig::default()).expect("plain data");
    let train: Vec<(String, String)> = train
        .as_object()
        .expect("a struct")
        .iter()
        .filter_map(|(k, v)| match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) if s.is_empty() => None,
            serde_json::Value::Array(a) if a.is_empty() => Some((k.clone(), "none".into())),
            serde_json::Value::String(s) => Some((k.clone(), s.clone())),
            v => Some((k.clone(), v.to_string())),
        })
        .collect();
    let demo = crate::demo::run::DemoOptions::new(Default::default()).flag_defaults();
    let demo = demo.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    with_defaults(with_defaults(Cli::command(), "train", train), "demo", demo)
}

/// `[default: …]` appended to the help of each of `sub`'s flags named in `defaults`.
fn with_defaults(cmd: clap::Command, sub: &str, defaults: Vec<(String, String)>) -> clap::Command {
    cmd.mut_subcommand(sub, |mut c| {
        for (id, shown) in defaults {
            if c.get_arguments().all(|a| a.get_id() != id.as_str()) {
                continue;
            }
            c = c.mut_arg(id, |a| {
                let with = |h: Option<&clap::builder::StyledStr>| {
                    let h = h.map(|h| h.to_string()).unwrap_or_default();
                    let h = h.trim_end().trim_end_matches('.');
                    if h.is_empty() {
                        format!("[default: {shown}]")
                    } else {
                        format!("{h} [default: {shown}]")
                    }
                };
                let (short, long) = (with(a.get_help()), a.get_long_help().map(|h| with(Some(h))));
                let a = a.help(short);
                match long {
                    Some(l) => a.long_help(l),
                    None => a,
                }
            });
        }
        c
    })
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => train::run(&a),
        Command::Merge(a) => tools::merge(&a),
        Command::Convert(a) => tools::convert(&a),
        Command::Inspect(a) => tools::inspect(&a),
        Command::Resize(a) => tools::resize_cmd(&a),
        Command::Extract(a) => tools::extract_cmd(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Demo(a) => demo::run(&a),
        Command::DemoPretrain(a) => demo_pretrain::run(&a),
        Command::Generate(a) => generate::run(&a),
    }
}
