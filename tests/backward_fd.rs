//! Finite-difference checks of every layer's explicit backward, in f64 on random inputs.
use crate::common;
use candle_core::{DType, Device, Tensor};
use common::{dot, fd_check, randn, var};
use sdlora::lora::{attach, Init, LoraSpec};
use sdlora::model::blocks::{ResnetBlock2D, Transformer2D};
use sdlora::model::layers::load::{conv, group_norm, layer_norm, linear};
use sdlora::model::layers::Grads;
use sdlora::model::layers::*;
use sdlora::model::weights::Weights;

const CPU: Device = Device::Cpu;

fn weights(seed: u64) -> Weights {
    Weights::random(seed, DType::F64, &CPU)
}

fn lora_spec(rank: usize) -> LoraSpec {
    LoraSpec {
        rank,
        alpha: 3.0,
        multiplier: 1.0,
        init: Init::Random,
        seed: 5,
        dtype: DType::F64,
        dropout: 0.0,
        dora: false,
        factored: None,
        switch: sdlora::model::layers::adapter::switch(),
    }
}

/// Attaches random adapters to every layer of `m` and returns their (down, up) vars.
fn add_lora(m: &mut dyn Visit, rank: usize) -> Vec<sdlora::lora::AdapterInfo> {
    attach(m, "", &|_, _| true, &lora_spec(rank), 0, &CPU).unwrap()
}

/// Checks the adapter gradients of `infos` against finite differences of `loss`.
fn check_adapters(infos: &[sdlora::lora::AdapterInfo], g: &Grads, loss: &dyn Fn() -> f64) {
    assert!(!infos.is_empty());
    for a in infos {
        let (dd, du) = g.get(a.id).unwrap_or_else(|| panic!("no gradient for adapter {}", a.path));
        fd_check(&format!("{} lora_down", a.path), &a.down, dd, loss, 6);
        fd_check(&format!("{} lora_up", a.path), &a.up, du, loss, 6);
    }
}

#[test]
fn linear_with_lora() {
    let mut l = linear(&weights(1).pp("l"), 5, 6, true).unwrap();
    let infos = add_lora(&mut l, 3);
    let x = var(&[2, 4, 5], 2);
    let r = randn(&[2, 4, 6], 3);
    let (_, s) = l.forward_train(&x).unwrap();
    let mut g = Grads::default();
    let dx = l.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&l.forward(&x).unwrap(), &r);
    fd_check("linear dx", &x, &dx, &loss, 20);
    check_adapters(&infos, &g, &loss);
}

fn check_conv(cin: usize, cout: usize, k: usize, stride: usize, pad: usize, hw: usize) {
    let mut c = conv(&weights(7).pp("c"), cin, cout, k, stride, pad).unwrap();
    let infos = add_lora(&mut c, 2);
    let x = var(&[2, cin, hw, hw], 8);
    let (y, s) = c.forward_train(&x).unwrap();
    let r = randn(y.dims(), 9);
    let mut g = Grads::default();
    let dx = c.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&c.forward(&x).unwrap(), &r);
    fd_check(&format!("conv{k}x{k}/s{stride}/p{pad} dx"), &x, &dx, &loss, 25);
    check_adapters(&infos, &g, &loss);
}

#[test]
fn conv_3x3() {
    check_conv(3, 4, 3, 1, 1, 6);
}

#[test]
fn conv_3x3_stride2() {
    check_conv(3, 4, 3, 2, 1, 6);
    check_conv(2, 3, 3, 2, 1, 7);
    check_conv(2, 3, 3, 2, 0, 7); // the VAE's downsampler (pads itself first)
}

#[test]
fn conv_1x1() {
    check_conv(4, 5, 1, 1, 0, 3);
}

