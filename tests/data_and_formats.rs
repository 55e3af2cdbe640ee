//! Inputs users actually have: grayscale, 16-bit, transparent and EXIF-rotated images; legacy
//! diffusers LoRA names; a bf16 base model; captions cached on disk.
use crate::common;
use common::data::{tiny_dataset, tiny_model};
use sdlora::data::dataset::{load_rgb, scan};
use sdlora::train::config::{TrainArgs, TrainConfig};
use sdlora::train::{setup, trainer};
use std::path::{Path, PathBuf};

/// Inserts an EXIF APP1 segment with Orientation = 6 (rotate 90° clockwise) after the JPEG SOI.
fn with_exif_rotation(jpeg: &[u8]) -> Vec<u8> {
    let mut tiff = b"II*\0\x08\0\0\0".to_vec();
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend_from_slice(&0x0112u16.to_le_bytes());
    tiff.extend_from_slice(&3u16.to_le_bytes());
    tiff.extend_from_slice(&1u32.to_le_bytes());
    tiff.extend_from_slice(&6u16.to_le_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn image_kinds_are_converted_and_exif_orientation_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // grayscale, 16-bit RGB, RGBA with transparency
    image::GrayImage::from_fn(40, 20, |x, _| image::Luma([(x * 6) as u8])).save(d.join("gray.png")).unwrap();
    image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(40, 20, |_, _| image::Rgb([65535u16, 0, 32768]))
        .save(d.join("deep.png"))
        .unwrap();
    image::RgbaImage::from_fn(40, 20, |x, _| image::Rgba([0, 0, 255, if x < 20 { 0 } else { 255 }]))
        .save(d.join("alpha.png"))
        .unwrap();
    let mut jpg = vec![];
    image::RgbImage::from_fn(40, 20, |x, _| image::Rgb([if x < 20 { 250 } else { 5 }, 0, 0]))
        .write_to(&mut std::io::Cursor::new(&mut jpg), image::ImageFormat::Jpeg)
        .unwrap();
    std::fs::write(d.join("rotated.jpg"), with_exif_rotation(&jpg)).unwrap();

    let g = load_rgb(&d.join("gray.png")).unwrap();
    assert_eq!((g.dimensions(), g.get_pixel(10, 5).0), ((40, 20), [60, 60, 60]));
    let deep = load_rgb(&d.join("deep.png")).unwrap();
    assert_eq!(deep.get_pixel(0, 0).0, [255, 0, 128]);
    let a = load_rgb(&d.join("alpha.png")).unwrap();
    assert_eq!(
        (a.get_pixel(5, 5).0, a.get_pixel(30, 5).0),
        ([255, 255, 255], [0, 0, 255]),
        "alpha composited on white"
    );
    let r = load_rgb(&d.join("rotated.jpg")).unwrap();
    assert_eq!(r.dimensions(), (20, 40), "EXIF orientation 6 turns 40×20 into 20×40");
    // rotated 90° clockwise: the left (red) half of the original is now the top half
    assert!(r.get_pixel(10, 5).0[0] > 200 && r.get_pixel(10, 35).0[0] < 50);
    let items = scan(d, Some("trigger"), "--data").unwrap();
    assert_eq!(items.len(), 4);
    assert!(items.iter().all(|i| i.caption == "trigger"), "the default caption fills in");
    assert_eq!(items.iter().find(|i| i.image.ends_with("rotated.jpg")).unwrap().size, (20, 40));
}

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

#[test]
fn legacy_diffusers_lora_names_read_like_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = fixture("sd1/lora/lora_peft.safetensors");
    let t = candle_core::safetensors::load(&peft, &candle_core::Device::Cpu).unwrap();
    let legacy: std::collections::HashMap<String, candle_core::Tensor> = t
        .iter()
        .map(|(k, v)| {
            (
                k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"),
                v.clone(),
            )
        })
        .collect();
    let path = tmp.path().join("legacy.safetensors");
    candle_core::safetensors::save(&legacy, &path).unwrap();
    let f = sdlora::lora::format::read(&path).unwrap();
    assert_eq!(f.format, sdlora::lora::format::LoraFormat::DiffusersLegacy);
    let mut a =
        sdlora::model::load::load(fixture("sd1/pipe").to_str().unwrap(), &Default::default()).unwrap();
    let mut b =
        sdlora::model::load::load(fixture("sd1/pipe").to_str().unwrap(), &Default::default()).unwrap();
    // legacy files carry no alpha: scale 1, so compare with the PEFT file at lora_alpha/r = 2 → multiplier 2
    sdlora::lora::apply::apply_file(&mut a, &path, 2.0, 0).unwrap();
    sdlora::lora::apply::apply_file(&mut b, &peft, 1.0, 0).unwrap();
    let io = candle_core::safetensors::load(fixture("sd1/unet_io.safetensors"), &candle_core::Device::Cpu)
        .unwrap();
    let input = sdlora::model::unet::UNetInput {
        sample: &io["sample"],
        timestep: &io["timestep"],
        encoder_hidden_states: &io["encoder_hidden_states"],
        text_embeds: None,
        time_ids: None,
    };
    let (x, y) = (
        a.unet.as_ref().unwrap().forward(&input).unwrap(),
        b.unet.as_ref().unwrap().forward(&input).unwrap(),
    );
    let d = (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-6, "{d}");
}

