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
    /// Run the SD1.5-size U-Net (random weights) forward in bf16 on the GPU and compare it with
    /// the CPU f32 result (needs a build with `--features cuda`).
    #[arg(long)]
    pub check_bf16: bool,
    /// Time the U-Net of --model on the CPU: `step` (a LoRA step: rank --rank on attention,
    /// AdamW) or `forward`; prints each step, the median of steps 2.., peak RSS and page faults.
    #[arg(long, value_parser = ["step", "forward"])]
    pub case: Option<String>,
    /// The model folder for --case (write one with --write-model DIR --size sd15).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Image side in pixels for --case (latents are a eighth of it).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Steps to time for --case (the first is not counted in the median).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value_t = 4)]
    pub rank: usize,
}

pub fn run(a: &BenchArgs) -> Result<()> {
    use crate::model::tiny;
    if a.check_bf16 {
        return check_bf16();
    }
    if let Some(case) = &a.case {
        let Some(model) = &a.model else {
            anyhow::bail!("--case {case} needs --model DIR (write one with --write-model DIR --size sd15)")
        };
        anyhow::ensure!(
            a.resolution.is_multiple_of(64) && a.resolution > 0,
            "--resolution {}: give a multiple of 64",
            a.resolution
        );
        anyhow::ensure!(a.steps > 0 && a.batch_size > 0, "--steps and --batch-size must be at least 1");
        return super::bench_step::run(&super::bench_step::Case {
            model,
            train: case == "step",
            resolution: a.resolution,
            batch: a.batch_size,
            steps: a.steps,
            rank: a.rank,
            dtype: candle_core::DType::F32,
        });
    }
    if a.write_model.is_none() && a.write_data.is_none() {
        anyhow::bail!(
            "nothing to do: give --write-model DIR and/or --write-data DIR (tools/bench/cpu_vs_peer.sh runs both)"
        );
    }
    if a.write_data.is_some() && a.images == 0 {
        anyhow::bail!("--images 0 would write an empty dataset: give 1 or more");
    }
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

/// The SD1.5 U-Net forward (64×64 latents, batch 1, t = 500) in bf16 on the GPU against the CPU
/// f32 forward of the same random weights; also the GPU f32 forward and bf16 timings at batch 2.
fn check_bf16() -> Result<()> {
    use crate::model::tiny::{sd15, unet_shapes};
    use crate::model::unet::{UNet2DConditionModel, UNetInput};
    use crate::model::weights::{random_tensor, Weights};
    use candle_core::{DType, Device, Tensor};
    let gpu = crate::train::setup::device();
    anyhow::ensure!(gpu.is_cuda(), "--check-bf16 needs a CUDA GPU and a build with `--features cuda`");
    let cfg = sd15().unet;
    let t0 = std::time::Instant::now();
    let shapes = unet_shapes(&cfg)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let map: std::collections::HashMap<String, Tensor> = std::thread::scope(|sc| {
        let parts: Vec<_> = shapes
            .chunks(shapes.len().div_ceil(threads))
            .map(|part| {
                sc.spawn(move || {
                    part.iter()
                        .map(|(n, s)| {
                            Ok((
                                n.clone(),
                                random_tensor(7, n, &s.as_slice().into(), DType::F32, &Device::Cpu)?,
                            ))
                        })
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        parts.into_iter().map(|h| h.join().expect("weight thread")).collect::<Result<Vec<_>>>()
    })?
    .into_iter()
    .flatten()
    .collect();
    eprintln!("random SD1.5 U-Net weights in {:.1} s", t0.elapsed().as_secs_f64());
    let mut rng = crate::train::batches::rng_for(7, "check_bf16", 0);
    let sample = crate::train::batches::randn(&mut rng, &[2, 4, 64, 64], &Device::Cpu)?;
    let ctx = crate::train::batches::randn(&mut rng, &[2, 77, 768], &Device::Cpu)?;
    let ts = Tensor::new(&[500f32, 500.0], &Device::Cpu)?;
    let forward = |dtype: DType, dev: &Device, batch: usize| -> Result<(Tensor, UNet2DConditionModel)> {
        let unet = UNet2DConditionModel::load(&cfg, &Weights::from_map(map.clone(), "random", dtype, dev))?;
        let (x, c) = (sample.narrow(0, 0, batch)?, ctx.narrow(0, 0, batch)?);
        let inp = UNetInput {
            sample: &x.to_device(dev)?.to_dtype(dtype)?,
            timestep: &ts.narrow(0, 0, batch)?.to_device(dev)?,
            encoder_hidden_states: &c.to_device(dev)?.to_dtype(dtype)?,
            text_embeds: None,
            time_ids: None,
        };
        let y = unet.forward(&inp)?.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        Ok((y, unet))
    };
    let t0 = std::time::Instant::now();
    let (want, cpu) = forward(DType::F32, &Device::Cpu, 1)?;
    drop(cpu);
    eprintln!("CPU f32 forward in {:.1} s", t0.elapsed().as_secs_f64());
    let rel = |a: &Tensor| -> Result<f64> {
        let d = (a - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let e = d / want.abs()?.max_all()?.to_scalar::<f64>()?;
        anyhow::ensure!(!e.is_nan(), "NaN in the GPU output");
        Ok(e)
    };
    let (y32, _) = forward(DType::F32, &gpu, 1)?;
    let e32 = rel(&y32)?;
    let (y16, unet) = forward(DType::BF16, &gpu, 1)?;
    let e16 = rel(&y16)?;
    let l2 = (&y16 - &want)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?
        / want.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
    println!(
        "SD1.5 U-Net forward vs CPU f32 (max abs diff / max abs ref): GPU f32 {e32:.2e}, GPU bf16 {e16:.2e} \
         (bf16 ‖Δ‖/‖ref‖ {l2:.2e})"
    );
    // timing: one CFG step (batch 2), bf16
    let inp_x = sample.to_device(&gpu)?.to_dtype(DType::BF16)?;
    let inp_c = ctx.to_device(&gpu)?.to_dtype(DType::BF16)?;
    let inp_t = ts.to_device(&gpu)?;
    let inp = UNetInput {
        sample: &inp_x,
        timestep: &inp_t,
        encoder_hidden_states: &inp_c,
        text_embeds: None,
        time_ids: None,
    };
    let mut ms = vec![];
    for i in 0..13 {
        gpu.synchronize()?;
        let t = std::time::Instant::now();
        let _ = unet.forward(&inp)?;
        gpu.synchronize()?;
        if i >= 3 {
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "SD1.5 U-Net forward bf16, batch 2, 64×64 latents: median {:.1} ms (min {:.1}, max {:.1}) over {} runs",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1],
        ms.len()
    );
    // diffusers' own bf16 forward of this architecture lands at 1.31e-2 (its init) and 1.50e-2
    // (this init's distribution) by the same measure (tools/fixtures/bf16_floor.py): failing
    // means worse than the reference implementation, not merely above 1e-2.
    anyhow::ensure!(
        e16 <= 1.31e-2,
        "bf16 forward differs from CPU f32 by {e16:.2e}, more than diffusers' 1.31e-2"
    );
    Ok(())
}
