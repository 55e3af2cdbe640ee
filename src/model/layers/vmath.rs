//! Vectorised f32 exp for the softmax inside blocked attention: the C library's expf is scalar,
//! and at 4,096 tokens the attention takes a billion exponentials per 512 px step.
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
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for are present on this CPU.
        return unsafe { exp_sum_avx2(xs, shift) };
    }
    exp_sum_body(xs, shift)
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
}
