//! DoRA: the layer's backward against finite differences of its plain composition (the norm held
//! constant, as peft and the paper do), peft's DoRA on the tiny U-Net (tests/fixtures/sd1/dora/
//! from tools/fixtures/dora.py), file layouts, merging, and a whole training run.
use crate::common;
use crate::parity::{close, fixture, io, model, unet_reference_grads};
use candle_core::{DType, Device, Tensor};
use common::{dot, fd_check, randn, var};
use sdlora::lora::{attach, AdapterInfo, Init, LoraSpec};
use sdlora::model::layers::load::{conv, linear};
use sdlora::model::layers::{Grads, Visit};
use sdlora::model::unet::UNetInput;
use sdlora::model::weights::Weights;

const CPU: Device = Device::Cpu;

fn dora_spec(multiplier: f64) -> LoraSpec {
    LoraSpec {
        rank: 2,
        alpha: 3.0,
        multiplier,
        init: Init::Random,
        seed: 5,
        dtype: DType::F64,
        dropout: 0.0,
        dora: true,
        factored: None,
        switch: sdlora::model::layers::adapter::switch(),
    }
}

/// One random DoRA adapter on every layer of `m`, its magnitude moved off the weight's norm.
fn add_dora(m: &mut dyn Visit, strength: f64) -> AdapterInfo {
    let mut infos = attach(m, "", &|_, _| true, &dora_spec(strength), 0, &CPU).unwrap();
    assert_eq!(infos.len(), 1);
    let a = infos.remove(0);
    let mag = a.magnitude.as_ref().unwrap();
    let moved = (mag.as_tensor() * (randn(mag.dims(), 31) * 0.3).unwrap().affine(1.0, 1.0).unwrap()).unwrap();
    mag.set(&moved).unwrap();
    a
}

/// The layer as peft writes it: base(x) + k·((g − 1)·W⋆x + g·s·up⋆down⋆x), g = m / ‖W + s·up·down‖
/// with the norm of the factors at hand frozen (`norm`).
fn composed(
    op: &dyn Fn(&Tensor, &Tensor) -> Tensor,
    per_channel: &dyn Fn(&Tensor) -> Tensor,
    (w, bias_out): (&Tensor, &Tensor),
    a: &AdapterInfo,
    norm: &Tensor,
    (x, k): (&Tensor, f64),
) -> Tensor {
    let s = a.alpha / a.rank() as f64;
    let wx = op(x, w);
    let lora = op(&op(x, a.down.as_tensor()), a.up.as_tensor());
    let g = per_channel(&(a.magnitude.as_ref().unwrap().as_tensor() / norm).unwrap());
    let gm1 =
        per_channel(&(a.magnitude.as_ref().unwrap().as_tensor() / norm).unwrap().affine(1.0, -1.0).unwrap());
    let term = (wx.broadcast_mul(&gm1).unwrap() + (lora * s).unwrap().broadcast_mul(&g).unwrap()).unwrap();
    (wx.broadcast_add(bias_out).unwrap() + (term * k).unwrap()).unwrap()
}

/// ‖W + s·up·down‖ per output channel, from the factors' current values.
fn norms(w: &Tensor, a: &AdapterInfo) -> Tensor {
    let (o, r) = (w.dim(0).unwrap(), a.rank());
    let s = a.alpha / r as f64;
    let lw =
        a.up.as_tensor()
            .reshape((o, r))
            .unwrap()
            .matmul(&a.down.as_tensor().reshape((r, ())).unwrap())
            .unwrap();
    let sum = (w.reshape((o, ())).unwrap() + (lw * s).unwrap()).unwrap();
    sum.sqr().unwrap().sum(1).unwrap().sqrt().unwrap()
}

fn check(
    what: &str,
    a: &AdapterInfo,
    g: &Grads,
    (x, dx): (&candle_core::Var, &Tensor),
    loss: &dyn Fn() -> f64,
) {
    fd_check(&format!("{what} dx"), x, dx, loss, 20);
    let (dd, du) = g.get(a.id).unwrap();
    fd_check(&format!("{what} lora_down"), &a.down, dd, loss, 8);
    fd_check(&format!("{what} lora_up"), &a.up, du, loss, 8);
    let m = a.magnitude.as_ref().unwrap();
    fd_check(&format!("{what} magnitude"), m, &g.weights[&m.as_tensor().id()], loss, 8);
}

