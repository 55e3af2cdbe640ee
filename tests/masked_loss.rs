//! `--masked-loss`: masks from `-masklabel.png` files and alpha channels, carried through crops
//! and flips to the latent's pixels, and a LoRA that learns only what its masks show.
use crate::common;
use candle_core::{DType, Device, Tensor};
use common::data::tiny_model;
use sdlora::train::config::{TrainArgs, TrainConfig};
use sdlora::train::{setup, state, trainer};
use std::path::Path;

const SIDE: u32 = 32;

/// 4 images whose left half is a smooth picture and whose right half is fresh noise, masked to
/// the left half: two by `-masklabel.png` files, two by their alpha channel.
fn half_noise_dataset(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut seed = seed;
    let mut noise = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 56) as u8
    };
    for i in 0..4u32 {
        let px = |x: u32, y: u32, n: u8| -> [u8; 3] {
            if x < SIDE / 2 {
                let d = ((x as f32 - 8.0).powi(2) + (y as f32 - 16.0).powi(2)).sqrt();
                let inside = d < 5.0 + i as f32;
                [if inside { 230 } else { 40 }, (60 * i) as u8, if inside { 30 } else { 200 }]
            } else {
                [n, n.wrapping_mul(7), n.wrapping_mul(13)]
            }
        };
        let name = dir.join(format!("img{i}.png"));
        if i % 2 == 0 {
            let img = image::RgbImage::from_fn(SIDE, SIDE, |x, y| image::Rgb(px(x, y, noise())));
            img.save(&name).unwrap();
            let mask = image::GrayImage::from_fn(SIDE, SIDE, |x, _| {
                image::Luma([if x < SIDE / 2 { 255 } else { 0 }])
            });
            mask.save(dir.join(format!("img{i}-masklabel.png"))).unwrap();
        } else {
            let img = image::RgbaImage::from_fn(SIDE, SIDE, |x, y| {
                let [r, g, b] = px(x, y, noise());
                image::Rgba([r, g, b, if x < SIDE / 2 { 255 } else { 0 }])
            });
            img.save(&name).unwrap();
        }
        std::fs::write(dir.join(format!("img{i}.txt")), "a disc").unwrap();
    }
}

fn config(model: &Path, data: &Path, out: &Path, masked: bool, flip: bool) -> TrainConfig {
    let val = data.with_file_name("fresh");
    let args = TrainArgs {
        val_data: Some(val),
        model: Some(model.display().to_string()),
        data: Some(data.to_path_buf()),
        output: Some(out.to_path_buf()),
        batch_size: Some(2),
        rank: Some(4),
        resolution: Some(SIDE),
        // low noise levels, where a picture and noise call for the most different predictions
        max_timestep: Some(300),
        steps: Some(200),
        lr: Some(1e-2),
        masked_loss: Some(masked),
        flip: Some(flip),
        ..Default::default()
    };
    TrainConfig::resolve(&args).unwrap()
}

