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

/// Gradients of adapter parameters, indexed by adapter id: (d down, d up).
#[derive(Default)]
pub struct AdapterGrads {
    pub grads: Vec<Option<(Tensor, Tensor)>>,
}

impl AdapterGrads {
    pub fn new(n: usize) -> Self {
        Self { grads: (0..n).map(|_| None).collect() }
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
    }
}
