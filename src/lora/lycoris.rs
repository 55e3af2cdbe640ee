//! LyCORIS's LoHa and LoKr modules as kohya-named files carry them, read for generating and
//! merging: their weight difference is built whole, with ComfyUI's arithmetic (comfy/
//! weight_adapter/loha.py, lokr.py).
//! LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / rank.
//! LoKr: ΔW = kron(w1, w2), each factor whole or a product w_a·w_b, · alpha / the inner dimension
//! of a product (1 when both factors are whole).
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::BTreeMap;

/// The tensor names after a module's stem, in both kinds.
const PARTS: &[&str] = &[
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
];

/// `lora_unet_x.hada_w1_a` → (`lora_unet_x`, `hada_w1_a`).
pub fn split(name: &str) -> Option<(&str, &'static str)> {
    let (stem, part) = name.rsplit_once('.')?;
    PARTS.iter().find(|p| **p == part).map(|p| (stem, *p))
}

/// One LoHa or LoKr module.
#[derive(Clone)]
pub struct Lycoris {
    pub parts: BTreeMap<&'static str, Tensor>,
    pub alpha: Option<f64>,
}

impl Lycoris {
    pub fn kind(&self) -> &'static str {
        if self.parts.keys().any(|k| k.starts_with("hada")) {
            "LoHa"
        } else {
            "LoKr"
        }
    }

    /// Whole, of one kind, without the Tucker cores this reader leaves out.
    pub fn check(&self) -> Result<()> {
        let has = |k: &str| self.parts.contains_key(k);
        if self.parts.keys().any(|k| k.starts_with("hada"))
            && self.parts.keys().any(|k| k.starts_with("lokr"))
        {
            bail!("mixes LoHa and LoKr tensors");
        }
        if has("hada_t1") || has("hada_t2") || has("lokr_t2") {
            bail!("uses LyCORIS's Tucker decomposition (hada_t1/t2, lokr_t2), which sdlora does not read");
        }
        let whole = match self.kind() {
            "LoHa" => ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"].iter().all(|k| has(k)),
            _ => {
                (has("lokr_w1") || (has("lokr_w1_a") && has("lokr_w1_b")))
                    && (has("lokr_w2") || (has("lokr_w2_a") && has("lokr_w2_b")))
            }
        };
        if !whole {
            bail!("lacks some of its {} factors", self.kind());
        }
        Ok(())
    }

    pub fn params(&self) -> usize {
        self.parts.values().map(|t| t.elem_count()).sum()
    }

    fn get(&self, k: &str) -> Result<Tensor> {
        Ok(self.parts[k].to_dtype(DType::F64)?)
    }

    /// A product w_a · w_b over its inner dimension.
    fn product(&self, a: &str, b: &str) -> Result<Tensor> {
        let (wa, wb) = (self.get(a)?, self.get(b)?);
        let r = wb.dim(0)?;
        Ok(wa.reshape(((), r))?.matmul(&wb.reshape((r, ()))?)?)
    }

    /// ΔW in the adapted weight's `shape`, in f64.
    pub fn delta(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let d = if self.kind() == "LoHa" {
            let rank = self.parts["hada_w1_b"].dim(0)?;
            let scale = self.alpha.map_or(1.0, |a| a / rank as f64);
            ((self.product("hada_w1_a", "hada_w1_b")? * self.product("hada_w2_a", "hada_w2_b")?)? * scale)?
        } else {
            let mut dim = None;
            let w1 = match self.parts.get("lokr_w1") {
                Some(_) => self.get("lokr_w1")?,
                None => {
                    dim = Some(self.parts["lokr_w1_b"].dim(0)?);
                    self.product("lokr_w1_a", "lokr_w1_b")?
                }
            };
            let w2 = match self.parts.get("lokr_w2") {
                Some(_) => self.get("lokr_w2")?,
                None => {
                    dim = Some(self.parts["lokr_w2_b"].dim(0)?);
                    self.product("lokr_w2_a", "lokr_w2_b")?
                }
            };
            let scale = match (self.alpha, dim) {
                (Some(a), Some(d)) => a / d as f64,
                _ => 1.0,
            };
            (kron(&w1, &w2, shape)? * scale)?
        };
        if d.elem_count() != n {
            bail!(
                "{} factors make {} values, the layer's weight {shape:?} has {n}",
                self.kind(),
                d.elem_count()
            );
        }
        Ok(d.reshape(shape)?)
    }
}

/// kron(w1 [a, b], w2 [c, d, …]) as torch.kron gives it for the adapted weight's `shape`: w1's
/// dimensions pair with w2's first two ([a·c, b·d, …]); a product factor comes 2-D and takes
/// w2's kernel shape back from `shape`.
fn kron(w1: &Tensor, w2: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let (a, b) = w1.dims2()?;
    let c = shape[0] / a;
    let rest: usize = shape[1..].iter().product();
    let d_k = rest / b; // w2's second dimension times the kernel
    let w2 = w2.reshape((c, d_k))?;
    let kernel: usize = shape[2..].iter().product();
    let d = d_k / kernel;
    // out[i·c + k, (j·d + l)·kernel + s] = w1[i, j] · w2[k, l·kernel + s]
    let w1e = w1.reshape((a, 1, b, 1))?;
    let w2e = w2.reshape((1, c, 1, d * kernel))?;
    Ok(w1e.broadcast_mul(&w2e)?.reshape((a * c, b * d * kernel))?)
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

    #[test]
    fn lokr_scale_is_alpha_over_the_decomposed_rank_and_one_for_whole_factors() {
        let parts = |p: &[(&'static str, Tensor)]| p.iter().cloned().collect::<BTreeMap<_, _>>();
        let whole = Lycoris {
            parts: parts(&[("lokr_w1", t(&[2, 2], 3)), ("lokr_w2", t(&[3, 4], 4))]),
            alpha: Some(8.0),
        };
        let plain = kron(&t(&[2, 2], 3), &t(&[3, 4], 4), &[6, 8]).unwrap();
        assert_eq!(whole.delta(&[6, 8]).unwrap().to_vec2::<f64>().unwrap(), plain.to_vec2::<f64>().unwrap());
        let (wa, wb) = (t(&[3, 2], 5), t(&[2, 4], 6));
        let split = Lycoris {
            parts: parts(&[("lokr_w1", t(&[2, 2], 3)), ("lokr_w2_a", wa.clone()), ("lokr_w2_b", wb.clone())]),
            alpha: Some(8.0),
        };
        let want = (kron(&t(&[2, 2], 3), &wa.matmul(&wb).unwrap(), &[6, 8]).unwrap() * 4.0).unwrap();
        let got = split.delta(&[6, 8]).unwrap();
        assert_eq!(got.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
    }
}
