//! Hugging Face PEFT adapter folders, in and out.
//!
//! A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors`. Tensor keys are
//! `base_model.model.<module path>.<part>` with PyTorch layouts:
//!
//! | method | key | shape | modula |
//! |---|---|---|---|
//! | LoRA | `<path>.lora_A.weight` | `[r, in]` | [`LoraModule::a`] = transpose, `[in, r]` |
//! | LoRA | `<path>.lora_B.weight` | `[out, r]` | [`LoraModule::b`] = transpose, `[r, out]` |
//! | LoRA (embedding) | `<path>.lora_embedding_A` | `[r, n]` | [`LoraModule::a`] = transpose, `[n, r]` |
//! | LoRA (embedding) | `<path>.lora_embedding_B` | `[d, r]` | [`LoraModule::b`] = transpose, `[r, d]` |
//! | IA3 | `<path>.ia3_l` | `[out, 1]`, or `[1, in]` for `feedforward_modules` | [`Ia3Linear::scale`], `[n]` |
//!
//! The scaling of each LoRA module is `alpha/r` (or `alpha/sqrt(r)` with `use_rslora`), where
//! `r` and `alpha` come from `rank_pattern` / `alpha_pattern` when a pattern matches the module
//! path (PEFT's rule: the pattern matches the whole path or a `.`-separated suffix, as a regular
//! expression), and from `r` / `lora_alpha` otherwise. `fan_in_fan_out` only concerns the
//! *host* weight's layout (GPT-2's `Conv1D`); the factors are stored the same way either way.
//!
//! Settings that would change the model in ways modula does not implement (DoRA, LoRA bias
//! terms, `bias != "none"`, `modules_to_save`, aLoRA, QA-LoRA, layer replication, trainable
//! tokens, target parameters) are rejected with [`Error::Peft`] rather than silently ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor};
use serde_json::{Map, Value, json};

use crate::error::{Error, Result, Scope};
use crate::io::{HostTensor, TensorFile, atomic_write, write_safetensors};
use crate::library::factors::{LoraExpert, LoraFactors};
use crate::linalg::Mat;
use crate::modules::ia3::Ia3Linear;
use crate::modules::lora::{LoraEmbedding, LoraLinear, LoraModule, lora_scaling};

/// File name of a PEFT adapter config.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of a PEFT adapter's weights.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const KEY_PREFIX: &str = "base_model.model.";
const PEFT_VERSION: &str = "0.21.2";

/// The adapter methods modula reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftType {
    /// `"LORA"`.
    Lora,
    /// `"IA3"`.
    Ia3,
}

/// The parts of an `adapter_config.json` modula uses, plus the whole document so that saving
/// keeps keys it does not interpret.
#[derive(Clone, Debug)]
pub struct PeftConfig {
    /// Method.
    pub peft_type: PeftType,
    /// Default LoRA rank `r`.
    pub r: usize,
    /// Default LoRA `lora_alpha`.
    pub lora_alpha: f64,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// LoRA dropout probability.
    pub lora_dropout: f64,
    /// Host weights stored `[in, out]` (GPT-2 `Conv1D`).
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides (pattern → r).
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides (pattern → alpha).
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Target module names or a regex, as written.
    pub target_modules: Value,
    /// IA3 input-side modules.
    pub feedforward_modules: Vec<String>,
    /// The full JSON document.
    pub raw: Map<String, Value>,
}

fn pattern_matches(pattern: &str, path: &str) -> bool {
    if pattern == path || path.ends_with(&format!(".{pattern}")) {
        return true;
    }
    regex::Regex::new(&format!("^(?:.*\\.)?(?:{pattern})$"))
        .map(|re| re.is_match(path))
        .unwrap_or(false)
}

fn lookup<'a, T>(patterns: &'a BTreeMap<String, T>, path: &str) -> Option<&'a T> {
    patterns
        .iter()
        .find(|(p, _)| pattern_matches(p, path))
        .map(|(_, v)| v)
}

