//! Text to image, as diffusers' StableDiffusion(XL)Pipeline: encode the prompt and the negative
//! prompt, start from seeded noise, denoise with classifier-free guidance, decode with the VAE.
use super::noise::{NoiseSource, SeededNoise};
use super::{resolve, Scheduler};
use crate::model::layers::adapter::Switch;
use crate::model::load::{Family, StableDiffusion};
use crate::model::text::{Conditioning, PromptEncoder};
use crate::model::unet::{UNet2DConditionModel, UNetInput};
use crate::model::vae::AutoencoderKL;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// What to generate. `Default` gives the CLI's defaults except the size (0 = the family's).
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative: String,
    pub steps: usize,
    /// Classifier-free guidance scale; at most 1 runs the prompt alone, as diffusers does.
    pub cfg_scale: f64,
    /// Image i of the batch uses seed + i (Automatic1111's numbering).
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub batch: usize,
    /// One of `super::SCHEDULER_NAMES`.
    pub scheduler: String,
    /// 1 = last text-encoder layer; 2 = penultimate (SD1/SD2).
    pub clip_skip: usize,
    /// Share of the steps, from the start, that the base model draws alone (its own text
    /// encoding, every adapter switched off): the first round(lora_start × steps). The base lays
    /// out the picture, the LoRAs then add what they learned. 0: the LoRAs act on every step.
    pub lora_start: f64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative: String::new(),
            steps: 25,
            cfg_scale: 7.0,
            seed: 42,
            width: 0,
            height: 0,
            batch: 1,
            scheduler: "default".into(),
            clip_skip: 1,
            lora_start: 0.0,
        }
    }
}

/// The model's own image side: its U-Net's sample_size × the VAE's scale where its config gives
/// one, else 512 for SD1, 768 for SD2 v-prediction models (512 for SD2 base), 1024 for SDXL.
pub fn default_size(sd: &StableDiffusion) -> usize {
    // diffusers' pipelines: unet.config.sample_size × vae_scale_factor, where the config says it
    let (unet, vae) = (sd.unet.as_ref(), sd.vae.as_ref());
    if let (Some(s), Some(v)) = (unet.and_then(|u| u.config.sample_size), vae) {
        return s * vae_scale_factor(v);
    }
    match sd.family {
        Family::Sd1 => 512,
        Family::Sd2 if sd.scheduler.prediction_type == "v_prediction" => 768,
        Family::Sd2 => 512,
        Family::Sdxl => 1024,
    }
}

/// Pixels per latent: 2^(VAE blocks − 1), 8 for every released model.
pub fn vae_scale_factor(vae: &AutoencoderKL) -> usize {
    1 << (vae.config.block_out_channels.len() - 1)
}

/// One generated image, RGB 8-bit.
pub struct GeneratedImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    pub seed: u64,
}

/// Everything the U-Net needs besides the latents: the text conditioning of [negative; prompt]
/// (or the prompt alone without guidance), SDXL's pooled embeds and size/crop ids.
pub struct Guidance {
    pub context: Tensor,
    pub text_embeds: Option<Tensor>,
    pub time_ids: Option<Tensor>,
    /// `None`: no classifier-free guidance.
    pub scale: Option<f64>,
}

