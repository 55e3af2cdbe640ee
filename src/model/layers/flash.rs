//! Attention on the CPU computed in blocks (flash attention): the L×S probability matrix is
//! never stored. The forward keeps a running row maximum and sum per query block and saves only
//! the log-sum-exp per row; the backward recomputes each block's probabilities from it.
//!
//! Q, K and V are read in place from the projections' [B, L, H·D] outputs through strides; the
//! results come back head-major, [B, H, L, D], one contiguous region per task.
use super::cpu::{for_each_task, gemm, with_slices};
use candle_core::{Result, Tensor, WithDType};
use num_traits::Float;
use std::sync::Mutex;

/// Query and key rows per block: a [64, 256] score block (64 KB in f32) and its K/V rows stay
/// in L2 while they are used.
pub const BLOCKS: Blocks = Blocks { q: 64, kv: 256 };

#[derive(Clone, Copy)]
pub struct Blocks {
    pub q: usize,
    pub kv: usize,
}

/// The element types the kernel runs in: f32, and f64 for the gradient checks.
pub trait Real: WithDType + Float + std::ops::MulAssign + Send + Sync {
    /// xs[i] ← exp(xs[i] − shift); returns Σ xs[i].
    fn exp_sum(xs: &mut [Self], shift: Self) -> Self;
}

impl Real for f32 {
    fn exp_sum(xs: &mut [f32], shift: f32) -> f32 {
        super::vmath::exp_sum(xs, shift)
    }
}

impl Real for f64 {
    fn exp_sum(xs: &mut [f64], shift: f64) -> f64 {
        xs.iter_mut().fold(0.0, |s, x| {
            *x = (*x - shift).exp();
            s + *x
        })
    }
}

/// One head's view into a [B, L, H·D] tensor: rows of `d` values `stride` apart.
#[derive(Clone, Copy)]
struct Head<'a, T> {
    v: &'a [T],
    stride: usize,
}

impl<'a, T> Head<'a, T> {
    fn of(all: &'a [T], b: usize, h: usize, len: usize, d: usize, heads: usize) -> Self {
        Head { v: &all[b * len * heads * d + h * d..], stride: heads * d }
    }
    fn rows(&self, r0: usize) -> &'a [T] {
        &self.v[r0 * self.stride..]
    }
}

/// The shapes of one call: batch, heads, query rows, key rows, head size.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    l: usize,
    s: usize,
    d: usize,
}

fn dims(q: &Tensor, k: &Tensor, heads: usize) -> Result<Dims> {
    let (b, l, c) = q.dims3()?;
    let (_, s, _) = k.dims3()?;
    Ok(Dims { b, h: heads, l, s, d: c / heads })
}

/// The key blocks query rows q0..q1 see: all, or those at or before the last row when causal.
fn kv_end(d: &Dims, causal: bool, q1: usize) -> usize {
    if causal {
        q1.min(d.s)
    } else {
        d.s
    }
}

/// Scores of query i against keys k0.. scaled, and −∞ where a causal mask hides the key.
fn scale_and_mask<T: Real>(row: &mut [T], scale: T, causal: bool, i: usize, k0: usize) {
    row.iter_mut().for_each(|x| *x *= scale);
    if causal && k0 + row.len() > i + 1 {
        row[(i + 1).saturating_sub(k0)..].fill(T::neg_infinity());
    }
}

