//! Target presets: which layers of the U-Net (and text encoder) get adapters.
use crate::model::layers::LayerMut;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// to_q, to_k, to_v, to_out.0 of every attention (diffusers' training scripts).
    Attn,
    /// Every Linear and 1×1 conv of the transformer blocks: attention, feed-forward, proj_in/out
    /// (kohya's default LoRA).
    AttnMlp,
    /// attn-mlp plus the ResNet blocks' convolutions and the resamplers ("LoCon").
    Full,
    /// to_k and to_v of the cross-attentions only (Custom Diffusion): the U-Net changes only in
    /// how it reads the prompt, so prompts without the new word change least.
    CrossKv,
}

const ATTN: &[&str] = &["to_q", "to_k", "to_v", "to_out.0"];

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::util::parse_choice(s)
    }
}

impl Preset {
    /// The `--targets` name.
    pub fn name(self) -> String {
        crate::util::choice_name(&self)
    }
}

/// Whether a U-Net layer at `path` is targeted by `preset`.
pub fn unet_selects(preset: Preset, path: &str, layer: &LayerMut<'_>) -> bool {
    let in_transformer = path.contains(".attentions.");
    let is_attn = ATTN.iter().any(|s| path.ends_with(&format!(".{s}"))) && path.contains(".attn");
    let one_by_one = match layer {
        LayerMut::Linear(_) => true,
        LayerMut::Conv(c) => c.kernel_size() == 1,
    };
    match preset {
        Preset::Attn => is_attn,
        Preset::CrossKv => path.ends_with(".attn2.to_k") || path.ends_with(".attn2.to_v"),
        Preset::AttnMlp => in_transformer && one_by_one,
        Preset::Full => {
            (in_transformer && one_by_one)
                || path.contains(".resnets.")
                || path.contains(".downsamplers.")
                || path.contains(".upsamplers.")
        }
    }
}

/// Text-encoder LoRA: attention projections and the MLP, as kohya does.
pub fn text_encoder_selects(path: &str) -> bool {
    ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"].iter().any(|s| path.ends_with(s))
}