#[test]
fn dora_backward_matches_finite_differences_of_the_composition() {
    for strength in [1.0, 0.6] {
        // Linear
        let mut l = linear(&Weights::random(1, DType::F64, &CPU).pp("l"), 5, 6, true).unwrap();
        let a = add_dora(&mut l, strength);
        let x = var(&[2, 4, 5], 2);
        let r = randn(&[2, 4, 6], 3);
        let (y, s) = l.forward_train(&x).unwrap();
        let mut g = Grads::default();
        let dx = l.backward(s, &r, &mut g).unwrap();
        let norm = norms(&l.weight, &a);
        let bias = l.bias.clone().unwrap();
        let matmul = |x: &Tensor, w: &Tensor| x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let plain = |t: &Tensor| t.clone();
        let reference = || composed(&matmul, &plain, (&l.weight, &bias), &a, &norm, (&x, strength));
        close("linear dora forward", &y, &reference(), 1e-12);
        check(&format!("linear k={strength}"), &a, &g, (&x, &dx), &|| dot(&reference(), &r));

        // Conv2d 3×3 (LoCon) and 1×1
        for (k, pad) in [(3, 1), (1, 0)] {
            let mut c = conv(&Weights::random(7, DType::F64, &CPU).pp("c"), 3, 4, k, 1, pad).unwrap();
            let a = add_dora(&mut c, strength);
            let x = var(&[2, 3, 5, 5], 8);
            let (y, s) = c.forward_train(&x).unwrap();
            let r = randn(y.dims(), 9);
            let mut g = Grads::default();
            let dx = c.backward(s, &r, &mut g).unwrap();
            let w = c.weight.contiguous().unwrap();
            let norm = norms(&w, &a);
            let bias = c.bias.clone().unwrap().reshape((1, 4, 1, 1)).unwrap();
            let conv_op = move |x: &Tensor, w: &Tensor| {
                let p = if w.dim(2).unwrap() == 1 { 0 } else { pad };
                x.conv2d(w, p, 1, 1, 1).unwrap()
            };
            let channel = |t: &Tensor| t.reshape((1, (), 1, 1)).unwrap();
            let reference = || composed(&conv_op, &channel, (&w, &bias), &a, &norm, (&x, strength));
            close(&format!("conv{k} dora forward"), &y, &reference(), 1e-12);
            check(&format!("conv{k}x{k} k={strength}"), &a, &g, (&x, &dx), &|| dot(&reference(), &r));
        }
    }
}

/// peft's DoRA file (and its kohya/LyCORIS twin) give diffusers' U-Net output, and our gradients
/// of down, up and magnitude equal PyTorch's.
#[test]
fn dora_files_match_peft_output_and_gradients() {
    for (file, dtype, sfx, tol) in [
        ("dora_peft.safetensors", DType::F32, "", 1e-4),
        ("dora_peft.safetensors", DType::F64, "_f64", 1e-10),
        ("dora_kohya.safetensors", DType::F32, "", 1e-4),
    ] {
        let mut sd = model("sd1", dtype, true, false, false);
        let adapters =
            sdlora::lora::apply::apply_file(&mut sd, &fixture(&format!("sd1/dora/{file}")), 1.0, 0).unwrap();
        let t = io("sd1/dora/dora_io.safetensors");
        let gk = if sfx.is_empty() { "grad." } else { "grad_f64." };
        assert_eq!(
            3 * adapters.len(),
            t.keys().filter(|k| k.starts_with(gk)).count(),
            "every module attached"
        );
        assert!(adapters.iter().all(|(_, a)| a.magnitude.is_some()), "{file}: read as plain LoRA");
        let g = unet_reference_grads(file, &sd, &t, (dtype, sfx, tol));
        for (_, a) in &adapters {
            let (dd, du) = g.get(a.id).unwrap();
            let m = a.magnitude.as_ref().unwrap();
            let dm = &g.weights[&m.as_tensor().id()];
            for (what, got) in [("lora_A", dd), ("lora_B", du), ("lora_magnitude_vector", dm)] {
                let want = t[&format!("{gk}{}.{what}", a.path)].reshape(got.dims()).unwrap();
                close(&format!("{file} {} d {what}{sfx}", a.path), got, &want, tol);
            }
        }
    }
}

