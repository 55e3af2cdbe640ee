//! safetensors headers, checked before any tensor is touched: a truncated download, a hostile
//! header (absurd sizes, overlapping or out-of-file offsets, element counts that overflow) or a
//! dtype sdlora cannot read becomes one error naming the file and the tensor, never a panic, a
//! huge allocation or a slice out of bounds later.
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::path::Path;

/// The largest header read (the safetensors crate's own limit).
pub const MAX_HEADER: u64 = 100_000_000;

/// One tensor's entry: name, dtype, shape and byte range in the data section.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub range: (u64, u64),
}

/// A checked header: tensors in file order and the `__metadata__` strings.
#[derive(Debug, Default)]
pub struct Header {
    pub tensors: Vec<Entry>,
    pub metadata: HashMap<String, String>,
}

/// A JSON object's entries in file order, duplicates kept (a JSON map would silently keep the last).
struct Entries<V>(Vec<(String, V)>);

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for Entries<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Entries<V>, A::Error> {
                let mut v = vec![];
                while let Some(e) = m.next_entry::<String, V>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

impl<V> Entries<V> {
    /// The first key that appears twice: readers disagree on which one counts (the safetensors
    /// crate fails, a JSON map keeps the last).
    fn repeated(&self) -> Option<&str> {
        let mut seen = std::collections::HashSet::new();
        self.0.iter().map(|(k, _)| k.as_str()).find(|k| !seen.insert(*k))
    }
}

/// Bytes per element of the dtypes candle reads (not BOOL, I8, U64 or F8_E5M2, which the format
/// has: found by fuzzing).
fn dtype_size(d: &str) -> Option<u64> {
    Some(match d {
        "U8" | "F8_E4M3" => 1,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" => 4,
        "F64" | "I64" => 8,
        _ => return None,
    })
}

/// Parses and checks a header of `json` for a data section of `data_len` bytes. `file` names
/// the file in errors.
pub fn parse(json: &[u8], data_len: u64, file: &str) -> Result<Header> {
    let corrupt =
        |what: String| anyhow::anyhow!("{file}: corrupt safetensors header: {what} — download it again");
    // every value at the top is an object: a tensor's entry or the metadata
    let top: Entries<Entries<serde_json::Value>> =
        serde_json::from_slice(json).map_err(|e| corrupt(e.to_string()))?;
    if let Some(k) = top.repeated() {
        return Err(corrupt(format!("`{k}` appears twice")));
    }
    let mut entries = vec![];
    for (k, inner) in top.0 {
        if let Some(r) = inner.repeated() {
            return Err(corrupt(format!("`{k}`: `{r}` appears twice")));
        }
        entries.push((k, serde_json::Value::Object(inner.0.into_iter().collect())));
    }
    let mut h = Header::default();
    for (k, v) in &entries {
        if k == "__metadata__" {
            let m = v.as_object().ok_or_else(|| corrupt("__metadata__ is not an object".into()))?;
            for (mk, mv) in m {
                let s = mv.as_str().ok_or_else(|| corrupt(format!("__metadata__ `{mk}` is not a string")))?;
                h.metadata.insert(mk.clone(), s.to_string());
            }
            continue;
        }
        let bad = |what: &str| corrupt(format!("tensor `{k}`: {what}"));
        let dtype = v["dtype"].as_str().ok_or_else(|| bad("no dtype"))?;
        let size = dtype_size(dtype).ok_or_else(|| {
            anyhow::anyhow!("{file}: tensor `{k}` has dtype {dtype}, which sdlora cannot read — convert the file to F32, F16 or BF16")
        })?;
        let shape = v["shape"]
            .as_array()
            .ok_or_else(|| bad("no shape"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| bad("a dimension is not a whole number"))?;
        let offsets =
            v["data_offsets"].as_array().filter(|a| a.len() == 2).ok_or_else(|| bad("no data_offsets"))?;
        let (Some(begin), Some(end)) = (offsets[0].as_u64(), offsets[1].as_u64()) else {
            return Err(bad("data_offsets are not whole numbers"));
        };
        let bytes = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .and_then(|n| n.checked_mul(size))
            .ok_or_else(|| bad(&format!("shape {shape:?} overflows")))?;
        if begin > end || end - begin != bytes {
            return Err(bad(&format!(
                "shape {shape:?} of {dtype} needs {bytes} bytes, its range {begin}..{end} disagrees"
            )));
        }
        if end > data_len {
            bail!(
                "{file}: truncated: tensor `{k}` ends at byte {end} but the file holds {data_len} data bytes — download it again"
            );
        }
        h.tensors.push(Entry { name: k.clone(), dtype: dtype.into(), shape, range: (begin, end) });
    }
    // the tensors tile the data section: no overlap, no gap, nothing after the last
    h.tensors.sort_by_key(|e| e.range);
    let mut at = 0;
    for e in &h.tensors {
        if e.range.0 != at {
            return Err(corrupt(format!(
                "tensor `{}` starts at byte {} where {at} was expected (overlapping or gapped offsets)",
                e.name, e.range.0
            )));
        }
        at = e.range.1;
    }
    if at != data_len {
        bail!(
            "{file}: {} bytes after the last tensor — the file is damaged, download it again",
            data_len - at
        );
    }
    Ok(h)
}

/// Reads and checks the header of the file at `path` (the header only, not the tensors).
pub fn read(path: &Path) -> Result<Header> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: cannot open: {e}", path.display()))?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| anyhow::anyhow!("{}: not a safetensors file (shorter than 8 bytes)", path.display()))?;
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > MAX_HEADER {
        bail!(
            "{}: not a safetensors file or truncated (header of {n} bytes in a {len}-byte file) — download it again",
            path.display()
        );
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json)?;
    parse(&json, len - 8 - n, &path.display().to_string())
}

/// Checks a whole safetensors file held in memory, as `read` checks one on disk.
pub fn check_bytes(data: &[u8], file: &str) -> Result<Header> {
    let Some(n) = data.get(..8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))) else {
        bail!("{file}: not a safetensors file (shorter than 8 bytes)");
    };
    let len = data.len() as u64;
    if n > len - 8 || n > MAX_HEADER {
        bail!("{file}: not a safetensors file or truncated (header of {n} bytes in a {len}-byte file) — download it again");
    }
    parse(&data[8..8 + n as usize], len - 8 - n, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend((0..data_len).map(|i| i as u8));
        v
    }

    fn err(header: &str, data_len: usize) -> String {
        format!("{:#}", check_bytes(&file(header, data_len), "x.safetensors").unwrap_err())
    }

    #[test]
    fn a_whole_file_passes_with_its_entries() {
        let h = check_bytes(
            &file(
                r#"{"__metadata__":{"k":"v"},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]}}"#,
                12,
            ),
            "x",
        )
        .unwrap();
        assert_eq!(h.tensors.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(h.metadata["k"], "v");
    }

    /// Each hostile header is refused with the file (and the tensor, where there is one) named.
    #[test]
    fn hostile_headers_are_refused_naming_the_tensor() {
        let t = |dtype: &str, shape: &str, a: u64, b: u64| {
            format!(r#"{{"w":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[{a},{b}]}}}}"#)
        };
        for (header, len, want) in [
            (t("F32", "[4]", 0, 16), 8, "ends at byte 16"),
            (t("F32", "[4]", 0, 8), 8, "needs 16 bytes"),
            (t("F32", "[4]", 16, 0), 16, "needs 16 bytes"),
            (t("F32", "[4294967296,4294967296,16]", 0, 16), 16, "overflows"),
            (t("F32", "[-1]", 0, 4), 4, "whole number"),
            (t("Q4", "[4]", 0, 4), 4, "dtype Q4"),
            (t("U64", "[1]", 0, 8), 8, "dtype U64"),
            (t("F32", "[1]", 0, 4), 8, "4 bytes after the last tensor"),
            (t("F32", "[1]", 4, 8), 8, "starts at byte 4"),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#
                    .into(),
                6,
                "`b` starts at byte 2",
            ),
            (r#"{"__metadata__":{"k":1}}"#.into(), 0, "`k` is not a string"),
            ("[1,2]".into(), 0, "expected a JSON object"),
            // found by fuzzing: the safetensors crate reads the first `a`, a JSON map the last
            (
                r#"{"a":{},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#.into(),
                1,
                "`a` appears twice",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[1.5],"shape":[1],"data_offsets":[0,1]}}"#.into(),
                1,
                "`a`: `shape` appears twice",
            ),
            ("{\"w\":".into(), 0, "corrupt safetensors header"),
            (format!("{{\"w\":{{\"x\":{}", "[".repeat(100_000)), 0, "recursion limit"),
        ] {
            let e = err(&header, len);
            assert!(e.starts_with("x.safetensors: ") && e.contains(want), "{header}: {e}");
        }
        // a header length past the file, or absurdly large
        let mut f = file("{}", 0);
        f[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(format!("{:#}", check_bytes(&f, "y").unwrap_err()).contains("truncated"));
        assert!(format!("{:#}", check_bytes(&[1, 2], "y").unwrap_err()).contains("shorter than 8 bytes"));
    }

    /// What this check accepts, the safetensors crate (which candle loads with) accepts too.
    #[test]
    fn accepted_files_load_in_candle() {
        let f = file(
            r#"{"a":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[0],"data_offsets":[8,8]}}"#,
            8,
        );
        check_bytes(&f, "x").unwrap();
        let t = candle_core::safetensors::load_buffer(&f, &candle_core::Device::Cpu).unwrap();
        assert_eq!(t["a"].dims(), [2, 1]);
    }
}
