//! The LoRA toolbox through the command line: convert round trip, inspect, resize, merge ≡
//! runtime LoRA, extract ≡ the merged difference, and the family-mismatch error.
use candle_core::{DType, Tensor};
use sdlora::lora::apply::apply_file;
use sdlora::model::load::{load, LoadOptions, StableDiffusion};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn sdlora(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_sdlora")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {err}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn tensors(p: &Path) -> HashMap<String, Vec<u8>> {
    let data = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, v.data().to_vec())).collect()
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

#[test]
fn convert_round_trip_is_lossless_and_inspect_describes() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["sd1", "sdxl"] {
        let orig = fixture(&format!("{name}/lora/ours_kohya.safetensors"));
        let (peft, back) = (
            tmp.path().join(format!("{name}_peft.safetensors")),
            tmp.path().join(format!("{name}_back.safetensors")),
        );
        sdlora(&["convert", p(&orig), p(&peft), "--to", "peft"]);
        sdlora(&["convert", p(&peft), p(&back), "--to", "kohya"]);
        assert!(tensors(&orig) == tensors(&back), "{name}: kohya → peft → kohya changed tensors");
        assert!(tensors(&peft).keys().all(|k| k.contains(".lora_A.") || k.contains(".lora_B.")));
        let j: serde_json::Value = serde_json::from_str(&sdlora(&["inspect", p(&orig), "--json"])).unwrap();
        assert_eq!(j["base_family"], name);
        assert_eq!(j["format"], "kohya");
        let n = tensors(&orig).keys().filter(|k| k.ends_with(".lora_down.weight")).count();
        assert_eq!(j["layers"].as_array().unwrap().len(), n);
        assert!(j["layers"].as_array().unwrap().iter().all(|l| l["rank"] == 4 && l["alpha"] == 2.0));
        let text = sdlora(&["inspect", p(&peft)]);
        assert!(text.contains("Peft") && text.contains(&format!("base model   {name}")), "{text}");
    }
}

fn opts() -> LoadOptions {
    LoadOptions { vae: false, config: Some(fixture("sd1/pipe")), ..Default::default() }
}