#[test]
fn group_norm_and_fused_silu() {
    for silu in [false, true] {
        let n = group_norm(&weights(11).pp("norm"), 2, 6, 1e-5).unwrap();
        let x = var(&[2, 6, 3, 3], 12);
        let r = randn(&[2, 6, 3, 3], 13);
        let (_, s) = n.forward_train(&x, silu).unwrap();
        let dx = n.backward(s, &r, &mut Grads::default()).unwrap();
        fd_check(
            &format!("group_norm silu={silu}"),
            &x,
            &dx,
            &|| dot(&n.forward_train(&x, silu).unwrap().0, &r),
            30,
        );
    }
}

#[test]
fn layer_norm_backward() {
    let n = layer_norm(&weights(14).pp("norm"), 7, 1e-5).unwrap();
    let x = var(&[2, 3, 7], 15);
    let r = randn(&[2, 3, 7], 16);
    let (_, s) = n.forward_train(&x).unwrap();
    let dx = n.backward(s, &r, &mut Grads::default()).unwrap();
    fd_check("layer_norm", &x, &dx, &|| dot(&n.forward(&x).unwrap(), &r), 30);
}

#[test]
fn activations() {
    let x = var(&[3, 5], 17);
    let r = randn(&[3, 5], 18);
    fd_check("silu", &x, &silu_backward(&x, &r).unwrap(), &|| dot(&x.silu().unwrap(), &r), 15);
    fd_check("gelu", &x, &gelu_backward(&x, &r).unwrap(), &|| dot(&x.gelu_erf().unwrap(), &r), 15);
    fd_check(
        "quick_gelu",
        &x,
        &quick_gelu_backward(&x, &r).unwrap(),
        &|| dot(&quick_gelu(&x).unwrap(), &r),
        15,
    );
}

#[test]
fn upsample() {
    let x = var(&[1, 2, 3, 4], 19);
    let r = randn(&[1, 2, 6, 8], 20);
    let dx = upsample_nearest2x_backward(&r).unwrap();
    fd_check("upsample", &x, &dx, &|| dot(&upsample_nearest2x(&x).unwrap(), &r), 24);
}

fn attention(causal: bool, ctx_dim: Option<usize>) -> Attention {
    let w = weights(21);
    let c = ctx_dim.unwrap_or(8);
    Attention {
        to_q: linear(&w.pp("q"), 8, 8, true).unwrap(),
        to_k: linear(&w.pp("k"), c, 8, true).unwrap(),
        to_v: linear(&w.pp("v"), c, 8, true).unwrap(),
        to_out: linear(&w.pp("o"), 8, 8, true).unwrap(),
        heads: 2,
        causal,
        names: DIFFUSERS_NAMES,
    }
}

#[test]
fn self_attention_plain_and_causal() {
    for causal in [false, true] {
        let mut a = attention(causal, None);
        let infos = add_lora(&mut a, 2);
        let x = var(&[2, 5, 8], 22);
        let r = randn(&[2, 5, 8], 23);
        let (_, s) = a.forward_train(&x, None).unwrap();
        let mut g = Grads::default();
        let (dx, dctx) = a.backward(s, &r, &mut g).unwrap();
        assert!(dctx.is_none());
        let loss = || dot(&a.forward(&x, None).unwrap(), &r);
        fd_check(&format!("self-attention causal={causal}"), &x, &dx, &loss, 25);
        check_adapters(&infos, &g, &loss);
    }
}

#[test]
fn cross_attention() {
    let a = attention(false, Some(6));
    let x = var(&[2, 5, 8], 24);
    let ctx = var(&[2, 3, 6], 25);
    let r = randn(&[2, 5, 8], 26);
    let (_, s) = a.forward_train(&x, Some(&ctx)).unwrap();
    let (dx, dctx) = a.backward(s, &r, &mut Grads::default()).unwrap();
    let loss = || dot(&a.forward(&x, Some(&ctx)).unwrap(), &r);
    fd_check("cross-attention dx", &x, &dx, &loss, 25);
    fd_check("cross-attention dctx", &ctx, &dctx.unwrap(), &loss, 25);
}