impl Guidance {
    /// `cond` and `uncond` with the same batch size B; `scale` > 1 enables guidance (the U-Net
    /// then runs on 2B rows: negative first, as diffusers concatenates them). SDXL: `size` is
    /// (height, width) in pixels, used as original and target size with crop (0, 0).
    pub fn new(
        cond: &Conditioning,
        uncond: &Conditioning,
        scale: f64,
        size: Option<(usize, usize)>,
    ) -> Result<Self> {
        let guided = scale > 1.0;
        let cat = |u: &Tensor, c: &Tensor| -> Result<Tensor> {
            Ok(if guided { Tensor::cat(&[u, c], 0)? } else { c.clone() })
        };
        let context = cat(&uncond.context, &cond.context)?;
        let text_embeds = match (&uncond.pooled, &cond.pooled) {
            (Some(u), Some(c)) => Some(cat(u, c)?),
            _ => None,
        };
        let time_ids = match (size, &text_embeds) {
            (Some((h, w)), Some(t)) => {
                let (h, w) = (h as f32, w as f32);
                let row = [h, w, 0.0, 0.0, h, w];
                let n = t.dim(0)?;
                Some(Tensor::from_vec(row.repeat(n), (n, 6), t.device())?)
            }
            _ => None,
        };
        Ok(Self { context, text_embeds, time_ids, scale: guided.then_some(scale) })
    }
}

/// The first `steps` denoising steps run on the base model: `switch` off, `guidance` from the
/// base's text encoding (`GenerateOptions::lora_start`).
pub struct BaseFirst<'a> {
    pub steps: usize,
    pub guidance: &'a Guidance,
    pub switch: &'a Switch,
}

