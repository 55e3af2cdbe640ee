//! Attaching adapters to a model's Linear/Conv2d layers, selected by module path.
use crate::model::layers::adapter::Lora;
use crate::model::layers::lycoris::Factors;
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
    /// LoHa / LoKr: the factors (`down` and `up` are then empty).
    pub lycoris: Option<Factors>,
}

impl AdapterInfo {
    pub fn rank(&self) -> usize {
        match &self.lycoris {
            Some(f) => f.rank().unwrap_or(0),
            None => self.down.dim(0).unwrap_or(0),
        }
    }

    /// The trained tensors by name (`down`, `up`, `magnitude`, or LyCORIS's part names), in the
    /// order the optimizer and the training state keep them.
    pub fn params(&self) -> Vec<(String, Var)> {
        if let Some(f) = &self.lycoris {
            return f.vars.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
        }
        let mut p = vec![("down".to_string(), self.down.clone()), ("up".to_string(), self.up.clone())];
        p.extend(self.magnitude.clone().map(|m| ("magnitude".to_string(), m)));
        p
    }

    /// The gradients of `params` in `g` (zeros where the step gave none).
    pub fn grads(&self, g: &crate::model::layers::Grads) -> Result<Vec<Tensor>> {
        self.params()
            .into_iter()
            .map(|(name, v)| {
                let got = match name.as_str() {
                    "down" => g.get(self.id).map(|p| p.0.clone()),
                    "up" => g.get(self.id).map(|p| p.1.clone()),
                    _ => g.weights.get(&v.as_tensor().id()).cloned(),
                };
                got.map_or_else(|| v.zeros_like(), Ok)
            })
            .collect()
    }

    /// What the training state checks a resume against: kind, path-independent shape.
    pub fn layout(&self) -> String {
        match &self.lycoris {
            Some(f) => f.vars.iter().map(|(n, v)| format!("{n}{:?}", v.dims())).collect::<Vec<_>>().join(","),
            None => format!("{}{}", self.rank(), if self.magnitude.is_some() { ":dora" } else { "" }),
        }
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
    /// LoHa / LoKr instead of the low-rank pair.
    pub factored: Option<super::factors::FactorSpec>,
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
    if let Some(fs) = &spec.factored {
        return make_factored(layer, path, id, spec, fs, rng, device);
    }
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
        lycoris: None,
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
    Ok(AdapterInfo { path: path.to_string(), id, down, up, alpha: spec.alpha, magnitude, lycoris: None })
}

/// A LoHa or LoKr adapter (LyCORIS's shapes and initialisation: ΔW starts at zero).
fn make_factored(
    layer: LayerMut<'_>,
    path: &str,
    id: usize,
    spec: &LoraSpec,
    fs: &super::factors::FactorSpec,
    rng: &mut impl Rng,
    device: &Device,
) -> Result<AdapterInfo> {
    let shape = match &layer {
        LayerMut::Linear(l) => l.weight.dims().to_vec(),
        LayerMut::Conv(c) => c.weight.dims().to_vec(),
    };
    let f = super::factors::new_factors(fs, &shape, spec.rank, rng, (spec.dtype, device))?;
    let empty = Var::from_tensor(&Tensor::zeros(0, spec.dtype, device)?)?;
    let lora = Lora {
        id,
        down: empty.clone(),
        up: empty.clone(),
        scale: lycoris_scale(&f, spec.alpha) * spec.multiplier,
        magnitude: None,
        strength: 1.0,
        lycoris: Some(f.clone()),
        dropout: spec.dropout,
        switch: spec.switch.clone(),
    };
    match layer {
        LayerMut::Linear(l) => l.adapters.push(lora),
        LayerMut::Conv(c) => c.adapters.push(lora),
    }
    let (down, up) = (empty.clone(), empty);
    Ok(AdapterInfo {
        path: path.to_string(),
        id,
        down,
        up,
        alpha: spec.alpha,
        magnitude: None,
        lycoris: Some(f),
    })
}

/// alpha / rank, the rank as ComfyUI reads it back from the file (1 for a LoKr of two whole factors).
pub fn lycoris_scale(f: &Factors, alpha: f64) -> f64 {
    f.rank().map_or(1.0, |r| alpha / r as f64)
}
