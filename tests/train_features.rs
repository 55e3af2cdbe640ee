//! Training options end to end on tiny random models: config files, the latent cache,
//! text-encoder LoRA, SDXL, and every augmentation/schedule option together.
use crate::common;
use common::data::{tensor_names, tiny_dataset, tiny_model, train_args};
use sdlora::train::config::{TrainArgs, TrainConfig};
use sdlora::train::{setup, trainer};

#[test]
fn config_file_flags_override_and_unknown_keys_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let toml = tmp.path().join("train.toml");
    std::fs::write(
        &toml,
        "model = \"m\"\ndata = \"d\"\noutput = \"o.safetensors\"\nsteps = 7\nrank = 3\nflip = true\n",
    )
    .unwrap();
    let a = TrainArgs { config: Some(toml.clone()), rank: Some(5), ..Default::default() };
    let c = TrainConfig::resolve(&a).unwrap();
    assert_eq!((c.steps, c.rank, c.flip, c.alpha()), (7, 5, true, 5.0));
    std::fs::write(&toml, "model = \"m\"\ndata = \"d\"\noutput = \"o.safetensors\"\nstepz = 7\n").unwrap();
    let err = TrainConfig::resolve(&TrainArgs { config: Some(toml), ..Default::default() })
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("train.toml") && err.contains("stepz"), "{err}");
}

#[test]
fn second_run_reads_latents_from_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 3);
    let cfg = TrainConfig::resolve(&train_args(&model, &data, &tmp.path().join("a.safetensors"), 1)).unwrap();
    assert_eq!(setup::setup(&cfg, &mut |_, _, _| {}).unwrap().latents_cached, (0, 3));
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    assert_eq!(run.latents_cached, (3, 0), "the second run must not run the VAE");
}

#[test]
fn text_encoder_lora_and_every_option_together() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 4);
    let out = tmp.path().join("te.safetensors");
    let mut a = train_args(&model, &data, &out, 6);
    a.text_encoder_lr = Some(5e-4);
    a.flip = Some(true);
    a.random_crop = Some(true);
    a.caption_dropout = Some(0.2);
    a.shuffle_tags = Some(true);
    a.keep_tokens = Some(1);
    a.min_snr_gamma = Some(5.0);
    a.noise_offset = Some(0.05);
    a.grad_accum = Some(2);
    a.batch_size = Some(2);
    a.lr_scheduler = Some(sdlora::train::optim::LrSchedule::Cosine);
    a.warmup_steps = Some(2);
    a.lora_dropout = Some(0.1);
    a.save_every = Some(3);
    a.targets = Some(sdlora::lora::targets::Preset::Full);
    a.prediction_type = Some(sdlora::model::load::PredictionType::VPrediction);
    let cfg = TrainConfig::resolve(&a).unwrap();
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    assert!(run.adapters.iter().any(|(c, _)| c == "text_encoder"));
    assert!(run.adapters.iter().any(|(_, a)| a.path.ends_with("conv1")), "full targets the ResNet convs");
    let te: Vec<Vec<f32>> = run
        .adapters
        .iter()
        .filter(|(c, _)| c == "text_encoder")
        .map(|(_, a)| a.down.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let s = trainer::train(run, &cfg, &mut |_| {}).unwrap();
    assert_eq!(s.losses.len(), 6);
    assert!(s.losses.iter().all(|l| l.is_finite()));
    let k = tensor_names(&out);
    assert!(k.iter().any(|k| k.starts_with("lora_te_text_model_encoder_layers_0_self_attn_q_proj")));
    assert!(k.iter().any(|k| k.starts_with("lora_unet_down_blocks_0_resnets_0_conv1")));
    assert!(tmp.path().join("te-step000003.safetensors").exists(), "--save-every 3");
    // the text-encoder adapters moved
    let mut sd = sdlora::model::load::load(model.to_str().unwrap(), &Default::default()).unwrap();
    let loaded = sdlora::lora::apply::apply_file(&mut sd, &out, 1.0, 0).unwrap();
    let after: Vec<Vec<f32>> = loaded
        .iter()
        .filter(|(c, _)| c == "text_encoder")
        .map(|(_, a)| a.down.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(te.len(), after.len());
    assert!(te.iter().zip(&after).any(|(x, y)| x.iter().zip(y).any(|(a, b)| (a - b).abs() > 1e-4)));
}

#[test]
fn exclude_layers_leaves_matching_layers_without_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 2);
    let out = tmp.path().join("ex.safetensors");
    let mut a = train_args(&model, &data, &out, 2);
    a.targets = Some(sdlora::lora::targets::Preset::Full);
    a.text_encoder_lr = Some(5e-4);
    a.exclude_layers = Some(r"^(down_blocks\.0|up_blocks\.1)\.|\.mlp\.".into());
    let cfg = TrainConfig::resolve(&a).unwrap();
    trainer::train(setup::setup(&cfg, &mut |_, _, _| {}).unwrap(), &cfg, &mut |_| {}).unwrap();
    let k = tensor_names(&out);
    let has = |p: &str| k.iter().any(|k| k.starts_with(p));
    assert!(!has("lora_unet_down_blocks_0_") && !has("lora_unet_up_blocks_1_"), "{k:?}");
    assert!(has("lora_unet_down_blocks_1_") && has("lora_unet_up_blocks_0_"), "{k:?}");
    assert!(has("lora_te_text_model_encoder_layers_0_self_attn_q_proj"), "{k:?}");
    assert!(!k.iter().any(|k| k.contains("_mlp_fc")), "the text encoder's MLP is excluded too");
    let bytes = std::fs::read(&out).unwrap();
    let meta = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone().unwrap();
    assert!(meta["ss_network_args"].contains("exclude_patterns"), "{meta:?}");

    // a bad expression and one that leaves nothing are one clear line each, before any work
    a.exclude_layers = Some("(".into());
    let err = TrainConfig::resolve(&a).err().unwrap().to_string();
    assert!(err.starts_with("--exclude-layers `(` is not a regular expression"), "{err}");
    a.exclude_layers = Some(".".into());
    let cfg = TrainConfig::resolve(&a).unwrap();
    let err = setup::setup(&cfg, &mut |_, _, _| {}).err().unwrap().to_string();
    assert!(err.contains("leaves no layer of --targets full to train"), "{err}");
}

