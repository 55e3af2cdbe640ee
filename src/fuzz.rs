//! Fuzz targets: every reader of outside bytes, fed anything. Each returns normally for any
//! input — an error is a fine answer, a panic, hang or abort is a bug — and asserts what must
//! hold of what it accepts. `fuzz/` runs them under libFuzzer (FUZZING.md); the test suite runs
//! each on its seeds and a few thousand mutations of them, so they stay alive in CI.
use std::path::Path;

/// A target: its name (also `fuzz/fuzz_targets/<name>.rs`), the function, its seed inputs.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub seeds: fn() -> Vec<Vec<u8>>,
}

pub const TARGETS: &[Target] = &[
    Target { name: "safetensors", run: safetensors, seeds: seeds::safetensors },
    Target { name: "lora", run: lora, seeds: seeds::lora },
    Target { name: "pickle", run: pickle, seeds: seeds::pickle },
    Target { name: "config", run: config, seeds: seeds::config },
    Target { name: "prompt", run: prompt, seeds: seeds::prompt },
    Target { name: "caption", run: caption, seeds: seeds::caption },
];

/// The safetensors header check, and candle's reader behind it: what the check accepts must
/// load, with the shapes the header gave.
pub fn safetensors(data: &[u8]) {
    let Ok(h) = crate::model::header::check_bytes(data, "fuzz") else { return };
    let t = candle_core::safetensors::load_buffer(data, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("header accepted but candle refuses the file: {e}"));
    for e in &h.tensors {
        assert_eq!(t[&e.name].dims(), e.shape.as_slice(), "{}", e.name);
    }
}

/// LoRA files: format detection, key parsing (kohya, PEFT, legacy diffusers, bundled
/// embeddings), the module checks, then resolving the keys against an SD 1.x model's layers.
pub fn lora(data: &[u8]) {
    use crate::lora::format;
    let Ok(file) = format::parse(data, "fuzz") else { return };
    for t in file.modules.values() {
        assert!(t.rank() > 0 && t.scale().is_finite() || t.alpha.is_some_and(|a| !a.is_finite()));
    }
    let family = crate::lora::ops::detect_family(&file);
    let targets = &seeds::STANDARD_TARGETS[family as usize];
    let layout = crate::lora::ops::standard_layout(family);
    let _ = format::resolve(&file, targets, family, &layout, "fuzz");
}

/// PyTorch checkpoints: the zip container and the pickles in it (or a bare pickle), through
/// the data-only interpreter and the allow-list.
pub fn pickle(data: &[u8]) {
    let p = Path::new("fuzz.ckpt");
    if data.starts_with(b"PK") {
        let _ = crate::model::load::ckpt::check_zip(std::io::Cursor::new(data), p);
    } else {
        let _ = crate::model::load::ckpt::check_pickle(data, p);
    }
}

/// The training config file (TOML), overlaid with no flags and checked as `train` checks it.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let args = crate::train::config::TrainArgs { config: Some("fuzz.toml".into()), ..Default::default() };
    let _ = crate::train::config::TrainConfig::resolve_text(&args, Some(text));
}

/// Prompts through CLIP's tokenizer and Automatic1111's 75-token chunking: every chunk fits,
/// and the chunks hold the prompt's tokens in order.
pub fn prompt(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let tok = &*seeds::TOKENIZER;
    let parts: Vec<Vec<u32>> = crate::model::text::split_break(&text)
        .iter()
        .map(|p| tok.encode_raw(p).expect("the tokenizer takes any text"))
        .collect();
    let comma = tok.encode_raw(",").ok().and_then(|c| c.first().copied());
    let chunks = crate::model::text::a1111_chunks(&parts, comma);
    assert!(!chunks.is_empty() && chunks.iter().all(|c| c.len() <= 75));
    assert_eq!(chunks.concat(), parts.concat());
    let ids = tok.encode(&text, 77, 0).expect("the tokenizer takes any text");
    assert_eq!(ids.len(), 77);
}

