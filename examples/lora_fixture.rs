//! Writes LoRAs (and a DoRA) in our own formats onto the tiny fixture pipelines, for
//! tools/fixtures/check_our_lora.py to load with diffusers' `load_lora_weights`:
//! `cargo run --example lora_fixture` then `python tools/fixtures/check_our_lora.py`.
use candle_core::{DType, Device};
use sdlora::lora::format::{write, LoraFormat, WriteAs};
use sdlora::lora::targets::{text_encoder_selects, unet_selects, Preset};
use sdlora::lora::{attach, Init, LoraSpec};
use sdlora::model::load::{load_folder, LoadOptions};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for name in ["sd1", "sdxl"] {
        let mut sd =
            load_folder(&root.join(name).join("pipe"), &LoadOptions { vae: false, ..Default::default() })?;
        let spec = LoraSpec {
            rank: 4,
            alpha: 2.0,
            multiplier: 1.0,
            init: Init::Random,
            seed: 11,
            dtype: DType::F32,
            dropout: 0.0,
            dora: false,
            factored: None,
            switch: sdlora::model::layers::adapter::switch(),
        };
        let adapters = attach_all(&mut sd, &spec)?;
        for (fmt, file) in
            [(LoraFormat::Kohya, "ours_kohya.safetensors"), (LoraFormat::Peft, "ours_peft.safetensors")]
        {
            let path = root.join(name).join("lora").join(file);
            let layout = sdlora::lora::format::unet_layout(&sd);
            let how = WriteAs { family: sd.family, layout: &layout, format: fmt, dtype: DType::F32 };
            write(&path, &adapters, vec![], how, Default::default())?;
            println!("wrote {}", path.display());
        }

        // DoRA on the same layers, magnitudes moved off the weights' norms, as diffusers loads it
        let mut sd =
            load_folder(&root.join(name).join("pipe"), &LoadOptions { vae: false, ..Default::default() })?;
        let spec = LoraSpec { dora: true, seed: 21, ..spec.clone() };
        let adapters = attach_all(&mut sd, &spec)?;
        for (k, (_, a)) in adapters.iter().enumerate() {
            let m = a.magnitude.as_ref().expect("DoRA");
            m.set(&(m.as_tensor() * (1.0 + 0.2 * (k as f64).sin()))?)?;
        }
        let path = root.join(name).join("lora").join("ours_dora_peft.safetensors");
        let layout = sdlora::lora::format::unet_layout(&sd);
        let how = WriteAs { family: sd.family, layout: &layout, format: LoraFormat::Peft, dtype: DType::F32 };
        write(&path, &adapters, vec![], how, Default::default())?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `spec`'s adapters on the U-Net's attention and MLP layers and on every text-encoder layer
/// (text encoder k seeded `spec.seed + 1 + k`).
fn attach_all(
    sd: &mut sdlora::model::load::StableDiffusion,
    spec: &LoraSpec,
) -> anyhow::Result<Vec<(String, sdlora::lora::AdapterInfo)>> {
    let mut adapters = vec![];
    let unet = sd.unet.as_mut().expect("unet");
    for a in attach(unet, "", &|p, l| unet_selects(Preset::AttnMlp, p, l), spec, 0, &Device::Cpu)? {
        adapters.push(("unet".to_string(), a));
    }
    for (i, te) in sd.text_encoders.iter_mut().enumerate() {
        let comp = if i == 0 { "text_encoder" } else { "text_encoder_2" };
        let spec = LoraSpec { seed: spec.seed + 1 + i as u64, ..spec.clone() };
        for a in attach(te, "", &|p, _| text_encoder_selects(p), &spec, adapters.len(), &Device::Cpu)? {
            adapters.push((comp.to_string(), a));
        }
    }
    Ok(adapters)
}