#[test]
fn sdxl_training_writes_kohya_sgm_names_for_both_text_encoders() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    sdlora::model::tiny::write_random_pipeline(
        &model,
        &sdlora::model::tiny::tiny_sdxl(),
        3,
        candle_core::DType::F32,
    )
    .unwrap();
    tiny_dataset(&data, 2);
    let out = tmp.path().join("xl.safetensors");
    let mut a = train_args(&model, &data, &out, 3);
    a.text_encoder_lr = Some(1e-4);
    let cfg = TrainConfig::resolve(&a).unwrap();
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    assert_eq!(run.sd.family, sdlora::model::load::Family::Sdxl);
    let s = trainer::train(run, &cfg, &mut |_| {}).unwrap();
    assert!(s.losses.iter().all(|l| l.is_finite()));
    let k = tensor_names(&out);
    assert!(
        k.iter().any(|k| k.starts_with("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q")),
        "SGM names (layers_per_block 1: block 1 is input_blocks.3)"
    );
    assert!(k.iter().any(|k| k.starts_with("lora_te1_")) && k.iter().any(|k| k.starts_with("lora_te2_")));
}

#[test]
fn help_teaches_every_flag_with_its_default() {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--model",
        "--data",
        "--output",
        "--steps",
        "--batch-size",
        "--rank",
        "--alpha",
        "--lr",
        "--resolution",
        "--seed",
        "--targets",
        "--format",
        "--save-every",
        "--resume",
        "--config",
    ] {
        assert!(help.contains(flag), "train --help lacks {flag}");
    }
    assert!(help.matches("[default:").count() >= 15, "{help}");
}