impl PeftConfig {
    /// Parses and validates an `adapter_config.json` document; `path` is used in errors.
    ///
    /// # Errors
    /// [`Error::Peft`] for malformed JSON, missing or mistyped keys, unknown `peft_type`, or
    /// unsupported settings.
    pub fn from_json(text: &str, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |why: String| Error::peft(path, why);
        let value: Value = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "not valid JSON ({e}); re-save the adapter with PEFT"
            ))
        })?;
        let Value::Object(raw) = value else {
            return Err(bad("the config must be a JSON object".into()));
        };
        let peft_type = match raw.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => PeftType::Lora,
            Some("IA3") => PeftType::Ia3,
            Some(other) => {
                return Err(bad(format!(
                    "peft_type `{other}` is not supported; modula reads LORA and IA3 adapters"
                )));
            }
            None => return Err(bad("missing string key `peft_type` (LORA or IA3)".into())),
        };
        let get_usize = |key: &str| -> Result<Option<usize>> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0)
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| bad(format!("`{key}` must be a positive integer, got {v}"))),
            }
        };
        let get_f64 = |key: &str| -> Result<Option<f64>> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| bad(format!("`{key}` must be a number, got {v}"))),
            }
        };
        let get_bool = |key: &str| -> Result<bool> {
            match raw.get(key) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(bad(format!("`{key}` must be true or false, got {v}"))),
            }
        };
        let mut cfg = PeftConfig {
            peft_type,
            r: 8,
            lora_alpha: 8.0,
            use_rslora: false,
            lora_dropout: 0.0,
            fan_in_fan_out: get_bool("fan_in_fan_out")?,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            target_modules: raw.get("target_modules").cloned().unwrap_or(Value::Null),
            feedforward_modules: Vec::new(),
            raw: raw.clone(),
        };
        match peft_type {
            PeftType::Lora => {
                cfg.r = get_usize("r")?.ok_or_else(|| {
                    bad("missing key `r` (the LoRA rank, a positive integer)".into())
                })?;
                cfg.lora_alpha = get_f64("lora_alpha")?
                    .ok_or_else(|| bad("missing key `lora_alpha` (a number)".into()))?;
                cfg.use_rslora = get_bool("use_rslora")?;
                cfg.lora_dropout = get_f64("lora_dropout")?.unwrap_or(0.0);
                if !(0.0..1.0).contains(&cfg.lora_dropout) {
                    return Err(bad(format!(
                        "`lora_dropout` {} is outside [0, 1)",
                        cfg.lora_dropout
                    )));
                }
                for (flag, what) in [
                    ("use_dora", "DoRA (use_dora)"),
                    ("lora_bias", "LoRA bias terms (lora_bias)"),
                    ("use_qalora", "QA-LoRA (use_qalora)"),
                ] {
                    if get_bool(flag)? {
                        return Err(bad(format!(
                            "{what} is not supported by modula; re-train without it or merge it with PEFT first"
                        )));
                    }
                }
                if let Some(b) = raw.get("bias").and_then(Value::as_str)
                    && b != "none"
                {
                    return Err(bad(format!(
                        "bias=\"{b}\" trains bias terms, which modula does not load; use bias=\"none\""
                    )));
                }
                if let Some(Value::Object(m)) = raw.get("rank_pattern") {
                    for (k, v) in m {
                        let r = v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                            bad(format!(
                                "rank_pattern[`{k}`] must be a positive integer, got {v}"
                            ))
                        })?;
                        cfg.rank_pattern.insert(k.clone(), r as usize);
                    }
                }
                if let Some(Value::Object(m)) = raw.get("alpha_pattern") {
                    for (k, v) in m {
                        let a = v.as_f64().ok_or_else(|| {
                            bad(format!("alpha_pattern[`{k}`] must be a number, got {v}"))
                        })?;
                        cfg.alpha_pattern.insert(k.clone(), a);
                    }
                }
            }
            PeftType::Ia3 => {
                cfg.feedforward_modules = match raw.get("feedforward_modules") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|v| {
                            v.as_str().map(String::from).ok_or_else(|| {
                                bad(format!(
                                    "feedforward_modules entries must be strings, got {v}"
                                ))
                            })
                        })
                        .collect::<Result<_>>()?,
                    Some(Value::String(s)) => vec![s.clone()],
                    Some(v) => {
                        return Err(bad(format!(
                            "feedforward_modules must be a list of names, got {v}"
                        )));
                    }
                };
            }
        }
        for (key, what) in [
            (
                "modules_to_save",
                "modules_to_save (fully fine-tuned modules)",
            ),
            ("layer_replication", "layer_replication"),
            ("alora_invocation_tokens", "aLoRA (alora_invocation_tokens)"),
            (
                "trainable_token_indices",
                "trainable tokens (trainable_token_indices)",
            ),
            (
                "target_parameters",
                "target_parameters (LoRA on raw parameters)",
            ),
        ] {
            match raw.get(key) {
                None | Some(Value::Null) => {}
                Some(Value::Array(a)) if a.is_empty() => {}
                Some(Value::Object(o)) if o.is_empty() => {}
                Some(_) => {
                    return Err(bad(format!(
                        "{what} is set, which modula does not support; remove it or merge the adapter with PEFT first"
                    )));
                }
            }
        }
        Ok(cfg)
    }

    /// Rank of module `path` (after `rank_pattern`).
    pub fn rank_for(&self, path: &str) -> usize {
        lookup(&self.rank_pattern, path).copied().unwrap_or(self.r)
    }

    /// Alpha of module `path` (after `alpha_pattern`).
    pub fn alpha_for(&self, path: &str) -> f64 {
        lookup(&self.alpha_pattern, path)
            .copied()
            .unwrap_or(self.lora_alpha)
    }

    /// LoRA scaling of module `path`.
    pub fn scaling_for(&self, path: &str) -> f64 {
        lora_scaling(self.alpha_for(path), self.rank_for(path), self.use_rslora)
    }

    /// Whether IA3 module `path` is input-side.
    pub fn is_feedforward(&self, path: &str) -> bool {
        self.feedforward_modules
            .iter()
            .any(|p| pattern_matches(p, path))
    }
}

