//! `--optimizer` and `--optimizer-args`: which optimizer updates the adapters, its settings under
//! the reference implementation's keyword names (as kohya's --optimizer_args passes them), and
//! its state for `--resume`.
use super::adafactor::{Adafactor, AdafactorSettings};
use super::optim::AdamW;
use super::prodigy::{Prodigy, ProdigySettings};
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// torch.optim.AdamW.
    #[default]
    Adamw,
    /// prodigyopt's Prodigy: learning-rate free (leave --lr at its 1.0).
    Prodigy,
    /// transformers' Adafactor: factored second moments, little memory.
    Adafactor,
}

/// AdamW's settings (torch.optim.AdamW's names).
#[derive(Debug, Clone, PartialEq)]
pub struct AdamWSettings {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 1e-2 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Settings {
    AdamW(AdamWSettings),
    Prodigy(ProdigySettings),
    Adafactor(AdafactorSettings),
}

/// The keys `--optimizer-args` takes, per optimizer (for errors and `--help`).
pub fn keys(kind: OptimizerKind) -> &'static [&'static str] {
    match kind {
        OptimizerKind::Adamw => &["betas", "eps", "weight_decay"],
        OptimizerKind::Prodigy => &[
            "betas",
            "beta3",
            "eps",
            "weight_decay",
            "decouple",
            "use_bias_correction",
            "safeguard_warmup",
            "d0",
            "d_coef",
            "growth_rate",
        ],
        OptimizerKind::Adafactor => &[
            "eps",
            "clip_threshold",
            "decay_rate",
            "beta1",
            "weight_decay",
            "scale_parameter",
            "relative_step",
            "warmup_init",
        ],
    }
}

impl OptimizerKind {
    pub fn name(self) -> String {
        crate::util::choice_name(&self)
    }

    /// The class kohya records in `ss_optimizer`.
    pub fn class(self) -> &'static str {
        match self {
            OptimizerKind::Adamw => "torch.optim.adamw.AdamW",
            OptimizerKind::Prodigy => "prodigyopt.prodigy.Prodigy",
            OptimizerKind::Adafactor => "transformers.optimization.Adafactor",
        }
    }

    /// The settings `args` (KEY=VALUE each) give, over the reference's defaults.
    pub fn settings(self, args: &[String]) -> Result<Settings> {
        let mut a = KeyValues::parse(self, args)?;
        let s = match self {
            OptimizerKind::Adamw => {
                let d = AdamWSettings::default();
                Settings::AdamW(AdamWSettings {
                    betas: a.pair("betas", d.betas)?,
                    eps: a.positive("eps", d.eps)?,
                    weight_decay: a.non_negative("weight_decay", d.weight_decay)?,
                })
            }
            OptimizerKind::Prodigy => {
                let d = ProdigySettings::default();
                let (beta1, beta2) = a.pair("betas", (d.beta1, d.beta2))?;
                Settings::Prodigy(ProdigySettings {
                    beta1,
                    beta2,
                    beta3: a.optional("beta3", d.beta3)?,
                    eps: a.positive("eps", d.eps)?,
                    weight_decay: a.non_negative("weight_decay", d.weight_decay)?,
                    decouple: a.boolean("decouple", d.decouple)?,
                    use_bias_correction: a.boolean("use_bias_correction", d.use_bias_correction)?,
                    safeguard_warmup: a.boolean("safeguard_warmup", d.safeguard_warmup)?,
                    d0: a.positive("d0", d.d0)?,
                    d_coef: a.positive("d_coef", d.d_coef)?,
                    growth_rate: a.positive("growth_rate", d.growth_rate)?,
                })
            }
            OptimizerKind::Adafactor => {
                let d = AdafactorSettings::default();
                let s = AdafactorSettings {
                    eps: a.pair("eps", d.eps)?,
                    clip_threshold: a.positive("clip_threshold", d.clip_threshold)?,
                    decay_rate: a.number("decay_rate", d.decay_rate)?,
                    beta1: a.optional("beta1", d.beta1)?,
                    weight_decay: a.non_negative("weight_decay", d.weight_decay)?,
                    scale_parameter: a.boolean("scale_parameter", d.scale_parameter)?,
                    relative_step: a.boolean("relative_step", d.relative_step)?,
                    warmup_init: a.boolean("warmup_init", d.warmup_init)?,
                };
                if s.warmup_init && !s.relative_step {
                    bail!("--optimizer-args warmup_init=true warms up the relative step: add relative_step=true");
                }
                if s.decay_rate >= 0.0 {
                    bail!(
                        "--optimizer-args decay_rate={}: a negative exponent (transformers' -0.8)",
                        s.decay_rate
                    );
                }
                Settings::Adafactor(s)
            }
        };
        if let Some(k) = a.map.keys().next() {
            bail!(
                "--optimizer-args {k}: --optimizer {} takes {} (see sdlora train --help)",
                self.name(),
                keys(self).join(", ")
            );
        }
        Ok(s)
    }
}

