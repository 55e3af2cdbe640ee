//! Attaching adapters to a model's Linear/Conv2d layers, selected by module path.
use crate::model::layers::adapter::Lora;
use crate::model::layers::{LayerMut, Visit};
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

/// One attached adapter, as the optimizer and the file writers see it.
#[derive(Clone)]
pub struct AdapterInfo {
    /// Component-relative module path, e.g. `down_blocks.1.attentions.0.proj_in`.
    pub path: String,
    pub id: usize,
    pub down: Var,
    pub up: Var,
    pub alpha: f64,
    /// DoRA's magnitude per output channel, [out].
    pub magnitude: Option<Var>,
}

impl AdapterInfo {
    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// kohya / peft: down ~ Kaiming-uniform (a = √5, i.e. U(±1/√fan_in)), up = 0, so training
    /// starts from the base model exactly.
    Standard,
    /// Both factors random (tests: a zero `up` would hide gradient bugs in `down`).
    Random,
}

#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub multiplier: f64,
    pub init: Init,
    pub seed: u64,
    pub dtype: DType,
    /// peft's lora_dropout on the adapter input during training.
    pub dropout: f64,
    /// DoRA: a magnitude per output channel beside the low-rank pair, starting at the norms of
    /// the base weight's rows (with the pair's product added, as peft does).
    pub dora: bool,
    pub switch: crate::model::layers::adapter::Switch,
}

/// Attaches one adapter to every layer for which `select(path, layer)` holds; ids continue
/// from `first_id`. Returns the adapters in model order.
pub fn attach(
    model: &mut dyn Visit,
    prefix: &str,
    select: &dyn Fn(&str, &LayerMut<'_>) -> bool,
    spec: &LoraSpec,
    first_id: usize,
    device: &Device,
) -> Result<Vec<AdapterInfo>> {
    let mut out = vec![];
    let mut err = None;
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    model.visit(prefix, &mut |path, layer| {
        if err.is_some() || !select(path, &layer) {
            return;
        }
        let id = first_id + out.len();
        let r = make(layer, path, id, spec, &mut rng, device);
        match r {
            Ok(info) => out.push(info),
            Err(e) => err = Some(e),
        }
    });
    match err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

fn uniform(rng: &mut impl Rng, n: usize, bound: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.random::<f64>() * 2.0 - 1.0) as f32 * bound as f32).collect()
}

fn make(
    layer: LayerMut<'_>,
    path: &str,
    id: usize,
    spec: &LoraSpec,
    rng: &mut impl Rng,
    device: &Device,
) -> Result<AdapterInfo> {
    let r = spec.rank;
    let (down_shape, up_shape, fan_in): (Vec<usize>, Vec<usize>, usize) = match &layer {
        LayerMut::Linear(l) => (vec![r, l.in_features()], vec![l.out_features(), r], l.in_features()),
        LayerMut::Conv(c) => {
            let (o, i, kh, kw) = c.weight.dims4()?;
            (vec![r, i, kh, kw], vec![o, r, 1, 1], i * kh * kw)
        }
    };
    let nd: usize = down_shape.iter().product();
    let nu: usize = up_shape.iter().product();
    let bound = 1.0 / (fan_in as f64).sqrt();
    let down = Tensor::from_vec(uniform(rng, nd, bound), down_shape, device)?.to_dtype(spec.dtype)?;
    let up = match spec.init {
        Init::Standard => Tensor::zeros(up_shape, spec.dtype, device)?,
        Init::Random => Tensor::from_vec(uniform(rng, nu, 1.0 / (r as f64).sqrt()), up_shape, device)?
            .to_dtype(spec.dtype)?,
    };
    let (down, up) = (Var::from_tensor(&down)?, Var::from_tensor(&up)?);
    let (scale, strength) = match spec.dora {
        true => (spec.alpha / r as f64, spec.multiplier),
        false => (spec.alpha / r as f64 * spec.multiplier, 1.0),
    };
    let mut lora = Lora {
        id,
        down: down.clone(),
        up: up.clone(),
        scale,
        magnitude: None,
        strength,
        dropout: spec.dropout,
        switch: spec.switch.clone(),
    };
    if spec.dora {
        let w = match &layer {
            LayerMut::Linear(l) => l.weight.clone(),
            LayerMut::Conv(c) => c.weight.clone(),
        };
        // m = ‖W + s·up·down‖ makes the decomposed weight W + s·up·down itself at the start
        lora.magnitude = Some(Var::from_tensor(&Tensor::ones(w.dim(0)?, spec.dtype, device)?)?);
        let (_, inv_norm) = crate::model::layers::dora::factors(&lora, &w)?;
        lora.magnitude = Some(Var::from_tensor(&inv_norm.recip()?.to_dtype(spec.dtype)?)?);
    }
    let magnitude = lora.magnitude.clone();
    match layer {
        LayerMut::Linear(l) => l.adapters.push(lora),
        LayerMut::Conv(c) => c.adapters.push(lora),
    }
    Ok(AdapterInfo { path: path.to_string(), id, down, up, alpha: spec.alpha, magnitude })
}
