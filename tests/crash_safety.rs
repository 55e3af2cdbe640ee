//! Every way a training run really ends: Ctrl-C (once: the step is saved and the resume command
//! printed; twice: at once), SIGTERM, kill -9, a write that fails for want of space. Each leaves
//! only complete files, and resuming continues bit for bit.
use crate::common;
use common::data::Fixture;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

impl Fixture {
    /// `train` of the tiny model into `out`, constant learning rate (so a shorter run is a
    /// prefix of a longer one).
    fn args(&self, out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
        let r = &self.root;
        let mut v: Vec<String> = vec![
            "train".into(),
            "--model".into(),
            r.join("model").display().to_string(),
            "--data".into(),
            r.join("data").display().to_string(),
            "--output".into(),
            out.display().to_string(),
            "--resolution".into(),
            "32".into(),
            "--rank".into(),
            "2".into(),
            "--lr".into(),
            "1e-3".into(),
            "--lr-scheduler".into(),
            "constant".into(),
            "--steps".into(),
            steps.to_string(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

fn sdlora() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdlora"))
}

fn run_ok(args: &[String]) -> String {
    let out = sdlora().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{args:?} failed: {err}");
    err
}

/// Starts a long run and waits until its step checkpoint `step` is on disk; stderr is
/// collected by a thread.
fn start_until(args: &[String], out: &Path, step: usize) -> (Child, std::thread::JoinHandle<String>) {
    let mut child = sdlora().args(args).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(err).lines().map_while(Result::ok).collect::<Vec<_>>().join("\n")
    });
    let ckpt = sdlora::train::trainer::step_path(out, step);
    let t0 = std::time::Instant::now();
    while !sdlora::train::state::state_path(&ckpt).exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step {step}");
        assert!(t0.elapsed().as_secs() < 300, "no step {step} checkpoint after 5 minutes");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (child, reader)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: signalling our own child process
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Sends `signals`, waits, and checks the run ended as a stopped one (exit 130, no panic);
/// returns its stderr.
fn stop(mut child: Child, err: std::thread::JoinHandle<String>, signals: &[i32]) -> String {
    for &s in signals {
        signal(&child, s);
    }
    let status = child.wait().unwrap();
    let err = err.join().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Every file in `dir` is complete: no temporary leftovers, every safetensors reads whole.
fn only_complete_files(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        assert!(!name.contains(".tmp"), "left a temporary file {name}");
        if name.ends_with(".safetensors") {
            sdlora::model::header::read(&p).unwrap_or_else(|e| panic!("{name} is not whole: {e}"));
        }
    }
}

#[test]
fn ctrl_c_saves_the_step_prints_the_resume_command_and_resuming_is_exact() {
    let f = Fixture::new(3);
    let out = f.root.join("a/lora.safetensors");
    let long = f.args(&out, 100_000, &["--save-every", "1"]);
    let (child, err) = start_until(&long, &out, 2);
    let err = stop(child, err, &[libc::SIGINT]);
    // "stopped at step N: wrote …" then the command to go on with
    let step: usize = err
        .split("stopped at step ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no stop message: {err}"));
    assert!(step >= 2, "{err}");
    let ckpt = sdlora::train::trainer::step_path(&out, step);
    let state = sdlora::train::state::state_path(&ckpt);
    let command = err.lines().skip_while(|l| !l.starts_with("to go on:")).nth(1).unwrap().trim().to_string();
    let mut want = vec![env!("CARGO_BIN_EXE_sdlora").to_string()];
    want.extend(long.iter().cloned());
    want.extend(["--resume".to_string(), state.display().to_string()]);
    assert_eq!(command, want.join(" "), "{err}");
    assert!(ckpt.with_extension("loss.csv").exists());
    only_complete_files(out.parent().unwrap());

    // the printed command, with a nearer end, continues exactly where a straight run would be
    let end = step + 2;
    let resume: Vec<String> = command
        .split(' ')
        .skip(1)
        .map(|a| if a == "100000" { end.to_string() } else { a.to_string() })
        .collect();
    run_ok(&resume);
    let straight = f.root.join("b/lora.safetensors");
    run_ok(&f.args(&straight, end, &["--save-every", "1"]));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&straight).unwrap(), "resumed LoRA differs");
}

#[test]
fn a_second_signal_stops_at_once_leaving_only_complete_files() {
    let f = Fixture::new(3);
    let out = f.root.join("a/lora.safetensors");
    let (child, err) = start_until(&f.args(&out, 100_000, &["--save-every", "1"]), &out, 1);
    stop(child, err, &[libc::SIGTERM, libc::SIGINT]);
    only_complete_files(out.parent().unwrap());
}

#[test]
fn after_kill_9_resume_latest_continues_exactly() {
    let f = Fixture::new(3);
    let out = f.root.join("a/lora.safetensors");
    let (mut child, _err) = start_until(&f.args(&out, 100_000, &["--save-every", "1"]), &out, 3);
    signal(&child, libc::SIGKILL);
    child.wait().unwrap();
    // a kill during a write leaves a hidden temporary file; the next run clears it
    let dir = out.parent().unwrap();
    let latest = (1..100_000)
        .take_while(|&s| {
            sdlora::train::state::state_path(&sdlora::train::trainer::step_path(&out, s)).exists()
        })
        .last()
        .unwrap();
    // a damaged newer state (a crash of another kind) is passed over
    let fake = sdlora::train::state::state_path(&sdlora::train::trainer::step_path(&out, latest + 50));
    std::fs::write(&fake, b"\x10\0\0\0\0\0\0\0{\"a\":").unwrap();
    let end = latest + 2;
    let err = run_ok(&f.args(&out, end, &["--resume", "latest"]));
    assert!(err.contains(&format!("(step {latest})")), "{err}");
    std::fs::remove_file(&fake).unwrap();
    only_complete_files(dir);
    let straight = f.root.join("b/lora.safetensors");
    run_ok(&f.args(&straight, end, &[]));
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&straight).unwrap(), "resumed LoRA differs");

    // a folder works as `latest` does; the final state is the newest now
    let err = run_ok(&f.args(&out, end + 1, &["--resume", &dir.display().to_string()]));
    assert!(err.contains(&format!("lora.state.safetensors (step {end})")), "{err}");
    // nothing to resume from: one clear line
    let other = f.root.join("c/other.safetensors");
    let o = sdlora().args(f.args(&other, 2, &["--resume", "latest"])).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("no training state of") && e.contains("other.state.safetensors"),
        "{e}"
    );
}