fn read_folder(dir: &Path) -> Result<(PeftConfig, TensorFile)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::peft(
                &cfg_path,
                "missing; a PEFT adapter folder needs adapter_config.json",
            )
        } else {
            Error::io(&cfg_path, e)
        }
    })?;
    let config = PeftConfig::from_json(&text, &cfg_path)?;
    let w_path = dir.join(WEIGHTS_FILE);
    if !w_path.exists() {
        return Err(Error::peft(
            &w_path,
            "missing; modula reads adapter_model.safetensors (convert .bin files with PEFT first)",
        ));
    }
    Ok((config, TensorFile::open(&w_path)?))
}

/// Splits `base_model.model.<path>.<part>` into `(path, part)` for the known parts.
fn split_key<'a>(key: &'a str, parts: &[&'a str]) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    parts.iter().find_map(|part| {
        rest.strip_suffix(part)
            .and_then(|p| p.strip_suffix('.'))
            .map(|p| (p, *part))
    })
}

/// A LoRA adapter read from (or to be written as) a PEFT folder: one [`LoraModule`] per
/// module path.
#[derive(Debug)]
pub struct PeftLora {
    /// The config (defaults for saving, patterns for per-module rank/alpha).
    pub config: PeftConfig,
    /// The adapters by module path (`fc1`, `model.layers.0.self_attn.q_proj`, ...).
    pub modules: BTreeMap<String, LoraModule>,
    /// The module paths that adapt an embedding table (PEFT's `lora_embedding_A/B` keys).
    pub embeddings: BTreeSet<String>,
    /// Where it was loaded from, if anywhere.
    pub source: Option<PathBuf>,
}

