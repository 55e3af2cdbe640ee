//! Everything before the first step: model, data, latents, adapters, optimizer.
use super::config::TrainConfig;
use super::ema::Ema;
use super::noise::NoiseSchedule;
use super::optimizer::Optimizer;
use crate::data::dataset::{balance_reg, scan, Item};
use crate::data::prepare::{prepare, Encoder, Sample};
use crate::lora::targets::{text_encoder_selects, unet_selects};
use crate::lora::{attach, AdapterInfo, Init, LoraSpec};
use crate::model::load::{load, Family, LoadOptions, StableDiffusion};
use crate::model::text::PromptEncoder;
use anyhow::Result;
use candle_core::{DType, Device, Var};

pub struct Run {
    pub sd: StableDiffusion,
    pub prompts: PromptEncoder,
    pub items: Vec<Item>,
    pub samples: Vec<Sample>,
    pub adapters: Vec<(String, AdapterInfo)>,
    pub params: Vec<Var>,
    /// Learning rate multiplier per parameter (text-encoder adapters train at their own rate).
    pub lr_scale: Vec<f64>,
    pub opt: Optimizer,
    /// `--ema-decay`: the average of the parameters that is saved as the LoRA.
    pub ema: Option<Ema>,
    pub resolution: u32,
    pub device: Device,
    pub train_text: bool,
    /// `--train-embedding`: its vectors are the last parameters.
    pub embedding: Option<crate::lora::embedding::TrainedWord>,
    pub sched: NoiseSchedule,
    /// Latents found in the cache and latents the VAE computed in this run.
    pub latents_cached: (usize, usize),
    pub text_cache: TextCache,
    /// Set to the micro-step's seed while training so LoRA dropout draws reproducible masks.
    pub switch: crate::model::layers::adapter::Switch,
}

/// Text conditioning of a caption, cached on disk while the text encoder is frozen.
pub struct TextCache {
    pub dir: std::path::PathBuf,
    pub fingerprint: String,
}

impl TextCache {
    fn key(&self, caption: &str) -> String {
        format!("text|{}|{caption}", self.fingerprint)
    }

    pub fn get(&self, caption: &str, device: &Device) -> Option<crate::model::text::Conditioning> {
        let key = self.key(caption);
        let mut m = crate::data::cache::get(&crate::data::cache::entry_path(&self.dir, "text-", &key), &key)?;
        let context = m.remove("context")?.to_device(device).ok()?;
        let pooled = m.remove("pooled").and_then(|p| p.to_device(device).ok());
        Some(crate::model::text::Conditioning { context, pooled })
    }

    /// A failed write only costs recomputing it next run.
    pub fn put(&self, caption: &str, c: &crate::model::text::Conditioning) {
        let mut t = vec![];
        if let Ok(x) = c.context.to_device(&Device::Cpu) {
            t.push(("context".to_string(), x));
        }
        if let Some(Ok(p)) = c.pooled.as_ref().map(|p| p.to_device(&Device::Cpu)) {
            t.push(("pooled".to_string(), p));
        }
        let key = self.key(caption);
        crate::data::cache::put(&crate::data::cache::entry_path(&self.dir, "text-", &key), &key, &t);
    }
}

/// The first CUDA GPU where the build has the `cuda` feature and one is there, else the CPU;
/// `SDLORA_DEVICE=cpu` keeps a CUDA build on the CPU.
pub fn device() -> Device {
    #[cfg(feature = "cuda")]
    if !std::env::var("SDLORA_DEVICE").is_ok_and(|d| d.eq_ignore_ascii_case("cpu")) {
        if let Ok(d) = Device::new_cuda(0) {
            return d;
        }
    }
    Device::Cpu
}

pub fn default_resolution(f: Family) -> u32 {
    if f == Family::Sdxl {
        1024
    } else {
        512
    }
}

