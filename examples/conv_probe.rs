use candle_core::{Device, Tensor};
fn im2col_conv(x: &Tensor, w: &Tensor, pad: usize) -> Tensor {
    let (n, c, h, ww) = x.dims4().unwrap();
    let (o, _, k, _) = w.dims4().unwrap();
    let xp = x.pad_with_zeros(2, pad, pad).unwrap().pad_with_zeros(3, pad, pad).unwrap();
    let mut taps = vec![];
    for i in 0..k {
        for j in 0..k {
            taps.push(xp.narrow(2, i, h).unwrap().narrow(3, j, ww).unwrap());
        }
    }
    // [N, C, k*k, H, W] -> [N, C*k*k, H*W]
    let cols = Tensor::stack(&taps, 2).unwrap().reshape((n, c * k * k, h * ww)).unwrap();
    let wm = w.reshape((o, c * k * k)).unwrap();
    wm.broadcast_matmul(&cols).unwrap().reshape((n, o, h, ww)).unwrap()
}
fn main() {
    for (n, c, o, hw) in [(4, 16, 16, 64), (32, 32, 32, 16), (2, 320, 320, 64)] {
        let x = Tensor::randn(0f32, 1., (n, c, hw, hw), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1., (o, c, 3, 3), &Device::Cpu).unwrap();
        let t = std::time::Instant::now();
        let a = x.conv2d(&w, 1, 1, 1, 1).unwrap();
        let ta = t.elapsed();
        let t = std::time::Instant::now();
        let b = im2col_conv(&x, &w, 1);
        let tb = t.elapsed();
        let flops = 2.0 * (n * o * hw * hw * c * 9) as f64;
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        eprintln!(
            "{n}x{c}->{o} @{hw}: candle {:?} ({:.1} GF/s), im2col {:?} ({:.1} GF/s), diff {d}",
            ta,
            flops / ta.as_secs_f64() / 1e9,
            tb,
            flops / tb.as_secs_f64() / 1e9
        );
    }
}
