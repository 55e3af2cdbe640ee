//! Stride-1 convolutions on the CPU in f32 as one GEMM per kernel tap, with no im2col matrix and
//! no reordered copy of the kernel.
//!
//! The images are copied once into a zero-bordered buffer `Xp[C, N·(Hp·Wp + k − 1)]`, each
//! image's plane after the last. On that grid the output pixel q = oy·Wp + ox reads tap (i, j) at
//! q + i·Wp + j, so tap (i, j) is a plain GEMM `Y'[O, ·] += W[:, :, i, j] · Xp[:, i·Wp + j ..]`
//! over the whole batch whose operands are strided views; the k − 1 columns past each output row
//! and the rows between images are dropped at the end. The input gradient runs the same
//! loop with the kernel read transposed and mirrored through its strides, and the kernel gradient
//! is the same product with the roles of the operands swapped.
use super::cpu::{all_threads, gemm, with_f32};
use candle_core::{Result, Storage, Tensor};

/// The padded grid of one convolution: input planes H×W, kernel k×k, padding p, stride 1.
#[derive(Clone, Copy)]
struct Grid {
    h: usize,
    w: usize,
    k: usize,
    p: usize,
}

impl Grid {
    fn hp(&self) -> usize {
        self.h + 2 * self.p
    }
    fn wp(&self) -> usize {
        self.w + 2 * self.p
    }
    fn ho(&self) -> usize {
        self.hp() + 1 - self.k
    }
    fn wo(&self) -> usize {
        self.wp() + 1 - self.k
    }
    /// One padded plane, with room for the last tap's overrun.
    fn plane(&self) -> usize {
        self.hp() * self.wp() + self.k - 1
    }
    /// Output pixels on the padded-width grid.
    fn q(&self) -> usize {
        self.ho() * self.wp()
    }

    /// Output columns for `n` images: each image's plane follows the last, so one GEMM covers
    /// the batch (the columns between images are computed and dropped).
    fn cols(&self, n: usize) -> usize {
        (n - 1) * self.plane() + self.q()
    }

    /// Zero-bordered planes of all images, [C, N·plane]: channel c of image b at c·N·plane +
    /// b·plane. `x` is [N, C, H, W].
    fn pad(&self, x: &[f32], n: usize, c: usize) -> Vec<f32> {
        let (h, w, p, wp, plane) = (self.h, self.w, self.p, self.wp(), self.plane());
        let mut xp = vec![0f32; c * n * plane];
        for (i, src) in x.chunks_exact(h * w).enumerate() {
            let (b, ch) = (i / c, i % c);
            let dst = &mut xp[(ch * n + b) * plane..][..plane];
            for (y, row) in src.chunks_exact(w).enumerate() {
                dst[(y + p) * wp + p..][..w].copy_from_slice(row);
            }
        }
        xp
    }

    /// The valid outputs of [O, cols(N)] as [N, O, Ho, Wo]: the first `wo` of every `wp` columns
    /// of each image's `q`.
    fn crop(&self, yq: &[f32], n: usize, o: usize) -> Vec<f32> {
        let (wp, wo, cols) = (self.wp(), self.wo(), self.cols(n));
        let mut y = vec![0f32; n * o * self.ho() * wo];
        for (i, dst) in y.chunks_exact_mut(self.ho() * wo).enumerate() {
            let (b, oc) = (i / o, i % o);
            let src = &yq[oc * cols + b * self.plane()..][..self.q()];
            for (s, d) in src.chunks_exact(wp).zip(dst.chunks_exact_mut(wo)) {
                d.copy_from_slice(&s[..wo]);
            }
        }
        y
    }

    /// dy [N, O, Ho, Wo] placed on the grid of `crop`, [O, cols(N)], zero elsewhere.
    fn uncrop(&self, dy: &[f32], n: usize, o: usize) -> Vec<f32> {
        let (wp, wo, cols) = (self.wp(), self.wo(), self.cols(n));
        let mut dq = vec![0f32; o * cols];
        for (i, src) in dy.chunks_exact(self.ho() * wo).enumerate() {
            let (b, oc) = (i / o, i % o);
            let dst = &mut dq[oc * cols + b * self.plane()..][..self.q()];
            for (s, d) in src.chunks_exact(wo).zip(dst.chunks_exact_mut(wp)) {
                d[..wo].copy_from_slice(s);
            }
        }
        dq
    }
}

