//! Test helpers: seeded random tensors and a finite-difference gradient check in f64.
#![allow(dead_code)]
pub mod data;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, seed)).unwrap()
}

pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    (a * b).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Compares `analytic` (d loss / d x) against central differences of `loss` at `probes` entries
/// of x spread over the tensor. Panics with the worst entry on failure.
pub fn fd_check(what: &str, x: &Var, analytic: &Tensor, loss: &dyn Fn() -> f64, probes: usize) {
    assert_eq!(x.dims(), analytic.dims(), "{what}: gradient shape");
    let orig: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let a: Vec<f64> = analytic.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite gradient");
    let scale = a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
    let n = orig.len();
    let eps = 1e-5;
    let mut nonzero = 0;
    for p in 0..probes.min(n) {
        let k = (p * 7919 + 13) % n;
        let set = |v: f64| {
            let mut o = orig.clone();
            o[k] = v;
            x.set(&Tensor::from_vec(o, x.shape(), &Device::Cpu).unwrap()).unwrap();
        };
        set(orig[k] + eps);
        let lp = loss();
        set(orig[k] - eps);
        let lm = loss();
        set(orig[k]);
        let fd = (lp - lm) / (2.0 * eps);
        if fd.abs() > 1e-9 {
            nonzero += 1;
        }
        let err = (fd - a[k]).abs() / scale;
        assert!(
            err < 1e-6,
            "{what}: entry {k}: finite difference {fd:.9e}, backward {:.9e} (rel err {err:.2e})",
            a[k]
        );
    }
    assert!(nonzero > 0, "{what}: every probed gradient is zero — the check proves nothing");
}

/// The U-Net input of a reference file's tensors (`sample`, `timestep`, `encoder_hidden_states`,
/// and SDXL's `text_embeds` and `time_ids` where present).
pub fn unet_input(t: &std::collections::HashMap<String, Tensor>) -> sdlora::model::unet::UNetInput<'_> {
    sdlora::model::unet::UNetInput {
        sample: &t["sample"],
        timestep: &t["timestep"],
        encoder_hidden_states: &t["encoder_hidden_states"],
        text_embeds: t.get("text_embeds"),
        time_ids: t.get("time_ids"),
    }
}
