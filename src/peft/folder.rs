//! Reading and writing a PEFT folder: `adapter_config.json` and `adapter_model.safetensors`
//! (atomic writes).

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value, json};

use super::config::PeftConfig;
use super::{CONFIG_FILE, PEFT_VERSION, WEIGHTS_FILE};
use crate::error::{Error, Result};
use crate::io::{HostTensor, TensorFile, atomic_write, write_dir_atomically, write_safetensors};

/// Reads a folder's config and opens its weights.
pub(super) fn read_folder(dir: &Path) -> Result<(PeftConfig, TensorFile)> {
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

/// A number as Python's `json` writes it: integral values without a fraction (`8`, not `8.0`),
/// so a re-saved config is identical to the one PEFT wrote.
pub(super) fn py_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The per-module rank and alpha overrides PEFT writes (`rank_pattern`, `alpha_pattern`): an
/// anchored pattern for each module whose rank or alpha differs from the config's defaults.
/// The one builder behind the LoRA and the LoHa / LoKr writers.
pub(super) struct Patterns {
    defaults: (usize, f64),
    rank: Map<String, Value>,
    alpha: Map<String, Value>,
}

impl Patterns {
    /// No overrides yet against the defaults `r` and `alpha`.
    pub(super) fn new(r: usize, alpha: f64) -> Self {
        Self {
            defaults: (r, alpha),
            rank: Map::new(),
            alpha: Map::new(),
        }
    }

    /// Records module `path`'s rank and alpha where they differ from the defaults.
    pub(super) fn add(&mut self, path: &str, rank: usize, alpha: f64) {
        let key = || format!("^{}$", regex::escape(path));
        if rank != self.defaults.0 {
            self.rank.insert(key(), json!(rank));
        }
        if alpha != self.defaults.1 {
            self.alpha.insert(key(), py_number(alpha));
        }
    }

    /// Writes `r`, the alpha under `alpha_key` and both patterns into `doc`.
    pub(super) fn write(self, doc: &mut Map<String, Value>, alpha_key: &str) {
        doc.insert("r".into(), json!(self.defaults.0));
        doc.insert(alpha_key.into(), py_number(self.defaults.1));
        doc.insert("rank_pattern".into(), Value::Object(self.rank));
        doc.insert("alpha_pattern".into(), Value::Object(self.alpha));
    }
}

/// The keys PEFT 0.21 writes for a LoRA, with its defaults.
pub(super) fn lora_config_template() -> Map<String, Value> {
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

/// Writes a config document and its tensors into `dir`, as one atomic folder write
/// ([`write_dir_atomically`]: a kill leaves the old folder or the new one, never new weights
/// beside an old config).
pub(super) fn write_folder(
    dir: &Path,
    doc: Map<String, Value>,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<()> {
    let text = serde_json::to_string_pretty(&Value::Object(doc)).map_err(|e| Error::Json {
        path: dir.join(CONFIG_FILE),
        source: e,
    })?;
    write_dir_atomically(dir, true, |tmp| {
        write_safetensors(tmp.join(WEIGHTS_FILE), tensors, None)?;
        atomic_write(&tmp.join(CONFIG_FILE), text.as_bytes())
    })
}
