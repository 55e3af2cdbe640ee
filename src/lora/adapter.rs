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
    /// LoRA dropout on the adapter's input (peft's lora_dropout), active only while `switch`
    /// holds a step seed, i.e. inside a training step.
    pub dropout: f64,
    pub switch: Switch,
}

/// State shared by every adapter of a run: the current training step's dropout seed
/// (`u64::MAX`: no dropout — inference, evaluation), and whether the adapters are switched off,
/// so that the same layers compute the base model's prediction inside a training step
/// (`train --prior-preservation output`).
#[derive(Debug)]
pub struct SwitchState {
    pub dropout_seed: std::sync::atomic::AtomicU64,
    pub off: std::sync::atomic::AtomicBool,
}
pub type Switch = std::sync::Arc<SwitchState>;

/// Adapters on, no dropout.
pub fn switch() -> Switch {
    std::sync::Arc::new(SwitchState {
        dropout_seed: std::sync::atomic::AtomicU64::new(u64::MAX),
        off: std::sync::atomic::AtomicBool::new(false),
    })
}

impl SwitchState {
    pub fn set_dropout_seed(&self, seed: u64) {
        self.dropout_seed.store(seed, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_off(&self, off: bool) {
        self.off.store(off, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_off(&self) -> bool {
        self.off.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` with every adapter switched off (the base model), then switches them back on.
    pub fn off_while<T>(&self, f: impl FnOnce() -> T) -> T {
        self.set_off(true);
        let r = f();
        self.set_off(false);
        r
    }
}

impl Lora {
    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(0)
    }

    /// Whether the adapter adds nothing right now (switched off for a base prediction).
    pub fn is_off(&self) -> bool {
        self.switch.is_off()
    }

    /// The inverted-dropout mask for an input of `shape` in this step, or None.
    pub fn dropout_mask(&self, shape: &[usize], x: &Tensor) -> Result<Option<Tensor>> {
        use rand::{Rng, SeedableRng};
        let seed = self.switch.dropout_seed.load(std::sync::atomic::Ordering::Relaxed);
        if self.dropout <= 0.0 || seed == u64::MAX {
            return Ok(None);
        }
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ (self.id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keep = 1.0 - self.dropout;
        let n: usize = shape.iter().product();
        let m: Vec<f32> =
            (0..n).map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
        Ok(Some(Tensor::from_vec(m, shape, x.device())?.to_dtype(x.dtype())?))
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
