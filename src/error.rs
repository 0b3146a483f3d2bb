//! The crate's error type.
//!
//! Every fallible public API returns [`Result<T>`](Result), whose error names what was wrong
//! and how to fix it. Bad input never panics inside the library.

use std::path::PathBuf;

/// Errors returned by modula's public APIs.
#[derive(Debug, thiserror::Error)]
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

    /// A named adapter does not exist on a layer.
    #[error(
        "unknown adapter `{name}`{on}; known adapters: [{known}]. Add it first or pick one of these names"
    )]
    UnknownAdapter {
        /// The name that was asked for.
        name: String,
        /// Where it was looked up (" on layer fc1"), or empty.
        on: String,
        /// Comma-separated known names.
        known: String,
    },

    /// An adapter name is already taken on a layer.
    #[error("adapter `{name}` already exists{on}; remove it first or choose another name")]
    DuplicateAdapter {
        /// The name that clashes.
        name: String,
        /// Where it clashed, or empty.
        on: String,
    },

    /// A routing has NaN or infinite values, or indices outside the module range.
    #[error("invalid routing: {0}")]
    Routing(String),

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

    /// An operation that is not valid in the layer's current state (e.g. unmerging an adapter
    /// that is not merged).
    #[error("invalid state: {0}")]
    State(String),
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

    pub(crate) fn peft(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        Error::Peft {
            path: path.into(),
            why: why.into(),
        }
    }
}
