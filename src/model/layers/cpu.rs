//! What the CPU kernels (`conv_taps`, `im2col`, `flash`) share: a bounds-checked strided GEMM,
//! borrowed views of tensors' values, and tasks on candle's thread pool.
use candle_core::{Result, Storage, Tensor, WithDType};

/// A matrix operand: (values, row stride, column stride).
pub type Mat<'a, T> = (&'a [T], usize, usize);

/// dst [m, n] = (accumulate ? dst : 0) + lhs [m, k] · rhs [k, n], dst given as (values, row
/// stride, column stride), on `threads` threads (1 inside tasks that are the parallelism).
pub fn gemm<T: WithDType + num_traits::One>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (&mut [T], usize, usize),
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): Mat<'_, T>,
    (rhs, rhs_rs, rhs_cs): Mat<'_, T>,
    threads: usize,
) {
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        m > 0
            && n > 0
            && k > 0
            && dst.len() > last(dst_rs, dst_cs, m, n)
            && lhs.len() > last(lhs_rs, lhs_cs, m, k)
            && rhs.len() > last(rhs_rs, rhs_cs, k, n)
    );
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the assert above keeps every element the strides reach inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs as isize,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { T::one() } else { T::zero() },
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// All threads, for a GEMM that is not inside a task.
pub fn all_threads() -> usize {
    rayon::current_num_threads()
}

/// Runs `f` on the values of the CPU tensors `ts`, each in row-major order: borrowed where a
/// tensor is contiguous (every candle copy here was a pass over the activations).
pub fn with_slices<T: WithDType, R, const N: usize>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[T]; N]) -> R,
) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let (Storage::Cpu(cpu), Some((a, b))) = (&**storage, layout.contiguous_offsets()) else {
            candle_core::bail!("expected CPU tensors")
        };
        views.push(&cpu.as_slice::<T>()?[a..b]);
    }
    let Ok(views) = views.try_into() else { unreachable!("N views") };
    Ok(f(views))
}

/// `with_slices` for one f32 tensor.
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_slices([t], |[v]: [&[f32]; 1]| f(v))
}

/// Runs `f(i)` for every task i < n on candle's own CPU thread pool. On rayon's, candle's worker
/// kept spinning for the next candle op on a core the tasks needed.
pub fn for_each_task(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |r| r.for_each(&f));
}
