//! Request files: the JSON batches the `modula` tool reads, parsed and checked without touching
//! the filesystem, so a server that embeds modula accepts the same requests with the same
//! messages.
//!
//! Three shapes, each `deny_unknown_fields` where the tool's own output is not fed back:
//!
//! - [`BatchRequest`], `score` / `generate`: `{"input_ids": [[..]], "attention_mask": [[..]]?,
//!   "adapters": [name | null]?}`, left-padded rows of one length;
//! - [`TextsRequest`], `tokenize`: `{"texts": [..], "adapters": [..]?}`;
//! - [`IdRowsRequest`], `decode`: generate's output (`new_tokens`) or a tokenized batch
//!   (`input_ids` with an optional `attention_mask`).
//!
//! Every check runs before anything proportional to a model is allocated: the parsed JSON is
//! the only allocation, and it is proportional to the request. Errors are
//! [`Error::Invalid`] with `what` = ``key `input_ids[2][7]` `` (the JSON path of the value at
//! fault) and `why` saying what would be accepted; a caller adds the file or request it read.
//!
//! ```
//! use modula::request::{BatchLimits, BatchRequest};
//! let names = vec!["math".to_string(), "code".to_string()];
//! let limits = BatchLimits { vocab: 32000, positions: 4096, adapters: &names, routed: false };
//! let text = r#"{"input_ids": [[0, 1, 9]], "attention_mask": [[0, 1, 1]], "adapters": ["code"]}"#;
//! let batch = BatchRequest::from_json(text)?.check(&limits)?;
//! assert_eq!((batch.rows, batch.seq), (1, 3));
//! assert_eq!(batch.adapters, [Some("code".to_string())]);
//! let bad = r#"{"input_ids": [[0, 1, 32000]], "adapters": ["code"]}"#;
//! let err = BatchRequest::from_json(bad)?.check(&limits).unwrap_err();
//! assert!(err.to_string().contains("key `input_ids[0][2]`"));
//! # Ok::<(), modula::Error>(())
//! ```

use crate::error::{Error, Result};

/// Parses `text` as JSON into `T`; a value that does not fit is an [`Error::Invalid`] naming
/// its JSON path.
fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| bad(e.path().to_string(), e.inner()))
}

/// An [`Error::Invalid`] for the value at JSON path `key`.
fn bad(key: impl std::fmt::Display, why: impl ToString) -> Error {
    Error::Invalid {
        what: format!("key `{key}`"),
        why: why.to_string(),
    }
}

/// The batch `modula score` and `modula generate` read: rows of token ids, left-padded to one
/// length, with an optional mask and an optional adapter name per row.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Token ids, one row per sequence, all rows of one length.
    pub input_ids: Vec<Vec<i64>>,
    /// 1 for a token, 0 for padding; the shape of `input_ids`. Absent: every position is a
    /// token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_mask: Option<Vec<Vec<i64>>>,
    /// The adapter each row runs through (`null`: the base model). Absent: the one loaded
    /// adapter for every row, or none when none is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapters: Option<Vec<Option<String>>>,
}

/// What a [`BatchRequest`] must respect: the model's vocabulary and positions and the adapters
/// loaded beside it.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits<'a> {
    /// Token ids must lie in `0..vocab`.
    pub vocab: usize,
    /// Rows may hold at most this many tokens (`max_position_embeddings`).
    pub positions: usize,
    /// The names rows may choose.
    pub adapters: &'a [String],
    /// A router chooses each row's adapters: rows must not name any.
    pub routed: bool,
}

/// A checked [`BatchRequest`]: flat row-major ids and mask, ready for a `[rows, seq]` tensor,
/// and one adapter choice per row.
///
/// # Shapes
/// - `input_ids`, `attention_mask`: `rows · seq` values, row-major
/// - `adapters`: `rows`
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBatch {
    /// Number of rows (sequences), at least 1.
    pub rows: usize,
    /// Tokens per row, at least 1 and at most the limits' `positions`.
    pub seq: usize,
    /// The ids, row after row, each in `0..vocab`.
    pub input_ids: Vec<i64>,
    /// The mask, row after row, each 0 or 1; `None` when the request had none.
    pub attention_mask: Option<Vec<i64>>,
    /// Each row's adapter (`None`: the base model, or the router's choice when routed).
    pub adapters: Vec<Option<String>>,
}

impl BatchRequest {
    /// Parses a request; a value of the wrong type or an unknown key is an error naming its
    /// JSON path.
    pub fn from_json(text: &str) -> Result<Self> {
        from_json(text)
    }

