//! The full-size SD1.5 and SDXL networks, built from their configs without weights: exact
//! parameter counts, and the size of a typical LoRA file.
use sdlora::model::tiny::{clip_shapes, count, sd15, sdxl, unet_shapes, vae_shapes};

#[test]
fn sd15_parameter_counts() {
    let c = sd15();
    assert_eq!(count(&unet_shapes(&c.unet).unwrap()), 859_520_964);
    assert_eq!(count(&vae_shapes(&c.vae).unwrap()), 83_653_863);
    assert_eq!(count(&clip_shapes(&c.text_encoders[0]).unwrap()), 123_060_480);
}

#[test]
fn sdxl_parameter_counts() {
    let c = sdxl();
    assert_eq!(count(&unet_shapes(&c.unet).unwrap()), 2_567_463_684);
    assert_eq!(count(&clip_shapes(&c.text_encoders[1]).unwrap()), 694_659_840);
}

/// SD 1.5's U-Net without weights, with rank-`rank` adapters on the layers `preset` names.
fn sd15_adapters(preset: &str, rank: usize) -> Vec<sdlora::lora::AdapterInfo> {
    use candle_core::{DType, Device};
    use sdlora::lora::targets::{unet_selects, Preset};
    use sdlora::lora::{attach, Init, LoraSpec};
    let mut unet = sdlora::model::unet::UNet2DConditionModel::load(
        &sd15().unet,
        &sdlora::model::weights::Weights::meta(),
    )
    .unwrap();
    let spec = LoraSpec {
        rank,
        alpha: rank as f64,
        multiplier: 1.0,
        init: Init::Standard,
        seed: 0,
        dtype: DType::F32,
        dropout: 0.0,
        dora: false,
        factored: None,
        switch: sdlora::model::layers::adapter::switch(),
    };
    let preset: Preset = preset.parse().unwrap();
    attach(&mut unet, "", &|p, l| unet_selects(preset, p, l), &spec, 0, &Device::Cpu).unwrap()
}

#[test]
fn sd15_rank8_attn_mlp_lora_file_is_about_6_5_mb() {
    use candle_core::DType;
    use sdlora::lora::format;
    let adapters = sd15_adapters("attn-mlp", 8);
    assert_eq!(adapters.len(), 192, "16 transformer blocks × 10 layers + 16 × proj_in/out");
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sd15_r8.safetensors");
    let named: Vec<(String, _)> = adapters.into_iter().map(|a| ("unet".to_string(), a)).collect();
    let family = sdlora::model::load::Family::Sd1;
    let layout = sdlora::model::load::ldm_keys::UnetLayout::standard(family);
    let how =
        format::WriteAs { family, layout: &layout, format: format::LoraFormat::Kohya, dtype: DType::F16 };
    format::write(&path, &named, vec![], how, Default::default()).unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    assert!((6_000_000..7_000_000).contains(&bytes), "{bytes} bytes");
}

/// `--targets cross-kv` (Custom Diffusion): only the cross-attentions' key and value projections,
/// which read the prompt — 16 transformer blocks × 2 in SD 1.5.
#[test]
fn sd15_cross_kv_targets_only_the_prompt_projections() {
    let adapters = sd15_adapters("cross-kv", 4);
    assert_eq!(adapters.len(), 32);
    assert!(adapters.iter().all(|a| a.path.ends_with("attn2.to_k") || a.path.ends_with("attn2.to_v")));
    // the down projection reads the 768-wide text embedding
    assert!(adapters.iter().all(|a| a.down.as_tensor().dims() == [4, 768]));
    let unknown = "cross-q".parse::<sdlora::lora::targets::Preset>().unwrap_err();
    assert!(unknown.contains("cross-kv"), "{unknown}");
}
