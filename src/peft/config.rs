//! `adapter_config.json`: the keys modula interprets (read with serde), the per-module rank
//! and alpha patterns, and the settings modula refuses.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::modules::lora::lora_scaling;

/// The adapter methods modula reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeftType {
    /// `"LORA"`.
    #[serde(rename = "LORA")]
    Lora,
    /// `"IA3"`.
    #[serde(rename = "IA3")]
    Ia3,
    /// `"LOHA"` (Hadamard product of low-rank pairs).
    #[serde(rename = "LOHA")]
    Loha,
    /// `"LOKR"` (Kronecker product).
    #[serde(rename = "LOKR")]
    Lokr,
    /// `"PROMPT_TUNING"` (soft tokens before the input).
    #[serde(rename = "PROMPT_TUNING")]
    PromptTuning,
}

impl PeftType {
    /// The name PEFT writes in `peft_type`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "LORA",
            Self::Ia3 => "IA3",
            Self::Loha => "LOHA",
            Self::Lokr => "LOKR",
            Self::PromptTuning => "PROMPT_TUNING",
        }
    }
}

/// The parts of an `adapter_config.json` modula uses, plus the whole document so that saving
/// keeps keys it does not interpret.
#[derive(Clone, Debug)]
pub struct PeftConfig {
    /// Method.
    pub peft_type: PeftType,
    /// Default rank `r` (LoRA, LoHa, LoKr).
    pub r: usize,
    /// Default alpha: LoRA's `lora_alpha`, LoHa's and LoKr's `alpha`.
    pub lora_alpha: f64,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// LoRA dropout probability.
    pub lora_dropout: f64,
    /// Host weights stored `[in, out]` (GPT-2 `Conv1D`).
    pub fan_in_fan_out: bool,
    /// Per-module rank overrides (pattern → r), in the file's order: as in PEFT, the first
    /// pattern that matches a module decides.
    pub rank_pattern: Vec<(String, usize)>,
    /// Per-module alpha overrides (pattern → alpha), in the file's order (first match wins).
    pub alpha_pattern: Vec<(String, f64)>,
    /// Target module names or a regex, as written.
    pub target_modules: Value,
    /// IA3 input-side modules.
    pub feedforward_modules: Vec<String>,
    /// LoKr `decompose_both` (factor the left Kronecker factor too).
    pub decompose_both: bool,
    /// LoKr `decompose_factor` (`-1`: near the square root).
    pub decompose_factor: i64,
    /// Prompt tuning: `num_virtual_tokens` (0 for other methods).
    pub num_virtual_tokens: usize,
    /// The full JSON document.
    pub raw: Map<String, Value>,
}

pub(super) fn pattern_matches(pattern: &str, path: &str) -> bool {
    if pattern == path || path.ends_with(&format!(".{pattern}")) {
        return true;
    }
    regex::Regex::new(&format!("^(?:.*\\.)?(?:{pattern})$"))
        .map(|re| re.is_match(path))
        .unwrap_or(false)
}

/// The value of the first pattern matching `path` (PEFT's `get_pattern_key`).
fn lookup<'a, T>(patterns: &'a [(String, T)], path: &str) -> Option<&'a T> {
    patterns
        .iter()
        .find(|(p, _)| pattern_matches(p, path))
        .map(|(_, v)| v)
}

/// The keys of `adapter_config.json` modula interprets, as serde reads them (`null` and a
/// missing key both read as `None`). Every other key is kept in [`PeftConfig::raw`] and written
/// back unchanged.
#[derive(Deserialize)]
struct Keys {
    #[serde(default)]
    r: Option<Positive>,
    #[serde(default)]
    lora_alpha: Option<f64>,
    #[serde(default)]
    alpha: Option<f64>,
    #[serde(default)]
    decompose_both: Option<bool>,
    #[serde(default)]
    decompose_factor: Option<i64>,
    #[serde(default)]
    num_virtual_tokens: Option<Positive>,
    #[serde(default)]
    num_transformer_submodules: Option<usize>,
    #[serde(default)]
    use_rslora: Option<bool>,
    #[serde(default)]
    lora_dropout: Option<f64>,
    #[serde(default)]
    fan_in_fan_out: Option<bool>,
    #[serde(default)]
    use_dora: Option<bool>,
    #[serde(default)]
    lora_bias: Option<bool>,
    #[serde(default)]
    use_qalora: Option<bool>,
    #[serde(default)]
    bias: Option<Value>,
    #[serde(default)]
    rank_pattern: Option<Ordered<Positive>>,
    #[serde(default)]
    alpha_pattern: Option<Ordered<f64>>,
    #[serde(default)]
    target_modules: Value,
    #[serde(default)]
    feedforward_modules: Option<Names>,
    #[serde(default)]
    modules_to_save: Value,
    #[serde(default)]
    layer_replication: Value,
    #[serde(default)]
    alora_invocation_tokens: Value,
    #[serde(default)]
    trainable_token_indices: Value,
    #[serde(default)]
    target_parameters: Value,
}

/// A JSON object's entries in the document's order (serde_json's `Map` sorts its keys).
struct Ordered<T>(Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of module patterns")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A positive integer (a rank), with PEFT-specific wording when it is not one.
struct Positive(usize);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        v.as_u64()
            .filter(|&n| n > 0)
            .map(|n| Positive(n as usize))
            .ok_or_else(|| serde::de::Error::custom(format!("must be a positive integer, got {v}")))
    }
}

/// A module name or a list of them (PEFT accepts both).
enum Names {
    One(String),
    Many(Vec<String>),
}