#[test]
fn resnet_block() {
    let mut b = ResnetBlock2D::load(&weights(27).pp("r"), 4, 6, Some(5), 2, 1e-5).unwrap();
    let infos = add_lora(&mut b, 2);
    let x = var(&[2, 4, 4, 4], 28);
    let t = var(&[2, 5], 29);
    let r = randn(&[2, 6, 4, 4], 30);
    let (_, s) = b.forward_train(&x, Some(&t)).unwrap();
    let mut g = Grads::default();
    let (dx, dt) = b.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&b.forward_train(&x, Some(&t)).unwrap().0, &r);
    fd_check("resnet dx", &x, &dx, &loss, 30);
    fd_check("resnet dtemb", &t, &dt.unwrap(), &loss, 10);
    check_adapters(&infos, &g, &loss);
}

#[test]
fn transformer_2d_conv_and_linear_projection() {
    for linear_proj in [false, true] {
        let mut t = Transformer2D::load(&weights(31).pp("t"), 8, 6, 2, 2, 2, linear_proj).unwrap();
        let infos = add_lora(&mut t, 2);
        let x = var(&[2, 8, 3, 3], 32);
        let ctx = var(&[2, 4, 6], 33);
        let r = randn(&[2, 8, 3, 3], 34);
        let (_, s) = t.forward_train(&x, &ctx).unwrap();
        let mut g = Grads::default();
        let (dx, dctx) = t.backward(s, &r, &mut g).unwrap();
        let loss = || dot(&t.forward_train(&x, &ctx).unwrap().0, &r);
        fd_check(&format!("transformer2d linear={linear_proj} dx"), &x, &dx, &loss, 30);
        fd_check(&format!("transformer2d linear={linear_proj} dctx"), &ctx, &dctx, &loss, 20);
        check_adapters(&infos, &g, &loss);
    }
}

#[test]
fn the_check_itself_catches_a_wrong_gradient() {
    let x = var(&[3, 4], 35);
    let r = randn(&[3, 4], 36);
    let wrong = (silu_backward(&x, &r).unwrap() * 1.01).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fd_check("wrong", &x, &wrong, &|| dot(&x.silu().unwrap(), &r), 12)
    }));
    assert!(caught.is_err(), "a 1% error must fail the check");
    let _ = Tensor::zeros(1, DType::F64, &CPU);
}

#[test]
fn clip_text_encoder_backward() {
    use sdlora::model::clip::{ClipOutputGrads, ClipTextModel};
    use sdlora::model::config::ClipTextConfig;
    for (act, proj, eos) in [("quick_gelu", false, 2), ("gelu", true, 9)] {
        let cfg: ClipTextConfig = serde_json::from_str(&format!(
            r#"{{"vocab_size":10,"hidden_size":8,"intermediate_size":12,"num_hidden_layers":3,"num_attention_heads":2,
               "max_position_embeddings":6,"hidden_act":"{act}","eos_token_id":{eos},"projection_dim":5,
               "architectures":["{}"]}}"#,
            if proj { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }
        ))
        .unwrap();
        let mut m = ClipTextModel::load(&cfg, &weights(40)).unwrap();
        let infos = add_lora(&mut m, 2);
        let ids = Tensor::new(&[[0u32, 5, 7, 9, 1, 1], [0, 3, 9, 1, 1, 1]], &CPU).unwrap();
        let e = sdlora::lora::attach::AdapterInfo::clone(&infos[0]); // adapters exist
        assert!(e.rank() == 2);
        let x = common::var(&[2, 6, 8], 41);
        let (rl, rp, rq) =
            (randn(&[2, 6, 8], 42), randn(&[2, 6, 8], 43), randn(&[2, if proj { 5 } else { 8 }], 44));
        let (_, s) = m.forward_train(&ids, &x).unwrap();
        let grads = ClipOutputGrads {
            last_hidden_state: Some(rl.clone()),
            penultimate: Some(rp.clone()),
            pooled: Some(rq.clone()),
        };
        let mut g = Grads::default();
        let dx = m.backward(s, grads, &mut g).unwrap();
        let loss = || {
            let o = m.forward_train(&ids, &x).unwrap().0;
            dot(&o.last_hidden_state, &rl) + dot(&o.penultimate, &rp) + dot(&o.pooled, &rq)
        };
        fd_check(&format!("clip {act} d token embeds"), &x, &dx, &loss, 30);
        check_adapters(&infos[..4], &g, &loss);
    }
}

