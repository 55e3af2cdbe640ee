//! PNG output with Automatic1111's generation parameters (the `parameters` text chunk its
//! "PNG Info" tab, ComfyUI and Civitai read), and the model / LoRA hashes that text names.
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One LoRA as the infotext names it: file stem, strength, A1111's short hash.
#[derive(Debug, Clone)]
pub struct LoraInfo {
    pub name: String,
    pub multiplier: f64,
    /// First 12 hex digits of the sha256 of the tensor data (kohya's / A1111's `AutoV3` hash).
    pub hash: String,
}

/// The parameters of one image, written as A1111's infotext.
#[derive(Debug, Clone)]
pub struct Infotext {
    pub prompt: String,
    pub negative: String,
    pub steps: usize,
    pub sampler: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// First 10 hex digits of the model's sha256 (A1111's short hash).
    pub model_hash: Option<String>,
    pub model_name: String,
    pub clip_skip: usize,
    pub loras: Vec<LoraInfo>,
    /// `GenerateOptions::lora_start`; written only when the LoRAs sat out some steps.
    pub lora_start: f64,
}

/// A1111's `quote`: values holding `,`, `:` or a newline are JSON strings.
fn quote(v: &str) -> String {
    if v.contains([',', ':', '\n']) {
        serde_json::to_string(v).expect("a string serialises")
    } else {
        v.to_string()
    }
}

impl Infotext {
    /// `<prompt>\nNegative prompt: <neg>\nSteps: 25, Sampler: ..., Seed: 42, Size: 512x512, ...`
    /// The LoRAs also appear as `<lora:name:strength>` in the prompt, as A1111 users write them.
    pub fn to_text(&self) -> String {
        let mut prompt = self.prompt.clone();
        for l in &self.loras {
            prompt.push_str(&format!(" <lora:{}:{}>", l.name, l.multiplier));
        }
        let mut out = prompt.trim().to_string();
        if !self.negative.is_empty() {
            out.push_str(&format!("\nNegative prompt: {}", self.negative));
        }
        let mut fields = vec![
            ("Steps", self.steps.to_string()),
            ("Sampler", self.sampler.clone()),
            ("CFG scale", self.cfg_scale.to_string()),
            ("Seed", self.seed.to_string()),
            ("Size", format!("{}x{}", self.width, self.height)),
        ];
        if let Some(h) = &self.model_hash {
            fields.push(("Model hash", h.clone()));
        }
        fields.push(("Model", self.model_name.clone()));
        if self.clip_skip > 1 {
            fields.push(("Clip skip", self.clip_skip.to_string()));
        }
        if !self.loras.is_empty() {
            let list: Vec<String> = self.loras.iter().map(|l| format!("{}: {}", l.name, l.hash)).collect();
            fields.push(("Lora hashes", list.join(", ")));
        }
        if self.lora_start > 0.0 {
            fields.push(("Lora start", self.lora_start.to_string()));
        }
        fields.push(("Version", format!("sdlora {}", env!("CARGO_PKG_VERSION"))));
        let line: Vec<String> = fields.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect();
        out.push('\n');
        out.push_str(&line.join(", "));
        out
    }
}

/// Parses the last line of an infotext into (key, value) pairs, unquoting JSON strings.
pub fn parse_fields(text: &str) -> Vec<(String, String)> {
    let line = text.lines().last().unwrap_or("");
    let mut out = vec![];
    let mut rest = line.trim();
    while let Some((key, after)) = rest.split_once(": ") {
        let (value, next) = if after.starts_with('"') {
            // a JSON string: find its closing quote
            let mut de = serde_json::Deserializer::from_str(after).into_iter::<String>();
            match de.next() {
                Some(Ok(v)) => (v, &after[de.byte_offset()..]),
                _ => (after.to_string(), ""),
            }
        } else {
            match after.split_once(", ") {
                Some((v, n)) => (v.to_string(), n),
                None => (after.to_string(), ""),
            }
        };
        out.push((key.trim().to_string(), value));
        rest = next.trim_start_matches(',').trim_start();
    }
    out
}