/// Runs `f` on the storage of the CPU f32 tensor `w` [O, C, k, k] from its first element, with
/// its four strides: a tap-major kernel (`tap_major`) is read in place.
fn with_strided<R>(w: &Tensor, f: impl FnOnce(&[f32], [usize; 4]) -> R) -> Result<R> {
    let (storage, layout) = w.storage_and_layout();
    let (Storage::Cpu(cpu), [a, b, c, d]) = (&*storage, layout.stride()) else {
        candle_core::bail!("conv_taps: expected a 4-d CPU kernel")
    };
    Ok(f(&cpu.as_slice::<f32>()?[layout.start_offset()..], [*a, *b, *c, *d]))
}

/// The kernel [O, C, k, k] as a view of tap-major storage [k, k, O, C]: each tap's [O, C]
/// matrix is then contiguous for the GEMMs (read through the stride of k² instead, a 1280-channel
/// kernel at 8×8 pixels ran at a third of the GEMM's speed).
pub fn tap_major(w: &Tensor) -> Result<Tensor> {
    w.permute((2, 3, 0, 1))?.contiguous()?.permute((2, 3, 0, 1))
}

/// The kernel [O, C, k, k] as a [rows, cols] matrix per tap: the forward reads W[:, :, i, j]
/// ([O, C]); the input gradient reads W[:, :, k−1−i, k−1−j]ᵀ ([C, O]).
#[derive(Clone, Copy)]
enum Kernel {
    Forward,
    Transposed,
}

/// The convolution of every image of `x` [N, Cin, H, W] by the kernel `w` [O, C, k, k] read as
/// `how` says, stride 1, padding `p`: [N, Cout, Ho, Wo].
fn convolve(x: &Tensor, w: &Tensor, p: usize, how: Kernel) -> Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let (o, c, k, k2) = w.dims4()?;
    if k != k2 || cin != if matches!(how, Kernel::Forward) { c } else { o } || h + 2 * p < k || wd + 2 * p < k
    {
        candle_core::bail!(
            "conv_taps: input {:?} does not fit kernel {:?} with padding {p}",
            x.dims(),
            w.dims()
        );
    }
    let g = Grid { h, w: wd, k, p };
    let y = with_f32(x, |xv| {
        with_strided(w, |wv, [so, sc, si, sj]| {
            let (cout, rs, cs) = match how {
                Kernel::Forward => (o, so, sc),
                Kernel::Transposed => (c, sc, so),
            };
            let xp = g.pad(xv, n, cin);
            let cols = g.cols(n);
            let mut yq = vec![0f32; cout * cols];
            for i in 0..k {
                for j in 0..k {
                    let tap = match how {
                        Kernel::Forward => i * si + j * sj,
                        Kernel::Transposed => (k - 1 - i) * si + (k - 1 - j) * sj,
                    };
                    gemm(
                        (cout, cols, cin),
                        (&mut yq, cols, 1),
                        i + j > 0,
                        (&wv[tap..], rs, cs),
                        (&xp[i * g.wp() + j..], n * g.plane(), 1),
                        all_threads(),
                    );
                }
            }
            g.crop(&yq, n, cout)
        })
    })??;
    let cout = if matches!(how, Kernel::Forward) { o } else { c };
    Tensor::from_vec(y, (n, cout, g.ho(), g.wo()), x.device())
}

/// y = conv(x, w), stride 1, padding `p`; x [N, C, H, W] f32 on the CPU, w [O, C, k, k].
pub fn conv2d(x: &Tensor, w: &Tensor, p: usize) -> Result<Tensor> {
    convolve(x, w, p, Kernel::Forward)
}

