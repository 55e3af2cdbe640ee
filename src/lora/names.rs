//! LoRA module names as kohya-ss sd-scripts writes them (`lora_unet_…`, `lora_te_…`, `lora_te1_…`,
//! `lora_te2_…`) ↔ diffusers module paths (component-relative, e.g. `down_blocks.1.attentions.0.proj_in`).
//!
//! SD1/SD2: kohya trains on a diffusers-layout U-Net, so the name is the diffusers path with '.' → '_'.
//! SDXL: kohya trains on its own SGM-layout U-Net (library/sdxl_original_unet.py), so the name is the
//! SGM module path (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`, `input_blocks.1.0.in_layers.2`,
//! `input_blocks.3.0.op`, `output_blocks.2.2.conv`) with '.' → '_'; diffusers reads these back through
//! `_maybe_map_sgm_blocks_to_diffusers` + `_convert_unet_lora_key`. Text encoders are transformers CLIP
//! models in every family: `text_model.encoder.layers.0.self_attn.q_proj` → `…_text_model_encoder_…`.
//!
//! '_' → '.' is ambiguous (`to_q`, `transformer_blocks`), so reading a name back matches it against
//! the names of all candidate modules rather than parsing it.
use crate::model::load::ldm_keys::{Family, KeyMap, UnetLayout};
use std::collections::HashMap;

/// Names for one model: the family and the U-Net's SGM ↔ diffusers map, built once.
pub struct KohyaNames {
    family: Family,
    unet: KeyMap,
}

fn flat(prefix: &str, path: &str) -> String {
    format!("{prefix}{}", path.replace('.', "_"))
}

impl KohyaNames {
    pub fn new(family: Family, layout: &UnetLayout) -> Self {
        KohyaNames { family, unet: layout.key_map() }
    }

    /// Every name readers accept for this module, the one kohya writes first. SDXL U-Net modules are
    /// also accepted in diffusers spelling (`lora_unet_down_blocks_…`, as written by diffusers'
    /// `convert_state_dict_to_kohya` and read by kohya, A1111 and ComfyUI), SD1/SD2 ones also in SGM
    /// spelling; `lora_te_` and `lora_te1_` both name the first text encoder.
    pub fn names(&self, component: &str, path: &str) -> Vec<String> {
        match component {
            "unet" => {
                let sgm = self.unet.to_ldm(path).map(|s| flat("lora_unet_", &s));
                let diffusers = flat("lora_unet_", path);
                match (self.family, sgm) {
                    (Family::Sdxl, Some(s)) => vec![s, diffusers],
                    (Family::Sdxl, None) => vec![],
                    (_, s) => std::iter::once(diffusers).chain(s).collect(),
                }
            }
            "text_encoder" | "text_encoder_2" => {
                // transformers >= 5 CLIPTextModel has no `text_model.` level; kohya's names do.
                let bare =
                    ["embeddings.", "encoder.", "final_layer_norm."].iter().any(|p| path.starts_with(p));
                let path = if bare { format!("text_model.{path}") } else { path.to_string() };
                let prefixes: &[&str] = match (component, self.family) {
                    ("text_encoder_2", Family::Sdxl) => &["lora_te2_"],
                    ("text_encoder_2", _) => &[],
                    (_, Family::Sdxl) => &["lora_te1_", "lora_te_"],
                    _ => &["lora_te_", "lora_te1_"],
                };
                prefixes.iter().map(|p| flat(p, &path)).collect()
            }
            _ => vec![],
        }
    }

    /// The name kohya writes; `None` for an unknown component or a U-Net path with no SGM
    /// counterpart (SDXL).
    pub fn name(&self, component: &str, path: &str) -> Option<String> {
        self.names(component, path).into_iter().next()
    }

    /// Every accepted name of every candidate `(component, path)` → that candidate. Where a name
    /// is ambiguous the name a module is written under wins over an alias of another.
    pub fn index(&self, candidates: &[(String, String)]) -> HashMap<String, (String, String)> {
        let mut out = HashMap::new();
        let all: Vec<_> = candidates.iter().map(|(c, p)| (c, p, self.names(c, p))).collect();
        for rank in (0..2).rev() {
            for (c, p, names) in &all {
                if let Some(n) = names.get(rank) {
                    out.insert(n.clone(), ((*c).clone(), (*p).clone()));
                }
            }
        }
        out
    }