impl<'de> Deserialize<'de> for Names {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        let names = match &v {
            Value::String(s) => Some(Names::One(s.clone())),
            Value::Array(a) => a
                .iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .map(Names::Many),
            _ => None,
        };
        names.ok_or_else(|| {
            serde::de::Error::custom(format!(
                "must be a module name or a list of module names, got {v}"
            ))
        })
    }
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
        const KNOWN: &str = "LORA, IA3, LOHA, LOKR and PROMPT_TUNING";
        let peft_type = match raw.get("peft_type").and_then(Value::as_str) {
            Some("LORA") => PeftType::Lora,
            Some("IA3") => PeftType::Ia3,
            Some("LOHA") => PeftType::Loha,
            Some("LOKR") => PeftType::Lokr,
            Some("PROMPT_TUNING") => PeftType::PromptTuning,
            Some(other) => {
                return Err(bad(format!(
                    "peft_type `{other}` is not supported; modula reads {KNOWN} adapters"
                )));
            }
            None => return Err(bad(format!("missing string key `peft_type` ({KNOWN})"))),
        };
        // The error names the key: "fan_in_fan_out: invalid type: string \"yes\", expected a
        // boolean". Read from the text, not from `raw`, whose map sorts the keys: the patterns
        // keep the file's order.
        let keys: Keys =
            serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text))
                .map_err(|e| bad(e.to_string()))?;
        let mut cfg = PeftConfig {
            peft_type,
            r: 8,
            lora_alpha: 8.0,
            use_rslora: false,
            lora_dropout: 0.0,
            fan_in_fan_out: keys.fan_in_fan_out.unwrap_or(false),
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            target_modules: keys.target_modules,
            feedforward_modules: Vec::new(),
            decompose_both: keys.decompose_both.unwrap_or(false),
            decompose_factor: keys.decompose_factor.unwrap_or(-1),
            num_virtual_tokens: 0,
            raw,
        };
        match peft_type {
            PeftType::Lora => {
                cfg.r = keys.r.map(|r| r.0).ok_or_else(|| {
                    bad("missing key `r` (the LoRA rank, a positive integer)".into())
                })?;
                cfg.lora_alpha = keys
                    .lora_alpha
                    .ok_or_else(|| bad("missing key `lora_alpha` (a number)".into()))?;
                cfg.use_rslora = keys.use_rslora.unwrap_or(false);
                cfg.lora_dropout = keys.lora_dropout.unwrap_or(0.0);
                if !(0.0..1.0).contains(&cfg.lora_dropout) {
                    return Err(bad(format!(
                        "`lora_dropout` {} is outside [0, 1)",
                        cfg.lora_dropout
                    )));
                }
                for (on, what) in [
                    (keys.use_dora, "DoRA (use_dora)"),
                    (keys.lora_bias, "LoRA bias terms (lora_bias)"),
                    (keys.use_qalora, "QA-LoRA (use_qalora)"),
                ] {
                    if on == Some(true) {
                        return Err(bad(format!(
                            "{what} is not supported by modula; re-train without it or merge it with PEFT first"
                        )));
                    }
                }
                if let Some(Value::String(b)) = &keys.bias
                    && b != "none"
                {
                    return Err(bad(format!(
                        "bias=\"{b}\" trains bias terms, which modula does not load; use bias=\"none\""
                    )));
                }
            }
            PeftType::Loha | PeftType::Lokr => {
                // PEFT's LoHaConfig / LoKrConfig defaults: r = 8, alpha = 8.
                cfg.r = keys.r.map_or(8, |r| r.0);
                cfg.lora_alpha = keys.alpha.unwrap_or(8.0);
                if !cfg.lora_alpha.is_finite() {
                    return Err(bad(format!("`alpha` {} is not finite", cfg.lora_alpha)));
                }
            }
            PeftType::PromptTuning => {
                cfg.num_virtual_tokens = keys.num_virtual_tokens.map(|n| n.0).ok_or_else(|| {
                    bad("missing key `num_virtual_tokens` (a positive integer)".into())
                })?;
                if let Some(n) = keys.num_transformer_submodules
                    && n != 1
                {
                    return Err(bad(format!(
                        "num_transformer_submodules is {n}: prompts for encoder-decoder models are not supported; modula serves decoder-only and encoder models (1)"
                    )));
                }
            }
            PeftType::Ia3 => {
                cfg.feedforward_modules = match keys.feedforward_modules {
                    None => Vec::new(),
                    Some(Names::One(s)) => vec![s],
                    Some(Names::Many(v)) => v,
                };
            }
        }
        // Rank and alpha patterns (LoRA, LoHa, LoKr; other methods have none).
        cfg.rank_pattern = keys
            .rank_pattern
            .map_or_else(Vec::new, |p| p.0)
            .into_iter()
            .map(|(k, r)| (k, r.0))
            .collect();
        cfg.alpha_pattern = keys.alpha_pattern.map_or_else(Vec::new, |p| p.0);
        for (set, what) in [
            (
                &keys.modules_to_save,
                "modules_to_save (fully fine-tuned modules)",
            ),
            (&keys.layer_replication, "layer_replication"),
            (
                &keys.alora_invocation_tokens,
                "aLoRA (alora_invocation_tokens)",
            ),
            (
                &keys.trainable_token_indices,
                "trainable tokens (trainable_token_indices)",
            ),
            (
                &keys.target_parameters,
                "target_parameters (LoRA on raw parameters)",
            ),
        ] {
            let empty = match set {
                Value::Null => true,
                Value::Array(a) => a.is_empty(),
                Value::Object(o) => o.is_empty(),
                _ => false,
            };
            if !empty {
                return Err(bad(format!(
                    "{what} is set, which modula does not support; remove it or merge the adapter with PEFT first"
                )));
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
