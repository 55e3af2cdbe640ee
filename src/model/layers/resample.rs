//! Nearest-neighbour 2× upsampling and its backward (a reshape-sum over each 2×2 block).
use candle_core::{Result, Tensor};

pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    x.upsample_nearest2d(2 * h, 2 * w)
}

pub fn upsample_nearest2x_backward(dy: &Tensor) -> Result<Tensor> {
    let (n, c, h2, w2) = dy.dims4()?;
    dy.reshape((n, c, h2 / 2, 2, w2 / 2, 2))?.sum(5)?.sum(3)
}
