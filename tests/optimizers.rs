//! `--optimizer prodigy|adafactor` and `--ema-decay` against their references (prodigyopt,
//! transformers' Adafactor, diffusers' EMAModel; tests/fixtures/optimizers/ from
//! tools/fixtures/optimizers.py), and through whole training runs: resume byte-identical, the
//! average saved as the LoRA, the settings in the file's metadata.
use crate::common;
use candle_core::{Device, Tensor, Var};
use common::data::{tiny_dataset, tiny_model};
use sdlora::train::config::{TrainArgs, TrainConfig};
use sdlora::train::ema::Ema;
use sdlora::train::optimizer::{Optimizer, OptimizerKind};
use sdlora::train::{setup, state, trainer};
use std::collections::{HashMap, HashSet};
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/optimizers");

/// The reference's keyword arguments as `--optimizer-args` (lr and the EMA's aside).
fn optimizer_args(kwargs: &serde_json::Value) -> Vec<String> {
    let mut out = vec![];
    for (k, v) in kwargs.as_object().unwrap() {
        let v = match v {
            _ if k == "lr" || k == "ema" => continue,
            serde_json::Value::Array(a) => a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
            serde_json::Value::Null => "None".into(),
            other => other.to_string(),
        };
        out.push(format!("{k}={v}"));
    }
    out
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

#[test]
fn each_optimizer_and_the_ema_match_their_reference_step_by_step() {
    let mut cases: Vec<_> = std::fs::read_dir(FIXTURES).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert_eq!(cases.len(), 9, "{cases:?}");
    for path in cases {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let data = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&data).unwrap();
        let kwargs: serde_json::Value =
            serde_json::from_str(&meta.metadata().as_ref().unwrap()["kwargs"]).unwrap();
        let t: HashMap<String, Tensor> = candle_core::safetensors::load_buffer(&data, &Device::Cpu).unwrap();
        let kind = match name.split('_').next().unwrap() {
            "prodigy" => OptimizerKind::Prodigy,
            "adafactor" => OptimizerKind::Adafactor,
            _ => OptimizerKind::Adamw,
        };
        let settings = kind.settings(&optimizer_args(&kwargs)).unwrap();
        let n = (0..).take_while(|i| t.contains_key(&format!("p.{i}"))).count();
        let params: Vec<Var> = (0..n).map(|i| Var::from_tensor(&t[&format!("p.{i}")]).unwrap()).collect();
        let mut opt = Optimizer::new(&settings, &params).unwrap();
        let mut ema = kwargs.get("ema").map(|e| {
            let start = e.get("update_after_step").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
            Ema::new(&params, e["decay"].as_f64().unwrap(), start).unwrap()
        });
        let lrs = values(&t["lr"]);
        let mut worst = 0f64;
        for s in 1..=lrs.len() {
            let grads: Vec<Tensor> = (0..n).map(|i| t[&format!("g.{s}.{i}")].clone()).collect();
            // 0: the reference sets its own step size (Adafactor's relative step)
            let lr = if lrs[s - 1] == 0.0 { 1.0 } else { lrs[s - 1] };
            opt.step(&params, &grads, &vec![lr; n]).unwrap();
            if let Some(e) = &mut ema {
                e.update(&params).unwrap();
            }
            for (i, p) in params.iter().enumerate() {
                let mut pairs = vec![(values(p.as_tensor()), values(&t[&format!("after.{s}.{i}")]))];
                if let Some(e) = &ema {
                    pairs.push((values(&e.shadow[i]), values(&t[&format!("ema.{s}.{i}")])));
                }
                let start = values(&t[&format!("p.{i}")]);
                for (got, want) in pairs {
                    // relative to how far the reference moved: some settings move by 1e-6 a step
                    let moved = want.iter().zip(&start).map(|(w, p0)| (w - p0).abs()).fold(0.0, f64::max);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(g.is_finite(), "{name} step {s} param {i}: {g}");
                        let err = (g - w).abs() / moved.max(1e-300);
                        worst = worst.max(err);
                        assert!(err <= 1e-6, "{name} step {s} param {i}: {g} vs {w} (moved {moved:e})");
                    }
                }
            }
            if let Some(d) = t.get("d") {
                let (got, want) = (opt.prodigy_d().unwrap(), values(d)[s - 1]);
                assert!((got - want).abs() <= 1e-6 * want, "{name} step {s}: d {got} vs {want}");
            }
        }
        // the parameters moved: a reference that did nothing would pass too
        let moved = (0..n).any(|i| values(params[i].as_tensor()) != values(&t[&format!("p.{i}")]));
        assert!(moved, "{name}: no parameter moved");
        eprintln!("{name}: worst error {worst:.1e} of the reference's move over 10 steps");
    }
}

#[test]
fn optimizer_args_name_what_is_wrong() {
    let err = |kind: OptimizerKind, a: &[&str]| {
        let args: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        kind.settings(&args).unwrap_err().to_string()
    };
    let e = err(OptimizerKind::Prodigy, &["d_coeff=2"]);
    assert!(e.contains("d_coeff") && e.contains("d_coef") && e.contains("prodigy"), "{e}");
    let e = err(OptimizerKind::Adafactor, &["warmup_init=true"]);
    assert!(e.contains("relative_step=true"), "{e}");
    let e = err(OptimizerKind::Adamw, &["betas=0.9"]);
    assert!(e.contains("two numbers"), "{e}");
    let e = err(OptimizerKind::Prodigy, &["decouple=yes"]);
    assert!(e.contains("true or false"), "{e}");
    assert!(err(OptimizerKind::Adamw, &["weight_decay"]).contains("KEY=VALUE"));
    // Python's spellings read as kohya users write them
    let ok =
        OptimizerKind::Prodigy.settings(&["betas=(0.9,0.99) beta3=None use_bias_correction=True".into()]);
    assert!(ok.is_ok(), "{ok:?}");
}