/// Full training (the demo's base model): base weights that are variables get their
/// gradients, checked by finite differences like the adapters'.
#[test]
fn base_weight_gradients_when_weights_are_variables() {
    use candle_core::Var;
    let vars = |t: &mut Tensor| -> Var {
        let v = Var::from_tensor(t).unwrap();
        *t = v.as_tensor().clone();
        v
    };
    let check = |what: &str, v: &Var, g: &Grads, loss: &dyn Fn() -> f64| {
        let grad = g.weights.get(&v.as_tensor().id()).unwrap_or_else(|| panic!("{what}: no gradient"));
        fd_check(what, v, grad, loss, 10);
    };
    // Linear
    let mut l = linear(&weights(50).pp("l"), 5, 4, true).unwrap();
    let (w, b) = (vars(&mut l.weight), vars(l.bias.as_mut().unwrap()));
    let x = var(&[2, 3, 5], 51);
    let r = randn(&[2, 3, 4], 52);
    let mut g = Grads::default();
    let (_, s) = l.forward_train(&x).unwrap();
    l.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&l.forward(&x).unwrap(), &r);
    check("linear weight", &w, &g, &loss);
    check("linear bias", &b, &g, &loss);
    // Conv2d, stride 2
    let mut c = conv(&weights(53).pp("c"), 3, 4, 3, 2, 1).unwrap();
    let (w, b) = (vars(&mut c.weight), vars(c.bias.as_mut().unwrap()));
    let x = var(&[2, 3, 6, 6], 54);
    let (y, s) = c.forward_train(&x).unwrap();
    let r = randn(y.dims(), 55);
    let mut g = Grads::default();
    c.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&c.forward(&x).unwrap(), &r);
    check("conv weight", &w, &g, &loss);
    check("conv bias", &b, &g, &loss);
    // GroupNorm (+SiLU) and LayerNorm affine parameters
    let mut n = group_norm(&weights(56).pp("n"), 2, 6, 1e-5).unwrap();
    let (w, b) = (vars(&mut n.weight), vars(&mut n.bias));
    let x = var(&[2, 6, 3, 3], 57);
    let r = randn(&[2, 6, 3, 3], 58);
    let mut g = Grads::default();
    let (_, s) = n.forward_train(&x, true).unwrap();
    n.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&n.forward_train(&x, true).unwrap().0, &r);
    check("group_norm weight", &w, &g, &loss);
    check("group_norm bias", &b, &g, &loss);
    let mut n = layer_norm(&weights(59).pp("n"), 7, 1e-5).unwrap();
    let (w, b) = (vars(&mut n.weight), vars(n.bias.as_mut().unwrap()));
    let x = var(&[2, 3, 7], 60);
    let r = randn(&[2, 3, 7], 61);
    let mut g = Grads::default();
    let (_, s) = n.forward_train(&x).unwrap();
    n.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&n.forward(&x).unwrap(), &r);
    check("layer_norm weight", &w, &g, &loss);
    check("layer_norm bias", &b, &g, &loss);
}

