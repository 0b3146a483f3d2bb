//! `adapter_config.json`: any text gives a `PeftConfig` or an error naming the key.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = modula::PeftConfig::from_json(text, "adapter_config.json") {
            let _ = (c.rank_for("model.layers.0.q_proj"), c.scaling_for("fc1"));
        }
    }
});
