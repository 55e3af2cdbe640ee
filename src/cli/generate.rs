//! `sdlora generate`
use crate::model::load::{self, LoadOptions};
use crate::sample::pipeline::{self, GenerateOptions};
use crate::sample::png::{self as infopng, Infotext, LoraInfo};
use crate::sample::resolve;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// Flags of `sdlora generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Base model: a diffusers folder, a .safetensors/.ckpt single file, or a Hugging Face id
    /// (org/name[@revision]), read from the local HF cache and downloaded into it when missing
    /// (not with HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub model: String,
    /// For a single-file --model: a diffusers folder whose config.json files (and scheduler) to
    /// use instead of those inferred from the weights — for non-standard sizes.
    #[arg(long, value_name = "DIR")]
    pub model_config: Option<PathBuf>,
    /// A LoRA to apply, as FILE or FILE:STRENGTH (strength defaults to 1). Repeat for several.
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]")]
    pub loras: Vec<String>,
    /// Share of the steps the base model draws alone before the LoRAs join in, 0 to 1: the
    /// first round(SHARE × steps) steps run with every adapter off and the base's own text
    /// encoding, so the base lays out the picture and the LoRAs add what they learned on top
    /// (as ComfyUI's LoRA hook keyframes and A1111's loractl extension do). It keeps more of
    /// the base's composition, at some cost to what the LoRA changes early. 0: every step.
    #[arg(long, default_value_t = 0.0, value_name = "SHARE", allow_negative_numbers = true)]
    pub lora_start: f64,
    /// What to draw. Longer than 75 tokens is fine: the prompt is encoded in chunks of 75 tokens
    /// as Automatic1111 does (`BREAK` starts a new chunk).
    #[arg(long)]
    pub prompt: String,
    /// What to steer away from.
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 25)]
    pub steps: usize,
    /// Classifier-free guidance scale; 1 or less disables guidance.
    #[arg(long, default_value_t = 7.0, allow_negative_numbers = true)]
    pub cfg: f64,
    /// Seed of the first image; image i of the batch uses seed + i. A negative seed picks one at
    /// random. The noise is torch's CPU generator's, so a seed gives the same start as diffusers
    /// with `torch.Generator().manual_seed(seed)`.
    #[arg(long, default_value_t = 42, allow_negative_numbers = true)]
    pub seed: i64,
    /// Image width in pixels [default: the model's own size, as diffusers takes it: the U-Net
    /// config's sample_size × the VAE's scale (512 for SD1, 768 for SD2-768, 1024 for SDXL);
    /// without a config, 512, 768 for SD2 v-prediction models, 1024 for SDXL].
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels [default: as the width's].
    #[arg(long)]
    pub height: Option<usize>,
    /// Images to generate (denoised together).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Sampler: default (the class of the model's scheduler_config.json — DDIM, Euler, Euler a,
    /// DPM++ 2M or PLMS; others fall back to dpm++2m-karras), ddim, euler, euler-a (Euler
    /// ancestral), dpm++2m, dpm++2m-karras.
    #[arg(long, default_value = "default")]
    pub scheduler: String,
    /// Text-encoder layer counted from the end: 1 = last, 2 = penultimate (A1111's "Clip skip";
    /// SD1/SD2).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// epsilon or v_prediction, for single-file checkpoints, which do not say (SD 2.x 768
    /// models are v_prediction) [default: the model's scheduler config; single files: epsilon].
    #[arg(long, value_enum)]
    pub prediction_type: Option<crate::model::load::PredictionType>,
    /// Output folder (created if missing); images are named NNNNN-SEED.png.
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
}

/// `FILE[:STRENGTH]` → (file, strength). A colon whose tail is not a number belongs to the path.
pub fn parse_lora(spec: &str) -> Result<(PathBuf, f64)> {
    if let Some((file, s)) = spec.rsplit_once(':') {
        if let Ok(m) = s.parse::<f64>() {
            if file.is_empty() {
                bail!("--lora {spec}: missing file name before `:`");
            }
            if !m.is_finite() {
                bail!("--lora {spec}: the strength must be a finite number");
            }
            return Ok((PathBuf::from(file), m));
        }
    }
    Ok((PathBuf::from(spec), 1.0))
}

