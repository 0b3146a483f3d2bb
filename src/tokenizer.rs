//! Text in and out of a model folder (feature `tokenizers`): its `tokenizer.json` through
//! Hugging Face's own `tokenizers` crate, so ids are those transformers' fast tokenizers give,
//! and batches padded into the `input_ids` / `attention_mask` pair every forward pass of
//! [`models`](crate::models) takes.
//!
//! Padding follows transformers: shorter rows are padded on the [`PaddingSide`] given, with
//! `attention_mask` 0 over the padding and the pad id from `tokenizer_config.json`'s
//! `pad_token`, else the tokenizer's own padding setting, else the `eos_token`, else 0 (masked
//! positions never reach the output, so the id only has to lie in the vocabulary). Rows are not
//! truncated unless [`Tokenizer::set_max_length`] asks. Decoder-only models
//! generate from left-padded batches; BERT encoders count positions from the first token, so
//! they take right padding.
//!
//! # Shapes
//! [`TokenBatch`]: `input_ids`, `attention_mask` and `token_type_ids` are `[rows, longest]`.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::{Error, Result};

/// File name of a Hugging Face fast tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File name of the tokenizer settings transformers keeps beside it.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Which end of a row padding goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PaddingSide {
    /// Before the tokens (decoder-only generation).
    Left,
    /// After the tokens (encoders).
    Right,
}

/// A padded batch of token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBatch {
    /// The ids, one row per text, padded to the longest.
    pub input_ids: Vec<Vec<i64>>,
    /// 1 for tokens, 0 for padding.
    pub attention_mask: Vec<Vec<i64>>,
    /// The segment of each token (0 for one-text inputs; 0 on padding).
    pub token_type_ids: Vec<Vec<i64>>,
}

impl TokenBatch {
    /// `(input_ids, attention_mask)` as `[rows, longest]` integer tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        (
            rows_tensor(&self.input_ids, device),
            rows_tensor(&self.attention_mask, device),
        )
    }
}

fn rows_tensor(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), width]), device)
}