/// A [1, h, w] latent mask of the left (or right) half.
fn half(h: usize, w: usize, left: bool) -> Tensor {
    let v: Vec<f32> = (0..h * w).map(|i| if (i % w < w / 2) == left { 1.0 } else { 0.0 }).collect();
    Tensor::from_vec(v, (1, h, w), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// The fixed-draw loss of the left and the right halves of the training images, and of the
/// held-out ones: [train left, train right, held-out left, held-out right].
fn half_losses(run: &mut setup::Run, cfg: &TrainConfig) -> [f64; 4] {
    let (h, w) = (run.samples[0].latent.dim(1).unwrap(), run.samples[0].latent.dim(2).unwrap());
    let mut out = [0.0; 4];
    for left in [true, false] {
        for s in &mut run.samples {
            s.mask = Some(half(h, w, left));
        }
        for i in 0..run.samples.len() {
            let slot = usize::from(run.items[run.samples[i].item].val) * 2 + usize::from(!left);
            for k in 0..8 {
                out[slot] += trainer::loss_of(run, cfg, &[i], 1000 + 10 * (i % 4) as u64 + k).unwrap();
            }
        }
    }
    out
}

#[test]
fn masks_follow_their_images_and_the_lora_learns_only_the_unmasked_half() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
    tiny_model(&model);
    half_noise_dataset(&data, 1);
    half_noise_dataset(&tmp.path().join("fresh"), 2);

    // both kinds of mask reach the latent's resolution, flipped with their image; the mask
    // files are not taken for images
    let cfg = config(&model, &data, &tmp.path().join("m.safetensors"), true, true);
    let mut run = setup::setup(&cfg, &mut |_, _, _| {}).unwrap();
    assert_eq!(run.samples.len(), 8, "a -masklabel.png was taken for a training image");
    let (h, w) = (run.samples[0].latent.dim(1).unwrap(), run.samples[0].latent.dim(2).unwrap());
    for s in &run.samples {
        assert_eq!(values(s.mask.as_ref().unwrap()), values(&half(h, w, true)), "{}", s.item);
        assert_eq!(values(s.mask_flipped.as_ref().unwrap()), values(&half(h, w, false)), "{}", s.item);
    }
    // a mask of ones is the plain loss; half a mask weighs half the pixels
    let masked = trainer::loss_of(&run, &cfg, &[0, 1], 5).unwrap();
    let one = Tensor::ones((1, h, w), DType::F32, &Device::Cpu).unwrap();
    for s in &mut run.samples {
        (s.mask, s.mask_flipped) = (Some(one.clone()), Some(one.clone()));
    }
    let ones = trainer::loss_of(&run, &cfg, &[0, 1], 5).unwrap();
    for s in &mut run.samples {
        (s.mask, s.mask_flipped) = (None, None);
    }
    let plain = trainer::loss_of(&run, &cfg, &[0, 1], 5).unwrap();
    assert_eq!(ones, plain);
    assert!(masked < 0.8 * plain && masked > 0.2 * plain, "masked {masked}, plain {plain}");

    // trained with and without the masks: what each learned of either half
    let plain_cfg = config(&model, &data, &tmp.path().join("p.safetensors"), false, false);
    let masked_cfg = config(&model, &data, &tmp.path().join("m.safetensors"), true, false);
    let mut run = setup::setup(&plain_cfg, &mut |_, _, _| {}).unwrap();
    let before = half_losses(&mut run, &plain_cfg);
    let mut learned = |cfg: &TrainConfig| {
        let s = trainer::train(setup::setup(cfg, &mut |_, _, _| {}).unwrap(), cfg, &mut |_| {}).unwrap();
        assert!(s.losses.iter().all(|l| l.is_finite()), "{:?}", s.losses);
        state::load(&state::state_path(&cfg.output), &run.adapters, None, &mut run.opt, None).unwrap();
        let after = half_losses(&mut run, &plain_cfg);
        let drop: Vec<f64> = (0..4).map(|i| 1.0 - after[i] / before[i]).collect();
        drop
    };
    let p = learned(&plain_cfg);
    let m = learned(&masked_cfg);
    eprintln!(
        "loss drop [train left, train right, held-out left, held-out right]: plain {p:.3?} masked {m:.3?}"
    );
    // The tiny random base is far off everywhere, so most of what any LoRA learns here helps
    // every pixel alike. Beyond that share, the plain run fits the noise half better than the
    // picture half, the masked run the picture half better; and it fits the picture half
    // better than the plain run does, undistracted by the noise.
    for (name, d) in [("plain", &p), ("masked", &m)] {
        assert!(d.iter().all(|x| *x > 0.2), "{name} learned too little to compare: {d:?}");
    }
    let noise_share = |d: &[f64]| d[1] - d[0];
    assert!(noise_share(&p) > 0.0, "plain: {p:?}");
    assert!(noise_share(&m) < noise_share(&p) - 0.04, "masked {m:?} vs plain {p:?}");
    assert!(m[0] > p[0], "the masked run fits the unmasked half worse than the plain one: {m:?} vs {p:?}");
    // the same on held-out images of the same kind: nothing here is memorised
    assert!(noise_share(&m[2..]) < noise_share(&p[2..]) - 0.04, "held out: masked {m:?} vs plain {p:?}");
}
