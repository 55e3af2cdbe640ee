//! Named, shaped access to frozen weights, with the file name in every error.
//!
//! A folder's safetensors are read tensor by tensor as each is taken (not memory-mapped: mapped
//! file pages count as resident beside the converted copies, which doubled peak memory while a
//! model loaded) and converted to the run's dtype; single-file checkpoints are first renamed into diffusers' layout (see `load`) and
//! served from a map.
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Error, Result, Shape, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

enum Source {
    Files(Vec<File>),
    Map(HashMap<String, Tensor>),
    /// Seeded random weights of whatever shape is asked for (benchmarks, tests, demo init).
    Random(u64),
    /// No data: records the shapes asked for and hands out zero-stride placeholders, so a
    /// full-size model can be "built" to count its parameters without allocating them.
    Meta(std::sync::Mutex<Vec<(String, Vec<usize>)>>),
}

#[derive(Clone)]
pub struct Weights {
    src: Arc<Source>,
    /// What errors name: the file(s) the tensors come from.
    origin: Arc<String>,
    prefix: String,
    pub dtype: DType,
    pub device: Device,
}

/// One safetensors file: its checked header's entries by name, read on demand.
struct File {
    path: PathBuf,
    file: std::sync::Mutex<std::fs::File>,
    /// Where the data section starts.
    data: u64,
    entries: HashMap<String, super::header::Entry>,
}

impl File {
    fn open(path: &Path) -> anyhow::Result<Self> {
        let header = super::header::read(path)?;
        let mut file =
            std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: cannot open: {e}", path.display()))?;
        let mut n = [0u8; 8];
        std::io::Read::read_exact(&mut file, &mut n)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: std::sync::Mutex::new(file),
            data: 8 + u64::from_le_bytes(n),
            entries: header.tensors.into_iter().map(|e| (e.name.clone(), e)).collect(),
        })
    }

    /// The tensor `name` as stored (the header was checked: the range lies inside the file).
    fn load(&self, name: &str) -> Option<Result<Tensor>> {
        use std::io::{Read, Seek, SeekFrom};
        let e = self.entries.get(name)?;
        let read = || -> std::io::Result<Vec<u8>> {
            let mut f = self.file.lock().map_err(|_| std::io::Error::other("poisoned"))?;
            f.seek(SeekFrom::Start(self.data + e.range.0))?;
            let mut bytes = vec![0u8; (e.range.1 - e.range.0) as usize];
            f.read_exact(&mut bytes)?;
            Ok(bytes)
        };
        Some((|| {
            let bytes = read()
                .map_err(|err| Error::Msg(format!("{}: cannot read `{name}`: {err}", self.path.display())))?;
            let dtype = stored_dtype(&e.dtype).ok_or_else(|| {
                Error::Msg(format!("{}: `{name}` has dtype {}", self.path.display(), e.dtype))
            })?;
            let view = safetensors::tensor::TensorView::new(dtype, e.shape.clone(), &bytes)
                .map_err(|err| Error::Msg(format!("{}: `{name}`: {err}", self.path.display())))?;
            view.load(&Device::Cpu)
        })())
    }
}

/// The dtypes `header` lets through, as safetensors names them.
fn stored_dtype(s: &str) -> Option<safetensors::Dtype> {
    use safetensors::Dtype::*;
    Some(match s {
        "U8" => U8,
        "F8_E4M3" => F8_E4M3,
        "F16" => F16,
        "BF16" => BF16,
        "I16" => I16,
        "U16" => U16,
        "F32" => F32,
        "I32" => I32,
        "U32" => U32,
        "F64" => F64,
        "I64" => I64,
        _ => return None,
    })
}

