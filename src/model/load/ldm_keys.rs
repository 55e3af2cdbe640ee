//! Key names of single-file (LDM / SGM) Stable Diffusion checkpoints ↔ diffusers / transformers key
//! names, for the U-Net, the VAE and the text encoders. Pure string work: shapes and tensors are the
//! caller's.
//!
//! The block structure (layers per block, which up blocks have attentions, how many VAE blocks) is
//! read from the key names themselves, never from a config, so tiny test models convert like real
//! ones. The renames follow diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
//! `convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` (loaders/single_file_utils.py).
//! The U-Net part works on paths relative to `model.diffusion_model.`, which are also the module
//! paths of the SGM U-Net that kohya's SDXL LoRA names are built from (see `lora::names`).
use std::collections::{HashMap, HashSet};

/// The model family, `crate::model::load::Family` (re-exported so this module reads on its own).
pub use super::Family;

/// Where a diffusers tensor comes from in the single file (and, read backwards, where it goes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The same tensor under another name.
    Same(String),
    /// 1x1 conv `[C, C, 1, 1]` in the single file, linear `[C, C]` in diffusers (VAE attention
    /// q/k/v/proj_out weights). Writing back: unsqueeze to `[C, C, 1, 1]`.
    Reshape(String),
    /// Rows `[index*n/of .. (index+1)*n/of]` of an OpenCLIP `in_proj_weight` / `in_proj_bias`
    /// (q, k, v in that order). Writing back: concatenate the `of` diffusers tensors that name the
    /// same `key` along dim 0 in `index` order.
    Chunk { key: String, index: usize, of: usize },
    /// OpenCLIP `text_projection` is stored `[in, out]`; diffusers' `text_projection.weight` is the
    /// transposed `[out, in]`. Writing back: transpose again.
    Transpose(String),
}

impl Source {
    /// The single-file key this source reads from.
    pub fn ldm_key(&self) -> &str {
        match self {
            Source::Same(k) | Source::Reshape(k) | Source::Transpose(k) | Source::Chunk { key: k, .. } => k,
        }
    }
}

/// Every tensor of a single file: `tensors` are `(component, diffusers key, source)` with component
/// one of `unet`, `vae`, `text_encoder`, `text_encoder_2`; `ignored` are the keys diffusers drops
/// (EMA copies, noise-schedule buffers, `position_ids`, `logit_scale`, SD2's unused last layer...).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub tensors: Vec<(String, String, Source)>,
    pub ignored: Vec<String>,
}

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
const SD1_CLIP: &str = "cond_stage_model.transformer.";
const SD2_OPENCLIP: &str = "cond_stage_model.model.";
const XL_CLIP: &str = "conditioner.embedders.0.transformer.";
const XL_OPENCLIP: &str = "conditioner.embedders.1.model.";
const XL_REFINER_OPENCLIP: &str = "conditioner.embedders.0.model.";
const TE_PREFIXES: [&str; 5] = [SD1_CLIP, SD2_OPENCLIP, XL_CLIP, XL_OPENCLIP, XL_REFINER_OPENCLIP];

/// Detects the family from the key set of a single file. SDXL: an OpenCLIP bigG at
/// `conditioner.embedders.1.model.` or an SDXL `label_emb`; SD2: OpenCLIP at `cond_stage_model.model.`;
/// SD1: CLIP at `cond_stage_model.transformer.`. A U-Net-only SD file gives `Sd1` (telling v1 from v2
/// needs shapes; the keys and LoRA names of both are the same). The SDXL refiner and anything else
/// give `None`.
pub fn detect_family(keys: &[&str]) -> Option<Family> {
    let any = |p: &str| keys.iter().any(|k| k.starts_with(p));
    if any(XL_REFINER_OPENCLIP) {
        None
    } else if any(XL_OPENCLIP) || any("model.diffusion_model.label_emb.0.0.") {
        Some(Family::Sdxl)
    } else if any(SD2_OPENCLIP) {
        Some(Family::Sd2)
    } else if any(SD1_CLIP) || any("model.diffusion_model.input_blocks.") {
        Some(Family::Sd1)
    } else {
        None
    }
}

