//! LyCORIS's LoHa and LoKr as trainable adapters: the weight difference ΔW is built whole from
//! its factors each step, applied as one more weight (y += k·ΔW ⋆ x), and its gradient
//! dΔW = k·(x ⋆ᵀ dy) is taken back to the factors.
//! LoHa: ΔW = s·(w1a·w1b) ⊙ (w2a·w2b). LoKr: ΔW = s·kron(w1, w2), each factor whole or w_a·w_b.
use super::adapter::Op;
use super::Grads;
use candle_core::{Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FactorKind {
    Hada,
    Kron,
}

/// An adapter's factors by LyCORIS part name (`hada_w1_a` …, `lokr_w1` or `lokr_w1_a`/`_b` …).
#[derive(Clone)]
pub struct Factors {
    pub kind: FactorKind,
    pub vars: Vec<(&'static str, Var)>,
}

impl Factors {
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    fn t(&self, name: &str) -> Option<Tensor> {
        self.get(name).map(|v| v.as_tensor().detach())
    }

    /// The rank that scales the difference (ComfyUI's rule): LoHa's w1b rows; LoKr's decomposed
    /// factor's inner size (w2's before w1's), None when both LoKr factors are whole (scale 1).
    pub fn rank(&self) -> Option<usize> {
        let inner = |n: &str| self.get(n).and_then(|v| v.dim(0).ok());
        match self.kind {
            FactorKind::Hada => inner("hada_w1_b"),
            FactorKind::Kron => inner("lokr_w2_b").or(inner("lokr_w1_b")),
        }
    }

    /// ΔW / s for a weight of `shape`.
    pub fn delta(&self, shape: &[usize]) -> Result<Tensor> {
        let d = match self.kind {
            FactorKind::Hada => {
                (self.pair("hada_w1_a", "hada_w1_b")? * self.pair("hada_w2_a", "hada_w2_b")?)?
            }
            FactorKind::Kron => kron(&self.side("lokr_w1")?, &self.side("lokr_w2")?, shape)?,
        };
        d.reshape(shape)
    }

    fn pair(&self, a: &str, b: &str) -> Result<Tensor> {
        let (a, b) = (self.t(a).expect("factor"), self.t(b).expect("factor"));
        let r = b.dim(0)?;
        a.reshape(((), r))?.matmul(&b.reshape((r, ()))?)
    }

    /// A LoKr side: whole (`lokr_w1`) or the product of its pair, 2-D.
    fn side(&self, name: &str) -> Result<Tensor> {
        match self.t(name) {
            Some(w) => w.reshape((w.dim(0)?, ())),
            None => self.pair(&format!("{name}_a"), &format!("{name}_b")),
        }
    }

    /// Adds the factors' gradients for dD = dΔW / s (shaped as the weight) to `grads`.
    pub fn backward(&self, dd: &Tensor, grads: &mut Grads) -> Result<()> {
        match self.kind {
            FactorKind::Hada => {
                let (p1, p2) = (self.pair("hada_w1_a", "hada_w1_b")?, self.pair("hada_w2_a", "hada_w2_b")?);
                let dd = dd.reshape(p1.shape())?;
                self.pair_backward("hada_w1_a", "hada_w1_b", &(&dd * &p2)?, grads)?;
                self.pair_backward("hada_w2_a", "hada_w2_b", &(&dd * &p1)?, grads)
            }
            FactorKind::Kron => {
                let (w1, w2) = (self.side("lokr_w1")?, self.side("lokr_w2")?);
                let ((a, b), (c, dk)) = (w1.dims2()?, w2.dims2()?);
                // D[i·c + k, j·dk + l] = w1[i, j]·w2[k, l]
                let d4 = dd.reshape((a, c, b, dk))?.permute((0, 2, 1, 3))?.reshape((a * b, c * dk))?;
                let dw1 = d4.matmul(&w2.reshape((c * dk, 1))?)?.reshape((a, b))?;
                let dw2 = w1.reshape((1, a * b))?.matmul(&d4)?.reshape((c, dk))?;
                self.side_backward("lokr_w1", &dw1, grads)?;
                self.side_backward("lokr_w2", &dw2, grads)
            }
        }
    }

    /// dP for P = w_a·w_b into dw_a = dP·w_bᵀ, dw_b = w_aᵀ·dP.
    fn pair_backward(&self, a: &str, b: &str, dp: &Tensor, grads: &mut Grads) -> Result<()> {
        let (va, vb) = (self.get(a).expect("factor"), self.get(b).expect("factor"));
        let r = vb.dim(0)?;
        let (ta, tb) = (va.as_tensor().detach().reshape(((), r))?, vb.as_tensor().detach().reshape((r, ()))?);
        grads.add_weight(va.as_tensor(), dp.matmul(&tb.t()?)?.reshape(va.shape())?)?;
        grads.add_weight(vb.as_tensor(), ta.t()?.matmul(dp)?.reshape(vb.shape())?)
    }

    fn side_backward(&self, name: &str, dw: &Tensor, grads: &mut Grads) -> Result<()> {
        match self.get(name) {
            Some(v) => grads.add_weight(v.as_tensor(), dw.reshape(v.shape())?),
            None => self.pair_backward(&format!("{name}_a"), &format!("{name}_b"), dw, grads),
        }
    }
}

/// kron(w1 [a, b], w2 [c, d·kernel]) as torch.kron lays it out for a weight of `shape`
/// [a·c, b·d, …]: out[i·c + k, (j·d + l)·kernel + s] = w1[i, j]·w2[k, l·kernel + s].
pub fn kron(w1: &Tensor, w2: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let (a, b) = w1.dims2()?;
    let c = shape[0] / a;
    let dk = shape[1..].iter().product::<usize>() / b;
    let w2 = w2.reshape((1, c, 1, dk))?;
    w1.reshape((a, 1, b, 1))?.broadcast_mul(&w2)?.reshape((a * c, b * dk))
}

/// y's addition k·s·ΔW ⋆ x.
pub fn forward(f: &Factors, op: Op, w_shape: &[usize], x: &Tensor, ks: f64) -> Result<Tensor> {
    let dw = f.delta(w_shape)?;
    op.forward(x, &(dw * ks)?)
}

/// Factor gradients into `grads`; returns dx.
pub fn backward(
    f: &Factors,
    op: Op,
    w_shape: &[usize],
    x: &Tensor,
    dy: &Tensor,
    ks: f64,
    grads: &mut Grads,
) -> Result<Tensor> {
    let dw = (op.weight_grad(x, dy, w_shape)? * ks)?;
    f.backward(&dw, grads)?;
    op.input_grad(dy, &(f.delta(w_shape)? * ks)?, x.dims())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> =
            (0..n).map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f64 / 500.0 - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// kron as torch defines it, element by element.
    #[test]
    fn kron_of_a_conv_kernel_is_torch_kron() {
        let (w1, w2) = (t(&[2, 3], 1), t(&[4, 5, 3, 3], 2));
        let got: Vec<f64> = kron(&w1, &w2, &[8, 15, 3, 3]).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let a = w1.to_vec2::<f64>().unwrap();
        let b: Vec<f64> = w2.flatten_all().unwrap().to_vec1().unwrap();
        for (i, row) in a.iter().enumerate() {
            for (j, aij) in row.iter().enumerate() {
                for k in 0..4 {
                    for l in 0..5 {
                        for s in 0..9 {
                            let out = (((i * 4 + k) * 15) + (j * 5 + l)) * 9 + s;
                            assert_eq!(got[out], aij * b[((k * 5) + l) * 9 + s], "[{i} {j} {k} {l} {s}]");
                        }
                    }
                }
            }
        }
    }
}
