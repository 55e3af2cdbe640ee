//! `sdlora train` settings: command-line flags and `--config train.toml` share their names
//! (flag `--batch-size` = key `batch_size`); flags given on the command line win.
use super::optim::LrSchedule;
use super::optimizer::{OptimizerKind, Settings};
use crate::lora::format::LoraFormat;
use crate::lora::targets::Preset;
use crate::model::load::PredictionType;
use crate::model::Precision;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub use super::args::TrainArgs;

/// The kind of adapter trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Low-rank pair (kohya's networks.lora, peft's LoRA).
    #[default]
    Lora,
    /// DoRA: the low-rank pair sets the weight's direction, a trained magnitude its size.
    Dora,
    /// LyCORIS's LoHa: the Hadamard product of two low-rank products.
    Loha,
    /// LyCORIS's LoKr: the Kronecker product of two factors (see --lokr-factor).
    Lokr,
}

impl AdapterKind {
    /// The name `--adapter` takes (LyCORIS's `algo` for LoHa and LoKr).
    pub fn name(self) -> String {
        crate::util::choice_name(&self)
    }
}

/// What the regularization images' loss pulls towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preservation {
    /// The noise added to them, as for training images (kohya, DreamBooth).
    Noise,
    /// The base model's own prediction for the same noisy latent and caption.
    Output,
}

impl Preservation {
    /// The `--prior-preservation` name.
    pub fn name(self) -> String {
        crate::util::choice_name(&self)
    }
}

/// The resolved settings of a run. `Default` is the one source of every default: the config
/// file, `--help` and validation all read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: String,
    pub data: PathBuf,
    pub output: PathBuf,
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub adapter: AdapterKind,
    pub lokr_factor: i64,
    pub lokr_decompose_both: bool,
    pub lokr_full_matrix: bool,
    pub rank: usize,
    pub alpha: Option<f64>,
    pub lora_dropout: f64,
    pub lr: f64,
    pub text_encoder_lr: Option<f64>,
    pub train_embedding: Option<String>,
    pub init_word: Option<String>,
    pub embedding_lr: Option<f64>,
    pub lr_scheduler: LrSchedule,
    pub warmup_steps: usize,
    pub optimizer: OptimizerKind,
    pub optimizer_args: Vec<String>,
    pub ema_decay: Option<f64>,
    pub ema_start_step: usize,
    pub targets: Preset,
    pub exclude_layers: Option<String>,
    pub resolution: Option<u32>,
    pub seed: u64,
    pub format: LoraFormat,
    pub save_dtype: Precision,
    pub dtype: Option<Precision>,
    pub save_every: usize,
    pub epochs: Option<usize>,
    pub save_every_epochs: usize,
    pub val_data: Option<PathBuf>,
    pub val_split: f64,
    pub eval_samples: usize,
    pub val_every: usize,
    pub resume: Option<PathBuf>,
    pub caption: Option<String>,
    pub caption_dropout: f64,
    pub shuffle_tags: bool,
    pub keep_tokens: usize,
    pub flip: bool,
    pub random_crop: bool,
    pub masked_loss: bool,
    pub min_snr_gamma: Option<f64>,
    pub noise_offset: f64,
    pub min_timestep: usize,
    pub max_timestep: Option<usize>,
    pub max_grad_norm: f64,
    pub gradient_checkpointing: bool,
    pub prediction_type: Option<PredictionType>,
    pub model_config: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub sample_prompts: Option<PathBuf>,
    pub sample_every: usize,
    pub sample_cfg: f64,
    pub sample_lora_start: f64,
    pub target_prompts: Option<PathBuf>,
    pub control_prompts: Option<PathBuf>,
    pub reg_data: Option<PathBuf>,
    pub prior_loss_weight: f64,
    pub prior_preservation: Preservation,
    pub dop_trigger: Option<String>,
    pub dop_class: String,
    pub dop_weight: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            // required: empty means not given
            model: String::new(),
            data: PathBuf::new(),
            output: PathBuf::new(),
            steps: 1500,
            batch_size: 1,
            grad_accum: 1,
            adapter: AdapterKind::Lora,
            lokr_factor: -1,
            lokr_decompose_both: false,
            lokr_full_matrix: false,
            rank: 16,
            alpha: None,
            lora_dropout: 0.0,
            lr: 1e-4,
            text_encoder_lr: None,
            train_embedding: None,
            init_word: None,
            embedding_lr: None,
            lr_scheduler: LrSchedule::Constant,
            warmup_steps: 0,
            optimizer: OptimizerKind::Adamw,
            optimizer_args: vec![],
            ema_decay: None,
            ema_start_step: 0,
            targets: Preset::AttnMlp,
            exclude_layers: None,
            resolution: None,
            seed: 42,
            format: LoraFormat::Kohya,
            save_dtype: Precision::F16,
            dtype: None,
            save_every: 0,
            epochs: None,
            save_every_epochs: 0,
            val_data: None,
            val_split: 0.0,
            eval_samples: 4,
            val_every: 100,
            resume: None,
            caption: None,
            caption_dropout: 0.0,
            shuffle_tags: false,
            keep_tokens: 0,
            flip: false,
            random_crop: false,
            masked_loss: false,
            min_snr_gamma: None,
            noise_offset: 0.0,
            min_timestep: 0,
            max_timestep: None,
            max_grad_norm: 1.0,
            gradient_checkpointing: false,
            prediction_type: None,
            model_config: None,
            cache_dir: None,
            sample_prompts: None,
            sample_every: 0,
            sample_cfg: crate::sample::pipeline::Sampling::default().cfg,
            sample_lora_start: 0.0,
            target_prompts: None,
            control_prompts: None,
            reg_data: None,
            prior_loss_weight: 1.0,
            prior_preservation: Preservation::Noise,
            dop_trigger: None,
            dop_class: String::new(),
            dop_weight: 1.0,
        }
    }
}

