//! The checkpoint reader (its own header parser, positional reads): any file gives a
//! `Checkpoint` whose tensors read or fail, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("modula-fuzz-{}.safetensors", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(c) = modula::checkpoint::Checkpoint::open(&path) {
        let names: Vec<String> = c.names().map(str::to_string).collect();
        for n in names {
            let _ = c.read(&n);
        }
    }
});
