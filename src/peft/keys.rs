//! Tensor keys of a PEFT folder: `base_model.model.<module path>.<part>`.

/// The prefix PEFT puts before every module path.
pub(super) const KEY_PREFIX: &str = "base_model.model.";

/// Splits `base_model.model.<path>.<part>` into `(path, part)` for the known parts.
pub(super) fn split_key<'a>(key: &'a str, parts: &[&'a str]) -> Option<(&'a str, &'a str)> {
    let rest = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    parts.iter().find_map(|part| {
        rest.strip_suffix(part)
            .and_then(|p| p.strip_suffix('.'))
            .map(|p| (p, *part))
    })
}
