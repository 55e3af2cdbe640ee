//! `sdlora generate`: whole pipelines against diffusers (tests/fixtures/schedulers/pipe_*, from
//! tools/fixtures/schedulers.py), determinism, the PNG infotext, LoRAs, CLI errors.
use crate::common;
use candle_core::{DType, Device, Tensor};
use sdlora::lora::format::{unet_layout, write, LoraFormat, WriteAs};
use sdlora::lora::{attach, Init, LoraSpec};
use sdlora::model::load::{load_folder, Family, LoadOptions, StableDiffusion};
use sdlora::model::text::PromptEncoder;
use sdlora::sample::noise::{NoNoise, NoiseSource, SeededNoise};
use sdlora::sample::pipeline::{decode, denoise, generate, generate_each, GenerateOptions, Guidance};
use sdlora::sample::png::{encode_png, parse_fields, read_parameters};
use sdlora::sample::{build, SCHEDULER_NAMES};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let e = d / s;
    assert!(!e.is_nan(), "NaN");
    e
}

/// Runs one pipe_* fixture through `denoise` + `decode` with the fixture's prompt ids.
fn pipeline_case(stem: &str) -> (f64, f64) {
    let path = fixtures().join(format!("schedulers/{stem}.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let meta = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone().unwrap();
    let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let sd = load_folder(&fixtures().join(&meta["model"]).join("pipe"), &LoadOptions::default()).unwrap();
    let encoder = PromptEncoder::new(&sd, 1).unwrap();
    let encode = |key: &str| {
        let outs: Vec<_> = sd.text_encoders.iter().map(|e| e.forward(&t[key]).unwrap()).collect();
        encoder.assemble(&outs, &sd.text_encoders).unwrap()
    };
    let (cond, uncond) = (encode("prompt_ids"), encode("negative_ids"));
    let size: usize = meta["size"].parse().unwrap();
    let xl = (sd.family == Family::Sdxl).then_some((size, size));
    let g = Guidance::new(&cond, &uncond, meta["cfg"].parse().unwrap(), xl).unwrap();
    let mut sched = build(&meta["scheduler"], &sd.scheduler, meta["steps"].parse().unwrap()).unwrap();
    let want_ts: Vec<f64> = t["timesteps"].to_vec1().unwrap();
    assert_eq!(sched.timesteps(), &want_ts[..], "{stem}: timesteps");

    let seeds: Option<Vec<u64>> = serde_json::from_str(&meta["seeds"]).unwrap();
    let mut noise: Box<dyn NoiseSource> = match &seeds {
        Some(s) => Box::new(SeededNoise::new(s)),
        None => Box::new(NoNoise),
    };
    let start = match &seeds {
        Some(_) => {
            let n = noise.randn(t["noise"].dims(), &Device::Cpu).unwrap();
            assert!(rel_err(&n, &t["noise"]) < 1e-5, "{stem}: seeded noise");
            n
        }
        None => t["noise"].clone(),
    };
    let latents = (start * sched.init_noise_sigma()).unwrap();
    let unet = sd.unet.as_ref().unwrap();
    let out = denoise(unet, sched.as_mut(), latents, &g, None, noise.as_mut(), &mut |_, _| {}).unwrap();
    let e_lat = rel_err(&out, &t["latents_out"]);
    let image = decode(sd.vae.as_ref().unwrap(), &out).unwrap();
    (e_lat, rel_err(&image, &t["image"]))
}

#[test]
fn whole_pipelines_match_diffusers() {
    let mut report = vec![];
    for stem in [
        "pipe_sd1_ddim",
        "pipe_sd1_euler",
        "pipe_sd2_dpm++2m-karras",
        "pipe_sdxl_default",
        "pipe_sd1_euler-a_seed42",
    ] {
        let (lat, img) = pipeline_case(stem);
        report.push(format!("{stem}: latents {lat:.1e}, image {img:.1e}"));
        assert!(lat <= 1e-3 && img <= 1e-3, "{stem}: latents {lat:.2e}, image {img:.2e}");
    }
    println!("relative errors vs diffusers:\n  {}", report.join("\n  "));
}

// ---------------------------------------------------------------------------------------------
// the tiny random model (real CLIP vocabulary) through `generate`

fn tiny(dir: &Path) -> StableDiffusion {
    common::data::tiny_model(dir);
    load_folder(dir, &LoadOptions::default()).unwrap()
}

fn opts(seed: u64) -> GenerateOptions {
    GenerateOptions {
        prompt: "a red circle on a blue background".into(),
        negative: "blurry".into(),
        steps: 3,
        seed,
        width: 32,
        height: 32,
        scheduler: "euler-a".into(),
        ..Default::default()
    }
}

fn png_of(sd: &StableDiffusion, o: &GenerateOptions) -> Vec<Vec<u8>> {
    let (imgs, sampler) = generate(sd, o, &mut |_, _| {}).unwrap();
    imgs.iter()
        .map(|i| encode_png(i.width, i.height, &i.rgb, &format!("{sampler} {}", i.seed)).unwrap())
        .collect()
}

#[test]
fn same_seed_same_bytes_other_seed_other_image() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = tiny(tmp.path());
    let a = png_of(&sd, &opts(42));
    assert_eq!(a, png_of(&sd, &opts(42)), "same seed, different bytes");
    assert_ne!(a, png_of(&sd, &opts(43)), "different seeds, same image");
    // batch image i is the single image of seed + i (per-image generators)
    let batch = generate(&sd, &GenerateOptions { batch: 2, ..opts(42) }, &mut |_, _| {}).unwrap().0;
    let single = generate(&sd, &opts(43), &mut |_, _| {}).unwrap().0;
    assert_eq!(batch[1].seed, 43);
    let diff = batch[1].rgb.iter().zip(&single[0].rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(diff <= 1, "batch image 1 differs from seed 43 alone by {diff}");
    // every sampler runs, without guidance too
    for s in SCHEDULER_NAMES {
        let o = GenerateOptions { scheduler: s.to_string(), cfg_scale: 1.0, steps: 2, ..opts(1) };
        generate(&sd, &o, &mut |_, _| {}).unwrap_or_else(|e| panic!("{s}: {e:#}"));
    }
    // a prompt of ~130 tokens is encoded in two chunks
    let long = vec!["red circle"; 65].join(" ");
    generate(&sd, &GenerateOptions { prompt: long, ..opts(1) }, &mut |_, _| {}).unwrap();
}

/// Many (prompt, seed) rows in one batch draw what one call per row draws.
#[test]
fn rows_of_different_prompts_batch_like_single_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = tiny(tmp.path());
    let rows: Vec<(String, u64)> = vec![
        ("a red circle on a blue background".into(), 7),
        ("a green striped star on a white background".into(), 8),
        ("a black ring on a yellow background".into(), 7),
    ];
    let many = generate_each(&sd, &opts(0), &rows).unwrap();
    assert_eq!(many.len(), 3);
    for (img, (prompt, seed)) in many.iter().zip(&rows) {
        let one = generate(&sd, &GenerateOptions { prompt: prompt.clone(), ..opts(*seed) }, &mut |_, _| {})
            .unwrap()
            .0;
        assert_eq!(img.seed, *seed);
        let diff = img.rgb.iter().zip(&one[0].rgb).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(diff <= 1, "`{prompt}` seed {seed}: batched differs from alone by {diff}");
    }
    assert_ne!(many[0].rgb, many[2].rgb, "same seed, other prompt");
}

#[test]
fn tiny_sdxl_generates_with_micro_conditioning() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = sdlora::model::tiny::tiny_sdxl();
    sdlora::model::tiny::write_random_pipeline(tmp.path(), &cfg, 11, DType::F32).unwrap();
    let sd = load_folder(tmp.path(), &LoadOptions::default()).unwrap();
    assert_eq!(sd.family, Family::Sdxl);
    let o = GenerateOptions { scheduler: "euler".into(), ..opts(3) };
    let a = png_of(&sd, &o);
    assert_eq!(a, png_of(&sd, &o));
    // the size enters through the time ids: another size is another image, not just a crop
    let (img, _) = generate(&sd, &GenerateOptions { height: 48, ..o.clone() }, &mut |_, _| {}).unwrap();
    assert_eq!((img[0].width, img[0].height), (32, 48));
    // a long prompt: both encoders chunked alike, pooled from the first chunk
    let long = vec!["red circle"; 60].join(", ");
    generate(&sd, &GenerateOptions { prompt: long, ..o }, &mut |_, _| {}).unwrap();
}

