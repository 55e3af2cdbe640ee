//! LyCORIS's LoHa and LoKr modules as kohya-named files carry them, read for generating and
//! merging: their weight difference is built whole, with ComfyUI's arithmetic (comfy/
//! weight_adapter/loha.py, lokr.py).
//! LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / rank.
//! LoKr: ΔW = kron(w1, w2), each factor whole or a product w_a·w_b, · alpha / the inner dimension
//! of a product (1 when both factors are whole).
use crate::model::layers::lycoris::{FactorKind, Factors};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
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

    /// The factors as the layers hold them (in f64 here), for merging or for an adapter.
    pub fn factors(&self, dtype: DType, device: &candle_core::Device) -> Result<Factors> {
        let kind = if self.kind() == "LoHa" { FactorKind::Hada } else { FactorKind::Kron };
        let vars = self
            .parts
            .iter()
            .map(|(k, t)| Ok((*k, Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?)))
            .collect::<Result<_>>()?;
        Ok(Factors { kind, vars })
    }

    /// ComfyUI's scale: alpha / the decomposed rank (1 without alpha, or for a LoKr of two whole
    /// factors).
    pub fn scale(&self, f: &Factors) -> f64 {
        match (self.alpha, f.rank()) {
            (Some(a), Some(r)) => a / r as f64,
            _ => 1.0,
        }
    }

    /// ΔW in the adapted weight's `shape`, in f64.
    pub fn delta(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let f = self.factors(DType::F64, &candle_core::Device::Cpu)?;
        let made: usize = match f.kind {
            FactorKind::Hada => {
                self.parts["hada_w1_a"].dim(0)? * self.parts["hada_w1_b"].elem_count()
                    / self.parts["hada_w1_b"].dim(0)?
            }
            FactorKind::Kron => {
                let side = |w: &str| -> Result<(usize, usize)> {
                    Ok(match self.parts.get(w) {
                        Some(t) => (t.dim(0)?, t.elem_count() / t.dim(0)?),
                        None => {
                            let (a, b) = (
                                &self.parts[format!("{w}_a").as_str()],
                                &self.parts[format!("{w}_b").as_str()],
                            );
                            (a.dim(0)?, b.elem_count() / b.dim(0)?)
                        }
                    })
                };
                let ((a, b), (c, d)) = (side("lokr_w1")?, side("lokr_w2")?);
                a * b * c * d
            }
        };
        if made != n {
            bail!("{} factors make {made} values, the layer's weight {shape:?} has {n}", self.kind());
        }
        Ok((f.delta(shape)? * self.scale(&f))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Deterministic values in [-1, 1] of `shape`.
    fn t(shape: &[usize], seed: u64) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::arange(0f64, n as f64, &Device::Cpu)
            .unwrap()
            .affine(0.7, seed as f64)
            .unwrap()
            .sin()
            .unwrap()
            .reshape(shape)
            .unwrap()
    }

    #[test]
    fn lokr_scale_is_alpha_over_the_decomposed_rank_and_one_for_whole_factors() {
        let parts = |p: &[(&'static str, Tensor)]| p.iter().cloned().collect::<BTreeMap<_, _>>();
        let whole = Lycoris {
            parts: parts(&[("lokr_w1", t(&[2, 2], 3)), ("lokr_w2", t(&[3, 4], 4))]),
            alpha: Some(8.0),
        };
        let plain = crate::model::layers::lycoris::kron(&t(&[2, 2], 3), &t(&[3, 4], 4), &[6, 8]).unwrap();
        assert_eq!(whole.delta(&[6, 8]).unwrap().to_vec2::<f64>().unwrap(), plain.to_vec2::<f64>().unwrap());
        let (wa, wb) = (t(&[3, 2], 5), t(&[2, 4], 6));
        let split = Lycoris {
            parts: parts(&[("lokr_w1", t(&[2, 2], 3)), ("lokr_w2_a", wa.clone()), ("lokr_w2_b", wb.clone())]),
            alpha: Some(8.0),
        };
        let want = (crate::model::layers::lycoris::kron(&t(&[2, 2], 3), &wa.matmul(&wb).unwrap(), &[6, 8])
            .unwrap()
            * 4.0)
            .unwrap();
        let got = split.delta(&[6, 8]).unwrap();
        assert_eq!(got.to_vec2::<f64>().unwrap(), want.to_vec2::<f64>().unwrap());
    }
}
