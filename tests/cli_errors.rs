//! Bad input gets one clear error line naming the file and the fix — never a panic — and
//! leaves no output behind.
use crate::common;
use common::data::{tiny_dataset, tiny_model, Fixture};
use std::path::Path;
use std::process::Command;

fn sdlora(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sdlora")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// Fails unless the run failed with exactly one `error:` line containing every `needle`.
fn expect_error(args: &[&str], needles: &[&str]) {
    let (ok, err) = sdlora(args);
    assert!(!ok, "succeeded: {args:?}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{}` lacks `{n}`", lines[0]);
    }
}

/// A PNG signature and an IHDR chunk claiming `w` × `h` RGB pixels, then one empty IDAT and IEND.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        c.extend_from_slice(&crc.sum().to_be_bytes());
        c
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]));
    png.extend(chunk(b"IEND", &[]));
    png
}

impl Fixture {
    fn p(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }
    fn train(&self, model: &str, data: &str, out: &str, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> =
            ["train", "--model", model, "--data", data, "--output", out, "--resolution", "32"]
                .map(String::from)
                .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        if !extra.contains(&"--steps") {
            v.extend(["--steps".to_string(), "2".to_string()]);
        }
        v
    }
}

fn run_train(f: &Fixture, model: &str, data: &str, out: &str, extra: &[&str], needles: &[&str]) {
    let args = f.train(model, data, out, extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_error(&refs, needles);
    assert!(!Path::new(out).exists(), "a failed run left {out}");
}

#[test]
fn bad_inputs_each_give_one_clear_line() {
    let f = Fixture::new(2);
    let out = f.p("out/lora.safetensors");
    std::fs::create_dir_all(f.p("out")).unwrap();
    let (model, data) = (f.p("model"), f.p("data"));

    expect_error(&["train", "--data", &data, "--output", &out], &["--model is required"]);
    run_train(&f, &f.p("nope"), &data, &out, &[], &["nope", "no such file or folder"]);
    std::fs::create_dir_all(f.p("empty")).unwrap();
    run_train(&f, &model, &f.p("empty"), &out, &[], &["empty", "no images found"]);

    // an unreadable image
    std::fs::create_dir_all(f.p("bad")).unwrap();
    std::fs::write(f.p("bad/x.png"), b"not a png at all").unwrap();
    run_train(&f, &model, &f.p("bad"), &out, &[], &["x.png", "unreadable image"]);

    // an image smaller than the smallest bucket
    std::fs::create_dir_all(f.p("small")).unwrap();
    image::RgbImage::from_pixel(4, 4, image::Rgb([9, 99, 199])).save(f.p("small/s.png")).unwrap();
    run_train(&f, &model, &f.p("small"), &out, &[], &["s.png", "smaller than the smallest bucket"]);

    // a "pixel flood": a PNG whose header claims 100000 × 100000 pixels is refused from its header
    std::fs::create_dir_all(f.p("flood")).unwrap();
    std::fs::write(f.p("flood/big.png"), png_claiming(100_000, 100_000)).unwrap();
    run_train(&f, &model, &f.p("flood"), &out, &[], &["big.png", "larger than 16384 px"]);

    // a caption without its image
    std::fs::create_dir_all(f.p("orphan")).unwrap();
    tiny_dataset(&f.root.join("orphan"), 1);
    std::fs::write(f.p("orphan/lonely.txt"), "a caption").unwrap();
    run_train(&f, &model, &f.p("orphan"), &out, &[], &["lonely.txt", "caption without an image"]);

    // a trigger word no caption has
    let no_word = ["--dop-trigger", "zebra"];
    run_train(&f, &model, &data, &out, &no_word, &["data: no caption has the word `zebra`", "--dop-trigger"]);

    // a timestep range past the scheduler's
    let late = ["--max-timestep", "1200"];
    run_train(
        &f,
        &model,
        &data,
        &out,
        &late,
        &["--max-timestep 1200", "its scheduler has 1000 training timesteps"],
    );

    // an output folder that cannot be made (a file stands in its way); a missing one is made
    let blocked = f.p("orphan/lonely.txt/x.safetensors");
    run_train(&f, &model, &data, &blocked, &[], &["x.safetensors", "cannot create its folder"]);

    // a non-finite loss (absurd learning rate): stops with advice, writes no LoRA
    run_train(
        &f,
        &model,
        &data,
        &out,
        &["--lr", "1e30", "--steps", "20", "--max-grad-norm", "0"],
        &["diverged", "--lr"],
    );
    let zero = ["train", "--model", &model, "--data", &data, "--output", &out, "--resolution", "0"];
    expect_error(&zero, &["--resolution 0", "at least 8"]);
    run_train(&f, &model, &data, &out, &["--alpha", "0"], &["--alpha 0", "positive alpha"]);
    // a LoRA given to --resume instead of its training state: the error points at the state
    let done = f.p("done/l.safetensors");
    let args = f.train(&model, &data, &done, &[]);
    assert!(sdlora(&args.iter().map(String::as_str).collect::<Vec<_>>()).0, "training the tiny model");
    let state = f.p("done/l.state.safetensors");
    run_train(&f, &model, &data, &out, &["--resume", &done], &["not an sdlora training state", &state]);
    // a LoRA holding NaN (a diverged run's file): refused with the tensor named
    let mut t = candle_core::safetensors::load(&done, &candle_core::Device::Cpu).unwrap();
    let key = t.keys().find(|k| k.ends_with("lora_up.weight")).unwrap().clone();
    let bad = (t[&key].clone() * f64::NAN).unwrap();
    t.insert(key.clone(), bad);
    let nan = f.p("done/nan.safetensors");
    candle_core::safetensors::save(&t, &nan).unwrap();
    expect_error(&["convert", &nan, &f.p("done/c.safetensors")], &["nan.safetensors", &key, "NaN"]);
    assert!(!Path::new(&f.p("done/c.safetensors")).exists());
    // a model whose weights hold NaN: named, instead of a black image or an unexplained divergence
    let broken = f.p("broken");
    tiny_model(Path::new(&broken));
    let unet_file = f.p("broken/unet/diffusion_pytorch_model.safetensors");
    let mut t = candle_core::safetensors::load(&unet_file, &candle_core::Device::Cpu).unwrap();
    t.insert("conv_in.bias".into(), (t["conv_in.bias"].clone() * f64::NAN).unwrap());
    candle_core::safetensors::save(&t, &unet_file).unwrap();
    let o = f.p("gen");
    let gen = ["generate", "--model", &broken, "--prompt", "x", "--steps", "1", "--out", &o];
    expect_error(
        &gen,
        &["diffusion_pytorch_model.safetensors: tensor `conv_in.bias` holds NaN", "download it again"],
    );
    assert!(std::fs::read_dir(&o).map_or(true, |mut d| d.next().is_none()), "an image was written");
    run_train(
        &f,
        &broken,
        &data,
        &out,
        &["--steps", "8"],
        &["training diverged", "`conv_in.bias` holds NaN"],
    );
    let toml = f.p("nan.toml");
    std::fs::write(&toml, "lr = nan\n").unwrap();
    expect_error(&["train", "--config", &toml], &["nan.toml", "lr must be a finite number"]);
    // serde would call a NaN "null, expected f64": the flag is named instead
    run_train(&f, &model, &data, &out, &["--sample-cfg", "nan"], &["--sample-cfg must be a finite number"]);
    run_train(
        &f,
        &model,
        &data,
        &out,
        &["--sample-lora-start", "2"],
        &["--sample-lora-start 2", "between 0 and 1"],
    );
    // optimizers: a misspelt setting lists the right ones; settings that cannot work together
    run_train(
        &f,
        &model,
        &data,
        &out,
        &["--optimizer", "prodigy", "--optimizer-args", "d_coeff=2"],
        &["--optimizer-args d_coeff", "d_coef"],
    );
    run_train(
        &f,
        &model,
        &data,
        &out,
        &["--optimizer", "prodigy", "--text-encoder-lr", "0.5"],
        &["--text-encoder-lr 0.5", "same value as --lr"],
    );
    run_train(
        &f,
        &model,
        &data,
        &out,
        &["--optimizer", "adafactor", "--lr", "1e-3", "--optimizer-args", "relative_step=true"],
        &["relative_step=true", "leave out --lr"],
    );
    run_train(&f, &model, &data, &out, &["--ema-decay", "1.5"], &["--ema-decay 1.5", "between 0 and 1"]);
}

#[test]
fn broken_models_name_the_file() {
    let f = Fixture::new(2);
    let out = f.p("lora.safetensors");
    let data = f.p("data");
    let weights = "unet/diffusion_pytorch_model.safetensors";

    // truncated weights
    copy_dir(&f.root.join("model"), &f.root.join("trunc"));
    let p = f.root.join("trunc").join(weights);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    run_train(&f, &f.p("trunc"), &data, &out, &[], &["diffusion_pytorch_model.safetensors", "truncated"]);

    // garbage header
    copy_dir(&f.root.join("model"), &f.root.join("corrupt"));
    std::fs::write(f.root.join("corrupt").join(weights), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!!!!!}")
        .unwrap();
    run_train(&f, &f.p("corrupt"), &data, &out, &[], &["diffusion_pytorch_model.safetensors", "corrupt"]);

    // config that does not match the weights
    copy_dir(&f.root.join("model"), &f.root.join("shape"));
    let cfg = f.root.join("shape/unet/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"cross_attention_dim\": 16", "\"cross_attention_dim\": 24");
    std::fs::write(&cfg, text).unwrap();
    run_train(
        &f,
        &f.p("shape"),
        &data,
        &out,
        &[],
        &["diffusion_pytorch_model.safetensors", "expected", "[16, 24]"],
    );

    // an architecture this tool does not implement
    copy_dir(&f.root.join("model"), &f.root.join("arch"));
    let cfg = f.root.join("arch/unet/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = if text.contains("\"class_embed_type\": null") {
        text.replace("\"class_embed_type\": null", "\"class_embed_type\": \"timestep\"")
    } else {
        text.replacen('{', "{\"class_embed_type\": \"timestep\",", 1)
    };
    std::fs::write(&cfg, text).unwrap();
    run_train(&f, &f.p("arch"), &data, &out, &[], &["class_embed_type", "not supported"]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

#[test]
fn demo_pretraining_from_a_folder_that_is_not_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nothing-here");
    let out = tmp.path().join("base");
    let (m, o) = (missing.display().to_string(), out.display().to_string());
    let args = [
        "demo-pretrain",
        "--out",
        &o,
        "--init",
        &m,
        "--vae-steps",
        "0",
        "--unet-steps",
        "1",
        "--images",
        "4",
    ];
    expect_error(&args, &["nothing-here", "--init"]);
    assert!(!out.exists(), "nothing written");
    expect_error(&["demo", "--concept", "hexagon"], &["--concept", "pink", "star"]);
    expect_error(&["bench"], &["nothing to do", "--write-model"]);
    let bench_data = tmp.path().join("bench").display().to_string();
    expect_error(&["bench", "--write-data", &bench_data, "--images", "0"], &["--images 0"]);
    expect_error(&["bench", "--case", "step"], &["--case step", "--model DIR"]);
    expect_error(
        &["bench", "--case", "step", "--model", &bench_data, "--resolution", "100"],
        &["--resolution 100"],
    );
    // numbers are checked before anything runs, under the demo's own flag names
    expect_error(&["demo-pretrain", "--out", &o, "--images", "0"], &["--images", "at least 1"]);
    expect_error(&["demo-pretrain", "--out", &o, "--lr", "nan"], &["--lr NaN", "positive"]);
    expect_error(&["demo-pretrain", "--out", &o, "--grow-attention"], &["--grow-attention", "--init"]);
    expect_error(
        &["demo-pretrain", "--out", &o, "--unknown-colours", "1.5"],
        &["--unknown-colours 1.5", "0 to 1"],
    );
    assert!(!out.exists(), "nothing written");
    let demo_out = tmp.path().join("demo").display().to_string();
    expect_error(&["demo", "--out", &demo_out, "--lora-batch", "0"], &["--lora-batch", "at least 1"]);
    expect_error(&["demo", "--out", &demo_out, "--steps", "0"], &["--steps", "at least 1"]);
    expect_error(&["demo", "--out", &demo_out, "--samples", "0"], &["--samples", "at least 1"]);
    expect_error(&["demo", "--out", &demo_out, "--cfg", "-1"], &["--cfg -1", "1 (no guidance) or more"]);
    expect_error(
        &["demo", "--out", &demo_out, "--lora-start", "-0.1"],
        &["--lora-start -0.1", "between 0 and 1"],
    );
    expect_error(&["demo", "--out", &demo_out, "--text-encoder-lr", "inf"], &["--text-encoder-lr inf"]);
    expect_error(&["demo", "--out", &demo_out, "--dop-weight", "-1"], &["--dop-weight -1", "0 or more"]);
    expect_error(&["demo", "--out", &demo_out, "--prior-loss-weight", "nan"], &["--prior-loss-weight NaN"]);
    expect_error(&["demo", "--out", &demo_out, "--reg", "0", "--prior-loss-weight", "2"], &["--reg above 0"]);
    expect_error(&["demo", "--out", &demo_out, "--dop-class", "striped"], &["--dop-class", "weight above 0"]);
    expect_error(&["demo", "--out", &demo_out, "--max-timestep", "0"], &["--max-timestep 0", "1 to 1000"]);
    expect_error(&["demo", "--out", &demo_out, "--embedding-lr", "-1"], &["--embedding-lr -1", "0 or more"]);
    let no_embedding = ["demo", "--out", &demo_out, "--init-word", "none", "--embedding-lr", "1e-3"];
    expect_error(&no_embedding, &["--embedding-lr", "--init-word WORD"]);
    assert!(!tmp.path().join("demo").exists(), "nothing written");
}

/// A reader that closes early (`sdlora inspect x | head`) ends the command quietly, as it ends
/// Unix tools: no panic about a broken pipe.
#[cfg(unix)]
#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    let lora = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1/lora/lora_kohya.safetensors");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_sdlora"))
        .args(["inspect", &lora.display().to_string()])
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert!(err.trim().is_empty(), "{err}");
}
