//! Hugging Face model folders: `config.json` with `model.safetensors`, or with the shards that
//! `model.safetensors.index.json` lists, in F32, F16, BF16 or F64.
//!
//! [`Checkpoint::open`] reads only the headers: every shard's tensor table is checked against
//! the file's length (a truncated shard is an error naming the file and the first tensor it
//! cuts), and the index against the shards (a listed tensor missing from its shard, a tensor
//! in two shards, a shard that is not there). Tensors are then read one at a time, with
//! positional reads straight into the `f32` buffer the model keeps, so loading holds the model
//! plus at most one tensor's raw bytes (for F16/BF16 sources): the peak resident memory stays
//! near the loaded model's size. A memory map would do no better here: its touched pages count
//! as resident until unmapped, and every weight is converted to `f32` anyway.
//!
//! [`load_decoder`] joins this with [`DecoderConfig`] and [`LlamaForCausalLm::from_weights`],
//! whose strict checks (a missing or unused tensor, a shape that disagrees with the config)
//! name the folder and key. [`bake`] writes a folder with a PEFT LoRA merged into the
//! weights, shard by shard, in each tensor's own dtype, so transformers and modula load it.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, TensorData};
use safetensors::Dtype;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::io::{HostTensor, NonFinitePolicy, non_finite_policy};
use crate::library::LoraExpert;
use crate::models::{
    BertConfig, BertModel, DecoderConfig, Gpt2Config, Gpt2LmHeadModel, LlamaForCausalLm,
    WeightSource,
};
use crate::peft::PeftLora;

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The weights file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// F32 values read (and scanned) at a time: 256 KiB, which stays in the cache for the scan (a
/// large read by the kernel may bypass it: a 64 MB tensor read in 1 MiB blocks took 29 %
/// longer checked than unchecked, in 256 KiB blocks 7–18 %; `cargo bench --bench reliability`).
const BLOCK_FLOATS: usize = 1 << 16;

/// One tensor of a checkpoint: where its bytes are and what they hold.
#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the shard file.
    start: u64,
    end: u64,
}

/// One safetensors file of a checkpoint.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    file: File,
    /// The header's `__metadata__`.
    metadata: BTreeMap<String, String>,
}