/// Renames of what follows a matched prefix: `(ldm, diffusers)` pairs, each matching a whole
/// dotted prefix of the rest.
type Table = &'static [(&'static str, &'static str)];
const VERBATIM: Table = &[];
const RESNET: Table = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];
const VAE_RESNET: Table = &[
    ("norm1", "norm1"),
    ("conv1", "conv1"),
    ("norm2", "norm2"),
    ("conv2", "conv2"),
    ("nin_shortcut", "conv_shortcut"),
];
const VAE_ATTN: Table =
    &[("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")];
const CLIP_TOP: Table = &[
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("ln_final", "text_model.final_layer_norm"),
];
const CLIP_LAYER: Table = &[
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("attn.out_proj", "self_attn.out_proj"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
];

/// What follows `name` in `key` ("" or ".…") when `key` is `name` or lies under it.
fn under<'a>(key: &'a str, name: &str) -> Option<&'a str> {
    let tail = key.strip_prefix(name)?;
    (tail.is_empty() || tail.starts_with('.')).then_some(tail)
}

/// Renames the leading part of `rest` by `table` (ldm → diffusers, or back when `rev`).
fn swap(rest: &str, table: Table, rev: bool) -> Option<String> {
    table.iter().find_map(|&(l, d)| {
        let (from, to) = if rev { (d, l) } else { (l, d) };
        under(rest, from).map(|tail| format!("{to}{tail}"))
    })
}

/// The first dotted segment of `key`, parsed as an index, and what follows it (without the dot).
fn index(key: &str) -> Option<(usize, &str)> {
    let (n, rest) = key.split_once('.').unwrap_or((key, ""));
    Some((n.parse().ok()?, rest))
}

/// Largest `i` + 1 over keys `{prefix}{i}...`.
fn count_after(keys: &[&str], prefix: &str) -> usize {
    keys.iter().filter_map(|k| index(k.strip_prefix(prefix)?)).map(|(i, _)| i + 1).max().unwrap_or(0)
}

/// A two-way map between LDM and diffusers key prefixes of one network.
#[derive(Debug, Default)]
pub struct KeyMap {
    to_diffusers: HashMap<String, (String, Table)>,
    to_ldm: HashMap<String, (String, Table)>,
}

impl KeyMap {
    fn add(&mut self, ldm: impl Into<String>, diffusers: impl Into<String>, table: Table) {
        let (l, d) = (ldm.into(), diffusers.into());
        self.to_diffusers.insert(l.clone(), (d.clone(), table));
        self.to_ldm.insert(d, (l, table));
    }

    fn lookup(map: &HashMap<String, (String, Table)>, key: &str, rev: bool) -> Option<String> {
        let mut end = key.len();
        loop {
            if let Some((to, table)) = map.get(&key[..end]) {
                return match &key[end..] {
                    "" => Some(to.clone()),
                    rest if table.is_empty() => Some(format!("{to}{rest}")),
                    rest => Some(format!("{to}.{}", swap(&rest[1..], table, rev)?)),
                };
            }
            end = key[..end].rfind('.')?;
        }
    }

    /// LDM key or module path (without the network's prefix) → diffusers.
    pub fn to_diffusers(&self, key: &str) -> Option<String> {
        Self::lookup(&self.to_diffusers, key, false)
    }

    /// Diffusers key or module path → LDM (without the network's prefix).
    pub fn to_ldm(&self, key: &str) -> Option<String> {
        Self::lookup(&self.to_ldm, key, true)
    }
}

/// The U-Net block structure that the index arithmetic needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// One entry per up block (diffusers order): whether it has attentions. Its length is the
    /// number of blocks. Decides whether the SGM upsampler is `output_blocks.i.1` or `.2`.
    pub up_attn: Vec<bool>,
}

