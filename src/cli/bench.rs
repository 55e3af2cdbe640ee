//! `sdlora bench`: inputs for benchmarks against the peer (diffusers + peft) — random-weight
//! models of the real architectures (no download) and a small procedural dataset.
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchArgs {
    /// Write a random-weight model folder here (diffusers layout).
    #[arg(long)]
    pub write_model: Option<PathBuf>,
    /// Which architecture: tiny (a small SD1-shaped model), sd15, sdxl.
    #[arg(long, default_value = "tiny")]
    pub size: String,
    /// Write a dataset of N procedural captioned images (32×32) here.
    #[arg(long)]
    pub write_data: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub images: usize,
}

pub fn run(a: &BenchArgs) -> Result<()> {
    use crate::model::tiny;
    if let Some(dir) = &a.write_model {
        let cfg = match a.size.as_str() {
            "tiny" => tiny::tiny_sd1(),
            "sd15" => tiny::sd15(),
            "sdxl" => tiny::sdxl(),
            s => anyhow::bail!("--size `{s}`: choose tiny, sd15 or sdxl"),
        };
        tiny::write_random_pipeline(dir, &cfg, 7, candle_core::DType::F32)?;
        println!("wrote {} ({} model, random weights)", dir.display(), a.size);
    }
    if let Some(dir) = &a.write_data {
        write_discs(dir, a.images)?;
        println!("wrote {} ({} images)", dir.display(), a.images);
    }
    Ok(())
}

/// Coloured discs on coloured backgrounds with captions.
pub fn write_discs(dir: &std::path::Path, n: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let colours = [
        ("red", [220u8, 40, 40]),
        ("blue", [40, 60, 220]),
        ("green", [40, 200, 60]),
        ("yellow", [230, 220, 40]),
    ];
    for i in 0..n {
        let (fname, fg) = colours[i % 4];
        let (bname, bg) = colours[(i + 1 + i / 4) % 4];
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let (dx, dy) = (x as i32 - 16 + (i as i32 % 3) - 1, y as i32 - 16);
            image::Rgb(if dx * dx + dy * dy < 90 { fg } else { bg })
        });
        img.save(dir.join(format!("img{i}.png")))?;
        std::fs::write(dir.join(format!("img{i}.txt")), format!("a {fname} circle on a {bname} background"))?;
    }
    Ok(())
}
