//! `train`'s settings: every choice is a typed value with the same names on the command line and
//! in a config file, and `TrainConfig::default()` is the only place a default is written.
use sdlora::lora::format::LoraFormat;
use sdlora::lora::targets::Preset;
use sdlora::model::Precision;
use sdlora::train::config::{Preservation, TrainArgs, TrainConfig};

fn resolve_toml(dir: &std::path::Path, body: &str) -> Result<TrainConfig, String> {
    let toml = dir.join("train.toml");
    let head = "model = \"m\"\ndata = \"d\"\noutput = \"o.safetensors\"\nreg_data = \"r\"\n";
    std::fs::write(&toml, format!("{head}{body}")).unwrap();
    TrainConfig::resolve(&TrainArgs { config: Some(toml), ..Default::default() }).map_err(|e| e.to_string())
}

/// `train --help` shows each concrete default as `TrainConfig::default()` holds it: change the
/// default there and the help follows.
#[test]
fn help_shows_the_defaults_of_train_config() {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(["train", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let defaults = serde_json::to_value(TrainConfig::default()).unwrap();
    let mut checked = 0;
    for (key, value) in defaults.as_object().unwrap() {
        let shown = match value {
            serde_json::Value::Null => continue,
            serde_json::Value::String(s) if s.is_empty() => continue,
            serde_json::Value::String(s) => s.clone(),
            // a list that starts empty (--optimizer-args)
            serde_json::Value::Array(a) if a.is_empty() => "none".into(),
            v => v.to_string(),
        };
        let flag = format!("--{} ", key.replace('_', "-"));
        // the flag's entry: from its line ("      --flag" or "  -o, --flag") to the next flag's
        let start = [format!("\n      {flag}"), format!(", {flag}")]
            .iter()
            .find_map(|p| help.find(p.as_str()))
            .unwrap_or_else(|| panic!("{flag} missing from --help"));
        let entry = &help[start + 1..];
        let next = ["\n      --", "\n  -"].iter().filter_map(|p| entry.find(p)).min();
        let entry = &entry[..next.unwrap_or(entry.len())];
        assert!(entry.contains(&format!("[default: {shown}]")), "{flag}: want [default: {shown}] in {entry}");
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} defaults checked");
    assert!(help.contains("[default: attn-mlp]") && help.contains("[default: 1500]"), "{help}");
}

/// Choices read the same from a config file as from the command line, aliases included, and a
/// value that is none of them is named with its setting and the choices.
#[test]
fn choices_read_alike_from_file_and_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let c = resolve_toml(
        tmp.path(),
        "targets = \"full\"\nsave_dtype = \"fp16\"\ndtype = \"bfloat16\"\nformat = \"diffusers\"\nprior_preservation = \"output\"\n",
    )
    .unwrap();
    assert_eq!(c.targets, Preset::Full);
    assert_eq!((c.save_dtype, c.dtype), (Precision::F16, Some(Precision::Bf16)));
    assert_eq!(c.format, LoraFormat::Peft);
    assert_eq!(c.prior_preservation, Preservation::Output);
    // the same through clap
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: TrainArgs,
    }
    let a = Cli::try_parse_from(["t", "--targets", "cross-kv", "--save-dtype", "fp32", "--format", "peft"])
        .unwrap();
    assert_eq!(
        (a.args.targets, a.args.save_dtype, a.args.format),
        (Some(Preset::CrossKv), Some(Precision::F32), Some(LoraFormat::Peft))
    );
    assert!(Cli::try_parse_from(["t", "--targets", "everything"]).is_err());

    let err = resolve_toml(tmp.path(), "targets = \"everything\"\n").unwrap_err();
    assert!(err.contains("--targets `everything`: choose attn, attn-mlp, full, cross-kv"), "{err}");
    let err = resolve_toml(tmp.path(), "save_dtype = \"f8\"\n").unwrap_err();
    assert!(err.contains("--save-dtype `f8`: choose f32") && err.contains("bf16"), "{err}");
    // the legacy diffusers layout is read, never written
    let err = resolve_toml(tmp.path(), "format = \"diffuserslegacy\"\n").unwrap_err();
    assert!(err.contains("--format") && err.contains("kohya"), "{err}");
}

/// Defaults fill what neither the file nor the flags give; the three paths stay required.
#[test]
fn defaults_fill_the_rest_and_paths_stay_required() {
    let tmp = tempfile::tempdir().unwrap();
    let c = resolve_toml(tmp.path(), "").unwrap();
    let d = TrainConfig::default();
    assert_eq!((c.steps, c.rank, c.lr, c.targets, c.seed), (d.steps, d.rank, d.lr, d.targets, d.seed));
    let err =
        TrainConfig::resolve(&TrainArgs { rank: Some(4), ..Default::default() }).unwrap_err().to_string();
    assert!(err.contains("--model is required"), "{err}");
    let a = TrainArgs { model: Some("m".into()), data: Some("d".into()), ..Default::default() };
    let err = TrainConfig::resolve(&a).unwrap_err().to_string();
    assert!(err.contains("--output is required"), "{err}");
}

/// `demo --help` shows the demo's concept-independent defaults as `DemoOptions` holds them.
#[test]
fn demo_help_shows_the_defaults_of_demo_options() {
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_sdlora")).args(["demo", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let d = sdlora::demo::run::DemoOptions::new("x".into());
    let defaults = d.flag_defaults();
    assert!(defaults.len() >= 9);
    for (id, shown) in defaults {
        let flag = format!("--{} ", id.replace('_', "-"));
        let start = help.find(&format!("\n      {flag}")).unwrap_or_else(|| panic!("{flag} missing"));
        let entry = &help[start + 1..];
        let entry = &entry[..entry[1..].find("\n      --").map_or(entry.len(), |i| i + 1)];
        assert!(entry.contains(&format!("[default: {shown}]")), "{flag}: want [default: {shown}] in {entry}");
    }
    assert!(help.contains("[default: 8]") && help.contains("[default: full]"), "{help}");
}