/// Reads and validates a PEFT LoRA folder and calls `f(config, path, lora_A, lora_B)` for each
/// adapted module, with A `[r, in]` and B `[out, r]` already checked 2-D and of the config's
/// rank (PyTorch layout). Returns the config and the paths that adapt embedding tables. The one
/// parser behind [`PeftLora::load`] (device tensors) and [`LoraExpert::load_peft`] (host
/// factors, no device).
fn read_lora_folder<F>(dir: &Path, mut f: F) -> Result<(PeftConfig, BTreeSet<String>)>
where
    F: FnMut(&PeftConfig, &str, &HostTensor, &HostTensor) -> Result<()>,
{
    let (config, file) = read_folder(dir)?;
    let w_path = file.path().to_path_buf();
    if config.peft_type != PeftType::Lora {
        return Err(Error::peft(
            dir,
            "this is an IA3 adapter; load it with PeftIa3::load",
        ));
    }
    let mut halves: BTreeMap<String, (Option<&HostTensor>, Option<&HostTensor>)> = BTreeMap::new();
    let mut embeddings = BTreeSet::new();
    let parts = [
        "lora_A.weight",
        "lora_B.weight",
        "lora_embedding_A",
        "lora_embedding_B",
    ];
    for (key, t) in file.tensors() {
        let Some((path, part)) = split_key(key, &parts) else {
            let why = if key.contains("lora_magnitude_vector") {
                format!("tensor `{key}` belongs to DoRA, which modula does not support")
            } else {
                format!(
                    "unexpected tensor `{key}`; expected `<module>.lora_A.weight` / `.lora_B.weight` (or `.lora_embedding_A` / `.lora_embedding_B`)"
                )
            };
            return Err(Error::peft(&w_path, why));
        };
        if part.starts_with("lora_embedding") {
            embeddings.insert(path.to_string());
        }
        let entry = halves.entry(path.to_string()).or_default();
        if part == "lora_A.weight" || part == "lora_embedding_A" {
            entry.0 = Some(t);
        } else {
            entry.1 = Some(t);
        }
    }
    if halves.is_empty() {
        return Err(Error::peft(&w_path, "contains no LoRA tensors"));
    }
    for (path, (a, b)) in halves {
        let (Some(a), Some(b)) = (a, b) else {
            return Err(Error::peft(
                &w_path,
                format!("module `{path}` has only one of lora_A / lora_B; the file is incomplete"),
            ));
        };
        let r = config.rank_for(&path);
        let ok = a.shape.len() == 2 && b.shape.len() == 2 && a.shape[0] == r && b.shape[1] == r;
        if !ok {
            return Err(Error::peft(
                &w_path,
                format!(
                    "module `{path}`: lora_A {:?} and lora_B {:?} disagree with the config's rank {r} (expected [{r}, in] and [out, {r}]); check r / rank_pattern",
                    a.shape, b.shape
                ),
            ));
        }
        f(&config, &path, a, b)?;
    }
    Ok((config, embeddings))
}