fn sdlora(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// name → (shape, bytes) of a safetensors file.
fn tensors(p: &std::path::Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<u8>)> {
    let data = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec()))).collect()
}

/// `convert` writes DoRA in the other layout with exactly the names and shapes peft and LyCORIS
/// write (the fixtures), back again without loss; `merge` bakes it in as the runtime adapter
/// computes it; `inspect` says it is DoRA.
#[test]
fn dora_converts_between_layouts_and_merges_as_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (kohya, peft) =
        (fixture("sd1/dora/dora_kohya.safetensors"), fixture("sd1/dora/dora_peft.safetensors"));
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let (to_peft, back) = (tmp.path().join("p.safetensors"), tmp.path().join("k.safetensors"));
    sdlora(&["convert", &s(&kohya), &s(&to_peft), "--to", "peft"]);
    sdlora(&["convert", &s(&to_peft), &s(&back), "--to", "kohya"]);
    let shapes = |p: &std::path::Path| {
        let mut v: Vec<(String, Vec<usize>)> = tensors(p).into_iter().map(|(k, (s, _))| (k, s)).collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&to_peft), shapes(&peft), "PEFT names or shapes differ from peft's own file");
    assert_eq!(shapes(&back), shapes(&kohya), "kohya names or shapes differ from LyCORIS's layout");
    assert!(tensors(&back) == tensors(&kohya), "kohya → peft → kohya changed values");
    let meta = sdlora::model::weights::read_metadata(&to_peft).unwrap();
    assert!(meta["lora_adapter_metadata"].contains("\"unet.use_dora\":true"), "{meta:?}");
    let text = sdlora(&["inspect", &s(&kohya)]);
    assert!(text.contains("DoRA modules (with a magnitude): 48"), "{text}");

    // merged at 0.7 == applied at 0.7
    let pipe = fixture("sd1/pipe");
    let merged = tmp.path().join("merged");
    sdlora(&[
        "merge",
        "--model",
        &s(&pipe),
        "--lora",
        &format!("{}:0.7", s(&kohya)),
        "--output",
        &s(&merged),
    ]);
    let t = io("sd1/unet_io.safetensors");
    let input = crate::common::unet_input(&t);
    let opts = sdlora::model::load::LoadOptions { vae: false, text_encoders: false, ..Default::default() };
    let m = sdlora::model::load::load(&s(&merged), &opts).unwrap();
    let got = m.unet.as_ref().unwrap().forward(&input).unwrap();
    let mut sd = sdlora::model::load::load(&s(&pipe), &opts).unwrap();
    let base = sd.unet.as_ref().unwrap().forward(&input).unwrap();
    sdlora::lora::apply::apply_file(&mut sd, &kohya, 0.7, 0).unwrap();
    let want = sd.unet.as_ref().unwrap().forward(&input).unwrap();
    assert!(crate::parity::rel_err(&want, &base) > 1e-3, "the DoRA changes nothing");
    close("merged vs applied DoRA at 0.7", &got, &want, 1e-4);
}

