//! The flags of `sdlora train`, each optional so that a `--config` file can supply it; their
//! defaults and validation live with the resolved settings (`super::config`).
use super::config::{AdapterKind, Preservation};
use super::optim::LrSchedule;
use super::optimizer::OptimizerKind;
use crate::lora::format::LoraFormat;
use crate::lora::targets::Preset;
use crate::model::load::PredictionType;
use crate::model::Precision;
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// Flags of `sdlora train`. Every one is optional here so that a config file can supply it.
#[derive(Args, Debug, Default, Serialize)]
pub struct TrainArgs {
    /// Base model: a diffusers folder, a .safetensors/.ckpt single file, or a Hugging Face id
    /// (org/name[@revision]), read from the local HF cache and downloaded into it when missing
    /// (not with HF_HUB_OFFLINE=1).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Folder of training images (jpg/png/webp) with same-named .txt captions; kohya's `N_name`
    /// sub-folders repeat their images N times per epoch.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Where to write the LoRA (.safetensors). A loss log (.loss.csv), the training state
    /// (.state.safetensors, for --resume) and report.html are written beside it.
    #[arg(long, short)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<PathBuf>,
    /// For a single-file --model: a diffusers folder whose config.json files (and scheduler) to
    /// use instead of those inferred from the weights — for non-standard sizes,
    /// e.g. the model's own Hugging Face repo without its weights.
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_config: Option<PathBuf>,
    /// A TOML file with any of these settings (keys = flag names with `_` for `-`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Optimizer steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Train for N epochs instead of --steps: passes over the data, repeats and regularization
    /// images counted; the steps are worked out from the buckets, --batch-size and --grad-accum.
    #[arg(long, conflicts_with = "steps")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<usize>,
    /// Images per step.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<usize>,
    /// lora; dora (weight-decomposed LoRA: a magnitude per output channel trained beside the
    /// low-rank pair; saved as LyCORIS's dora_scale for ComfyUI/A1111, PEFT's
    /// lora_magnitude_vector with --format peft for diffusers); loha or lokr (LyCORIS's Hadamard
    /// and Kronecker products, saved under LyCORIS's names for ComfyUI, A1111 and kohya's
    /// LyCORIS loader; --rank and --alpha as for LoRA).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterKind>,
    /// LoKr: the largest first factor of each channel count, e.g. 8 or 16 (LyCORIS's factor;
    /// -1: the two factors as close to square as the count divides).
    #[arg(long, allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lokr_factor: Option<i64>,
    /// LoKr: decompose the first factor into a low-rank pair too, where the rank is below half
    /// its size (LyCORIS's decompose_both; otherwise that factor is full rank).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lokr_decompose_both: Option<bool>,
    /// LoKr: keep the second factor whole (full rank) whatever --rank (LyCORIS's full_matrix).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lokr_full_matrix: Option<bool>,
    /// LoRA rank (network dim).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// Dropout on the adapters' inputs during training (peft's lora_dropout).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lora_dropout: Option<f64>,
    /// LoRA alpha; the update is scaled by alpha/rank [default: the rank].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Learning rate of the U-Net adapters.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Also train LoRA on the text encoder(s), at this learning rate (kohya's usual: 5e-5).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_lr: Option<f64>,
    /// Also train this word's token embedding (pivotal tuning; one CLIP token, e.g. the
    /// trigger word of your captions), written into the LoRA file as Automatic1111's bundled
    /// embedding. Prompts without the word encode exactly as the base's do.
    #[arg(long, value_name = "WORD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_embedding: Option<String>,
    /// Start the embedding from this word's (kohya's --init_word) [default: its own].
    #[arg(long, value_name = "WORD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_word: Option<String>,
    /// Learning rate of the embedding [default: --lr].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_lr: Option<f64>,
    /// Learning-rate schedule after warmup.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_scheduler: Option<LrSchedule>,
    /// Linear warmup steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    /// adamw (torch's AdamW), prodigy (learning-rate free: --lr defaults to 1.0 and scales its
    /// estimate) or adafactor (factored second moments, transformers' Adafactor).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<OptimizerKind>,
    /// The optimizer's settings as KEY=VALUE, under the reference's own keyword names (kohya's
    /// --optimizer_args), e.g. `--optimizer-args d_coef=2 use_bias_correction=true`.
    /// adamw: betas=0.9,0.999 eps=1e-8 weight_decay=0.01.
    /// prodigy: betas=0.9,0.999 beta3=None (√beta2) eps=1e-8 weight_decay=0 decouple=true
    /// use_bias_correction=false safeguard_warmup=false d0=1e-6 d_coef=1 growth_rate=inf.
    /// adafactor: eps=1e-30,1e-3 clip_threshold=1 decay_rate=-0.8 beta1=None weight_decay=0
    /// scale_parameter=false relative_step=false warmup_init=false (relative_step=true: its own
    /// step size min(1e-2, 1/√step) instead of --lr, which is then not given).
    #[arg(long, value_name = "KEY=VALUE", num_args = 1..)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer_args: Option<Vec<String>>,
    /// Save an exponential moving average of the adapters instead of their last values, e.g.
    /// 0.999 (diffusers' EMAModel: the average warms up as min(decay, (1+n)/(10+n))); the raw
    /// weights stay in the training state [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
    /// Steps before the average starts (it copies the weights until then).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_start_step: Option<usize>,
    /// Which layers get adapters: attn (to_q/k/v/out, diffusers' default), attn-mlp (every
    /// Linear and 1×1 conv of the transformer blocks, kohya's default), full (+ ResNet 3×3
    /// convs, "LoCon"), cross-kv (to_k/to_v of the cross-attentions, Custom Diffusion's choice:
    /// the least change to prompts without the new word).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub targets: Option<Preset>,
    /// Leave out every layer of --targets whose diffusers path matches this regular expression
    /// (kohya's network_args exclude_patterns). Paths read like `down_blocks.0.resnets.0.conv1`
    /// (U-Net) and `text_model.encoder.layers.0.mlp.fc1` (text encoder); e.g.
    /// `^(down_blocks\.0|up_blocks\.3)\.` keeps the adapters off SD1's full-resolution blocks
    /// [default: none].
    #[arg(long, value_name = "REGEX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude_layers: Option<String>,
    /// Training resolution: buckets have area ≤ resolution² [default: 512, SDXL 1024].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolution: Option<u32>,
    /// Seed of everything random; the same seed on the same machine gives the same LoRA bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Output format: kohya (ComfyUI, A1111, diffusers) or peft (diffusers' own).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LoraFormat>,
    /// Precision of the saved LoRA: f16, bf16 or f32.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_dtype: Option<Precision>,
    /// Precision of the frozen base model: f32, f16 or bf16 (adapters and optimizer stay f32)
    /// [default: f32 on CPU, bf16 on CUDA].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<Precision>,
    /// Save the LoRA and training state every N steps (0: only at the end).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every: Option<usize>,
    /// A folder of held-out images with captions (as --data, never trained on): their loss at
    /// fixed noise and timesteps is measured before training, every --val-every steps and at
    /// the end, and goes to the loss CSV and the report's plot.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_data: Option<PathBuf>,
    /// Hold this share of --data's images out for validation instead of a --val-data folder
    /// (at least one; picked by --seed, listed when training starts), e.g. 0.1.
    #[arg(long, value_name = "SHARE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_split: Option<f64>,
    /// Training images in the fixed-seed evaluation loss measured before and after training, at
    /// 2 noise draws each (the report's "eval loss"); 0 skips it. At full size each draw is a
    /// U-Net forward of seconds on a CPU.
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_samples: Option<usize>,
    /// Steps between validation losses (with --val-data or --val-split).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_every: Option<usize>,
    /// Save the LoRA and training state at the end of every N epochs (0: never), as a -stepN
    /// checkpoint of the step that ends the epoch.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_every_epochs: Option<usize>,
    /// Continue from a training state (<output>.state.safetensors or a -stepN one) exactly
    /// where it stopped; `latest` takes the newest whole state of --output in its folder, a
    /// folder the newest there. Ctrl-C during training saves the step and prints this command.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<PathBuf>,
    /// Caption for images without a .txt (e.g. your trigger word) [default: the folder's name
    /// after `N_`, else empty].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// Regularization images (kohya's reg_data_dir, DreamBooth's class images): a folder like
    /// --data of what the base should keep drawing, e.g. the base model's own images of the class
    /// ("a dog"). Mixed into the batches, as many per epoch as training images; they pull the
    /// LoRA close to what the base drew for prompts it is not about.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reg_data: Option<PathBuf>,
    /// Weight of the regularization images' loss (kohya's prior_loss_weight).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior_loss_weight: Option<f64>,
    /// What the regularization images' loss pulls towards. `noise`: the noise
    /// added to them, as for training images (kohya, DreamBooth). `output`: what the base model
    /// itself predicts for the same noisy latent and caption (the LoRA switched off for one extra
    /// forward pass), so any change the LoRA makes on those prompts costs loss, and a perfect
    /// LoRA can reach zero on them (distillation; ai-toolkit's output preservation).
    #[arg(long, value_enum, value_name = "noise|output")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior_preservation: Option<Preservation>,
    /// Differential output preservation (ai-toolkit's diff_output_preservation): each training
    /// image whose caption has this word trains twice per step, once as captioned and once with
    /// the word replaced by --dop-class and the base model's own prediction (LoRA off, same noisy
    /// latent) as target. The LoRA learns that the word brings the new concept, not the rest of
    /// the caption: prompts without it keep drawing what the base drew. Costs one more forward
    /// and backward per training image and one base forward.
    #[arg(long, value_name = "WORD")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dop_trigger: Option<String>,
    /// What --dop-trigger becomes in the preservation captions, e.g. the class ("dog" for "sks
    /// dog"); alternatives separated by `|` are drawn at random per image ("dog|puppy|"; an empty
    /// one takes the word out) [default: nothing: the word is taken out].
    #[arg(long, value_name = "WORDS")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dop_class: Option<String>,
    /// Weight of a preservation row against a training row (ai-toolkit's
    /// diff_output_preservation_multiplier).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dop_weight: Option<f64>,
    /// Probability of training a step on the empty caption.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_dropout: Option<f64>,
    /// Shuffle comma-separated tags of each caption, keeping the first --keep-tokens in place.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shuffle_tags: Option<bool>,
    /// Tags kept in front when shuffling.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_tokens: Option<usize>,
    /// Random horizontal flips.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flip: Option<bool>,
    /// Random instead of center crops to the bucket (disables the latent cache).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_crop: Option<bool>,
    /// Weigh each image's loss by its mask: `NAME-masklabel.png` beside `NAME.png` (OneTrainer's;
    /// white counts, black does not, grey in between), else the image's alpha channel; images
    /// with neither count whole. The mask is cropped and flipped with the image and averaged
    /// down to the latent's pixels (kohya's masked loss).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masked_loss: Option<bool>,
    /// min-SNR-γ loss weighting; 5 is the paper's value [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
    /// Noise offset (brighter/darker images); 0.05–0.1 is typical.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise_offset: Option<f64>,
    /// Train only on timesteps t ≥ this (kohya's min_timestep): t is drawn uniformly from
    /// [min, max). High t decide layout and shape, low t texture and detail.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_timestep: Option<usize>,
    /// Train only on timesteps t < this (kohya's max_timestep) [default: the scheduler's
    /// num_train_timesteps, 1000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_timestep: Option<usize>,
    /// Clip the gradient's global norm to this (0: off).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// Recompute each U-Net block in the backward instead of keeping its activations: less
    /// memory, about a third more time.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Prediction type when the model does not say (single files): epsilon or v_prediction.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionType>,
    /// Where latents are cached [default: <data>/.sdlora-cache].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    /// A text file of prompts (one per line): sample grids [base | LoRA], same seed, are
    /// written before training, every --sample-every steps and at the end.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_prompts: Option<PathBuf>,
    /// Steps between sample grids (0: only before and after).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_every: Option<usize>,
    /// Classifier-free guidance of every image training draws: the sample grids and the target
    /// and control prompts (1: none).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_cfg: Option<f64>,
    /// Share of the sampling steps the base draws alone before the LoRA joins in, for every
    /// image training draws after its start, as `generate --lora-start`.
    #[arg(long, value_name = "SHARE", allow_negative_numbers = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_lora_start: Option<f64>,
    /// A text file of prompts for what the LoRA should learn: after training each is drawn by
    /// base and base + LoRA (seed = --seed + line); tiny-world captions ("a red star on a blue
    /// background") are scored: the report's "learned".
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_prompts: Option<PathBuf>,
    /// A text file of prompts the LoRA should leave alone, drawn the same way: the report's
    /// "forgotten" (accuracy drop on tiny-world captions) and mean pixel distance (any prompt).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_prompts: Option<PathBuf>,
}