    /// Checks the request against `limits`: at least one row of at least one token, rows of
    /// one length within `positions`, ids in the vocabulary, a mask of 0/1 of the same shape,
    /// one loaded adapter (or null) per row, none when routed. Absent `adapters` means the one
    /// loaded adapter, or the base model when none is loaded; with several loaded, rows must
    /// name theirs.
    pub fn check(self, limits: &BatchLimits<'_>) -> Result<TokenBatch> {
        let rows = self.input_ids.len();
        let seq = self.input_ids.first().map_or(0, Vec::len);
        if rows == 0 || seq == 0 {
            return Err(bad(
                "input_ids",
                "needs at least one row of at least one token",
            ));
        }
        let vocab = i64::try_from(limits.vocab).unwrap_or(i64::MAX);
        for (r, row) in self.input_ids.iter().enumerate() {
            if row.len() != seq {
                return Err(bad(
                    format!("input_ids[{r}]"),
                    format!(
                        "{} tokens but row 0 has {seq}; pad rows on the left to one length",
                        row.len()
                    ),
                ));
            }
            if let Some((i, t)) = row
                .iter()
                .enumerate()
                .find(|(_, t)| !(0..vocab).contains(*t))
            {
                return Err(bad(
                    format!("input_ids[{r}][{i}]"),
                    format!("token id {t} is outside the model's vocabulary (0..{vocab})"),
                ));
            }
        }
        if seq > limits.positions {
            return Err(bad(
                "input_ids",
                format!(
                    "rows of {seq} tokens exceed the model's max_position_embeddings = {}",
                    limits.positions
                ),
            ));
        }
        let attention_mask = match &self.attention_mask {
            None => None,
            Some(m) => {
                if m.len() != rows {
                    return Err(bad(
                        "attention_mask",
                        format!("{} rows but input_ids has {rows}", m.len()),
                    ));
                }
                for (r, row) in m.iter().enumerate() {
                    if row.len() != seq {
                        return Err(bad(
                            format!("attention_mask[{r}]"),
                            format!("{} values but input_ids rows have {seq}", row.len()),
                        ));
                    }
                    if let Some((i, v)) =
                        row.iter().enumerate().find(|(_, v)| !(0..=1).contains(*v))
                    {
                        return Err(bad(
                            format!("attention_mask[{r}][{i}]"),
                            format!("{v}: the mask holds 1 for tokens and 0 for padding"),
                        ));
                    }
                }
                Some(m.concat())
            }
        };
        let adapters = match self.adapters {
            Some(_) if limits.routed => {
                return Err(bad(
                    "adapters",
                    "names adapters per row, but --router chooses them; leave the key out (or drop --router)",
                ));
            }
            _ if limits.routed => vec![None; rows],
            Some(a) => {
                if a.len() != rows {
                    return Err(bad(
                        "adapters",
                        format!("{} names but input_ids has {rows} rows", a.len()),
                    ));
                }
                let unknown = a.iter().enumerate().find_map(|(r, n)| {
                    n.as_ref()
                        .filter(|n| !limits.adapters.contains(n))
                        .map(|n| (r, n))
                });
                if let Some((r, n)) = unknown {
                    return Err(bad(
                        format!("adapters[{r}]"),
                        format!(
                            "`{n}` is not a loaded adapter (loaded: {:?}); add --adapter {n}=DIR",
                            limits.adapters
                        ),
                    ));
                }
                a
            }
            None => match limits.adapters {
                [] => vec![None; rows],
                [one] => vec![Some(one.clone()); rows],
                many => {
                    return Err(bad(
                        "adapters",
                        format!(
                            "absent, but {} adapters are loaded ({many:?}); name each row's adapter (or null)",
                            many.len()
                        ),
                    ));
                }
            },
        };
        Ok(TokenBatch {
            rows,
            seq,
            input_ids: self.input_ids.concat(),
            attention_mask,
            adapters,
        })
    }
}

/// The texts `modula tokenize` reads, with an optional adapter name per text that it carries
/// through to its output.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TextsRequest {
    /// The texts to encode, at least one.
    pub texts: Vec<String>,
    /// One adapter name (or null) per text, passed through unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapters: Option<Vec<Option<String>>>,
}

impl TextsRequest {
    /// Parses and checks a request: at least one text, and as many adapter names as texts.
    pub fn from_json(text: &str) -> Result<Self> {
        let req: Self = from_json(text)?;
        if req.texts.is_empty() {
            return Err(bad("texts", "needs at least one text"));
        }
        if let Some(a) = &req.adapters
            && a.len() != req.texts.len()
        {
            return Err(bad(
                "adapters",
                format!("{} names but there are {} texts", a.len(), req.texts.len()),
            ));
        }
        Ok(req)
    }
}

