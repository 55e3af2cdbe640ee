//! `sdlora bench --case`: the harness behind the CPU-speed figures in BENCHMARKS.md runs a LoRA
//! step and a forward on a model folder and reports what the comparison script parses.
use std::process::Command;

fn median(out: &str) -> f64 {
    let line = out.lines().last().unwrap_or_default();
    let rest = line.strip_prefix("sdlora: median ").unwrap_or_else(|| panic!("no summary line in:\n{out}"));
    let secs: f64 = rest.split(' ').next().unwrap().parse().unwrap();
    assert!(line.contains("peak RSS") && line.contains("minor faults"), "{line}");
    secs
}

#[test]
fn bench_times_steps_and_forwards_of_a_model_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    let bin = env!("CARGO_BIN_EXE_sdlora");
    let run = |args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    run(&["bench", "--write-model", model.to_str().unwrap(), "--size", "tiny"]);
    for case in ["step", "forward"] {
        let out = run(&[
            "bench",
            "--case",
            case,
            "--model",
            model.to_str().unwrap(),
            "--resolution",
            "64",
            "--batch-size",
            "2",
            "--steps",
            "3",
        ]);
        assert_eq!(out.lines().filter(|l| l.starts_with("step ")).count(), 3, "{out}");
        assert!(median(&out) > 0.0, "{out}");
    }
}
