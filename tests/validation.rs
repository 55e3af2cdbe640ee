//! Validation on held-out images: `--val-data DIR` and `--val-split SHARE`.
use crate::common;
use common::data::tiny_dataset;
use std::path::Path;

/// `sdlora train` with `args` after the model, data and output; its stderr.
fn sdlora_train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args: Vec<String> =
        ["train", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()]
            .map(String::from)
            .to_vec();
    args.extend(["--output", out.to_str().unwrap(), "--steps", "4", "--resolution", "32"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(&args).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stderr).to_string()
}

/// `--val-data`: held-out images are measured (before, every --val-every steps, at the end) and
/// never trained on — the LoRA is byte for byte the one trained without them; the loss CSV gets a
/// `val_loss` column and the report's plot a third line.
#[test]
fn validation_images_are_measured_and_never_trained_on() {
    let f = common::data::Fixture::new(3);
    let (model, data, val) = (f.root.join("model"), f.root.join("data"), f.root.join("val"));
    tiny_dataset(&val, 2);
    let out = |d: &str| {
        std::fs::create_dir_all(f.root.join(d)).unwrap();
        f.root.join(d).join("lora.safetensors")
    };
    let (with, without) = (out("with"), out("without"));
    let run = |o: &Path, extra: &[&str]| sdlora_train(&model, &data, o, extra);
    let err = run(&with, &["--val-data", val.to_str().unwrap(), "--val-every", "2"]);
    assert!(err.contains("3 images + 2 validation images"), "{err}");
    run(&without, &[]);
    assert!(
        std::fs::read(&with).unwrap() == std::fs::read(&without).unwrap(),
        "validation images changed the LoRA"
    );
    let csv = std::fs::read_to_string(with.with_extension("loss.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "step,loss,val_loss");
    let val_at = |step: &str| {
        let row = lines.iter().find(|l| l.split(',').next() == Some(step)).unwrap();
        row.split(',').nth(2).unwrap().parse::<f64>().ok()
    };
    assert!(val_at("0").is_some_and(|v| v > 0.0) && val_at("2").is_some() && val_at("4").is_some());
    assert!(val_at("1").is_none() && val_at("3").is_none(), "{csv}");
    let report = std::fs::read_to_string(with.with_extension("report.html")).unwrap();
    assert!(report.contains("validation loss (held-out images)"));
}

/// `--val-split`: the share is held out (named when training starts) and trains nothing — the
/// LoRA is byte for byte the one trained on the rest with the held-out images as --val-data.
#[test]
fn a_held_out_share_is_validation_data_taken_from_the_training_folder() {
    let f = common::data::Fixture::new(5);
    let (model, data) = (f.root.join("model"), f.root.join("data"));
    let split = f.root.join("split.safetensors");
    let err = sdlora_train(&model, &data, &split, &["--val-split", "0.4", "--val-every", "2"]);
    assert!(err.contains("3 images + 2 validation images"), "{err}");
    let line = err.lines().find(|l| l.starts_with("held out for validation (--val-split 0.4): ")).unwrap();
    let held: Vec<&str> = line.split(": ").nth(1).unwrap().split(", ").collect();
    assert_eq!(held.len(), 2, "{line}");
    // the same images laid out by hand: the rest in a `data` folder, the held-out ones in `val`
    let (rest, val) = (f.root.join("b/data"), f.root.join("b/val"));
    for d in [&rest, &val] {
        std::fs::create_dir_all(d).unwrap();
    }
    for e in std::fs::read_dir(&data).unwrap() {
        let p = e.unwrap().path();
        let Some(ext) = p.extension().filter(|e| *e == "png") else { continue };
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let to = if held.contains(&name.as_str()) { &val } else { &rest };
        std::fs::copy(&p, to.join(&name)).unwrap();
        let cap = p.with_extension("txt");
        std::fs::copy(&cap, to.join(&name).with_extension("txt")).unwrap();
        assert_eq!(ext, "png");
    }
    let by_hand = f.root.join("b/split.safetensors");
    sdlora_train(&model, &rest, &by_hand, &["--val-data", val.to_str().unwrap(), "--val-every", "2"]);
    assert!(
        std::fs::read(&split).unwrap() == std::fs::read(&by_hand).unwrap(),
        "the split trained otherwise"
    );
    let (a, b) = (
        std::fs::read_to_string(split.with_extension("loss.csv")).unwrap(),
        std::fs::read_to_string(by_hand.with_extension("loss.csv")).unwrap(),
    );
    assert!(a.starts_with("step,loss,val_loss") && a == b, "{a}\n{b}");
    // another seed holds out others
    let other =
        sdlora_train(&model, &data, &f.root.join("s2.safetensors"), &["--val-split", "0.4", "--seed", "7"]);
    assert!(!other.contains(line), "{other}");
}
