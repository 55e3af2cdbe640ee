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

/// Whether the user asked to stay offline (huggingface_hub's variable).
fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Downloads what a diffusers model needs (configs, safetensors weights — fp16 variants only
/// when no full-precision file exists — and tokenizer files) into the local cache, in
/// huggingface_hub's layout, and returns the snapshot folder. `HF_TOKEN` is honoured.
pub fn download(id: &str) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    if offline() {
        anyhow::bail!(
            "{id}: not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
            cache_dir().display()
        );
    }
    let (repo_id, rev) = id.split_once('@').unwrap_or((id, "main"));
    let api = ApiBuilder::new()
        .with_cache_dir(cache_dir())
        .with_token(std::env::var("HF_TOKEN").ok())
        .build()
        .map_err(|e| anyhow::anyhow!("{id}: cannot reach the Hugging Face Hub: {e}"))?;
    let repo = api.repo(Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()));
    let info = repo.info().map_err(|e| anyhow::anyhow!("{id}: not found on the Hugging Face Hub or no network ({e}) — check the id, or download it and pass the folder"))?;
    let files: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let wanted = |f: &str| -> bool {
        let (dir, name) = f.rsplit_once('/').unwrap_or(("", f));
        let component =
            ["unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"]
                .contains(&dir);
        if f == "model_index.json"
            || (component && name.ends_with(".json"))
            || (component && name == "merges.txt")
        {
            return true;
        }
        if !component || !name.ends_with(".safetensors") {
            return false;
        }
        // prefer the full-precision weights; take .fp16 only where nothing else exists
        !name.contains(".fp16.")
            || !files.iter().any(|g| {
                g.starts_with(&format!("{dir}/")) && g.ends_with(".safetensors") && !g.contains(".fp16.")
            })
    };
    let mut snapshot = None;
    for f in files.iter().filter(|f| wanted(f)) {
        eprintln!("downloading {repo_id}/{f}");
        let p = repo.get(f).map_err(|e| anyhow::anyhow!("{id}: downloading {f} failed: {e}"))?;
        if f == "model_index.json" {
            snapshot = p.parent().map(|d| d.to_path_buf());
        }
    }
    snapshot
        .ok_or_else(|| anyhow::anyhow!("{id}: has no model_index.json — not a diffusers model repository"))
}

/// `org/name` or `org/name@rev`, and not something on disk.
pub fn looks_like_id(s: &str) -> bool {
    let repo = s.split('@').next().unwrap_or(s);
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && !std::path::Path::new(s).exists()
}