/// `train --adapter dora`: magnitudes train beside the pair, resume is exact, and the files (kohya
/// and PEFT) hold them and run as the trained adapters did.
#[test]
fn dora_trains_resumes_exactly_and_its_files_run_as_trained() {
    use sdlora::train::config::{AdapterKind, TrainArgs, TrainConfig};
    use sdlora::train::{setup, state, trainer};
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, data) = (tmp.path().join("model"), tmp.path().join("data"));
    common::data::tiny_model(&model_dir);
    common::data::tiny_dataset(&data, 4);
    let config = |out: &std::path::Path, steps: usize, format: &str| {
        let args = TrainArgs {
            model: Some(model_dir.display().to_string()),
            data: Some(data.clone()),
            output: Some(out.to_path_buf()),
            steps: Some(steps),
            batch_size: Some(2),
            rank: Some(2),
            lr: Some(3e-3),
            resolution: Some(32),
            adapter: Some(AdapterKind::Dora),
            targets: Some(sdlora::lora::targets::Preset::Full),
            save_dtype: Some(sdlora::model::Precision::F32),
            format: Some(if format == "peft" {
                sdlora::lora::format::LoraFormat::Peft
            } else {
                sdlora::lora::format::LoraFormat::Kohya
            }),
            ..Default::default()
        };
        TrainConfig::resolve(&args).unwrap()
    };
    let train = |cfg: &TrainConfig| {
        trainer::train(setup::setup(cfg, &mut |_, _, _| {}).unwrap(), cfg, &mut |_| {}).unwrap()
    };
    for d in ["a", "b"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    let straight = tmp.path().join("a/lora.safetensors");
    let s = train(&config(&straight, 8, "kohya"));
    assert!(s.losses.iter().all(|l| l.is_finite()) && s.eval_after < s.eval_before, "{:?}", s.losses);
    assert!(s.eval_before.is_some());
    let half = tmp.path().join("b/lora-half.safetensors");
    train(&config(&half, 4, "kohya"));
    let resumed = tmp.path().join("b/lora.safetensors");
    let mut cfg = config(&resumed, 8, "kohya");
    cfg.resume = Some(state::state_path(&half));
    train(&cfg);
    assert!(std::fs::read(&straight).unwrap() == std::fs::read(&resumed).unwrap(), "resumed DoRA differs");

    let names = tensors(&straight);
    let n_down = names.keys().filter(|k| k.ends_with(".lora_down.weight")).count();
    assert_eq!(names.keys().filter(|k| k.ends_with(".dora_scale")).count(), n_down);
    let meta = sdlora::model::weights::read_metadata(&straight).unwrap();
    assert_eq!(meta["ss_network_module"], "lycoris.kohya");
    assert!(meta["ss_network_args"].contains("\"dora_wd\":\"True\""), "{}", meta["ss_network_args"]);
    // the magnitudes moved: trained, not left at the weight's norms
    let st = candle_core::safetensors::load(state::state_path(&straight), &CPU).unwrap();
    let mut run =
        setup::setup(&config(&tmp.path().join("x.safetensors"), 1, "kohya"), &mut |_, _, _| {}).unwrap();
    let moved = run.adapters.iter().enumerate().any(|(i, (_, a))| {
        let m0 = a.magnitude.as_ref().unwrap().as_tensor();
        crate::parity::rel_err(&st[&format!("adapter.{i}.magnitude")], m0) > 1e-6
    });
    assert!(moved, "no magnitude trained");

    // the trained state loaded into the run, and each file applied to the bare model: same U-Net
    state::load(&state::state_path(&straight), &run.adapters, None, &mut run.opt, None).unwrap();
    let peft = tmp.path().join("a/lora_peft.safetensors");
    sdlora(&["convert", straight.to_str().unwrap(), peft.to_str().unwrap(), "--to", "peft"]);
    assert!(tensors(&peft).keys().any(|k| k.ends_with(".lora_magnitude_vector")));
    let x = randn(&[1, 4, 16, 16], 3).to_dtype(DType::F32).unwrap();
    let dim = run.sd.unet.as_ref().unwrap().config.cross_attention_dim;
    let ctx = randn(&[1, 77, dim], 4).to_dtype(DType::F32).unwrap();
    let ts = Tensor::new(&[500f32], &CPU).unwrap();
    let input = UNetInput {
        sample: &x,
        timestep: &ts,
        encoder_hidden_states: &ctx,
        text_embeds: None,
        time_ids: None,
    };
    let want = run.sd.unet.as_ref().unwrap().forward(&input).unwrap();
    for file in [&straight, &peft] {
        let opts =
            sdlora::model::load::LoadOptions { vae: false, text_encoders: false, ..Default::default() };
        let mut sd = sdlora::model::load::load(model_dir.to_str().unwrap(), &opts).unwrap();
        sdlora::lora::apply::apply_file(&mut sd, file, 1.0, 0).unwrap();
        close(
            &format!("{} vs the trained run", file.display()),
            &sd.unet.as_ref().unwrap().forward(&input).unwrap(),
            &want,
            1e-5,
        );
    }
}