impl UnetLayout {
    /// From SGM U-Net keys, with or without `model.diffusion_model.`.
    pub fn from_sgm_keys(keys: &[&str]) -> Result<Self, String> {
        let keys: Vec<&str> = keys.iter().map(|k| k.strip_prefix(UNET_PREFIX).unwrap_or(k)).collect();
        let n_in = count_after(&keys, "input_blocks.");
        let n_out = count_after(&keys, "output_blocks.");
        let mut ops: Vec<usize> = keys
            .iter()
            .filter_map(|k| index(k.strip_prefix("input_blocks.")?))
            .filter(|(_, r)| under(r, "0.op").is_some())
            .map(|(i, _)| i)
            .collect();
        ops.sort_unstable();
        ops.dedup();
        let n = ops.len() + 1;
        let bad = || {
            format!("unexpected U-Net block structure: {n_in} input blocks, {n_out} output blocks, downsamplers at {ops:?}")
        };
        let resnets = n_in.saturating_sub(1 + ops.len());
        if n_in < 2 || ops.len() >= n_in || !resnets.is_multiple_of(n) {
            return Err(bad());
        }
        let l = resnets / n;
        if l == 0 || n_out != n * (l + 1) || ops.iter().enumerate().any(|(b, &i)| i != 1 + b * (l + 1) + l) {
            return Err(bad());
        }
        let attn: HashSet<usize> = keys
            .iter()
            .filter_map(|k| index(k.strip_prefix("output_blocks.")?))
            .filter(|(_, r)| under(r, "1").is_some() && under(r, "1.conv").is_none())
            .map(|(i, _)| i)
            .collect();
        let up_attn = (0..n).map(|b| (b * (l + 1)..(b + 1) * (l + 1)).any(|i| attn.contains(&i))).collect();
        Ok(UnetLayout { layers_per_block: l, up_attn })
    }

    /// From diffusers U-Net keys or module paths.
    pub fn from_diffusers_keys(keys: &[&str]) -> Result<Self, String> {
        let resnets = keys.iter().filter_map(|k| index(k.strip_prefix("down_blocks.0.resnets.")?));
        let l = resnets.map(|(j, _)| j + 1).max().unwrap_or(0);
        let n = count_after(keys, "up_blocks.");
        if l == 0 || n == 0 {
            return Err("no down_blocks.0.resnets / up_blocks keys: not a diffusers U-Net".into());
        }
        let up_attn = (0..n)
            .map(|b| keys.iter().any(|k| k.starts_with(&format!("up_blocks.{b}.attentions."))))
            .collect();
        Ok(UnetLayout { layers_per_block: l, up_attn })
    }

    /// From a diffusers U-Net config: `layers_per_block` and `up_block_types`.
    pub fn from_block_types<S: AsRef<str>>(layers_per_block: usize, up_block_types: &[S]) -> Self {
        let up_attn = up_block_types.iter().map(|t| t.as_ref().contains("CrossAttn")).collect();
        UnetLayout { layers_per_block, up_attn }
    }

    /// SD1/SD2 (four blocks, the first up block without attention) and SDXL (three blocks, the
    /// last up block without attention); both with two layers per block.
    pub fn standard(family: Family) -> Self {
        let up_attn = match family {
            Family::Sdxl => vec![true, true, false],
            _ => vec![false, true, true, true],
        };
        UnetLayout { layers_per_block: 2, up_attn }
    }

