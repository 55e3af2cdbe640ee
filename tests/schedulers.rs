//! The samplers against diffusers, step by step: tests/fixtures/schedulers/*.safetensors were
//! written by tools/fixtures/schedulers.py with a fake model `0.5·x_in + 0.1·sin(t)`; the same
//! model output in must give the same latents out (≤ 1e-5 relative to the latents' max).
use candle_core::{DType, Device, Tensor};
use sdlora::model::load::SchedulerConfig;
use sdlora::sample::noise::{NoNoise, NoiseSource, ReplayNoise, TorchRng};
use sdlora::sample::{build, schedule, SCHEDULER_NAMES};
use std::collections::HashMap;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

fn load(path: &std::path::Path) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap_or_default();
    (candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap(), meta)
}

/// max |a − b| / max |b|; NaN fails.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
    let e = d / s.max(1e-30);
    assert!(!e.is_nan(), "NaN");
    e
}

fn vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

fn fake_model(x: &Tensor, t: f64) -> Tensor {
    ((x * 0.5).unwrap() + (0.1 * t.sin()) as f32 as f64).unwrap()
}

fn run_case(name: &str) -> f64 {
    let (t, meta) = load(&dir().join(format!("{name}.safetensors")));
    let cfg: SchedulerConfig = serde_json::from_str(&meta["config"]).unwrap();
    let steps: usize = meta["steps"].parse().unwrap();
    let mut s = build(&meta["scheduler"], &cfg, steps).unwrap_or_else(|e| panic!("{name}: {e:#}"));

    let want_t = vec_f64(&t["timesteps"]);
    let got_t = s.timesteps().to_vec();
    assert_eq!(got_t.len(), want_t.len(), "{name}: number of timesteps");
    for (g, w) in got_t.iter().zip(&want_t) {
        assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{name}: timesteps {got_t:?} vs {want_t:?}");
    }
    if let Some(w) = t.get("sigmas") {
        let g = Tensor::new(s.sigmas().expect("sigmas"), &Device::Cpu).unwrap();
        let e = rel_err(&g, w);
        assert!(e <= 1e-6, "{name}: sigmas relative error {e:.2e}");
    }
    let want_sigma = vec_f64(&t["init_noise_sigma"])[0];
    assert!((s.init_noise_sigma() - want_sigma).abs() <= 1e-6 * want_sigma, "{name}: init_noise_sigma");

    let latents = &t["latents"];
    let mut noise: Box<dyn NoiseSource> = match t.get("noise") {
        Some(n) => Box::new(ReplayNoise::new((0..steps).map(|i| n.get(i).unwrap()).collect())),
        None => Box::new(NoNoise),
    };
    // Zero-terminal-SNR Euler starts at σ_max = √(2²⁴ − 1) ≈ 4096 and its first step cancels
    // 4096-sized terms down to order 1: one float32 ulp of σ_max (torch's MKL sqrt rounds
    // √16777215 up to 4096, the correctly rounded value is 4095.9998) is 2e-5 of the result.
    let tol = if name == "euler_zsnr_v" { 5e-5 } else { 1e-5 };
    let mut x = latents.get(0).unwrap();
    let mut worst: f64 = 0.0;
    for (i, &ts) in got_t.iter().enumerate() {
        let x_in = s.scale_model_input(&x, i).unwrap();
        let e = rel_err(&x_in, &t["model_in"].get(i).unwrap());
        assert!(e <= tol, "{name}: step {i}: model input relative error {e:.2e}");
        x = s.step(&fake_model(&x_in, ts), i, &x, noise.as_mut()).unwrap();
        let e = rel_err(&x, &latents.get(i + 1).unwrap());
        assert!(e <= tol, "{name}: step {i} (t = {ts}): latents relative error {e:.2e}");
        worst = worst.max(e);
    }
    worst
}

fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .filter_map(|e| {
            e.unwrap().file_name().to_string_lossy().strip_suffix(".safetensors").map(String::from)
        })
        .filter(|n| !n.starts_with("pipe_") && n != "torch_randn" && n != "alphas_cumprod")
        .collect();
    v.sort();
    v
}

