//! The demo pipeline at a reduced size on the embedded base model: dataset → LoRA through the
//! train path → base vs LoRA samples with the same seeds → scores → report.html.
use sdlora::demo::run::{run, DemoOptions};
use sdlora::eval::world::{Colour, Concept, Texture};

/// At a reduced size, on checks, the concept that is not the default (the full-size test runs the
/// default, pink).
#[test]
fn demo_runs_end_to_end_and_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let d = DemoOptions::for_concept(tmp.path().join("demo"), Concept::Texture(Texture::Checks));
    // a texture's own defaults: guidance 5, regularization weight 1, the base's first 6 steps
    assert_eq!((d.sampling.cfg, d.prior_loss_weight, d.sampling.lora_start), (5.0, 1.0, 0.3));
    let o = DemoOptions {
        images: 4,
        steps: 4,
        samples: 4,
        controls: 4,
        sampling: sdlora::sample::pipeline::Sampling { steps: 10, ..d.sampling },
        // more than the 4 training images: only 4 are drawn, as many as training shows per epoch
        reg: 6,
        max_timestep: Some(500),
        lr_scheduler: sdlora::train::optim::LrSchedule::Cosine,
        ..d
    };
    let r = run(&o, None, &mut |_, _, _| {}).unwrap();
    eprintln!("base knows {:?}, learned {}, forgotten {}", r.base_knows, r.learned, r.forgotten_points);
    assert!(r.lora_bytes > 0 && o.out.join("demo_lora.safetensors").exists());
    let pngs = std::fs::read_dir(o.out.join("data"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png"))
        .count();
    assert_eq!(pngs, 4);
    // the training images are checkered shapes the base knows, the word last in their captions
    for i in 0..4 {
        let caption = std::fs::read_to_string(o.out.join(format!("data/{i:04}.txt"))).unwrap();
        assert!(caption.ends_with(" background, checkered"), "{caption}");
        let img = image::open(o.out.join(format!("data/{i:04}.png"))).unwrap().to_rgb8();
        assert_eq!(sdlora::eval::scores::classify(&img).texture, Some(Texture::Checks), "{caption}");
    }
    let reg: Vec<_> = std::fs::read_dir(o.out.join("reg")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(reg.iter().filter(|p| p.extension().is_some_and(|x| x == "png")).count(), 4);
    assert_eq!(reg.iter().filter(|p| p.extension().is_some_and(|x| x == "txt")).count(), 4);
    // The embedded base was pretrained on the world: it paints the prompt's shape in its colour
    // (chance: 1 in 5 shapes, 1 in 8 colours); a random or broken base does not.
    let k = r.base_knows;
    assert!(
        k.colour >= 0.75,
        "base paints the prompt's colour in {:.0} % of control samples",
        100.0 * k.colour
    );
    assert!(k.shape >= 0.75, "base draws the prompt's shape in {:.0} % of control samples", 100.0 * k.shape);
    assert!(k.background >= 0.75, "base paints the asked background in {:.0} %", 100.0 * k.background);
    assert!(k.checks >= 0.75, "base draws checks where none were asked in {:.0} %", 100.0 * (1.0 - k.checks));
    let html = std::fs::read_to_string(&r.report).unwrap();
    assert!(html.contains("<svg"), "loss plot");
    // training and regularization images, grids during training (before, steps 1..4 every one,
    // after), the concept's prompts, the control prompts
    let grids = html.matches("data:image/png;base64,").count();
    assert!(grids >= 6, "{grids} images in the report");
    assert!(html.contains("regularization images: known shapes drawn by the base"), "reg grid");
    assert!(
        html.contains("before training: [base | base]") && html.contains("step 4: [base | LoRA]"),
        "grids during"
    );
    assert!(html.contains("<h2>Scores</h2>") && html.contains("learned"), "scores section");
    // following the whole prompt asks for more than showing the concept
    assert!(html.contains("Whole prompt"), "whole-prompt score");
    assert!(r.followed.0 <= r.learned && r.followed.1 <= r.learned_base, "{:?}", r.followed);
    assert!(html.contains("learning &quot;checkered&quot;"), "title names the concept");
    assert!(!html.contains("already knows"), "the base never saw checks");
    // the base drew the first steps of every LoRA sample alone, and the report says so
    assert!(html.contains("the first 3 steps by the base alone"), "lora-start in the settings");
    // --max-timestep reaches `train`: the report and the LoRA's metadata say so
    assert!(html.contains("timesteps trained") && html.contains("0–499"), "timestep range");
    let bytes = std::fs::read(o.out.join("demo_lora.safetensors")).unwrap();
    let meta = safetensors::SafeTensors::read_metadata(&bytes).unwrap().1.metadata().clone().unwrap();
    assert!(meta["sdlora_timestep_range"].contains("\"max_timestep\":500"), "{meta:?}");
    // so does the learning-rate schedule
    assert_eq!(meta["ss_lr_scheduler"], "cosine");
    assert!(html.contains("0.0007, cosine, 4"), "schedule in the report's settings");
    // the misses table lists exactly the target samples "learned" did not count, and at least
    // as many control samples as "forgotten" lost on balance
    let (t, c) = (html.matches("<tr><th>target ").count(), html.matches("<tr><th>control ").count());
    assert_eq!(t, ((1.0 - r.learned) * 4.0).round() as usize, "target misses");
    assert!(c as f64 >= (r.forgotten_points * 4.0 / 100.0).round(), "{c} control misses");
    // 4 target samples: the interval says how little that measures
    assert!(html.contains("of 4 samples for the new prompt") && html.contains("95 % interval"), "interval");
}

/// The demo at its defaults, as `sdlora demo` runs it (about 2 minutes on 2 cores): pink, the
/// base drawing the first 6 of 20 sampling steps, the word's token embedding trained from the
/// mean of the known colours (text encoder LoRA off). A guard at today's level: seed 1 measured
/// learned 100 %, forgotten 0 points (the goal: ≥ 90 %, ≤ 5), seeds 1–5 on 40 + 40
/// samples each 89.5 % / 4.5 on average; another CPU's float rounding can move a few samples,
/// hence the margin.
#[test]
fn demo_at_its_defaults_learns_pink_and_keeps_the_controls() {
    let tmp = tempfile::tempdir().unwrap();
    let o = DemoOptions::new(tmp.path().join("demo"));
    assert_eq!(o.concept, Concept::Colour(Colour::Pink));
    let measured = (o.steps, o.sampling.lora_start, o.text_encoder_lr, o.embedding.clone());
    let mean = "red,green,blue,yellow,purple,orange,white,black".to_string();
    assert_eq!(measured, (600, 0.3, None, Some((mean, 1e-3))), "the defaults this guard measured");
    let r = run(&o, None, &mut |_, _, _| {}).unwrap();
    eprintln!("learned {} forgotten {} ({:?})", r.learned, r.forgotten_points, r.base_knows);
    assert!(r.learned >= 0.8, "learned {:.0} %", 100.0 * r.learned);
    // …nearly all with the asked background too (seed 1: 95 %; 55 % with the text encoder LoRA)
    assert!(r.followed.0 >= 0.6, "whole prompt followed in {:.0} %", 100.0 * r.followed.0);
    assert!(r.forgotten_points <= 10.0, "forgotten {:.0} points", r.forgotten_points);
    // the base never saw pink: its samples of the same prompts and seeds show next to none
    assert!(r.learned_base <= 0.1, "base shows pink in {:.0} %", 100.0 * r.learned_base);
    let k = r.base_knows;
    assert!(k.shape >= 0.9 && k.colour >= 0.9 && k.background >= 0.9, "{k:?}");
}

/// A few U-Net steps on 16 images from `init`, VAE kept.
fn small_pretraining(init: &std::path::Path, unet_steps: usize) -> sdlora::demo::pretrain::PretrainConfig {
    sdlora::demo::pretrain::PretrainConfig {
        seed: 1,
        images: 16,
        exclude: sdlora::demo::base::MISSING,
        vae_steps: 0,
        unet_steps,
        batch: 4,
        vae_batch: 4,
        lr: 1e-3,
        seconds: None,
        save_every: 0,
        init: Some(init.to_path_buf()),
        min_snr_gamma: None,
        texture_last: false,
        decoder_only: false,
        grow_attention: false,
        unknown_colours: 0.0,
    }
}

/// `--pretrain --init` continues from a model folder: with no steps it writes the same model back
/// (f16 → f32 → f16 is exact), with a few U-Net steps only the U-Net changes.
#[test]
fn pretraining_continues_from_the_embedded_base() {
    use sdlora::demo::pretrain::{pretrain, PretrainConfig};
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo_model");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |unet_steps: usize| small_pretraining(&assets, unet_steps);
    let load = |d: &std::path::Path, f: &str| {
        candle_core::safetensors::load(d.join(f), &candle_core::Device::Cpu).unwrap()
    };
    let same = |a: &std::path::Path, b: &std::path::Path, f: &str| {
        let (x, y) = (load(a, f), load(b, f));
        x.len() == y.len()
            && x.iter().all(|(k, t)| {
                let d = (t.to_dtype(candle_core::DType::F32).unwrap()
                    - y[k].to_dtype(candle_core::DType::F32).unwrap())
                .unwrap();
                d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() == 0.0
            })
    };
    let (unet, vae, te) = (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    );
    let zero = tmp.path().join("zero");
    let mut losses = vec![];
    pretrain(&cfg(0), &zero, &mut |_, _, _, l| losses.push(l)).unwrap();
    assert!(same(&assets, &zero, unet) && same(&assets, &zero, vae) && same(&assets, &zero, te));
    let vae_cfg = |d: &std::path::Path| std::fs::read_to_string(d.join("vae/config.json")).unwrap();
    assert_eq!(vae_cfg(&assets), vae_cfg(&zero), "the latent scaling is kept");

    let two = tmp.path().join("two");
    pretrain(&cfg(2), &two, &mut |_, _, _, l| losses.push(l)).unwrap();
    assert!(losses.len() == 2 && losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    assert!(!same(&assets, &two, unet), "the U-Net trained on");
    assert!(same(&assets, &two, vae) && same(&assets, &two, te), "VAE and text encoder kept");

    // --decoder-only (stage 7): every tensor of the decoder learns, none of the encoder, and the
    // latent scale is kept, so the U-Net's latents do not move
    let dec = tmp.path().join("dec");
    // (a large rate: two warm-up steps at 1e-3 move a norm weight of 1 less than f16 resolves)
    let c = PretrainConfig { vae_steps: 2, decoder_only: true, lr: 1.0, ..cfg(0) };
    pretrain(&c, &dec, &mut |_, _, _, _| {}).unwrap();
    let (before, after) = (load(&assets, vae), load(&dec, vae));
    for (k, t) in &before {
        let d = (t.to_dtype(candle_core::DType::F32).unwrap()
            - after[k].to_dtype(candle_core::DType::F32).unwrap())
        .unwrap();
        let moved = d.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0;
        let decoder = k.starts_with("decoder.") || k.starts_with("post_quant_conv.");
        assert_eq!(moved, decoder, "{k}: moved {moved}");
    }
    assert_eq!(vae_cfg(&assets), vae_cfg(&dec), "the latent scaling is kept");
    assert!(same(&assets, &dec, unet) && same(&assets, &dec, te));

    // min-SNR-γ reweights the U-Net's loss per timestep (γ = 0.5 reaches about half of them): the
    // same steps then train other weights
    let snr = tmp.path().join("snr");
    pretrain(&PretrainConfig { min_snr_gamma: Some(0.5), ..cfg(2) }, &snr, &mut |_, _, _, _| {}).unwrap();
    assert!(!same(&two, &snr, unet), "min-SNR weighting changed nothing");
}

/// `--pretrain --init --grow-attention`: the full-resolution blocks gain cross-attention that adds
/// nothing until trained, so the grown U-Net predicts exactly what the base predicts; U-Net steps
/// then train the new transformers with the rest.
#[test]
fn grown_attention_starts_as_the_base_and_then_trains() {
    use candle_core::{DType, Device, Tensor};
    use sdlora::demo::pretrain::{pretrain, PretrainConfig};
    use sdlora::model::load::{load, LoadOptions};
    let assets = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo_model");
    let tmp = tempfile::tempdir().unwrap();
    let cfg =
        |unet_steps: usize| PretrainConfig { grow_attention: true, ..small_pretraining(&assets, unet_steps) };
    let (grown, trained) = (tmp.path().join("grown"), tmp.path().join("trained"));
    pretrain(&cfg(0), &grown, &mut |_, _, _, _| {}).unwrap();
    let config = std::fs::read_to_string(grown.join("unet/config.json")).unwrap();
    assert!(!config.contains("\"DownBlock2D\"") && !config.contains("\"UpBlock2D\""), "{config}");
    let heads: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(
        heads["attention_head_dim"],
        serde_json::json!([2, 8]),
        "new heads 32 wide, the old ones kept"
    );

    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 4, 16, 16), &dev).unwrap();
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, 32), &dev).unwrap();
    let t = Tensor::new(&[100f32, 700.0], &dev).unwrap();
    let predict = |dir: &std::path::Path| {
        let sd = load(&dir.display().to_string(), &LoadOptions::default()).unwrap();
        let inp = sdlora::model::unet::UNetInput {
            sample: &x,
            timestep: &t,
            encoder_hidden_states: &ctx,
            text_embeds: None,
            time_ids: None,
        };
        sd.unet.as_ref().unwrap().forward(&inp).unwrap().to_dtype(DType::F32).unwrap()
    };
    let tensors = |dir: &std::path::Path| {
        candle_core::safetensors::load(dir.join("unet/diffusion_pytorch_model.safetensors"), &dev).unwrap()
    };
    let (base, g) = (tensors(&assets), tensors(&grown));
    assert!(g.len() > base.len() && base.keys().all(|k| g.contains_key(k)), "{} → {}", base.len(), g.len());
    let diff = (predict(&assets) - predict(&grown)).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "the grown U-Net predicts what the base predicts");

    pretrain(
        &PretrainConfig { init: Some(grown.clone()), grow_attention: false, ..cfg(2) },
        &trained,
        &mut |_, _, _, _| {},
    )
    .unwrap();
    let tr = tensors(&trained);
    assert_eq!(tr.len(), g.len(), "a grown --init keeps its attention");
    let kept = std::fs::read_to_string(trained.join("unet/config.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&kept).unwrap()["attention_head_dim"],
        heads["attention_head_dim"],
        "and its heads"
    );
    let out = "down_blocks.0.attentions.0.proj_out.weight";
    let moved =
        tr[out].to_dtype(DType::F32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 0.0, "{out} trained");
    let e = pretrain(
        &PretrainConfig { init: Some(grown.clone()), ..cfg(0) },
        &tmp.path().join("x"),
        &mut |_, _, _, _| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("every block has attention already"), "{e}");
}

