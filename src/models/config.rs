//! The `config.json` of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Mixtral), read as
//! transformers reads it.
//!
//! Both layouts real checkpoints use are accepted: transformers 4's top-level `rope_theta` and
//! `rope_scaling`, and transformers 5's `rope_parameters`. A key that is absent takes the
//! default of the model type's transformers config class (`LlamaConfig`, `MistralConfig`,
//! `Qwen2Config`, `MixtralConfig` of transformers 5.23). Settings modula cannot honour yet are
//! errors that name the key, never a silently different model.

use serde_json::{Map, Value};

use super::rope::RopeScaling;
use crate::error::{Error, Result};

/// The decoder families this reader knows (`model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecoderFamily {
    /// `llama`: Llama 2 and 3.
    Llama,
    /// `mistral`: sliding-window attention.
    Mistral,
    /// `qwen2`: biases on q, k and v.
    Qwen2,
    /// `mixtral`: sparse MoE feed-forward blocks.
    Mixtral,
}

/// The values a Llama-family decoder is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderConfig {
    /// The family (`model_type`).
    pub family: DecoderFamily,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Feed-forward width (per expert for Mixtral).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one head; `hidden_size / num_attention_heads` unless the config says otherwise.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Longest sequence the positions cover.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// The output layer shares the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k, v (`attention_bias`; always for Qwen2).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (`attention_bias`; never for Qwen2).
    pub o_bias: bool,
    /// Biases on the feed-forward projections (`mlp_bias`).
    pub mlp_bias: bool,
    /// Sliding-window attention span (Mistral, Mixtral), if any.
    pub sliding_window: Option<usize>,
    /// Mixtral's experts per layer and experts per token.
    pub experts: Option<(usize, usize)>,
    /// The token ids that end a generated sequence (`eos_token_id`, one id or a list).
    pub eos_token_ids: Vec<i64>,
}

/// Per-family defaults of transformers 5.23's config classes.
struct Defaults {
    vocab: usize,
    intermediate: usize,
    kv_heads: Option<usize>,
    rms_norm_eps: f64,
    max_positions: usize,
    theta: f64,
    window: Option<usize>,
}

impl DecoderFamily {
    fn from_model_type(t: &str) -> Option<Self> {
        Some(match t {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "mixtral" => Self::Mixtral,
            _ => return None,
        })
    }

    fn defaults(self) -> Defaults {
        let (vocab, intermediate, kv_heads, rms_norm_eps, max_positions, theta, window) = match self
        {
            Self::Llama => (32000, 11008, None, 1e-6, 2048, 1e4, None),
            Self::Mistral => (32000, 14336, Some(8), 1e-6, 131072, 1e4, Some(4096)),
            Self::Qwen2 => (151936, 22016, None, 1e-6, 32768, 1e4, None),
            Self::Mixtral => (32000, 14336, Some(8), 1e-5, 131072, 1e6, None),
        };
        Defaults {
            vocab,
            intermediate,
            kv_heads,
            rms_norm_eps,
            max_positions,
            theta,
            window,
        }
    }
}

impl DecoderConfig {
    /// Reads a `config.json` document; `path` names the file in errors.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the file and key for JSON that is not an object, an unknown
    /// `model_type`, a value of the wrong type, an activation other than `silu`, a RoPE type
    /// other than `default` and `llama3`, Qwen2's `use_sliding_window`, or head counts that
    /// do not divide (`num_attention_heads` by `num_key_value_heads`).
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let (c, model_type) = config_object(text, path, &["llama", "mistral", "qwen2", "mixtral"])?;
        let r = Reader { c: &c, path };
        let family = DecoderFamily::from_model_type(&model_type)
            .ok_or_else(|| r.bad("model_type", format!("`{model_type}`")))?;
        let d = family.defaults();
        let hidden_size = r.usize("hidden_size")?.unwrap_or(4096);
        let heads = r.usize("num_attention_heads")?.unwrap_or(32);
        if heads == 0 || hidden_size == 0 {
            return Err(r.bad(
                "num_attention_heads",
                "hidden_size and num_attention_heads must be positive",
            ));
        }
        let kv_heads = r
            .usize("num_key_value_heads")?
            .or(d.kv_heads)
            .unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(r.bad(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads = {heads}"),
            ));
        }
        let act = r.string("hidden_act")?.unwrap_or_else(|| "silu".into());
        if act != "silu" {
            return Err(r.bad(
                "hidden_act",
                format!("`{act}`: Llama-family decoders here use silu"),
            ));
        }
        let (rope_theta, rope_scaling) = r.rope(d.theta)?;
        let attention_bias = r.bool("attention_bias")?.unwrap_or(false);
        let sliding_window = match family {
            DecoderFamily::Qwen2 => {
                if r.bool("use_sliding_window")?.unwrap_or(false) {
                    return Err(r.bad(
                        "use_sliding_window",
                        "Qwen2's per-layer sliding window is not supported yet",
                    ));
                }
                None
            }
            DecoderFamily::Mistral | DecoderFamily::Mixtral => match c.get("sliding_window") {
                None => d.window,
                Some(_) => r.usize("sliding_window")?,
            },
            DecoderFamily::Llama => None,
        };
        let experts = match family {
            DecoderFamily::Mixtral => Some((
                r.usize("num_local_experts")?.unwrap_or(8),
                r.usize("num_experts_per_tok")?.unwrap_or(2),
            )),
            _ => None,
        };
        Ok(Self {
            family,
            vocab_size: r.usize("vocab_size")?.unwrap_or(d.vocab),
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?.unwrap_or(d.intermediate),
            num_hidden_layers: r.usize("num_hidden_layers")?.unwrap_or(32),
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: match r.usize("head_dim")? {
                Some(d) => d,
                None if hidden_size % heads == 0 => hidden_size / heads,
                None => {
                    return Err(r.bad(
                        "hidden_size",
                        format!(
                            "{hidden_size} is not divisible by num_attention_heads = {heads}; give head_dim explicitly"
                        ),
                    ));
                }
            },
            rms_norm_eps: r.f64("rms_norm_eps")?.unwrap_or(d.rms_norm_eps),
            max_position_embeddings: r
                .usize("max_position_embeddings")?
                .unwrap_or(d.max_positions),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: r.bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: attention_bias || family == DecoderFamily::Qwen2,
            o_bias: attention_bias && family != DecoderFamily::Qwen2,
            mlp_bias: r.bool("mlp_bias")?.unwrap_or(false),
            sliding_window,
            experts,
            eos_token_ids: r.ids("eos_token_id")?,
        })
    }
}

