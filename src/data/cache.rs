//! The on-disk cache of latents and text conditionings. An entry is found by a hash of
//! everything it depends on and carries that key and a checksum of its tensors: a stale,
//! truncated or corrupt entry reads as a miss and is rebuilt, never used. Entries are written
//! atomically under unique temporary names, so runs sharing one cache folder do not collide.
use anyhow::Result;
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The entry file for `key` in `dir`: `<prefix><sha256(key)>.safetensors`.
pub fn entry_path(dir: &Path, prefix: &str, key: &str) -> PathBuf {
    dir.join(format!("{prefix}{}.safetensors", hex(&Sha256::digest(key.as_bytes()))))
}

/// sha256 of the data section (the tensors' bytes) of a serialised safetensors file.
fn data_checksum(file: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(file.get(..8)?.try_into().ok()?) as usize;
    Some(hex(&Sha256::digest(file.get(8usize.checked_add(n)?..)?)))
}

/// The tensors of the entry for `key`, or None when it is missing, stale or damaged.
pub fn get(path: &Path, key: &str) -> Option<HashMap<String, Tensor>> {
    let data = std::fs::read(path).ok()?;
    let header = crate::model::header::check_bytes(&data, "cache entry").ok()?;
    let meta = &header.metadata;
    if meta.get("key")? != key || meta.get("sha256")? != &data_checksum(&data)? {
        return None;
    }
    candle_core::safetensors::load_buffer(&data, &Device::Cpu).ok()
}

/// Stores `tensors` (on the CPU) as the entry for `key`. A failed write only costs recomputing
/// the entry next time, so it is not an error.
pub fn put(path: &Path, key: &str, tensors: &[(String, Tensor)]) {
    let write = || -> Result<()> {
        let plain = crate::model::weights::serialize(tensors, &HashMap::new())?;
        let sum = data_checksum(&plain).unwrap_or_default();
        let meta = HashMap::from([("key".to_string(), key.to_string()), ("sha256".to_string(), sum)]);
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        crate::util::write_atomic(path, &crate::model::weights::serialize(tensors, &meta)?)
    };
    let _ = write();
}

/// A content hash of the files a model's component was loaded from, remembered in `dir` by
/// (path, size, modification time) so that a multi-gigabyte file is hashed once, not every run.
/// Without files (a model built in memory) the `fallback` names it.
pub fn files_hash(files: &[PathBuf], dir: &Path, fallback: &str) -> String {
    if files.is_empty() {
        return fallback.to_string();
    }
    let memo_path = dir.join("file-hashes.json");
    let mut memo: HashMap<String, String> =
        std::fs::read(&memo_path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut all = Sha256::new();
    let mut changed = false;
    for f in files {
        let id = std::fs::metadata(f).ok().map(|m| {
            let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            format!(
                "{}|{}|{}",
                std::fs::canonicalize(f).unwrap_or(f.clone()).display(),
                m.len(),
                t.map_or(0, |t| t.as_nanos())
            )
        });
        let Some(id) = id else {
            all.update(f.display().to_string().as_bytes());
            continue;
        };
        let h = match memo.get(&id) {
            Some(h) => h.clone(),
            None => {
                let Some(h) = hash_file(f) else {
                    all.update(id.as_bytes());
                    continue;
                };
                memo.insert(id, h.clone());
                changed = true;
                h
            }
        };
        all.update(h.as_bytes());
    }
    if changed && std::fs::create_dir_all(dir).is_ok() {
        if let Ok(b) = serde_json::to_vec_pretty(&memo) {
            let _ = crate::util::write_atomic(&memo_path, &b);
        }
    }
    hex(&all.finalize())
}

fn hash_file(f: &Path) -> Option<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(f).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            return Some(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}