impl Weights {
    /// Opens safetensors files (their headers checked). Errors name the file and say what is
    /// wrong with it.
    pub fn from_files(paths: &[PathBuf], dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let files = paths.iter().map(|p| File::open(p)).collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            src: Arc::new(Source::Files(files)),
            origin: Arc::new(show(paths)),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        })
    }

    pub fn from_map(map: HashMap<String, Tensor>, origin: &str, dtype: DType, device: &Device) -> Self {
        Self {
            src: Arc::new(Source::Map(map)),
            origin: Arc::new(origin.to_string()),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    pub fn random(seed: u64, dtype: DType, device: &Device) -> Self {
        Self::from_source(Source::Random(seed), "random weights", dtype, device)
    }

    pub fn meta() -> Self {
        Self::from_source(Source::Meta(Default::default()), "shapes only", DType::F32, &Device::Cpu)
    }

    fn from_source(src: Source, origin: &str, dtype: DType, device: &Device) -> Self {
        Self {
            src: Arc::new(src),
            origin: Arc::new(origin.into()),
            prefix: String::new(),
            dtype,
            device: device.clone(),
        }
    }

    /// For `meta()` weights: every (name, shape) asked for so far.
    pub fn recorded(&self) -> Vec<(String, Vec<usize>)> {
        match &*self.src {
            Source::Meta(m) => m.lock().map(|v| v.clone()).unwrap_or_default(),
            _ => vec![],
        }
    }

    /// A view under `prefix.`
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut w = self.clone();
        w.prefix = self.full(&name.to_string());
        w
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        let full = self.full(name);
        match &*self.src {
            Source::Files(fs) => fs.iter().any(|f| f.entries.contains_key(&full)),
            Source::Map(m) => m.contains_key(&full),
            Source::Random(_) | Source::Meta(_) => true,
        }
    }

    /// The tensor `name`, checked against `shape`, in the run's dtype.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        let full = self.full(name);
        let t = match &*self.src {
            Source::Files(fs) => {
                fs.iter().find_map(|f| f.load(&full)).ok_or_else(|| self.missing(&full))??
            }
            Source::Map(m) => m.get(&full).cloned().ok_or_else(|| self.missing(&full))?,
            Source::Random(seed) => {
                return random_tensor(*seed, &full, &shape.into(), self.dtype, &self.device)
            }
            Source::Meta(m) => {
                let shape: Shape = shape.into();
                if let Ok(mut m) = m.lock() {
                    m.push((full, shape.dims().to_vec()));
                }
                return Tensor::zeros(1, self.dtype, &self.device)?.broadcast_as(shape);
            }
        };
        let shape = shape.into();
        if t.shape() != &shape {
            return Err(Error::Msg(format!(
                "{}: tensor `{full}` has shape {:?}, expected {:?} — the config does not match these weights",
                self.origin,
                t.dims(),
                shape.dims()
            )));
        }
        t.to_device(&self.device)?.to_dtype(self.dtype)
    }

    fn missing(&self, full: &str) -> Error {
        Error::Msg(format!(
            "{}: tensor `{full}` is missing — is this the right model family and component?",
            self.origin
        ))
    }
}

fn show(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Reads the header and checks every tensor's entry (see `header`), so a truncated download or a
/// hostile header becomes one clear error instead of a failed mmap slice later.
pub fn check_safetensors(path: &Path) -> anyhow::Result<()> {
    super::header::read(path).map(|_| ())
}

/// The `__metadata__` of a safetensors file (header checked).
pub fn read_metadata(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    Ok(super::header::read(path)?.metadata)
}

/// All tensors of a safetensors file read whole into memory, header checked first.
pub fn load_checked(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let data = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
    super::header::check_bytes(&data, &path.display().to_string())?;
    candle_core::safetensors::load_buffer(&data, &Device::Cpu)
        .map_err(|e| anyhow::anyhow!("{}: cannot read tensors: {e}", path.display()))
}

/// Deterministic per-name random init: norms near 1, biases small, matrices ~ N(0, 1/fan_in).
pub fn random_tensor(seed: u64, name: &str, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
    use rand::{Rng, SeedableRng};
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (seed, name).hash(&mut h);
    let mut rng = rand::rngs::StdRng::seed_from_u64(h.finish());
    let n = shape.elem_count();
    let dims = shape.dims();
    let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
    let (mean, std) = if dims.len() == 1 && name.contains("norm") {
        (1.0, 0.1)
    } else if dims.len() == 1 {
        (0.0, 0.1)
    } else {
        (0.0, 1.0 / (fan_in as f64).sqrt())
    };
    let data: Vec<f32> = (0..n)
        .map(|_| {
            // Box–Muller
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            (mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(data, shape.clone(), device)?.to_dtype(dtype)
}

/// safetensors with metadata, written to a temporary file and renamed so a killed run never
/// leaves a truncated file behind. The header is written with sorted keys: the same tensors and
/// metadata always give the same bytes (the safetensors crate writes metadata in hash order).
pub fn save_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> anyhow::Result<()> {
    let out =
        serialize(tensors, metadata).map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
    crate::util::write_atomic(path, &out)
}

/// The bytes of a safetensors file, header keys sorted.
pub fn serialize(
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let bytes = safetensors::serialize(views, None)?;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n])?;
    if !metadata.is_empty() {
        let sorted: std::collections::BTreeMap<&String, &String> = metadata.iter().collect();
        header.insert("__metadata__".into(), serde_json::to_value(sorted)?);
    }
    let mut h = serde_json::to_vec(&header)?;
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}