/// dx of y = conv(x, w) with stride 1 and padding `p` from dy [N, O, Ho, Wo]: the convolution of
/// dy by the mirrored, transposed kernel with padding k − 1 − p.
pub fn input_grad(dy: &Tensor, w: &Tensor, p: usize) -> Result<Tensor> {
    let k = w.dim(2)?;
    convolve(dy, w, k - 1 - p, Kernel::Transposed)
}

/// dW [O, C, k, k] of y = conv(x, w) with stride 1 and padding `p`, from x [N, C, H, W] and
/// dy [N, O, Ho, Wo]: per tap, dy on the padded-width grid (zeros past each row) times the
/// shifted planes of x, summed over the images.
pub fn kernel_grad(
    x: &Tensor,
    dy: &Tensor,
    (o, c, k, k2): (usize, usize, usize, usize),
    p: usize,
) -> Result<Tensor> {
    let (n, cx, h, wd) = x.dims4()?;
    let g = Grid { h, w: wd, k, p };
    if k != k2 || cx != c || h + 2 * p < k || wd + 2 * p < k || dy.dims4()? != (n, o, g.ho(), g.wo()) {
        candle_core::bail!("kernel_grad: dy {:?} is not the output of this convolution", dy.dims());
    }
    let kk = k * k;
    let dw = with_f32(x, |xv| {
        with_f32(dy, |dyv| {
            let (xp, dq) = (g.pad(xv, n, c), g.uncrop(dyv, n, o));
            let cols = g.cols(n);
            let mut dw = vec![0f32; o * c * kk];
            for tap in 0..kk {
                let (i, j) = (tap / k, tap % k);
                gemm(
                    (o, c, cols),
                    (&mut dw[tap..], c * kk, kk),
                    false,
                    (&dq, cols, 1),
                    (&xp[i * g.wp() + j..], 1, n * g.plane()),
                    all_threads(),
                );
            }
            dw
        })
    })??;
    Tensor::from_vec(dw, (o, c, k, k), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        crate::model::weights::random_tensor(seed, "conv_taps", &shape.into(), DType::F32, &Device::Cpu)
            .unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Against candle's direct convolution and its transposed convolution, in f32, for odd and
    /// even kernels, paddings 0 and 1, non-square planes and two images.
    #[test]
    fn taps_equal_candles_convolutions() {
        for (k, p, h, w) in [(3, 1, 7, 5), (3, 0, 6, 9), (1, 0, 4, 3), (2, 1, 5, 5)] {
            let x = rand(&[2, 5, h, w], 1);
            let wt = rand(&[6, 5, k, k], 2);
            let y = conv2d(&x, &wt, p).unwrap();
            let want = x.conv2d(&wt, p, 1, 1, 1).unwrap();
            let tm = tap_major(&wt).unwrap();
            assert!(k == 1 || !tm.is_contiguous());
            assert_eq!(max_rel(&conv2d(&x, &tm, p).unwrap(), &y), 0.0, "tap-major kernel k{k} p{p}");
            let dy = rand(y.dims(), 3);
            assert_eq!(max_rel(&input_grad(&dy, &tm, p).unwrap(), &input_grad(&dy, &wt, p).unwrap()), 0.0);
            assert!(max_rel(&y, &want) < 1e-5, "forward k{k} p{p}: {}", max_rel(&y, &want));
            let dy = rand(y.dims(), 3);
            let dx = input_grad(&dy, &wt, p).unwrap();
            let want = dy.conv_transpose2d(&wt, p, 0, 1, 1).unwrap();
            assert!(max_rel(&dx, &want) < 1e-5, "input grad k{k} p{p}: {}", max_rel(&dx, &want));
            let dw = kernel_grad(&x, &dy, wt.dims4().unwrap(), p).unwrap();
            // Σ_b,o,q dy·y is linear in w, so its gradient is the sum of the per-tap windows
            let want = crate::model::layers::conv::kernel_grad_by_windows(&x, &dy, wt.dims4().unwrap(), 1, p)
                .unwrap();
            assert!(max_rel(&dw, &want) < 1e-5, "kernel grad k{k} p{p}: {}", max_rel(&dw, &want));
        }
    }
}