impl PeftLora {
    /// Loads a PEFT LoRA folder onto `device`.
    ///
    /// # Errors
    /// [`Error::Peft`] for a missing or invalid config, a non-LoRA adapter, unknown tensor
    /// keys, a missing `lora_A`/`lora_B` half, or factor shapes that disagree with the config's
    /// rank; [`Error::SafeTensors`] for a truncated weights file.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let mut modules = BTreeMap::new();
        let (config, embeddings) = read_lora_folder(dir, |config, path, a, b| {
            let adapter = LoraModule::from_factors(
                a.to_tensor::<2>(device)?.transpose(),
                b.to_tensor::<2>(device)?.transpose(),
                config.alpha_for(path),
                config.use_rslora,
                config.lora_dropout,
            )?;
            modules.insert(path.to_string(), adapter);
            Ok(())
        })?;
        Ok(Self {
            config,
            modules,
            embeddings,
            source: Some(dir.to_path_buf()),
        })
    }

    /// A new, empty PEFT LoRA with the given defaults (modules added with
    /// [`insert`](Self::insert)).
    pub fn new(r: usize, lora_alpha: f64, use_rslora: bool) -> Self {
        let text = json!({"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora})
            .to_string();
        let config = PeftConfig::from_json(&text, "<new>").unwrap_or_else(|_| unreachable!());
        Self {
            config,
            modules: BTreeMap::new(),
            embeddings: BTreeSet::new(),
            source: None,
        }
    }

    /// Adds (or replaces) the adapter of the linear module `path`.
    pub fn insert(&mut self, path: &str, adapter: LoraModule) {
        self.embeddings.remove(path);
        self.modules.insert(path.to_string(), adapter);
    }

    /// Adds (or replaces) the adapter of the embedding module `path`.
    pub fn insert_embedding(&mut self, path: &str, adapter: LoraModule) {
        self.embeddings.insert(path.to_string());
        self.modules.insert(path.to_string(), adapter);
    }

    /// The module paths.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.modules.keys().map(String::as_str)
    }

    /// The adapter for module `path`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] naming the paths the folder has.
    pub fn get(&self, path: &str) -> Result<&LoraModule> {
        self.modules.get(path).ok_or_else(|| Error::UnknownAdapter {
            name: path.to_string(),
            scope: Scope::PeftLora,
            known: self.modules.keys().cloned().collect(),
        })
    }

    /// Inserts a copy of module `path`'s adapter into `layer` under `name`.
    ///
    /// # Errors
    /// Unknown path, duplicate name, or widths that differ from the layer's.
    pub fn attach(&self, path: &str, layer: &mut LoraLinear, name: &str) -> Result<()> {
        layer.insert_adapter(name, self.get(path)?.clone())
    }

    /// Inserts a copy of embedding module `path`'s adapter into `layer` under `name`.
    ///
    /// # Errors
    /// Unknown path, a path that is not an embedding, duplicate name, or wrong widths.
    pub fn attach_embedding(
        &self,
        path: &str,
        layer: &mut LoraEmbedding,
        name: &str,
    ) -> Result<()> {
        let adapter = self.get(path)?;
        if !self.embeddings.contains(path) {
            return Err(Error::invalid(
                "PEFT module kind",
                format!("`{path}` adapts a Linear layer; attach it to a LoraLinear"),
            ));
        }
        layer.insert_adapter(name, adapter.clone())
    }

    /// Writes the adapter as a PEFT folder (created if needed) that PEFT 0.21 loads with
    /// identical outputs. Per-module ranks and alphas that differ from the defaults go to
    /// `rank_pattern` / `alpha_pattern` as exact paths.
    ///
    /// # Errors
    /// [`Error::Invalid`] if the adapters disagree on rsLoRA; [`Error::Io`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if self.modules.is_empty() {
            return Err(Error::invalid(
                "PEFT LoRA save",
                "there are no modules to save",
            ));
        }
        let use_rslora = self.config.use_rslora;
        let mut tensors = BTreeMap::new();
        let mut rank_pattern = Map::new();
        let mut alpha_pattern = Map::new();
        let (r0, a0) = (self.config.r, self.config.lora_alpha);
        for (path, ad) in &self.modules {
            if ad.use_rslora != use_rslora {
                return Err(Error::invalid(
                    "PEFT LoRA save",
                    format!(
                        "module `{path}` has use_rslora={} but the config says {use_rslora}; PEFT has one setting per adapter",
                        ad.use_rslora
                    ),
                ));
            }
            if ad.rank() != r0 {
                rank_pattern.insert(format!("^{}$", regex::escape(path)), json!(ad.rank()));
            }
            if ad.alpha != a0 {
                alpha_pattern.insert(format!("^{}$", regex::escape(path)), py_number(ad.alpha));
            }
            let (ka, kb) = if self.embeddings.contains(path) {
                ("lora_embedding_A", "lora_embedding_B")
            } else {
                ("lora_A.weight", "lora_B.weight")
            };
            tensors.insert(
                format!("{KEY_PREFIX}{path}.{ka}"),
                HostTensor::from_tensor(ad.a.val().transpose()),
            );
            tensors.insert(
                format!("{KEY_PREFIX}{path}.{kb}"),
                HostTensor::from_tensor(ad.b.val().transpose()),
            );
        }
        let mut doc = lora_config_template();
        for (k, v) in &self.config.raw {
            doc.insert(k.clone(), v.clone());
        }
        let targets: Vec<&str> = self.paths().collect();
        doc.insert("peft_type".into(), json!("LORA"));
        doc.insert("r".into(), json!(r0));
        doc.insert("lora_alpha".into(), py_number(a0));
        doc.insert("use_rslora".into(), json!(use_rslora));
        doc.insert("rank_pattern".into(), Value::Object(rank_pattern));
        doc.insert("alpha_pattern".into(), Value::Object(alpha_pattern));
        doc.insert("target_modules".into(), json!(targets));
        doc.insert("inference_mode".into(), json!(true));
        write_folder(dir, doc, &tensors)
    }
}

