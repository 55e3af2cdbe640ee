//! `sdlora bench --case step|forward`: the U-Net of a model folder (full size: `--write-model
//! --size sd15`) timed step by step on this machine, with peak memory and page faults — the
//! figures tools/bench/cpu_step_vs_peer.sh sets beside PyTorch's on the same folder.
use crate::lora::attach::{attach, Init, LoraSpec};
use crate::lora::targets::{unet_selects, Preset};
use crate::model::layers::Grads;
use crate::model::load::{load, LoadOptions};
use crate::model::unet::UNetInput;
use crate::train::batches::{randn, rng_for};
use crate::train::optim::{clip_grad_norm, AdamW};
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use rand::Rng;
use std::path::Path;
use std::time::Instant;

/// What one case times.
pub struct Case<'a> {
    pub model: &'a Path,
    /// A LoRA step (forward, backward, AdamW) or an inference forward.
    pub train: bool,
    pub resolution: usize,
    pub batch: usize,
    pub steps: usize,
    pub rank: usize,
    pub dtype: DType,
}

/// Process counters from getrusage: peak RSS, minor page faults, user and system CPU time.
pub struct Usage {
    pub max_rss_mib: f64,
    pub minor_faults: i64,
    pub user_s: f64,
    pub sys_s: f64,
}

pub fn usage() -> Usage {
    // SAFETY: getrusage fills the zeroed struct it is given and reads nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    Usage {
        max_rss_mib: u.ru_maxrss as f64 / 1024.0,
        minor_faults: u.ru_minflt,
        user_s: secs(u.ru_utime),
        sys_s: secs(u.ru_stime),
    }
}

/// Runs the case and prints one line per step and a summary line that the bench script parses:
/// `sdlora: median S s, peak RSS M MiB, minor faults F, user U s, sys Y s`.
pub fn run(c: &Case) -> Result<()> {
    let source = c.model.to_str().context("--model: the path is not UTF-8")?;
    let opts = LoadOptions { dtype: c.dtype, vae: false, text_encoders: false, ..Default::default() };
    let mut sd = load(source, &opts)?;
    let switch = sd.lora_switch.clone();
    let unet = sd.unet.as_mut().expect("loaded with the U-Net");
    let cfg = unet.config.clone();
    let spec = LoraSpec {
        rank: c.rank,
        alpha: c.rank as f64,
        multiplier: 1.0,
        init: Init::Standard,
        seed: 0,
        dtype: DType::F32,
        dropout: 0.0,
        dora: false,
        factored: None,
        switch,
    };
    let adapters = if c.train {
        attach(unet, "", &|p, l| unet_selects(Preset::Attn, p, l), &spec, 0, &candle_core::Device::Cpu)?
    } else {
        vec![]
    };
    let params: Vec<_> = adapters.iter().flat_map(|a| a.params().into_iter().map(|(_, v)| v)).collect();
    let mut opt = AdamW::new(&params, 1e-2)?;

    let dev = candle_core::Device::Cpu;
    let mut rng = rng_for(7, "bench", 0);
    let side = c.resolution / 8;
    let (b, ch) = (c.batch, cfg.in_channels);
    let x = randn(&mut rng, &[b, ch, side, side], &dev)?.to_dtype(c.dtype)?;
    let target = randn(&mut rng, &[b, cfg.out_channels, side, side], &dev)?;
    let ctx = randn(&mut rng, &[b, 77, cfg.cross_attention_dim], &dev)?.to_dtype(c.dtype)?;
    let t: Vec<f32> = (0..b).map(|_| rng.random_range(0..1000) as f32).collect();
    let timestep = Tensor::from_vec(t, b, &dev)?;
    // SDXL's pooled text embedding and micro-conditioning
    let added = match (cfg.projection_class_embeddings_input_dim, cfg.addition_time_embed_dim) {
        (Some(p), Some(a)) => Some((
            randn(&mut rng, &[b, p - 6 * a], &dev)?.to_dtype(c.dtype)?,
            Tensor::from_vec(
                [side * 8, side * 8, 0, 0, side * 8, side * 8]
                    .repeat(b)
                    .iter()
                    .map(|&v| v as f32)
                    .collect::<Vec<_>>(),
                (b, 6),
                &dev,
            )?,
        )),
        _ => None,
    };
    let inp = UNetInput {
        sample: &x,
        timestep: &timestep,
        encoder_hidden_states: &ctx,
        text_embeds: added.as_ref().map(|a| &a.0),
        time_ids: added.as_ref().map(|a| &a.1),
    };
    let what =
        if c.train { format!("LoRA step (rank {} on attention, AdamW)", c.rank) } else { "forward".into() };
    println!(
        "{what}, {} px, batch {b}, {:?}, {} threads",
        c.resolution,
        c.dtype,
        candle_core::utils::get_num_threads()
    );
    let mut times = vec![];
    for i in 0..c.steps {
        let t0 = Instant::now();
        if c.train {
            let (pred, saved) = unet.forward_train(&inp)?;
            let diff = (pred.to_dtype(DType::F32)? - &target)?;
            let loss = diff.sqr()?.mean_all()?.to_scalar::<f32>()?;
            let dpred = (diff * (2.0 / pred.elem_count() as f64))?.to_dtype(pred.dtype())?;
            let mut g = Grads::new(adapters.len());
            unet.backward(saved, &dpred, &mut g)?;
            let mut grads = vec![];
            for a in &adapters {
                grads.extend(a.grads(&g)?);
            }
            clip_grad_norm(&mut grads, 1.0)?;
            opt.step(&params, &grads, &vec![1e-4; params.len()])?;
            anyhow::ensure!(loss.is_finite(), "non-finite loss at step {}", i + 1);
        } else {
            let y = unet.forward(&inp)?;
            anyhow::ensure!(
                y.sum_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()?.is_finite(),
                "non-finite output"
            );
        }
        let s = t0.elapsed().as_secs_f64();
        println!("step {}: {s:.3} s", i + 1);
        times.push(s);
    }
    // the first step pays for page faults of fresh buffers and lazy initialisation
    let mut rest = if times.len() > 1 { times[1..].to_vec() } else { times.clone() };
    rest.sort_by(f64::total_cmp);
    let u = usage();
    println!(
        "sdlora: median {:.3} s, peak RSS {:.0} MiB, minor faults {}, user {:.1} s, sys {:.1} s",
        rest[rest.len() / 2],
        u.max_rss_mib,
        u.minor_faults,
        u.user_s,
        u.sys_s
    );
    Ok(())
}
