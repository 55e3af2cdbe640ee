//! `sdlora train`'s flags as clap parses them.
use super::{TrainArgs, TrainConfig};
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: TrainArgs,
}

/// Switches work bare (`--flip`, as kohya users type them) and with a value (`--flip false`,
/// to override a config file).
#[test]
fn boolean_switches_take_an_optional_value() {
    let c = Cli::try_parse_from(["t", "--flip", "--random-crop", "false", "--shuffle-tags", "true"]).unwrap();
    assert_eq!(c.args.flip, Some(true));
    assert_eq!(c.args.random_crop, Some(false));
    assert_eq!(c.args.shuffle_tags, Some(true));
    assert_eq!(c.args.gradient_checkpointing, None);
    let c = Cli::try_parse_from(["t", "--gradient-checkpointing", "--steps", "3"]).unwrap();
    assert_eq!((c.args.gradient_checkpointing, c.args.steps), (Some(true), Some(3)));
}

/// A hostile config nesting arrays a million deep: one error, not a stack overflow.
#[test]
fn deeply_nested_config_is_an_error() {
    let n = 1_000_000;
    let text = format!("x = {}{}", "[".repeat(n), "]".repeat(n));
    let args = TrainArgs { config: Some("deep.toml".into()), ..Default::default() };
    let e = TrainConfig::resolve_text(&args, Some(&text)).unwrap_err();
    assert!(format!("{e:#}").starts_with("deep.toml: "), "{e:#}");
}