#[test]
fn vae_encoder_and_decoder_backward() {
    use sdlora::model::config::VaeConfig;
    use sdlora::model::vae::AutoencoderKL;
    let cfg: VaeConfig = serde_json::from_str(
        r#"{"block_out_channels":[4,8],"layers_per_block":1,"latent_channels":2,"norm_num_groups":2}"#,
    )
    .unwrap();
    let vae = AutoencoderKL::load(&cfg, &weights(70)).unwrap();
    let x = var(&[1, 3, 8, 8], 71);
    let (m, s) = vae.encode_train(&x).unwrap();
    let r = randn(m.dims(), 72);
    let dx = vae.encode_backward(s, &r, &mut Grads::default()).unwrap();
    fd_check("vae encoder", &x, &dx, &|| dot(&vae.encode_moments(&x).unwrap(), &r), 20);
    let z = var(&[1, 2, 4, 4], 73);
    let (y, s) = vae.decode_train(&z).unwrap();
    let r = randn(y.dims(), 74);
    let dz = vae.decode_backward(s, &r, &mut Grads::default()).unwrap();
    fd_check("vae decoder", &z, &dz, &|| dot(&vae.decode(&z).unwrap(), &r), 20);
}

/// LoRA dropout: with the step's seed fixed the masks are fixed, so the backward is checkable.
#[test]
fn lora_dropout_backward() {
    let switch = sdlora::model::layers::adapter::switch();
    let spec = LoraSpec { dropout: 0.5, switch: switch.clone(), ..lora_spec(2) };
    switch.set_dropout_seed(1234);
    let mut l = linear(&weights(80).pp("l"), 6, 5, true).unwrap();
    let infos = attach(&mut l, "", &|_, _| true, &spec, 0, &CPU).unwrap();
    let x = var(&[2, 3, 6], 81);
    let r = randn(&[2, 3, 5], 82);
    let (_, s) = l.forward_train(&x).unwrap();
    let mut g = Grads::default();
    let dx = l.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&l.forward(&x).unwrap(), &r);
    fd_check("linear+dropout dx", &x, &dx, &loss, 20);
    check_adapters(&infos, &g, &loss);
    let mut c = conv(&weights(83).pp("c"), 3, 4, 3, 2, 1).unwrap();
    let infos = attach(&mut c, "", &|_, _| true, &spec, 0, &CPU).unwrap();
    let x = var(&[2, 3, 6, 6], 84);
    let (y, s) = c.forward_train(&x).unwrap();
    let r = randn(y.dims(), 85);
    let mut g = Grads::default();
    let dx = c.backward(s, &r, &mut g).unwrap();
    let loss = || dot(&c.forward(&x).unwrap(), &r);
    fd_check("conv+dropout dx", &x, &dx, &loss, 20);
    check_adapters(&infos, &g, &loss);
    // with no step seed (inference) dropout is off: the output is deterministic and unmasked
    switch.set_dropout_seed(u64::MAX);
    let a = c.forward(&x).unwrap();
    switch.set_dropout_seed(99);
    let b = c.forward(&x).unwrap();
    assert!(dot(&(&a - &b).unwrap(), &(&a - &b).unwrap()) > 1e-12, "a step seed turns dropout on");
}

/// A switched-off adapter (the base prediction of `train --prior-preservation output`) adds
/// nothing and collects no gradient; switched back on, the layer is the LoRA's again.
#[test]
fn switched_off_adapters_leave_the_base_layer() {
    let switch = sdlora::model::layers::adapter::switch();
    let spec = LoraSpec { switch: switch.clone(), ..lora_spec(2) };
    let base = linear(&weights(90).pp("l"), 6, 5, true).unwrap();
    let mut l = linear(&weights(90).pp("l"), 6, 5, true).unwrap();
    attach(&mut l, "", &|_, _| true, &spec, 0, &CPU).unwrap();
    let c0 = conv(&weights(91).pp("c"), 3, 4, 3, 1, 1).unwrap();
    let mut c = conv(&weights(91).pp("c"), 3, 4, 3, 1, 1).unwrap();
    attach(&mut c, "", &|_, _| true, &spec, 1, &CPU).unwrap();
    let (x, xc) = (randn(&[2, 3, 6], 92), randn(&[2, 3, 5, 5], 93));
    let diff = |a: &Tensor, b: &Tensor| {
        let d = (a - b).unwrap();
        dot(&d, &d)
    };
    assert!(diff(&l.forward(&x).unwrap(), &base.forward(&x).unwrap()) > 1e-6, "adapters on");
    switch.set_off(true);
    assert_eq!(diff(&l.forward(&x).unwrap(), &base.forward(&x).unwrap()), 0.0);
    assert_eq!(diff(&c.forward(&xc).unwrap(), &c0.forward(&xc).unwrap()), 0.0);
    let mut g = Grads::default();
    let (y, s) = c.forward_train(&xc).unwrap();
    let dx = c.backward(s, &randn(y.dims(), 94), &mut g).unwrap();
    assert_eq!(dx.dims(), xc.dims());
    assert!(g.get(1).is_none(), "no gradient for a switched-off adapter");
    switch.set_off(false);
    assert!(diff(&c.forward(&xc).unwrap(), &c0.forward(&xc).unwrap()) > 1e-6, "adapters back on");
}

