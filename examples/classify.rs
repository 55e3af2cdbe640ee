//! What the demo's scorer sees in images: `cargo run --release --example classify -- a.png b.png`
//! prints each image's shape, colour, texture and geometry (the numbers `learned`/`forgotten` rest on).
fn main() {
    for p in std::env::args().skip(1) {
        let img = match image::open(&p) {
            Ok(i) => i.to_rgb8(),
            Err(e) => {
                eprintln!("{p}: unreadable image ({e})");
                std::process::exit(1);
            }
        };
        let c = sdlora::eval::scores::classify(&img);
        let m = sdlora::eval::scores::measure(&img);
        println!("{p}: {:?} {:?} {:?} {:?}", c.shape, c.colour, c.texture, m.and_then(|m| m.features));
    }
}
