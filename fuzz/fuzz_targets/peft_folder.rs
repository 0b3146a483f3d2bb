//! A whole PEFT folder: the input splits at its first NUL byte into `adapter_config.json` and
//! `adapter_model.safetensors`; loading gives an adapter of any kind or an error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    let (config, weights) = (&data[..cut], data.get(cut + 1..).unwrap_or(&[]));
    let dir = std::env::temp_dir().join(format!("modula-fuzz-peft-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_err()
        || std::fs::write(dir.join("adapter_config.json"), config).is_err()
        || std::fs::write(dir.join("adapter_model.safetensors"), weights).is_err()
    {
        return;
    }
    let _ = modula::PeftAdapter::load(&dir, &burn::tensor::Device::flex());
});
