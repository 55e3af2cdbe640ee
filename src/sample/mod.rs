//! Image generation (`sdlora generate`): diffusers' schedulers step for step, the text-to-image
//! pipeline with classifier-free guidance, and PNGs carrying Automatic1111's `parameters` text.
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod noise;
pub mod pipeline;
pub mod pndm;
pub mod png;
pub mod schedule;

use crate::model::load::SchedulerConfig;
use anyhow::{bail, Result};
use candle_core::Tensor;
use noise::NoiseSource;

/// One sampler, set up for a number of steps. Step `i` denoises from `timesteps()[i]`.
pub trait Scheduler {
    /// The model's timestep at each step, high to low.
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial Gaussian noise (1 for the α-parameterised samplers).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// What the model sees at step `i` (σ-based samplers divide by √(σ² + 1); the others pass
    /// the latents through).
    fn scale_model_input(&self, x: &Tensor, _i: usize) -> Result<Tensor> {
        Ok(x.clone())
    }
    /// From the latents `x` at step `i` and the model output to the latents of step `i + 1`.
    fn step(
        &mut self,
        model_out: &Tensor,
        i: usize,
        x: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// The noise levels (one more than the steps) of the σ-based samplers.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }
    /// The sampler's name in Automatic1111's infotext.
    fn a1111_name(&self) -> &'static str;
}

/// `--scheduler` values.
pub const SCHEDULER_NAMES: &[&str] = &["default", "ddim", "euler", "euler-a", "dpm++2m", "dpm++2m-karras"];

/// A sampler choice with the model's config resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ddim,
    /// `None`: as the config's `use_karras_sigmas` says.
    Euler {
        karras: Option<bool>,
    },
    EulerAncestral,
    DpmSolver {
        karras: bool,
    },
    /// PLMS, reachable through `default` only (Stable Diffusion 1.x's own scheduler).
    Pndm,
}

/// Maps a `--scheduler` name to a sampler. `default` is the class of the model's
/// scheduler_config.json; the returned note says when that class is not implemented and what is
/// used instead.
pub fn resolve(name: &str, cfg: &SchedulerConfig) -> Result<(Kind, Option<String>)> {
    Ok(match name {
        "ddim" => (Kind::Ddim, None),
        "euler" => (Kind::Euler { karras: Some(false) }, None),
        "euler-a" => (Kind::EulerAncestral, None),
        "dpm++2m" => (Kind::DpmSolver { karras: false }, None),
        "dpm++2m-karras" => (Kind::DpmSolver { karras: true }, None),
        "default" if cfg.class_name.is_none() => (
            Kind::DpmSolver { karras: true },
            Some("the model comes without scheduler_config.json; sampling with dpm++2m-karras".into()),
        ),
        "default" => {
            let class = cfg.class_name.as_deref().unwrap_or_default();
            let karras = schedule::extra_bool(cfg, "use_karras_sigmas", false);
            match class {
                "DDIMScheduler" => (Kind::Ddim, None),
                "EulerDiscreteScheduler" => (Kind::Euler { karras: None }, None),
                "EulerAncestralDiscreteScheduler" => (Kind::EulerAncestral, None),
                "DPMSolverMultistepScheduler" => {
                    let algo = schedule::extra_str(cfg, "algorithm_type", "dpmsolver++");
                    let order = cfg.extra.get("solver_order").and_then(|v| v.as_u64()).unwrap_or(2);
                    let note = (algo != "dpmsolver++" || order != 2).then(|| {
                        format!("the model's DPMSolverMultistepScheduler uses {algo} order {order}; sampling with DPM++ 2M")
                    });
                    (Kind::DpmSolver { karras }, note)
                }
                "PNDMScheduler" if schedule::extra_bool(cfg, "skip_prk_steps", false) => (Kind::Pndm, None),
                other => (
                    Kind::DpmSolver { karras: true },
                    Some(format!(
                        "the model's scheduler {other} is not implemented; sampling with dpm++2m-karras"
                    )),
                ),
            }
        }
        other => bail!("unknown scheduler `{other}` — choose one of: {}", SCHEDULER_NAMES.join(", ")),
    })
}

/// Builds a sampler for `steps` steps from the model's scheduler config.
pub fn build_kind(kind: Kind, cfg: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        Kind::Ddim => Box::new(ddim::DdimScheduler::new(cfg, steps)?),
        Kind::Euler { karras } => Box::new(euler::EulerScheduler::new(cfg, steps, karras)?),
        Kind::EulerAncestral => Box::new(euler_ancestral::EulerAncestralScheduler::new(cfg, steps)?),
        Kind::DpmSolver { karras } => Box::new(dpm_solver::DpmSolverScheduler::new(cfg, steps, karras)?),
        Kind::Pndm => Box::new(pndm::PndmScheduler::new(cfg, steps)?),
    })
}

/// `resolve` + `build_kind`, dropping the note.
pub fn build(name: &str, cfg: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    build_kind(resolve(name, cfg)?.0, cfg, steps)
}