    /// The SGM ↔ diffusers prefix map (SGM side without `model.diffusion_model.`).
    pub fn key_map(&self) -> KeyMap {
        let (l, n) = (self.layers_per_block, self.up_attn.len());
        let mut m = KeyMap::default();
        m.add("time_embed.0", "time_embedding.linear_1", VERBATIM);
        m.add("time_embed.2", "time_embedding.linear_2", VERBATIM);
        m.add("label_emb.0.0", "add_embedding.linear_1", VERBATIM);
        m.add("label_emb.0.2", "add_embedding.linear_2", VERBATIM);
        m.add("input_blocks.0.0", "conv_in", VERBATIM);
        m.add("out.0", "conv_norm_out", VERBATIM);
        m.add("out.2", "conv_out", VERBATIM);
        m.add("middle_block.0", "mid_block.resnets.0", RESNET);
        m.add("middle_block.1", "mid_block.attentions.0", VERBATIM);
        m.add("middle_block.2", "mid_block.resnets.1", RESNET);
        for b in 0..n {
            for j in 0..l {
                let i = 1 + b * (l + 1) + j;
                m.add(format!("input_blocks.{i}.0"), format!("down_blocks.{b}.resnets.{j}"), RESNET);
                m.add(format!("input_blocks.{i}.1"), format!("down_blocks.{b}.attentions.{j}"), VERBATIM);
            }
            for j in 0..=l {
                let i = b * (l + 1) + j;
                m.add(format!("output_blocks.{i}.0"), format!("up_blocks.{b}.resnets.{j}"), RESNET);
                m.add(format!("output_blocks.{i}.1"), format!("up_blocks.{b}.attentions.{j}"), VERBATIM);
            }
            if b + 1 < n {
                let down = format!("input_blocks.{}.0.op", 1 + b * (l + 1) + l);
                m.add(down, format!("down_blocks.{b}.downsamplers.0.conv"), VERBATIM);
                let up =
                    format!("output_blocks.{}.{}.conv", b * (l + 1) + l, if self.up_attn[b] { 2 } else { 1 });
                m.add(up, format!("up_blocks.{b}.upsamplers.0.conv"), VERBATIM);
            }
        }
        m
    }
}

/// The VAE block structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeLayout {
    /// Number of encoder down / decoder up blocks.
    pub blocks: usize,
    /// Resnets per decoder up block (encoder blocks have one fewer).
    pub layers: usize,
}

impl VaeLayout {
    /// From LDM VAE keys, with or without `first_stage_model.`.
    pub fn from_ldm_keys(keys: &[&str]) -> Result<Self, String> {
        let keys: Vec<&str> = keys.iter().map(|k| k.strip_prefix(VAE_PREFIX).unwrap_or(k)).collect();
        let blocks = count_after(&keys, "decoder.up.").max(count_after(&keys, "encoder.down."));
        let layers = (0..blocks)
            .flat_map(|i| [format!("encoder.down.{i}.block."), format!("decoder.up.{i}.block.")])
            .map(|p| count_after(&keys, &p))
            .max()
            .unwrap_or(0);
        if blocks == 0 || layers == 0 {
            return Err("no encoder.down / decoder.up blocks: not an LDM VAE".into());
        }
        Ok(VaeLayout { blocks, layers })
    }

    /// From diffusers VAE keys.
    pub fn from_diffusers_keys(keys: &[&str]) -> Result<Self, String> {
        let blocks = count_after(keys, "decoder.up_blocks.").max(count_after(keys, "encoder.down_blocks."));
        let layers = (0..blocks)
            .flat_map(|i| {
                [format!("encoder.down_blocks.{i}.resnets."), format!("decoder.up_blocks.{i}.resnets.")]
            })
            .map(|p| count_after(keys, &p))
            .max()
            .unwrap_or(0);
        if blocks == 0 || layers == 0 {
            return Err("no encoder.down_blocks / decoder.up_blocks keys: not a diffusers VAE".into());
        }
        Ok(VaeLayout { blocks, layers })
    }