impl TrainConfig {
    /// Config file (if any) overlaid with the flags given on the command line.
    pub fn resolve(args: &TrainArgs) -> Result<Self> {
        let text = match &args.config {
            Some(p) => {
                Some(std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?)
            }
            None => None,
        };
        Self::resolve_text(args, text.as_deref())
    }

    /// `resolve` with the config file's `text` already read.
    pub fn resolve_text(args: &TrainArgs, text: Option<&str>) -> Result<Self> {
        let file = args.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "config".into());
        let mut map = match text {
            Some(text) => {
                let v: toml::Value =
                    toml::from_str(text).map_err(|e| anyhow::anyhow!("{file}: {}", e.message()))?;
                serde_json::to_value(v)?
            }
            None => serde_json::json!({}),
        };
        let flags = serde_json::to_value(args)?;
        // serde_json writes NaN and infinities as null, which would read as "wrong type"
        if let Some((k, _)) = flags.as_object().and_then(|f| f.iter().find(|(_, v)| v.is_null())) {
            anyhow::bail!("--{} must be a finite number", k.replace('_', "-"));
        }
        if let (Some(m), Some(f)) = (map.as_object_mut(), flags.as_object()) {
            // --steps and --epochs say the same thing: the one on the command line wins
            for (a, b) in [("steps", "epochs"), ("epochs", "steps")] {
                if f.contains_key(a) {
                    m.remove(b);
                }
            }
            for (k, v) in f {
                m.insert(k.clone(), v.clone());
            }
        }
        let origin =
            args.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "command line".into());
        // TOML has nan and inf too
        if let Some((k, _)) = map.as_object().and_then(|m| m.iter().find(|(_, v)| v.is_null())) {
            anyhow::bail!("{origin}: {k} must be a finite number");
        }
        if let Some(m) = map.as_object().filter(|m| m.contains_key("steps") && m.contains_key("epochs")) {
            let (s, e) = (&m["steps"], &m["epochs"]);
            anyhow::bail!("{origin}: steps = {s} and epochs = {e}: give one of them");
        }
        let lr_given = map.get("lr").is_some();
        let mut cfg: TrainConfig = serde_json::from_value(map.clone()).map_err(|e| {
            let msg = e.to_string();
            match msg.strip_prefix("unknown variant `").and_then(|m| m.split_once("`, expected ")) {
                // name the setting and its choices: "--targets `x`: choose attn, attn-mlp, …"
                Some((bad, expected)) => {
                    let key = map.as_object().and_then(|m| m.iter().find(|(_, v)| v.as_str() == Some(bad)));
                    let flag = key.map_or(String::new(), |(k, _)| format!("--{} ", k.replace('_', "-")));
                    let choices = expected.trim_start_matches("one of ").replace('`', "");
                    anyhow::anyhow!("{origin}: {flag}`{bad}`: choose {choices}")
                }
                None => anyhow::anyhow!("{origin}: {msg}"),
            }
        })?;
        for (flag, missing) in [
            ("model", cfg.model.is_empty()),
            ("data", cfg.data.as_os_str().is_empty()),
            ("output", cfg.output.as_os_str().is_empty()),
        ] {
            if missing {
                anyhow::bail!("{origin}: --{flag} is required (see sdlora train --help)");
            }
        }
        cfg.validate()?;
        cfg.fit_lr_to_optimizer(lr_given)?;
        Ok(cfg)
    }

    /// Prodigy's --lr scales its own estimate: 1.0 unless given. Adafactor's relative step
    /// replaces --lr and its schedule.
    fn fit_lr_to_optimizer(&mut self, lr_given: bool) -> Result<()> {
        match self.optimizer_settings()? {
            Settings::Prodigy(_) => {
                if !lr_given {
                    self.lr = 1.0;
                }
                for (flag, l) in
                    [("--text-encoder-lr", self.text_encoder_lr), ("--embedding-lr", self.embedding_lr)]
                {
                    if l.is_some_and(|l| l != self.lr) {
                        anyhow::bail!(
                            "{flag} {}: Prodigy estimates one step size for every parameter — give it the same value as --lr ({}), or leave it out",
                            l.unwrap_or_default(),
                            self.lr
                        );
                    }
                }
            }
            Settings::Adafactor(a) if a.relative_step => {
                if lr_given || self.embedding_lr.is_some() {
                    anyhow::bail!(
                        "--optimizer-args relative_step=true: Adafactor sets its own step size — leave out --lr and --embedding-lr, or set relative_step=false"
                    );
                }
                if self.lr_scheduler != LrSchedule::Constant || self.warmup_steps > 0 {
                    anyhow::bail!(
                        "--optimizer-args relative_step=true: Adafactor's step size has its own schedule — leave out --lr-scheduler and --warmup-steps (warmup_init=true warms it up)"
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// LoHa / LoKr's shapes, or None for LoRA and DoRA.
    pub fn factor_spec(&self) -> Option<crate::lora::factors::FactorSpec> {
        use crate::model::layers::lycoris::FactorKind;
        let kind = match self.adapter {
            AdapterKind::Loha => FactorKind::Hada,
            AdapterKind::Lokr => FactorKind::Kron,
            _ => return None,
        };
        Some(crate::lora::factors::FactorSpec {
            kind,
            factor: self.lokr_factor,
            decompose_both: self.lokr_decompose_both,
            full_matrix: self.lokr_full_matrix,
        })
    }

    /// `--optimizer` with `--optimizer-args` read.
    pub fn optimizer_settings(&self) -> Result<Settings> {
        self.optimizer.settings(&self.optimizer_args)
    }

    /// --exclude-layers compiled; an error line names the bad expression.
    pub fn excluded_layers(&self) -> Result<Option<regex::Regex>> {
        self.exclude_layers
            .as_deref()
            .map(|r| {
                regex::Regex::new(r).map_err(|e| {
                    let why = e.to_string().lines().last().unwrap_or("").trim().to_string();
                    anyhow::anyhow!("--exclude-layers `{r}` is not a regular expression ({why})")
                })
            })
            .transpose()
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(anyhow::anyhow!(m));
        if self.steps == 0
            || self.batch_size == 0
            || self.grad_accum == 0
            || self.rank == 0
            || self.epochs == Some(0)
        {
            return bad("--steps, --epochs, --batch-size, --grad-accum and --rank must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("--lr {} must be a positive number", self.lr));
        }
        self.excluded_layers()?;
        if self.train_embedding.is_none() && (self.init_word.is_some() || self.embedding_lr.is_some()) {
            return bad(
                "--init-word and --embedding-lr act on an embedding: name its word with --train-embedding"
                    .into(),
            );
        }
        if let Some(l) = self.embedding_lr.filter(|l| !(*l >= 0.0 && l.is_finite())) {
            return bad(format!("--embedding-lr {l} must be 0 or more"));
        }
        if self.resolution.is_some_and(|r| r < 8) {
            return bad(format!(
                "--resolution {}: a side in pixels, at least 8 (SD1/SD2 train at 512, SDXL at 1024)",
                self.resolution.unwrap_or_default()
            ));
        }
        if let Some(a) = self.alpha.filter(|a| a.is_nan() || *a <= 0.0) {
            return bad(format!(
                "--alpha {a} scales every update to nothing: give a positive alpha, or leave it out for the rank"
            ));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad("--lora-dropout is a probability in [0, 1)".into());
        }
        if !(self.prior_loss_weight >= 0.0 && self.prior_loss_weight.is_finite()) {
            return bad(format!("--prior-loss-weight {} must be 0 or more", self.prior_loss_weight));
        }
        let default = TrainConfig::default();
        if self.reg_data.is_none() && self.prior_loss_weight != default.prior_loss_weight {
            return bad("--prior-loss-weight weighs regularization images: give them with --reg-data".into());
        }
        if self.reg_data.is_none() && self.prior_preservation != default.prior_preservation {
            return bad(
                "--prior-preservation acts on regularization images: give them with --reg-data".into()
            );
        }
        match &self.dop_trigger {
            Some(w) if w.trim().is_empty() || w.contains(',') => {
                return bad(format!(
                    "--dop-trigger `{w}`: give the word (or words) of your captions that names the new concept"
                ));
            }
            None if !self.dop_class.is_empty() || self.dop_weight != default.dop_weight => {
                return bad(
                    "--dop-class and --dop-weight need the word to preserve without: --dop-trigger".into()
                );
            }
            _ => {}
        }
        if !(self.dop_weight >= 0.0 && self.dop_weight.is_finite()) {
            return bad(format!("--dop-weight {} must be 0 or more", self.dop_weight));
        }
        if self.max_timestep.is_some_and(|m| m <= self.min_timestep) {
            return bad(format!(
                "--min-timestep {} and --max-timestep {} leave no timestep to train on: t is drawn from [min, max)",
                self.min_timestep,
                self.max_timestep.unwrap_or_default()
            ));
        }
        if !(self.sample_cfg >= 1.0 && self.sample_cfg.is_finite()) {
            return bad(format!("--sample-cfg {} must be 1 (no guidance) or more", self.sample_cfg));
        }
        if !(0.0..=1.0).contains(&self.sample_lora_start) {
            return bad(format!(
                "--sample-lora-start {}: a share of the sampling steps between 0 and 1",
                self.sample_lora_start
            ));
        }
        if !(0.0..1.0).contains(&self.val_split) {
            return bad(format!(
                "--val-split {}: the share of the images to hold out, from 0 to below 1",
                self.val_split
            ));
        }
        let lycoris = matches!(self.adapter, AdapterKind::Loha | AdapterKind::Lokr);
        if lycoris && self.format != LoraFormat::Kohya {
            return bad(format!(
                "--adapter {} is written in LyCORIS's kohya layout only (diffusers does not load it): leave out --format peft",
                self.adapter.name()
            ));
        }
        let lokr_set = self.lokr_factor != -1 || self.lokr_decompose_both || self.lokr_full_matrix;
        if lokr_set && self.adapter != AdapterKind::Lokr {
            return bad(
                "--lokr-factor, --lokr-decompose-both and --lokr-full-matrix shape LoKr: add --adapter lokr"
                    .into(),
            );
        }
        if self.lokr_factor == 0 || self.lokr_factor < -1 {
            return bad(format!("--lokr-factor {}: a positive factor, or -1", self.lokr_factor));
        }
        if let Some(d) = self.ema_decay.filter(|d| !(*d > 0.0 && *d < 1.0)) {
            return bad(format!("--ema-decay {d}: a decay between 0 and 1, e.g. 0.999"));
        }
        if self.ema_decay.is_none() && self.ema_start_step > 0 {
            return bad("--ema-start-step delays the average of --ema-decay: give it too".into());
        }
        self.optimizer_settings()?;
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return bad("--caption-dropout is a probability between 0 and 1".into());
        }
        Ok(())
    }

    /// How training draws its sample grids and its target and control prompts.
    pub fn sampling(&self) -> crate::sample::pipeline::Sampling {
        crate::sample::pipeline::Sampling {
            cfg: self.sample_cfg,
            lora_start: self.sample_lora_start,
            ..Default::default()
        }
    }

    /// With `--epochs`, the settings with `steps` worked out: the optimizer steps that cover
    /// that many epochs of `epoch_len` micro-batches.
    pub fn with_epochs(&self, epoch_len: usize) -> Self {
        let mut c = self.clone();
        if let Some(e) = self.epochs {
            c.steps = (e * epoch_len).div_ceil(self.grad_accum).max(1);
        }
        c
    }

    /// The timesteps training draws from, for a scheduler of `n` training timesteps.
    pub fn timesteps(&self, n: usize) -> Result<std::ops::Range<usize>> {
        let max = self.max_timestep.unwrap_or(n);
        if max > n || self.min_timestep >= max {
            anyhow::bail!(
                "--min-timestep {} / --max-timestep {max}: its scheduler has {n} training timesteps (0..{n}); \
                 give 0 ≤ min < max ≤ {n}",
                self.min_timestep
            );
        }
        Ok(self.min_timestep..max)
    }

    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
