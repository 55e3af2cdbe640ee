//! A LoRA adapter on a Linear or Conv2d: y = W x + scale · up(down(x)), where `down` repeats the
//! base layer's operation (a matmul, or a convolution with its kernel size, stride and padding)
//! and `up` is its pointwise form. Linear and Conv2d share this maths through `Op`.
//!
//! `down`/`up` are `Var`s so the optimizer can update them in place; they stay f32 whatever the
//! base dtype, because adapters are small and their updates are tiny relative to their values.
use super::conv::{conv2d, conv_input_grad, kernel_grad};
use super::linear::{flatten2, matmul_wt};
use candle_core::{Result, Tensor, Var};

/// The base layer's operation y = x ⋆ w, with the two gradients an adapter needs from it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    /// x [.., in] · wᵀ, w [out, in].
    Matmul,
    /// conv(x, w), x [N, C, H, W], w [O, C, KH, KW].
    Conv { stride: usize, padding: usize },
}

impl Op {
    /// The 1×1 form, which `up` applies.
    fn pointwise(self) -> Op {
        match self {
            Op::Matmul => Op::Matmul,
            Op::Conv { .. } => Op::Conv { stride: 1, padding: 0 },
        }
    }

    pub fn forward(self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        match self {
            Op::Matmul => matmul_wt(x, w),
            Op::Conv { stride, padding } => conv2d(x, w, padding, stride),
        }
    }

    /// dx for an input of shape `x_dims`.
    pub fn input_grad(self, dy: &Tensor, w: &Tensor, x_dims: &[usize]) -> Result<Tensor> {
        match self {
            Op::Matmul => matmul_wt(dy, &w.t()?),
            Op::Conv { stride, padding } => conv_input_grad(dy, w, stride, padding, (x_dims[2], x_dims[3])),
        }
    }

    /// dw for a weight of shape `w_dims`.
    pub fn weight_grad(self, x: &Tensor, dy: &Tensor, w_dims: &[usize]) -> Result<Tensor> {
        match self {
            Op::Matmul => flatten2(dy)?.t()?.matmul(&flatten2(x)?),
            Op::Conv { stride, padding } => {
                let [o, c, kh, kw] = w_dims else { candle_core::bail!("conv weight {w_dims:?}: not 4-d") };
                kernel_grad(x, dy, (*o, *c, *kh, *kw), stride, padding)
            }
        }
    }
}

/// What an adapter's backward needs: its hidden activation h = down(x), its dropout mask, and
/// for DoRA its factors (`super::dora`).
pub struct LoraSaved {
    hidden: Tensor,
    mask: Option<Tensor>,
    dora: Option<super::dora::DoraSaved>,
}

/// The base layer's frozen weight and its output without bias, W ⋆ x: what DoRA's adapters
/// rescale.
pub struct Base<'a> {
    pub weight: &'a Tensor,
    pub out: &'a Tensor,
}

/// `y` plus the deltas of every adapter that is on, for the base layer's input `x`; adapters
/// compute in their own dtype (`down`'s).
pub fn add_adapters(
    adapters: &[Lora],
    op: Op,
    x: &Tensor,
    base: Base<'_>,
    mut y: Tensor,
) -> Result<(Tensor, Vec<LoraSaved>)> {
    let Some(first) = adapters.first() else { return Ok((y, vec![])) };
    let xa = x.to_dtype(first.down.dtype())?;
    let mut saved = Vec::with_capacity(adapters.len());
    // a switched-off adapter (a base prediction) adds nothing and saves nothing
    for a in adapters.iter().filter(|a| !a.is_off()) {
        let (delta, s) = a.forward_train(op, &xa, &base)?;
        let dt = y.dtype();
        y = (y + delta.to_dtype(dt)?)?;
        saved.push(s);
    }
    Ok((y, saved))
}

/// The adapters' share of dx (None without adapters), their gradients added to `grads`.
pub fn adapters_backward(
    adapters: &[Lora],
    (op, weight): (Op, &Tensor),
    saved: Vec<LoraSaved>,
    x: &Tensor,
    dy: &Tensor,
    grads: &mut Grads,
) -> Result<Option<Tensor>> {
    let Some(first) = adapters.first() else { return Ok(None) };
    let dt = first.down.dtype();
    let (xa, dya) = (x.to_dtype(dt)?, dy.to_dtype(dt)?);
    let mut dx: Option<Tensor> = None;
    for (a, s) in adapters.iter().filter(|a| !a.is_off()).zip(saved) {
        let d = a.backward((op, weight), s, &xa, &dya, grads)?;
        dx = Some(match dx {
            None => d,
            Some(acc) => (acc + d)?,
        });
    }
    dx.map(|d| d.to_dtype(dy.dtype())).transpose()
}

