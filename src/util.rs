//! Small helpers shared by every writer.
use anyhow::{Context, Result};
use std::path::Path;

/// Writes `bytes` to `path` through a temporary sibling and a rename: readers see the old file
/// or the whole new one, never a partial write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
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
