//! Hugging Face Hub ids resolved from the local cache (the layout huggingface_hub writes):
//! `$HF_HUB_CACHE` or `$HF_HOME/hub` or `~/.cache/huggingface/hub`, then
//! `models--org--name/refs/<revision>` → `snapshots/<commit>/`.
use anyhow::Result;
use std::path::PathBuf;

pub fn cache_dir() -> PathBuf {
    if let Ok(p) = std::env::var("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Ok(p) = std::env::var("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache/huggingface/hub")
}

/// `org/name` or `org/name@revision` → the snapshot folder, if cached. A revision may be a
/// branch/tag name (looked up under refs/) or a commit hash.
pub fn resolve(id: &str) -> Result<Option<PathBuf>> {
    let (repo, rev) = id.split_once('@').unwrap_or((id, "main"));
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty() || p.starts_with('.')) {
        return Ok(None);
    }
    let root = cache_dir().join(format!("models--{}--{}", parts[0], parts[1]));
    if !root.is_dir() {
        return Ok(None);
    }
    let refs = root.join("refs").join(rev);
    let commit =
        if refs.is_file() { std::fs::read_to_string(&refs)?.trim().to_string() } else { rev.to_string() };
    let snap = root.join("snapshots").join(&commit);
    if snap.is_dir() {
        Ok(Some(snap))
    } else {
        anyhow::bail!("{id}: cached in {} but revision `{rev}` has no snapshot there", root.display())
    }
}
