//! A Llama-family `config.json`: any text gives a `DecoderConfig` or an error naming the key.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = modula::models::DecoderConfig::from_json(text, "config.json");
    }
});