/// The rows `modula decode` reads: generate's output (`new_tokens`, which wins when both are
/// there) or a tokenized batch (`input_ids`, with `attention_mask` dropping the padding).
/// Other keys (generate's `input_ids` beside `new_tokens`, `adapters`) are ignored, so either
/// tool's output can be fed back unchanged.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct IdRowsRequest {
    /// generate's new tokens, one row per sequence.
    #[serde(default)]
    pub new_tokens: Option<Vec<Vec<i64>>>,
    /// A tokenized batch's ids.
    #[serde(default)]
    pub input_ids: Option<Vec<Vec<i64>>>,
    /// The batch's mask (used with `input_ids` only).
    #[serde(default)]
    pub attention_mask: Option<Vec<Vec<i64>>>,
}

/// The rows to decode, padding removed, and the key they came from.
#[derive(Clone, Debug, PartialEq)]
pub struct IdRows {
    /// `"new_tokens"` or `"input_ids"`, for messages about a row.
    pub key: &'static str,
    /// The ids of each row to decode (masked positions dropped).
    pub rows: Vec<Vec<i64>>,
}

impl IdRowsRequest {
    /// Parses a request.
    pub fn from_json(text: &str) -> Result<Self> {
        from_json(text)
    }

    /// The rows to decode: `new_tokens` if present, else `input_ids` with the positions whose
    /// mask is 0 dropped; an error when neither key is there or the mask's rows do not have the
    /// lengths of the id rows. Ids are not checked here: the tokenizer names any it lacks.
    pub fn rows(self) -> Result<IdRows> {
        let (key, ids) = match (self.new_tokens, self.input_ids) {
            (Some(r), _) => ("new_tokens", r),
            (None, Some(r)) => ("input_ids", r),
            (None, None) => {
                return Err(bad(
                    ".",
                    "has neither `new_tokens` (generate's output) nor `input_ids`",
                ));
            }
        };
        let rows = match self.attention_mask.filter(|_| key == "input_ids") {
            None => ids,
            Some(m) => {
                let lengths = |r: &[Vec<i64>]| r.iter().map(Vec::len).collect::<Vec<_>>();
                if lengths(&m) != lengths(&ids) {
                    return Err(bad(
                        "attention_mask",
                        "its rows must have the lengths of the `input_ids` rows",
                    ));
                }
                ids.into_iter()
                    .zip(m)
                    .map(|(row, mask)| {
                        row.into_iter()
                            .zip(mask)
                            .filter(|(_, m)| *m != 0)
                            .map(|(t, _)| t)
                            .collect()
                    })
                    .collect()
            }
        };
        Ok(IdRows { key, rows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(adapters: &[String], routed: bool) -> BatchLimits<'_> {
        BatchLimits {
            vocab: 10,
            positions: 4,
            adapters,
            routed,
        }
    }

    fn what(e: Error) -> (String, String) {
        match e {
            Error::Invalid { what, why } => (what, why),
            other => panic!("expected Error::Invalid, got {other}"),
        }
    }

    #[test]
    fn a_valid_batch_is_flattened_row_major() {
        let names = ["a".to_string(), "b".to_string()];
        let req = BatchRequest::from_json(
            r#"{"input_ids": [[0, 1, 2], [3, 4, 9]], "attention_mask": [[0, 1, 1], [1, 1, 1]], "adapters": ["b", null]}"#,
        )
        .unwrap();
        let b = req.check(&limits(&names, false)).unwrap();
        assert_eq!((b.rows, b.seq), (2, 3));
        assert_eq!(b.input_ids, [0, 1, 2, 3, 4, 9]);
        assert_eq!(b.attention_mask.unwrap(), [0, 1, 1, 1, 1, 1]);
        assert_eq!(b.adapters, [Some("b".to_string()), None]);
    }

    #[test]
    fn absent_adapters_mean_the_one_loaded_or_none() {
        let one = ["only".to_string()];
        let req = BatchRequest::from_json(r#"{"input_ids": [[1], [2]]}"#).unwrap();
        let b = req.clone().check(&limits(&one, false)).unwrap();
        assert_eq!(
            b.adapters,
            [Some("only".to_string()), Some("only".to_string())]
        );
        assert_eq!(
            req.clone().check(&limits(&[], false)).unwrap().adapters,
            [None, None]
        );
        assert_eq!(
            req.clone().check(&limits(&one, true)).unwrap().adapters,
            [None, None]
        );
        let two = ["a".to_string(), "b".to_string()];
        let (w, why) = what(req.check(&limits(&two, false)).unwrap_err());
        assert_eq!(w, "key `adapters`");
        assert!(why.contains("2 adapters are loaded"), "{why}");
    }

    #[test]
    fn each_fault_names_the_value_at_fault() {
        let names = ["a".to_string()];
        let cases = [
            (
                r#"{"input_ids": []}"#,
                "key `input_ids`",
                "at least one row",
            ),
            (
                r#"{"input_ids": [[]]}"#,
                "key `input_ids`",
                "at least one row",
            ),
            (
                r#"{"input_ids": [[1, 2], [3]]}"#,
                "key `input_ids[1]`",
                "1 tokens but row 0 has 2",
            ),
            (
                r#"{"input_ids": [[1, 10]]}"#,
                "key `input_ids[0][1]`",
                "token id 10",
            ),
            (
                r#"{"input_ids": [[-1]]}"#,
                "key `input_ids[0][0]`",
                "token id -1",
            ),
            (
                r#"{"input_ids": [[1, 2, 3, 4, 5]]}"#,
                "key `input_ids`",
                "max_position_embeddings = 4",
            ),
            (
                r#"{"input_ids": [[1]], "attention_mask": []}"#,
                "key `attention_mask`",
                "0 rows",
            ),
            (
                r#"{"input_ids": [[1]], "attention_mask": [[1, 1]]}"#,
                "key `attention_mask[0]`",
                "2 values",
            ),
            (
                r#"{"input_ids": [[1]], "attention_mask": [[2]]}"#,
                "key `attention_mask[0][0]`",
                "2: the mask",
            ),
            (
                r#"{"input_ids": [[1]], "adapters": []}"#,
                "key `adapters`",
                "0 names",
            ),
            (
                r#"{"input_ids": [[1]], "adapters": ["z"]}"#,
                "key `adapters[0]`",
                "`z` is not a loaded",
            ),
            (
                r#"{"input_ids": [[1]], "adapter": ["a"]}"#,
                "key `adapter`",
                "unknown field `adapter`",
            ),
            (
                r#"{"input_ids": [[1, "x"]]}"#,
                "key `input_ids[0][1]`",
                "invalid type",
            ),
            (r#"{"input_ids": [[1]"#, "key `input_ids`", "EOF"),
        ];
        for (json, key, why_part) in cases {
            let e = BatchRequest::from_json(json).and_then(|r| r.check(&limits(&names, false)));
            let (w, why) = what(e.unwrap_err());
            assert_eq!(w, key, "{json}");
            assert!(why.contains(why_part), "{json}: {why}");
        }
        let routed = BatchRequest::from_json(r#"{"input_ids": [[1]], "adapters": ["a"]}"#)
            .unwrap()
            .check(&limits(&names, true));
        assert!(what(routed.unwrap_err()).1.contains("--router chooses"));
    }

    #[test]
    fn a_huge_vocabulary_limit_does_not_wrap() {
        // usize::MAX as i64 would be -1 and refuse every id.
        let req = BatchRequest::from_json(r#"{"input_ids": [[9223372036854775806, 5]]}"#).unwrap();
        let lim = BatchLimits {
            vocab: usize::MAX,
            positions: 2,
            adapters: &[],
            routed: false,
        };
        assert_eq!(req.check(&lim).unwrap().input_ids, [i64::MAX - 1, 5]);
    }

    #[test]
    fn texts_need_one_text_and_one_name_each() {
        let ok =
            TextsRequest::from_json(r#"{"texts": ["a", "b"], "adapters": ["x", null]}"#).unwrap();
        assert_eq!(ok.texts, ["a", "b"]);
        assert_eq!(
            what(TextsRequest::from_json(r#"{"texts": []}"#).unwrap_err()).0,
            "key `texts`"
        );
        let (w, why) =
            what(TextsRequest::from_json(r#"{"texts": ["a"], "adapters": []}"#).unwrap_err());
        assert_eq!(
            (w.as_str(), why.as_str()),
            ("key `adapters`", "0 names but there are 1 texts")
        );
    }

    #[test]
    fn id_rows_prefer_new_tokens_and_drop_padding() {
        let both = IdRowsRequest::from_json(
            r#"{"input_ids": [[7, 8]], "new_tokens": [[1, 2, 3]], "adapters": ["a"]}"#,
        )
        .unwrap()
        .rows()
        .unwrap();
        assert_eq!((both.key, both.rows), ("new_tokens", vec![vec![1, 2, 3]]));
        let masked = IdRowsRequest::from_json(
            r#"{"input_ids": [[0, 5, 6], [1, 2, 3]], "attention_mask": [[0, 1, 1], [1, 1, 1]]}"#,
        )
        .unwrap()
        .rows()
        .unwrap();
        assert_eq!(masked.rows, [vec![5, 6], vec![1, 2, 3]]);
        let ragged =
            IdRowsRequest::from_json(r#"{"input_ids": [[1, 2]], "attention_mask": [[1]]}"#)
                .unwrap()
                .rows();
        assert_eq!(what(ragged.unwrap_err()).0, "key `attention_mask`");
        assert!(IdRowsRequest::from_json("{}").unwrap().rows().is_err());
    }
}