/// The denoising loop: `latents` (already scaled by `init_noise_sigma`) through every step.
/// `progress(i, n)` after each step.
pub fn denoise(
    unet: &UNet2DConditionModel,
    sched: &mut dyn Scheduler,
    mut latents: Tensor,
    g: &Guidance,
    base_first: Option<&BaseFirst>,
    noise: &mut dyn NoiseSource,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let timesteps = sched.timesteps().to_vec();
    for (i, &t) in timesteps.iter().enumerate() {
        let (g, base) = match base_first {
            Some(b) if i < b.steps => (b.guidance, Some(b.switch)),
            _ => (g, None),
        };
        let x = if g.scale.is_some() { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let x = sched.scale_model_input(&x, i)?;
        let n = x.dim(0)?;
        let timestep = Tensor::from_vec(vec![t as f32; n], n, x.device())?;
        let forward = || {
            unet.forward(&UNetInput {
                sample: &x,
                timestep: &timestep,
                encoder_hidden_states: &g.context,
                text_embeds: g.text_embeds.as_ref(),
                time_ids: g.time_ids.as_ref(),
            })
        };
        let out = match base {
            Some(switch) => switch.off_while(forward)?,
            None => forward()?,
        };
        let out = out.to_dtype(DType::F32)?;
        let pred = match g.scale {
            Some(s) => {
                let b = n / 2;
                let (u, c) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                (&u + ((c - &u)? * s)?)?
            }
            None => out,
        };
        latents = sched.step(&pred, i, &latents, noise)?;
        progress(i + 1, timesteps.len());
    }
    Ok(latents)
}

/// Latents → images in [0, 1], [B, 3, H, W] f32, one image at a time through the VAE.
pub fn decode(vae: &AutoencoderKL, latents: &Tensor) -> Result<Tensor> {
    let z = (latents / vae.config.scaling_factor)?;
    let mut images = vec![];
    for i in 0..z.dim(0)? {
        let img = vae.decode(&z.narrow(0, i, 1)?)?.to_dtype(DType::F32)?;
        images.push(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?);
    }
    Ok(Tensor::cat(&images, 0)?)
}

/// A non-finite output becomes an error naming the broken weight, or the precision, instead of a
/// black image.
fn finite(sd: &StableDiffusion, t: &Tensor, what: &str) -> Result<()> {
    // NaN and inf survive a sum (a max would skip NaN)
    let m = t.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    if m.is_finite() {
        return Ok(());
    }
    match sd.non_finite_weight() {
        Some(w) => bail!("{w} holds NaN or infinite values, so {what} produced them — the model file is broken, download it again"),
        None => bail!(
            "{what} produced NaN or infinite values (an overflow: a LoRA at too high a strength, or f16, in which SDXL's VAE overflows) — lower the LoRA's strength (FILE:0.7) or compute in f32"
        ),
    }
}

/// How many of `steps` the base draws alone for `GenerateOptions::lora_start` = `share`.
pub fn lora_start_steps(share: f64, steps: usize) -> Result<usize> {
    if !(0.0..=1.0).contains(&share) {
        bail!("--lora-start {share}: a share of the steps between 0 (the LoRA on every step) and 1");
    }
    Ok((share * steps as f64).round() as usize)
}

/// [B, 3, H, W] in [0, 1] → 8-bit RGB rows, rounded half to even as numpy does.
pub fn to_rgb8(images: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (b, _, h, w) = images.dims4()?;
    let hwc = images.permute((0, 2, 3, 1))?.contiguous()?;
    let mut out: Vec<Vec<u8>> = vec![];
    for i in 0..b {
        let v: Vec<f32> = hwc.get(i)?.flatten_all()?.to_vec1()?;
        debug_assert_eq!(v.len(), h * w * 3);
        out.push(v.iter().map(|x| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8).collect());
    }
    Ok(out)
}

/// Prompt → images: the whole pipeline on a loaded model (LoRAs already applied), `opts.batch`
/// images in one batch, image i with seed + i. `progress(i, n)` after each denoising step.
pub fn generate(
    sd: &StableDiffusion,
    opts: &GenerateOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<GeneratedImage>, &'static str)> {
    if opts.batch == 0 {
        bail!("--steps and --batch must be at least 1");
    }
    let rows: Vec<(String, u64)> =
        (0..opts.batch as u64).map(|i| (opts.prompt.clone(), opts.seed.wrapping_add(i))).collect();
    generate_rows(sd, opts, &rows, progress)
}

/// One image per (prompt, seed), the rest of `opts` shared (its prompt, seed and batch are not
/// used): the same pictures as one `generate` call per row, batched so that many small images
/// cost far fewer U-Net calls. Batches hold up to 16 rows of a 64×64 image, one of 512×512. A
/// prompt over 75 tokens pads the others of its batch to its chunk count, as Automatic1111 does.
pub fn generate_each(
    sd: &StableDiffusion,
    opts: &GenerateOptions,
    rows: &[(String, u64)],
) -> Result<Vec<GeneratedImage>> {
    let size_of = |v: usize| if v == 0 { default_size(sd) } else { v };
    let px = size_of(opts.width) * size_of(opts.height);
    let most = (16 * 64 * 64 / px).clamp(1, 16);
    // even batches: 20 rows as 10 + 10, not 16 + a slow 4
    let per_batch = rows.len().div_ceil(rows.len().div_ceil(most).max(1)).max(1);
    let mut out = vec![];
    for chunk in rows.chunks(per_batch) {
        out.extend(generate_rows(sd, opts, chunk, &mut |_, _| {})?.0);
    }
    Ok(out)
}

fn generate_rows(
    sd: &StableDiffusion,
    opts: &GenerateOptions,
    rows: &[(String, u64)],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<GeneratedImage>, &'static str)> {
    let (Some(unet), Some(vae)) = (&sd.unet, &sd.vae) else {
        bail!("generating needs the model's U-Net and VAE")
    };
    if sd.text_encoders.is_empty() {
        bail!("generating needs the model's text encoder(s)");
    }
    if opts.steps == 0 || rows.is_empty() {
        bail!("--steps and --batch must be at least 1");
    }
    let mut sched_cfg = sd.scheduler.clone();
    if sched_cfg.class_name.is_none() {
        // no scheduler_config.json (single files): Stable Diffusion's own steps_offset, as
        // diffusers' from_single_file takes it from the original repository's config
        sched_cfg.steps_offset = 1;
    }
    let (kind, _) = resolve(&opts.scheduler, &sched_cfg)?;
    let mut sched = super::build_kind(kind, &sched_cfg, opts.steps)?;
    let size_of = |v: usize| if v == 0 { default_size(sd) } else { v };
    let (width, height) = (size_of(opts.width), size_of(opts.height));
    let f = vae_scale_factor(vae);
    let multiple = f << (unet.config.block_out_channels.len() - 1);
    if width % multiple != 0 || height % multiple != 0 {
        bail!("size {width}x{height}: width and height must be multiples of {multiple} for this model");
    }

    // [negative, prompt of row 0, prompt of row 1, ...]
    let encoder = PromptEncoder::new(sd, opts.clip_skip)?;
    let texts: Vec<String> =
        std::iter::once(&opts.negative).chain(rows.iter().map(|r| &r.0)).cloned().collect();
    let encode = || encoder.encode_chunked(&sd.text_encoders, &texts).context("encoding the prompt");
    let n = rows.len();
    let xl_size = (sd.family == Family::Sdxl).then_some((height, width));
    let guide = |all: &Conditioning| -> Result<Guidance> {
        let part = |t: &Tensor, negative: bool| -> Result<Tensor> {
            Ok(if negative {
                let r = t.narrow(0, 0, 1)?;
                let mut dims = vec![n];
                dims.extend(&r.dims()[1..]);
                r.broadcast_as(dims)?.contiguous()?
            } else {
                t.narrow(0, 1, n)?
            })
        };
        let pick = |negative: bool| -> Result<Conditioning> {
            Ok(Conditioning {
                context: part(&all.context, negative)?,
                pooled: all.pooled.as_ref().map(|p| part(p, negative)).transpose()?,
            })
        };
        Guidance::new(&pick(false)?, &pick(true)?, opts.cfg_scale, xl_size)
    };
    let guidance = guide(&encode()?)?;
    let base_steps = lora_start_steps(opts.lora_start, opts.steps)?;
    let base_guidance = match base_steps {
        0 => None,
        _ => Some(guide(&sd.lora_switch.off_while(encode)?)?),
    };
    let base_first = base_guidance.as_ref().map(|guidance| BaseFirst {
        steps: base_steps,
        guidance,
        switch: &sd.lora_switch,
    });

    let seeds: Vec<u64> = rows.iter().map(|r| r.1).collect();
    let mut noise = SeededNoise::new(&seeds);
    let shape = [n, unet.config.in_channels, height / f, width / f];
    let latents = (noise.randn(&shape, unet.conv_in.weight.device())? * sched.init_noise_sigma())?;
    let latents =
        denoise(unet, sched.as_mut(), latents, &guidance, base_first.as_ref(), &mut noise, progress)?;
    finite(sd, &latents, "the U-Net")?;
    let decoded = decode(vae, &latents)?;
    finite(sd, &decoded, "the VAE")?;
    let images = to_rgb8(&decoded)?;
    let out = images
        .into_iter()
        .zip(seeds)
        .map(|(rgb, seed)| GeneratedImage { width: width as u32, height: height as u32, rgb, seed })
        .collect();
    Ok((out, sched.a1111_name()))
}

/// How evaluation, training sample grids and regularization images are drawn: the model's own
/// scheduler, `steps` steps, classifier-free guidance `cfg`, the base alone for the first
/// `lora_start` of the steps (`GenerateOptions::lora_start`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub steps: usize,
    pub cfg: f64,
    pub lora_start: f64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { steps: 20, cfg: 7.0, lora_start: 0.0 }
    }
}

/// One image per (prompt, seed) with the model as it is (base, or base + applied LoRA).
pub fn sample_images(
    sd: &StableDiffusion,
    prompts: &[(String, u64)],
    side: u32,
    how: Sampling,
) -> Result<Vec<image::RgbImage>> {
    let opts = GenerateOptions {
        steps: how.steps,
        cfg_scale: how.cfg,
        lora_start: how.lora_start,
        width: side as usize,
        height: side as usize,
        ..Default::default()
    };
    generate_each(sd, &opts, prompts)?
        .into_iter()
        .map(|g| image::RgbImage::from_raw(g.width, g.height, g.rgb).context("image buffer"))
        .collect()
}
