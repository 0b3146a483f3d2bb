//! PEFT's target-module rules: which module paths of a model an adapter config adapts.
//!
//! A port of PEFT 0.21's `check_target_module_exists` and of the checks `LoraConfig` makes on
//! the keys it reads, so that a folder attaches to exactly the modules PEFT would adapt:
//!
//! 1. `exclude_modules` first: a string is a regular expression that must match the whole
//!    path; a list excludes a path equal to an entry or ending in `.entry`.
//! 2. `target_modules` as a string: a regular expression that must match the whole path.
//! 3. `target_modules` as a list: a path equal to an entry is a target; otherwise a path ending
//!    in `.entry` is one, and then, in this case only, `layers_to_transform` keeps it only if
//!    its layer index is listed. The index is the first number that follows `pattern.` for a
//!    pattern of `layers_pattern`, or, without a pattern, the first `.name.number.` segment
//!    (so a Mixtral expert index never counts as the layer).
//! 4. `all-linear` (any case) names every linear layer of the model by its full path, except
//!    the output layer; it depends on the model, so the caller resolves it with the model's
//!    linear layers ([`TargetRules::resolve_all_linear`]), after which rule 3 applies.
//!
//! PEFT's regular expressions are Python's; modula compiles them with the `regex` crate, whose
//! syntax covers them except look-around and back-references, which are reported as errors.

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// What the rules say of one module path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetDecision {
    /// The adapter adapts this module.
    Target,
    /// `exclude_modules` names it (whatever `target_modules` says).
    Excluded,
    /// Not a target.
    NotTarget,
}

#[derive(Clone, Debug)]
enum Names {
    List(Vec<String>),
    Regex(Regex),
    AllLinear,
}

/// The target-module rules of one adapter config (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct TargetRules {
    targets: Names,
    exclude: Option<Names>,
    layers: Option<Vec<u64>>,
    layer_index: Vec<Regex>,
}

