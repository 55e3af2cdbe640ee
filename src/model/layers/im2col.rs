//! The CPU f32 strided convolution (the downsamplers): an im2col matrix built one contiguous run
//! of channels per kernel tap (from a channels-last copy of the input) and one GEMM per image,
//! for the forward and for the kernel gradient. Stride-1 convolutions go through `conv_taps`.
use super::cpu::{all_threads, for_each_task, gemm, with_f32};
use candle_core::{Result, Tensor};
use std::sync::Mutex;

/// `v` cut into chunks of `len`, each lockable by the one task that fills it.
fn chunks(v: &mut [f32], len: usize) -> Vec<Mutex<&mut [f32]>> {
    v.chunks_mut(len).map(Mutex::new).collect()
}

/// The geometry of one convolution: input [N, C, H, W], kernel KH×KW, output [N, ·, HO, WO].
struct Im2Col {
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    ho: usize,
    wo: usize,
}

impl Im2Col {
    /// Output pixels per image: the im2col matrix's rows.
    fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// Taps × channels: its columns, tap-major as [KH, KW, C].
    fn k(&self) -> usize {
        self.kh * self.kw * self.c
    }

    /// Image `b` of the channels-last input `xl` as a [P, K] matrix, zero where padded.
    fn matrix(&self, xl: &[f32], b: usize) -> Vec<f32> {
        let (c, k) = (self.c, self.k());
        let mut col = vec![0f32; self.p() * k];
        for oy in 0..self.ho {
            for ox in 0..self.wo {
                let row = &mut col[(oy * self.wo + ox) * k..][..k];
                for i in 0..self.kh {
                    let Some(iy) = (oy * self.stride + i).checked_sub(self.padding).filter(|&y| y < self.h)
                    else {
                        continue;
                    };
                    for j in 0..self.kw {
                        let Some(ix) =
                            (ox * self.stride + j).checked_sub(self.padding).filter(|&x| x < self.w)
                        else {
                            continue;
                        };
                        let src = ((b * self.h + iy) * self.w + ix) * c;
                        row[(i * self.kw + j) * c..][..c].copy_from_slice(&xl[src..src + c]);
                    }
                }
            }
        }
        col
    }
}

fn geometry(x: &Tensor, (kh, kw): (usize, usize), stride: usize, padding: usize) -> Result<Im2Col> {
    let (_, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h + 2 * padding - kh) / stride + 1, (w + 2 * padding - kw) / stride + 1);
    Ok(Im2Col { c, h, w, kh, kw, stride, padding, ho, wo })
}

/// [N, C, H, W] → channels-last values [N, H, W, C], in one pass, images in parallel.
fn channels_last(x: &Tensor) -> Result<Vec<f32>> {
    let (n, c, h, w) = x.dims4()?;
    let hw = h * w;
    with_f32(x, |v| {
        let mut out = vec![0f32; n * hw * c];
        let parts = chunks(&mut out, hw * c);
        for_each_task(n, |b| {
            let mut ob = parts[b].lock().expect("one task per image");
            for (ch, plane) in v[b * c * hw..][..c * hw].chunks_exact(hw).enumerate() {
                for (p, &e) in plane.iter().enumerate() {
                    ob[p * c + ch] = e;
                }
            }
        });
        drop(parts);
        out
    })
}

/// y = conv(x, w), x [N, C, H, W] f32 on the CPU, w [O, C, KH, KW]; shapes already checked.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (o, _, kh, kw) = w.dims4()?;
    conv2d_rows(x, &channels_last(w)?, (o, kh, kw), padding, stride)
}

/// The convolution with a kernel given as channels-last rows [O, KH, KW, C].
fn conv2d_rows(
    x: &Tensor,
    wr: &[f32],
    (o, kh, kw): (usize, usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    let g = geometry(x, (kh, kw), stride, padding)?;
    let (p, k) = (g.p(), g.k());
    let xl = channels_last(x)?;
    let mut y = vec![0f32; n * o * p];
    // one image per task: its [P, K] matrix stays in cache for its GEMM; a lone image (the VAE
    // decodes one at a time) gives the threads to the GEMM instead
    if n == 1 {
        let col = g.matrix(&xl, 0);
        gemm((o, p, k), (&mut y, p, 1), false, (wr, k, 1), (&col, 1, k), all_threads());
    } else {
        let parts = chunks(&mut y, o * p);
        for_each_task(n, |b| {
            let col = g.matrix(&xl, b);
            gemm(
                (o, p, k),
                (&mut parts[b].lock().expect("one task per image"), p, 1),
                false,
                (wr, k, 1),
                (&col, 1, k),
                1,
            );
        });
    }
    Tensor::from_vec(y, (n, o, g.ho, g.wo), x.device())
}

/// dW [O, C, KH, KW] of y = conv(x, w) from x and dy [N, O, HO, WO]: Σ over images of dy · col.
pub fn kernel_grad(
    x: &Tensor,
    dy: &Tensor,
    (o, _, kh, kw): (usize, usize, usize, usize),
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let n = x.dim(0)?;
    let g = geometry(x, (kh, kw), stride, padding)?;
    let (p, k, c) = (g.p(), g.k(), g.c);
    if dy.dims4()? != (n, o, g.ho, g.wo) {
        candle_core::bail!("kernel_grad: dy {:?} is not the output of this convolution", dy.dims());
    }
    let xl = channels_last(x)?;
    let threads = if n == 1 { all_threads() } else { 1 };
    let dw = with_f32(dy, |dyv| {
        let mut each = vec![0f32; n * o * k];
        let parts = chunks(&mut each, o * k);
        let one = |b: usize| {
            let col = g.matrix(&xl, b);
            let mut dwb = parts[b].lock().expect("one task per image");
            gemm((o, k, p), (&mut dwb, k, 1), false, (&dyv[b * o * p..], p, 1), (&col, k, 1), threads);
        };
        if n == 1 {
            one(0)
        } else {
            for_each_task(n, one)
        }
        drop(parts);
        let mut dw = vec![0f32; o * k];
        for part in each.chunks_exact(o * k) {
            dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
        }
        dw
    })?;
    Tensor::from_vec(dw, (o, kh, kw, c), x.device())?.permute((0, 3, 1, 2))?.contiguous()
}
