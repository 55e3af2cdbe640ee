//! The metadata kohya's sd-scripts writes into a LoRA (`ss_*`) and the Stability model spec
//! (`modelspec.*`), which A1111/ComfyUI/civitai read to show what a LoRA is.
use super::config::TrainConfig;
use crate::model::load::Family;
use std::collections::{BTreeMap, HashMap};

pub fn kohya_metadata(
    cfg: &TrainConfig,
    family: Family,
    v_prediction: bool,
    resolution: u32,
    (num_images, num_reg_images): (usize, usize),
    tag_frequency: &BTreeMap<String, BTreeMap<String, usize>>,
    (steps_done, epoch_len): (usize, usize),
) -> HashMap<String, String> {
    let base = match family {
        Family::Sd1 => "sd_v1",
        Family::Sd2 => "sd_v2",
        Family::Sdxl => "sdxl_base_v1-0",
    };
    let arch = match (family, v_prediction) {
        (Family::Sd1, _) => "stable-diffusion-v1/lora",
        (Family::Sd2, true) => "stable-diffusion-v2-768-v/lora",
        (Family::Sd2, false) => "stable-diffusion-v2-512/lora",
        (Family::Sdxl, _) => "stable-diffusion-xl-v1-base/lora",
    };
    let py_bool = |b: bool| if b { "True" } else { "False" }.to_string();
    let title = cfg.output.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let mut m = HashMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    // DoRA, LoHa and LoKr are LyCORIS's to kohya users: its module and network_args say so
    use super::config::AdapterKind;
    let dora = cfg.adapter == AdapterKind::Dora;
    let lycoris = cfg.adapter != AdapterKind::Lora;
    put("ss_network_module", if lycoris { "lycoris.kohya" } else { "networks.lora" }.into());
    put("ss_network_dim", cfg.rank.to_string());
    put("ss_network_alpha", format!("{}", cfg.alpha()));
    // kohya's network_args, as its train_network.py records them: strings
    let mut args = serde_json::Map::new();
    if cfg.targets == crate::lora::targets::Preset::Full {
        args.insert("conv_dim".into(), cfg.rank.to_string().into());
        args.insert("conv_alpha".into(), format!("{}", cfg.alpha()).into());
    }
    if dora {
        let algo = if cfg.targets == crate::lora::targets::Preset::Full { "locon" } else { "lora" };
        args.insert("algo".into(), algo.into());
        args.insert("dora_wd".into(), "True".into());
    }
    if matches!(cfg.adapter, AdapterKind::Loha | AdapterKind::Lokr) {
        args.insert("algo".into(), cfg.adapter.name().into());
    }
    if cfg.adapter == AdapterKind::Lokr {
        args.insert("factor".into(), cfg.lokr_factor.to_string().into());
        args.insert("decompose_both".into(), py_bool(cfg.lokr_decompose_both).into());
        args.insert("full_matrix".into(), py_bool(cfg.lokr_full_matrix).into());
    }
    if let Some(r) = &cfg.exclude_layers {
        args.insert("exclude_patterns".into(), serde_json::json!([r]).to_string().into());
    }
    if !args.is_empty() {
        put("ss_network_args", serde_json::Value::Object(args).to_string());
    }
    put("ss_base_model_version", base.into());
    put("ss_v2", py_bool(family == Family::Sd2));
    put("ss_sd_model_name", cfg.model.clone());
    put("ss_steps", steps_done.to_string());
    put("ss_max_train_steps", cfg.steps.to_string());
    // kohya's epochs: passes over the data (micro-batches), the one a save falls in counted whole
    let epochs = |steps: usize| (steps * cfg.grad_accum).div_ceil(epoch_len.max(1));
    put("ss_epoch", epochs(steps_done).to_string());
    put("ss_num_epochs", epochs(cfg.steps).to_string());
    put("ss_learning_rate", format!("{}", cfg.lr));
    put("ss_unet_lr", format!("{}", cfg.lr));
    put("ss_text_encoder_lr", cfg.text_encoder_lr.map(|v| format!("{v}")).unwrap_or_else(|| "None".into()));
    put("ss_network_train_unet_only", py_bool(cfg.text_encoder_lr.is_none()));
    put("ss_lr_scheduler", cfg.lr_scheduler.name().to_string());
    put("ss_lr_warmup_steps", cfg.warmup_steps.to_string());
    put("ss_batch_size_per_device", cfg.batch_size.to_string());
    put("ss_gradient_accumulation_steps", cfg.grad_accum.to_string());
    put("ss_resolution", format!("({resolution}, {resolution})"));
    put("ss_num_train_images", num_images.to_string());
    put("ss_num_reg_images", num_reg_images.to_string());
    put("ss_prior_loss_weight", cfg.prior_loss_weight.to_string());
    if let Some(w) = &cfg.dop_trigger {
        // no kohya key for it: ai-toolkit's option names, so a reader can tell how it was made
        let dop = serde_json::json!({"trigger": w, "class": cfg.dop_class, "multiplier": cfg.dop_weight});
        put("sdlora_diff_output_preservation", dop.to_string());
    }
    put("ss_seed", cfg.seed.to_string());
    put("ss_min_snr_gamma", cfg.min_snr_gamma.map(|g| g.to_string()).unwrap_or_else(|| "None".into()));
    put("ss_noise_offset", cfg.noise_offset.to_string());
    put("ss_masked_loss", py_bool(cfg.masked_loss));
    if cfg.min_timestep > 0 || cfg.max_timestep.is_some() {
        // kohya writes no key for its min/max_timestep
        let range = serde_json::json!({"min_timestep": cfg.min_timestep, "max_timestep": cfg.max_timestep});
        put("sdlora_timestep_range", range.to_string());
    }
    put("ss_max_grad_norm", cfg.max_grad_norm.to_string());
    put("ss_caption_dropout_rate", cfg.caption_dropout.to_string());
    put("ss_flip_aug", py_bool(cfg.flip));
    put("ss_shuffle_caption", py_bool(cfg.shuffle_tags));
    put("ss_keep_tokens", cfg.keep_tokens.to_string());
    put("ss_mixed_precision", cfg.dtype.map_or("f32", |d| d.name()).into());
    // kohya's form: the class, then the --optimizer_args given
    let args = cfg.optimizer_args.iter().flat_map(|a| a.split_whitespace()).collect::<Vec<_>>().join(",");
    let class = cfg.optimizer.class();
    put("ss_optimizer", if args.is_empty() { class.into() } else { format!("{class}({args})") });
    if let Some(d) = cfg.ema_decay {
        let ema = serde_json::json!({"decay": d, "start_step": cfg.ema_start_step});
        put("sdlora_ema", ema.to_string());
    }
    put("ss_output_name", title.clone());
    put("ss_tag_frequency", serde_json::to_string(tag_frequency).unwrap_or_default());
    put("ss_training_comment", "trained with sdlora".into());
    put("modelspec.sai_model_spec", "1.0.0".into());
    put("modelspec.architecture", arch.into());
    put("modelspec.implementation", "https://github.com/kohya-ss/sd-scripts".into());
    put("modelspec.title", title);
    put("modelspec.resolution", format!("{resolution}x{resolution}"));
    put("modelspec.prediction_type", if v_prediction { "v" } else { "epsilon" }.into());
    m
}

/// kohya's ss_tag_frequency: per dataset folder, how often each comma-separated tag occurs.
pub fn tag_frequency<'a>(
    items: impl IntoIterator<Item = &'a crate::data::dataset::Item>,
) -> BTreeMap<String, BTreeMap<String, usize>> {
    let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for it in items {
        let dir = it
            .image
            .parent()
            .and_then(|p| p.file_name())
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let e = out.entry(dir).or_default();
        for tag in it.caption.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            *e.entry(tag.to_string()).or_default() += 1;
        }
    }
    out
}
