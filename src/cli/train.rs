//! `sdlora train`
use crate::eval::evaluate::evaluate;
use crate::train::config::{TrainArgs, TrainConfig};
use crate::train::samples::read_prompts;
use crate::train::{setup, trainer};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

pub fn run(args: &TrainArgs) -> Result<()> {
    let cfg = TrainConfig::resolve(args)?;
    check_output(&cfg.output)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let run = setup::setup(&cfg, &mut |what, i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        bar.set_message(what.to_string());
    })?;
    bar.finish_and_clear();
    let epoch_len = trainer::batch_order(&run, &cfg).epoch_len();
    let cfg = cfg.with_epochs(epoch_len);
    let n_params: usize = run.params.iter().map(|p| p.elem_count()).sum();
    let n_reg = run.items.iter().filter(|i| i.reg).count();
    let n_val = run.items.iter().filter(|i| i.val).count();
    eprintln!(
        "{} model, {} images{} at {} px, {} adapters ({} parameters), {} steps{}",
        run.sd.family.name(),
        run.items.len() - n_reg - n_val,
        [(n_reg, "regularization"), (n_val, "validation")]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!(" + {n} {what} images"))
            .collect::<String>(),
        run.resolution,
        run.adapters.len(),
        n_params,
        cfg.steps,
        match cfg.epochs {
            Some(e) => format!(" ({e} epochs of {epoch_len} batches)"),
            None => format!(" ({:.1} epochs)", (cfg.steps * cfg.grad_accum) as f64 / epoch_len as f64),
        }
    );
    if cfg.val_split > 0.0 {
        let held: Vec<String> = run
            .items
            .iter()
            .filter(|i| i.val && i.image.starts_with(&cfg.data))
            .map(|i| i.image.strip_prefix(&cfg.data).unwrap_or(&i.image).display().to_string())
            .collect();
        eprintln!("held out for validation (--val-split {}): {}", cfg.val_split, held.join(", "));
    }
    // read before hours of training, so that a wrong path fails now
    let read = |p: &Option<std::path::PathBuf>| -> Result<Vec<(String, u64)>> {
        let prompts = p.as_deref().map(read_prompts).transpose()?.unwrap_or_default();
        Ok(prompts.into_iter().enumerate().map(|(i, p)| (p, cfg.seed + i as u64)).collect())
    };
    let (target, control) = (read(&cfg.target_prompts)?, read(&cfg.control_prompts)?);
    let resolution = run.resolution;
    let bar = ProgressBar::new(cfg.steps as u64);
    bar.set_style(
        ProgressStyle::with_template("train [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut smooth = None::<f64>;
    let mut rows: Vec<(usize, f64)> = vec![];
    eprintln!("training — Ctrl-C stops after the current step and saves it");
    let handler = crate::util::stop::Handler::install();
    let result = trainer::train(run, &cfg, &mut |p| match p {
        trainer::Progress::Step { step, loss, images_per_second: ips, lr } => {
            let s = smooth.map(|s| 0.9 * s + 0.1 * loss).unwrap_or(loss);
            smooth = Some(s);
            rows.push((step, loss));
            bar.set_position(step as u64);
            let epoch = (step * cfg.grad_accum).div_ceil(epoch_len);
            let of = cfg.epochs.map_or(String::new(), |e| format!("/{e}"));
            bar.set_message(format!("epoch {epoch}{of} loss {s:.4} lr {lr:.2e} {ips:.2} img/s"));
        }
        // a full-size forward takes seconds: the bar says why it is not moving
        trainer::Progress::Evaluating { done, total } => {
            bar.set_message(format!("fixed-seed loss {done}/{total}"));
        }
    });
    // from here on there is nothing a stop would have to save: Ctrl-C ends the process
    drop(handler);
    bar.finish_and_clear();
    let summary = match result {
        Ok(s) => s,
        Err(e) => match e.downcast::<trainer::Interrupted>() {
            Ok(i) => return Err(stopped(&i, &loss_csv(&rows, &i.val_losses)).into()),
            Err(e) => return Err(e),
        },
    };
    let csv = loss_csv(&rows, &summary.val_losses);
    crate::util::write_atomic(&cfg.output.with_extension("loss.csv"), csv.as_bytes())?;
    let mut report = summary.report(format!(
        "sdlora train: {}",
        cfg.output.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default()
    ));
    report.epochs = Some((summary.steps * cfg.grad_accum) as f64 / epoch_len as f64);
    let settings = serde_json::to_value(&cfg)?;
    if let Some(m) = settings.as_object() {
        report.settings = m
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.to_string().trim_matches('"').to_string()))
            .collect();
    }
    if !target.is_empty() || !control.is_empty() {
        eprintln!("sampling {} target and {} control prompts, base and LoRA", target.len(), control.len());
        let load = crate::model::load::LoadOptions {
            prediction_type: cfg.prediction_type,
            config: cfg.model_config.clone(),
            ..Default::default()
        };
        let e =
            evaluate(&cfg.model, &load, &summary.lora_path, &target, &control, resolution, cfg.sampling())?;
        if let Some(l) = e.scores.learned {
            let (lo, hi) = crate::util::interval95(l, e.scores.learned_of);
            eprintln!(
                "learned: {:.1} % of {} target samples show a {} (95 % interval {:.0}–{:.0} %; base model: {:.1} %)",
                100.0 * l,
                e.scores.learned_of,
                e.scores.target,
                100.0 * lo,
                100.0 * hi,
                100.0 * e.scores.learned_base.unwrap_or(0.0)
            );
            if let Some((lora, base)) = e.scores.followed {
                eprintln!(
                    "         {:.1} % follow the whole prompt (shape, colour, background too; base model: {:.1} %)",
                    100.0 * lora,
                    100.0 * base
                );
            }
        }
        if let Some(f) = &e.scores.forgetting {
            if f.labelled > 0 {
                eprintln!(
                    "forgotten: {:.1} points ({:.1} % → {:.1} % of control prompts drawn right)",
                    f.drop_points,
                    100.0 * f.accuracy_base,
                    100.0 * f.accuracy_lora
                );
            }
            eprintln!("control prompts changed by {:.1}/255 per pixel", f.mean_pixel_distance);
        }
        report.grids.extend(e.grids);
        report.scores = Some(e.scores);
    }
    let report_path = cfg.output.with_extension("report.html");
    report.write(&report_path)?;
    eprintln!("report: {}", report_path.display());
    if let Some(w) = &cfg.train_embedding {
        eprintln!(
            "the LoRA bundles the embedding of \"{w}\" (Automatic1111, sdlora); for diffusers, `sdlora convert --to peft` it (the embedding goes to a file beside it) or `sdlora merge` it into the model"
        );
    }
    println!(
        "wrote {} ({} bytes): {} steps in {:.1} s, {:.2} images/s{}{}",
        summary.lora_path.display(),
        summary.lora_bytes,
        summary.steps,
        summary.seconds,
        summary.images_per_second,
        match summary.eval_before.zip(summary.eval_after) {
            Some((b, a)) => format!(", eval loss {b:.4} → {a:.4}"),
            None => String::new(),
        },
        if summary.skipped_steps > 0 {
            format!(", {} steps skipped (non-finite)", summary.skipped_steps)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// The loss log: `step,loss` per optimizer step, with a `val_loss` column where the validation
/// loss was measured (step 0: before training).
pub fn loss_csv(rows: &[(usize, f64)], val: &[(usize, f64)]) -> String {
    if val.is_empty() {
        return std::iter::once("step,loss".to_string())
            .chain(rows.iter().map(|(s, l)| format!("{s},{l}")))
            .map(|l| l + "\n")
            .collect();
    }
    let mut by_step: std::collections::BTreeMap<usize, (Option<f64>, Option<f64>)> = Default::default();
    for &(s, l) in rows {
        by_step.entry(s).or_default().0 = Some(l);
    }
    for &(s, v) in val {
        by_step.entry(s).or_default().1 = Some(v);
    }
    let cell = |x: Option<f64>| x.map_or(String::new(), |x| x.to_string());
    std::iter::once("step,loss,val_loss".to_string())
        .chain(by_step.iter().map(|(s, (l, v))| format!("{s},{},{}", cell(*l), cell(*v))))
        .map(|l| l + "\n")
        .collect()
}

/// What a stopped run kept and the command that goes on from there.
fn stopped(i: &trainer::Interrupted, csv: &str) -> crate::util::stop::Stopped {
    let mut msg = format!("stopped at step {}", i.step);
    if let Some(l) = &i.lora {
        let csv_path = l.with_extension("loss.csv");
        let _ = crate::util::write_atomic(&csv_path, csv.as_bytes());
        msg +=
            &format!(": wrote {} (the LoRA of this step), its state and {}", l.display(), csv_path.display());
    }
    match &i.state {
        Some(s) => {
            let args: Vec<String> = std::env::args().collect();
            msg += &format!("\nto go on:\n  {}", resume_command(&args, s));
        }
        None => msg += " — nothing was trained yet, nothing saved",
    }
    crate::util::stop::Stopped(msg)
}

/// The command line `args` with `--resume STATE` instead of any `--resume` it had, quoted for a
/// POSIX shell.
pub fn resume_command(args: &[String], state: &std::path::Path) -> String {
    let mut out: Vec<String> = vec![];
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.as_str() {
            "--resume" => skip = true,
            _ if a.starts_with("--resume=") => {}
            _ => out.push(a.clone()),
        }
    }
    out.extend(["--resume".to_string(), state.display().to_string()]);
    out.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ")
}

fn shell_quote(a: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./=:,+@%-".contains(c);
    if !a.is_empty() && a.chars().all(plain) {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Fails early, before hours of training, if the output cannot be written. A missing folder is
/// created, as kohya's `--output_dir` is.
fn check_output(out: &std::path::Path) -> Result<()> {
    if out.extension().is_none_or(|e| e != "safetensors") {
        anyhow::bail!("{}: the output must be a .safetensors file", out.display());
    }
    if out.is_dir() {
        anyhow::bail!(
            "{}: is a folder — give a file name inside it, e.g. {}",
            out.display(),
            out.join("lora.safetensors").display()
        );
    }
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| {
        anyhow::anyhow!("{}: cannot create its folder ({e}) — choose another --output", out.display())
    })?;
    let probe = dir.join(format!(".sdlora-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        anyhow::anyhow!("{}: cannot write there ({e}) — choose another --output", out.display())
    })?;
    let _ = std::fs::remove_file(probe);
    crate::util::remove_stale_temps(dir);
    Ok(())
}