#[test]
fn sample_grids_before_during_and_after_training() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 2);
    let prompts = tmp.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "# two prompts\na red circle on a blue background\n\na green circle on a yellow background\n",
    )
    .unwrap();
    let out = tmp.path().join("s.safetensors");
    let mut a = train_args(&model, &data, &out, 4);
    a.lr = Some(1e-2);
    a.sample_prompts = Some(prompts);
    a.sample_every = Some(2);
    let cfg = TrainConfig::resolve(&a).unwrap();
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    let s = trainer::train(run, &cfg, &mut |_| {}).unwrap();
    let steps: Vec<usize> = s.grids.iter().map(|(k, _)| *k).collect();
    assert_eq!(steps, vec![0, 2, 4]);
    for k in [0, 2, 4] {
        assert!(tmp.path().join(format!("s-samples-step{k:06}.png")).exists());
    }
    // rows of [base | LoRA]: identical before training, different after
    // cells of 32 px with a 2 px frame around and between them
    let cell =
        |g: &image::RgbImage, col: u32| image::imageops::crop_imm(g, 2 + col * 34, 2, 32, 32).to_image();
    let halves = |g: &image::RgbImage| (cell(g, 0), cell(g, 1));
    let (b0, l0) = halves(&s.grids[0].1);
    assert!(b0.as_raw() == l0.as_raw(), "before training the LoRA column is the base");
    let (b2, l2) = halves(&s.grids[2].1);
    assert!(b2.as_raw() != l2.as_raw(), "after training the LoRA column differs");
    let mut report = s.report("t");
    report.settings.push(("k".into(), "v".into()));
    let html = report.html().unwrap();
    assert_eq!(html.matches("data:image/png;base64,").count(), 3);

    // --sample-cfg: the grids are drawn at that guidance (1: none), not at the default 7
    a.sample_cfg = Some(1.0);
    a.sample_every = None;
    a.steps = Some(1);
    a.output = Some(tmp.path().join("g1.safetensors"));
    let cfg = TrainConfig::resolve(&a).unwrap();
    let s1 = trainer::train(setup::setup(&cfg, &mut |_, _, _| {}).unwrap(), &cfg, &mut |_| {}).unwrap();
    let (b_unguided, _) = halves(&s1.grids[0].1);
    assert!(b_unguided.as_raw() != b0.as_raw(), "guidance 1 draws another base image than 7");
    a.sample_cfg = Some(0.5);
    let err = TrainConfig::resolve(&a).err().unwrap().to_string();
    assert!(err.contains("--sample-cfg 0.5 must be 1"), "{err}");

    // --sample-lora-start 1: the base draws every step of the LoRA column too, however trained
    a.sample_cfg = None;
    a.sample_lora_start = Some(1.0);
    a.steps = Some(4);
    a.output = Some(tmp.path().join("held.safetensors"));
    let cfg = TrainConfig::resolve(&a).unwrap();
    let s = trainer::train(setup::setup(&cfg, &mut |_, _, _| {}).unwrap(), &cfg, &mut |_| {}).unwrap();
    let (b, l) = halves(&s.grids.last().unwrap().1);
    assert!(b.as_raw() == b0.as_raw() && l.as_raw() == b0.as_raw(), "the LoRA held back for every step");
}

/// kohya's regularization images: as many per epoch as training images (here 2 reg images for
/// 2 training images), their loss weighted by --prior-loss-weight. At weight 0 a step on a reg
/// image reports loss 0, so the zero-loss steps count the reg images the batches drew.
#[test]
fn regularization_images_share_the_epoch_at_their_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, reg) = (tmp.path().join("model"), tmp.path().join("data"), tmp.path().join("reg"));
    tiny_model(&model);
    tiny_dataset(&data, 2);
    tiny_dataset(&reg, 5);
    let out = tmp.path().join("reg.safetensors");
    let mut a = train_args(&model, &data, &out, 8);
    a.reg_data = Some(reg.clone());
    a.prior_loss_weight = Some(0.0);
    let cfg = TrainConfig::resolve(&a).unwrap();
    let run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    assert_eq!(run.items.iter().filter(|i| i.reg).count(), 2, "2 of the 5 reg images balance 2 images");
    let s = trainer::train(run, &cfg, &mut |_| {}).unwrap();
    assert_eq!(s.losses.iter().filter(|&&l| l == 0.0).count(), 4, "{:?}", s.losses);
    let meta = std::fs::read(&out).unwrap();
    let (_, m) = safetensors::SafeTensors::read_metadata(&meta).unwrap();
    let m = m.metadata().clone().unwrap();
    assert_eq!((m["ss_num_train_images"].as_str(), m["ss_num_reg_images"].as_str()), ("2", "2"));

    a.prior_loss_weight = Some(1.0);
    let cfg = TrainConfig::resolve(&a).unwrap();
    let s = trainer::train(setup::setup(&cfg, &mut |_, _, _| {}).unwrap(), &cfg, &mut |_| {}).unwrap();
    assert!(s.losses.iter().all(|&l| l > 0.0), "{:?}", s.losses);

    a.prior_loss_weight = Some(2.0);
    a.reg_data = None;
    let err = TrainConfig::resolve(&a).err().unwrap().to_string();
    assert!(err.contains("--prior-loss-weight") && err.contains("--reg-data"), "{err}");
    a.reg_data = Some(tmp.path().join("missing"));
    let err = setup::setup(&TrainConfig::resolve(&a).unwrap(), &mut |_, _, _| {}).err().unwrap().to_string();
    assert!(err.contains("missing: not a folder — --reg-data takes"), "{err}");
}

