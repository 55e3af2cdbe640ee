//! Tests of the single-file key maps, on key lists generated from the architectures.
use super::*;
use arch::*;

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// diffusers keys → single-file keys → `plan` → the same diffusers keys; returns the file keys.
fn round_trip(family: Family, component: &str, keys: &[String]) -> Vec<String> {
    let back = plan_to_ldm(family, component, &strs(keys)).unwrap();
    let ldm: Vec<String> = back.iter().map(|(_, s)| s.ldm_key().to_string()).collect();
    let plan = plan(family, &strs(&ldm)).unwrap();
    assert!(plan.ignored.is_empty(), "{:?}", plan.ignored);
    assert_eq!(plan.tensors.len(), keys.len());
    for ((c, d, s), (k, s2)) in plan.tensors.iter().zip(&back) {
        assert_eq!((c.as_str(), d, s), (component, k, s2));
    }
    ldm
}

fn tiny(cross: Vec<bool>, layers_per_block: usize, add_embedding: bool) -> Arch {
    Arch { channels: vec![32, 64], depth: vec![1; cross.len()], cross, layers_per_block, add_embedding }
}

#[test]
fn unet_key_counts() {
    assert_eq!(unet_keys(&sd15()).len(), 686);
    assert_eq!(unet_keys(&sdxl()).len(), 1680);
    assert_eq!(vae_keys(&[128, 256, 512, 512], 2).len(), 248);
}

#[test]
fn unet_round_trips() {
    let archs = [
        (Family::Sd1, sd15()),
        (Family::Sdxl, sdxl()),
        (Family::Sd1, tiny(vec![true, false], 1, false)),
        (Family::Sd1, tiny(vec![false, true], 2, false)),
        (Family::Sdxl, tiny(vec![false, true], 2, true)),
        (Family::Sdxl, tiny(vec![false, true], 1, true)),
    ];
    for (family, arch) in archs {
        let keys = unet_keys(&arch);
        let layout = UnetLayout::from_diffusers_keys(&strs(&keys)).unwrap();
        let ldm = round_trip(family, "unet", &keys);
        assert_eq!(UnetLayout::from_sgm_keys(&strs(&ldm)).unwrap(), layout);
        assert_eq!(ldm.iter().collect::<HashSet<_>>().len(), keys.len());
    }
    assert_eq!(
        UnetLayout::from_diffusers_keys(&strs(&unet_keys(&sd15()))).unwrap(),
        UnetLayout::standard(Family::Sd1)
    );
    assert_eq!(
        UnetLayout::from_diffusers_keys(&strs(&unet_keys(&sdxl()))).unwrap(),
        UnetLayout::standard(Family::Sdxl)
    );
    let types = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"];
    assert_eq!(UnetLayout::from_block_types(2, &types), UnetLayout::standard(Family::Sdxl));
}

