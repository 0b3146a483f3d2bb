//! An expert library's `library.json` (beside one real expert folder): opening the library and
//! reading every expert it lists gives results or errors, never a panic or a read outside it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("modula-fuzz-lib-{}", std::process::id()));
    let _ = std::fs::create_dir_all(dir.join("experts"));
    if std::fs::write(dir.join("library.json"), data).is_err() {
        return;
    }
    if let Ok(lib) = modula::store::ExpertLibrary::open(&dir) {
        for name in lib.names() {
            let _ = lib.expert_dir(name);
            let _ = lib.factors(name);
        }
    }
});