/// Captions and file names: augmentation, the trigger word swap, kohya's tag counts, and the
/// `N_name` folder and image-extension rules, on any Unicode.
pub fn caption(data: &[u8]) {
    use rand::SeedableRng;
    let text = String::from_utf8_lossy(data);
    let (caption, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let (trigger, name) = rest.split_once('\n').unwrap_or((rest, "7_x.png"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(data.len() as u64);
    let shuffled = crate::train::batches::augment_caption(caption, &mut rng, 0.0, true, 1);
    assert!(shuffled.len() <= caption.len() + 2 * caption.matches(',').count() + 2);
    if let Some(c) = crate::train::batches::replace_trigger(caption, trigger, "class") {
        assert!(!c.contains(", ,"));
    }
    let _ = crate::train::batches::dop_caption(caption, trigger, "a|b|", &mut rng);
    let item = crate::data::dataset::Item {
        image: Path::new(name).join(name),
        caption: caption.to_string(),
        repeats: 1,
        size: (8, 8),
        reg: false,
        val: false,
    };
    let freq = crate::train::metadata::tag_frequency([&item]);
    assert!(freq.values().flat_map(|m| m.keys()).all(|t| !t.is_empty() && t.trim() == t));
    let _ = crate::data::dataset::folder_repeats(Path::new(name));
    let _ = crate::data::dataset::is_image(Path::new(name));
}

pub mod seeds {
    //! Valid inputs of each kind to start from.
    use candle_core::{DType, Device, Tensor};
    use std::collections::HashMap;

    pub static TOKENIZER: std::sync::LazyLock<crate::model::tokenizer::ClipTokenizer> =
        std::sync::LazyLock::new(|| {
            crate::model::tokenizer::ClipTokenizer::embedded().expect("embedded vocabulary")
        });

    /// The layers of each family's standard networks (built without weights), by `Family as usize`.
    pub static STANDARD_TARGETS: std::sync::LazyLock<Vec<crate::lora::format::Targets>> =
        std::sync::LazyLock::new(|| {
            use crate::model::load::Family;
            let mut v = vec![vec![]; 3];
            for f in [Family::Sd1, Family::Sd2, Family::Sdxl] {
                v[f as usize] = crate::lora::ops::standard_targets(f).expect("standard networks");
            }
            v
        });

    fn st(tensors: &[(&str, Tensor)], meta: &[(&str, &str)]) -> Vec<u8> {
        let t: Vec<(String, Tensor)> = tensors.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let m: HashMap<String, String> = meta.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        crate::model::weights::serialize(&t, &m).expect("serialise")
    }

    fn t(shape: &[usize], dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).and_then(|t| t.to_dtype(dtype)).expect("tensor")
    }

    pub fn safetensors() -> Vec<Vec<u8>> {
        vec![
            st(&[("a", t(&[2, 3], DType::F32)), ("b", t(&[4], DType::F16))], &[("k", "v")]),
            st(&[("x", t(&[1, 1, 2, 2], DType::BF16))], &[]),
            st(&[], &[("format", "pt")]),
        ]
    }

    pub fn lora() -> Vec<Vec<u8>> {
        let (r, d) = (2, DType::F16);
        let kohya = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
        let peft = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        vec![
            st(
                &[
                    (&format!("{kohya}.lora_down.weight"), t(&[r, 320], d)),
                    (&format!("{kohya}.lora_up.weight"), t(&[320, r], d)),
                    (&format!("{kohya}.alpha"), t(&[], DType::F32)),
                    ("bundle_emb.sks.string_to_param.*", t(&[1, 768], DType::F32)),
                ],
                &[("ss_network_dim", "2")],
            ),
            st(
                &[
                    (&format!("{peft}.lora_A.weight"), t(&[r, 320], d)),
                    (&format!("{peft}.lora_B.weight"), t(&[320, r], d)),
                ],
                &[("lora_adapter_metadata", r#"{"unet.lora_alpha": 4}"#)],
            ),
            st(
                &[
                    ("unet.down_blocks.0.attentions.0.proj_in.lora.down.weight", t(&[r, 320, 1, 1], d)),
                    ("unet.down_blocks.0.attentions.0.proj_in.lora.up.weight", t(&[320, r, 1, 1], d)),
                ],
                &[],
            ),
        ]
    }

    pub fn pickle() -> Vec<Vec<u8>> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut out: Vec<Vec<u8>> = ["sd1/single.ckpt", "evil.ckpt"]
            .iter()
            .filter_map(|f| std::fs::read(root.join(f)).ok())
            .collect();
        // a bare protocol-2 pickle of {"a": [1, 2.5, "x"]}
        out.push(b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x03es.".to_vec());
        out
    }

    pub fn config() -> Vec<Vec<u8>> {
        [
            "model = \"m\"\ndata = \"d\"\noutput = \"o.safetensors\"\nsteps = 10\nrank = 8\nlr = 1e-4\n",
            "targets = \"attn-mlp\"\nformat = \"peft\"\nsave_dtype = \"bf16\"\nlr_scheduler = \"cosine\"\nexclude_layers = \"up_blocks\\\\.3\"\n",
            "[extra]\nkey = [1, 2, {a = 3}]\nflip = true\nresolution = 512\ncaption_dropout = 0.1\n",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
    }

    pub fn prompt() -> Vec<Vec<u8>> {
        let long = "a photo of a cat, ".repeat(30);
        [
            "a red disc on a blue background",
            "masterpiece, (best quality:1.2), BREAK a dog",
            &long,
            "日本語のプロンプト 🐱",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
    }

    pub fn caption() -> Vec<Vec<u8>> {
        [
            "sks dog, grass, sunny\nsks dog\n10_sks dog/img.png",
            "a, , b,c\n\n3_x.JPG",
            "ünïcödé, tag\ntag\n0_.webp",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect()
    }
}
