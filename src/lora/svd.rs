//! Truncated SVD for `resize` and `extract`, in f64: a randomized range finder (with power
//! iterations) reduces A to a small matrix whose Gram matrix is diagonalised by cyclic Jacobi.
//! Exact when the requested rank covers A's rank, which is what LoRA matrices have.
use candle_core::{DType, Device, Result, Tensor};

/// Eigen-decomposition of a symmetric n×n matrix (row-major): eigenvalues in descending order
/// and the matching eigenvectors as columns (row-major n×n).
pub fn sym_eig(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        let diag: f64 = (0..n).map(|i| a[i * n + i].powi(2)).sum();
        if off <= 1e-30 * diag.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[j * n + j].total_cmp(&a[i * n + i]));
    let vals = order.iter().map(|&i| a[i * n + i]).collect();
    let mut vecs = vec![0.0; n * n];
    for (c, &i) in order.iter().enumerate() {
        for k in 0..n {
            vecs[k * n + c] = v[k * n + i];
        }
    }
    (vals, vecs)
}

/// Orthonormal columns spanning Y's columns (modified Gram–Schmidt, twice for stability).
fn orthonormalize(y: &Tensor) -> Result<Tensor> {
    let (m, k) = y.dims2()?;
    let mut cols: Vec<Vec<f64>> = (0..k)
        .map(|j| y.narrow(1, j, 1).and_then(|c| c.flatten_all()?.to_vec1::<f64>()))
        .collect::<Result<_>>()?;
    let mut kept: Vec<Vec<f64>> = vec![];
    for c in cols.iter_mut() {
        for _ in 0..2 {
            for q in &kept {
                let d: f64 = c.iter().zip(q).map(|(a, b)| a * b).sum();
                c.iter_mut().zip(q).for_each(|(a, b)| *a -= d * b);
            }
        }
        let norm = c.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 1e-12 {
            kept.push(c.iter().map(|v| v / norm).collect());
        }
    }
    let n = kept.len().max(1);
    let mut data = vec![0.0; m * n];
    for (j, q) in kept.iter().enumerate() {
        for i in 0..m {
            data[i * n + j] = q[i];
        }
    }
    Tensor::from_vec(data, (m, n), &Device::Cpu)
}

/// Rank-`k` truncated SVD of A [m, n]: (U [m, k], singular values, Vᵀ [k, n]) and the total
/// squared Frobenius norm of A (for the retained-energy report).
pub fn svd(a: &Tensor, k: usize, seed: u64) -> Result<(Tensor, Vec<f64>, Tensor, f64)> {
    use rand::{Rng, SeedableRng};
    let a = a.to_dtype(DType::F64)?.to_device(&Device::Cpu)?;
    let (m, n) = a.dims2()?;
    let total = a.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let l = (k + 8).min(m).min(n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let omega: Vec<f64> = (0..n * l).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
    let mut q = orthonormalize(&a.matmul(&Tensor::from_vec(omega, (n, l), &Device::Cpu)?)?)?;
    for _ in 0..2 {
        q = orthonormalize(&a.matmul(&a.t()?.matmul(&q)?)?)?;
    }
    let b = q.t()?.matmul(&a)?; // [l', n]
    let l = b.dim(0)?;
    let gram: Vec<f64> = b.matmul(&b.t()?)?.flatten_all()?.to_vec1()?;
    let (vals, vecs) = sym_eig(gram, l);
    let k = k.min(l);
    let s: Vec<f64> = vals.iter().take(k).map(|v| v.max(0.0).sqrt()).collect();
    let ub = Tensor::from_vec(vecs, (l, l), &Device::Cpu)?.narrow(1, 0, k)?;
    let u = q.matmul(&ub)?;
    // Vᵀ = S⁻¹ Ubᵀ B
    let inv: Vec<f64> = s.iter().map(|&x| if x > 1e-300 { 1.0 / x } else { 0.0 }).collect();
    let vt = Tensor::from_vec(inv, (k, 1), &Device::Cpu)?.broadcast_mul(&ub.t()?.matmul(&b)?)?;
    Ok((u, s, vt, total))
}
