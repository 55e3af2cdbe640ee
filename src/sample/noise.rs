//! Random noise for sampling. `TorchRng` reproduces `torch.randn` on a CPU
//! `torch.Generator().manual_seed(seed)` (mt19937 + Box–Muller), so a seed gives the same initial
//! noise as diffusers with `generator=torch.Generator().manual_seed(seed)`; `SeededNoise` keeps one
//! such generator per image (seed, seed+1, ... as Automatic1111 numbers a batch), which is what
//! diffusers does when given a list of generators.
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Where a sampler gets its Gaussian noise: the initial latents and, for ancestral samplers,
/// fresh noise at every step.
pub trait NoiseSource {
    /// Standard-normal f32 tensor of `shape`.
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// The standard 32-bit Mersenne Twister (std::mt19937), as `at::mt19937`.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    /// torch keeps only the low 32 bits of the seed.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            self.state[i] = v;
        }
        self.index = 0;
    }
}

/// torch's CPU generator: `torch.randn(n, generator=g)` for float32.
#[derive(Clone)]
pub struct TorchRng {
    engine: Mt19937,
    /// The second value of the last float64 Box–Muller pair (torch caches it in the generator).
    next_double_normal: Option<f64>,
}

impl TorchRng {
    pub fn new(seed: u64) -> Self {
        Self { engine: Mt19937::new(seed), next_double_normal: None }
    }

    /// U[0, 1) with 24 random bits, as `uniform_real_distribution<float>`.
    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// U[0, 1) with 53 random bits, as `uniform_real_distribution<double>`.
    fn uniform_f64(&mut self) -> f64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>`: used for tensors of fewer than 16 values.
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n)` in float32: uniforms for all n values, then Box–Muller on blocks of 16
    /// (first 8 paired with last 8); when n is not a multiple of 16 the last 16 are redrawn.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }
}

fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0f32 - d[j]; // [0, 1) -> (0, 1] for the log
        let u2 = d[j + 8];
        let radius = (-2.0f32 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

/// One torch generator per image: row i of every draw comes from generator i.
pub struct SeededNoise {
    rngs: Vec<TorchRng>,
}

impl SeededNoise {
    pub fn new(seeds: &[u64]) -> Self {
        Self { rngs: seeds.iter().map(|&s| TorchRng::new(s)).collect() }
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        if shape.first() != Some(&self.rngs.len()) {
            bail!("noise of shape {shape:?} for {} generators", self.rngs.len());
        }
        let per_row: usize = shape[1..].iter().product();
        let mut v = Vec::with_capacity(per_row * self.rngs.len());
        for rng in &mut self.rngs {
            v.extend(rng.randn(per_row));
        }
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// Hands out recorded tensors in order (tests: the noise diffusers drew).
pub struct ReplayNoise {
    tensors: std::collections::VecDeque<Tensor>,
}

impl ReplayNoise {
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self { tensors: tensors.into() }
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let Some(t) = self.tensors.pop_front() else { bail!("no recorded noise left") };
        Ok(t.reshape(shape)?.to_device(device)?)
    }
}

/// For deterministic samplers, which never draw: any draw is a bug.
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn randn(&mut self, shape: &[usize], _: &Device) -> Result<Tensor> {
        bail!("a deterministic sampler asked for noise of shape {shape:?}")
    }
}