/// The CPU f32 convolution builds its own im2col (`layers::conv::conv2d`): its output, the input
/// gradient that runs through it and the kernel gradient equal candle's f64 path on the same
/// numbers.
#[test]
fn f32_im2col_conv_matches_candle_f64() {
    use sdlora::model::layers::conv::{conv2d, conv_input_grad, kernel_grad};
    let rel = |a: &Tensor, b: &Tensor| {
        let d = (a.to_dtype(DType::F64).unwrap() - b).unwrap().abs().unwrap();
        let m = b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        d.max_all().unwrap().to_scalar::<f64>().unwrap() / m
    };
    // (n, cin, cout, k, stride, pad, h, w)
    for (i, &(n, cin, cout, k, stride, pad, h, w)) in [
        (2, 3, 4, 3, 1, 1, 6, 5),
        (1, 5, 2, 3, 2, 1, 7, 8),
        (3, 4, 3, 3, 2, 0, 7, 7),
        (2, 3, 5, 1, 2, 0, 6, 6),
        (1, 2, 3, 1, 1, 1, 4, 5),
    ]
    .iter()
    .enumerate()
    {
        let x = randn(&[n, cin, w, h], 20 + i as u64).transpose(2, 3).unwrap(); // not contiguous
        let wt = randn(&[cout, cin, k, k], 40 + i as u64);
        let want = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
        let (x32, w32) = (x.to_dtype(DType::F32).unwrap(), wt.to_dtype(DType::F32).unwrap());
        let got = conv2d(&x32, &w32, pad, stride).unwrap();
        assert_eq!(got.dims(), want.dims());
        let e = rel(&got, &want);
        assert!(e < 1e-5, "conv {n}x{cin}x{h}x{w} k{k} s{stride} p{pad}: rel err {e:e}");

        if pad >= k {
            continue; // no layer pads a kernel by its own size or more; conv_input_grad needs pad < k
        }
        let dy = randn(want.dims(), 60 + i as u64);
        let dx_want = conv_input_grad(&dy, &wt, stride, pad, (h, w)).unwrap();
        let dx = conv_input_grad(&dy.to_dtype(DType::F32).unwrap(), &w32, stride, pad, (h, w)).unwrap();
        let e = rel(&dx, &dx_want);
        assert!(e < 1e-5, "dx {n}x{cin}x{h}x{w} k{k} s{stride} p{pad}: rel err {e:e}");
        let dw_want = kernel_grad(&x, &dy, wt.dims4().unwrap(), stride, pad).unwrap();
        let dw =
            kernel_grad(&x32, &dy.to_dtype(DType::F32).unwrap(), wt.dims4().unwrap(), stride, pad).unwrap();
        let e = rel(&dw, &dw_want);
        assert!(e < 1e-5, "dW {n}x{cin}x{h}x{w} k{k} s{stride} p{pad}: rel err {e:e}");
    }
}
