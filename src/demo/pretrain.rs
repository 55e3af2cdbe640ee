//! The demo's base model, trained from scratch by this project on the tiny world without one
//! shape: first the VAE (an autoencoder on the images), then the U-Net (ε-prediction) on its
//! latents, every weight trainable (the layers' full-training path). The text encoder stays at
//! its seeded random init: its outputs still tell every caption apart.
use crate::data::prepare::to_tensor;
use crate::eval::world::{scenes, Colour, Scene, Shape, Texture};
use crate::model::clip::ClipTextModel;
use crate::model::config::{ClipTextConfig, PerBlock, UNetConfig, VaeConfig};
use crate::model::layers::Grads;
use crate::model::load::{Family, SchedulerConfig, StableDiffusion};
use crate::model::text::PromptEncoder;
use crate::model::tiny::{clip_shapes, unet_shapes, vae_shapes, PipelineConfig};
use crate::model::unet::{UNet2DConditionModel, UNetInput};
use crate::model::vae::AutoencoderKL;
use crate::model::weights::{random_tensor, Weights};
use crate::train::batches::{randn, rng_for};
use crate::train::noise::NoiseSchedule;
use crate::train::optim::{clip_grad_norm, lr_at, AdamW, LrSchedule};
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use std::collections::BTreeMap;
use std::path::Path;

/// Image side of the demo world.
pub const SIDE: u32 = 64;

pub fn demo_config() -> PipelineConfig {
    let unet: UNetConfig = serde_json::from_str(
        r#"{"block_out_channels":[64,128],"layers_per_block":1,"norm_num_groups":16,"cross_attention_dim":32,
            "attention_head_dim":8,"down_block_types":["DownBlock2D","CrossAttnDownBlock2D"],
            "up_block_types":["CrossAttnUpBlock2D","UpBlock2D"],"sample_size":16}"#,
    )
    .expect("valid config");
    let vae: VaeConfig = serde_json::from_str(
        r#"{"block_out_channels":[32,64,64],"layers_per_block":1,"latent_channels":4,"norm_num_groups":8,"sample_size":64}"#,
    )
    .expect("valid config");
    let te: ClipTextConfig = serde_json::from_str(
        r#"{"vocab_size":49408,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,
            "max_position_embeddings":77,"hidden_act":"quick_gelu","eos_token_id":49407,"architectures":["CLIPTextModel"]}"#,
    )
    .expect("valid config");
    // DPM++ 2M Karras, the sampler the demo's figures were measured with
    let scheduler: SchedulerConfig = serde_json::from_str(
        r#"{"_class_name":"DPMSolverMultistepScheduler","steps_offset":1,"use_karras_sigmas":true}"#,
    )
    .expect("valid config");
    PipelineConfig { unet, vae, text_encoders: vec![te], scheduler }
}

pub struct PretrainConfig {
    pub seed: u64,
    pub images: usize,
    pub exclude: Shape,
    pub vae_steps: usize,
    pub unet_steps: usize,
    pub batch: usize,
    pub vae_batch: usize,
    pub lr: f64,
    /// Wall-clock budget per phase: after 20 steps the phase's length is cut to what fits, so a
    /// time-boxed GPU run still ends with a full cosine decay.
    pub seconds: Option<(f64, f64)>,
    /// Write the folder every this many U-Net steps as well as at the end.
    pub save_every: usize,
    /// Continue from this folder's weights (an earlier `sdlora demo-pretrain` output) instead of a seeded
    /// init; with `vae_steps` 0 its VAE and latent scaling are kept as they are, so the U-Net's
    /// training adds up across runs.
    pub init: Option<std::path::PathBuf>,
    /// min-SNR-γ weighting of the U-Net loss (as `train --min-snr-gamma`): lowers the weight of
    /// nearly clean timesteps, so more of each step goes to the layout decided at high noise.
    pub min_snr_gamma: Option<f64>,
    /// Name the texture last ("a red ring on a blue background, striped") in every other
    /// caption: the slot where the demo's captions name checks (stage 6 on).
    pub texture_last: bool,
    /// Train only the VAE's decoder (`vae_steps` steps, with `init`), on every shape and texture
    /// of the world, checks and stars included; the encoder and latent scale stay as they are,
    /// so the U-Net's latents do not move (stage 7).
    pub decoder_only: bool,
    /// With `init`: the U-Net's blocks without attention (its full-resolution level) become
    /// cross-attention blocks, as SD 1.x has at every level but the lowest. The new transformers
    /// start seeded-random with a zero output projection, so the grown model draws exactly what
    /// `init` drew until training moves them.
    pub grow_attention: bool,
    /// Share of captions whose colour is a word of CLIP's vocabulary the world never uses (the
    /// picture keeps its colour): the base learns to lay out the shape after an unknown colour
    /// word, as SD does after a new word ("a pink cross"), rather than read its random encoding as
    /// another shape.
    pub unknown_colours: f64,
}