    /// The candidate a kohya module name (the part before the first '.') refers to.
    pub fn resolve(&self, kohya: &str, candidates: &[(String, String)]) -> Option<(String, String)> {
        let hits = |rank: usize| {
            candidates.iter().find(|(c, p)| self.names(c, p).get(rank).is_some_and(|n| n == kohya)).cloned()
        };
        hits(0).or_else(|| hits(1))
    }
}

/// kohya's LoRA module name for a diffusers module path of `component` (`unet`, `text_encoder`,
/// `text_encoder_2`). For many names at once build a [`KohyaNames`] once instead.
pub fn kohya_name(
    family: Family,
    component: &str,
    diffusers_path: &str,
    layout: &UnetLayout,
) -> Option<String> {
    KohyaNames::new(family, layout).name(component, diffusers_path)
}

/// Inverse of [`kohya_name`] (accepting the aliases of [`KohyaNames::names`]): the `(component, path)`
/// among `candidates` (all adaptable modules of the model) that `kohya` names.
pub fn from_kohya(
    family: Family,
    kohya: &str,
    candidates: &[(String, String)],
    layout: &UnetLayout,
) -> Option<(String, String)> {
    KohyaNames::new(family, layout).resolve(kohya, candidates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::load::ldm_keys::tests::arch::{sd15, sdxl, unet_keys, Arch};
    use std::collections::HashSet;

    /// Every Linear / Conv2d module path of a U-Net (the weights that are not norms).
    fn unet_modules(arch: &Arch) -> Vec<(String, String)> {
        let keys = unet_keys(arch);
        let modules = keys.iter().filter_map(|k| k.strip_suffix(".weight")).filter(|p| !p.contains("norm"));
        modules.map(|p| ("unet".to_string(), p.to_string())).collect()
    }

    fn te_modules(component: &str, layers: usize) -> Vec<(String, String)> {
        let mut v = vec![];
        for n in 0..layers {
            for m in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
            ] {
                v.push((component.to_string(), format!("text_model.encoder.layers.{n}.{m}")));
            }
        }
        v
    }

    fn layout(arch: &Arch) -> UnetLayout {
        let keys = unet_keys(arch);
        UnetLayout::from_diffusers_keys(&keys.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn sd15_names() {
        let l = layout(&sd15());
        let n = |c: &str, p: &str| kohya_name(Family::Sd1, c, p, &l).unwrap();
        let q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
        assert_eq!(n("unet", q), "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q");
        assert_eq!(n("unet", "up_blocks.0.upsamplers.0.conv"), "lora_unet_up_blocks_0_upsamplers_0_conv");
        let te = "text_model.encoder.layers.0.self_attn.q_proj";
        assert_eq!(n("text_encoder", te), "lora_te_text_model_encoder_layers_0_self_attn_q_proj");
        assert_eq!(n("text_encoder", "encoder.layers.0.self_attn.q_proj"), n("text_encoder", te));
        assert_eq!(kohya_name(Family::Sd2, "text_encoder_2", te, &l), None);
        assert_eq!(kohya_name(Family::Sd2, "vae", "decoder.conv_in", &l), None);
    }

    #[test]
    fn sdxl_names() {
        let l = UnetLayout::standard(Family::Sdxl);
        let n = |c: &str, p: &str| kohya_name(Family::Sdxl, c, p, &l).unwrap();
        let cases = [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            ),
            (
                "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
                "input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
            ),
            ("down_blocks.1.attentions.1.proj_in", "input_blocks_5_1_proj_in"),
            (
                "mid_block.attentions.0.transformer_blocks.3.ff.net.0.proj",
                "middle_block_1_transformer_blocks_3_ff_net_0_proj",
            ),
            ("up_blocks.0.attentions.2.proj_out", "output_blocks_2_1_proj_out"),
            (
                "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.2",
                "output_blocks_3_1_transformer_blocks_1_ff_net_2",
            ),
            ("down_blocks.0.resnets.0.conv1", "input_blocks_1_0_in_layers_2"),
            ("down_blocks.0.resnets.1.time_emb_proj", "input_blocks_2_0_emb_layers_1"),
            ("down_blocks.1.resnets.0.conv2", "input_blocks_4_0_out_layers_3"),
            ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks_4_0_skip_connection"),
            ("down_blocks.0.downsamplers.0.conv", "input_blocks_3_0_op"),
            ("down_blocks.1.downsamplers.0.conv", "input_blocks_6_0_op"),
            ("mid_block.resnets.1.conv2", "middle_block_2_out_layers_3"),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks_2_2_conv"),
            ("up_blocks.1.upsamplers.0.conv", "output_blocks_5_2_conv"),
            ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks_8_0_skip_connection"),
            ("time_embedding.linear_1", "time_embed_0"),
            ("add_embedding.linear_2", "label_emb_0_2"),
            ("conv_in", "input_blocks_0_0"),
            ("conv_out", "out_2"),
        ];
        for (path, name) in cases {
            assert_eq!(n("unet", path), format!("lora_unet_{name}"), "{path}");
        }
        let te = "text_model.encoder.layers.31.mlp.fc2";
        assert_eq!(n("text_encoder", te), "lora_te1_text_model_encoder_layers_31_mlp_fc2");
        assert_eq!(n("text_encoder_2", te), "lora_te2_text_model_encoder_layers_31_mlp_fc2");
        // Not a module of the SDXL U-Net: no name.
        assert_eq!(kohya_name(Family::Sdxl, "unet", "down_blocks.5.resnets.0.conv1", &l), None);
    }

    /// A tiny SDXL-like U-Net (one layer per block): the upsampler of its attention up block is `.2`.
    #[test]
    fn tiny_layouts() {
        let arch = Arch {
            channels: vec![32, 64],
            cross: vec![false, true],
            depth: vec![1, 1],
            layers_per_block: 1,
            add_embedding: true,
        };
        let l = layout(&arch);
        assert_eq!(l, UnetLayout { layers_per_block: 1, up_attn: vec![true, false] });
        let n = |p: &str| kohya_name(Family::Sdxl, "unet", p, &l).unwrap();
        assert_eq!(n("up_blocks.0.upsamplers.0.conv"), "lora_unet_output_blocks_1_2_conv");
        assert_eq!(n("down_blocks.0.downsamplers.0.conv"), "lora_unet_input_blocks_2_0_op");
        assert_eq!(n("down_blocks.1.attentions.0.proj_in"), "lora_unet_input_blocks_3_1_proj_in");
        assert_eq!(n("up_blocks.1.resnets.1.conv1"), "lora_unet_output_blocks_3_0_in_layers_2");
        let sd = UnetLayout { layers_per_block: 1, up_attn: vec![false, true] };
        let sgm = KohyaNames::new(Family::Sd1, &sd).names("unet", "up_blocks.0.upsamplers.0.conv");
        assert_eq!(sgm, ["lora_unet_up_blocks_0_upsamplers_0_conv", "lora_unet_output_blocks_1_1_conv"]);
    }

    /// Every module of the real U-Nets and text encoders: names are distinct, and every accepted
    /// name (canonical and alias) reads back to its module.
    #[test]
    fn round_trips() {
        for (family, arch, te2) in
            [(Family::Sd1, sd15(), 0), (Family::Sd2, sd15(), 0), (Family::Sdxl, sdxl(), 32)]
        {
            let l = layout(&arch);
            let mut candidates = unet_modules(&arch);
            candidates.extend(te_modules("text_encoder", if te2 > 0 { 12 } else { 23 }));
            candidates.extend(te_modules("text_encoder_2", te2));
            let names = KohyaNames::new(family, &l);
            let index = names.index(&candidates);
            let mut written = HashSet::new();
            for (i, (c, p)) in candidates.iter().enumerate() {
                let all = names.names(c, p);
                assert_eq!(all.len(), 2 - usize::from(c == "text_encoder_2"), "{c} {p}");
                assert!(written.insert(all[0].clone()), "duplicate name {}", all[0]);
                for name in &all {
                    assert_eq!(index.get(name), Some(&(c.clone(), p.clone())), "{name}");
                }
                if i % 37 == 0 {
                    let back = from_kohya(family, all.last().unwrap(), &candidates, &l);
                    assert_eq!(back.as_ref(), Some(&(c.clone(), p.clone())));
                }
            }
            let unet = candidates.iter().filter(|c| c.0 == "unet").count();
            assert_eq!(unet, if family == Family::Sdxl { 794 } else { 282 });
            assert_eq!(names.resolve("lora_unet_no_such_module", &candidates), None);
        }
    }
}
