//! A tiny model and a tiny dataset, made on the fly.
use std::path::Path;

/// Writes the tiny SD1-shaped random model (real CLIP vocabulary) to `dir`.
pub fn tiny_model(dir: &Path) {
    sdlora::model::tiny::write_random_pipeline(
        dir,
        &sdlora::model::tiny::tiny_sd1(),
        7,
        candle_core::DType::F32,
    )
    .unwrap();
}

/// `n` 32×32 images of coloured discs on coloured backgrounds, with captions.
pub fn tiny_dataset(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let colours = [
        ("red", [220u8, 40, 40]),
        ("blue", [40, 60, 220]),
        ("green", [40, 200, 60]),
        ("yellow", [230, 220, 40]),
    ];
    for i in 0..n {
        let (fname, fg) = colours[i % 4];
        let (bname, bg) = colours[(i + 1 + i / 4) % 4];
        let img = image::RgbImage::from_fn(32, 32, |x, y| {
            let (dx, dy) = (x as i32 - 16 + (i as i32 % 3) - 1, y as i32 - 16);
            image::Rgb(if dx * dx + dy * dy < 90 { fg } else { bg })
        });
        img.save(dir.join(format!("img{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("img{i}.txt")), format!("a {fname} circle on a {bname} background"))
            .unwrap();
    }
}