/// `--prior-preservation output`: a regularization image's target is the base model's own
/// prediction. At the start the LoRA is the base, so their loss is 0 (against the noise it is
/// not); once the U-Net's or the text encoder's adapters move, it is the change they make —
/// which also proves the adapters are off for the base prediction and back on for the LoRA's.
#[test]
fn output_preservation_pulls_reg_images_to_the_base_prediction() {
    use candle_core::Tensor;
    let tmp = tempfile::tempdir().unwrap();
    let (model, data, reg) = (tmp.path().join("model"), tmp.path().join("data"), tmp.path().join("reg"));
    tiny_model(&model);
    tiny_dataset(&data, 2);
    tiny_dataset(&reg, 3);
    let mut a = train_args(&model, &data, &tmp.path().join("o.safetensors"), 2);
    a.reg_data = Some(reg.clone());
    a.prior_preservation = Some(sdlora::train::config::Preservation::Output);
    a.text_encoder_lr = Some(1e-3);
    a.batch_size = Some(2);
    let output = TrainConfig::resolve(&a).unwrap();
    let noise =
        TrainConfig { prior_preservation: sdlora::train::config::Preservation::Noise, ..output.clone() };
    let run = setup::setup(&output, &mut |_, _, _| {}).unwrap();
    let is_reg = |i: &usize| run.items[run.samples[*i].item].reg;
    let regs: Vec<usize> = (0..run.samples.len()).filter(is_reg).collect();
    let trains: Vec<usize> = (0..run.samples.len()).filter(|i| !is_reg(i)).collect();
    assert_eq!(regs.len(), 2);
    let loss = |cfg: &TrainConfig, idx: &[usize]| trainer::loss_of(&run, cfg, idx, 7).unwrap();
    assert!(loss(&output, &regs) < 1e-12, "the untrained LoRA is the base: {}", loss(&output, &regs));
    assert!(loss(&noise, &regs) > 1e-3, "against the noise: {}", loss(&noise, &regs));
    let train_rows = loss(&output, &trains);
    assert!(train_rows > 1e-3 && (train_rows - loss(&noise, &trains)).abs() < 1e-12, "{train_rows}");

    // one component's adapters moved at a time (`up` random, or back to 0)
    let set_up = |component: &str, random: bool| {
        for (c, info) in &run.adapters {
            if c == component {
                let up = info.up.as_tensor();
                let v = match random {
                    true => Tensor::randn(0f32, 0.5, up.dims(), up.device()).unwrap(),
                    false => up.zeros_like().unwrap(),
                };
                info.up.set(&v).unwrap();
            }
        }
    };
    set_up("unet", true);
    let unet_moved = loss(&output, &regs);
    assert!(unet_moved > 1e-6, "the U-Net's LoRA changes the prediction: {unet_moved}");
    set_up("unet", false);
    assert!(loss(&output, &regs) < 1e-12, "back at the base");
    set_up("text_encoder", true);
    let te_moved = loss(&output, &regs);
    assert!(te_moved > 1e-8, "the text encoder's LoRA changes the reg prompts' encoding: {te_moved}");

    a.reg_data = None;
    let err = TrainConfig::resolve(&a).err().unwrap().to_string();
    assert!(err.contains("--prior-preservation") && err.contains("--reg-data"), "{err}");
    a.reg_data = Some(reg);
    // a value the command line cannot even parse, given in a config file
    let toml = tmp.path().join("bad.toml");
    std::fs::write(&toml, "prior_preservation = \"base\"\n").unwrap();
    (a.prior_preservation, a.config) = (None, Some(toml));
    let err = TrainConfig::resolve(&a).err().unwrap().to_string();
    assert!(err.contains("`base`: choose noise or output"), "{err}");
}