#[test]
fn long_prompts_are_chunked_like_a1111() {
    let tmp = tempfile::tempdir().unwrap();
    let sd = tiny(tmp.path());
    let enc = PromptEncoder::new(&sd, 1).unwrap();
    let short = enc.encode_chunked(&sd.text_encoders, &["a cat".into()]).unwrap();
    let plain = enc.encode(&sd.text_encoders, &["a cat".into()]).unwrap();
    assert_eq!(short.context.dims(), &[1, 77, 16]);
    assert_eq!(rel_err(&short.context, &plain.context), 0.0, "≤ 75 tokens: as diffusers");
    let long = vec!["cat"; 100].join(" ");
    let c = enc.encode_chunked(&sd.text_encoders, &[long, "a cat".into()]).unwrap();
    assert_eq!(c.context.dims(), &[2, 154, 16]);
    // the short prompt's second chunk is the empty prompt's
    let empty = enc.encode(&sd.text_encoders, &["".into()]).unwrap();
    assert_eq!(
        rel_err(&c.context.get(1).unwrap().narrow(0, 77, 77).unwrap(), &empty.context.get(0).unwrap()),
        0.0
    );
}

fn write_lora(dir: &Path, out: &Path) {
    let mut sd = load_folder(dir, &LoadOptions::default()).unwrap();
    let spec = LoraSpec {
        rank: 2,
        alpha: 2.0,
        multiplier: 1.0,
        init: Init::Random,
        seed: 3,
        dtype: DType::F32,
        dropout: 0.0,
        dora: false,
        factored: None,
        switch: sdlora::model::layers::adapter::switch(),
    };
    let unet = sd.unet.as_mut().unwrap();
    let infos = attach(unet, "", &|p, _| p.contains(".attn"), &spec, 0, &Device::Cpu).unwrap();
    let n = infos.len();
    let te = &mut sd.text_encoders[0];
    let te_infos = attach(te, "", &|p, _| p.contains(".mlp."), &spec, n, &Device::Cpu).unwrap();
    assert!(!te_infos.is_empty());
    // a noticeable but finite change
    for a in infos.iter().chain(&te_infos) {
        a.up.set(&(a.up.as_tensor() * 3.0).unwrap()).unwrap();
    }
    let adapters: Vec<_> = infos
        .into_iter()
        .map(|a| ("unet".to_string(), a))
        .chain(te_infos.into_iter().map(|a| ("text_encoder".to_string(), a)))
        .collect();
    let layout = unet_layout(&sd);
    let how = WriteAs { family: sd.family, layout: &layout, format: LoraFormat::Kohya, dtype: DType::F32 };
    write(out, &adapters, vec![], how, HashMap::new()).unwrap();
}

