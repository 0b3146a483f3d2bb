//! The tiny Llama of the tests, shared by the examples that run PEFT adapters on it
//! (tiny_lm.rs, peft_methods.rs): its folders, token batches, the pattern the adapters learn,
//! and the logits file a saved adapter is checked with.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use modula::HostTensor;

/// `tests/data/tiny_decoders/<name>`.
pub fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/tiny_decoders")
        .join(name)
}

/// The folder given as `--out DIR`, or `default` under the system's temporary folder.
pub fn out_dir(default: &str) -> PathBuf {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| std::env::temp_dir().join(default), PathBuf::from)
}

/// Rows of token ids (equal lengths) as a `[rows, len]` tensor.
pub fn ids(rows: &[Vec<i64>], device: &Device) -> Tensor<2, Int> {
    let (b, s) = (rows.len(), rows[0].len());
    Tensor::<1, Int>::from_data(TensorData::new(rows.concat(), [b * s]), device).reshape([b, s])
}

/// Sequences repeating a 4-token pattern from each offset: what the adapters learn to
/// continue.
pub fn pattern_rows(len: usize) -> Vec<Vec<i64>> {
    let pattern = [11i64, 22, 33, 44];
    (0..4)
        .map(|o| (0..len).map(|i| pattern[(i + o) % 4]).collect())
        .collect()
}

/// The test batch a saved adapter is checked on.
pub fn test_rows() -> Vec<Vec<i64>> {
    vec![vec![22, 33, 44, 11, 22, 33], vec![1, 5, 9, 63, 0, 7]]
}

/// Writes `dir/modula_logits.safetensors`: the test batch and modula's `logits` for it, which
/// tests/data/check_modula_outputs.py compares with PEFT's.
///
/// # Errors
/// As [`modula::io::write_safetensors`].
pub fn write_logits(dir: &Path, logits: Tensor<3>) -> modula::Result<()> {
    let rows = test_rows();
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "input_ids".to_string(),
        HostTensor {
            shape: vec![rows.len(), rows[0].len()],
            data: rows.concat().iter().map(|&v| v as f32).collect(),
        },
    );
    tensors.insert("logits".to_string(), HostTensor::from_tensor(logits));
    modula::io::write_safetensors(dir.join("modula_logits.safetensors"), &tensors, None)
}