/// A safetensors checkpoint (one file, or the shards of an index) opened for reading tensor by
/// tensor. Implements [`WeightSource`], so a model loads from it directly.
#[derive(Debug)]
pub struct Checkpoint {
    root: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

fn st_error(path: &Path, why: impl Into<String>) -> Error {
    Error::SafeTensors {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

/// A dtype and its size; integer dtypes are accepted in headers (buffers such as BERT's
/// `position_ids`) but cannot be read as weights.
fn dtype_of(name: &str) -> Option<(Dtype, u64)> {
    Some(match name {
        "F32" => (Dtype::F32, 4),
        "F16" => (Dtype::F16, 2),
        "BF16" => (Dtype::BF16, 2),
        "F64" => (Dtype::F64, 8),
        "I64" => (Dtype::I64, 8),
        "I32" => (Dtype::I32, 4),
        "I16" => (Dtype::I16, 2),
        "I8" => (Dtype::I8, 1),
        "U8" => (Dtype::U8, 1),
        "BOOL" => (Dtype::BOOL, 1),
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens a model folder (`model.safetensors.index.json` and its shards, else
    /// `model.safetensors`) or a single safetensors file, reading the headers only.
    ///
    /// # Errors
    /// [`Error::Io`] for a file that cannot be read; [`Error::SafeTensors`] naming the file
    /// (and key) for a malformed or truncated header, a tensor whose bytes run past the end of
    /// its shard, an unsupported dtype, or an index that disagrees with its shards;
    /// [`Error::Invalid`] for a folder with neither weights file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_dir() {
            let mut c = Self {
                root: path.to_path_buf(),
                shards: Vec::new(),
                entries: BTreeMap::new(),
            };
            c.add_shard(path, None)?;
            return Ok(c);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(path, &index);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            let mut c = Self::open(&single)?;
            c.root = path.to_path_buf();
            return Ok(c);
        }
        Err(Error::invalid(
            format!("model folder {}", path.display()),
            format!("it holds neither {INDEX_FILE} nor {SINGLE_FILE}"),
        ))
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: index.to_path_buf(),
            source: e,
        })?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| st_error(index, "no `weight_map` object"))?;
        // Shard files in first-listed order, each with the tensors the index puts there.
        let mut files: Vec<(String, Vec<String>)> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                st_error(index, format!("weight_map[`{name}`] is not a file name"))
            })?;
            if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                return Err(st_error(
                    index,
                    format!("weight_map[`{name}`] = `{file}` is not a file in the folder"),
                ));
            }
            match files.iter_mut().find(|(f, _)| f == file) {
                Some((_, names)) => names.push(name.clone()),
                None => files.push((file.to_string(), vec![name.clone()])),
            }
        }
        let mut c = Self {
            root: dir.to_path_buf(),
            shards: Vec::new(),
            entries: BTreeMap::new(),
        };
        for (file, names) in &files {
            let shard = dir.join(file);
            if !shard.is_file() {
                return Err(st_error(
                    index,
                    format!("lists shard `{file}`, which is not in the folder"),
                ));
            }
            c.add_shard(&shard, Some(names))?;
        }
        Ok(c)
    }

    /// Reads a shard's header and adds its tensors; `listed` are the names the index puts
    /// there (each must be present).
    fn add_shard(&mut self, path: &Path, listed: Option<&Vec<String>>) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut head = [0u8; 8];
        read_at(&file, &mut head, 0).map_err(|_| {
            st_error(
                path,
                "shorter than a safetensors header; the file is truncated",
            )
        })?;
        let n = u64::from_le_bytes(head);
        if n > len.saturating_sub(8) || n > 100_000_000 {
            return Err(st_error(
                path,
                format!(
                    "the header claims {n} bytes but the file holds {len}; the file is truncated \
                     or not a safetensors file"
                ),
            ));
        }
        let mut header = vec![0u8; n as usize];
        read_at(&file, &mut header, 8).map_err(|e| Error::io(path, e))?;
        let header: Map<String, Value> = serde_json::from_slice(&header)
            .map_err(|e| st_error(path, format!("cannot parse the header: {e}")))?;
        let data_start = 8 + n;
        let data_len = len - data_start;
        let shard = self.shards.len();
        let mut metadata = BTreeMap::new();
        for (name, value) in header {
            if name == "__metadata__" {
                if let Some(m) = value.as_object() {
                    for (k, v) in m {
                        metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
                    }
                }
                continue;
            }
            let e: HeaderEntry = serde_json::from_value(value)
                .map_err(|e| st_error(path, format!("tensor `{name}`: {e}")))?;
            let (dtype, size) = dtype_of(&e.dtype).ok_or_else(|| {
                st_error(
                    path,
                    format!(
                        "tensor `{name}` has dtype {} (modula reads F32, F16, BF16 and F64 \
                         weights, and skips integer buffers)",
                        e.dtype
                    ),
                )
            })?;
            let [s, t] = e.data_offsets;
            let want = e
                .shape
                .iter()
                .try_fold(size, |acc, &d| acc.checked_mul(d as u64))
                .ok_or_else(|| {
                    st_error(
                        path,
                        format!(
                            "tensor `{name}`: shape {:?} holds more elements than can be \
                             addressed; the header is corrupt",
                            e.shape
                        ),
                    )
                })?;
            if t < s || t - s != want {
                return Err(st_error(
                    path,
                    format!(
                        "tensor `{name}`: offsets {s}..{t} do not hold {want} bytes of {} {:?}",
                        e.dtype, e.shape
                    ),
                ));
            }
            if t > data_len {
                return Err(st_error(
                    path,
                    format!(
                        "tensor `{name}` ends at data byte {t} but the file holds {data_len}; \
                         the shard is truncated"
                    ),
                ));
            }
            let entry = Entry {
                shard,
                dtype,
                shape: e.shape,
                start: data_start + s,
                end: data_start + t,
            };
            if let Some(old) = self.entries.insert(name.clone(), entry) {
                return Err(st_error(
                    path,
                    format!(
                        "tensor `{name}` is also in {}",
                        self.shards[old.shard].path.display()
                    ),
                ));
            }
        }
        // Tensors may not share bytes (the format lays them end to end).
        let mut spans: Vec<(u64, u64, &str)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.shard == shard)
            .map(|(n, e)| (e.start, e.end, n.as_str()))
            .collect();
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(st_error(
                path,
                format!(
                    "tensors `{}` and `{}` overlap in the file; the header is corrupt",
                    w[0].2, w[1].2
                ),
            ));
        }
        if let Some(listed) = listed
            && let Some(name) = listed
                .iter()
                .find(|n| self.entries.get(*n).is_none_or(|e| e.shard != shard))
        {
            return Err(st_error(
                path,
                format!("the index puts tensor `{name}` in this shard, which lacks it"),
            ));
        }
        self.shards.push(Shard {
            path: path.to_path_buf(),
            file,
            metadata,
        });
        Ok(())
    }

    /// The folder or file it was opened from.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The stored dtype of tensor `name` (`"F32"`, `"BF16"`, …).
    pub fn dtype(&self, name: &str) -> Option<String> {
        self.entries.get(name).map(|e| format!("{:?}", e.dtype))
    }

    /// The shard files, in the order the index first lists them, with their tensor names.
    pub fn shard_files(&self) -> Vec<(&Path, Vec<&str>)> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let names = self
                    .entries
                    .iter()
                    .filter(|(_, e)| e.shard == i)
                    .map(|(n, _)| n.as_str())
                    .collect();
                (s.path.as_path(), names)
            })
            .collect()
    }

    /// Reads tensor `name` as `f32` (F16, BF16 and F64 converted exactly or rounded to nearest).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a name the checkpoint lacks; [`Error::Io`] for a failed read;
    /// [`Error::NonFinite`] for NaN or infinite values under the default
    /// [`NonFinitePolicy`].
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let e = self.entries.get(name).ok_or_else(|| {
            Error::invalid(
                format!("{}: key `{name}`", self.root.display()),
                "no such tensor in the checkpoint",
            )
        })?;
        let shard = &self.shards[e.shard];
        let bytes = (e.end - e.start) as usize;
        let io = |err| Error::io(&shard.path, err);
        let data = match e.dtype {
            // Straight into the buffer the model keeps (no second copy of the tensor), a block
            // at a time, each scanned for non-finite values while it is in the cache; the
            // full check (which names the first bad value) runs only when a block had one.
            Dtype::F32 => {
                let mut v = vec![0f32; bytes / 4];
                let scan = non_finite_policy() == NonFinitePolicy::Refuse;
                let mut bad = false;
                for (i, block) in v.chunks_mut(BLOCK_FLOATS).enumerate() {
                    let at = e.start + (i * BLOCK_FLOATS * 4) as u64;
                    read_at(&shard.file, f32_bytes_mut(block), at).map_err(io)?;
                    if cfg!(target_endian = "big") {
                        block
                            .iter_mut()
                            .for_each(|x| *x = f32::from_bits(x.to_bits().swap_bytes()));
                    }
                    bad |= scan && crate::io::any_non_finite(block);
                }
                if bad {
                    crate::io::check_loaded(&v, &shard.path, name)?;
                }
                v
            }
            dtype @ (Dtype::F16 | Dtype::BF16 | Dtype::F64) => {
                let mut raw = vec![0u8; bytes];
                read_at(&shard.file, &mut raw, e.start).map_err(io)?;
                let v = crate::io::decode_le(dtype, &raw)
                    .map_err(|why| st_error(&shard.path, format!("tensor `{name}`: {why}")))?;
                crate::io::check_loaded(&v, &shard.path, name)?;
                v
            }
            other => {
                return Err(st_error(
                    &shard.path,
                    format!("tensor `{name}` has dtype {other:?}, not a float weight"),
                ));
            }
        };
        Ok(HostTensor {
            shape: e.shape.clone(),
            data,
        })
    }
}

