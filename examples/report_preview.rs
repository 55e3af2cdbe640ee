//! Writes a PREVIEW of the training report, to look at its layout without training anything:
//! rendered tiny-world images stand in for generated samples and the loss curve is synthetic. The
//! scores are real measurements — of those stand-ins.
//!
//! cargo run --example report_preview [-- out.html]   (default: report_preview.html in the temp dir)
use anyhow::Result;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use sdlora::eval::metrics::{followed, forgotten, learned};
use sdlora::eval::scores::{add_noise, blur3};
use sdlora::eval::world::{scenes, Scene, Shape, IMAGE_SIZE};
use sdlora::report::{grid, grid_rows, Report, Scores};

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(|| std::env::temp_dir().join("report_preview.html"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let render = |s: &[Scene]| -> Vec<RgbImage> { s.iter().map(|s| s.render(IMAGE_SIZE)).collect() };
    // "Generated" samples: world renders softened and grainy, as a sampler's output would be.
    let mut soften = |imgs: Vec<RgbImage>| -> Vec<RgbImage> {
        imgs.iter().map(|i| add_noise(&blur3(i), 8.0, &mut rng)).collect()
    };

    // The target prompt before training (the base model draws other shapes), part-way, and after.
    let others = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Cross, Shape::Ring];
    let before = soften(render(&scenes(1, 8, &others)));
    let mid: Vec<RgbImage> = soften(
        render(&scenes(2, 4, &others)).into_iter().chain(render(&scenes(3, 4, &[Shape::Star]))).collect(),
    );
    let after = soften(render(&scenes(4, 8, &[Shape::Star])));

    // Control prompts: base and "LoRA" (the same scenes, drawn slightly differently).
    let control = scenes(5, 8, &others);
    let expected: Vec<_> = control.iter().map(|s| s.asked()).collect();
    let base = soften(render(&control));
    let lora = soften(base.clone());

    let forgetting = forgotten(&base, &lora, &expected);
    let stars: Vec<_> = scenes(4, 8, &[Shape::Star]).iter().map(|s| s.asked()).collect();
    let scores = Scores {
        target: "star".into(),
        learned: Some(learned(&after, &stars)),
        learned_base: Some(learned(&before, &stars)),
        learned_of: stars.len(),
        followed: Some((followed(&after, &stars), followed(&before, &stars))),
        forgetting: Some(forgetting),
        misses: vec![],
    };

    // A synthetic loss: a decaying mean with the large per-step spread of diffusion training.
    let mut lrng = rand::rngs::StdRng::seed_from_u64(7);
    let losses: Vec<f64> = (0..600)
        .map(|i| {
            let mean = 0.07 + 0.09 * (-(i as f64) / 140.0).exp();
            mean * (0.35 + 1.3 * lrng.random::<f64>())
        })
        .collect();

    let settings = [
        ("mode", "PREVIEW — stand-in images, synthetic loss"),
        ("model", "(none: preview)"),
        ("data", "tiny world, seed 4, 8 stars (\"a red star on a blue background\", …)"),
        ("steps", "600"),
        ("batch size", "4"),
        ("rank / alpha", "16 / 16"),
        ("learning rate", "1e-4, constant"),
        ("resolution", "64 × 64"),
        ("seed", "42"),
    ];
    let report = Report {
        title: "PREVIEW · Tiny world: teach “star”, keep everything else".into(),
        notes: vec!["Layout preview — not a training run. The sample grids are rendered tiny-world images \
             (blurred and noised) standing in for generated samples, and the loss curve is synthetic; \
             the scores are measured on those stand-ins."
            .into()],
        settings: settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        losses,
        val_losses: vec![],
        eval_loss: Some((0.1612, 0.0934)),
        grids: vec![
            ("before — “a … star on a … background”".into(), grid(&before, 8)),
            ("step 300".into(), grid(&mid, 8)),
            ("after".into(), grid(&after, 8)),
            (
                "base vs LoRA — control prompts, same seeds (top: base, bottom: with LoRA)".into(),
                grid_rows(&[&base, &lora]),
            ),
        ],
        scores: Some(scores),
        lora_bytes: 3_358_720,
        seconds: 1234.5,
        images_per_second: 1.94,
        epochs: None,
    };
    report.write(&out)?;
    println!("{}", out.display());
    Ok(())
}