    /// The LDM ↔ diffusers prefix map (LDM side without `first_stage_model.`). Decoder up blocks
    /// are numbered in reverse: `decoder.up.{n-1-i}` is `decoder.up_blocks.{i}`.
    pub fn key_map(&self) -> KeyMap {
        let n = self.blocks;
        let mut m = KeyMap::default();
        for k in ["quant_conv", "post_quant_conv"] {
            m.add(k, k, VERBATIM);
        }
        for s in ["encoder", "decoder"] {
            m.add(format!("{s}.conv_in"), format!("{s}.conv_in"), VERBATIM);
            m.add(format!("{s}.conv_out"), format!("{s}.conv_out"), VERBATIM);
            m.add(format!("{s}.norm_out"), format!("{s}.conv_norm_out"), VERBATIM);
            m.add(format!("{s}.mid.block_1"), format!("{s}.mid_block.resnets.0"), VAE_RESNET);
            m.add(format!("{s}.mid.block_2"), format!("{s}.mid_block.resnets.1"), VAE_RESNET);
            m.add(format!("{s}.mid.attn_1"), format!("{s}.mid_block.attentions.0"), VAE_ATTN);
        }
        for i in 0..n {
            let u = n - 1 - i;
            for j in 0..self.layers {
                m.add(
                    format!("encoder.down.{i}.block.{j}"),
                    format!("encoder.down_blocks.{i}.resnets.{j}"),
                    VAE_RESNET,
                );
                m.add(
                    format!("decoder.up.{u}.block.{j}"),
                    format!("decoder.up_blocks.{i}.resnets.{j}"),
                    VAE_RESNET,
                );
            }
            m.add(
                format!("encoder.down.{i}.downsample.conv"),
                format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                VERBATIM,
            );
            m.add(
                format!("decoder.up.{u}.upsample.conv"),
                format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                VERBATIM,
            );
        }
        m
    }
}

/// Both layouts, for [`to_ldm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub unet: UnetLayout,
    pub vae: VaeLayout,
}

/// VAE attention q/k/v/out weights are 1x1 convs in LDM, linears in diffusers.
fn vae_source(diffusers_key: &str, ldm_key: String) -> Source {
    let attn = diffusers_key.contains(".mid_block.attentions.") && !diffusers_key.contains(".group_norm.");
    if attn && diffusers_key.ends_with(".weight") {
        Source::Reshape(ldm_key)
    } else {
        Source::Same(ldm_key)
    }
}

#[derive(Debug, Clone, Copy)]
enum TeKind {
    /// transformers CLIPTextModel keys (`text_model.…`) under a prefix.
    Clip,
    /// OpenCLIP keys; `projection`: keep `text_projection` (CLIPTextModelWithProjection).
    OpenClip { projection: bool },
}

fn text_encoders(family: Family) -> &'static [(&'static str, &'static str, TeKind)] {
    match family {
        Family::Sd1 => &[("text_encoder", SD1_CLIP, TeKind::Clip)],
        Family::Sd2 => &[("text_encoder", SD2_OPENCLIP, TeKind::OpenClip { projection: false })],
        Family::Sdxl => &[
            ("text_encoder", XL_CLIP, TeKind::Clip),
            ("text_encoder_2", XL_OPENCLIP, TeKind::OpenClip { projection: true }),
        ],
    }
}

/// `Some(vec![])`: a key diffusers drops; `None`: not a key of this encoder.
type TeMapped = Option<Vec<(String, Source)>>;

fn clip_from(prefix: &str, rest: &str) -> TeMapped {
    let src = Source::Same(format!("{prefix}{rest}"));
    if rest.ends_with("position_ids") {
        Some(vec![])
    } else if rest.starts_with("text_model.") {
        Some(vec![(rest.to_string(), src)])
    } else if ["embeddings.", "encoder.", "final_layer_norm."].iter().any(|p| rest.starts_with(p)) {
        // transformers < 4.x saved CLIPTextModel without the `text_model.` level.
        Some(vec![(format!("text_model.{rest}"), src)])
    } else {
        None
    }
}