/// `v`'s bytes, for reading little-endian `f32`s into it in place.
fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    let len = std::mem::size_of_val(v);
    // SAFETY: any byte pattern is a valid f32, u8 has alignment 1, and the slice covers
    // exactly the vector's initialised elements for the borrow's lifetime.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), len) }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(not(any(unix, windows)))]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = file.try_clone()?;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

impl WeightSource for Checkpoint {
    fn weight(&self, name: &str) -> Result<Option<TensorData>> {
        if !self.entries.contains_key(name) {
            return Ok(None);
        }
        let t = self.read(name)?;
        Ok(Some(TensorData::new(t.data, t.shape)))
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
}

/// Reads `dir/config.json`.
///
/// # Errors
/// [`Error::Io`] when it is missing; config errors naming the file and key.
pub fn read_decoder_config(dir: impl AsRef<Path>) -> Result<DecoderConfig> {
    let path = dir.as_ref().join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    DecoderConfig::from_json(&text, &path.display().to_string())
}

/// Loads a BERT Hugging Face or sentence-transformers folder (`config.json`, its weights,
/// and `modules.json` with the pooling module's config when present) onto `device`. Returns
/// the encoder and whether sentence embeddings are L2-normalised (a `Normalize` module).
///
/// # Errors
/// As [`Checkpoint::open`] and [`BertModel::from_weights`]; config errors naming the file and
/// key; a pooling mode other than the mean.
pub fn load_encoder(dir: impl AsRef<Path>, device: &Device) -> Result<(BertModel, bool)> {
    let dir = dir.as_ref();
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config = BertConfig::from_json(&text, &path.display().to_string())?;
    let weights = Checkpoint::open(dir)?;
    let model = BertModel::from_weights(&config, &weights, device)?;
    let read_json = |p: &Path| -> Result<Option<Value>> {
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Json {
                path: p.to_path_buf(),
                source: e,
            })
    };
    let modules = read_json(&dir.join("modules.json"))?.unwrap_or(Value::Null);
    // The pooling module's folder, as modules.json names it.
    let pool_dir = modules.as_array().and_then(|m| {
        m.iter().find_map(|e| {
            let t = e.get("type")?.as_str()?;
            t.ends_with("models.Pooling")
                .then(|| e.get("path")?.as_str().map(str::to_string))?
        })
    });
    let pool_path = pool_dir.map(|p| dir.join(p).join("config.json"));
    let pooling = match &pool_path {
        Some(p) => read_json(p)?,
        None => None,
    };
    let normalize = crate::models::bert::sentence_pooling(
        &modules,
        pooling.as_ref().and_then(Value::as_object),
        &pool_path.map_or_else(String::new, |p| p.display().to_string()),
    )?;
    Ok((model, normalize))
}

