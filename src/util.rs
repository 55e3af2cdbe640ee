//! Small helpers every layer may use: atomic writes, a confidence interval, setting names.
use anyhow::Context;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary sibling and a rename: readers see the old file
/// or the whole new one, never a partial write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        anyhow::bail!("{}: folder {} does not exist — create it first", path.display(), dir.display());
    }
    let name = path.file_name().with_context(|| format!("{}: not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let res = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        anyhow::bail!("{}: cannot write: {e} — check the path and permissions", path.display());
    }
    Ok(())
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