fn outputs(sd: &StableDiffusion) -> (Tensor, Tensor) {
    let t = candle_core::safetensors::load(fixture("sd1/unet_io.safetensors"), &candle_core::Device::Cpu)
        .unwrap();
    let input = crate::common::unet_input(&t);
    let ids = &candle_core::safetensors::load(
        fixture("sd1/text_encoder_io.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()["input_ids"];
    (
        sd.unet.as_ref().unwrap().forward(&input).unwrap(),
        sd.text_encoders[0].forward(ids).unwrap().last_hidden_state,
    )
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64
}

/// A folder merged from a single file is a whole diffusers folder: its components listed in
/// model_index.json and the family's original scheduler beside them.
#[test]
fn merge_of_a_single_file_writes_a_whole_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = fixture("sd1/lora/ours_kohya.safetensors");
    let out = tmp.path().join("merged");
    let arg = format!("{}:0.7", lora.display());
    let single = fixture("sd1/single.safetensors");
    sdlora(&["merge", "--model", p(&single), "--lora", &arg, "--output", p(&out)]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["unet"][1], "UNet2DConditionModel");
    assert_eq!(index["text_encoder"][1], "CLIPTextModel");
    assert_eq!(index["scheduler"][1], "PNDMScheduler");
    let merged = load(p(&out), &opts()).unwrap();
    assert_eq!(merged.scheduler.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(merged.scheduler.steps_offset, 1);
    // with --model-config, the repository's own scheduler is copied instead
    let out2 = tmp.path().join("merged2");
    let cfg = fixture("sd1/pipe");
    sdlora(&[
        "merge",
        "--model",
        p(&single),
        "--lora",
        &arg,
        "--output",
        p(&out2),
        "--model-config",
        p(&cfg),
    ]);
    assert_eq!(
        std::fs::read(out2.join("scheduler/scheduler_config.json")).unwrap(),
        std::fs::read(cfg.join("scheduler/scheduler_config.json")).unwrap()
    );
    // a folder in the way is not merged into; the model is written whole or not at all
    let o = Command::new(env!("CARGO_BIN_EXE_sdlora"))
        .args(["merge", "--model", p(&single), "--lora", &arg, "--output", p(&out)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("exists and is not empty"), "{err}");
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
}

#[test]
fn merge_equals_runtime_lora_and_extract_recovers_it() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = fixture("sd1/lora/ours_kohya.safetensors");
    let pipe = fixture("sd1/pipe");
    let mut runtime = load(p(&pipe), &opts()).unwrap();
    let base = outputs(&runtime);
    apply_file(&mut runtime, &lora, 0.7, 0).unwrap();
    let want = outputs(&runtime);
    assert!(rel(&want.0, &base.0) > 1e-3, "the LoRA changes the output");

    let folder = tmp.path().join("merged");
    let single = tmp.path().join("merged.safetensors");
    let arg = format!("{}:0.7", lora.display());
    sdlora(&["merge", "--model", p(&pipe), "--lora", &arg, "--output", p(&folder)]);
    sdlora(&["merge", "--model", p(&pipe), "--lora", &arg, "--output", p(&single)]);
    for m in [&folder, &single] {
        let merged = load(p(m), &opts()).unwrap();
        let got = outputs(&merged);
        assert!(rel(&got.0, &want.0) < 1e-4, "{}: unet {}", m.display(), rel(&got.0, &want.0));
        assert!(rel(&got.1, &want.1) < 1e-4, "{}: text encoder {}", m.display(), rel(&got.1, &want.1));
    }

    // extract the LoRA back from (merged − base): rank 4 captures it exactly
    let extracted = tmp.path().join("extracted.safetensors");
    sdlora(&[
        "extract",
        "--base",
        p(&pipe),
        "--tuned",
        p(&folder),
        "--output",
        p(&extracted),
        "--rank",
        "4",
        "--save-dtype",
        "f32",
    ]);
    let mut sd = load(p(&pipe), &opts()).unwrap();
    apply_file(&mut sd, &extracted, 1.0, 0).unwrap();
    let got = outputs(&sd);
    assert!(rel(&got.0, &want.0) < 1e-4 && rel(&got.1, &want.1) < 1e-4);
}

#[test]
fn resize_to_full_rank_reproduces_and_lower_rank_reports_energy() {
    let tmp = tempfile::tempdir().unwrap();
    let lora = fixture("sd1/lora/ours_kohya.safetensors");
    let (full, half) = (tmp.path().join("r4.safetensors"), tmp.path().join("r2.safetensors"));
    sdlora(&["resize", p(&lora), p(&full), "--rank", "4", "--save-dtype", "f32"]);
    let out = sdlora(&["resize", p(&lora), p(&half), "--rank", "2", "--save-dtype", "f32"]);
    assert!(out.contains("energy kept"), "{out}");
    let mut a = load(p(&fixture("sd1/pipe")), &opts()).unwrap();
    let mut b = load(p(&fixture("sd1/pipe")), &opts()).unwrap();
    apply_file(&mut a, &lora, 1.0, 0).unwrap();
    apply_file(&mut b, &full, 1.0, 0).unwrap();
    let (x, y) = (outputs(&a), outputs(&b));
    assert!(rel(&y.0, &x.0) < 1e-5 && rel(&y.1, &x.1) < 1e-5);
    let j: serde_json::Value = serde_json::from_str(&sdlora(&["inspect", p(&half), "--json"])).unwrap();
    assert!(j["layers"].as_array().unwrap().iter().all(|l| l["rank"] == 2));

    // DoRA keeps its magnitudes: at full rank the same output, and still DoRA
    let dora = fixture("sd1/dora/dora_kohya.safetensors");
    let full = tmp.path().join("dora4.safetensors");
    sdlora(&["resize", p(&dora), p(&full), "--rank", "4", "--save-dtype", "f32"]);
    let mut a = load(p(&fixture("sd1/pipe")), &opts()).unwrap();
    let mut b = load(p(&fixture("sd1/pipe")), &opts()).unwrap();
    apply_file(&mut a, &dora, 1.0, 0).unwrap();
    let resized = apply_file(&mut b, &full, 1.0, 0).unwrap();
    assert!(resized.iter().all(|(_, a)| a.magnitude.is_some()), "resize dropped the magnitudes");
    let (x, y) = (outputs(&a), outputs(&b));
    assert!(rel(&y.0, &x.0) < 1e-5, "DoRA resized to its own rank: {}", rel(&y.0, &x.0));
}

#[test]
fn lora_of_another_family_is_refused_by_name() {
    let mut sd = load(p(&fixture("sd1/pipe")), &opts()).unwrap();
    let err =
        apply_file(&mut sd, &fixture("sdxl/lora/ours_kohya.safetensors"), 1.0, 0).err().unwrap().to_string();
    assert!(err.contains("for sdxl but the model is sd1"), "{err}");
    let _ = DType::F32;
}

/// `merge --lora FILE:inf` would write a model of infinities, `resize --rank 0` empty matrices:
/// refused, nothing written.
#[test]
fn merge_and_resize_refuse_degenerate_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let arg = format!("{}:inf", fixture("sd1/lora/ours_kohya.safetensors").display());
    let o = Command::new(env!("CARGO_BIN_EXE_sdlora"))
        .args(["merge", "--model", p(&fixture("sd1/pipe")), "--lora", &arg, "--output", p(&out)])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("strength must be a finite number"), "{err}");
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
    // a rank-0 resize would write a LoRA of empty matrices
    let resized = tmp.path().join("r0.safetensors");
    let lora = fixture("sd1/lora/ours_kohya.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_sdlora"))
        .args(["resize", p(&lora), p(&resized), "--rank", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--rank 0"), "{err}");
    assert!(!resized.exists());
}