/// softmax(scale · Q Kᵀ) V per head. q [B, L, H·D], k and v [B, S, H·D]. Returns the output
/// head-major [B, H, L, D] and the log-sum-exp per row [B, H, L].
pub fn forward<T: Real>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    blocks: Blocks,
) -> Result<(Tensor, Tensor)> {
    let dm = dims(q, k, heads)?;
    let Dims { b, h, l, s, d } = dm;
    let scale = T::from_f64((d as f64).powf(-0.5));
    let (o, lse) = with_slices([q, k, v], |[qv, kv, vv]: [&[T]; 3]| {
        let mut o = vec![T::zero(); b * h * l * d];
        let mut lse = vec![T::zero(); b * h * l];
        // one task per (image, head, query block), each owning its output rows
        let tasks: Vec<_> = o
            .chunks_mut(l * d)
            .zip(lse.chunks_mut(l))
            .flat_map(|(oh, lh)| oh.chunks_mut(blocks.q * d).zip(lh.chunks_mut(blocks.q)))
            .map(Mutex::new)
            .collect();
        let per_head = l.div_ceil(blocks.q);
        for_each_task(tasks.len(), |t| {
            let (bh, qb) = (t / per_head, t % per_head);
            let (bi, hi) = (bh / h, bh % h);
            let mut guard = tasks[t].lock().expect("one task per block");
            let (ob, lb) = &mut *guard;
            let q0 = qb * blocks.q;
            let rows = lb.len();
            let (qh, kh, vh) =
                (Head::of(qv, bi, hi, l, d, h), Head::of(kv, bi, hi, s, d, h), Head::of(vv, bi, hi, s, d, h));
            let mut sc = vec![T::zero(); rows * blocks.kv];
            let mut m = vec![T::neg_infinity(); rows];
            let mut sum = vec![T::zero(); rows];
            let end = kv_end(&dm, causal, q0 + rows);
            for k0 in (0..end).step_by(blocks.kv) {
                let cols = blocks.kv.min(end - k0);
                gemm(
                    (rows, cols, d),
                    (&mut sc, cols, 1),
                    false,
                    (qh.rows(q0), qh.stride, 1),
                    (kh.rows(k0), 1, kh.stride),
                    1,
                );
                for r in 0..rows {
                    let row = &mut sc[r * cols..][..cols];
                    scale_and_mask(row, scale, causal, q0 + r, k0);
                    let mx = row.iter().fold(m[r], |a, &x| Float::max(a, x));
                    // rescale what the earlier blocks summed to the new maximum
                    let corr = if m[r] == T::neg_infinity() { T::zero() } else { (m[r] - mx).exp() };
                    sum[r] = sum[r] * corr + T::exp_sum(row, mx);
                    m[r] = mx;
                    ob[r * d..][..d].iter_mut().for_each(|y| *y *= corr);
                }
                gemm((rows, d, cols), (ob, d, 1), true, (&sc, cols, 1), (vh.rows(k0), vh.stride, 1), 1);
            }
            for r in 0..rows {
                let inv = sum[r].recip();
                ob[r * d..][..d].iter_mut().for_each(|y| *y *= inv);
                lb[r] = m[r] + sum[r].ln();
            }
        });
        drop(tasks);
        (o, lse)
    })?;
    let dev = q.device();
    Ok((Tensor::from_vec(o, (b, h, l, d), dev)?, Tensor::from_vec(lse, (b, h, l), dev)?))
}