fn file_stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The folder or file the model's weights are in, for its hash.
fn model_location(source: &str) -> Option<PathBuf> {
    let p = Path::new(source);
    if p.exists() {
        return Some(p.to_path_buf());
    }
    load::hub::resolve(source).ok().flatten()
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    // cheap checks first, before loading gigabytes
    resolve(&args.scheduler, &Default::default()).context("--scheduler")?;
    let loras = args.loras.iter().map(|s| parse_lora(s)).collect::<Result<Vec<_>>>()?;
    for (f, _) in &loras {
        if !f.is_file() {
            bail!("--lora {}: no such file", f.display());
        }
    }
    if args.steps == 0 || args.batch == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    if pipeline::lora_start_steps(args.lora_start, args.steps)? > 0 && loras.is_empty() {
        bail!(
            "--lora-start {} holds the LoRAs back for some steps: give at least one --lora",
            args.lora_start
        );
    }
    if !args.cfg.is_finite() {
        bail!("--cfg {}: give a number (1 or less turns guidance off)", args.cfg);
    }
    if !(1..=2).contains(&args.clip_skip) {
        bail!(
            "--clip-skip {}: 1 (the last layer) or 2 (the penultimate) — deeper skips are not supported",
            args.clip_skip
        );
    }
    if args.width == Some(0) || args.height == Some(0) {
        bail!("--width and --height are sizes in pixels: leave them out for the model's default size");
    }
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("--out {}: cannot create the folder: {e}", args.out.display()))?;

    let load_opts = LoadOptions {
        prediction_type: args.prediction_type,
        config: args.model_config.clone(),
        ..Default::default()
    };
    let mut sd = load::load(&args.model, &load_opts)?;
    let (_, note) = resolve(&args.scheduler, &sd.scheduler)?;
    if let Some(n) = note {
        eprintln!("note: {n}");
    }
    let mut lora_info = vec![];
    let mut next_id = 0;
    for (file, m) in &loras {
        // LoHa / LoKr are merged into the weights, unless the LoRA joins late
        let late = pipeline::lora_start_steps(args.lora_start, args.steps)? > 0;
        let applied = crate::lora::apply::apply(&mut sd, file, *m, next_id, !late)?;
        if applied.adapters.is_empty() && applied.merged == 0 {
            bail!("{}: no module of this {} model matched the LoRA", file.display(), sd.family.name());
        }
        next_id += applied.adapters.len();
        lora_info.push(LoraInfo { name: file_stem(file), multiplier: *m, hash: infopng::lora_hash(file)? });
    }
    let seed = if args.seed < 0 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            % 4_294_967_296
    } else {
        args.seed as u64
    };
    let mut clip_skip = args.clip_skip;
    if sd.family == crate::model::load::Family::Sdxl && clip_skip > 1 {
        eprintln!("note: --clip-skip applies to SD 1.x/2.x; SDXL always uses the penultimate layers");
        clip_skip = 1;
    }
    let size = pipeline::default_size(&sd);
    let width = args.width.unwrap_or(size);
    let opts = GenerateOptions {
        prompt: args.prompt.clone(),
        negative: args.negative.clone(),
        steps: args.steps,
        cfg_scale: args.cfg,
        seed,
        width,
        height: args.height.unwrap_or(width),
        batch: args.batch,
        scheduler: args.scheduler.clone(),
        clip_skip,
        lora_start: args.lora_start,
    };
    let model_hash = model_location(&sd.source).map(|p| infopng::model_hash(&p)).transpose()?;

    let bar = ProgressBar::new(args.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("generate [{bar:30}] {pos}/{len} steps, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let (images, sampler) = pipeline::generate(&sd, &opts, &mut |i, n| {
        bar.set_length(n as u64); // PLMS makes one model call more than --steps
        bar.set_position(i as u64)
    })?;
    bar.finish_and_clear();

    for (index, img) in (infopng::next_index(&args.out)..).zip(images) {
        let info = Infotext {
            prompt: opts.prompt.clone(),
            negative: opts.negative.clone(),
            steps: opts.steps,
            sampler: sampler.to_string(),
            cfg_scale: opts.cfg_scale,
            seed: img.seed,
            width: img.width as usize,
            height: img.height as usize,
            model_hash: model_hash.clone(),
            model_name: infopng::model_name(&sd.source),
            clip_skip: opts.clip_skip,
            loras: lora_info.clone(),
            lora_start: opts.lora_start,
        };
        let bytes = infopng::encode_png(img.width, img.height, &img.rgb, &info.to_text())?;
        let path = args.out.join(format!("{index:05}-{}.png", img.seed));
        crate::util::write_atomic(&path, &bytes)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