/// Cuts a time-boxed phase to the steps that fit, paced on steps 20–40 (the first ones include
/// the GPU kernels' load).
struct Pace {
    budget: Option<f64>,
    start: std::time::Instant,
    at20: f64,
}

impl Pace {
    fn new(budget: Option<f64>) -> Self {
        Pace { budget, start: std::time::Instant::now(), at20: 0.0 }
    }

    fn fit(&mut self, steps: usize, done: usize) -> usize {
        let now = self.start.elapsed().as_secs_f64();
        match self.budget {
            Some(_) if done == 20 => {
                self.at20 = now;
                steps
            }
            Some(b) if done == 40 && now > self.at20 => {
                let per_step = (now - self.at20) / 20.0;
                steps.min(done.saturating_add(((b - now) / per_step).max(0.0) as usize))
            }
            _ => steps,
        }
    }
}

/// Seeded weights as variables, by name: the layers share their storage, so optimizer updates
/// are what the model computes with, and saving writes the trained values.
fn var_map(
    shapes: &[(String, Vec<usize>)],
    seed: u64,
    init: Option<&Path>,
    dev: &Device,
) -> Result<BTreeMap<String, Var>> {
    var_map_growing(shapes, seed, init, &[], dev)
}

/// `var_map`, where tensors under `grown` prefixes are new: absent from `init`, seeded-random,
/// output projections zero (the block adds nothing until trained).
fn var_map_growing(
    shapes: &[(String, Vec<usize>)],
    seed: u64,
    init: Option<&Path>,
    grown: &[String],
    dev: &Device,
) -> Result<BTreeMap<String, Var>> {
    let loaded = init
        .map(|f| {
            candle_core::safetensors::load(f, &Device::Cpu).with_context(|| {
                format!(
                    "{}: cannot read — is --init a folder written by `sdlora demo-pretrain`?",
                    f.display()
                )
            })
        })
        .transpose()?;
    shapes
        .iter()
        .map(|(n, s)| {
            let new = grown.iter().any(|g| n.starts_with(g.as_str()));
            let t = match &loaded {
                Some(_) if new && n.contains("proj_out") => {
                    Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu)?
                }
                Some(_) if new => random_tensor(seed, n, &s.as_slice().into(), DType::F32, &Device::Cpu)?,
                Some(m) => {
                    let f = init.expect("loaded from a file").display();
                    let t =
                        m.get(n).ok_or_else(|| anyhow::anyhow!("{f}: no tensor `{n}` — not a demo model"))?;
                    anyhow::ensure!(t.dims() == s.as_slice(), "{f}: `{n}` is {:?}, expected {s:?}", t.dims());
                    t.to_dtype(DType::F32)?
                }
                None => random_tensor(seed, n, &s.as_slice().into(), DType::F32, &Device::Cpu)?,
            };
            Ok((n.clone(), Var::from_tensor(&t.to_device(dev)?)?))
        })
        .collect()
}

