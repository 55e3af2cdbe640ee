//! A trained token embedding (pivotal tuning, `--train-embedding`) end to end on the tiny model:
//! bundled into the LoRA, resumed exactly, changing only its word's encoding, and the mistakes
//! its flags explain.
use crate::common;
use common::data::{tensor_names, tiny_dataset, tiny_model, train_args};
use sdlora::train::config::TrainConfig;
use sdlora::train::{setup, trainer};
use std::path::Path;
/// The text conditioning of `prompt` with the model as it is.
fn encoding(sd: &sdlora::model::load::StableDiffusion, prompt: &str) -> Vec<f32> {
    let enc = sdlora::model::text::PromptEncoder::new(sd, 1).unwrap();
    let c = enc.encode(&sd.text_encoders, &[prompt.to_string()]).unwrap();
    c.context.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn trained_embedding_is_bundled_resumes_exactly_and_changes_only_its_word() {
    use sdlora::model::load::{load, LoadOptions};
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 4);
    let run = |out: &Path, steps: usize, resume: Option<&Path>| {
        let mut a = train_args(&model, &data, out, steps);
        a.train_embedding = Some("circle".into());
        a.init_word = Some("square".into());
        a.embedding_lr = Some(1e-2);
        a.batch_size = Some(2);
        a.save_every = Some(2);
        a.resume = resume.map(sdlora::train::state::state_path);
        let cfg = TrainConfig::resolve(&a).unwrap();
        trainer::train(setup::setup(&cfg, &mut |_, _, _| {}).unwrap(), &cfg, &mut |_| {}).unwrap()
    };
    for d in ["a", "b"] {
        std::fs::create_dir_all(tmp.path().join(d)).unwrap();
    }
    let out = tmp.path().join("a/emb.safetensors");
    let s = run(&out, 4, None);
    assert!(s.losses.iter().all(|l| l.is_finite()), "{:?}", s.losses);
    let key = "bundle_emb.circle.string_to_param.*";
    let k = tensor_names(&out);
    assert!(k.iter().any(|n| n == key), "{k:?}");
    assert!(k.iter().any(|n| n.ends_with(".lora_down.weight")), "the LoRA is in the same file: {k:?}");
    let v = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap()[key].clone();
    let d = v.dims().to_vec();
    let v: Vec<f32> = v.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();

    // it started from "square" and moved; the same row of the base is untouched
    let base = load(&model.display().to_string(), &LoadOptions::default()).unwrap();
    assert_eq!(d, [1, base.text_encoders[0].config.hidden_size]);
    let enc = sdlora::model::text::PromptEncoder::new(&base, 1).unwrap();
    let row = |w: &str| {
        let t = sdlora::lora::embedding::token_of(
            &enc.tokenizers[0].0,
            base.text_encoders[0].config.vocab_size,
            w,
        )
        .unwrap();
        let r = base.text_encoders[0].token_embedding.get(t as usize).unwrap();
        r.to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
    };
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let moved = dist(&v, &row("square"));
    assert!(
        moved > 1e-3 && moved < 0.2,
        "4 steps at 1e-2 move each value by at most 0.04 and at least some: {moved}"
    );
    assert!(dist(&v, &row("circle")) > 1e-3);

    // applied with the LoRA: a prompt with the word reads the vector, any other encodes as the base's
    let mut with = load(&model.display().to_string(), &LoadOptions::default()).unwrap();
    sdlora::lora::apply::apply_file(&mut with, &out, 1.0, 0).unwrap();
    let other = "a red square on a blue background";
    let off = |p: &str| with.lora_switch.off_while(|| encoding(&with, p));
    assert_eq!(off(other), encoding(&base, other), "an adapter-free prompt without the word changed");
    let word = "a red circle on a blue background";
    assert!(dist(&off(word), &encoding(&base, word)) > 1e-4, "the word's embedding is not in use");

    // another tool's two-vector embedding: one clear line, naming the file
    let mut two = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let v2 = two[key].clone();
    two.insert(key.to_string(), candle_core::Tensor::cat(&[&v2, &v2], 0).unwrap());
    let two_path = tmp.path().join("two.safetensors");
    candle_core::safetensors::save(&two, &two_path).unwrap();
    let mut m2 = load(&model.display().to_string(), &LoadOptions::default()).unwrap();
    let e = sdlora::lora::apply::apply_file(&mut m2, &two_path, 1.0, 0).err().unwrap().to_string();
    assert!(e.contains("two.safetensors") && e.contains("2 vectors"), "{e}");

    // merged into the model, the embedding is its word's row of the token table
    let mut m = sdlora::lora::merge::read_model(&model.display().to_string(), None).unwrap();
    sdlora::lora::merge::merge_loras(&mut m, &[(out.clone(), 1.0)]).unwrap();
    let merged_dir = tmp.path().join("merged");
    sdlora::lora::merge::write_folder(&m, &merged_dir).unwrap();
    let merged = load(&merged_dir.display().to_string(), &LoadOptions::default()).unwrap();
    assert!(dist(&encoding(&merged, word), &off(word)) < 1e-6, "the merged model encodes otherwise");

    // converted for diffusers: the LoRA file holds LoRA tensors only (diffusers refuses any
    // other), the embedding goes beside it in diffusers' advanced-script layout; kohya keeps it
    let tools = sdlora::cli::tools::ConvertArgs {
        input: out.clone(),
        output: tmp.path().join("a/peft.safetensors"),
        to: sdlora::lora::format::LoraFormat::Peft,
    };
    sdlora::cli::tools::convert(&tools).unwrap();
    let peft = tensor_names(&tools.output);
    assert!(!peft.is_empty() && peft.iter().all(|n| n.contains(".lora_")), "{peft:?}");
    let apart = tmp.path().join("a/peft_circle_emb.safetensors");
    let e = candle_core::safetensors::load(&apart, &candle_core::Device::Cpu).unwrap();
    assert_eq!(e.keys().collect::<Vec<_>>(), ["clip_l"]);
    let got: Vec<f32> =
        e["clip_l"].to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!((e["clip_l"].dims(), dist(&got, &v)), (&d[..], 0.0));
    let back = sdlora::cli::tools::ConvertArgs {
        input: tools.output.clone(),
        output: tmp.path().join("a/kohya.safetensors"),
        to: sdlora::lora::format::LoraFormat::Kohya,
    };
    sdlora::cli::tools::convert(&back).unwrap();
    assert!(!tensor_names(&back.output).iter().any(|n| n.starts_with("bundle_emb")), "nothing to bundle");
    let rebundled = sdlora::cli::tools::ConvertArgs { input: out.clone(), ..back };
    sdlora::cli::tools::convert(&rebundled).unwrap();
    assert!(tensor_names(&rebundled.output).iter().any(|n| n == key), "kohya keeps the bundle");

    // 2 steps, then --resume for 2 more == 4 straight (LoRA and embedding, byte for byte)
    let half = tmp.path().join("b/emb-half.safetensors");
    run(&half, 2, None);
    let resumed = tmp.path().join("b/emb.safetensors");
    run(&resumed, 4, Some(&half));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&resumed).unwrap(), "resume differs");
}

