//! `sdlora train` end to end on a tiny random model: the loss falls, resume is exact, the file
//! reads back as the adapters that were trained.
use crate::common;
use common::data::{tiny_dataset, tiny_model};
use sdlora::train::config::{TrainArgs, TrainConfig};
use sdlora::train::{setup, trainer};
use std::path::Path;

fn config(model: &Path, data: &Path, out: &Path, steps: usize) -> TrainConfig {
    let args = TrainArgs {
        model: Some(model.display().to_string()),
        data: Some(data.to_path_buf()),
        output: Some(out.to_path_buf()),
        steps: Some(steps),
        batch_size: Some(2),
        rank: Some(4),
        lr: Some(3e-3),
        resolution: Some(32),
        ..Default::default()
    };
    TrainConfig::resolve(&args).unwrap()
}

fn train(cfg: &TrainConfig) -> trainer::Summary {
    let run = setup::setup(cfg, &mut |_, _, _| {}).unwrap();
    trainer::train(run, cfg, &mut |_| {}).unwrap()
}

#[test]
fn loss_falls_and_resume_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 4);

    // memorising 4 images: the fixed-seed evaluation loss falls well below its start
    let s = train(&config(&model, &data, &tmp.path().join("long.safetensors"), 80));
    let (before, after) = s.eval_before.zip(s.eval_after).unwrap();
    assert!(after < 0.8 * before, "eval loss {before} → {after}");
    assert!(s.losses.iter().all(|l| l.is_finite()));

    // 20 steps straight == 10 steps, then --resume for 10 more
    // (same file name in two folders: the name is part of the metadata)
    for d in ["a", "b"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    let straight = tmp.path().join("a/lora.safetensors");
    train(&config(&model, &data, &straight, 20));
    let half = tmp.path().join("b/lora-half.safetensors");
    train(&config(&model, &data, &half, 10));
    let resumed = tmp.path().join("b/lora.safetensors");
    let mut cfg = config(&model, &data, &resumed, 20);
    cfg.resume = Some(sdlora::train::state::state_path(&half));
    train(&cfg);
    let (a, b) = (std::fs::read(&straight).unwrap(), std::fs::read(&resumed).unwrap());
    assert!(a == b, "resumed LoRA differs from the uninterrupted one");
    let c = std::fs::read(&half).unwrap();
    assert!(a != c, "10 more steps changed nothing");
}

/// The loop reports every step and every forward of the fixed-seed loss before and after (a
/// full-size forward takes seconds: the progress bar shows them), and the evaluation's loss is
/// the training loss of the same draw without its backward.
#[test]
fn progress_reports_steps_and_each_evaluation_forward() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 4);
    let cfg = config(&model, &data, &tmp.path().join("lora.safetensors"), 3);
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    let (a, b) = (
        trainer::loss_of(&run, &cfg, &[1], 7).unwrap(),
        trainer::train_loss_of(&run, &cfg, &[1], 7).unwrap(),
    );
    assert!(a.is_finite() && a > 0.0 && (a - b).abs() <= 1e-6 * b, "evaluate {a} vs train {b}");
    let mut events = vec![];
    trainer::train(run, &cfg, &mut |p| {
        events.push(match p {
            trainer::Progress::Step { step, .. } => format!("step {step}"),
            trainer::Progress::Evaluating { done, total } => format!("eval {done}/{total}"),
        })
    })
    .unwrap();
    let evals: Vec<String> = (0..=8).map(|i| format!("eval {i}/8")).collect();
    let steps: Vec<String> = (1..=3).map(|i| format!("step {i}")).collect();
    assert_eq!(events, [evals.clone(), steps.clone(), evals].concat());

    // --eval-samples 0: no evaluation forwards at all (a full-size run's fixed cost), 1: two
    let mut n_evals = vec![];
    for n in [0, 1] {
        let cfg = TrainConfig { eval_samples: n, ..cfg.clone() };
        let mut events = vec![];
        let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
        let s = trainer::train(run, &cfg, &mut |p| {
            if let trainer::Progress::Evaluating { done, .. } = p {
                events.push(done);
            }
        })
        .unwrap();
        assert_eq!(s.eval_before.is_some(), n > 0);
        n_evals.push(events.iter().filter(|&&d| d > 0).count());
    }
    assert_eq!(n_evals, [0, 4], "forwards before and after");
}
