//! Reading and writing safetensors files, and loading PyTorch-layout weights into burn layers.
//!
//! PyTorch (and so PEFT) stores a `Linear` weight as `[out, in]`; burn stores `[in, out]`.
//! [`TensorFile::linear_torch`] does the transpose, so a checkpoint's module paths load
//! directly (`fc1` → `fc1.weight`, `fc1.bias`), in the spirit of candle's `VarBuilder`.
//! Writes go to a temporary file in the same folder and are renamed into place, so a crash or
//! a bad input never leaves a half-written file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, Result};

/// A tensor held on the host as `f32`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Reads a device tensor to the host.
    pub fn from_tensor<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        Self {
            shape,
            data: t.into_data().iter::<f32>().collect(),
        }
    }

    /// Uploads to `device` as a rank-`D` tensor.
    ///
    /// # Errors
    /// [`Error::Shape`] if the stored rank is not `D`.
    pub fn to_tensor<const D: usize>(&self, device: &Device) -> Result<Tensor<D>> {
        if self.shape.len() != D {
            return Err(Error::shape(
                "HostTensor::to_tensor rank",
                D.to_string(),
                format!("{:?}", self.shape),
            ));
        }
        Ok(Tensor::<D>::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            device,
        ))
    }
}

/// The tensors of a safetensors file, converted to `f32` (F32, F16, BF16 and F64 are read).
#[derive(Clone, Debug)]
pub struct TensorFile {
    path: PathBuf,
    tensors: BTreeMap<String, HostTensor>,
    metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Reads and parses `path`.
    ///
    /// # Errors
    /// [`Error::Io`] if unreadable; [`Error::SafeTensors`] if truncated or malformed, or if a
    /// tensor has an unsupported dtype; [`Error::NonFinite`] for NaN or infinite values under
    /// the default [`NonFinitePolicy`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses an in-memory safetensors buffer; `path` is only used in error messages.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn from_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let st_err = |why: String| Error::SafeTensors {
            path: path.clone(),
            why,
        };
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| {
            st_err(format!(
                "cannot parse the header ({e}); the file is truncated or not a safetensors file"
            ))
        })?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            st_err(format!(
                "invalid safetensors data ({e}); the file may be truncated"
            ))
        })?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = decode(&view).map_err(|why| st_err(format!("tensor `{name}`: {why}")))?;
            check_loaded(&data, &path, &name)?;
            tensors.insert(
                name,
                HostTensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        let metadata = meta
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        Ok(Self {
            path,
            tensors,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// All tensors by name.
    pub fn tensors(&self) -> &BTreeMap<String, HostTensor> {
        &self.tensors
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The host tensor called `name`.
    ///
    /// # Errors
    /// [`Error::SafeTensors`] naming the missing tensor.
    pub fn get(&self, name: &str) -> Result<&HostTensor> {
        self.tensors.get(name).ok_or_else(|| Error::SafeTensors {
            path: self.path.clone(),
            why: format!("no tensor named `{name}`"),
        })
    }

    /// Tensor `name` on `device`, checking its rank.
    ///
    /// # Errors
    /// Missing tensor or wrong rank.
    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Result<Tensor<D>> {
        let t = self.get(name)?;
        if t.shape.len() != D {
            return Err(Error::SafeTensors {
                path: self.path.clone(),
                why: format!("tensor `{name}` has shape {:?}, expected rank {D}", t.shape),
            });
        }
        t.to_tensor(device)
    }

    /// Builds a burn [`Linear`] from PyTorch-layout `{prefix}.weight: [out, in]` and optional
    /// `{prefix}.bias: [out]`.
    ///
    /// # Errors
    /// Missing weight, wrong rank, or a bias whose length is not `out`.
    pub fn linear_torch(&self, prefix: &str, device: &Device) -> Result<Linear> {
        let w: Tensor<2> = self.tensor(&format!("{prefix}.weight"), device)?;
        let bias = match self.tensors.get(&format!("{prefix}.bias")) {
            Some(b) => Some(b.to_tensor::<1>(device)?),
            None => None,
        };
        linear_from_torch(w, bias)
    }
}

impl TensorFile {
    /// Builds a burn [`Linear`] from a GPT-2-style `Conv1D` (PEFT's `fan_in_fan_out=True`
    /// hosts): `{prefix}.weight: [in, out]`, burn's own layout, and optional `{prefix}.bias`.
    ///
    /// # Errors
    /// Missing weight, wrong rank, or a bias whose length is not `out`.
    pub fn linear_conv1d(&self, prefix: &str, device: &Device) -> Result<Linear> {
        let w: Tensor<2> = self.tensor(&format!("{prefix}.weight"), device)?;
        let bias = match self.tensors.get(&format!("{prefix}.bias")) {
            Some(b) => Some(b.to_tensor::<1>(device)?),
            None => None,
        };
        linear_from_torch(w.transpose(), bias)
    }
}

/// Builds a burn [`Linear`] from a PyTorch-layout weight `[out, in]` and optional bias `[out]`.
///
/// # Errors
/// [`Error::Shape`] if the bias length is not `out`.
pub fn linear_from_torch(weight: Tensor<2>, bias: Option<Tensor<1>>) -> Result<Linear> {
    let [out, _] = weight.dims();
    if let Some(b) = &bias
        && b.dims()[0] != out
    {
        return Err(Error::shape(
            "Linear bias",
            format!("[{out}]"),
            format!("{:?}", b.dims()),
        ));
    }
    Ok(Linear {
        weight: Param::from_tensor(weight.transpose()),
        bias: bias.map(Param::from_tensor),
    })
}

/// What the loaders ([`TensorFile`], [`Checkpoint`](crate::checkpoint::Checkpoint), and
/// through them the model and PEFT loaders) do with NaN or infinite weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NonFinitePolicy {
    /// An [`Error::NonFinite`] naming the file, the tensor and the first bad value (the
    /// default): a corrupt download or a diverged run is caught at load, not as NaN logits.
    #[default]
    Refuse,
    /// Load them as they are (for users who know the values are intended).
    Allow,
}

static ALLOW_NON_FINITE: AtomicBool = AtomicBool::new(false);

/// Sets, for the whole process, what loading does with NaN or infinite weights (the `modula`
/// tool's `--allow-non-finite`).
pub fn set_non_finite_policy(policy: NonFinitePolicy) {
    ALLOW_NON_FINITE.store(policy == NonFinitePolicy::Allow, Ordering::Relaxed);
}

/// The current [`NonFinitePolicy`].
pub fn non_finite_policy() -> NonFinitePolicy {
    if ALLOW_NON_FINITE.load(Ordering::Relaxed) {
        NonFinitePolicy::Allow
    } else {
        NonFinitePolicy::Refuse
    }
}

/// Whether any of `values` is NaN or infinite: a branch-free minimum over blocks (zero where
/// the exponent bits are all ones), which the compiler vectorises, so the scan runs at memory
/// speed; the slow search for the first bad value runs only when there is one.
pub(crate) fn any_non_finite(values: &[f32]) -> bool {
    const EXPONENT: u32 = 0x7f80_0000;
    values.chunks(4096).any(|block| {
        block
            .iter()
            .fold(u32::MAX, |m, v| m.min((v.to_bits() & EXPONENT) ^ EXPONENT))
            == 0
    })
}

/// Applies the [`NonFinitePolicy`] to the loaded values of tensor `name` of `file`.
///
/// # Errors
/// [`Error::NonFinite`] under [`NonFinitePolicy::Refuse`] when a value is NaN or infinite.
pub(crate) fn check_loaded(values: &[f32], file: &Path, name: &str) -> Result<()> {
    if non_finite_policy() == NonFinitePolicy::Allow {
        return Ok(());
    }
    if !any_non_finite(values) {
        return Ok(());
    }
    let Some(first) = values.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let count = values.iter().filter(|v| !v.is_finite()).count();
    Err(Error::non_finite(format!(
        "{}: tensor `{name}` holds {count} NaN or infinite value(s), the first {} at flat index \
         {first}; the file is corrupt or the run that wrote it diverged (to load it anyway: \
         modula::io::set_non_finite_policy(NonFinitePolicy::Allow), or the tool's \
         --allow-non-finite)",
        file.display(),
        values[first]
    )))
}

fn decode(view: &TensorView<'_>) -> std::result::Result<Vec<f32>, String> {
    decode_le(view.dtype(), view.data())
}

/// Little-endian safetensors bytes of `dtype` as `f32` (F16/BF16 exactly, F64 rounded).
pub(crate) fn decode_le(dtype: Dtype, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(format!(
                "unsupported dtype {other:?} (use F32, F16, BF16 or F64)"
            ));
        }
    })
}