/// `--optimizer-args` as given: KEY=VALUE, values Python-like (`True`, `None`, `0.9,0.99`).
struct KeyValues {
    map: BTreeMap<String, String>,
}

impl KeyValues {
    fn parse(kind: OptimizerKind, args: &[String]) -> Result<Self> {
        let mut map = BTreeMap::new();
        for a in args.iter().flat_map(|a| a.split_whitespace()) {
            let Some((k, v)) = a.split_once('=') else {
                bail!("--optimizer-args `{a}`: write KEY=VALUE, e.g. {}=…", keys(kind)[0]);
            };
            if map.insert(k.trim().to_string(), v.trim().to_string()).is_some() {
                bail!("--optimizer-args: {k} is given twice");
            }
        }
        Ok(KeyValues { map })
    }

    fn number(&mut self, key: &str, default: f64) -> Result<f64> {
        match self.map.remove(key) {
            None => Ok(default),
            Some(v) => float(key, &v),
        }
    }

    fn positive(&mut self, key: &str, default: f64) -> Result<f64> {
        let x = self.number(key, default)?;
        if x.is_nan() || x <= 0.0 {
            bail!("--optimizer-args {key}={x}: must be above 0");
        }
        Ok(x)
    }

    fn non_negative(&mut self, key: &str, default: f64) -> Result<f64> {
        let x = self.number(key, default)?;
        if !(x >= 0.0 && x.is_finite()) {
            bail!("--optimizer-args {key}={x}: must be 0 or more");
        }
        Ok(x)
    }

    fn optional(&mut self, key: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.map.remove(key) {
            None => Ok(default),
            Some(v) if v.eq_ignore_ascii_case("none") => Ok(None),
            Some(v) => Ok(Some(beta(key, float(key, &v)?)?)),
        }
    }

    fn boolean(&mut self, key: &str, default: bool) -> Result<bool> {
        match self.map.remove(key).as_deref() {
            None => Ok(default),
            Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
            Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
            Some(v) => bail!("--optimizer-args {key}={v}: write true or false"),
        }
    }

    fn pair(&mut self, key: &str, default: (f64, f64)) -> Result<(f64, f64)> {
        let Some(v) = self.map.remove(key) else { return Ok(default) };
        let inner = v.trim_matches(|c| matches!(c, '(' | ')' | '[' | ']'));
        let parts: Vec<&str> = inner.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let [a, b] = parts[..] else {
            bail!("--optimizer-args {key}={v}: give two numbers, e.g. {key}=0.9,0.999")
        };
        let (a, b) = (float(key, a)?, float(key, b)?);
        if key == "betas" {
            return Ok((beta(key, a)?, beta(key, b)?));
        }
        Ok((a, b))
    }
}

fn float(key: &str, v: &str) -> Result<f64> {
    v.parse::<f64>()
        .ok()
        .filter(|x| !x.is_nan())
        .with_context(|| format!("--optimizer-args {key}={v}: not a number"))
}

fn beta(key: &str, x: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&x) {
        bail!("--optimizer-args {key}: {x} is not in [0, 1)");
    }
    Ok(x)
}

/// An optimizer's saved state: named tensors, and scalars as exact decimal strings.
pub type State = (Vec<(String, Tensor)>, Vec<(String, String)>);

/// The optimizer of a run.
pub enum Optimizer {
    AdamW(AdamW),
    Prodigy(Prodigy),
    Adafactor(Adafactor),
}

impl Optimizer {
    pub fn new(settings: &Settings, params: &[Var]) -> Result<Self> {
        Ok(match settings {
            Settings::AdamW(s) => {
                let mut o = AdamW::new(params, s.weight_decay)?;
                (o.beta1, o.beta2, o.eps) = (s.betas.0, s.betas.1, s.eps);
                Optimizer::AdamW(o)
            }
            Settings::Prodigy(s) => Optimizer::Prodigy(Prodigy::new(params, s.clone())?),
            Settings::Adafactor(s) => Optimizer::Adafactor(Adafactor::new(params, s.clone())?),
        })
    }

    pub fn kind(&self) -> OptimizerKind {
        match self {
            Optimizer::AdamW(_) => OptimizerKind::Adamw,
            Optimizer::Prodigy(_) => OptimizerKind::Prodigy,
            Optimizer::Adafactor(_) => OptimizerKind::Adafactor,
        }
    }

