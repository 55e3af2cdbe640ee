//! A LoRA adapter on a Linear or Conv2d: y = W x + scale · up(down(x)).
//!
//! `down`/`up` are `Var`s so the optimizer can update them in place; they stay f32 whatever the
//! base dtype, because adapters are small and their updates are tiny relative to their values.
use candle_core::{Result, Tensor, Var};

pub struct Lora {
    /// Index into `AdapterGrads`; assigned when the adapter is attached.
    pub id: usize,
    /// Linear: [rank, in]. Conv: [rank, in, kh, kw].
    pub down: Var,
    /// Linear: [out, rank]. Conv: [out, rank, 1, 1].
    pub up: Var,
    /// alpha / rank · multiplier.
    pub scale: f64,
}

impl Lora {
    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(0)
    }
}

/// Gradients of adapter parameters, indexed by adapter id: (d down, d up). In full training
/// (the demo's base model) base weights that are variables get theirs in `weights`.
#[derive(Default)]
pub struct AdapterGrads {
    pub grads: Vec<Option<(Tensor, Tensor)>>,
    pub weights: std::collections::HashMap<candle_core::TensorId, Tensor>,
}

impl AdapterGrads {
    pub fn new(n: usize) -> Self {
        Self { grads: (0..n).map(|_| None).collect(), weights: Default::default() }
    }

    /// Accumulates the gradient of a trainable base weight (a `Var`'s tensor).
    pub fn add_weight(&mut self, w: &Tensor, g: Tensor) -> Result<()> {
        let g = g.to_dtype(w.dtype())?;
        let e = self.weights.remove(&w.id());
        self.weights.insert(
            w.id(),
            match e {
                None => g,
                Some(a) => (a + g)?,
            },
        );
        Ok(())
    }

    pub fn add(&mut self, id: usize, d_down: Tensor, d_up: Tensor) -> Result<()> {
        if id >= self.grads.len() {
            self.grads.resize_with(id + 1, || None);
        }
        self.grads[id] = Some(match self.grads[id].take() {
            None => (d_down, d_up),
            Some((a, b)) => ((a + d_down)?, (b + d_up)?),
        });
        Ok(())
    }

    pub fn get(&self, id: usize) -> Option<&(Tensor, Tensor)> {
        self.grads.get(id).and_then(|g| g.as_ref())
    }

    pub fn clear(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
        self.weights.clear();
    }
}
