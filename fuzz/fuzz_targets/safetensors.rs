//! The in-memory safetensors reader: any bytes give a `TensorFile` or an error, never a panic,
//! an abort or an allocation the bytes do not hold.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = modula::TensorFile::from_bytes(data, "fuzz.safetensors");
});