    /// One update, parameter k at learning rate `lrs[k]`.
    pub fn step(&mut self, params: &[Var], grads: &[Tensor], lrs: &[f64]) -> Result<()> {
        if grads.len() != params.len() || lrs.len() != params.len() {
            bail!(
                "optimizer: {} parameters, {} gradients, {} learning rates",
                params.len(),
                grads.len(),
                lrs.len()
            );
        }
        match self {
            Optimizer::AdamW(o) => o.step(params, grads, lrs),
            Optimizer::Prodigy(o) => o.step(params, grads, lrs),
            Optimizer::Adafactor(o) => o.step(params, grads, lrs),
        }
    }

    /// The learning rate the next step applies for a scheduled `lr`: Prodigy's d·lr, Adafactor's
    /// relative step (before its parameter scale).
    pub fn effective_lr(&self, lr: f64) -> f64 {
        match self {
            Optimizer::AdamW(_) => lr,
            Optimizer::Prodigy(p) => p.d * lr,
            Optimizer::Adafactor(a) => a.step_size_at(a.step + 1, lr),
        }
    }

    /// Prodigy's current step-size estimate d (its effective learning rate is d · lr).
    pub fn prodigy_d(&self) -> Option<f64> {
        match self {
            Optimizer::Prodigy(p) => Some(p.d),
            _ => None,
        }
    }

    /// The state as tensors and scalars (exact decimal strings) for the training state file.
    pub fn state(&self) -> State {
        let s = |x: f64| format!("{x:?}");
        match self {
            Optimizer::AdamW(o) => {
                let mut t = vec![];
                for (j, (m, v)) in o.moments().iter().enumerate() {
                    t.push((format!("adam.{j}.m"), m.clone()));
                    t.push((format!("adam.{j}.v"), v.clone()));
                }
                (t, vec![("adam_step".into(), o.step.to_string())])
            }
            Optimizer::Prodigy(o) => (
                vec![
                    ("prodigy.m".into(), o.m.clone()),
                    ("prodigy.v".into(), o.v.clone()),
                    ("prodigy.s".into(), o.s.clone()),
                    ("prodigy.p0".into(), o.p0.clone()),
                ],
                vec![
                    ("prodigy_d".into(), s(o.d)),
                    ("prodigy_d_max".into(), s(o.d_max)),
                    ("prodigy_d_numerator".into(), s(o.d_numerator)),
                    ("prodigy_k".into(), o.k.to_string()),
                ],
            ),
            Optimizer::Adafactor(o) => (o.tensors(), vec![("adafactor_step".into(), o.step.to_string())]),
        }
    }

    /// Restores what `state` saved, through `take(tensor name)` and `meta(key)`.
    pub fn restore(
        &mut self,
        take: &dyn Fn(&str) -> Result<Tensor>,
        meta: &dyn Fn(&str) -> Result<String>,
    ) -> Result<()> {
        let num = |k: &str| -> Result<f64> {
            meta(k)?.parse::<f64>().with_context(|| format!("{k}: not a number"))
        };
        let int = |k: &str| -> Result<usize> {
            meta(k)?.parse::<usize>().with_context(|| format!("{k}: not a count"))
        };
        match self {
            Optimizer::AdamW(o) => {
                o.step = int("adam_step")?;
                let moments = (0..o.moments().len())
                    .map(|j| {
                        let like = &o.moments()[j].0;
                        let get = |k: String| -> Result<Tensor> { Ok(take(&k)?.to_device(like.device())?) };
                        Ok((get(format!("adam.{j}.m"))?, get(format!("adam.{j}.v"))?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                o.set_moments(moments);
            }
            Optimizer::Prodigy(o) => {
                let get = |k: &str, like: &Tensor| -> Result<Tensor> {
                    let t = take(k)?;
                    if t.dims() != like.dims() {
                        bail!("{k}: saved as {:?}, the parameters need {:?}", t.dims(), like.dims());
                    }
                    Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
                };
                (o.m, o.v, o.s, o.p0) = (
                    get("prodigy.m", &o.m)?,
                    get("prodigy.v", &o.v)?,
                    get("prodigy.s", &o.s)?,
                    get("prodigy.p0", &o.p0)?,
                );
                (o.d, o.d_max, o.d_numerator) =
                    (num("prodigy_d")?, num("prodigy_d_max")?, num("prodigy_d_numerator")?);
                o.k = int("prodigy_k")?;
            }
            Optimizer::Adafactor(o) => {
                o.restore(take)?;
                o.step = int("adafactor_step")?;
            }
        }
        Ok(())
    }
}
