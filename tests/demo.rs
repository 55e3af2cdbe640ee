//! The demo pipeline at a reduced size on the embedded base model: dataset → LoRA through the
//! train path → base vs LoRA samples with the same seeds → scores → report.html.
use sdlora::demo::run::{run, DemoOptions};

#[test]
fn demo_runs_end_to_end_and_writes_its_report() {
    let tmp = tempfile::tempdir().unwrap();
    let o = DemoOptions {
        images: 4,
        steps: 4,
        samples: 4,
        sample_steps: 10,
        ..DemoOptions::new(tmp.path().join("demo"))
    };
    let r = run(&o, None, &mut |_| {}).unwrap();
    eprintln!("base knows {:?}, learned {}, forgotten {}", r.base_knows, r.learned, r.forgotten_points);
    assert!(r.lora_bytes > 0 && o.out.join("demo_lora.safetensors").exists());
    let pngs = std::fs::read_dir(o.out.join("data"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png"))
        .count();
    assert_eq!(pngs, 4);
    // The embedded base was pretrained on the world: it paints shapes in the prompt's colour far
    // more often than chance (1 in 8); a random or broken base does not.
    let colour = r.base_knows.1;
    assert!(colour >= 0.5, "base paints the prompt's colour in {:.0} % of control samples", 100.0 * colour);
    let html = std::fs::read_to_string(&r.report).unwrap();
    assert!(html.contains("<svg"), "loss plot");
    // training images, the concept's prompts, the control prompts
    assert_eq!(html.matches("data:image/png;base64,").count(), 3);
    assert!(html.contains("<h2>Scores</h2>") && html.contains("learned"), "scores section");
}
