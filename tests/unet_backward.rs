//! The whole U-Net's backward against finite differences (f64, random weights, random LoRA on
//! every layer), for an SD1-like and an SDXL-like tiny config; gradient checkpointing must give
//! the same gradients.
use crate::common;
use candle_core::{DType, Device, Tensor};
use common::{dot, fd_check, randn, var};
use sdlora::lora::{attach, Init, LoraSpec};
use sdlora::model::config::UNetConfig;
use sdlora::model::layers::Grads;
use sdlora::model::unet::{UNet2DConditionModel, UNetInput};
use sdlora::model::weights::Weights;

fn tiny(sdxl: bool) -> UNetConfig {
    let json = if sdxl {
        r#"{"block_out_channels":[8,16],"layers_per_block":1,"norm_num_groups":4,"cross_attention_dim":6,
            "attention_head_dim":[1,2],"transformer_layers_per_block":[1,2],"use_linear_projection":true,
            "down_block_types":["DownBlock2D","CrossAttnDownBlock2D"],"up_block_types":["CrossAttnUpBlock2D","UpBlock2D"],
            "addition_embed_type":"text_time","addition_time_embed_dim":4,"projection_class_embeddings_input_dim":29}"#
    } else {
        r#"{"block_out_channels":[8,16],"layers_per_block":1,"norm_num_groups":4,"cross_attention_dim":6,
            "attention_head_dim":2,"down_block_types":["CrossAttnDownBlock2D","DownBlock2D"],
            "up_block_types":["UpBlock2D","CrossAttnUpBlock2D"]}"#
    };
    serde_json::from_str(json).unwrap()
}

fn check(sdxl: bool) {
    let cfg = tiny(sdxl);
    let mut unet = UNet2DConditionModel::load(&cfg, &Weights::random(3, DType::F64, &Device::Cpu)).unwrap();
    let spec = LoraSpec {
        rank: 2,
        alpha: 2.0,
        multiplier: 1.0,
        init: Init::Random,
        seed: 9,
        dtype: DType::F64,
        dropout: 0.0,
        dora: false,
        factored: None,
        switch: sdlora::model::layers::adapter::switch(),
    };
    let infos = attach(&mut unet, "", &|_, _| true, &spec, 0, &Device::Cpu).unwrap();
    let sample = var(&[2, 4, 8, 8], 1);
    let t = Tensor::new(&[911f32, 37.0], &Device::Cpu).unwrap();
    let ctx = var(&[2, 5, 6], 2);
    let text = var(&[2, 5], 3);
    let ids =
        Tensor::new(&[[64f64, 64., 0., 0., 64., 64.], [48., 56., 4., 2., 64., 64.]], &Device::Cpu).unwrap();
    let r = randn(&[2, 4, 8, 8], 4);
    let input = || UNetInput {
        sample: &sample,
        timestep: &t,
        encoder_hidden_states: &ctx,
        text_embeds: sdxl.then_some(text.as_tensor()),
        time_ids: sdxl.then_some(&ids),
    };
    let (_, saved) = unet.forward_train(&input()).unwrap();
    let mut g = Grads::default();
    let d = unet.backward(saved, &r, &mut g).unwrap();
    let loss = || dot(&unet.forward(&input()).unwrap(), &r);
    fd_check("unet d sample", &sample, &d.sample, &loss, 12);
    fd_check("unet d encoder_hidden_states", &ctx, &d.encoder_hidden_states, &loss, 12);
    if sdxl {
        fd_check("unet d text_embeds", &text, d.text_embeds.as_ref().unwrap(), &loss, 6);
    }
    // every adapter got a gradient; spot-check a spread of them by finite differences
    assert!(infos.iter().all(|a| g.get(a.id).is_some()), "an adapter received no gradient");
    for a in infos.iter().step_by(5) {
        let (dd, du) = g.get(a.id).unwrap();
        fd_check(&format!("{} down", a.path), &a.down, dd, &loss, 3);
        fd_check(&format!("{} up", a.path), &a.up, du, &loss, 3);
    }

    // gradient checkpointing recomputes the forward inside the backward: identical gradients
    unet.gradient_checkpointing = true;
    let (_, saved) = unet.forward_train(&input()).unwrap();
    let mut g2 = Grads::default();
    let d2 = unet.backward(saved, &r, &mut g2).unwrap();
    let same = |a: &Tensor, b: &Tensor| {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    };
    assert!(same(&d.sample, &d2.sample) < 1e-12);
    for a in &infos {
        let (x, y) = (g.get(a.id).unwrap(), g2.get(a.id).unwrap());
        assert!(
            same(&x.0, &y.0) < 1e-12 && same(&x.1, &y.1) < 1e-12,
            "{}: checkpointing changed the gradient",
            a.path
        );
    }
}

#[test]
fn sd1_like_unet_backward_matches_finite_differences() {
    check(false);
}

#[test]
fn sdxl_like_unet_backward_matches_finite_differences() {
    check(true);
}