fn weights(m: &BTreeMap<String, Var>, dev: &Device) -> Weights {
    let map = m.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    Weights::from_map(map, "demo model", DType::F32, dev)
}

/// One AdamW step over the variables that received a gradient.
fn step(vars: &[Var], opt: &mut AdamW, g: &Grads, lr: f64) -> Result<f64> {
    let mut grads: Vec<Tensor> = vars
        .iter()
        .map(|v| g.weights.get(&v.as_tensor().id()).cloned().map_or_else(|| v.zeros_like(), Ok))
        .collect::<candle_core::Result<_>>()?;
    let norm = clip_grad_norm(&mut grads, 1.0)?;
    opt.step(vars, &grads, &vec![lr; vars.len()])?;
    Ok(norm)
}

pub fn pretrain(
    cfg: &PretrainConfig,
    out: &Path,
    progress: &mut dyn FnMut(&str, usize, usize, f64),
) -> Result<()> {
    let mut pc = demo_config();
    let grown = match &cfg.init {
        Some(d) => init_blocks(&mut pc.unet, &d.join("unet/config.json"), cfg.grow_attention)?,
        None => vec![],
    };
    let shapes: Vec<Shape> = Shape::ALL.into_iter().filter(|&s| s != cfg.exclude).collect();
    let world = scenes(cfg.seed, cfg.images, &shapes);
    let dev = crate::train::setup::device();
    let images: Vec<Tensor> =
        world.iter().map(|s| to_tensor(&s.render(SIDE), &dev)).collect::<Result<_>>()?;
    let images = Tensor::cat(&images, 0)?;

    // 1. VAE: an autoencoder on the means, with a small pull of the latents towards 0
    let init = |part: &str| cfg.init.as_ref().map(|d| d.join(part));
    let vae_vars = var_map(
        &vae_shapes(&pc.vae)?,
        cfg.seed + 1,
        init("vae/diffusion_pytorch_model.safetensors").as_deref(),
        &dev,
    )?;
    let mut vae = AutoencoderKL::load(&pc.vae, &weights(&vae_vars, &dev))?;
    let trainable: Vec<Var> = vae_vars
        .iter()
        .filter(|(k, _)| !cfg.decoder_only || k.starts_with("decoder.") || k.starts_with("post_quant_conv."))
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = AdamW::new(&trainable, 0.0)?;
    let lat = pc.vae.latent_channels;
    let decoder_images = match cfg.decoder_only {
        true => Some(universal_images(cfg.seed + 7, cfg.images, &dev)?),
        false => None,
    };
    let vae_images = decoder_images.as_ref().unwrap_or(&images);
    let (mut n_vae, mut pace) = (cfg.vae_steps, Pace::new(cfg.seconds.map(|s| s.0)));
    let mut i = 0;
    while i < n_vae {
        let mut rng = rng_for(cfg.seed, "vae", i as u64);
        let idx: Vec<u32> = (0..cfg.vae_batch).map(|_| rng.random_range(0..cfg.images as u32)).collect();
        let x = vae_images.index_select(&Tensor::new(idx.as_slice(), &dev)?, 0)?;
        let mut g = Grads::default();
        let loss = if cfg.decoder_only {
            let z = vae.encode_mean(&x)?;
            let (y, ds) = vae.decode_train(&z)?;
            let diff = (&y - &x)?;
            vae.decode_backward(ds, &(&diff * (2.0 / y.elem_count() as f64))?, &mut g)?;
            diff.sqr()?.mean_all()?
        } else {
            let (moments, es) = vae.encode_train(&x)?;
            let z = moments.narrow(1, 0, lat)?;
            let (y, ds) = vae.decode_train(&z)?;
            let diff = (&y - &x)?;
            let dz = vae.decode_backward(ds, &(&diff * (2.0 / y.elem_count() as f64))?, &mut g)?;
            let dz = (dz + (&z * (2e-4 / z.elem_count() as f64))?)?;
            let dm = Tensor::cat(&[&dz, &moments.narrow(1, lat, lat)?.zeros_like()?], 1)?;
            vae.encode_backward(es, &dm, &mut g)?;
            diff.sqr()?.mean_all()?
        };
        let loss = loss.to_scalar::<f32>()? as f64;
        step(&trainable, &mut opt, &g, lr_at(LrSchedule::Cosine, cfg.lr, i, n_vae, 50))?;
        i += 1;
        n_vae = pace.fit(n_vae, i);
        progress("vae", i, n_vae, loss);
    }
    // latents, scaled to unit variance as SD's scaling_factor does
    let mut zs = vec![];
    for c in 0..cfg.images.div_ceil(64) {
        let n = 64.min(cfg.images - c * 64);
        zs.push(vae.encode_mean(&images.narrow(0, c * 64, n)?)?);
    }
    let z = Tensor::cat(&zs, 0)?;
    match (&cfg.init, cfg.vae_steps == 0 || cfg.decoder_only) {
        (Some(d), true) => {
            let p = d.join("vae/config.json");
            let c: VaeConfig = serde_json::from_str(&std::fs::read_to_string(&p)?)
                .with_context(|| format!("{}: not a VAE config", p.display()))?;
            vae.config.scaling_factor = c.scaling_factor;
        }
        _ => {
            let std = z.flatten_all()?.var(0)?.sqrt()?.to_scalar::<f32>()? as f64;
            vae.config.scaling_factor = 1.0 / std;
        }
    }
    let latents = (z * vae.config.scaling_factor)?;

    // 2. text: the frozen random CLIP encodes every caption once
    let te_file = init("text_encoder/model.safetensors");
    let te_vars = var_map(&clip_shapes(&pc.text_encoders[0])?, cfg.seed + 2, te_file.as_deref(), &dev)?;
    let te = ClipTextModel::load(&pc.text_encoders[0], &weights(&te_vars, &dev))?;
    let sd = StableDiffusion {
        family: Family::Sd1,
        unet: None,
        vae: None,
        text_encoders: vec![],
        tokenizer_dirs: vec![None],
        scheduler: SchedulerConfig::default(),
        source: "demo".into(),
        lora_switch: crate::model::layers::adapter::switch(),
        files: Default::default(),
    };
    let prompts = PromptEncoder::new(&sd, 1)?;
    let mut captions = captions(&world, cfg.texture_last);
    unknown_colours(&mut captions, &world, cfg.unknown_colours, cfg.seed)?;
    let mut ctx = vec![];
    for chunk in captions.chunks(64) {
        ctx.push(prompts.encode(std::slice::from_ref(&te), chunk)?.context);
    }
    let ctx = Tensor::cat(&ctx, 0)?;
    let uncond = prompts.encode(std::slice::from_ref(&te), &[String::new()])?.context;

    // 3. U-Net: ε-prediction, 10 % empty captions so classifier-free guidance works
    let unet_file = init("unet/diffusion_pytorch_model.safetensors");
    let unet_vars =
        var_map_growing(&unet_shapes(&pc.unet)?, cfg.seed + 3, unet_file.as_deref(), &grown, &dev)?;
    let unet = UNet2DConditionModel::load(&pc.unet, &weights(&unet_vars, &dev))?;
    let trainable: Vec<Var> = unet_vars.values().cloned().collect();
    let mut opt = AdamW::new(&trainable, 0.0)?;
    let sched = NoiseSchedule::new(&pc.scheduler)?;
    let mut cfg_out = pc.clone();
    cfg_out.vae = vae.config.clone();
    let comps = [("unet", &unet_vars), ("vae", &vae_vars), ("text_encoder", &te_vars)];
    let (mut n_unet, mut pace) = (cfg.unet_steps, Pace::new(cfg.seconds.map(|s| s.1)));
    let mut i = 0;
    while i < n_unet {
        let mut rng = rng_for(cfg.seed, "unet", i as u64);
        let idx: Vec<u32> = (0..cfg.batch).map(|_| rng.random_range(0..cfg.images as u32)).collect();
        let it = Tensor::new(idx.as_slice(), &dev)?;
        let x0 = latents.index_select(&it, 0)?;
        let mut c = ctx.index_select(&it, 0)?;
        let drop: Vec<f32> =
            (0..cfg.batch).map(|_| if rng.random::<f64>() < 0.1 { 1.0 } else { 0.0 }).collect();
        let drop = Tensor::from_vec(drop, (cfg.batch, 1, 1), &dev)?;
        c = (c.broadcast_mul(&drop.affine(-1.0, 1.0)?)? + uncond.broadcast_mul(&drop)?)?;
        let noise = randn(&mut rng, x0.dims(), &dev)?;
        let t: Vec<usize> = (0..cfg.batch).map(|_| rng.random_range(0..sched.len())).collect();
        let xt = sched.add_noise(&x0, &noise, &t)?;
        let ts = Tensor::from_vec(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), cfg.batch, &dev)?;
        let input = UNetInput {
            sample: &xt,
            timestep: &ts,
            encoder_hidden_states: &c,
            text_embeds: None,
            time_ids: None,
        };
        let (pred, saved) = unet.forward_train(&input)?;
        let diff = (pred - &noise)?;
        let loss = diff.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        let w: Vec<f32> = t
            .iter()
            .map(|&ti| cfg.min_snr_gamma.map_or(1.0, |gm| sched.min_snr_weight(ti, gm)) as f32)
            .collect();
        let w = Tensor::from_vec(w, (cfg.batch, 1, 1, 1), &dev)?;
        let mut g = Grads::default();
        unet.backward(saved, &(diff.broadcast_mul(&w)? * (2.0 / diff.elem_count() as f64))?, &mut g)?;
        step(&trainable, &mut opt, &g, lr_at(LrSchedule::Cosine, cfg.lr, i, n_unet, 100))?;
        i += 1;
        n_unet = pace.fit(n_unet, i);
        progress("unet", i, n_unet, loss);
        if cfg.save_every > 0 && i % cfg.save_every == 0 && i < n_unet {
            save(out, &cfg_out, &comps)?;
        }
    }

    // 4. a diffusers folder in f16
    save(out, &cfg_out, &comps)
}

