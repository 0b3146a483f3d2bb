//! PEFT prompt-tuning folders (`peft_type` `PROMPT_TUNING`): `prompt_embeddings: [P, d]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::{Map, Value, json};

use super::config::{PeftConfig, PeftType};
use super::folder::{read_folder, write_folder};
use super::{PEFT_VERSION, expect_type};
use crate::error::{Error, Result};
use crate::io::HostTensor;
use crate::modules::prompt::PromptEmbedding;

/// The one tensor of a prompt-tuning folder.
const KEY: &str = "prompt_embeddings";

/// A prompt-tuning adapter read from (or to be written as) a PEFT folder.
#[derive(Debug)]
pub struct PeftPrompt {
    /// The config (`num_virtual_tokens`, `token_dim`, `task_type`, …).
    pub config: PeftConfig,
    /// The soft tokens.
    pub prompt: PromptEmbedding,
    /// Where it was loaded from, if anywhere.
    pub source: Option<PathBuf>,
}

impl PeftPrompt {
    /// Loads a PEFT prompt-tuning folder onto `device`.
    ///
    /// # Errors
    /// [`Error::Peft`] for a missing or invalid config, another adapter type, a missing or
    /// extra tensor, or a `prompt_embeddings` whose shape disagrees with
    /// `num_virtual_tokens` / `token_dim`.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let (config, file) = read_folder(dir)?;
        let w_path = file.path().to_path_buf();
        expect_type(&config, PeftType::PromptTuning, dir)?;
        if let Some(extra) = file.tensors().keys().find(|k| *k != KEY) {
            return Err(Error::peft(
                &w_path,
                format!("unexpected tensor `{extra}`; a prompt-tuning folder holds `{KEY}` only"),
            ));
        }
        let t = file.get(KEY).map_err(|_| {
            Error::peft(&w_path, format!("missing `{KEY}`; the file is incomplete"))
        })?;
        let p = config.num_virtual_tokens;
        let token_dim = config.raw.get("token_dim").and_then(Value::as_u64);
        let ok = t.shape.len() == 2
            && t.shape[0] == p
            && token_dim.is_none_or(|d| d as usize == t.shape[1]);
        if !ok {
            return Err(Error::peft(
                &w_path,
                format!(
                    "`{KEY}` has shape {:?}, but the config says num_virtual_tokens = {p}, token_dim = {}",
                    t.shape,
                    token_dim.map_or("unset".to_string(), |d| d.to_string())
                ),
            ));
        }
        Ok(Self {
            config,
            prompt: PromptEmbedding::from_tensor(t.to_tensor::<2>(device)?),
            source: Some(dir.to_path_buf()),
        })
    }

    /// A PEFT prompt-tuning adapter for a causal LM holding `prompt`.
    pub fn new(prompt: PromptEmbedding) -> Self {
        let text = json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": prompt.len(),
            "token_dim": prompt.width(), "task_type": "CAUSAL_LM", "num_transformer_submodules": 1})
        .to_string();
        let config = PeftConfig::from_json(&text, "<new>")
            .unwrap_or_else(|e| unreachable!("a generated config parses: {e}"));
        Self {
            config,
            prompt,
            source: None,
        }
    }

    /// Writes the adapter as a PEFT folder (`num_virtual_tokens` and `token_dim` from the
    /// prompt; the config's other keys kept).
    ///
    /// # Errors
    /// [`Error::Io`].
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let mut doc = Map::new();
        for (k, v) in [
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", Value::Null),
            ("modules_to_save", Value::Null),
            ("num_attention_heads", Value::Null),
            ("num_layers", Value::Null),
            ("num_transformer_submodules", json!(1)),
            ("prompt_tuning_init", json!("RANDOM")),
            ("prompt_tuning_init_text", Value::Null),
            ("revision", Value::Null),
            ("task_type", json!("CAUSAL_LM")),
            ("tokenizer_kwargs", Value::Null),
            ("tokenizer_name_or_path", Value::Null),
        ] {
            doc.insert(k.into(), v);
        }
        for (k, v) in &self.config.raw {
            doc.insert(k.clone(), v.clone());
        }
        doc.insert("peft_type".into(), json!("PROMPT_TUNING"));
        doc.insert("peft_version".into(), json!(PEFT_VERSION));
        doc.insert("num_virtual_tokens".into(), json!(self.prompt.len()));
        doc.insert("token_dim".into(), json!(self.prompt.width()));
        doc.insert("inference_mode".into(), json!(true));
        let mut tensors = BTreeMap::new();
        tensors.insert(
            KEY.to_string(),
            HostTensor::from_tensor(self.prompt.weight.val()),
        );
        write_folder(dir.as_ref(), doc, &tensors)
    }
}