/// `--dop-trigger`: every training row trains once more with the trigger taken out of its caption,
/// towards the base's prediction. While the LoRA is the base those rows cost nothing; once its
/// adapters move they cost what the LoRA changed on the trigger-less caption, `--dop-weight` times.
/// Trained with them, the LoRA changes the trigger-less prompts less than trained without.
#[test]
fn differential_output_preservation_keeps_prompts_without_the_trigger() {
    use candle_core::Tensor;
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 3);
    for i in 0..3 {
        let txt = data.join(format!("img{i}.txt"));
        let c = std::fs::read_to_string(&txt).unwrap();
        std::fs::write(&txt, format!("{c}, sks")).unwrap();
    }
    let mut a = train_args(&model, &data, &tmp.path().join("plain.safetensors"), 40);
    a.batch_size = Some(3);
    a.lr = Some(1e-2);
    let plain = TrainConfig::resolve(&a).unwrap();
    a.dop_trigger = Some("sks".into());
    a.output = Some(tmp.path().join("dop.safetensors"));
    let dop = TrainConfig::resolve(&a).unwrap();
    let dop2 = TrainConfig { dop_weight: 2.0, ..dop.clone() };

    // the preservation rows' share of the training loss, for the adapters `run` holds now
    let all = [0, 1, 2];
    let dop_term = |run: &setup::Run, cfg: &TrainConfig| {
        trainer::train_loss_of(run, cfg, &all, 3).unwrap()
            - trainer::train_loss_of(run, &plain, &all, 3).unwrap()
    };
    let run = setup::setup(&dop, &mut |_, _, _| {}).unwrap();
    // f32 sums over batches of 3 and 6 rows differ in the last bits
    let base_loss = trainer::train_loss_of(&run, &plain, &all, 3).unwrap();
    let t0 = dop_term(&run, &dop);
    assert!(t0.abs() < 1e-5 * base_loss, "the untrained LoRA is the base: {t0} of {base_loss}");
    for (c, info) in &run.adapters {
        if c == "unet" {
            let up = info.up.as_tensor();
            info.up.set(&Tensor::randn(0f32, 0.5, up.dims(), up.device()).unwrap()).unwrap();
        }
    }
    let (one, two) = (dop_term(&run, &dop), dop_term(&run, &dop2));
    assert!(one > 1e-6, "a moved LoRA pays on the trigger-less captions: {one}");
    assert!((two / one - 2.0).abs() < 1e-3, "--dop-weight 2 doubles it: {one} {two}");

    // trained with and without preservation: what each changed on the trigger-less captions
    let changed = |cfg: &TrainConfig| {
        let s = trainer::train(setup::setup(cfg, &mut |_, _, _| {}).unwrap(), cfg, &mut |_| {}).unwrap();
        assert!(s.losses.iter().all(|l| l.is_finite()), "{:?}", s.losses);
        let mut run = setup::setup(&dop, &mut |_, _, _| {}).unwrap();
        sdlora::train::state::load(
            &sdlora::train::state::state_path(&cfg.output),
            &run.adapters,
            None,
            &mut run.opt,
            None,
        )
        .unwrap();
        dop_term(&run, &dop)
    };
    let (without, with) = (changed(&plain), changed(&dop));
    eprintln!("change on trigger-less captions: plain {without:.6}, with preservation {with:.6}");
    assert!(with < 0.5 * without, "preservation left {with}, plain training {without}");
    let bytes = std::fs::read(&dop.output).unwrap();
    let meta = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone().unwrap();
    let m = &meta["sdlora_diff_output_preservation"];
    assert!(m.contains("\"trigger\":\"sks\"") && m.contains("\"multiplier\":1.0"), "{m}");

    let err = |a: &TrainArgs| TrainConfig::resolve(a).err().unwrap().to_string();
    a.dop_weight = Some(-1.0);
    assert!(err(&a).contains("--dop-weight -1 must be 0 or more"), "{}", err(&a));
    a.dop_trigger = None;
    a.dop_weight = Some(2.0);
    assert!(err(&a).contains("need the word to preserve without: --dop-trigger"), "{}", err(&a));
    a.dop_trigger = Some("zebra".into());
    let e = setup::setup(&TrainConfig::resolve(&a).unwrap(), &mut |_, _, _| {}).err().unwrap().to_string();
    assert!(e.contains("data: no caption has the word `zebra` of --dop-trigger"), "{e}");
}