#[test]
fn lora_at_zero_is_the_base_image_and_at_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(&tmp.path().join("m"));
    let lora = tmp.path().join("l.safetensors");
    write_lora(&tmp.path().join("m"), &lora);
    let base_png = png_of(&base, &opts(5));
    let with = |m: f64| {
        let mut sd = load_folder(&tmp.path().join("m"), &LoadOptions::default()).unwrap();
        let n = sdlora::lora::apply::apply_file(&mut sd, &lora, m, 0).unwrap().len();
        assert!(n > 0);
        png_of(&sd, &opts(5))
    };
    assert_eq!(with(0.0), base_png, "a LoRA at strength 0 changed the image");
    assert_ne!(with(1.0), base_png, "a LoRA at strength 1 left the image unchanged");
}

/// `lora_start`: the base draws the first steps alone, so holding every step back gives the
/// base's image exactly, none the LoRA's, a share something else again; and the LoRA is on
/// again for the next image.
#[test]
fn lora_start_leaves_the_first_steps_to_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(&tmp.path().join("m"));
    let lora = tmp.path().join("l.safetensors");
    write_lora(&tmp.path().join("m"), &lora);
    let o = |lora_start: f64| GenerateOptions { steps: 4, lora_start, ..opts(5) };
    let base_png = png_of(&base, &o(0.0));
    let mut sd = load_folder(&tmp.path().join("m"), &LoadOptions::default()).unwrap();
    sdlora::lora::apply::apply_file(&mut sd, &lora, 1.0, 0).unwrap();
    let full = png_of(&sd, &o(0.0));
    assert_ne!(full, base_png, "the LoRA changes the image");
    assert_eq!(png_of(&sd, &o(1.0)), base_png, "every step held back is the base's image");
    let half = png_of(&sd, &o(0.5));
    assert!(half != base_png && half != full, "two of four steps by the base is neither image");
    assert_eq!(png_of(&sd, &o(0.0)), full, "the LoRA is back on after a held-back image");
}

