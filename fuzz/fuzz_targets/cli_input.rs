//! The `modula` tool's request files (`modula::request`): the first byte picks the kind
//! (score/generate batch, routed or not; tokenize texts; decode rows), the rest is the JSON.
//! Parsing and checking give a result or an error, never a panic, and a checked batch holds
//! what it promises.
#![no_main]
use libfuzzer_sys::fuzz_target;
use modula::request::{BatchLimits, BatchRequest, IdRowsRequest, TextsRequest};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match kind % 4 {
        0 | 1 => {
            let names = ["a".to_string(), "b".to_string()];
            let limits = BatchLimits {
                vocab: 64,
                positions: 16,
                adapters: &names[..usize::from(kind / 4 % 3)],
                routed: kind % 4 == 1,
            };
            if let Ok(b) = BatchRequest::from_json(text).and_then(|r| r.check(&limits)) {
                assert!(b.rows >= 1 && (1..=16).contains(&b.seq));
                assert_eq!(b.input_ids.len(), b.rows * b.seq);
                assert!(b.input_ids.iter().all(|t| (0..64).contains(t)));
                if let Some(m) = &b.attention_mask {
                    assert_eq!(m.len(), b.rows * b.seq);
                    assert!(m.iter().all(|v| *v == 0 || *v == 1));
                }
                assert_eq!(b.adapters.len(), b.rows);
                assert!(b.adapters.iter().flatten().all(|n| limits.adapters.contains(n)));
            }
        }
        2 => {
            if let Ok(t) = TextsRequest::from_json(text) {
                assert!(!t.texts.is_empty());
                assert!(t.adapters.is_none_or(|a| a.len() == t.texts.len()));
            }
        }
        _ => {
            let _ = IdRowsRequest::from_json(text).and_then(|r| r.rows());
        }
    }
});