#[test]
fn a_full_disk_is_one_clear_error_and_leaves_nothing_partial() {
    let f = Fixture::new(3);
    let out = f.root.join("a/lora.safetensors");
    let mut cmd = sdlora();
    cmd.args(f.args(&out, 2, &[]));
    // SAFETY: only async-signal-safe calls between fork and exec
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            // files may grow to 2 KB, and the write past it fails (EFBIG) instead of killing us
            let lim = libc::rlimit { rlim_cur: 2048, rlim_max: 2048 };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("lora.safetensors") && lines[0].contains("free some disk space"), "{err}");
    assert!(!out.exists());
    only_complete_files(out.parent().unwrap());
}

#[test]
fn an_output_that_is_a_folder_is_refused_before_training() {
    let f = Fixture::new(3);
    let out = f.root.join("taken.safetensors");
    std::fs::create_dir_all(&out).unwrap();
    let o = sdlora().args(f.args(&out, 2, &[])).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("is a folder") && !err.contains("encoding"), "{err}");
}

fn latents(run: &sdlora::train::setup::Run) -> Vec<Vec<f32>> {
    run.samples.iter().map(|s| s.latent.flatten_all().unwrap().to_vec1().unwrap()).collect()
}

#[test]
fn stale_or_damaged_cache_entries_are_rebuilt_never_used() {
    use sdlora::train::config::TrainConfig;
    use sdlora::train::setup::setup;
    let f = Fixture::new(3);
    let (model, data) = (f.root.join("model"), f.root.join("data"));
    let args = common::data::train_args(&model, &data, &f.root.join("o.safetensors"), 2);
    let cfg = TrainConfig::resolve(&args).unwrap();
    let set = || setup(&cfg, &mut |_, _, _| {}).unwrap();
    // two runs filling one cache at once, then a third reads every latent from it
    let (a, b) = std::thread::scope(|s| {
        let (a, b) = (s.spawn(set), s.spawn(set));
        (a.join().unwrap(), b.join().unwrap())
    });
    // each image read or encoded by each run (which one depends on who wrote first)
    for (read, encoded) in [a.latents_cached, b.latents_cached] {
        assert_eq!(read + encoded, 3);
    }
    let want = latents(&a);
    assert_eq!(latents(&b), want);
    let r = set();
    assert_eq!(r.latents_cached, (3, 0));
    assert_eq!(latents(&r), want);

    // a flipped byte, a truncated entry, an entry copied under another's name
    let cache = data.join(".sdlora-cache");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("text-"))
        .collect();
    entries.sort();
    assert_eq!(entries.len(), 3);
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&entries[0], bytes).unwrap();
    let bytes = std::fs::read(&entries[1]).unwrap();
    std::fs::write(&entries[1], &bytes[..bytes.len() - 8]).unwrap();
    std::fs::copy(&entries[0], &entries[2]).unwrap();
    let r = set();
    assert_eq!(r.latents_cached, (0, 3));
    assert_eq!(latents(&r), want);

    // damaged text conditionings read as missing
    let cond = sdlora::model::text::Conditioning { context: common::randn(&[1, 77, 32], 5), pooled: None };
    r.text_cache.put("a red disc", &cond);
    let back = r.text_cache.get("a red disc", &candle_core::Device::Cpu).unwrap();
    assert_eq!(common::dot(&back.context, &back.context), common::dot(&cond.context, &cond.context));
    for e in std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()) {
        if e.file_name().unwrap().to_string_lossy().starts_with("text-") {
            let mut bytes = std::fs::read(&e).unwrap();
            let last = bytes.len() - 5;
            bytes[last] ^= 1;
            std::fs::write(&e, bytes).unwrap();
        }
    }
    assert!(r.text_cache.get("a red disc", &candle_core::Device::Cpu).is_none());

    // the VAE's weights changed in place (same path, same size): every latent is stale
    sdlora::model::tiny::write_random_pipeline(
        &model,
        &sdlora::model::tiny::tiny_sd1(),
        8,
        candle_core::DType::F32,
    )
    .unwrap();
    let r = set();
    assert_eq!(r.latents_cached, (0, 3));
    assert_ne!(latents(&r), want);
}

#[test]
fn a_read_only_output_folder_is_one_clear_error_before_training() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new(3);
    let ro = f.root.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    // the model and data stay readable to the unprivileged user below
    std::fs::set_permissions(&f.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = sdlora();
    cmd.args(f.args(&ro.join("lora.safetensors"), 2, &[]));
    // SAFETY: only async-signal-safe calls between fork and exec
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            // as root permissions do not apply: run as nobody (a no-op for other users)
            if libc::geteuid() == 0 {
                libc::setgid(65534);
                libc::setuid(65534);
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert!(!o.status.success() && lines.len() == 1, "{err}");
    assert!(lines[0].contains("ro/lora.safetensors") && lines[0].contains("cannot write there"), "{err}");
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
}