// ---------------------------------------------------------------------------------------------
// the command line

fn sdlora(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sdlora")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn one_error_line(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = sdlora(args);
    assert!(!ok, "succeeded: {args:?}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{}` lacks `{n}`", lines[0]);
    }
}

#[test]
fn cli_writes_pngs_with_a1111_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::data::tiny_model(&model);
    let lora = tmp.path().join("my_style.safetensors");
    write_lora(&model, &lora);
    let out = tmp.path().join("out");
    let (m, l, o) =
        (model.display().to_string(), format!("{}:0.8", lora.display()), out.display().to_string());
    let args = [
        "generate",
        "--model",
        &m,
        "--lora",
        &l,
        "--prompt",
        "a red circle",
        "--negative",
        "blurry, dark",
        "--steps",
        "2",
        "--cfg",
        "5.5",
        "--seed",
        "7",
        "--width",
        "32",
        "--height",
        "48",
        "--batch",
        "2",
        "--scheduler",
        "dpm++2m-karras",
        "--clip-skip",
        "2",
        "--lora-start",
        "0.5",
        "--out",
        &o,
    ];
    let (ok, stdout, err) = sdlora(&args);
    assert!(ok, "{err}");
    assert!(stdout.contains("00000-7.png") && stdout.contains("00001-8.png"), "{stdout}");
    let bytes = std::fs::read(out.join("00001-8.png")).unwrap();
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!((img.width(), img.height()), (32, 48));
    let text = read_parameters(&bytes).unwrap().expect("a parameters chunk");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("a red circle <lora:my_style:0.8>"));
    assert_eq!(lines.next(), Some("Negative prompt: blurry, dark"));
    let f: HashMap<String, String> = parse_fields(&text).into_iter().collect();
    assert_eq!(f["Steps"], "2");
    assert_eq!(f["Sampler"], "DPM++ 2M Karras");
    assert_eq!(f["CFG scale"], "5.5");
    assert_eq!(f["Seed"], "8");
    assert_eq!(f["Size"], "32x48");
    assert_eq!(f["Model"], "model");
    assert_eq!(f["Clip skip"], "2");
    assert_eq!(f["Lora start"], "0.5");
    assert_eq!(f["Model hash"].len(), 10);
    let lh = &f["Lora hashes"];
    assert!(lh.starts_with("my_style: ") && lh.len() == "my_style: ".len() + 12, "{lh}");
    // a second run numbers on
    let (ok, stdout, _) = sdlora(&args);
    assert!(ok && stdout.contains("00002-7.png"), "{stdout}");
}

#[test]
fn cli_bad_input_gives_one_error_line() {
    let sd1 = fixtures().join("sd1/pipe").display().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["generate", "--prompt", "x", "--out", &o, "--steps", "1", "--height", "16"]
            .map(String::from)
            .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str], needles: &[&str]| {
        let args = base(extra);
        one_error_line(&args.iter().map(String::as_str).collect::<Vec<_>>(), needles);
    };
    let mut needles = vec!["unknown scheduler `plms`"];
    needles.extend(SCHEDULER_NAMES);
    run(&["--model", &sd1, "--scheduler", "plms"], &needles);
    run(&["--model", "/no/such/model"], &["/no/such/model"]);
    let xl_lora = fixtures().join("sdxl/lora/lora_kohya_sgm.safetensors").display().to_string();
    run(&["--model", &sd1, "--lora", &xl_lora], &["lora_kohya_sgm.safetensors"]);
    run(&["--model", &sd1, "--lora", "/no/such.safetensors:0.5"], &["/no/such.safetensors"]);
    run(&["--model", &sd1, "--width", "18"], &["multiples of"]);
    // 0 is not "the default" (which would quietly draw at 512 px), nor NaN a guidance
    run(&["--model", &sd1, "--width", "0"], &["--width and --height", "leave them out"]);
    run(&["--model", &sd1, "--cfg", "nan"], &["--cfg NaN", "give a number"]);
    // layers deeper than the penultimate are not implemented: refused rather than drawn with 2
    run(&["--model", &sd1, "--clip-skip", "3"], &["--clip-skip 3", "penultimate"]);
    // holding back LoRAs that are not there is a mistake in the command, not a no-op
    run(&["--model", &sd1, "--lora-start", "0.5"], &["--lora-start 0.5", "--lora"]);
    run(&["--model", &sd1, "--lora-start", "1.5"], &["--lora-start 1.5", "between 0"]);
    // the fixture pipe itself generates fine (16 px: its VAE downsamples by 2)
    let args = base(&["--model", &sd1, "--width", "16"]);
    let (ok, _, err) = sdlora(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
}

