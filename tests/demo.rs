//! The demo pipeline at a reduced size: dataset → LoRA through the train path → base vs LoRA
//! samples with the same seeds → report.html with the loss plot and the grids.
use sdlora::demo::run::{run, DemoOptions};
use sdlora::demo::world::Shape;

#[test]
fn demo_runs_end_to_end_and_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let o = DemoOptions {
        out: tmp.path().join("demo"),
        concept: Shape::Star,
        images: 4,
        steps: 4,
        side: 32,
        seed: 3,
    };
    let r = run(&o, None, &mut |_| {}).unwrap();
    assert!(!r.pretrained_base);
    assert!(r.lora_bytes > 0 && o.out.join("demo_lora.safetensors").exists());
    let pngs = std::fs::read_dir(o.out.join("data"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png"))
        .count();
    assert_eq!(pngs, 4);
    let html = std::fs::read_to_string(&r.report).unwrap();
    assert!(html.contains("<svg"), "loss plot");
    // training images, the concept's prompts, the control prompts
    assert_eq!(html.matches("data:image/png;base64,").count(), 3);
    assert!(html.contains("RANDOM model"), "an unpretrained base is said to be one");
}