/// An IA3 adapter read from (or to be written as) a PEFT folder.
#[derive(Debug)]
pub struct PeftIa3 {
    /// The config.
    pub config: PeftConfig,
    /// Per module path: the vector `l` (`[n]`) and whether it is input-side.
    pub modules: BTreeMap<String, (Tensor<1>, bool)>,
}

impl PeftIa3 {
    /// Loads a PEFT IA3 folder onto `device`.
    ///
    /// # Errors
    /// [`Error::Peft`] for a non-IA3 adapter, unknown keys, or a vector whose shape does not
    /// match its placement (`[out, 1]` output-side, `[1, in]` for `feedforward_modules`).
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let (config, file) = read_folder(dir)?;
        let w_path = file.path().to_path_buf();
        if config.peft_type != PeftType::Ia3 {
            return Err(Error::peft(
                dir,
                "this is a LoRA adapter; load it with PeftLora::load",
            ));
        }
        let mut modules = BTreeMap::new();
        for (key, t) in file.tensors() {
            let Some((path, _)) = split_key(key, &["ia3_l"]) else {
                return Err(Error::peft(
                    &w_path,
                    format!("unexpected tensor `{key}`; expected `<module>.ia3_l`"),
                ));
            };
            let ff = config.is_feedforward(path);
            let ok = t.shape.len() == 2 && if ff { t.shape[0] == 1 } else { t.shape[1] == 1 };
            if !ok {
                return Err(Error::peft(
                    &w_path,
                    format!(
                        "module `{path}`: ia3_l has shape {:?}, expected {} ({} module)",
                        t.shape,
                        if ff { "[1, in]" } else { "[out, 1]" },
                        if ff {
                            "a feedforward"
                        } else {
                            "an output-side"
                        }
                    ),
                ));
            }
            let n = t.data.len();
            let v = HostTensor {
                shape: vec![n],
                data: t.data.clone(),
            }
            .to_tensor::<1>(device)?;
            modules.insert(path.to_string(), (v, ff));
        }
        if modules.is_empty() {
            return Err(Error::peft(&w_path, "contains no ia3_l tensors"));
        }
        Ok(Self { config, modules })
    }

    /// Wraps `base` (the frozen layer at module `path`) with this adapter's vector.
    ///
    /// # Errors
    /// Unknown path, or a vector length that does not fit the layer.
    pub fn apply(&self, path: &str, base: burn::nn::Linear) -> Result<Ia3Linear> {
        let (v, ff) = self
            .modules
            .get(path)
            .ok_or_else(|| Error::UnknownAdapter {
                name: path.to_string(),
                scope: Scope::PeftIa3,
                known: self.modules.keys().cloned().collect(),
            })?;
        Ia3Linear::with_scale(base, v.clone(), *ff)
    }

    /// Builds a PEFT IA3 adapter from layers by module path.
    pub fn from_layers<'a>(layers: impl IntoIterator<Item = (&'a str, &'a Ia3Linear)>) -> Self {
        let mut modules = BTreeMap::new();
        let mut ff = Vec::new();
        for (path, l) in layers {
            if l.feedforward {
                ff.push(path.to_string());
            }
            modules.insert(path.to_string(), (l.scale.val(), l.feedforward));
        }
        let text = json!({"peft_type": "IA3", "feedforward_modules": ff}).to_string();
        let config = PeftConfig::from_json(&text, "<new>").unwrap_or_else(|_| unreachable!());
        Self { config, modules }
    }

    /// Writes the adapter as a PEFT IA3 folder.
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let mut tensors = BTreeMap::new();
        let mut ff = Vec::new();
        for (path, (v, is_ff)) in &self.modules {
            let mut h = HostTensor::from_tensor(v.clone());
            let n = h.data.len();
            h.shape = if *is_ff { vec![1, n] } else { vec![n, 1] };
            if *is_ff {
                ff.push(path.clone());
            }
            tensors.insert(format!("{KEY_PREFIX}{path}.ia3_l"), h);
        }
        let mut doc = Map::new();
        for (k, v) in [
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", Value::Null),
            ("exclude_modules", Value::Null),
            ("fan_in_fan_out", json!(false)),
            ("inference_mode", json!(true)),
            ("init_ia3_weights", json!(true)),
            ("modules_to_save", Value::Null),
            ("revision", Value::Null),
            ("task_type", Value::Null),
        ] {
            doc.insert(k.into(), v);
        }
        for (k, v) in &self.config.raw {
            doc.insert(k.clone(), v.clone());
        }
        let targets: Vec<&String> = self.modules.keys().collect();
        doc.insert("peft_type".into(), json!("IA3"));
        doc.insert("peft_version".into(), json!(PEFT_VERSION));
        doc.insert("target_modules".into(), json!(targets));
        doc.insert("feedforward_modules".into(), json!(ff));
        write_folder(dir.as_ref(), doc, &tensors)
    }
}

