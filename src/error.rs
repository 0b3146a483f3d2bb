//! The crate's error type.
//!
//! Every fallible public API returns [`Result<T>`](Result), whose error names what was wrong
//! and how to fix it. Bad input never panics inside the library.

use std::path::PathBuf;

/// Errors returned by modula's public APIs.
///
/// Each variant carries the values a caller can branch on (an index, a name, a limit), not
/// only a message. New variants may be added in minor releases.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor or a configuration has the wrong shape.
    #[error("shape mismatch in {context}: expected {expected}, got {got}")]
    Shape {
        /// Where the mismatch was found (a layer path, an argument name).
        context: String,
        /// What the caller should have passed.
        expected: String,
        /// What the caller passed.
        got: String,
    },

    /// An argument is outside its valid range (rank 0, negative dropout, k > experts, ...).
    #[error("invalid {what}: {why}")]
    Invalid {
        /// The argument or setting that is wrong.
        what: String,
        /// Why it is wrong and what would be accepted.
        why: String,
    },

    /// A named adapter (or expert, or module path) does not exist where it was looked up.
    #[error(
        "unknown {} `{name}`{scope}; known {}s: [{}]. Add it first or pick one of these names",
        scope.noun(),
        scope.noun(),
        known.join(", ")
    )]
    UnknownAdapter {
        /// The name that was asked for.
        name: String,
        /// Where it was looked up.
        scope: Scope,
        /// The names that exist there.
        known: Vec<String>,
    },

    /// A name is already taken where it was to be added.
    #[error("{} `{name}` already exists{scope}; remove it first or choose another name", scope.noun())]
    DuplicateAdapter {
        /// The name that clashes.
        name: String,
        /// Where it clashed.
        scope: Scope,
    },

    /// A routing refers to a module that does not exist.
    #[error(
        "module index {index} is outside 0..{num_modules} (use -1 for a dropped slot); the routing must match the number of modules"
    )]
    ModuleIndex {
        /// The index found.
        index: i64,
        /// The number of modules routed among.
        num_modules: usize,
    },

    /// A tensor that must be finite (routing weights, router logits) has NaN or infinite
    /// values.
    #[error(
        "{what} has non-finite values (NaN or infinite); check the inputs and the learning rate"
    )]
    NonFinite {
        /// The tensor concerned.
        what: String,
    },

    /// A token or task id is outside the range a router or table was built for.
    #[error(
        "{what} {id} is outside {within} 0..{bound}; pass ids below {bound} or rebuild it larger"
    )]
    IdOutOfRange {
        /// `"task id"` or `"token id"`.
        what: &'static str,
        /// What the ids index (`"the hash router's vocabulary"`, ...).
        within: &'static str,
        /// The id found.
        id: i64,
        /// The exclusive upper bound.
        bound: usize,
    },

    /// A router was given an input kind it does not read (token ids for a learned gate, ...).
    #[error("{router} routes {expected}, not {got}; pass a RouterInput of the kind it reads")]
    RouterInput {
        /// The router.
        router: &'static str,
        /// The kinds it reads.
        expected: &'static str,
        /// The kind it was given.
        got: &'static str,
    },

    /// An adapter (or IA3 vector) is merged into its base weight, and the operation needs it
    /// unmerged.
    #[error("adapter `{name}` is merged into the base weight; unmerge it before {operation}")]
    AlreadyMerged {
        /// The adapter.
        name: String,
        /// What was attempted.
        operation: &'static str,
    },

    /// Unmerging an adapter (or IA3 vector) that is not merged.
    #[error("adapter `{name}` is not merged; there is nothing to unmerge")]
    NotMerged {
        /// The adapter.
        name: String,
    },

    /// An object was used before the step that prepares it (a model with no task heads, a
    /// projection before any fit).
    #[error("{what} is not ready: {fix}")]
    NotReady {
        /// What was used.
        what: String,
        /// The step that must come first.
        fix: String,
    },

    /// A PEFT adapter folder or config is malformed, inconsistent or uses unsupported features.
    #[error("PEFT adapter {path}: {why}")]
    Peft {
        /// The file or folder concerned.
        path: PathBuf,
        /// What is wrong and how to fix it.
        why: String,
    },

    /// A safetensors file could not be parsed or lacks a tensor.
    #[error("safetensors file {path}: {why}")]
    SafeTensors {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },

    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON document could not be parsed or written.
    #[error("JSON error in {path}: {source}")]
    Json {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

/// Where a name was looked up (for [`Error::UnknownAdapter`] and [`Error::DuplicateAdapter`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Scope {
    /// The adapters of one layer.
    Layer,
    /// The adapters of a whole model (any of its layers).
    Model,
    /// The module paths of a PEFT LoRA folder.
    PeftLora,
    /// The module paths of a PEFT IA3 folder.
    PeftIa3,
    /// The layers of a library expert.
    ExpertLayers,
    /// The experts of a library folder.
    Library(PathBuf),
}

impl Scope {
    fn noun(&self) -> &'static str {
        match self {
            Scope::Layer | Scope::Model => "adapter",
            Scope::PeftLora | Scope::PeftIa3 | Scope::ExpertLayers => "module path",
            Scope::Library(_) => "expert",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Layer => Ok(()),
            Scope::Model => write!(f, " in any layer of the model"),
            Scope::PeftLora => write!(f, " in the PEFT LoRA adapter"),
            Scope::PeftIa3 => write!(f, " in the PEFT IA3 adapter"),
            Scope::ExpertLayers => write!(f, " among the expert's layers"),
            Scope::Library(dir) => write!(f, " in library {}", dir.display()),
        }
    }
}

/// `Result` with modula's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(
        context: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        Error::Shape {
            context: context.into(),
            expected: expected.into(),
            got: got.into(),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn non_finite(what: impl Into<String>) -> Self {
        Error::NonFinite { what: what.into() }
    }

    pub(crate) fn peft(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        Error::Peft {
            path: path.into(),
            why: why.into(),
        }
    }
}