/// Loads a GPT-2 Hugging Face folder (`config.json` and its safetensors weights) onto
/// `device`.
///
/// # Errors
/// As [`Checkpoint::open`] and [`Gpt2LmHeadModel::from_weights`]; config errors naming the
/// file and key.
pub fn load_gpt2(dir: impl AsRef<Path>, device: &Device) -> Result<Gpt2LmHeadModel> {
    let dir = dir.as_ref();
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config = Gpt2Config::from_json(&text, &path.display().to_string())?;
    Gpt2LmHeadModel::from_weights(&config, &Checkpoint::open(dir)?, device)
}

/// Loads a Llama-family Hugging Face folder (`config.json` and its safetensors weights,
/// sharded or not) onto `device`.
///
/// # Errors
/// As [`read_decoder_config`], [`Checkpoint::open`] and [`LlamaForCausalLm::from_weights`].
pub fn load_decoder(dir: impl AsRef<Path>, device: &Device) -> Result<LlamaForCausalLm> {
    let dir = dir.as_ref();
    let config = read_decoder_config(dir)?;
    let weights = Checkpoint::open(dir)?;
    LlamaForCausalLm::from_weights(&config, &weights, device)
}

/// Writes `model`'s base weights ([`LlamaForCausalLm::base_weights`]) as an F32
/// `model.safetensors` in the folder `dir` (created if needed), atomically. With the model's
/// `config.json` beside it, transformers and [`load_decoder`] load the folder.
///
/// # Errors
/// [`Error::Io`].
pub fn write_decoder_weights(model: &LlamaForCausalLm, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: BTreeMap<String, HostTensor> = model
        .base_weights()
        .into_iter()
        .map(|(name, data)| {
            let shape = data.shape().as_slice().to_vec();
            (
                name,
                HostTensor {
                    shape,
                    data: data.iter::<f32>().collect(),
                },
            )
        })
        .collect();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    crate::io::write_safetensors(dir.join(SINGLE_FILE), &tensors, Some(meta))
}

