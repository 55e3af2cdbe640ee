//! PyTorch pickles (`.ckpt`, `.bin`, `.pt`), read with candle's pickle interpreter, which
//! builds a description of the objects and never runs code. Files whose pickle names anything
//! outside torch's tensor-rebuilding machinery are refused, as torch's `weights_only` loader does.
use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::Tensor;
use std::io::{BufReader, Read};
use std::path::Path;

/// Module prefixes a plain state dict may name. Anything else would be code to import and run.
const ALLOWED: &[&str] = &["torch", "collections", "numpy.core.multiarray", "numpy", "_codecs", "builtins"];

/// Nesting deeper than this is no state dict (those are a handful of levels deep).
const MAX_DEPTH: usize = 256;

/// A state dict's pickle is kilobytes (the tensors' bytes are stored beside it); past this it is
/// refused before parsing.
const MAX_PICKLE: usize = 64 << 20;

fn check_object(o: &Object, path: &Path, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!(
            "{}: refuses to load: the pickle nests objects more than {MAX_DEPTH} deep, which no state dict does",
            path.display()
        );
    }
    let check = |x: &Object| check_object(x, path, depth + 1);
    match o {
        Object::Class { module_name, class_name } => {
            let top = module_name.split('.').next().unwrap_or("");
            let ok = ALLOWED.contains(&module_name.as_str()) || top == "torch" || top == "pytorch_lightning";
            let safe_builtin = module_name != "builtins"
                || ["set", "frozenset", "slice", "bytearray"].contains(&class_name.as_str());
            if !ok || !safe_builtin {
                bail!(
                    "{}: refuses to load: the pickle references `{module_name}.{class_name}`, which would run code — convert the file to .safetensors with a trusted tool",
                    path.display()
                );
            }
        }
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            check(callable)?;
            check(args)?;
        }
        Object::Tuple(v) | Object::List(v) => v.iter().try_for_each(check)?,
        Object::Dict(kv) => kv.iter().try_for_each(|(k, v)| check(k).and(check(v)))?,
        Object::PersistentLoad(x) => check(x)?,
        _ => {}
    }
    Ok(())
}

/// Checks every pickle inside the zip container.
fn check_pickles(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    check_zip(BufReader::new(f), path)
}

/// `check_pickles` on any reader; `path` names it in errors.
pub fn check_zip<R: Read + std::io::Seek>(r: R, path: &Path) -> Result<()> {
    let mut zip = zip::ZipArchive::new(r).map_err(|_| {
        anyhow::anyhow!(
            "{}: not a PyTorch zip checkpoint (legacy pre-1.6 pickles are not supported) — re-save it or convert to .safetensors",
            path.display()
        )
    })?;
    let names: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.ends_with(".pkl"))
        .map(|n| n.into_owned())
        .collect();
    for n in names {
        let mut buf = vec![];
        zip.by_name(&n)?.read_to_end(&mut buf)?;
        check_pickle(&buf, path)?;
    }
    Ok(())
}

/// Runs one pickle through candle's interpreter (which only builds objects, never runs code) and
/// refuses it if it names anything but torch's tensor machinery or nests absurdly deep. The
/// interpreter's objects are recursive, so a hostile pickle nesting a million levels would
/// overflow the stack when they are dropped: this runs on a thread whose stack grows with the
/// pickle's size, which bounds the nesting.
pub fn check_pickle(bytes: &[u8], path: &Path) -> Result<()> {
    if bytes.len() > MAX_PICKLE {
        bail!("{}: refuses to load: a {} MB pickle is no state dict", path.display(), bytes.len() >> 20);
    }
    let stack_size = (16 << 20) + 64 * bytes.len();
    std::thread::scope(|s| {
        let run = || -> Result<()> {
            let mut stack = Stack::empty();
            stack
                .read_loop(&mut std::io::Cursor::new(bytes))
                .map_err(|e| anyhow::anyhow!("{}: corrupt pickle: {e}", path.display()))?;
            check_object(&stack.finalize()?, path, 0)
        };
        std::thread::Builder::new()
            .stack_size(stack_size)
            .spawn_scoped(s, run)
            .map_err(|e| anyhow::anyhow!("{}: cannot check the pickle: {e}", path.display()))?
            .join()
            .map_err(|_| anyhow::anyhow!("{}: corrupt pickle (the reader failed)", path.display()))?
    })
}

/// All tensors of a PyTorch checkpoint. With `key` (e.g. "state_dict"), the tensors under it.
pub fn read_pickle(path: &Path, key: Option<&str>) -> Result<Vec<(String, Tensor)>> {
    check_pickles(path)?;
    let key = match key {
        Some(k) => Some(k),
        None => {
            // Lightning checkpoints keep the weights under "state_dict".
            let infos = candle_core::pickle::read_pth_tensor_info(path, false, Some("state_dict"));
            infos.ok().filter(|i| !i.is_empty()).map(|_| "state_dict")
        }
    };
    candle_core::pickle::read_all_with_key(path, key)
        .map_err(|e| anyhow::anyhow!("{}: cannot read tensors: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    /// A pickle nesting lists a million deep (2 MB): refused, not a stack overflow.
    #[test]
    fn deeply_nested_pickles_are_refused() {
        let n = 1_000_000;
        let mut p = b"\x80\x02".to_vec();
        p.extend(std::iter::repeat_n(b']', n));
        p.extend(std::iter::repeat_n(b'a', n - 1));
        p.push(b'.');
        // and tuples, one byte a level (TUPLE1 around None)
        let mut t = b"\x80\x02N".to_vec();
        t.extend(std::iter::repeat_n(0x85u8, n));
        t.push(b'.');
        for p in [p, t] {
            let e = super::check_pickle(&p, std::path::Path::new("deep.ckpt")).unwrap_err();
            assert!(format!("{e:#}").contains("deep.ckpt: refuses to load"), "{e:#}");
        }
    }
}
