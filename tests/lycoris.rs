//! LyCORIS LoHa and LoKr (tests/fixtures/sd1/lycoris/ from tools/fixtures/lycoris.py: peft's
//! modules in LyCORIS's kohya names): merged or as adapters they give peft's output and
//! gradients; `merge` bakes them in alike; `convert` refuses them by name; the layers' backward
//! against finite differences; a whole training run of each.
use crate::common::{self, dot, fd_check, randn, var};
use crate::parity::{close, fixture, io, model, unet_reference_grads};
use candle_core::{DType, Device};
use sdlora::lora::factors::FactorSpec;
use sdlora::lora::{attach, AdapterInfo, Init, LoraSpec};
use sdlora::model::layers::load::{conv, linear};
use sdlora::model::layers::lycoris::FactorKind;
use sdlora::model::layers::{Grads, Visit};
use sdlora::model::load::{load, LoadOptions};
use sdlora::model::weights::Weights;

fn sdlora(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn loha_and_lokr_files_give_peft_output_applied_and_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let pipe = fixture("sd1/pipe");
    let opts = LoadOptions { vae: false, text_encoders: false, ..Default::default() };
    for kind in ["loha", "lokr"] {
        let file = fixture(&format!("sd1/lycoris/{kind}.safetensors"));
        let t = io(&format!("sd1/lycoris/{kind}_io.safetensors"));
        let input = crate::common::unet_input(&t);
        let mut sd = load(pipe.to_str().unwrap(), &opts).unwrap();
        let applied = sdlora::lora::apply::apply(&mut sd, &file, 1.0, 0, true).unwrap();
        assert_eq!((applied.adapters.len(), applied.merged), (0, 52), "{kind}");
        close(
            &format!("{kind} applied"),
            &sd.unet.as_ref().unwrap().forward(&input).unwrap(),
            &t["out"],
            1e-4,
        );

        // merged at 0.6 == applied at 0.6
        let mut sd = load(pipe.to_str().unwrap(), &opts).unwrap();
        sdlora::lora::apply::apply(&mut sd, &file, 0.6, 0, true).unwrap();
        let want = sd.unet.as_ref().unwrap().forward(&input).unwrap();
        let out = tmp.path().join(kind);
        let arg = format!("{}:0.6", file.display());
        let (ok, err) = sdlora(&[
            "merge",
            "--model",
            pipe.to_str().unwrap(),
            "--lora",
            &arg,
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let m = load(out.to_str().unwrap(), &opts).unwrap();
        close(
            &format!("{kind} merged at 0.6"),
            &m.unet.as_ref().unwrap().forward(&input).unwrap(),
            &want,
            1e-5,
        );

        // what cannot take them says so
        let f = file.to_str().unwrap();
        let (ok, err) = sdlora(&["convert", f, tmp.path().join("c.safetensors").to_str().unwrap()]);
        assert!(!ok && err.contains("LyCORIS") && err.contains("convert"), "{err}");
        // joining late, they run as adapters
        let gen = tmp.path().join("gen");
        let lora = format!("{f}:1");
        let args =
            ["generate", "--model", pipe.to_str().unwrap(), "--prompt", "x", "--steps", "2", "--lora", &lora];
        let (ok, err) =
            sdlora(&[&args[..], &["--lora-start", "0.5", "--out", gen.to_str().unwrap()]].concat());
        assert!(ok, "{err}");
    }
}

/// As adapters (not merged), the files give peft's output and the factors peft's gradients.
#[test]
fn loha_and_lokr_adapters_match_peft_gradients() {
    for (kind, dtype, sfx, tol) in [
        ("loha", DType::F32, "", 1e-4),
        ("loha", DType::F64, "_f64", 1e-10),
        ("lokr", DType::F32, "", 1e-4),
        ("lokr", DType::F64, "_f64", 1e-10),
    ] {
        let mut sd = model("sd1", dtype, true, false, false);
        let file = fixture(&format!("sd1/lycoris/{kind}.safetensors"));
        let applied = sdlora::lora::apply::apply(&mut sd, &file, 1.0, 0, false).unwrap();
        assert_eq!((applied.adapters.len(), applied.merged), (52, 0));
        let t = io(&format!("sd1/lycoris/{kind}_io.safetensors"));
        let g = unet_reference_grads(kind, &sd, &t, (dtype, sfx, tol));
        let gk = if sfx.is_empty() { "grad." } else { "grad_f64." };
        let mut n = 0;
        for (_, a) in &applied.adapters {
            for ((name, v), got) in a.params().iter().zip(a.grads(&g).unwrap()) {
                let want = t[&format!("{gk}{}.{name}", a.path)].reshape(v.dims()).unwrap();
                close(&format!("{kind} {} d {name}{sfx}", a.path), &got, &want, tol);
                n += 1;
            }
        }
        assert_eq!(n, t.keys().filter(|k| k.starts_with(gk)).count(), "every factor compared");
    }
}

fn spec(kind: FactorKind, decompose_both: bool) -> LoraSpec {
    LoraSpec {
        rank: 2,
        alpha: 3.0,
        multiplier: 0.7,
        init: Init::Random,
        seed: 5,
        dtype: DType::F64,
        dropout: 0.0,
        dora: false,
        factored: Some(FactorSpec { kind, factor: -1, decompose_both, full_matrix: false }),
        switch: sdlora::model::layers::adapter::switch(),
    }
}

/// One adapter on `m`, every factor random (LyCORIS starts one at zero, which would hide the
/// other's gradient).
fn add(m: &mut dyn Visit, kind: FactorKind, decompose_both: bool) -> AdapterInfo {
    let mut infos = attach(m, "", &|_, _| true, &spec(kind, decompose_both), 0, &Device::Cpu).unwrap();
    let a = infos.remove(0);
    for (i, (_, v)) in a.params().into_iter().enumerate() {
        v.set(&(randn(v.dims(), 40 + i as u64) * 0.5).unwrap()).unwrap();
    }
    a
}

fn check(what: &str, a: &AdapterInfo, g: &Grads, loss: &dyn Fn() -> f64) {
    for ((name, v), d) in a.params().iter().zip(a.grads(g).unwrap()) {
        fd_check(&format!("{what} {name}"), v, &d, loss, 8);
    }
}

#[test]
fn loha_and_lokr_backward_match_finite_differences() {
    // 12 → LoKr factors 3·4 (in) and 16 → 4·4 (out); decompose_both at rank 2 splits both sides
    for (kind, both) in [(FactorKind::Hada, false), (FactorKind::Kron, false), (FactorKind::Kron, true)] {
        let mut l = linear(&Weights::random(1, DType::F64, &Device::Cpu).pp("l"), 12, 16, true).unwrap();
        let a = add(&mut l, kind, both);
        let x = var(&[2, 3, 12], 2);
        let r = randn(&[2, 3, 16], 3);
        let (_, s) = l.forward_train(&x).unwrap();
        let mut g = Grads::default();
        let dx = l.backward(s, &r, &mut g).unwrap();
        let loss = || dot(&l.forward(&x).unwrap(), &r);
        fd_check(&format!("{kind:?} linear dx"), &x, &dx, &loss, 20);
        check(&format!("{kind:?}/{both} linear"), &a, &g, &loss);
        for (k, pad) in [(3, 1), (1, 0)] {
            let mut c = conv(&Weights::random(7, DType::F64, &Device::Cpu).pp("c"), 4, 8, k, 1, pad).unwrap();
            let a = add(&mut c, kind, both);
            let x = var(&[2, 4, 5, 5], 8);
            let (y, s) = c.forward_train(&x).unwrap();
            let r = randn(y.dims(), 9);
            let mut g = Grads::default();
            let dx = c.backward(s, &r, &mut g).unwrap();
            let loss = || dot(&c.forward(&x).unwrap(), &r);
            fd_check(&format!("{kind:?} conv{k} dx"), &x, &dx, &loss, 20);
            check(&format!("{kind:?}/{both} conv{k}x{k}"), &a, &g, &loss);
        }
    }
}

/// `train --adapter loha|lokr`: resume is exact, and the file, merged into the bare model, runs
/// as the trained adapters did.
#[test]
fn loha_and_lokr_train_resume_exactly_and_their_files_run_as_trained() {
    use sdlora::train::config::{AdapterKind, TrainArgs, TrainConfig};
    use sdlora::train::{setup, state, trainer};
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, data) = (tmp.path().join("model"), tmp.path().join("data"));
    common::data::tiny_model(&model_dir);
    common::data::tiny_dataset(&data, 4);
    for kind in [AdapterKind::Loha, AdapterKind::Lokr] {
        let config = |out: &std::path::Path, steps: usize| {
            let args = TrainArgs {
                model: Some(model_dir.display().to_string()),
                data: Some(data.clone()),
                output: Some(out.to_path_buf()),
                steps: Some(steps),
                batch_size: Some(2),
                rank: Some(2),
                lr: Some(3e-3),
                resolution: Some(32),
                adapter: Some(kind),
                lokr_decompose_both: (kind == AdapterKind::Lokr).then_some(true),
                targets: Some(sdlora::lora::targets::Preset::Full),
                save_dtype: Some(sdlora::model::Precision::F32),
                ..Default::default()
            };
            TrainConfig::resolve(&args).unwrap()
        };
        let train = |cfg: &TrainConfig| {
            trainer::train(setup::setup(cfg, &mut |_, _, _| {}).unwrap(), cfg, &mut |_| {}).unwrap()
        };
        let dir = tmp.path().join(kind.name());
        for d in ["a", "b"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        let straight = dir.join("a/lora.safetensors");
        let s = train(&config(&straight, 8));
        assert!(s.eval_after < s.eval_before, "{kind:?} learned nothing: {:?}", s.losses);
        let half = dir.join("b/lora-half.safetensors");
        train(&config(&half, 4));
        let mut cfg = config(&dir.join("b/lora.safetensors"), 8);
        cfg.resume = Some(state::state_path(&half));
        train(&cfg);
        let resumed = std::fs::read(dir.join("b/lora.safetensors")).unwrap();
        assert!(std::fs::read(&straight).unwrap() == resumed, "{kind:?}: resumed differs");
        let meta = sdlora::model::weights::read_metadata(&straight).unwrap();
        assert_eq!(meta["ss_network_module"], "lycoris.kohya");
        assert!(meta["ss_network_args"].contains(&format!("\"algo\":\"{}\"", kind.name())));

        let mut run = setup::setup(&config(&dir.join("x.safetensors"), 1), &mut |_, _, _| {}).unwrap();
        state::load(&state::state_path(&straight), &run.adapters, None, &mut run.opt, None).unwrap();
        let x = randn(&[1, 4, 16, 16], 3).to_dtype(DType::F32).unwrap();
        let dim = run.sd.unet.as_ref().unwrap().config.cross_attention_dim;
        let ctx = randn(&[1, 77, dim], 4).to_dtype(DType::F32).unwrap();
        let ts = candle_core::Tensor::new(&[500f32], &Device::Cpu).unwrap();
        let input = sdlora::model::unet::UNetInput {
            sample: &x,
            timestep: &ts,
            encoder_hidden_states: &ctx,
            text_embeds: None,
            time_ids: None,
        };
        let want = run.sd.unet.as_ref().unwrap().forward(&input).unwrap();
        let opts = LoadOptions { vae: false, text_encoders: false, ..Default::default() };
        let mut sd = load(model_dir.to_str().unwrap(), &opts).unwrap();
        let applied = sdlora::lora::apply::apply(&mut sd, &straight, 1.0, 0, true).unwrap();
        assert!(applied.merged > 0 && applied.adapters.is_empty());
        let got = sd.unet.as_ref().unwrap().forward(&input).unwrap();
        close(&format!("{kind:?} file vs the trained run"), &got, &want, 1e-5);
    }
}

/// name → shape of a safetensors file's tensors.
fn shapes(p: &std::path::Path) -> std::collections::BTreeMap<String, Vec<usize>> {
    let data = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&data).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, v.shape().to_vec())).collect()
}