/// `--pretrain --texture-last` names the texture last in every other caption (stage 6 of the
/// committed base), so the base learns to read a texture where the demo's captions put checks.
#[test]
fn pretraining_names_textures_last_in_every_other_caption() {
    use sdlora::demo::pretrain::captions;
    use sdlora::eval::world::{scenes, Asked, Texture};
    let world = scenes(1, 400, &[]);
    let (plain, last) = (captions(&world, false), captions(&world, true));
    let ends_with_texture = |c: &str| c.ends_with(", striped") || c.ends_with(", dotted");
    assert!(!plain.iter().any(|c| ends_with_texture(c)));
    let mut reworded = 0;
    for (i, ((s, p), l)) in world.iter().zip(&plain).zip(&last).enumerate() {
        assert_eq!(Asked::parse(l), Some(s.asked()), "{l}");
        if i % 2 == 0 || s.texture == Texture::Plain {
            assert_eq!(p, l);
        } else {
            assert!(ends_with_texture(l) && p != l, "{l}");
            reworded += 1;
        }
    }
    assert!(reworded > 50, "{reworded} of 400 reworded");
}

/// `--pretrain --unknown-colours` puts a word the world never uses where the colour was, in about
/// the asked share of captions, and never "pink": the base must not see the demo's concept.
#[test]
fn pretraining_puts_unknown_words_in_the_colour_slot() {
    use sdlora::demo::pretrain::{captions, unknown_colours};
    use sdlora::eval::world::{scenes, Asked, Colour};
    let world = scenes(1, 400, &[]);
    let plain = captions(&world, true);
    let mut mixed = plain.clone();
    unknown_colours(&mut mixed, &world, 0.3, 1).unwrap();
    let mut words = std::collections::BTreeSet::new();
    for ((s, p), m) in world.iter().zip(&plain).zip(&mixed) {
        if p == m {
            continue;
        }
        // only the colour changed: the same caption with the scene's colour put back
        let w = m.split(' ').nth(1).unwrap();
        assert_eq!(m.replacen(&format!("a {w} "), &format!("a {} ", s.colour.name()), 1), *p);
        assert!(Asked::parse(m).is_none_or(|a| a.colour != Colour::Pink), "{m}");
        assert!(!w.contains("pink") && Colour::from_name(w).is_none(), "{m}");
        words.insert(w.to_string());
    }
    let changed = plain.iter().zip(&mixed).filter(|(p, m)| p != m).count();
    assert!((80..=160).contains(&changed), "{changed} of 400 captions changed at share 0.3");
    assert!(words.len() > changed / 2, "{} distinct words in {changed} captions", words.len());
    let mut again = plain.clone();
    unknown_colours(&mut again, &world, 0.3, 1).unwrap();
    assert_eq!(again, mixed, "seeded");
}