/// Width of the heads `--grow-attention` gives its new transformers.
const GROWN_HEAD_WIDTH: usize = 32;

/// The block types and heads of `init`'s U-Net config (a grown base keeps its attention); with
/// `grow`, its attention-free blocks become cross-attention blocks, and the weight prefixes of
/// their new transformers are returned.
fn init_blocks(unet: &mut UNetConfig, init: &Path, grow: bool) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(init).with_context(|| {
        format!("{}: cannot read — is --init a folder written by `sdlora demo-pretrain`?", init.display())
    })?;
    let was: UNetConfig =
        serde_json::from_str(&text).with_context(|| format!("{}: not a U-Net config", init.display()))?;
    anyhow::ensure!(
        was.block_out_channels == unet.block_out_channels,
        "{}: not the demo's U-Net (block_out_channels {:?})",
        init.display(),
        was.block_out_channels
    );
    unet.down_block_types = was.down_block_types.clone();
    unet.up_block_types = was.up_block_types.clone();
    unet.attention_head_dim = was.attention_head_dim.clone();
    unet.num_attention_heads = was.num_attention_heads.clone();
    if !grow {
        return Ok(vec![]);
    }
    let mut grown = vec![];
    let mut heads = was.heads().expand(was.down_block_types.len());
    for (i, t) in was.down_block_types.iter().enumerate() {
        if t == "DownBlock2D" {
            grown.push(format!("down_blocks.{i}.attentions."));
            // heads 32 wide: over the 256 tokens of a 16×16 map, eight heads 8 wide made a CPU
            // LoRA step 1.8× the base's and two heads 32 wide 1.55×, in 27 % less memory
            heads[i] = (was.block_out_channels[i] / GROWN_HEAD_WIDTH).max(1);
        }
    }
    for (i, t) in was.up_block_types.iter().enumerate() {
        if t == "UpBlock2D" {
            grown.push(format!("up_blocks.{i}.attentions."));
        }
    }
    anyhow::ensure!(!grown.is_empty(), "{}: every block has attention already", init.display());
    unet.attention_head_dim = PerBlock::Many(heads);
    unet.num_attention_heads = None;
    unet.down_block_types = vec!["CrossAttnDownBlock2D".into(); was.down_block_types.len()];
    unet.up_block_types = vec!["CrossAttnUpBlock2D".into(); was.up_block_types.len()];
    Ok(grown)
}

