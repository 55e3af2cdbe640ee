//! PNDMScheduler with `skip_prk_steps` (PLMS, the scheduler_config.json of Stable Diffusion 1.x):
//! linear multistep on ε with up to four previous outputs. It runs one more model call than
//! steps: the second-highest timestep appears twice (the first step is redone as a Heun-like
//! average).
use super::noise::NoiseSource;
use super::schedule::{self, Prediction, Spacing};
use super::Scheduler;
use crate::model::load::SchedulerConfig;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct PndmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    step_ratio: i64,
    prediction: Prediction,
    /// Previous ε estimates, oldest first (at most 4 kept).
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
}

impl PndmScheduler {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if !schedule::extra_bool(cfg, "skip_prk_steps", false) {
            bail!("PNDMScheduler without skip_prk_steps is not supported — choose another --scheduler");
        }
        let train = cfg.num_train_timesteps;
        if steps < 2 || steps > train {
            bail!("PLMS needs between 2 and {train} steps, got {steps}");
        }
        let alphas_cumprod = schedule::alphas_cumprod(cfg)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        // ascending
        let ts: Vec<i64> = match schedule::spacing(cfg)? {
            Spacing::Linspace => schedule::np_linspace(0.0, (train - 1) as f64, steps)
                .iter()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => (0..steps).map(|i| (i * (train / steps) + cfg.steps_offset) as i64).collect(),
            Spacing::Trailing => schedule::np_arange_down(train as f64, train as f64 / steps as f64)
                .iter()
                .rev()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect(),
        };
        // [t_0 .. t_{n-2}, t_{n-2}, t_{n-1}], reversed
        let n = ts.len();
        let mut plms: Vec<i64> = ts[..n - 1].to_vec();
        plms.push(ts[n - 2]);
        plms.push(ts[n - 1]);
        plms.reverse();
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: plms.into_iter().map(|t| t as f64).collect(),
            step_ratio: (train / steps) as i64,
            prediction: schedule::prediction(cfg)?,
            ets: vec![],
            counter: 0,
            cur_sample: None,
        })
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        schedule::alpha_at(&self.alphas_cumprod, self.final_alpha_cumprod, t)
    }

    /// Formula (9) of the PNDM paper: x_{t−δ} from x_t and the ε estimate.
    fn prev_sample(&self, x: &Tensor, t: i64, prev_t: i64, eps: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha_at(t)?;
        let a_prev = self.alpha_at(prev_t)?;
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction {
            Prediction::Epsilon => eps.clone(),
            Prediction::V => ((eps * a_t.sqrt() as f64)? + (x * b_t.sqrt() as f64)?)?,
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let term = schedule::div(&(eps * (a_prev - a_t) as f64)?, denom)?;
        Ok(((x * sample_coeff as f64)? - term)?)
    }
}

impl Scheduler for PndmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_out: &Tensor, i: usize, x: &Tensor, _: &mut dyn NoiseSource) -> Result<Tensor> {
        let mut t = self.timesteps[i] as i64;
        let mut prev_t = t - self.step_ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_out.clone());
        } else {
            // the repeated timestep: step again from the first sample with the averaged ε
            prev_t = t;
            t += self.step_ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = x.clone();
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(x.clone());
            model_out.clone()
        } else if k == 1 && self.counter == 1 {
            sample = self.cur_sample.take().expect("the first step keeps its sample");
            ((model_out + &e[0])? / 2.0)?
        } else if k == 2 {
            (((&e[1] * 3.0)? - &e[0])? / 2.0)?
        } else if k == 3 {
            let s = (((&e[2] * 23.0)? - (&e[1] * 16.0)?)? + (&e[0] * 5.0)?)?;
            schedule::div(&s, 12.0)?
        } else {
            let s = (((&e[3] * 55.0)? - (&e[2] * 59.0)?)? + (&e[1] * 37.0)?)?;
            ((s - (&e[0] * 9.0)?)? * (1.0f32 / 24.0) as f64)?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &eps)?;
        self.counter += 1;
        Ok(prev)
    }

    fn a1111_name(&self) -> &'static str {
        "PLMS"
    }
}