fn config(model: &Path, data: &Path, out: &Path, steps: usize, extra: &[(&str, &str)]) -> TrainConfig {
    let mut args = TrainArgs {
        model: Some(model.display().to_string()),
        data: Some(data.to_path_buf()),
        output: Some(out.to_path_buf()),
        steps: Some(steps),
        batch_size: Some(2),
        rank: Some(2),
        resolution: Some(32),
        save_dtype: Some(sdlora::model::Precision::F32),
        ..Default::default()
    };
    for (k, v) in extra {
        match *k {
            "optimizer" => {
                args.optimizer =
                    Some(if *v == "prodigy" { OptimizerKind::Prodigy } else { OptimizerKind::Adafactor })
            }
            "optimizer_args" => args.optimizer_args = Some(v.split(' ').map(String::from).collect()),
            "ema_decay" => args.ema_decay = Some(v.parse().unwrap()),
            "lr" => args.lr = Some(v.parse().unwrap()),
            _ => unreachable!("{k}"),
        }
    }
    TrainConfig::resolve(&args).unwrap()
}

fn train(cfg: &TrainConfig) -> trainer::Summary {
    trainer::train(setup::setup(cfg, &mut |_, _, _| {}).unwrap(), cfg, &mut |_| {}).unwrap()
}

/// The adapter tensors of a LoRA file, as byte strings.
fn lora_tensors(p: &Path) -> HashSet<Vec<u8>> {
    let t = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    t.iter()
        .filter(|(k, _)| k.ends_with("lora_down.weight") || k.ends_with("lora_up.weight"))
        .map(|(_, v)| {
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect()
        })
        .collect()
}

/// Tensors of a training state whose names start with `prefix`, as byte strings.
fn state_tensors(p: &Path, prefix: &str) -> HashSet<Vec<u8>> {
    let t = candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    t.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| {
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()).collect()
        })
        .collect()
}

#[test]
fn prodigy_adafactor_and_ema_train_resume_exactly_and_save_the_average() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 4);
    let runs: [(&str, &[(&str, &str)]); 3] = [
        ("prodigy", &[("optimizer", "prodigy"), ("optimizer_args", "d_coef=2 use_bias_correction=true")]),
        (
            "adafactor",
            &[("optimizer", "adafactor"), ("optimizer_args", "relative_step=true scale_parameter=true")],
        ),
        ("ema", &[("ema_decay", "0.8"), ("lr", "3e-3")]),
    ];
    for (name, extra) in runs {
        let dir = tmp.path().join(name);
        for d in ["a", "b"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        // 8 steps straight == 4 steps, then --resume for 4 more
        let straight = dir.join("a/lora.safetensors");
        let s = train(&config(&model, &data, &straight, 8, extra));
        assert!(s.losses.iter().all(|l| l.is_finite()), "{name}: {:?}", s.losses);
        let half = dir.join("b/lora-half.safetensors");
        train(&config(&model, &data, &half, 4, extra));
        let resumed = dir.join("b/lora.safetensors");
        let mut cfg = config(&model, &data, &resumed, 8, extra);
        cfg.resume = Some(state::state_path(&half));
        train(&cfg);
        let (a, b) = (std::fs::read(&straight).unwrap(), std::fs::read(&resumed).unwrap());
        assert!(a == b, "{name}: the resumed LoRA differs from the uninterrupted one");
        assert!(a != std::fs::read(&half).unwrap(), "{name}: 4 more steps changed nothing");
        let meta = sdlora::model::weights::read_metadata(&straight).unwrap();
        let (st, raw) =
            (state::state_path(&straight), state_tensors(&state::state_path(&straight), "adapter."));
        let file = lora_tensors(&straight);
        match name {
            "prodigy" => {
                let want = "prodigyopt.prodigy.Prodigy(d_coef=2,use_bias_correction=true)";
                assert_eq!(meta["ss_optimizer"], want);
                // learning-rate free: --lr left out is Prodigy's 1.0
                assert_eq!(meta["ss_learning_rate"], "1");
                assert_eq!(file, raw, "without --ema-decay the LoRA is the trained weights");
            }
            "adafactor" => assert!(meta["ss_optimizer"].starts_with("transformers.optimization.Adafactor(")),
            _ => {
                assert_eq!(meta["ss_optimizer"], "torch.optim.adamw.AdamW");
                assert!(meta["sdlora_ema"].contains("0.8"), "{:?}", meta.get("sdlora_ema"));
                // the file holds the average; the state keeps the raw weights and the average
                assert_eq!(file, state_tensors(&st, "ema."), "the LoRA is not the average");
                assert!(
                    file.is_disjoint(&raw.iter().filter(|r| r.iter().any(|b| *b != 0)).cloned().collect())
                );
            }
        }
        // 4 images, batch 2: 2 micro-batches an epoch, 8 steps = 4 epochs
        assert_eq!((meta["ss_epoch"].as_str(), meta["ss_num_epochs"].as_str()), ("4", "4"));
    }
    // a state of one optimizer does not resume another
    let mut cfg = config(&model, &data, &tmp.path().join("x.safetensors"), 8, &[]);
    cfg.resume = Some(state::state_path(&tmp.path().join("prodigy/b/lora-half.safetensors")));
    let e = trainer::train(setup::setup(&cfg, &mut |_, _, _| {}).unwrap(), &cfg, &mut |_| {}).err().unwrap();
    assert!(e.to_string().contains("resume with --optimizer prodigy"), "{e}");
}
