//! GEGLU (diffusers' `GEGLU` after `ff.net.0.proj`): h = a ⊙ gelu(g) for the halves [a | g] of the
//! projection's last dimension. On the CPU in f32 the forward and the backward are one
//! vectorised pass each (`vmath`); elsewhere candle's ops compose the same formula.
use super::activation::gelu_backward;
use super::cpu::{for_each_task, with_f32};
use candle_core::{DType, Result, Tensor, D};
use std::sync::Mutex;

fn fused(proj: &Tensor) -> bool {
    proj.device().is_cpu() && proj.dtype() == DType::F32
}

/// Rows per task: a few hundred KB of activations each.
fn rows_per_task(f: usize) -> usize {
    (32_768 / f).max(1)
}

/// proj [.., 2F] → h [.., F].
pub fn forward(proj: &Tensor) -> Result<Tensor> {
    let f = proj.dim(D::Minus1)? / 2;
    if !fused(proj) {
        let chunks = proj.chunk(2, D::Minus1)?;
        return chunks[0].contiguous()? * chunks[1].contiguous()?.gelu_erf()?;
    }
    let mut dims = proj.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = f;
    let h = with_f32(proj, |p| {
        let rows = p.len() / (2 * f);
        let mut h = vec![0f32; rows * f];
        let per = rows_per_task(f);
        let parts: Vec<_> = h.chunks_mut(per * f).map(Mutex::new).collect();
        for_each_task(parts.len(), |t| {
            let mut out = parts[t].lock().expect("one task per part");
            for (r, o) in out.chunks_mut(f).enumerate() {
                let row = &p[(t * per + r) * 2 * f..][..2 * f];
                super::vmath::geglu(&row[..f], &row[f..], o);
            }
        });
        drop(parts);
        h
    })?;
    Tensor::from_vec(h, dims, proj.device())
}

/// d proj [.., 2F] from the projection and the output gradient dh [.., F].
pub fn backward(proj: &Tensor, dh: &Tensor) -> Result<Tensor> {
    let f = proj.dim(D::Minus1)? / 2;
    if !fused(proj) || dh.dtype() != DType::F32 {
        let chunks = proj.chunk(2, D::Minus1)?;
        let (a, g) = (chunks[0].contiguous()?, chunks[1].contiguous()?);
        let da = (dh * g.gelu_erf()?)?;
        let dg = gelu_backward(&g, &(dh * &a)?)?;
        return Tensor::cat(&[da, dg], D::Minus1);
    }
    let d = with_f32(proj, |p| {
        with_f32(dh, |dhv| {
            let rows = p.len() / (2 * f);
            let mut d = vec![0f32; rows * 2 * f];
            let per = rows_per_task(f);
            let parts: Vec<_> = d.chunks_mut(per * 2 * f).map(Mutex::new).collect();
            for_each_task(parts.len(), |t| {
                let mut out = parts[t].lock().expect("one task per part");
                for (r, o) in out.chunks_mut(2 * f).enumerate() {
                    let i = t * per + r;
                    let (row, grad) = (&p[i * 2 * f..][..2 * f], &dhv[i * f..][..f]);
                    let (da, dg) = o.split_at_mut(f);
                    super::vmath::geglu_backward(&row[..f], &row[f..], grad, da, dg);
                }
            });
            drop(parts);
            d
        })
    })??;
    Tensor::from_vec(d, proj.shape(), proj.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused f32 pass against candle's composition in f64 on the same values, forward and
    /// backward, with rows split across several tasks.
    #[test]
    fn fused_equals_the_composition() {
        let rand = |shape: &[usize], seed| {
            crate::model::weights::random_tensor(seed, "geglu", &shape.into(), DType::F64, &Device::Cpu)
                .unwrap()
        };
        let proj = (rand(&[2, 300, 2 * 130], 1) * 4.0).unwrap();
        let dh = rand(&[2, 300, 130], 2);
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let err = |a: &Tensor, b: &Tensor| {
            let d = (a.to_dtype(DType::F64).unwrap() - b).unwrap().abs().unwrap().max_all().unwrap();
            d.to_scalar::<f64>().unwrap() / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
        };
        let (h, want) = (forward(&f32s(&proj)).unwrap(), forward(&proj).unwrap());
        assert!(err(&h, &want) < 1e-6, "forward {}", err(&h, &want));
        let (d, want) = (backward(&f32s(&proj), &f32s(&dh)).unwrap(), backward(&proj, &dh).unwrap());
        assert!(err(&d, &want) < 1e-6, "backward {}", err(&d, &want));
    }
}