/// Adds `expert`'s update `ΔW` (PyTorch layout `[out, in]`, or `[in, out]` when
/// `fan_in_fan_out`) to the matching weights among `tensors` (one shard's): the key
/// `{path}.weight`, or the one key ending in `.{path}.weight`. Returns the layer paths merged.
fn merge_lora_into(
    tensors: &mut BTreeMap<String, HostTensor>,
    expert: &LoraExpert,
    fan_in_fan_out: bool,
    file: &Path,
) -> Result<Vec<String>> {
    let mut merged = Vec::new();
    for (path, f) in &expert.layers {
        let Some(key) = find_weight_key(tensors.keys().map(String::as_str), path, file)? else {
            continue;
        };
        let w = tensors
            .get_mut(&key)
            .ok_or_else(|| st_error(file, format!("tensor `{key}` vanished")))?;
        add_delta(w, f, fan_in_fan_out, &key, path, file)?;
        merged.push(path.clone());
    }
    Ok(merged)
}

/// The key holding layer `path`'s weight among `keys`: `{path}.weight`, else the single key
/// ending in `.{path}.weight`; `None` when no key matches.
fn find_weight_key<'a>(
    keys: impl Iterator<Item = &'a str>,
    path: &str,
    file: &Path,
) -> Result<Option<String>> {
    let exact = format!("{path}.weight");
    let suffix = format!(".{path}.weight");
    let candidates: Vec<&str> = keys
        .filter(|k| *k == exact || k.ends_with(&suffix))
        .collect();
    match candidates.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some((*one).to_string())),
        many if many.contains(&exact.as_str()) => Ok(Some(exact)),
        many => Err(st_error(
            file,
            format!("module `{path}` matches several tensors: {many:?}"),
        )),
    }
}

fn add_delta(
    w: &mut HostTensor,
    f: &crate::library::LoraFactors,
    fan_in_fan_out: bool,
    key: &str,
    path: &str,
    file: &Path,
) -> Result<()> {
    // [d_out, d_in], PyTorch Linear layout, row-major f64.
    let delta: Vec<f64> = f.delta().iter::<f64>().collect();
    let d_in = f.d_in();
    let want = if fan_in_fan_out {
        vec![f.d_in(), f.d_out()]
    } else {
        vec![f.d_out(), f.d_in()]
    };
    if w.shape != want {
        return Err(st_error(
            file,
            format!(
                "tensor `{key}` has shape {:?} but the adapter's `{path}` needs {want:?}",
                w.shape
            ),
        ));
    }
    let cols = w.shape[1];
    for (idx, v) in w.data.iter_mut().enumerate() {
        let (i, j) = (idx / cols, idx % cols);
        let d = if fan_in_fan_out {
            delta[j * d_in + i]
        } else {
            delta[i * d_in + j]
        };
        *v = (f64::from(*v) + d) as f32;
    }
    Ok(())
}

/// The LoRA (or exact LoRA form) of a mergeable PEFT folder.
fn mergeable_as_lora(adapter: &Path) -> Result<PeftLora> {
    match crate::peft::PeftAdapter::load(adapter, &Device::flex())? {
        crate::peft::PeftAdapter::Lora(l) => Ok(l),
        crate::peft::PeftAdapter::Lycoris(l) => Ok(l.to_lora()),
        crate::peft::PeftAdapter::Ia3(_) => Err(Error::peft(
            adapter,
            "bake merges LoRA, LoHa and LoKr folders; merge an IA3 adapter with `PeftIa3::merge_into_model` and save the model",
        )),
        crate::peft::PeftAdapter::Prompt(_) => Err(Error::peft(
            adapter,
            "a prompt-tuning adapter adds soft tokens before the input and has no weights to merge; serve it with --adapter",
        )),
    }
}

