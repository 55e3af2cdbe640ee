//! Vectorised f32 exp for the softmax inside blocked attention (the C library's expf is scalar,
//! and at 4,096 tokens the attention takes a billion exponentials per 512 px step), and the
//! GEGLU forward and backward built on it.
//!
//! exp(x) = 2ⁿ · p(r) with n = round(x·log₂e), r = x − n·ln 2 (ln 2 split in two for exactness)
//! and p Cephes' degree-7 polynomial: within 2 ulp of the true value in [−87.3, 88.3], 0 below.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const MIN: f32 = -87.336_55;
/// Above this 2ⁿ would overflow the exponent: larger inputs saturate (softmax passes x ≤ 0).
const MAX: f32 = 88.37;

#[inline(always)]
fn exp1(x: f32) -> f32 {
    let xc = x.clamp(MIN, MAX);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r * r, r) + 1.0;
    // SAFETY: the clamp keeps n within [−126, 127], an i32 (the checked cast does not vectorise)
    let n: i32 = unsafe { n.to_int_unchecked() };
    let scale = f32::from_bits(((n + 127) << 23) as u32);
    if x < MIN {
        0.0
    } else {
        p * scale
    }
}

#[inline(always)]
fn exp_sum_body(xs: &mut [f32], shift: f32) -> f32 {
    xs.iter_mut().for_each(|x| *x = exp1(*x - shift));
    // 16 partial sums: one running sum would keep the loop scalar (float addition's order)
    let mut acc = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        acc.iter_mut().zip(c).for_each(|(a, &x)| *a += x);
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp_sum_avx2(xs: &mut [f32], shift: f32) -> f32 {
    exp_sum_body(xs, shift)
}

/// xs[i] ← exp(xs[i] − shift); returns Σ xs[i]. exp(−∞) is 0.
pub fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the features the function is compiled for are present on this CPU.
        return unsafe { exp_sum_avx2(xs, shift) };
    }
    exp_sum_body(xs, shift)
}

/// (Φ(x), φ(x)): the standard normal CDF by Abramowitz & Stegun 7.1.26 (erf within 1.5e-7) and
/// its density, sharing one exp.
#[inline(always)]
fn normal(x: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let e = exp1(-0.5 * x * x);
    let q = 0.5 * poly * e;
    let cdf = if x >= 0.0 { 1.0 - q } else { q };
    (cdf, e * 0.398_942_3)
}

#[inline(always)]
fn geglu_body(a: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &a), &g) in out.iter_mut().zip(a).zip(g) {
        *o = a * g * normal(g).0;
    }
}

#[inline(always)]
fn geglu_backward_body(a: &[f32], g: &[f32], dh: &[f32], da: &mut [f32], dg: &mut [f32]) {
    for ((((da, dg), &a), &g), &d) in da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g).zip(dh) {
        let (cdf, pdf) = normal(g);
        *da = d * g * cdf;
        *dg = d * a * (cdf + g * pdf);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn geglu_avx2(a: &[f32], g: &[f32], out: &mut [f32]) {
    geglu_body(a, g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn geglu_backward_avx2(a: &[f32], g: &[f32], dh: &[f32], da: &mut [f32], dg: &mut [f32]) {
    geglu_backward_body(a, g, dh, da, dg)
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// out = a ⊙ gelu(g), the exact (erf) GELU.
pub fn geglu(a: &[f32], g: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the features the function is compiled for are present on this CPU.
        return unsafe { geglu_avx2(a, g, out) };
    }
    geglu_body(a, g, out)
}

/// The gradients of `geglu` for a and g from the output gradient dh: dh ⊙ gelu(g) and
/// dh ⊙ a ⊙ (Φ(g) + g·φ(g)).
pub fn geglu_backward(a: &[f32], g: &[f32], dh: &[f32], da: &mut [f32], dg: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the features the function is compiled for are present on this CPU.
        return unsafe { geglu_backward_avx2(a, g, dh, da, dg) };
    }
    geglu_backward_body(a, g, dh, da, dg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 997th f32 of either sign in [−87.3, 88.3] within 2 ulp of the f64 exp; −∞ and the
    /// underflow range give 0; the sum is the sum of the values.
    #[test]
    fn exp_within_two_ulp_of_f64() {
        let xs: Vec<f32> = (0..MAX.to_bits())
            .step_by(997)
            .map(f32::from_bits)
            .flat_map(|m| [m, -m])
            .filter(|&x| x >= MIN)
            .collect();
        assert!(xs.len() > 1_000_000, "{} points", xs.len());
        let mut ys = xs.clone();
        exp_sum(&mut ys, 0.0);
        let worst = xs
            .iter()
            .zip(&ys)
            .map(|(&x, &y)| {
                let want = (x as f64).exp();
                let ulp = f32::from_bits((want as f32).to_bits() + 1) as f64 - want as f32 as f64;
                ((y as f64 - want) / ulp).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst <= 2.0, "worst error {worst} ulp");
        let mut edge = vec![f32::NEG_INFINITY, -100.0, -87.5, 0.0, 1.0];
        let sum = exp_sum(&mut edge, 1.0);
        assert_eq!(&edge[..3], &[0.0, 0.0, 0.0]);
        assert!((edge[3] - (-1f32).exp()).abs() < 1e-7 && (edge[4] - 1.0).abs() < 1e-7);
        assert!((sum - edge[3] - edge[4]).abs() < 1e-7);
    }

    /// GEGLU and its gradients against the erf composition in f64, over the range activations
    /// take (|g| ≤ 12), within 1e-6 of the largest value.
    #[test]
    fn geglu_matches_the_f64_composition() {
        let n = 20_001;
        let g: Vec<f32> = (0..n).map(|i| -12.0 + 24.0 * i as f32 / (n - 1) as f32).collect();
        let a: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let dh: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 / 498.5 - 1.0).collect();
        let (mut out, mut da, mut dg) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        geglu(&a, &g, &mut out);
        geglu_backward(&a, &g, &dh, &mut da, &mut dg);
        let erf = |x: f64| libm::erf(x);
        let (mut e_out, mut e_da, mut e_dg) = (0f64, 0f64, 0f64);
        for i in 0..n {
            let (x, av, d) = (g[i] as f64, a[i] as f64, dh[i] as f64);
            let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            e_out = e_out.max((out[i] as f64 - av * x * cdf).abs());
            e_da = e_da.max((da[i] as f64 - d * x * cdf).abs());
            e_dg = e_dg.max((dg[i] as f64 - d * av * (cdf + x * pdf)).abs());
        }
        // the largest |values| are about 12 (out, da) and 1.1 (dg)
        assert!(e_out < 12e-6 && e_da < 12e-6 && e_dg < 1.1e-6, "errors {e_out:e} {e_da:e} {e_dg:e}");
    }
}