fn sha256_of(files: &[PathBuf], skip_header: bool) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut r = std::fs::File::open(f).with_context(|| format!("{}: cannot read", f.display()))?;
        if skip_header {
            let mut n = [0u8; 8];
            r.read_exact(&mut n).with_context(|| format!("{}: not a safetensors file", f.display()))?;
            std::io::copy(&mut r.by_ref().take(u64::from_le_bytes(n)), &mut std::io::sink())?;
        }
        loop {
            let k = r.read(&mut buf)?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A1111's LoRA hash: sha256 of a .safetensors file after its JSON header, first 12 digits
/// (sha256 of the whole file for other formats).
pub fn lora_hash(path: &Path) -> Result<String> {
    let st = path.extension().is_some_and(|e| e == "safetensors");
    Ok(sha256_of(&[path.to_path_buf()], st)?[..12].to_string())
}

/// A1111's model hash: sha256 of the checkpoint file, first 10 digits. For a diffusers folder (or
/// a cached hub id) the U-Net weights stand in for the checkpoint.
pub fn model_hash(model_dir_or_file: &Path) -> Result<String> {
    let files = if model_dir_or_file.is_dir() {
        crate::model::load::folder::component_files(
            &model_dir_or_file.join("unet"),
            "diffusion_pytorch_model",
            false,
        )?
    } else {
        vec![model_dir_or_file.to_path_buf()]
    };
    Ok(sha256_of(&files, false)?[..10].to_string())
}

/// The model's name in the infotext: the checkpoint's file stem, the folder's name, or the
/// repository name of a hub id.
pub fn model_name(source: &str) -> String {
    let p = Path::new(source.split('@').next().unwrap_or(source));
    let stem = if p.is_file() { p.file_stem() } else { p.file_name() };
    stem.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| source.to_string())
}

/// Encodes RGB8 pixels as PNG with a `parameters` text chunk (tEXt when the text is Latin-1,
/// iTXt otherwise, as PIL does for A1111).
pub fn encode_png(width: u32, height: u32, rgb: &[u8], parameters: &str) -> Result<Vec<u8>> {
    let mut out = vec![];
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into())?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into())?;
        }
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
    }
    Ok(out)
}

/// Reads the `parameters` text back from PNG bytes.
pub fn read_parameters(png_bytes: &[u8]) -> Result<Option<String>> {
    let dec = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let reader = dec.read_info()?;
    let info = reader.info();
    if let Some(t) = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(Some(t.text.clone()));
    }
    match info.utf8_text.iter().find(|t| t.keyword == "parameters") {
        Some(t) => Ok(Some(t.get_text()?)),
        None => Ok(None),
    }
}

/// The next free `NNNNN-<seed>.png` name in `dir`, numbered after the files already there (as
/// A1111 numbers its outputs).
pub fn next_index(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.split('-').next().filter(|d| d.len() == 5).and_then(|d| d.parse::<usize>().ok())
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infotext_round_trip() {
        let t = Infotext {
            prompt: "a photo of a cat".into(),
            negative: "blurry".into(),
            steps: 25,
            sampler: "DPM++ 2M Karras".into(),
            cfg_scale: 7.0,
            seed: 42,
            width: 512,
            height: 768,
            model_hash: Some("0123456789".into()),
            model_name: "sd15".into(),
            clip_skip: 2,
            loras: vec![
                LoraInfo { name: "a".into(), multiplier: 0.8, hash: "aaaaaaaaaaaa".into() },
                LoraInfo { name: "b".into(), multiplier: 0.5, hash: "bbbbbbbbbbbb".into() },
            ],
            lora_start: 0.2,
        };
        let s = t.to_text();
        assert!(
            s.starts_with("a photo of a cat <lora:a:0.8> <lora:b:0.5>\nNegative prompt: blurry\nSteps: 25, ")
        );
        assert!(s.contains("CFG scale: 7, Seed: 42, Size: 512x768, Model hash: 0123456789, Model: sd15"));
        assert!(s.contains(r#"Lora hashes: "a: aaaaaaaaaaaa, b: bbbbbbbbbbbb""#), "{s}");
        let f = parse_fields(&s);
        let get = |k: &str| f.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.as_str());
        assert_eq!(get("Sampler"), Some("DPM++ 2M Karras"));
        assert_eq!(get("Lora hashes"), Some("a: aaaaaaaaaaaa, b: bbbbbbbbbbbb"));
        assert_eq!(get("Clip skip"), Some("2"));
        assert_eq!(get("Lora start"), Some("0.2"));
        assert!(!Infotext { lora_start: 0.0, ..t.clone() }.to_text().contains("Lora start"));
        assert_eq!(get("Version"), Some(format!("sdlora {}", env!("CARGO_PKG_VERSION")).as_str()));
    }

    #[test]
    fn png_text_round_trip() {
        let rgb = vec![7u8; 4 * 2 * 3];
        for text in ["plain", "ünïcødé ok", "日本語 prompt"] {
            let png = encode_png(4, 2, &rgb, text).unwrap();
            assert_eq!(read_parameters(&png).unwrap().as_deref(), Some(text));
            let img = image::load_from_memory(&png).unwrap().to_rgb8();
            assert_eq!(img.into_raw(), rgb);
        }
    }
}