/// A model folder's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    /// The pad id `tokenizer.json`'s own padding setting names, if any.
    file_pad_id: Option<u32>,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl Tokenizer {
    /// Reads `dir/tokenizer.json`, and `dir/tokenizer_config.json` when present for the pad
    /// token.
    ///
    /// The pad id is found as transformers finds it: `tokenizer_config.json`'s `pad_token`, else
    /// the padding setting inside `tokenizer.json`, else `tokenizer_config.json`'s `eos_token`
    /// (what users of Llama-style checkpoints set by hand), else 0.
    ///
    /// # Errors
    /// [`Error::Io`] when `tokenizer.json` is missing or unreadable; [`Error::Invalid`] naming
    /// the file when it does not parse or names a pad token outside the vocabulary.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_file(dir.join(TOKENIZER_FILE))?;
        let cfg_path = dir.join(TOKENIZER_CONFIG_FILE);
        if !cfg_path.exists() {
            return Ok(tok);
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Json {
            path: cfg_path.clone(),
            source: e,
        })?;
        let lookup = |key: &str| -> Result<Option<u32>> {
            let Some(token) = special_token(&cfg[key]) else {
                return Ok(None);
            };
            tok.inner.token_to_id(token).map(Some).ok_or_else(|| {
                Error::invalid(
                    format!("{} `{key}`", cfg_path.display()),
                    format!("`{token}` is not in the vocabulary of {TOKENIZER_FILE}"),
                )
            })
        };
        let pad = lookup("pad_token")?;
        let eos = lookup("eos_token")?;
        if let Some(id) = pad.or(tok.file_pad_id).or(eos) {
            tok.pad_id = id;
        }
        Ok(tok)
    }

    /// Reads one `tokenizer.json`. The pad id is the file's own padding setting, else 0.
    ///
    /// The file's own padding and truncation settings are not applied to encodings: like
    /// transformers' `tokenizer(texts)`, rows keep their full length unless
    /// [`set_max_length`](Self::set_max_length) asks for truncation, and
    /// [`encode_batch`](Self::encode_batch) pads to the longest row only.
    ///
    /// # Errors
    /// [`Error::Io`]; [`Error::Invalid`] naming the file when it does not parse.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::invalid(
                format!("tokenizer {}", path.display()),
                format!("{e}; it should be a Hugging Face fast tokenizer (tokenizer.json)"),
            )
        })?;
        let file_pad_id = inner.get_padding().map(|p| p.pad_id);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::invalid(format!("tokenizer {}", path.display()), e.to_string()))?;
        Ok(Self {
            inner,
            pad_id: file_pad_id.unwrap_or(0),
            file_pad_id,
            path: path.to_path_buf(),
        })
    }

    /// Truncates every encoding to at most `max_length` ids, special tokens included (as
    /// transformers' `tokenizer(texts, truncation=True, max_length=max_length)`), or lifts the
    /// limit with `None`.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming `max_length` when it is 0 or leaves no room for the special
    /// tokens the post-processor adds.
    pub fn set_max_length(&mut self, max_length: Option<usize>) -> Result<()> {
        let params = max_length.map(|max_length| tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        });
        if max_length == Some(0) {
            return Err(Error::invalid(
                "max_length",
                "0 leaves no tokens; give at least 1, or None for no limit",
            ));
        }
        self.inner
            .with_truncation(params)
            .map(|_| ())
            .map_err(|e| Error::invalid(format!("max_length {max_length:?}"), e.to_string()))
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id padding takes.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of `token`, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes `texts` as transformers' `tokenizer(texts, padding=True)` does:
    /// `add_special_tokens` applies the post-processor (Llama's BOS, BERT's `[CLS]` … `[SEP]`),
    /// then rows are padded to the longest on `side`.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the text the tokenizer rejects.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        add_special_tokens: bool,
        side: PaddingSide,
    ) -> Result<TokenBatch> {
        let mut rows = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let enc = self.inner.encode(*text, add_special_tokens).map_err(|e| {
                Error::invalid(
                    format!("text {i} for {}", self.path.display()),
                    e.to_string(),
                )
            })?;
            let ids: Vec<i64> = enc.get_ids().iter().map(|&v| i64::from(v)).collect();
            let types: Vec<i64> = enc.get_type_ids().iter().map(|&v| i64::from(v)).collect();
            rows.push((ids, types));
        }
        let width = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let mut batch = TokenBatch {
            input_ids: Vec::with_capacity(rows.len()),
            attention_mask: Vec::with_capacity(rows.len()),
            token_type_ids: Vec::with_capacity(rows.len()),
        };
        let pad = i64::from(self.pad_id);
        for (ids, types) in rows {
            let n = ids.len();
            let fill = |row: Vec<i64>, with: i64| -> Vec<i64> {
                let padding = std::iter::repeat_n(with, width - n);
                match side {
                    PaddingSide::Left => padding.chain(row).collect(),
                    PaddingSide::Right => row.into_iter().chain(padding).collect(),
                }
            };
            batch.attention_mask.push(fill(vec![1; n], 0));
            batch.input_ids.push(fill(ids, pad));
            batch.token_type_ids.push(fill(types, 0));
        }
        Ok(batch)
    }

    /// The text of `ids`, as transformers' `decode` (special tokens left out when
    /// `skip_special_tokens`).
    ///
    /// # Errors
    /// [`Error::IdOutOfRange`] for an id outside the vocabulary; [`Error::Invalid`] when the
    /// decoder fails.
    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let bound = self.vocab_size();
        let ids = ids
            .iter()
            .map(|&id| {
                u32::try_from(id)
                    .ok()
                    .filter(|&v| (v as usize) < bound)
                    .ok_or(Error::IdOutOfRange {
                        what: "token id",
                        within: "the tokenizer's vocabulary",
                        id,
                        bound,
                    })
            })
            .collect::<Result<Vec<u32>>>()?;
        self.inner.decode(&ids, skip_special_tokens).map_err(|e| {
            Error::invalid(
                format!("decoding with {}", self.path.display()),
                e.to_string(),
            )
        })
    }
}

/// A special token in `tokenizer_config.json`: a string, or an added-token object's `content`.
fn special_token(v: &serde_json::Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("content")?.as_str())
}