/// Writes `tensors` as an F32 safetensors file at `path`, atomically.
///
/// # Errors
/// [`Error::Shape`] if a tensor's data length disagrees with its shape; [`Error::Io`].
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &BTreeMap<String, HostTensor>,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    write_safetensors_as(path.as_ref(), tensors, &BTreeMap::new(), metadata)
}

/// Writes `tensors` as a safetensors file at `path`, atomically, each in the dtype `dtypes`
/// gives it (F32, F16, BF16 or F64; F32 when absent), rounding to nearest.
///
/// # Errors
/// As [`write_safetensors`]; [`Error::SafeTensors`] for another dtype or a finite value that
/// would overflow F16 / BF16 (before anything is written).
pub(crate) fn write_safetensors_as(
    path: &Path,
    tensors: &BTreeMap<String, HostTensor>,
    dtypes: &BTreeMap<String, Dtype>,
    metadata: Option<BTreeMap<String, String>>,
) -> Result<()> {
    let mut bufs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if t.shape.iter().product::<usize>() != t.data.len() {
            return Err(Error::shape(
                format!("tensor `{name}` data"),
                format!(
                    "{} values for shape {:?}",
                    t.shape.iter().product::<usize>(),
                    t.shape
                ),
                format!("{} values", t.data.len()),
            ));
        }
        let dtype = dtypes.get(name).copied().unwrap_or(Dtype::F32);
        let d = &t.data;
        let overflow = |max: f32, kind: &str| -> Result<()> {
            match d.iter().position(|v| v.is_finite() && v.abs() > max) {
                None => Ok(()),
                Some(i) => Err(Error::SafeTensors {
                    path: path.to_path_buf(),
                    why: format!(
                        "tensor `{name}`: value {} at flat index {i} overflows {kind} (largest \
                         finite {max:e}); nothing was written; keep this tensor in F32 or rescale it",
                        d[i]
                    ),
                }),
            }
        };
        match dtype {
            Dtype::F16 => overflow(half::f16::MAX.to_f32(), "F16")?,
            Dtype::BF16 => overflow(half::bf16::MAX.to_f32(), "BF16")?,
            _ => {}
        }
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => d
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => d
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::F64 => d.iter().flat_map(|v| f64::from(*v).to_le_bytes()).collect(),
            other => {
                return Err(Error::SafeTensors {
                    path: path.to_path_buf(),
                    why: format!("tensor `{name}`: cannot write dtype {other:?}"),
                });
            }
        };
        bufs.push((name.clone(), t.shape.clone(), dtype, bytes));
    }
    let views = bufs
        .iter()
        .map(|(n, s, dtype, b)| {
            TensorView::new(*dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::SafeTensors {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(views, metadata.map(|m| m.into_iter().collect())).map_err(|e| {
            Error::SafeTensors {
                path: path.to_path_buf(),
                why: e.to_string(),
            }
        })?;
    atomic_write(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename: a kill
/// at any moment leaves `path`'s old content or its new content. The file is flushed to the
/// disk before the rename and the folder after it, so a power loss or an OS crash cannot leave
/// a renamed but empty file either. Temporary files that killed writers left behind are
/// removed first (those of processes that no longer run).
///
/// # Errors
/// [`Error::Io`].
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let (dir, name) = split_path(path);
    remove_stale_temporaries(dir, &name);
    let tmp = dir.join(temporary_name(&name));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    sync_dir(dir)
}

/// Flushes a folder's entries (names, renames) to the disk (Unix; elsewhere the rename is
/// durable by itself or cannot be flushed). Filesystems that cannot flush a folder are not an
/// error.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let synced = std::fs::File::open(dir).and_then(|d| d.sync_all());
        if let Err(e) = synced
            && !matches!(
                e.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported
            )
        {
            return Err(Error::io(dir, e));
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Flushes every file of `dir` (not its subfolders) and then `dir` itself to the disk.
fn sync_files(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    sync_dir(dir)
}

/// `path`'s folder (`.` for a bare name) and file name.
fn split_path(path: &Path) -> (&Path, String) {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    (dir, name)
}

/// The temporary sibling of `name` this process writes: `.{name}.tmp-{pid}`.
fn temporary_name(name: &str) -> String {
    format!(".{name}.tmp-{}", std::process::id())
}

/// Removes `dir/.{name}.tmp-{pid}` files and folders of processes that no longer run (Linux,
/// where `/proc` says; elsewhere nothing is removed).
fn remove_stale_temporaries(dir: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = remove_entry(&entry.path());
    }
}

/// Removes `path`: a folder with everything in it, a file, or a symbolic link (never what it
/// points to). A path already gone is not an error (another cleaner got there first).
pub(crate) fn remove_entry(path: &Path) -> std::io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Writes a folder atomically: `write` fills a temporary sibling folder (to which, with
/// `keep_others`, the plain files of the old `dir` that `write` did not write are then copied),
/// which then takes `dir`'s place in one step (Linux: `renameat2(RENAME_EXCHANGE)`; a new `dir`: one rename).
/// A kill at any moment leaves the old folder or the new one, never a mixture; the new
/// folder's files, the folder and its parent are flushed to the disk before this returns, so a
/// power loss after it cannot undo it either. Temporaries of killed writers are removed on the
/// next write. Elsewhere than Linux an existing folder is
/// replaced by two renames, with a short window where `dir` is missing.
///
/// # Errors
/// [`Error::Io`]; `write`'s errors (the temporary folder is removed, `dir` is untouched).
pub fn write_dir_atomically(
    dir: &Path,
    keep_others: bool,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let (parent, name) = split_path(dir);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    remove_stale_temporaries(parent, &name);
    let tmp = parent.join(temporary_name(&name));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let filled = write(&tmp)
        .and_then(|()| {
            if keep_others {
                keep_other_files(dir, &tmp)
            } else {
                Ok(())
            }
        })
        .and_then(|()| sync_files(&tmp));
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let swapped = if dir.is_dir() {
        exchange(&tmp, dir)
    } else {
        std::fs::rename(&tmp, dir)
    };
    if let Err(e) = swapped {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(dir, e));
    }
    sync_dir(parent)?;
    // After an exchange the temporary name holds the old folder.
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    Ok(())
}

/// Copies the plain files of `old` that `new` lacks into `new` (a README, a user's notes).
fn keep_other_files(old: &Path, new: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(old) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let target = new.join(entry.file_name());
        if entry.path().is_file() && !target.exists() {
            std::fs::copy(entry.path(), &target).map_err(|e| Error::io(&target, e))?;
        }
    }
    Ok(())
}

/// Swaps two folders in one step.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    renameat_with(CWD, a, CWD, b, RenameFlags::EXCHANGE).map_err(std::io::Error::from)
}

/// Replaces `b` by `a` with two renames (no atomic exchange here); `a` then holds the old `b`.
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let old = a.with_extension("old");
    std::fs::rename(b, &old)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&old, a)
}

impl crate::models::WeightSource for TensorFile {
    fn weight(&self, name: &str) -> Result<Option<TensorData>> {
        Ok(self
            .tensors
            .get(name)
            .map(|t| TensorData::new(t.data.clone(), t.shape.clone())))
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finite value F16 (or BF16) cannot hold is refused before anything is written.
    #[test]
    fn f16_and_bf16_overflow_is_refused_before_writing() {
        let dir = std::env::temp_dir().join(format!("modula-io-overflow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let mut t = BTreeMap::new();
        t.insert(
            "w".to_string(),
            HostTensor {
                shape: vec![3],
                data: vec![1.0, 7.0e4, -2.0],
            },
        );
        let mut dt = BTreeMap::new();
        dt.insert("w".to_string(), Dtype::F16);
        let e = write_safetensors_as(&path, &t, &dt, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`w`") && e.contains("F16") && e.contains("index 1"),
            "{e}"
        );
        assert!(!path.exists());
        dt.insert("w".to_string(), Dtype::BF16);
        write_safetensors_as(&path, &t, &dt, None).unwrap();
        t.get_mut("w").unwrap().data[2] = f32::MAX;
        let e = write_safetensors_as(&path, &t, &dt, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("BF16") && e.contains("index 2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