/// Either kind of adapter, as found in a folder.
#[derive(Debug)]
pub enum PeftAdapter {
    /// A LoRA adapter.
    Lora(PeftLora),
    /// An IA3 adapter.
    Ia3(PeftIa3),
}

impl PeftAdapter {
    /// Loads whatever adapter `dir` holds.
    ///
    /// # Errors
    /// As [`PeftLora::load`] / [`PeftIa3::load`].
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        match PeftConfig::from_json(&text, &cfg_path)?.peft_type {
            PeftType::Lora => PeftLora::load(dir, device).map(Self::Lora),
            PeftType::Ia3 => PeftIa3::load(dir, device).map(Self::Ia3),
        }
    }
}

/// A number as Python's `json` writes it: integral values without a fraction (`8`, not `8.0`),
/// so a re-saved config is identical to the one PEFT wrote.
fn py_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

fn lora_config_template() -> Map<String, Value> {
    let mut m = Map::new();
    for (k, v) in [
        ("alora_invocation_tokens", Value::Null),
        ("alpha_pattern", json!({})),
        ("arrow_config", Value::Null),
        ("auto_mapping", Value::Null),
        ("base_model_name_or_path", Value::Null),
        ("bias", json!("none")),
        ("corda_config", Value::Null),
        ("ensure_weight_tying", json!(false)),
        ("eva_config", Value::Null),
        ("exclude_modules", Value::Null),
        ("fan_in_fan_out", json!(false)),
        ("inference_mode", json!(true)),
        ("init_lora_weights", json!(true)),
        ("layer_replication", Value::Null),
        ("layers_pattern", Value::Null),
        ("layers_to_transform", Value::Null),
        ("loftq_config", json!({})),
        ("lora_bias", json!(false)),
        ("lora_dropout", json!(0.0)),
        ("megatron_config", Value::Null),
        ("megatron_core", json!("megatron.core")),
        ("modules_to_save", Value::Null),
        ("peft_version", json!(PEFT_VERSION)),
        ("rank_pattern", json!({})),
        ("revision", Value::Null),
        ("target_parameters", Value::Null),
        ("task_type", Value::Null),
        ("trainable_token_indices", Value::Null),
        ("use_dora", json!(false)),
        ("use_qalora", json!(false)),
    ] {
        m.insert(k.into(), v);
    }
    m
}

fn write_folder(
    dir: &Path,
    doc: Map<String, Value>,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_safetensors(dir.join(WEIGHTS_FILE), tensors, None)?;
    let cfg_path = dir.join(CONFIG_FILE);
    let text = serde_json::to_string_pretty(&Value::Object(doc)).map_err(|e| Error::Json {
        path: cfg_path.clone(),
        source: e,
    })?;
    atomic_write(&cfg_path, text.as_bytes())
}