pub struct Lora {
    /// Index into `Grads`; assigned when the adapter is attached.
    pub id: usize,
    /// Linear: [rank, in]. Conv: [rank, in, kh, kw].
    pub down: Var,
    /// Linear: [out, rank]. Conv: [out, rank, 1, 1].
    pub up: Var,
    /// alpha / rank · multiplier (DoRA: alpha / rank, the multiplier is `strength`).
    pub scale: f64,
    /// DoRA (weight-decomposed LoRA): the magnitude of each output channel, [out]; the layer's
    /// weight becomes m · (W + scale·up·down) / ‖W + scale·up·down‖ row by row.
    pub magnitude: Option<Var>,
    /// DoRA's strength: the weight moves this share of the way to the decomposed one
    /// (ComfyUI's strength); 1 in training.
    pub strength: f64,
    /// LyCORIS LoHa / LoKr: the weight difference comes from these factors (scaled by `scale`),
    /// and `down`/`up` are empty.
    pub lycoris: Option<super::lycoris::Factors>,
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
    /// delta = scale · up(down(dropout(x))); DoRA rescales it and the base's output.
    pub fn forward_train(&self, op: Op, x: &Tensor, base: &Base<'_>) -> Result<(Tensor, LoraSaved)> {
        let mask = self.dropout_mask(x.dims(), x)?;
        let xd = match &mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        if let Some(f) = &self.lycoris {
            let delta = super::lycoris::forward(f, op, base.weight.dims(), &xd, self.scale)?;
            return Ok((delta, LoraSaved { hidden: xd, mask, dora: None }));
        }
        let hidden = op.forward(&xd, &self.down.as_tensor().detach())?;
        let delta = (op.pointwise().forward(&hidden, &self.up.as_tensor().detach())? * self.scale)?;
        if self.magnitude.is_none() {
            return Ok((delta, LoraSaved { hidden, mask, dora: None }));
        }
        // peft: with dropout the rescaled base output is that of the dropped-out input too
        let base_out = match &mask {
            Some(_) => op.forward(&xd, &base.weight.detach().to_dtype(xd.dtype())?)?,
            None => base.out.to_dtype(delta.dtype())?,
        };
        let (delta, d) = super::dora::forward(self, op, base.weight, &base_out, &delta)?;
        Ok((delta, LoraSaved { hidden, mask, dora: Some(d) }))
    }

    /// The adapter's share of dx; adds dD and dU (and DoRA's dm) to `grads`.
    pub fn backward(
        &self,
        (op, weight): (Op, &Tensor),
        s: LoraSaved,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        if let Some(f) = &self.lycoris {
            let dx = super::lycoris::backward(f, op, weight.dims(), &s.hidden, dy, self.scale, grads)?;
            return match &s.mask {
                Some(m) => dx * m,
                None => Ok(dx),
            };
        }
        let xd = match &s.mask {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        // DoRA: the low-rank path sees dy scaled per channel, the base's input gradient a share
        let (dy, dx_base) = match &s.dora {
            Some(d) => {
                let (dy, dx_base) = super::dora::backward(self, (op, weight), d, dy, x.dims(), grads)?;
                (dy, Some(dx_base))
            }
            None => (dy.clone(), None),
        };
        let dy = &dy;
        let (up, down) = (self.up.as_tensor().detach(), self.down.as_tensor().detach());
        // delta = s·up(h), h = down(x)  ⇒  dU = s·∂up/∂U(h, dy), dh = s·upᵀ(dy), dD = ∂down/∂D(x, dh)
        let d_up = (op.pointwise().weight_grad(&s.hidden, dy, up.dims())? * self.scale)?;
        let dh = (op.pointwise().input_grad(dy, &up, s.hidden.dims())? * self.scale)?;
        let d_down = op.weight_grad(&xd, &dh, down.dims())?;
        let mut dx = op.input_grad(&dh, &down, x.dims())?;
        if let Some(b) = dx_base {
            dx = (dx + b)?;
        }
        if let Some(m) = &s.mask {
            dx = (dx * m)?;
        }
        grads.add(self.id, d_down, d_up)?;
        Ok(dx)
    }

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
pub struct Grads {
    pub grads: Vec<Option<(Tensor, Tensor)>>,
    pub weights: std::collections::HashMap<candle_core::TensorId, Tensor>,
}

impl Grads {
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
