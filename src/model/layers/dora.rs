//! DoRA (Liu et al., 2024) on a LoRA adapter: the layer's weight becomes
//! m · (W + s·up·down) / ‖W + s·up·down‖, the norm taken per output channel and held constant in
//! the backward (the paper's §4.3, and peft). With the base output b = W ⋆ x and the LoRA delta
//! l = s·up(down(x)), the adapter adds k·((g − 1)·b + g·l), g = m / ‖W + s·up·down‖, k its strength.
use super::adapter::{Lora, Op};
use super::linear::flatten2;
use super::Grads;
use candle_core::{Result, Tensor};

/// What the backward needs: g and 1/‖·‖ per channel, and b + l.
pub struct DoraSaved {
    g: Tensor,
    inv_norm: Tensor,
    u: Tensor,
}

/// A per-channel vector [o] shaped to broadcast over the layer's output.
fn per_channel(op: Op, t: &Tensor) -> Result<Tensor> {
    match op {
        Op::Matmul => Ok(t.clone()),
        Op::Conv { .. } => t.reshape((1, (), 1, 1)),
    }
}

/// (g, 1/‖W + s·up·down‖) per output channel of the base weight `w`.
pub fn factors(a: &Lora, w: &Tensor) -> Result<(Tensor, Tensor)> {
    let m = a.magnitude.as_ref().expect("a DoRA adapter").as_tensor().detach();
    let (up, down) = (a.up.as_tensor().detach(), a.down.as_tensor().detach());
    let (o, r) = (w.dim(0)?, a.rank());
    let lw = up.reshape((o, r))?.matmul(&down.reshape((r, ()))?)?;
    let wf = w.detach().to_dtype(lw.dtype())?.reshape((o, ()))?;
    let inv_norm = (wf + (lw * a.scale)?)?.sqr()?.sum(1)?.sqrt()?.recip()?;
    Ok(((m.flatten_all()? * &inv_norm)?, inv_norm))
}

/// The adapter's addition to the layer's output, from the base output `base_out` (without bias)
/// and the LoRA delta `delta`.
pub fn forward(
    a: &Lora,
    op: Op,
    w: &Tensor,
    base_out: &Tensor,
    delta: &Tensor,
) -> Result<(Tensor, DoraSaved)> {
    let (g, inv_norm) = factors(a, w)?;
    let u = (base_out + delta)?;
    // g·(b + l) − b = (g − 1)·b + g·l
    let term = ((u.broadcast_mul(&per_channel(op, &g)?)? - base_out)? * a.strength)?;
    Ok((term, DoraSaved { g, inv_norm, u }))
}

/// dm into `grads`; returns the upstream gradient the low-rank path sees (dy·k·g) and the base
/// weight's share of dx, from the (g − 1)·b term, for an input of shape `x_dims`.
pub fn backward(
    a: &Lora,
    (op, w): (Op, &Tensor),
    d: &DoraSaved,
    dy: &Tensor,
    x_dims: &[usize],
    grads: &mut Grads,
) -> Result<(Tensor, Tensor)> {
    let dyk = (dy * a.strength)?;
    let prod = (&dyk * &d.u)?;
    let summed = match op {
        Op::Matmul => flatten2(&prod)?.sum(0)?,
        Op::Conv { .. } => prod.sum((0, 2, 3))?,
    };
    let m = a.magnitude.as_ref().expect("a DoRA adapter");
    grads.add_weight(m.as_tensor(), (summed * &d.inv_norm)?.reshape(m.shape())?)?;
    let dy_lora = dyk.broadcast_mul(&per_channel(op, &d.g)?)?;
    let dx_base = op.input_grad(&(&dy_lora - &dyk)?, &w.detach().to_dtype(dy.dtype())?, x_dims)?;
    Ok((dy_lora, dx_base))
}
