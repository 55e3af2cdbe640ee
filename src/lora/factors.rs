//! New LoHa and LoKr adapters for training: LyCORIS's factor shapes (its `factorization` of the
//! channel counts for LoKr) and its initialisation, under which ΔW starts at zero.
use crate::model::layers::lycoris::{FactorKind, Factors};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;

/// LoHa/LoKr options (LyCORIS's network args).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FactorSpec {
    pub kind: FactorKind,
    /// LoKr: the largest first factor of each channel count (-1: as square as it divides).
    pub factor: i64,
    /// LoKr: decompose the first factor w1 too when the rank is below half its size.
    pub decompose_both: bool,
    /// LoKr: keep the second factor w2 whole whatever the rank.
    pub full_matrix: bool,
}

/// LyCORIS's factorization: dimension = m·n with m ≤ n, m ≤ `factor` (or as close to √dimension
/// as divides it when `factor` < 0).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let (m, n) = (factor as usize, dimension / factor as usize);
        return if m > n { (n, m) } else { (m, n) };
    }
    let factor = if factor < 0 { dimension } else { factor as usize };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

fn normal(rng: &mut impl Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u, v) = (rng.random::<f64>().max(1e-300), rng.random::<f64>());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos() * std) as f32
        })
        .collect()
}

/// torch's kaiming_uniform_(a = √5): U(±1/√fan_in), fan_in = the size of everything but dim 0.
fn kaiming(rng: &mut impl Rng, shape: &[usize]) -> Vec<f32> {
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..shape.iter().product::<usize>()).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect()
}

/// Factors for a weight of `shape` ([out, in] or [out, in, kh, kw]) at `rank`.
pub fn new_factors(
    spec: &FactorSpec,
    shape: &[usize],
    rank: usize,
    rng: &mut impl Rng,
    (dtype, device): (DType, &Device),
) -> Result<Factors> {
    let var = |data: Vec<f32>, s: &[usize]| -> Result<Var> {
        Var::from_tensor(&Tensor::from_vec(data, s, device)?.to_dtype(dtype)?)
    };
    let zeros = |s: &[usize]| vec![0f32; s.iter().product()];
    let (o, i) = (shape[0], shape[1]);
    let kernel: usize = shape[2..].iter().product();
    let r = rank;
    let vars = match spec.kind {
        FactorKind::Hada => {
            // LyCORIS: w1b ~ N(0, 1), w1a ~ N(0, 0.1), w2b ~ N(0, 1), w2a = 0
            let n = i * kernel;
            vec![
                ("hada_w1_a", var(normal(rng, o * r, 0.1), &[o, r])?),
                ("hada_w1_b", var(normal(rng, r * n, 1.0), &[r, n])?),
                ("hada_w2_a", var(zeros(&[o, r]), &[o, r])?),
                ("hada_w2_b", var(normal(rng, r * n, 1.0), &[r, n])?),
            ]
        }
        FactorKind::Kron => {
            let (in_m, in_n) = factorization(i, spec.factor);
            let (out_l, out_k) = factorization(o, spec.factor);
            let whole_w1 = !(spec.decompose_both && (r as f64) < (out_l.max(in_m) as f64) / 2.0);
            let whole_w2 = spec.full_matrix || (r as f64) >= (out_k.max(in_n) as f64) / 2.0;
            let mut v = vec![];
            if whole_w1 {
                v.push(("lokr_w1", var(kaiming(rng, &[out_l, in_m]), &[out_l, in_m])?));
            } else {
                v.push(("lokr_w1_a", var(kaiming(rng, &[out_l, r]), &[out_l, r])?));
                v.push(("lokr_w1_b", var(kaiming(rng, &[r, in_m]), &[r, in_m])?));
            }
            // w2 starts at zero, so ΔW does
            let w2_shape: Vec<usize> = [out_k, in_n].into_iter().chain(shape[2..].iter().copied()).collect();
            if whole_w2 {
                v.push(("lokr_w2", var(zeros(&w2_shape), &w2_shape)?));
            } else {
                v.push(("lokr_w2_a", var(kaiming(rng, &[out_k, r]), &[out_k, r])?));
                v.push(("lokr_w2_b", var(zeros(&[r, in_n * kernel]), &[r, in_n * kernel])?));
            }
            v
        }
    };
    Ok(Factors { kind: spec.kind, vars })
}

#[cfg(test)]
mod tests {
    use super::factorization;

    #[test]
    fn factorization_is_lycoris() {
        // LyCORIS: factorization(320) = (16, 20), factorization(768, 8) = (8, 96), 1280 → (32, 40)
        assert_eq!(factorization(320, -1), (16, 20));
        assert_eq!(factorization(768, 8), (8, 96));
        assert_eq!(factorization(1280, -1), (32, 40));
        assert_eq!(factorization(7, -1), (1, 7));
        assert_eq!(factorization(64, 4), (4, 16));
    }
}