#[test]
fn every_scheduler_matches_diffusers_step_by_step() {
    let cases = cases();
    assert!(cases.len() >= 25, "fixtures missing: {cases:?}");
    let mut report = vec![];
    for c in &cases {
        report.push(format!("{c}: {:.1e}", run_case(c)));
    }
    println!("worst relative error per case:\n  {}", report.join("\n  "));
    for name in ["ddim", "euler", "euler-a", "dpm++2m", "dpm++2m-karras"] {
        for pred in ["epsilon", "v_prediction"] {
            assert!(cases.contains(&format!("{name}_{pred}")), "{name} {pred} covered");
        }
    }
}

#[test]
fn alphas_cumprod_tables() {
    let (t, _) = load(&dir().join("alphas_cumprod.safetensors"));
    let base: SchedulerConfig = serde_json::from_str(
        &std::fs::read_to_string(dir().join("../sd1/pipe/scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    let mut linear = base.clone();
    linear.beta_schedule = "linear".into();
    linear.beta_start = 0.0001;
    linear.beta_end = 0.02;
    let mut zsnr = base.clone();
    zsnr.extra.insert("rescale_betas_zero_snr".into(), true.into());
    for (key, cfg) in [("scaled_linear", base), ("linear", linear), ("zsnr", zsnr)] {
        let got: Vec<f32> = schedule::alphas_cumprod(&cfg).unwrap();
        let want: Vec<f32> = t[&format!("alphas_cumprod.{key}")].to_vec1().unwrap();
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        // torch's float32 sqrt (MKL) is off by one ulp for some values, which the zero-SNR
        // shift (√ᾱ_t − √ᾱ_T) amplifies a little
        assert!(worst <= 5e-7, "{key}: alphas_cumprod max abs error {worst:e}");
    }
}

#[test]
fn torch_cpu_randn() {
    let (t, _) = load(&dir().join("torch_randn.safetensors"));
    let check = |key: &str, got: Vec<f32>| {
        let want: Vec<f32> = t[key].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len(), "{key}");
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{key}: max abs error {worst:e}");
    };
    let mut g = TorchRng::new(42);
    check("seed42_1x4x8x8", g.randn(256));
    check("seed42_then_48", g.randn(48));
    check("seed0_37", TorchRng::new(0).randn(37));
    check("seed123456789_2x4x3x3", TorchRng::new(123456789).randn(72));
    let mut g = TorchRng::new(7);
    check("seed7_5", g.randn(5));
    check("seed7_5_then_3", g.randn(3));
    check("seed7_5_then_3_then_16", g.randn(16));
}

#[test]
fn unknown_scheduler_lists_the_valid_names() {
    let err = build("heun", &SchedulerConfig::default(), 10).err().expect("an error").to_string();
    for n in SCHEDULER_NAMES {
        assert!(err.contains(n), "{err}");
    }
    assert!(err.contains("heun"));
}

#[test]
fn default_follows_the_config_class() {
    let mut cfg = SchedulerConfig::default();
    assert_eq!(build("default", &cfg, 20).unwrap().a1111_name(), "DPM++ 2M Karras", "no config");
    for (class, sampler) in [
        ("DDIMScheduler", "DDIM"),
        ("EulerDiscreteScheduler", "Euler"),
        ("EulerAncestralDiscreteScheduler", "Euler a"),
        ("DPMSolverMultistepScheduler", "DPM++ 2M"),
        ("PNDMScheduler", "DPM++ 2M Karras"), // without skip_prk_steps: not implemented
        ("LMSDiscreteScheduler", "DPM++ 2M Karras"),
    ] {
        cfg.class_name = Some(class.into());
        assert_eq!(build("default", &cfg, 20).unwrap().a1111_name(), sampler, "{class}");
    }
    cfg.class_name = Some("PNDMScheduler".into());
    cfg.extra.insert("skip_prk_steps".into(), true.into());
    assert_eq!(build("default", &cfg, 20).unwrap().a1111_name(), "PLMS");
    assert_eq!(build("default", &cfg, 20).unwrap().timesteps().len(), 21, "PLMS repeats one timestep");
    cfg.class_name = Some("EulerDiscreteScheduler".into());
    cfg.extra.insert("use_karras_sigmas".into(), true.into());
    assert_eq!(build("default", &cfg, 20).unwrap().a1111_name(), "Euler Karras");
    assert_eq!(build("euler", &cfg, 20).unwrap().a1111_name(), "Euler");
}
