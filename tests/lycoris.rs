//! LyCORIS LoHa and LoKr files (tests/fixtures/sd1/lycoris/ from tools/fixtures/lycoris.py: peft's
//! modules in LyCORIS's kohya names): applied for generation they give peft's output; `merge`
//! bakes them in alike; `generate --lora-start` and `convert` refuse them by name.
use crate::parity::{close, fixture, io};
use sdlora::model::load::{load, LoadOptions};

fn sdlora(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn loha_and_lokr_files_give_peft_output_applied_and_merged() {
    let tmp = tempfile::tempdir().unwrap();
    let pipe = fixture("sd1/pipe");
    let opts = LoadOptions { vae: false, text_encoders: false, ..Default::default() };
    for kind in ["loha", "lokr"] {
        let file = fixture(&format!("sd1/lycoris/{kind}.safetensors"));
        let t = io(&format!("sd1/lycoris/{kind}_io.safetensors"));
        let input = crate::common::unet_input(&t);
        let mut sd = load(pipe.to_str().unwrap(), &opts).unwrap();
        let applied = sdlora::lora::apply::apply(&mut sd, &file, 1.0, 0, true).unwrap();
        assert_eq!((applied.adapters.len(), applied.merged), (0, 52), "{kind}");
        close(
            &format!("{kind} applied"),
            &sd.unet.as_ref().unwrap().forward(&input).unwrap(),
            &t["out"],
            1e-4,
        );

        // merged at 0.6 == applied at 0.6
        let mut sd = load(pipe.to_str().unwrap(), &opts).unwrap();
        sdlora::lora::apply::apply(&mut sd, &file, 0.6, 0, true).unwrap();
        let want = sd.unet.as_ref().unwrap().forward(&input).unwrap();
        let out = tmp.path().join(kind);
        let arg = format!("{}:0.6", file.display());
        let (ok, err) = sdlora(&[
            "merge",
            "--model",
            pipe.to_str().unwrap(),
            "--lora",
            &arg,
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{err}");
        let m = load(out.to_str().unwrap(), &opts).unwrap();
        close(
            &format!("{kind} merged at 0.6"),
            &m.unet.as_ref().unwrap().forward(&input).unwrap(),
            &want,
            1e-5,
        );

        // what cannot take them says so
        let f = file.to_str().unwrap();
        let (ok, err) = sdlora(&["convert", f, tmp.path().join("c.safetensors").to_str().unwrap()]);
        assert!(!ok && err.contains("LyCORIS") && err.contains("convert"), "{err}");
        let gen = tmp.path().join("gen");
        let lora = format!("{f}:1");
        let args =
            ["generate", "--model", pipe.to_str().unwrap(), "--prompt", "x", "--steps", "2", "--lora", &lora];
        let (ok, err) =
            sdlora(&[&args[..], &["--lora-start", "0.5", "--out", gen.to_str().unwrap()]].concat());
        assert!(!ok && err.contains("leave out --lora-start"), "{err}");
    }
}