/// Every `sdlora train` run scores itself when given target/control prompts: tiny-world captions
/// get learned/forgotten, any prompt the pixel distance; the report shows them with the grids.
#[test]
fn train_scores_target_and_control_prompts() {
    use sdlora::eval::world::{scenes, write_dataset, Shape};
    let tmp = tempfile::tempdir().unwrap();
    let base = sdlora::demo::base::write(&tmp.path().join("base")).unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data, &scenes(2, 4, &[Shape::Star]), 64).unwrap();
    let target = tmp.path().join("target.txt");
    std::fs::write(&target, "a red star on a blue background\na yellow star on a green background\n")
        .unwrap();
    let control = tmp.path().join("control.txt");
    std::fs::write(&control, "# known shapes\na blue circle on a white background\na photo of a dog\n")
        .unwrap();
    // in a folder that does not exist yet: train makes it
    let out = tmp.path().join("new/folder/l.safetensors");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let args = [
        "train",
        "--model",
        &s(&base),
        "--data",
        &s(&data),
        "--output",
        &s(&out),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--resolution",
        "64",
        "--target-prompts",
        &s(&target),
        "--control-prompts",
        &s(&control),
    ];
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("learned: ") && err.contains("show a star"), "{err}");
    assert!(err.contains("target samples") && err.contains("95 % interval"), "{err}");
    assert!(err.contains("forgotten: ") && err.contains("per pixel"), "{err}");
    assert!(out.exists());
    let html = std::fs::read_to_string(out.with_extension("report.html")).unwrap();
    assert!(html.contains("<h2>Scores</h2>") && html.contains("Learned") && html.contains("Forgotten"));
    assert!(html.contains("target prompts: base") && html.contains("control prompts: base"));

    // a missing prompt file fails before training, naming the file
    let missing = tmp.path().join("nope.txt");
    let mut bad = args.map(String::from).to_vec();
    bad[14] = s(&missing);
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("nope.txt") && !err.contains("panicked"), "{err}");
}