fn args(model: &Path, data: &Path, out: &Path) -> TrainArgs {
    TrainArgs {
        model: Some(model.display().to_string()),
        data: Some(data.to_path_buf()),
        output: Some(out.to_path_buf()),
        steps: Some(3),
        rank: Some(2),
        resolution: Some(32),
        ..Default::default()
    }
}

#[test]
fn f16_base_trains_and_captions_are_cached_on_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, cache) = (tmp.path().join("model"), tmp.path().join("data"), tmp.path().join("cache"));
    tiny_model(&model);
    tiny_dataset(&data, 2);
    let mut b = args(&model, &data, &tmp.path().join("bf16.safetensors"));
    b.dtype = Some(sdlora::model::Precision::Bf16);
    let err = setup::setup(&TrainConfig::resolve(&b).unwrap(), &mut |_, _, _| {}).err().unwrap().to_string();
    assert!(err.contains("bf16") && err.contains("CPU"), "{err}");
    let mut a = args(&model, &data, &tmp.path().join("f16.safetensors"));
    a.dtype = Some(sdlora::model::Precision::F16);
    a.cache_dir = Some(cache.clone());
    let cfg = TrainConfig::resolve(&a).unwrap();
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    assert_eq!(run.sd.unet.as_ref().unwrap().conv_in.weight.dtype(), candle_core::DType::F16);
    let s = trainer::train(run, &cfg, &mut |_| {}).unwrap();
    assert!(s.losses.iter().all(|l| l.is_finite()) && s.losses.len() == 3);
    let texts = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("text-"))
        .count();
    assert!(texts >= 2, "one cached conditioning per caption, found {texts}");
    // what the cache returns is what the encoder computes
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    let caption = std::fs::read_to_string(data.join("img0.txt")).unwrap();
    let cached = run.text_cache.get(&caption, &candle_core::Device::Cpu).expect("cached");
    let fresh = run.prompts.encode(&run.sd.text_encoders, &[caption]).unwrap();
    let d = (cached.context.to_dtype(candle_core::DType::F32).unwrap()
        - fresh.context.to_dtype(candle_core::DType::F32).unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert_eq!(d, 0.0);
}

/// Buckets are multiples of what the model needs: here a VAE that shrinks 8× and a U-Net that
/// halves once, so 16 px. A 3:4 photo at `--resolution 64` used to get 56×72 (8 px steps),
/// whose 7×9 latent met its skip connection one cell off inside the U-Net.
#[test]
fn buckets_fit_the_models_downsampling() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    let mut pc = sdlora::model::tiny::tiny_sd1();
    pc.vae.block_out_channels = vec![8, 8, 8, 8];
    sdlora::model::tiny::write_random_pipeline(&model, &pc, 7, candle_core::DType::F32).unwrap();
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..2u8 {
        let img =
            image::RgbImage::from_fn(96, 128, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, 40 * i]));
        img.save(data.join(format!("p{i}.png"))).unwrap();
        std::fs::write(data.join(format!("p{i}.txt")), "a photo").unwrap();
    }
    let mut a = args(&model, &data, &tmp.path().join("o.safetensors"));
    (a.resolution, a.steps) = (Some(64), Some(1));
    let cfg = TrainConfig::resolve(&a).unwrap();
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    for s in &run.samples {
        assert!(s.bucket.0 % 16 == 0 && s.bucket.1 % 16 == 0, "bucket {:?}", s.bucket);
    }
    let s = trainer::train(run, &cfg, &mut |_| {}).unwrap();
    assert!(s.losses[0].is_finite());
    // a resolution below one cell is refused with what the model needs
    a.resolution = Some(8);
    let err = setup::setup(&TrainConfig::resolve(&a).unwrap(), &mut |_, _, _| {}).err().unwrap().to_string();
    assert!(err.contains("--resolution 8") && err.contains("16"), "{err}");
}