pub fn setup(cfg: &TrainConfig, progress: &mut dyn FnMut(&str, usize, usize)) -> Result<Run> {
    let device = device();
    let dtype = match &cfg.dtype {
        Some(d) => d.dtype(),
        None if device.is_cuda() => DType::BF16,
        None => DType::F32,
    };
    if dtype == DType::BF16 && !device.is_cuda() {
        anyhow::bail!(
            "--dtype bf16: candle's CPU backend has no bf16 matmul — use f32 (or f16) on CPU, bf16 on CUDA"
        );
    }
    let mut items = scan(&cfg.data, cfg.caption.as_deref(), "--data")?;
    if cfg.val_split > 0.0 {
        items = crate::data::dataset::split_off(items, cfg.val_split, cfg.seed, &cfg.data)?;
    }
    if let Some(w) = &cfg.dop_trigger {
        if !items.iter().any(|i| crate::train::batches::replace_trigger(&i.caption, w, "").is_some()) {
            anyhow::bail!(
                "{}: no caption has the word `{w}` of --dop-trigger, so nothing would be preserved — \
                 put it in the captions (or --caption) or give the word they use",
                cfg.data.display()
            );
        }
    }
    if let Some(dir) = &cfg.reg_data {
        let reg = scan(dir, None, "--reg-data")?;
        items.extend(balance_reg(&items, reg));
    }
    if let Some(dir) = &cfg.val_data {
        items.extend(crate::data::dataset::held_out(scan(dir, None, "--val-data")?));
    }
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        prediction_type: cfg.prediction_type,
        config: cfg.model_config.clone(),
        ..Default::default()
    };
    let mut sd = load(&cfg.model, &opts)?;
    cfg.timesteps(sd.scheduler.num_train_timesteps).map_err(|e| anyhow::anyhow!("{}: {e}", cfg.model))?;
    let resolution = cfg.resolution.unwrap_or(default_resolution(sd.family));
    let halvings = sd.unet.as_ref().map_or(0, |u| u.config.block_out_channels.len() - 1) as u32;
    let vae_factor = crate::sample::pipeline::vae_scale_factor(sd.vae.as_ref().expect("loaded")) as u32;
    let step = crate::data::buckets::bucket_step(resolution, vae_factor, halvings);
    if resolution < step {
        anyhow::bail!(
            "--resolution {resolution}: this model needs image sides in multiples of {step} px (its VAE \
             shrinks them {vae_factor}×, its U-Net halves them {halvings} times) — give at least {step}"
        );
    }
    let cache_dir = cfg.cache_dir.clone().unwrap_or_else(|| cfg.data.join(".sdlora-cache"));
    crate::util::remove_stale_temps(&cache_dir);
    let vae = sd.vae.as_ref().expect("loaded with the VAE");
    // what cached latents and conditionings depend on: the weights' content, config and dtype
    let vae_hash = crate::data::cache::files_hash(&sd.files.vae, &cache_dir, &sd.source);
    let fingerprint = format!("{vae_hash}|{:?}|{dtype:?}", vae.config);
    let text_hash = crate::data::cache::files_hash(&sd.files.text_encoders, &cache_dir, &sd.source);
    let text_cache = TextCache {
        dir: cache_dir.clone(),
        fingerprint: format!(
            "{text_hash}|{:?}|{dtype:?}",
            sd.text_encoders.iter().map(|t| format!("{:?}", t.config)).collect::<Vec<_>>()
        ),
    };
    let enc = Encoder { vae, fingerprint, cache_dir: Some(cache_dir), counts: Default::default() };
    let n = items.len();
    let samples = prepare(&items, resolution, step, (cfg.flip, cfg.masked_loss), &enc, &mut |i| {
        progress("encoding images", i, n)
    })?;
    if cfg.masked_loss && !samples.iter().any(|s| s.mask.is_some() && items[s.item].is_training()) {
        anyhow::bail!(
            "--masked-loss: no training image in {} has a mask — put NAME-masklabel.png (white: train on it) beside NAME.png, or give the images an alpha channel",
            cfg.data.display()
        );
    }
    let latents_cached = enc.counts.get();
    if !cfg.random_crop && cfg.sample_prompts.is_none() {
        sd.vae = None; // latents are cached: free the VAE
    }
    let prompts = PromptEncoder::new(&sd, 1)?;

    let preset = cfg.targets;
    let switch = sd.lora_switch.clone();
    let spec = LoraSpec {
        rank: cfg.rank,
        alpha: cfg.alpha(),
        multiplier: 1.0,
        init: Init::Standard,
        seed: cfg.seed,
        dtype: DType::F32,
        dropout: cfg.lora_dropout,
        dora: cfg.adapter == crate::train::config::AdapterKind::Dora,
        factored: cfg.factor_spec(),
        switch: switch.clone(),
    };
    let excluded = cfg.excluded_layers()?;
    let kept = |p: &str| !excluded.as_ref().is_some_and(|r| r.is_match(p));
    let mut adapters = vec![];
    if let Some(u) = &mut sd.unet {
        for a in attach(u, "", &|p, l| unet_selects(preset, p, l) && kept(p), &spec, 0, &device)? {
            adapters.push(("unet".to_string(), a));
        }
    }
    if cfg.train_embedding.is_some() && sd.text_encoders.is_empty() {
        anyhow::bail!("--train-embedding: {} has no text encoder", cfg.model);
    }
    let train_text = cfg.text_encoder_lr.is_some() || cfg.train_embedding.is_some();
    if cfg.text_encoder_lr.is_some() {
        for (i, te) in sd.text_encoders.iter_mut().enumerate() {
            let comp = if i == 0 { "text_encoder" } else { "text_encoder_2" };
            let spec = LoraSpec { seed: cfg.seed + 1 + i as u64, ..spec.clone() };
            let select = |p: &str| text_encoder_selects(p) && kept(p);
            for a in attach(te, "", &|p, _| select(p), &spec, adapters.len(), &device)? {
                adapters.push((comp.to_string(), a));
            }
        }
    }
    if adapters.is_empty() {
        match &cfg.exclude_layers {
            Some(r) => anyhow::bail!(
                "--exclude-layers `{r}` leaves no layer of --targets {} to train: exclude fewer",
                cfg.targets.name()
            ),
            None => {
                anyhow::bail!(
                    "--targets {} selects no layer of {}: choose another",
                    cfg.targets.name(),
                    cfg.model
                )
            }
        }
    }
    let te_scale = cfg.text_encoder_lr.map(|l| l / cfg.lr).unwrap_or(0.0);
    let mut params = vec![];
    let mut lr_scale = vec![];
    for (comp, a) in &adapters {
        let s = if comp == "unet" { 1.0 } else { te_scale };
        for (_, v) in a.params() {
            params.push(v);
            lr_scale.push(s);
        }
    }
    let embedding = match &cfg.train_embedding {
        Some(w) => {
            let t = crate::lora::embedding::TrainedWord::new(
                &prompts,
                &mut sd.text_encoders,
                w,
                cfg.init_word.as_deref(),
            )?;
            for v in &t.vectors {
                params.push(v.clone());
                lr_scale.push(cfg.embedding_lr.map_or(1.0, |l| l / cfg.lr));
            }
            Some(t)
        }
        None => None,
    };
    let opt = Optimizer::new(&cfg.optimizer_settings()?, &params)?;
    let ema = cfg.ema_decay.map(|d| Ema::new(&params, d, cfg.ema_start_step)).transpose()?;
    let sched = NoiseSchedule::new(&sd.scheduler)?;
    Ok(Run {
        sd,
        prompts,
        items,
        samples,
        adapters,
        params,
        lr_scale,
        opt,
        ema,
        resolution,
        device,
        train_text,
        embedding,
        sched,
        latents_cached,
        text_cache,
        switch,
    })
}
