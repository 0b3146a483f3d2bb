//! A sharded Llama folder end to end: the input is its `config.json` and its
//! `model.safetensors.index.json`, split at the first NUL byte, beside the tiny Llama's three
//! real shards. `load_decoder` gives a model or an error, never a panic or an allocation the
//! weights do not back (absurd layer counts, sizes, an index naming missing shards or tensors).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;
use std::sync::OnceLock;

fn folder() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/tiny_decoders/llama_sharded_bf16");
        let dir = std::env::temp_dir().join(format!("modula-fuzz-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for i in 1..=3 {
            let shard = format!("model-0000{i}-of-00003.safetensors");
            std::fs::copy(src.join(&shard), dir.join(&shard)).unwrap();
        }
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let dir = folder();
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (config, index) = (&data[..split], data.get(split + 1..).unwrap_or(&[]));
    if std::fs::write(dir.join("config.json"), config).is_err()
        || std::fs::write(dir.join("model.safetensors.index.json"), index).is_err()
    {
        return;
    }
    let device = burn::tensor::Device::flex();
    let _ = modula::checkpoint::load_decoder(dir, &device);
});