#[test]
fn embedding_flags_explain_their_mistakes() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    tiny_dataset(&data, 2);
    let mut a = train_args(&model, &data, &tmp.path().join("x.safetensors"), 1);
    a.init_word = Some("square".into());
    let e = TrainConfig::resolve(&a).err().unwrap().to_string();
    assert!(e.contains("--train-embedding"), "{e}");
    a.train_embedding = Some("xqzvkwpl".into());
    let cfg = TrainConfig::resolve(&a).unwrap();
    let e = format!("{:#}", setup::setup(&cfg, &mut |_, _, _| {}).err().unwrap());
    assert!(e.contains("xqzvkwpl") && e.contains("tokens"), "{e}");

    // several init words: the embedding starts at their mean, and the table holds it
    a.train_embedding = Some("circle".into());
    a.init_word = Some("square, red".into());
    let run = setup::setup(&TrainConfig::resolve(&a).unwrap(), &mut |_, _, _| {}).unwrap();
    let te = &run.sd.text_encoders[0];
    let row = |w: &str| {
        let t =
            sdlora::lora::embedding::token_of(&run.prompts.tokenizers[0].0, te.config.vocab_size, w).unwrap();
        te.token_embedding.get(t as usize).unwrap().to_dtype(candle_core::DType::F32).unwrap()
    };
    let mean = ((row("square") + row("red")).unwrap() / 2.0).unwrap();
    let e = run.embedding.as_ref().unwrap();
    for (what, v) in [("vector", e.vectors[0].as_tensor().clone()), ("table row", row("circle"))] {
        let d = (v - &mean).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-3, "{what} is {d} from the mean of the init words");
    }
    assert!(
        row("square").sub(&row("red")).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            > 1e-2
    );
}
