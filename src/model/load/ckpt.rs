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

fn check_object(o: &Object, path: &Path) -> Result<()> {
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
            check_object(callable, path)?;
            check_object(args, path)?;
        }
        Object::Tuple(v) | Object::List(v) => v.iter().try_for_each(|x| check_object(x, path))?,
        Object::Dict(kv) => {
            kv.iter().try_for_each(|(k, v)| check_object(k, path).and(check_object(v, path)))?
        }
        Object::PersistentLoad(x) => check_object(x, path)?,
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
/// refuses it if it names anything but torch's tensor machinery.
pub fn check_pickle(bytes: &[u8], path: &Path) -> Result<()> {
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(bytes))
        .map_err(|e| anyhow::anyhow!("{}: corrupt pickle: {e}", path.display()))?;
    check_object(&stack.finalize()?, path)
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
