//! Small helpers every layer may use: atomic writes, stopping on Ctrl-C, a confidence interval,
//! setting names.
use anyhow::Context;
use std::path::Path;

pub mod stop;

/// Writes `bytes` to `path` through a temporary sibling, flushed to disk, and a rename: readers
/// (and a run resumed after a crash or power loss) see the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    write_atomic_with(path, &mut |f| f.write_all(bytes))
}

/// `write_atomic` for a writer: `fill` writes the content. A failed write removes the temporary
/// file, leaving nothing behind.
pub fn write_atomic_with(
    path: &Path,
    fill: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!("{}: folder {} does not exist — create it first", path.display(), dir.display());
    }
    if path.is_dir() {
        anyhow::bail!("{}: is a folder — give a file name", path.display());
    }
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    // unique per process and call: runs sharing a folder (a cache) never write the same temp file
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp{}-{n}", name.to_string_lossy(), std::process::id()));
    let res = (|| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        fill(&mut f)?;
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // the rename itself reaches the disk with the folder's entry
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok::<_, std::io::Error>(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!("{}: cannot write: {e} — {}", path.display(), write_hint(&e));
    }
    Ok(())
}

/// Removes the temporary files of `write_atomic` left in `dir` by processes that no longer run
/// (killed while writing), so a folder holds only complete files.
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let pid = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".tmp"))
            .and_then(|(_, t)| t.split_once('-'))
            .and_then(|(pid, n)| n.parse::<usize>().ok().and(pid.parse::<i32>().ok()));
        #[cfg(unix)]
        if let Some(pid) = pid {
            // SAFETY: signal 0 only asks whether the process exists
            let gone = unsafe { libc::kill(pid, 0) } == -1
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
            if gone && pid != std::process::id() as i32 {
                let _ = std::fs::remove_file(e.path());
            }
        }
        #[cfg(not(unix))]
        let _ = pid;
    }
}

/// What to do about a failed write.
pub fn write_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        StorageFull | QuotaExceeded | FileTooLarge => "free some disk space or write elsewhere",
        ReadOnlyFilesystem | PermissionDenied => "choose a folder you can write to",
        _ => "check the path and permissions",
    }
}

/// Wilson's 95 % score interval of a share `p` measured on `n` samples: with 20 samples a 45 %
/// "learned" could as well be 26 % or 66 %, which is what tells a real change from a lucky seed.
pub fn interval95(p: f64, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z2, n) = (1.96f64 * 1.96, n as f64);
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = (z2 * (p * (1.0 - p) / n + z2 / (4.0 * n * n))).sqrt() / (1.0 + z2 / n);
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// A setting's value by its command-line name; the error lists the choices.
pub fn parse_choice<T: clap::ValueEnum>(s: &str) -> Result<T, String> {
    T::value_variants().iter().find(|v| choice_name(*v) == s).cloned().ok_or_else(|| {
        let names: Vec<String> = T::value_variants().iter().map(choice_name).collect();
        format!("`{s}`: choose {}", names.join(", "))
    })
}

/// A setting's command-line name ("attn-mlp").
pub fn choice_name<T: clap::ValueEnum>(v: &T) -> String {
    v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default()
}