#[test]
fn unet_known_names() {
    let sd = Layout { unet: UnetLayout::standard(Family::Sd1), vae: VaeLayout { blocks: 4, layers: 3 } };
    let xl = Layout { unet: UnetLayout::standard(Family::Sdxl), ..sd.clone() };
    let cases = [
        (
            &sd,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        ),
        (&sd, "up_blocks.3.resnets.2.conv1.weight", "output_blocks.11.0.in_layers.2.weight"),
        (&sd, "up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
        (&sd, "up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
        (&sd, "down_blocks.2.downsamplers.0.conv.weight", "input_blocks.9.0.op.weight"),
        (&sd, "down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
        (&sd, "down_blocks.3.resnets.1.time_emb_proj.bias", "input_blocks.11.0.emb_layers.1.bias"),
        (&sd, "mid_block.resnets.1.norm2.weight", "middle_block.2.out_layers.0.weight"),
        (&sd, "up_blocks.2.resnets.1.conv2.weight", "output_blocks.7.0.out_layers.3.weight"),
        (&sd, "conv_in.weight", "input_blocks.0.0.weight"),
        (&sd, "conv_norm_out.bias", "out.0.bias"),
        (&sd, "conv_out.weight", "out.2.weight"),
        (&sd, "time_embedding.linear_2.weight", "time_embed.2.weight"),
        (
            &xl,
            "mid_block.attentions.0.transformer_blocks.9.ff.net.2.weight",
            "middle_block.1.transformer_blocks.9.ff.net.2.weight",
        ),
        (&xl, "add_embedding.linear_1.weight", "label_emb.0.0.weight"),
        (&xl, "down_blocks.1.attentions.1.proj_in.weight", "input_blocks.5.1.proj_in.weight"),
        (&xl, "up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
        (&xl, "up_blocks.1.upsamplers.0.conv.weight", "output_blocks.5.2.conv.weight"),
        (&xl, "up_blocks.2.resnets.2.conv_shortcut.weight", "output_blocks.8.0.skip_connection.weight"),
    ];
    for (layout, d, l) in cases {
        let l = format!("{UNET_PREFIX}{l}");
        assert_eq!(to_ldm(Family::Sd1, "unet", d, layout), Some(Source::Same(l.clone())), "{d}");
        assert_eq!(layout.unet.key_map().to_diffusers(&l[UNET_PREFIX.len()..]).as_deref(), Some(d));
    }
    // Module paths (no .weight) map too; a resnet's unused Sequential slots do not.
    let m = UnetLayout::standard(Family::Sdxl).key_map();
    assert_eq!(m.to_diffusers("input_blocks.3.0.op").as_deref(), Some("down_blocks.0.downsamplers.0.conv"));
    assert_eq!(m.to_ldm("down_blocks.0.resnets.1").as_deref(), Some("input_blocks.2.0"));
    assert_eq!(m.to_diffusers("input_blocks.1.0.in_layers.1.weight"), None);
    assert_eq!(m.to_diffusers("input_blocks.12.0.in_layers.2.weight"), None);
}

#[test]
fn vae_round_trip_and_names() {
    let keys = vae_keys(&[128, 256, 512, 512], 2);
    let ldm = round_trip(Family::Sd1, "vae", &keys);
    assert_eq!(VaeLayout::from_ldm_keys(&strs(&ldm)).unwrap(), VaeLayout { blocks: 4, layers: 3 });
    for tiny in [vae_keys(&[32, 64], 1), vae_keys(&[8], 2)] {
        round_trip(Family::Sdxl, "vae", &tiny);
    }
    let layout = Layout { unet: UnetLayout::standard(Family::Sd1), vae: VaeLayout { blocks: 4, layers: 3 } };
    let v = |k: &str| to_ldm(Family::Sd1, "vae", k, &layout).unwrap();
    let same = |k: &str| Source::Same(format!("{VAE_PREFIX}{k}"));
    assert_eq!(v("decoder.up_blocks.0.resnets.0.conv1.weight"), same("decoder.up.3.block.0.conv1.weight"));
    assert_eq!(v("decoder.up_blocks.2.upsamplers.0.conv.bias"), same("decoder.up.1.upsample.conv.bias"));
    assert_eq!(
        v("encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
        same("encoder.down.1.block.0.nin_shortcut.weight")
    );
    assert_eq!(
        v("encoder.down_blocks.0.downsamplers.0.conv.weight"),
        same("encoder.down.0.downsample.conv.weight")
    );
    assert_eq!(v("decoder.mid_block.resnets.1.norm1.bias"), same("decoder.mid.block_2.norm1.bias"));
    assert_eq!(v("encoder.conv_norm_out.weight"), same("encoder.norm_out.weight"));
    assert_eq!(v("decoder.mid_block.attentions.0.group_norm.weight"), same("decoder.mid.attn_1.norm.weight"));
    assert_eq!(v("encoder.mid_block.attentions.0.to_q.bias"), same("encoder.mid.attn_1.q.bias"));
    let r = Source::Reshape(format!("{VAE_PREFIX}encoder.mid.attn_1.proj_out.weight"));
    assert_eq!(v("encoder.mid_block.attentions.0.to_out.0.weight"), r);
    assert_eq!(v("post_quant_conv.weight"), same("post_quant_conv.weight"));
}

fn openclip_keys(prefix: &str, layers: usize) -> Vec<String> {
    let mut v: Vec<String> =
        ["token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"]
            .into_iter()
            .chain(["text_projection", "logit_scale"])
            .map(|k| format!("{prefix}{k}"))
            .collect();
    for n in 0..layers {
        for m in ["ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"] {
            v.push(format!("{prefix}transformer.resblocks.{n}.{m}.weight"));
            v.push(format!("{prefix}transformer.resblocks.{n}.{m}.bias"));
        }
        v.push(format!("{prefix}transformer.resblocks.{n}.attn.in_proj_weight"));
        v.push(format!("{prefix}transformer.resblocks.{n}.attn.in_proj_bias"));
    }
    v
}

fn clip_l_keys(prefix: &str, layers: usize) -> Vec<String> {
    let mut v: Vec<String> = ["token_embedding", "position_embedding"]
        .map(|m| format!("{prefix}text_model.embeddings.{m}.weight"))
        .into_iter()
        .chain([format!("{prefix}text_model.embeddings.position_ids")])
        .collect();
    for n in 0..layers {
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
            .into_iter()
            .chain(["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"])
        {
            v.push(format!("{prefix}text_model.encoder.layers.{n}.{m}.weight"));
            v.push(format!("{prefix}text_model.encoder.layers.{n}.{m}.bias"));
        }
    }
    v.push(format!("{prefix}text_model.final_layer_norm.weight"));
    v
}

/// Checks that `to_ldm` inverts every entry of the plan and returns the entries of `component`.
fn check_inverse(family: Family, plan: &Plan, component: &str) -> Vec<(String, Source)> {
    let layout = Layout { unet: UnetLayout::standard(family), vae: VaeLayout { blocks: 4, layers: 3 } };
    let mine: Vec<(String, Source)> =
        plan.tensors.iter().filter(|t| t.0 == component).map(|t| (t.1.clone(), t.2.clone())).collect();
    for (d, s) in &mine {
        assert_eq!(to_ldm(family, component, d, &layout).as_ref(), Some(s), "{d}");
    }
    mine
}

#[test]
fn sd2_openclip() {
    let mut keys = openclip_keys(SD2_OPENCLIP, 24);
    let extra = [
        "alphas_cumprod",
        "model_ema.decay",
        "cond_stage_model.model.attn_mask",
        "cond_stage_model.model.visual.proj",
    ];
    keys.extend(extra.map(String::from));
    let p = plan(Family::Sd2, &strs(&keys)).unwrap();
    let te = check_inverse(Family::Sd2, &p, "text_encoder");
    assert_eq!(te.len(), 4 + 23 * 16);
    let ignored: HashSet<&str> = strs(&p.ignored).into_iter().collect();
    assert_eq!(ignored.len(), 4 + 2 + 12);
    assert!(ignored.contains("cond_stage_model.model.transformer.resblocks.23.mlp.c_fc.weight"));
    assert!(ignored.contains("cond_stage_model.model.text_projection"));
    let get = |d: &str| te.iter().find(|t| t.0 == d).map(|t| t.1.clone());
    let inp = "cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight".to_string();
    let k = get("text_model.encoder.layers.5.self_attn.k_proj.weight").unwrap();
    assert_eq!(k, Source::Chunk { key: inp, index: 1, of: 3 });
    let fc2 = get("text_model.encoder.layers.22.mlp.fc2.bias").unwrap();
    assert_eq!(fc2, Source::Same("cond_stage_model.model.transformer.resblocks.22.mlp.c_proj.bias".into()));
    let pos = get("text_model.embeddings.position_embedding.weight").unwrap();
    assert_eq!(pos, Source::Same("cond_stage_model.model.positional_embedding".into()));
    // A tiny SD2 text encoder keeps all of its layers.
    let tiny = plan(Family::Sd2, &strs(&openclip_keys(SD2_OPENCLIP, 5))).unwrap();
    assert_eq!(tiny.tensors.len(), 4 + 5 * 16);
    // transformers 5 (flat) keys find their way back too.
    let layout = Layout { unet: UnetLayout::standard(Family::Sd2), vae: VaeLayout { blocks: 4, layers: 3 } };
    let flat = to_ldm(Family::Sd2, "text_encoder", "final_layer_norm.bias", &layout);
    assert_eq!(flat, Some(Source::Same("cond_stage_model.model.ln_final.bias".into())));
}

#[test]
fn sdxl_text_encoders() {
    let mut keys = clip_l_keys(XL_CLIP, 12);
    keys.extend(openclip_keys(XL_OPENCLIP, 32));
    let p = plan(Family::Sdxl, &strs(&keys)).unwrap();
    let te1 = check_inverse(Family::Sdxl, &p, "text_encoder");
    let te2 = check_inverse(Family::Sdxl, &p, "text_encoder_2");
    assert_eq!((te1.len(), te2.len(), p.ignored.len()), (2 + 12 * 16 + 1, 5 + 32 * 16, 2));
    let proj = te2.iter().find(|t| t.0 == "text_projection.weight").unwrap();
    assert_eq!(proj.1, Source::Transpose("conditioner.embedders.1.model.text_projection".into()));
    let q = &te1.iter().find(|t| t.0 == "text_model.encoder.layers.11.self_attn.q_proj.bias").unwrap().1;
    assert_eq!(
        q.ldm_key(),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.bias"
    );
}

#[test]
fn full_sd15_file() {
    let mut keys: Vec<String> = Vec::new();
    let l = Layout { unet: UnetLayout::standard(Family::Sd1), vae: VaeLayout { blocks: 4, layers: 3 } };
    for (c, ks) in [("unet", unet_keys(&sd15())), ("vae", vae_keys(&[128, 256, 512, 512], 2))] {
        keys.extend(ks.iter().map(|k| to_ldm(Family::Sd1, c, k, &l).unwrap().ldm_key().to_string()));
    }
    keys.extend(clip_l_keys(SD1_CLIP, 12));
    keys.extend(
        ["betas", "model_ema.diffusion_modelinput_blocks00weight", "first_stage_model.loss.logvar"]
            .map(String::from),
    );
    assert_eq!(detect_family(&strs(&keys)), Some(Family::Sd1));
    let p = plan(Family::Sd1, &strs(&keys)).unwrap();
    assert_eq!((p.tensors.len(), p.ignored.len()), (686 + 248 + 2 + 12 * 16 + 1, 4));
    // The same keys read as SDXL are refused, not silently mis-mapped.
    assert!(plan(Family::Sdxl, &strs(&keys)).is_err());
    let mut broken = keys.clone();
    broken.push(format!("{UNET_PREFIX}input_blocks.1.0.in_layers.5.weight"));
    assert!(plan(Family::Sd1, &strs(&broken)).unwrap_err().contains("in_layers.5"));
    let odd = [
        "model.diffusion_model.input_blocks.0.0.op.weight",
        "model.diffusion_model.input_blocks.1.0.op.weight",
    ];
    assert!(plan(Family::Sd1, &odd).is_err());
}

#[test]
fn detects_families() {
    let d = |ks: &[&str]| detect_family(ks);
    assert_eq!(d(&["conditioner.embedders.1.model.positional_embedding"]), Some(Family::Sdxl));
    assert_eq!(d(&["model.diffusion_model.label_emb.0.0.weight"]), Some(Family::Sdxl));
    assert_eq!(d(&["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"]), Some(Family::Sd2));
    assert_eq!(d(&["cond_stage_model.transformer.text_model.final_layer_norm.bias"]), Some(Family::Sd1));
    assert_eq!(d(&["model.diffusion_model.input_blocks.0.0.weight"]), Some(Family::Sd1));
    assert_eq!(
        d(&["conditioner.embedders.0.model.text_projection", "model.diffusion_model.label_emb.0.0.weight"]),
        None
    );
    assert_eq!(d(&["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"]), None);
    assert_eq!(d(&["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]), None);
}

/// diffusers state-dict key lists generated from the architecture (no weights needed).
pub(crate) mod arch {
    /// A `UNet2DConditionModel` architecture: per down block its channels, whether it is a
    /// CrossAttnDownBlock2D and its transformer depth.
    pub struct Arch {
        pub channels: Vec<usize>,
        pub cross: Vec<bool>,
        pub depth: Vec<usize>,
        pub layers_per_block: usize,
        pub add_embedding: bool,
    }

    pub fn sd15() -> Arch {
        let (channels, cross) = (vec![320, 640, 1280, 1280], vec![true, true, true, false]);
        Arch { channels, cross, depth: vec![1; 4], layers_per_block: 2, add_embedding: false }
    }

    pub fn sdxl() -> Arch {
        let (channels, cross) = (vec![320, 640, 1280], vec![false, true, true]);
        Arch { channels, cross, depth: vec![1, 2, 10], layers_per_block: 2, add_embedding: true }
    }

    fn wb(v: &mut Vec<String>, p: &str) {
        v.push(format!("{p}.weight"));
        v.push(format!("{p}.bias"));
    }

    fn resnet(v: &mut Vec<String>, p: &str, time: bool, shortcut: bool) {
        for m in ["norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"] {
            if (m != "time_emb_proj" || time) && (m != "conv_shortcut" || shortcut) {
                wb(v, &format!("{p}.{m}"));
            }
        }
    }

    fn transformer(v: &mut Vec<String>, p: &str, depth: usize) {
        wb(v, &format!("{p}.norm"));
        wb(v, &format!("{p}.proj_in"));
        for t in 0..depth {
            let q = format!("{p}.transformer_blocks.{t}");
            for a in ["attn1", "attn2"] {
                for x in ["to_q", "to_k", "to_v"] {
                    v.push(format!("{q}.{a}.{x}.weight"));
                }
                wb(v, &format!("{q}.{a}.to_out.0"));
            }
            for m in ["norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"] {
                wb(v, &format!("{q}.{m}"));
            }
        }
        wb(v, &format!("{p}.proj_out"));
    }

    pub fn unet_keys(a: &Arch) -> Vec<String> {
        let (n, l) = (a.channels.len(), a.layers_per_block);
        let mut v = vec![];
        for m in
            ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_norm_out", "conv_out"]
        {
            wb(&mut v, m);
        }
        if a.add_embedding {
            wb(&mut v, "add_embedding.linear_1");
            wb(&mut v, "add_embedding.linear_2");
        }
        let mut ch = a.channels[0];
        for b in 0..n {
            for j in 0..l {
                resnet(&mut v, &format!("down_blocks.{b}.resnets.{j}"), true, ch != a.channels[b]);
                ch = a.channels[b];
                if a.cross[b] {
                    transformer(&mut v, &format!("down_blocks.{b}.attentions.{j}"), a.depth[b]);
                }
            }
            if b + 1 < n {
                wb(&mut v, &format!("down_blocks.{b}.downsamplers.0.conv"));
            }
        }
        resnet(&mut v, "mid_block.resnets.0", true, false);
        transformer(&mut v, "mid_block.attentions.0", a.depth[n - 1]);
        resnet(&mut v, "mid_block.resnets.1", true, false);
        for b in 0..n {
            let d = n - 1 - b;
            for j in 0..=l {
                resnet(&mut v, &format!("up_blocks.{b}.resnets.{j}"), true, true);
                if a.cross[d] {
                    transformer(&mut v, &format!("up_blocks.{b}.attentions.{j}"), a.depth[d]);
                }
            }
            if b + 1 < n {
                wb(&mut v, &format!("up_blocks.{b}.upsamplers.0.conv"));
            }
        }
        v
    }

    pub fn vae_keys(channels: &[usize], l: usize) -> Vec<String> {
        let n = channels.len();
        let mut v = vec![];
        for m in ["quant_conv", "post_quant_conv"] {
            wb(&mut v, m);
        }
        for s in ["encoder", "decoder"] {
            for m in ["conv_in", "conv_norm_out", "conv_out", "mid_block.resnets.0", "mid_block.resnets.1"] {
                if m.contains("resnets") {
                    resnet(&mut v, &format!("{s}.{m}"), false, false);
                } else {
                    wb(&mut v, &format!("{s}.{m}"));
                }
            }
            for m in ["group_norm", "to_q", "to_k", "to_v", "to_out.0"] {
                wb(&mut v, &format!("{s}.mid_block.attentions.0.{m}"));
            }
        }
        let mut ch = channels[0];
        for (i, &c) in channels.iter().enumerate() {
            for j in 0..l {
                resnet(&mut v, &format!("encoder.down_blocks.{i}.resnets.{j}"), false, ch != c);
                ch = c;
            }
            if i + 1 < n {
                wb(&mut v, &format!("encoder.down_blocks.{i}.downsamplers.0.conv"));
            }
        }
        for (i, &c) in channels.iter().rev().enumerate() {
            for j in 0..=l {
                resnet(&mut v, &format!("decoder.up_blocks.{i}.resnets.{j}"), false, ch != c);
                ch = c;
            }
            if i + 1 < n {
                wb(&mut v, &format!("decoder.up_blocks.{i}.upsamplers.0.conv"));
            }
        }
        v
    }
}