/// Conversions between a PEFT LoRA and the library's host factors. They live here, in the
/// file-format layer, so the library's math never knows the PEFT format.
impl LoraExpert {
    /// Reads a PEFT LoRA folder straight into host factors, without a device: what the
    /// offline operations (merging, Arrow prototypes, MBC) start from.
    ///
    /// # Errors
    /// As [`PeftLora::load`], and [`Error::Invalid`] if the adapter adapts an embedding table
    /// (library operations cover linear layers).
    pub fn load_peft(dir: impl AsRef<Path>) -> Result<Self> {
        let mut layers = BTreeMap::new();
        let (_, embeddings) = read_lora_folder(dir.as_ref(), |config, path, a, b| {
            let factors = LoraFactors::new(
                Mat::from_f32(a.shape[0], a.shape[1], &a.data),
                Mat::from_f32(b.shape[0], b.shape[1], &b.data),
                config.scaling_for(path),
            )?;
            layers.insert(path.to_string(), factors);
            Ok(())
        })?;
        if let Some(e) = embeddings.iter().next() {
            return Err(Error::invalid(
                "library expert",
                format!(
                    "module `{e}` adapts an embedding table; library operations cover Linear layers only"
                ),
            ));
        }
        Ok(Self { layers })
    }

    /// Host copies of a PEFT LoRA's linear modules.
    ///
    /// # Errors
    /// [`Error::Invalid`] if the adapter adapts an embedding table (library operations cover
    /// linear layers).
    pub fn from_peft(peft: &PeftLora) -> Result<Self> {
        if let Some(e) = peft.embeddings.iter().next() {
            return Err(Error::invalid(
                "library expert",
                format!(
                    "module `{e}` adapts an embedding table; library operations cover Linear layers only"
                ),
            ));
        }
        Ok(Self {
            layers: peft
                .modules
                .iter()
                .map(|(p, a)| (p.clone(), LoraFactors::from_adapter(a)))
                .collect(),
        })
    }

    /// A PEFT LoRA with the same updates (per-module ranks go to `rank_pattern` when saved).
    /// The config's default rank is the most common one and `lora_alpha` is chosen per module
    /// so that `alpha/r` equals each layer's scaling.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an expert with no layers.
    pub fn to_peft(&self, device: &Device) -> Result<PeftLora> {
        let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
        for f in self.layers.values() {
            *counts.entry(f.rank()).or_default() += 1;
        }
        let Some((&r0, _)) = counts
            .iter()
            .max_by_key(|(r, c)| (**c, std::cmp::Reverse(**r)))
        else {
            return Err(Error::invalid("library expert", "it has no layers"));
        };
        let s0 = self
            .layers
            .values()
            .find(|f| f.rank() == r0)
            .map_or(1.0, |f| f.scaling);
        let mut peft = PeftLora::new(r0, s0 * r0 as f64, false);
        for (path, f) in &self.layers {
            peft.insert(path, f.to_adapter(device)?);
        }
        Ok(peft)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_paths_or_dotted_suffixes() {
        assert!(pattern_matches("fc1", "fc1"));
        assert!(pattern_matches("q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(!pattern_matches("proj", "model.layers.0.self_attn.q_proj"));
        assert!(pattern_matches(r"layers\.[01]\.mlp", "model.layers.1.mlp"));
        assert!(!pattern_matches(r"layers\.[01]\.mlp", "model.layers.2.mlp"));
        assert!(!pattern_matches("(unclosed", "x.(unclosed2"));
    }

    #[test]
    fn keys_split_into_module_path_and_part() {
        let parts = ["lora_A.weight", "lora_B.weight"];
        assert_eq!(
            split_key("base_model.model.enc.fc1.lora_A.weight", &parts),
            Some(("enc.fc1", "lora_A.weight"))
        );
        assert_eq!(split_key("base_model.model.fc1.bias", &parts), None);
    }

    #[test]
    fn rank_and_alpha_patterns_override_defaults() {
        let text = r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": true,
            "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 2}}"#;
        let c = PeftConfig::from_json(text, "cfg").unwrap();
        assert_eq!((c.rank_for("a.q_proj"), c.alpha_for("a.q_proj")), (8, 16.0));
        assert_eq!((c.rank_for("a.v_proj"), c.alpha_for("a.v_proj")), (4, 2.0));
        assert_eq!(c.scaling_for("a.v_proj"), 1.0); // rsLoRA: 2 / sqrt(4)
    }
}