impl TargetRules {
    /// Reads `target_modules`, `exclude_modules`, `layers_to_transform` and `layers_pattern`
    /// from an `adapter_config.json` object.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the key for a missing or malformed `target_modules`, a regular
    /// expression that does not compile, `layers_to_transform` or `layers_pattern` with a
    /// string `target_modules` (a regular expression or `all-linear`), or `layers_pattern` without `layers_to_transform` (PEFT
    /// refuses those too).
    pub fn from_config(config: &Map<String, Value>) -> Result<Self> {
        let targets = match config.get("target_modules") {
            Some(Value::String(s)) if s.eq_ignore_ascii_case("all-linear") => Names::AllLinear,
            Some(Value::String(s)) => Names::Regex(full_match(s, "target_modules")?),
            Some(Value::Array(_)) => Names::List(strings(config, "target_modules")?),
            _ => {
                return Err(config_error(
                    "target_modules",
                    "must be a list of module names, a regular expression or \"all-linear\"",
                ));
            }
        };
        let exclude = match config.get("exclude_modules") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Names::Regex(full_match(s, "exclude_modules")?)),
            Some(Value::Array(_)) => Some(Names::List(strings(config, "exclude_modules")?)),
            Some(_) => {
                return Err(config_error(
                    "exclude_modules",
                    "must be a list of module names or a regular expression",
                ));
            }
        };
        let layers = match config.get("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(vec![layer_number(n)?]),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|v| match v {
                        Value::Number(n) => layer_number(n),
                        _ => Err(bad_layers()),
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(_) => return Err(bad_layers()),
        };
        let patterns: Vec<String> = match config.get("layers_pattern") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(_)) => strings(config, "layers_pattern")?,
            Some(_) => {
                return Err(config_error(
                    "layers_pattern",
                    "must be a string or a list of strings",
                ));
            }
        };
        // PEFT checks `isinstance(target_modules, str)`, which "all-linear" is too.
        if !matches!(targets, Names::List(_)) {
            for (key, set) in [
                ("layers_to_transform", layers.is_some()),
                (
                    "layers_pattern",
                    config.get("layers_pattern").is_some_and(|v| !v.is_null()),
                ),
            ] {
                if set {
                    return Err(config_error(
                        key,
                        "cannot be used when target_modules is a string (a regular expression or \"all-linear\"; PEFT refuses it too)",
                    ));
                }
            }
        }
        if !patterns.is_empty() && layers.is_none() {
            return Err(config_error(
                "layers_pattern",
                "needs layers_to_transform (PEFT refuses it too)",
            ));
        }
        let layer_index = if patterns.is_empty() {
            vec![compile(r"^.*?\.[^.]*\.(\d+)\.", "layers_pattern")?]
        } else {
            patterns
                .iter()
                .map(|p| compile(&format!(r"^(?:.*?\.)?(?:{p})\.(\d+)\."), "layers_pattern"))
                .collect::<Result<_>>()?
        };
        Ok(Self {
            targets,
            exclude,
            // An empty list restricts nothing, as in PEFT.
            layers: layers.filter(|l| !l.is_empty()),
            layer_index,
        })
    }

    /// Whether `target_modules` is `"all-linear"` and not yet resolved.
    pub fn is_all_linear(&self) -> bool {
        matches!(self.targets, Names::AllLinear)
    }

    /// Resolves `all-linear` as PEFT does: the targets become the full paths of the model's
    /// linear layers, less its output layer (`lm_head` for a causal LM). Other rules are left
    /// as they are.
    pub fn resolve_all_linear<'a>(
        &mut self,
        linear_paths: impl IntoIterator<Item = &'a str>,
        output_layer: Option<&str>,
    ) {
        if self.is_all_linear() {
            let paths = linear_paths
                .into_iter()
                .filter(|p| Some(*p) != output_layer)
                .map(str::to_string)
                .collect();
            self.targets = Names::List(paths);
        }
    }

    /// What the rules say of the module at `path` (dotted, as `named_modules` lists it). An
    /// unresolved `all-linear` targets nothing ([`resolve_all_linear`](Self::resolve_all_linear)).
    pub fn decide(&self, path: &str) -> TargetDecision {
        let excluded = match &self.exclude {
            Some(Names::Regex(re)) => re.is_match(path),
            Some(Names::List(names)) => names.iter().any(|n| name_matches(n, path)),
            Some(Names::AllLinear) | None => false,
        };
        if excluded {
            return TargetDecision::Excluded;
        }
        let found = match &self.targets {
            Names::Regex(re) => re.is_match(path),
            Names::AllLinear => false,
            Names::List(names) if names.iter().any(|n| n == path) => true,
            Names::List(names) => {
                names.iter().any(|n| path.ends_with(&format!(".{n}"))) && self.in_layers(path)
            }
        };
        if found {
            TargetDecision::Target
        } else {
            TargetDecision::NotTarget
        }
    }

    /// Whether `path`'s layer index is one of `layers_to_transform` (true without the key).
    fn in_layers(&self, path: &str) -> bool {
        let Some(layers) = &self.layers else {
            return true;
        };
        self.layer_index
            .iter()
            .find_map(|re| re.captures(path))
            .and_then(|c| c.get(1)?.as_str().parse::<u64>().ok())
            .is_some_and(|i| layers.contains(&i))
    }
}

/// A list entry names `path` when it equals it or is its dotted suffix.
fn name_matches(name: &str, path: &str) -> bool {
    path == name || path.ends_with(&format!(".{name}"))
}

fn strings(config: &Map<String, Value>, key: &str) -> Result<Vec<String>> {
    config[key]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| config_error(key, format!("{v} is not a string")))
        })
        .collect()
}

fn layer_number(n: &serde_json::Number) -> Result<u64> {
    n.as_u64().ok_or_else(bad_layers)
}

fn bad_layers() -> Error {
    config_error(
        "layers_to_transform",
        "must be a layer index or a list of layer indices (non-negative integers)",
    )
}

/// Python's `re.fullmatch(pattern, path)`.
fn full_match(pattern: &str, key: &str) -> Result<Regex> {
    compile(&format!("^(?:{pattern})$"), key)
}

fn compile(pattern: &str, key: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| {
        config_error(
            key,
            format!("the regular expression does not compile here ({e}); look-around and back-references are not supported"),
        )
    })
}

fn config_error(key: &str, why: impl Into<String>) -> Error {
    Error::invalid(format!("adapter_config.json key `{key}`"), why)
}