/// Merges the PEFT LoRA, LoHa or LoKr folder `adapter` into the checkpoint `base` (PEFT's
/// `merge_and_unload`) and writes the result to `out`. LoHa and LoKr merge through their exact
/// LoRA forms ([`PeftLycoris::to_lora`](crate::PeftLycoris::to_lora)).
///
/// - `base` a model folder (sharded or not): `out` is a folder with the same shard files and
///   index, every tensor in its own dtype, and every other file of `base` (config, tokenizer,
///   …) copied, so it loads in transformers (`from_pretrained`) and modula ([`load_decoder`])
///   without PEFT, with PEFT's merged numbers up to the dtype's rounding.
/// - `base` a safetensors file: `out` is one F32 safetensors file with the same keys.
///
/// Every adapter layer must find its weight (`{path}.weight`, or the one key ending in
/// `.{path}.weight`) before anything is written. Shards are merged and written one at a time
/// (the peak memory is one shard in `f32`) into a temporary folder beside `out`, which
/// replaces `out` in one step when complete ([`write_dir_atomically`](crate::io::write_dir_atomically)):
/// a kill leaves the old `out` or the finished one. `on_shard(done, total)` is called after
/// each shard.
///
/// # Errors
/// [`Error::Invalid`] when `out` is `base`; as [`Checkpoint::open`] and
/// [`PeftAdapter::load`](crate::PeftAdapter::load); [`Error::Peft`] for an IA3 or
/// prompt-tuning folder;
/// [`Error::SafeTensors`] naming the base and the adapter layer for a layer with no weight,
/// several candidate weights, or a weight of another shape; [`Error::Io`].
pub fn bake(
    base: &Path,
    adapter: &Path,
    out: &Path,
    mut on_shard: impl FnMut(usize, usize),
) -> Result<()> {
    if out.exists() && base.canonicalize().ok() == out.canonicalize().ok() {
        return Err(Error::invalid(
            format!("output {}", out.display()),
            "it is the base itself; write the baked model elsewhere",
        ));
    }
    let ckpt = Checkpoint::open(base)?;
    let peft = mergeable_as_lora(adapter)?;
    let expert = LoraExpert::from_peft(&peft).map_err(|e| match e {
        Error::Peft { .. } => e,
        other => Error::Peft {
            path: adapter.to_path_buf(),
            why: other.to_string(),
        },
    })?;
    for path in expert.layers.keys() {
        let key = find_weight_key(ckpt.names(), path, base)?.ok_or_else(|| {
            st_error(
                base,
                format!(
                    "no tensor `{path}.weight` (or `*.{path}.weight`) for the adapter's module \
                     `{path}`; is this the adapter's base model?"
                ),
            )
        })?;
        let f = &expert.layers[path];
        let want = if peft.config.fan_in_fan_out {
            [f.d_in(), f.d_out()]
        } else {
            [f.d_out(), f.d_in()]
        };
        if ckpt.shape(&key) != Some(&want[..]) {
            return Err(st_error(
                base,
                format!(
                    "tensor `{key}` has shape {:?} but the adapter's `{path}` needs {want:?}",
                    ckpt.shape(&key).unwrap_or_default()
                ),
            ));
        }
    }
    let shards = ckpt.shard_files();
    // Every shard of a folder is merged in memory one at a time (the peak is one shard in
    // f32), written into a temporary folder that replaces `out` only when complete.
    let write_shards = |dest: &Path, folder: bool, on_shard: &mut dyn FnMut(usize, usize)| {
        for (i, (shard, names)) in shards.iter().enumerate() {
            let mut tensors = BTreeMap::new();
            for name in names {
                tensors.insert(name.to_string(), ckpt.read(name)?);
            }
            merge_lora_into(&mut tensors, &expert, peft.config.fan_in_fan_out, shard)?;
            let metadata = Some(ckpt.shards[i].metadata.clone());
            if folder {
                let dtypes: BTreeMap<String, Dtype> = names
                    .iter()
                    .map(|n| (n.to_string(), ckpt.entries[*n].dtype))
                    .collect();
                let path = dest.join(shard.file_name().unwrap_or_default());
                crate::io::write_safetensors_as(&path, &tensors, &dtypes, metadata)?;
            } else {
                crate::io::write_safetensors(dest, &tensors, metadata)?;
            }
            on_shard(i + 1, shards.len());
        }
        Ok::<(), Error>(())
    };
    if !base.is_dir() {
        return write_shards(out, false, &mut on_shard);
    }
    crate::io::write_dir_atomically(out, false, |tmp| {
        write_shards(tmp, true, &mut on_shard)?;
        // The index and every other file (config.json, tokenizer files, …) as they are.
        let entries = std::fs::read_dir(base).map_err(|e| Error::io(base, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(base, e))?;
            let from = entry.path();
            let name = entry.file_name();
            let is_shard = shards.iter().any(|(p, _)| p.file_name() == Some(&name));
            if from.is_file() && !is_shard {
                std::fs::copy(&from, tmp.join(&name)).map_err(|e| Error::io(&from, e))?;
            }
        }
        Ok(())
    })
}