/// The gradients of `forward` for q, k, v from its saved output `o` and `lse` (head-major) and
/// the output gradient `dout` [B, L, H·D]. Returns dq, dk, dv head-major.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    heads: usize,
    causal: bool,
    blocks: Blocks,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dm = dims(q, k, heads)?;
    let Dims { b, h, l, s, d } = dm;
    let scale = T::from_f64((d as f64).powf(-0.5));
    let (dq, dk, dv) = with_slices([q, k, v, o, lse, dout], |[qv, kv, vv, ov, lv, gv]: [&[T]; 6]| {
        let mut dq = vec![T::zero(); b * h * l * d];
        let mut dk = vec![T::zero(); b * h * s * d];
        let mut dv = vec![T::zero(); b * h * s * d];
        // one task per (image, head): it owns that head's dk and dv rows
        let tasks: Vec<_> = dq
            .chunks_mut(l * d)
            .zip(dk.chunks_mut(s * d).zip(dv.chunks_mut(s * d)))
            .map(Mutex::new)
            .collect();
        for_each_task(tasks.len(), |t| {
            let (bi, hi) = (t / h, t % h);
            let mut guard = tasks[t].lock().expect("one task per head");
            let (dqh, (dkh, dvh)) = &mut *guard;
            let (qh, kh, vh, gh) = (
                Head::of(qv, bi, hi, l, d, h),
                Head::of(kv, bi, hi, s, d, h),
                Head::of(vv, bi, hi, s, d, h),
                Head::of(gv, bi, hi, l, d, h),
            );
            let (oh, lh) = (&ov[t * l * d..][..l * d], &lv[t * l..][..l]);
            // D_i = Σ dO·O: the softmax backward's row term
            let delta: Vec<T> = (0..l)
                .map(|i| {
                    let g = &gh.rows(i)[..d];
                    g.iter().zip(&oh[i * d..][..d]).fold(T::zero(), |a, (&x, &y)| a + x * y)
                })
                .collect();
            let mut p = vec![T::zero(); blocks.q * blocks.kv];
            let mut dp = vec![T::zero(); blocks.q * blocks.kv];
            for q0 in (0..l).step_by(blocks.q) {
                let rows = blocks.q.min(l - q0);
                let end = kv_end(&dm, causal, q0 + rows);
                for k0 in (0..end).step_by(blocks.kv) {
                    let cols = blocks.kv.min(end - k0);
                    gemm(
                        (rows, cols, d),
                        (&mut p, cols, 1),
                        false,
                        (qh.rows(q0), qh.stride, 1),
                        (kh.rows(k0), 1, kh.stride),
                        1,
                    );
                    for r in 0..rows {
                        let row = &mut p[r * cols..][..cols];
                        scale_and_mask(row, scale, causal, q0 + r, k0);
                        T::exp_sum(row, lh[q0 + r]);
                    }
                    // dV += Pᵀ dO
                    gemm(
                        (cols, d, rows),
                        (&mut dvh[k0 * d..], d, 1),
                        true,
                        (&p, 1, cols),
                        (gh.rows(q0), gh.stride, 1),
                        1,
                    );
                    // dP = dO Vᵀ, then dS = P ∘ (dP − D) · scale in place
                    gemm(
                        (rows, cols, d),
                        (&mut dp, cols, 1),
                        false,
                        (gh.rows(q0), gh.stride, 1),
                        (vh.rows(k0), 1, vh.stride),
                        1,
                    );
                    for r in 0..rows {
                        for j in 0..cols {
                            let i = r * cols + j;
                            dp[i] = p[i] * (dp[i] - delta[q0 + r]) * scale;
                        }
                    }
                    // dQ += dS K, dK += dSᵀ Q
                    gemm(
                        (rows, d, cols),
                        (&mut dqh[q0 * d..], d, 1),
                        true,
                        (&dp, cols, 1),
                        (kh.rows(k0), kh.stride, 1),
                        1,
                    );
                    gemm(
                        (cols, d, rows),
                        (&mut dkh[k0 * d..], d, 1),
                        true,
                        (&dp, 1, cols),
                        (qh.rows(q0), qh.stride, 1),
                        1,
                    );
                }
            }
        });
        drop(tasks);
        (dq, dk, dv)
    })?;
    let dev = q.device();
    Ok((
        Tensor::from_vec(dq, (b, h, l, d), dev)?,
        Tensor::from_vec(dk, (b, h, s, d), dev)?,
        Tensor::from_vec(dv, (b, h, s, d), dev)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::softmax_last;
    use candle_core::{DType, Device, D};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::model::weights::random_tensor(seed, "flash", &shape.into(), DType::F64, &Device::Cpu).unwrap()
    }

    fn heads_first(x: &Tensor, h: usize) -> Tensor {
        let (b, l, c) = x.dims3().unwrap();
        x.reshape((b, l, h, c / h)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    /// Blocked against the materialised composition in f64: several query and key blocks with
    /// ragged last blocks, causal and not, self and cross lengths.
    #[test]
    fn blocked_equals_materialised_in_f64() {
        let blocks = Blocks { q: 4, kv: 3 };
        for (causal, l, s) in [(false, 10, 10), (true, 10, 10), (false, 9, 7), (false, 5, 1)] {
            let (b, h, d) = (2, 3, 4);
            let (q, k, v) = (rand(&[b, l, h * d], 1), rand(&[b, s, h * d], 2), rand(&[b, s, h * d], 3));
            let dout = rand(&[b, l, h * d], 4);
            let (o, lse) = forward::<f64>(&q, &k, &v, h, causal, blocks).unwrap();
            let (qh, kh, vh, gh) =
                (heads_first(&q, h), heads_first(&k, h), heads_first(&v, h), heads_first(&dout, h));
            let mut sc = (qh.matmul(&kh.t().unwrap()).unwrap() * (d as f64).powf(-0.5)).unwrap();
            if causal {
                let mask: Vec<f64> = (0..l)
                    .flat_map(|i| (0..s).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
                    .collect();
                sc = sc.broadcast_add(&Tensor::from_vec(mask, (l, s), &Device::Cpu).unwrap()).unwrap();
            }
            let p = softmax_last(&sc).unwrap();
            let want = p.matmul(&vh).unwrap();
            assert!(max_diff(&o, &want) < 1e-12, "output causal={causal} l={l} s={s}");
            let want_lse = sc.exp().unwrap().sum(D::Minus1).unwrap().log().unwrap();
            assert!(max_diff(&lse, &want_lse) < 1e-12, "lse causal={causal} l={l} s={s}");
            let (dq, dk, dv) = backward::<f64>(&q, &k, &v, &o, &lse, &dout, h, causal, blocks).unwrap();
            let dp = gh.matmul(&vh.t().unwrap()).unwrap();
            let ds = ((&p * dp.broadcast_sub(&(&dp * &p).unwrap().sum_keepdim(D::Minus1).unwrap()).unwrap())
                .unwrap()
                * (d as f64).powf(-0.5))
            .unwrap();
            assert!(max_diff(&dv, &p.t().unwrap().matmul(&gh).unwrap()) < 1e-12, "dv causal={causal}");
            assert!(max_diff(&dq, &ds.matmul(&kh).unwrap()) < 1e-12, "dq causal={causal}");
            assert!(max_diff(&dk, &ds.t().unwrap().matmul(&qh).unwrap()) < 1e-12, "dk causal={causal}");
        }
    }
}