/// Without --width/--height a model draws at its own size, as diffusers' pipelines take it:
/// the U-Net's sample_size (8 latents) × the VAE's scale (2): 16 px, not SD1's 512.
#[test]
fn cli_draws_at_the_models_own_size_by_default() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::data::tiny_model(&model);
    let (m, o) = (model.display().to_string(), tmp.path().join("out").display().to_string());
    let (ok, _, err) = sdlora(&["generate", "--model", &m, "--prompt", "x", "--steps", "1", "--out", &o]);
    assert!(ok, "{err}");
    let img = image::open(tmp.path().join("out/00000-42.png")).unwrap();
    assert_eq!((img.width(), img.height()), (16, 16));
}

#[test]
fn cli_single_file_checkpoint_is_hashed_like_a1111() {
    use sha2::Digest;
    let single = fixtures().join("sd1/single.safetensors");
    let tmp = tempfile::tempdir().unwrap();
    let (m, o) = (single.display().to_string(), tmp.path().display().to_string());
    let args = [
        "generate", "--model", &m, "--prompt", "x", "--steps", "1", "--width", "16", "--height", "16",
        "--out", &o,
    ];
    let (ok, _, err) = sdlora(&args);
    assert!(ok, "{err}");
    let text = read_parameters(&std::fs::read(tmp.path().join("00000-42.png")).unwrap()).unwrap().unwrap();
    let f: HashMap<String, String> = parse_fields(&text).into_iter().collect();
    let digest = sha2::Sha256::digest(std::fs::read(&single).unwrap());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(f["Model hash"], hex[..10]);
    assert_eq!(f["Model"], "single");
    assert_eq!(f["Sampler"], "DPM++ 2M Karras", "no scheduler config: A1111's default sampler");
}

/// `--model-config`: a single file drawn with its repository's configs (and scheduler) gives the
/// folder's image, pixel for pixel.
#[test]
fn cli_single_file_with_model_config_draws_as_its_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let draw = |model: &Path, extra: &[&str], out: &str| {
        let o = tmp.path().join(out).display().to_string();
        let m = model.display().to_string();
        let mut args =
            vec!["generate", "--model", &m, "--prompt", "a red disc", "--steps", "2", "--width", "16"];
        args.extend(["--height", "16", "--out", &o]);
        args.extend(extra);
        let (ok, _, err) = sdlora(&args);
        assert!(ok, "{err}");
        image::open(tmp.path().join(out).join("00000-42.png")).unwrap().to_rgb8().into_raw()
    };
    let pipe = fixtures().join("sd1/pipe");
    let folder = draw(&pipe, &[], "folder");
    let single = fixtures().join("sd1/single.safetensors");
    let cfg = pipe.display().to_string();
    assert!(draw(&single, &["--model-config", &cfg], "single") == folder);
    assert!(
        draw(&single, &[], "inferred") != folder,
        "the configs made no difference: the test proves nothing"
    );
    // train takes it too (and its TOML config as `model_config`)
    let data = tmp.path().join("data");
    common::data::tiny_dataset(&data, 2);
    let (d, lora) = (data.display().to_string(), tmp.path().join("l.safetensors").display().to_string());
    let m = single.display().to_string();
    let args =
        ["train", "--model", &m, "--model-config", &cfg, "--data", &d, "--output", &lora, "--steps", "1"];
    let (ok, _, err) = sdlora(&[&args[..], &["--resolution", "16"]].concat());
    assert!(ok, "{err}");
}

#[test]
fn help_lists_every_flag_with_its_default() {
    let (ok, help, _) = sdlora(&["generate", "--help"]);
    assert!(ok);
    for flag in [
        "--model",
        "--lora",
        "--prompt",
        "--negative",
        "--steps",
        "--cfg",
        "--seed",
        "--width",
        "--height",
        "--batch",
        "--scheduler",
        "--clip-skip",
        "--out",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    for d in [
        "[default: 25]",
        "[default: 7]",
        "[default: 42]",
        "[default: 1]",
        "[default: default]",
        "1024 for SDXL",
    ] {
        assert!(help.contains(d), "`{d}` missing from --help:\n{help}");
    }
}