/// `n` images of every shape and texture, a quarter of them checkered: what a universal
/// decoder learns from (SD's VAE was trained on everything; a LoRA draws through it).
fn universal_images(seed: u64, n: usize, dev: &Device) -> Result<Tensor> {
    let imgs: Vec<Tensor> = scenes(seed, n, &Shape::ALL)
        .into_iter()
        .enumerate()
        .map(|(i, s)| if i % 4 == 0 { s.with_texture(Texture::Checks) } else { s })
        .map(|s| to_tensor(&s.render(SIDE), dev))
        .collect::<Result<_>>()?;
    Ok(Tensor::cat(&imgs, 0)?)
}

/// The pretraining captions of `world`; with `texture_last`, every other one names its texture
/// last ("a red ring on a blue background, striped").
pub fn captions(world: &[Scene], texture_last: bool) -> Vec<String> {
    world
        .iter()
        .enumerate()
        .map(|(i, s)| s.caption_with(s.texture == Texture::Checks || (texture_last && i % 2 == 1)))
        .collect()
}

/// Puts a word the world never uses in place of the colour in a `share` of `captions` ("a harbour
/// ring on a blue background"), each caption's word and draw seeded by its index. Never "pink" or
/// another word of the world, so the concept stays unseen.
pub fn unknown_colours(captions: &mut [String], world: &[Scene], share: f64, seed: u64) -> Result<()> {
    if share <= 0.0 {
        return Ok(());
    }
    let own: Vec<&str> = (Colour::SCORED.iter().map(|c| c.name()))
        .chain(Shape::ALL.iter().map(|s| s.name()))
        .chain(Texture::ALL.iter().filter_map(|t| t.adjective()))
        .chain(["background", "plain"])
        .collect();
    let words: Vec<String> = crate::model::tokenizer::ClipTokenizer::embedded()?
        .words()
        .into_iter()
        .filter(|w| !own.iter().any(|o| w.contains(o)))
        .collect();
    for (i, (c, s)) in captions.iter_mut().zip(world).enumerate() {
        let mut rng = rng_for(seed, "unknown colour", i as u64);
        if rng.random::<f64>() < share {
            let w = &words[rng.random_range(0..words.len())];
            *c = c.replacen(&format!("a {} ", s.colour.name()), &format!("a {w} "), 1);
        }
    }
    Ok(())
}

fn save(out: &Path, pc: &PipelineConfig, comps: &[(&str, &BTreeMap<String, Var>)]) -> Result<()> {
    std::fs::create_dir_all(out)?;
    for (name, vars) in comps {
        let d = out.join(name);
        std::fs::create_dir_all(&d)?;
        let file = if name.starts_with("text_encoder") {
            "model.safetensors"
        } else {
            "diffusion_pytorch_model.safetensors"
        };
        let tensors: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_dtype(DType::F16)?)))
            .collect::<Result<_>>()?;
        crate::model::weights::save_atomic(&d.join(file), &tensors, &Default::default())?;
        let cfg = match *name {
            "unet" => serde_json::to_string_pretty(&pc.unet)?,
            "vae" => serde_json::to_string_pretty(&pc.vae.clone().with_block_types())?,
            _ => serde_json::to_string_pretty(&pc.text_encoders[0])?,
        };
        std::fs::write(d.join("config.json"), cfg)?;
    }
    crate::model::tiny::write_index(out, pc)
}