/// The JSON object of the `config.json` text `text` (`path` names it in errors), after
/// checking that its `model_type` is one of `types`; returns the object and the type.
///
/// # Errors
/// [`Error::Invalid`] naming the file (and key) for text that is not a JSON object or another
/// `model_type`.
pub(super) fn config_object(
    text: &str,
    path: &str,
    types: &[&str],
) -> Result<(Map<String, Value>, String)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| Error::invalid(path, format!("not JSON: {e}")))?;
    let Value::Object(c) = value else {
        return Err(Error::invalid(path, "a config.json must be a JSON object"));
    };
    let model_type = Reader::new(&c, path)
        .string("model_type")?
        .unwrap_or_default();
    if !types.contains(&model_type.as_str()) {
        return Err(Reader::new(&c, path).bad(
            "model_type",
            format!(
                "`{model_type}` is not a model modula reads here ({})",
                types.join(", ")
            ),
        ));
    }
    Ok((c, model_type))
}

/// Typed access to the keys of one config object; `null` reads as absent.
pub(super) struct Reader<'a> {
    c: &'a Map<String, Value>,
    path: &'a str,
}

impl<'a> Reader<'a> {
    /// Reads the object `c` of the file `path`.
    pub(super) fn new(c: &'a Map<String, Value>, path: &'a str) -> Self {
        Self { c, path }
    }

    pub(super) fn bad(&self, key: &str, why: impl Into<String>) -> Error {
        Error::invalid(format!("{}: key `{key}`", self.path), why)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.c.get(key).filter(|v| !v.is_null())
    }

    /// `key` converted by `conv`, or an error saying it is not `what`.
    fn typed<T>(&self, key: &str, what: &str, conv: fn(&Value) -> Option<T>) -> Result<Option<T>> {
        self.get(key)
            .map(|v| conv(v).ok_or_else(|| self.bad(key, format!("{v} is not {what}"))))
            .transpose()
    }

    pub(super) fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().map(|n| n as usize)
        })
    }

    pub(super) fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", Value::as_f64)
    }

    pub(super) fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "true or false", Value::as_bool)
    }

    /// One token id or a list of them (none when absent).
    pub(super) fn ids(&self, key: &str) -> Result<Vec<i64>> {
        fn one(v: &Value) -> Option<i64> {
            v.as_i64().filter(|&i| i >= 0)
        }
        Ok(self
            .typed(key, "a token id or a list of token ids", |v| match v {
                Value::Array(items) => items.iter().map(one).collect(),
                v => one(v).map(|i| vec![i]),
            })?
            .unwrap_or_default())
    }

    pub(super) fn string(&self, key: &str) -> Result<Option<String>> {
        self.typed(key, "a string", |v| v.as_str().map(str::to_string))
    }

    /// `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (transformers 4).
    fn rope(&self, default_theta: f64) -> Result<(f64, Option<RopeScaling>)> {
        let (key, params) = match (self.get("rope_parameters"), self.get("rope_scaling")) {
            (Some(p), _) => ("rope_parameters", Some(p)),
            (None, s) => ("rope_scaling", s),
        };
        let params = match params {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => return Err(self.bad(key, format!("{v} is not an object"))),
        };
        let inner = params.map(|m| Reader {
            c: m,
            path: self.path,
        });
        let theta = match inner.as_ref().map(|p| p.f64("rope_theta")).transpose()? {
            Some(Some(t)) => t,
            _ => self.f64("rope_theta")?.unwrap_or(default_theta),
        };
        let Some(p) = inner else {
            return Ok((theta, None));
        };
        // transformers 4 wrote `type`, later `rope_type`.
        let kind = match p.string("rope_type")? {
            Some(k) => k,
            None => p.string("type")?.unwrap_or_else(|| "default".into()),
        };
        let need = |k: &str| {
            p.f64(k)?.ok_or_else(|| {
                self.bad(&format!("{key}.{k}"), "is required by the llama3 RoPE type")
            })
        };
        match kind.as_str() {
            "default" => Ok((theta, None)),
            "llama3" => Ok((
                theta,
                Some(RopeScaling::Llama3 {
                    factor: need("factor")?,
                    low_freq_factor: need("low_freq_factor")?,
                    high_freq_factor: need("high_freq_factor")?,
                    original_max_position_embeddings: need("original_max_position_embeddings")?
                        as usize,
                }),
            )),
            other => Err(self.bad(
                &format!("{key}.rope_type"),
                format!("`{other}` is not supported yet (default and llama3 are)"),
            )),
        }
    }
}