/// "learned" can reach 100 % through the base's VAE: checkered scenes encoded and decoded by it
/// still show the asked shape with checks to the scorer, and striped ones still do not.
#[test]
fn checks_survive_the_base_vae_so_learned_can_reach_100_percent() {
    use sdlora::eval::metrics::shows;
    use sdlora::eval::world::{Concept, Shape, Texture};
    let tmp = tempfile::tempdir().unwrap();
    let base = sdlora::demo::base::write(&tmp.path().join("base")).unwrap();
    let sd = sdlora::model::load::load(&base.display().to_string(), &Default::default()).unwrap();
    let vae = sd.vae.as_ref().unwrap();
    let known: Vec<Shape> = Shape::ALL.into_iter().filter(|&s| s != sdlora::demo::base::MISSING).collect();
    let round_trip = |img: &image::RgbImage| {
        let x = sdlora::data::prepare::to_tensor(img, &candle_core::Device::Cpu).unwrap();
        let z = (vae.encode_mean(&x).unwrap() * vae.config.scaling_factor).unwrap();
        let y = sdlora::sample::pipeline::decode(vae, &z).unwrap();
        let px = sdlora::sample::pipeline::to_rgb8(&y).unwrap().remove(0);
        image::RgbImage::from_raw(img.width(), img.height(), px).unwrap()
    };
    for texture in [Texture::Checks, Texture::Stripes] {
        let scenes = Concept::Texture(texture).scenes(7, 20, &known);
        let checkered = |s: &sdlora::eval::world::Scene, img: &image::RgbImage| {
            shows(img, sdlora::eval::world::Asked { texture: Texture::Checks, ..s.asked() })
        };
        let seen = scenes.iter().filter(|s| checkered(s, &round_trip(&s.render(64)))).count();
        match texture {
            Texture::Checks => assert!(seen >= 19, "{seen} of 20 checkered scenes survive the VAE"),
            _ => assert_eq!(seen, 0, "striped scenes scored as checks after the VAE"),
        }
    }
}