#[test]
fn timestep_range_limits_what_training_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 3);
    let mut a = train_args(&model, &data, &tmp.path().join("low.safetensors"), 2);
    a.min_snr_gamma = Some(5.0);
    a.max_timestep = Some(10);
    let low = TrainConfig::resolve(&a).unwrap();
    a.max_timestep = None;
    a.min_timestep = Some(990);
    let high = TrainConfig::resolve(&a).unwrap();
    let full = TrainConfig { min_timestep: 0, ..high.clone() };
    let run = setup::setup(&low, &mut |_, _, _| {}).unwrap();
    let mean = |cfg: &TrainConfig| {
        (0..6).map(|k| trainer::loss_of(&run, cfg, &[0, 1, 2], k).unwrap()).sum::<f64>() / 6.0
    };
    // min-SNR-5 weighs the ε-loss by min(SNR, 5)/SNR: under 0.05 below t = 10, 1 from t = 990 on
    let (l, h, f) = (mean(&low), mean(&full), mean(&high));
    eprintln!("weighted loss: t < 10 {l:.5}, any t {f:.5}, t ≥ 990 {h:.5}");
    assert!(l.is_finite() && h.is_finite() && f.is_finite());
    assert!(l < 0.2 * h && l < 0.2 * f, "t < 10: {l}, any t: {f}, t ≥ 990: {h}");

    let s = trainer::train(run, &low, &mut |_| {}).unwrap();
    assert!(s.losses.iter().all(|l| l.is_finite()));
    let bytes = std::fs::read(&low.output).unwrap();
    let meta = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone().unwrap();
    let m = &meta["sdlora_timestep_range"];
    assert!(m.contains("\"min_timestep\":0") && m.contains("\"max_timestep\":10"), "{m}");

    a.max_timestep = Some(990);
    let e = TrainConfig::resolve(&a).err().unwrap().to_string();
    assert!(e.contains("--min-timestep 990 and --max-timestep 990 leave no timestep"), "{e}");
    a.min_timestep = None;
    a.max_timestep = Some(1001);
    let e = setup::setup(&TrainConfig::resolve(&a).unwrap(), &mut |_, _, _| {}).err().unwrap().to_string();
    assert!(e.contains("its scheduler has 1000 training timesteps"), "{e}");
}

/// `--epochs`: as many steps as cover that many passes over the data (--grad-accum counted), the
/// same LoRA as those steps given directly; `--save-every-epochs` checkpoints the step that ends
/// each epoch; steps and epochs together are refused, the command line's one winning over a file.
#[test]
fn epochs_train_whole_passes_and_checkpoint_their_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 3);
    let run = |dir: &str, steps: Option<usize>, epochs: Option<usize>, every: Option<usize>| {
        let out = tmp.path().join(dir).join("lora.safetensors");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        let args = TrainArgs {
            steps,
            epochs,
            save_every_epochs: every,
            grad_accum: Some(2),
            ..train_args(&model, &data, &out, 1)
        };
        let cfg = TrainConfig::resolve(&args).unwrap();
        let r = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
        let s = trainer::train(r, &cfg, &mut |_| {}).unwrap();
        (s.steps, std::fs::read(&out).unwrap(), out)
    };
    // 3 images, batch 1: 3 micro-batches an epoch; 3 epochs at 2 per step = 5 steps
    let (steps, by_epochs, out) = run("e", None, Some(3), Some(1));
    assert_eq!(steps, 5);
    let (_, by_steps, _) = run("s", Some(5), None, None);
    assert!(by_epochs == by_steps, "--epochs 3 differs from the --steps it stands for");
    // epochs end in steps 2 (micro-batch 3 of 4) and 3 (6 of 6); the third ends the run
    let ckpt = |s| sdlora::train::trainer::step_path(&out, s).exists();
    assert_eq!((ckpt(1), ckpt(2), ckpt(3), ckpt(4)), (false, true, true, false));

    let toml = tmp.path().join("t.toml");
    std::fs::write(&toml, "model = \"m\"\ndata = \"d\"\noutput = \"o.safetensors\"\nsteps = 7\nepochs = 2\n")
        .unwrap();
    let err =
        TrainConfig::resolve(&TrainArgs { config: Some(toml.clone()), ..Default::default() }).err().unwrap();
    assert!(err.to_string().contains("steps = 7 and epochs = 2: give one"), "{err}");
    std::fs::write(&toml, "model = \"m\"\ndata = \"d\"\noutput = \"o.safetensors\"\nsteps = 7\n").unwrap();
    let c = TrainConfig::resolve(&TrainArgs { config: Some(toml), epochs: Some(4), ..Default::default() })
        .unwrap();
    assert_eq!(c.epochs, Some(4));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdlora"))
        .args(["train", "--steps", "3", "--epochs", "2"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
}