/// What `train --adapter loha|lokr` writes has LyCORIS's names and, at the fixture's settings,
/// peft's (= LyCORIS's) factor shapes for every module both adapt, and nothing else.
#[test]
fn trained_loha_and_lokr_files_have_lycoris_names_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::data::tiny_dataset(&data, 2);
    let pipe = fixture("sd1/pipe");
    for (kind, extra) in
        [("loha", &["--rank", "2"][..]), ("lokr", &["--rank", "1", "--lokr-decompose-both"][..])]
    {
        let out = tmp.path().join(format!("{kind}.safetensors"));
        let mut args = vec!["train", "--model", pipe.to_str().unwrap(), "--data", data.to_str().unwrap()];
        args.extend(["--output", out.to_str().unwrap(), "--adapter", kind, "--targets", "full"]);
        args.extend(["--steps", "1", "--resolution", "32", "--eval-samples", "0"]);
        args.extend(extra);
        let (ok, err) = sdlora(&args);
        assert!(ok, "{err}");
        let (ours, theirs) = (shapes(&out), shapes(&fixture(&format!("sd1/lycoris/{kind}.safetensors"))));
        let module = |k: &str| k.rsplit_once('.').unwrap().0.to_string();
        let shared: std::collections::BTreeSet<String> =
            theirs.keys().map(|k| module(k)).filter(|m| ours.keys().any(|k| module(k) == *m)).collect();
        assert!(shared.len() >= 40, "{kind}: only {} modules in common", shared.len());
        for m in &shared {
            let pick = |s: &std::collections::BTreeMap<String, Vec<usize>>| -> Vec<(String, Vec<usize>)> {
                s.iter().filter(|(k, _)| module(k) == *m).map(|(k, v)| (k.clone(), v.clone())).collect()
            };
            let (a, b) = (pick(&ours), pick(&theirs));
            // LyCORIS keeps a LoKr's whole 1×1 w2 4-D, peft too; alpha is a scalar in both
            assert_eq!(a, b, "{kind} {m}");
        }
        let parts = ["alpha", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a"];
        let more = ["lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"];
        assert!(ours.keys().all(|k| {
            let p = k.rsplit_once('.').unwrap().1;
            k.starts_with("lora_unet_") && (parts.contains(&p) || more.contains(&p))
        }));
    }
}