fn openclip_from(prefix: &str, rest: &str, projection: bool, drop_layer: Option<usize>) -> TeMapped {
    let full = format!("{prefix}{rest}");
    match rest {
        "logit_scale" | "attn_mask" => return Some(vec![]),
        "text_projection" if projection => {
            return Some(vec![("text_projection.weight".into(), Source::Transpose(full))]);
        }
        // Some SDXL merges (Playground v2) store it as an nn.Linear weight already.
        "text_projection.weight" if projection => {
            return Some(vec![("text_projection.weight".into(), Source::Same(full))]);
        }
        "text_projection" | "text_projection.weight" => return Some(vec![]),
        _ if rest.ends_with("position_ids") || rest.starts_with("visual.") => return Some(vec![]),
        _ => {}
    }
    if let Some(d) = swap(rest, CLIP_TOP, false) {
        return Some(vec![(d, Source::Same(full))]);
    }
    let (n, tail) = index(rest.strip_prefix("transformer.resblocks.")?)?;
    if Some(n) == drop_layer {
        return Some(vec![]);
    }
    let layer = format!("text_model.encoder.layers.{n}");
    if let Some(kind @ ("weight" | "bias")) = tail.strip_prefix("attn.in_proj_") {
        let chunk = |(index, x): (usize, &str)| {
            let src = Source::Chunk { key: full.clone(), index, of: 3 };
            (format!("{layer}.self_attn.{x}_proj.{kind}"), src)
        };
        return Some(["q", "k", "v"].into_iter().enumerate().map(chunk).collect());
    }
    Some(vec![(format!("{layer}.{}", swap(tail, CLIP_LAYER, false)?), Source::Same(full))])
}

fn openclip_to(prefix: &str, key: &str, projection: bool) -> Option<Source> {
    if key == "text_projection.weight" {
        return projection.then(|| Source::Transpose(format!("{prefix}text_projection")));
    }
    if let Some(l) = swap(key, CLIP_TOP, true) {
        return Some(Source::Same(format!("{prefix}{l}")));
    }
    let (n, tail) = index(key.strip_prefix("text_model.encoder.layers.")?)?;
    let block = format!("{prefix}transformer.resblocks.{n}");
    for (index, x) in ["q", "k", "v"].into_iter().enumerate() {
        if let Some(kind @ ("weight" | "bias")) = tail.strip_prefix(&format!("self_attn.{x}_proj.")) {
            return Some(Source::Chunk { key: format!("{block}.attn.in_proj_{kind}"), index, of: 3 });
        }
    }
    Some(Source::Same(format!("{block}.{}", swap(tail, CLIP_LAYER, true)?)))
}

/// Maps every key of a single file of `family`. Errors on keys under a network's prefix that do not
/// fit its structure, on text-encoder keys of another family, and on two keys mapping to one.
pub fn plan(family: Family, keys: &[&str]) -> Result<Plan, String> {
    let unet_keys: Vec<&str> = keys.iter().filter_map(|k| k.strip_prefix(UNET_PREFIX)).collect();
    let vae_keys: Vec<&str> =
        keys.iter().filter_map(|k| k.strip_prefix(VAE_PREFIX)).filter(|k| !k.starts_with("loss.")).collect();
    let unet =
        if unet_keys.is_empty() { None } else { Some(UnetLayout::from_sgm_keys(&unet_keys)?.key_map()) };
    let vae = if vae_keys.is_empty() { None } else { Some(VaeLayout::from_ldm_keys(&vae_keys)?.key_map()) };
    // diffusers' SD2 text encoder has 23 layers: OpenCLIP-H's last resblock (23) is unused
    // (SD2 conditions on the penultimate layer), and so is its text_projection.
    let resblocks = format!("{SD2_OPENCLIP}transformer.resblocks.");
    let drop_layer =
        (family == Family::Sd2).then(|| count_after(keys, &resblocks)).filter(|&n| n == 24).map(|_| 23);
    let mut plan = Plan::default();
    let mut seen = HashSet::new();
    for &key in keys {
        let bad = || format!("unrecognised key `{key}` in a {family:?} checkpoint");
        let out: Vec<(&str, String, Source)> =
            if key.starts_with("model_ema.") || key.ends_with(".position_ids") {
                vec![]
            } else if let Some(r) = key.strip_prefix(UNET_PREFIX) {
                let d = unet.as_ref().and_then(|m| m.to_diffusers(r)).ok_or_else(bad)?;
                vec![("unet", d, Source::Same(key.into()))]
            } else if let Some(r) = key.strip_prefix(VAE_PREFIX) {
                match vae.as_ref().filter(|_| !r.starts_with("loss.")) {
                    None => vec![],
                    Some(m) => {
                        let d = m.to_diffusers(r).ok_or_else(bad)?;
                        let s = vae_source(&d, key.into());
                        vec![("vae", d, s)]
                    }
                }
            } else if let Some(&(c, p, kind)) = text_encoders(family).iter().find(|t| key.starts_with(t.1)) {
                let rest = &key[p.len()..];
                let mapped = match kind {
                    TeKind::Clip => clip_from(p, rest),
                    TeKind::OpenClip { projection } => openclip_from(p, rest, projection, drop_layer),
                };
                mapped.ok_or_else(bad)?.into_iter().map(|(d, s)| (c, d, s)).collect()
            } else if TE_PREFIXES.iter().any(|p| key.starts_with(p)) {
                return Err(format!("key `{key}` is a text encoder of another family than {family:?}"));
            } else {
                vec![]
            };
        if out.is_empty() {
            plan.ignored.push(key.to_string());
        }
        for (c, d, s) in out {
            if !seen.insert((c, d.clone())) {
                return Err(format!("two keys map to {c} `{d}` (the second is `{key}`)"));
            }
            plan.tensors.push((c.to_string(), d, s));
        }
    }
    Ok(plan)
}

fn ldm_source(family: Family, component: &str, key: &str, map: Option<&KeyMap>) -> Option<Source> {
    match component {
        "unet" => Some(Source::Same(format!("{UNET_PREFIX}{}", map?.to_ldm(key)?))),
        "vae" => Some(vae_source(key, format!("{VAE_PREFIX}{}", map?.to_ldm(key)?))),
        c => {
            let &(_, prefix, kind) = text_encoders(family).iter().find(|t| t.0 == c)?;
            // transformers >= 5 saves CLIPTextModel without the `text_model.` level.
            let flat = ["embeddings.", "encoder.", "final_layer_norm."].iter().any(|p| key.starts_with(p));
            let key = if flat { format!("text_model.{key}") } else { key.to_string() };
            match kind {
                TeKind::Clip => {
                    key.starts_with("text_model.").then(|| Source::Same(format!("{prefix}{key}")))
                }
                TeKind::OpenClip { projection } => openclip_to(prefix, &key, projection),
            }
        }
    }
}

/// The inverse of [`plan`] for one diffusers key: where it goes in a single file of `family`,
/// and how (apply the [`Source`] transform backwards; merge `Chunk`s as its doc says). `None` for
/// keys a single file has no place for.
pub fn to_ldm(family: Family, component: &str, diffusers_key: &str, layout: &Layout) -> Option<Source> {
    let map = match component {
        "unet" => Some(layout.unet.key_map()),
        "vae" => Some(layout.vae.key_map()),
        _ => None,
    };
    ldm_source(family, component, diffusers_key, map.as_ref())
}

/// [`to_ldm`] for all keys of one diffusers component, the layout read from those keys. SD2 files
/// written this way lack OpenCLIP's unused last layer and `text_projection` (kohya writes copies of
/// layer 22, a ones `text_projection` and `logit_scale` = 1 for tools that insist on them).
pub fn plan_to_ldm(family: Family, component: &str, keys: &[&str]) -> Result<Vec<(String, Source)>, String> {
    let map = match component {
        "unet" => Some(UnetLayout::from_diffusers_keys(keys)?.key_map()),
        "vae" => Some(VaeLayout::from_diffusers_keys(keys)?.key_map()),
        _ => None,
    };
    keys.iter()
        .map(|&k| {
            let s = ldm_source(family, component, k, map.as_ref());
            s.map(|s| (k.to_string(), s)).ok_or_else(|| format!("no single-file key for {component} `{k}`"))
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests;
