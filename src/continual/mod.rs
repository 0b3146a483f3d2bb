//! Continual learning: learning tasks one after another without forgetting the earlier ones.
//!
//! - [`lmc`]: Local Module Composition (Ostapenko et al. 2021): modules with structural
//!   decoders that route locally, grow when every frozen module finds a task out of
//!   distribution, freeze at the end of a task, infer tasks without ids, and fuse across
//!   independently trained models.
//! - [`replay`]: latent replay (Ostapenko et al. 2022): a class-balanced buffer of frozen-encoder
//!   features (fixed count per class or reservoir), and a nearest-class-mean classifier.
//! - [`l2r`]: Learning to Route (Araujo et al. 2024): frozen per-task modules composed by a
//!   router trained on a small task memory, and the similarity-based baseline.

pub mod l2r;
pub mod lmc;
pub mod replay;

pub use l2r::{train_router_on_task_loss, train_task_router};
pub use lmc::{LmcConfig, LmcLayer, LmcModel, LmcModule, LmcRouting};
pub use replay::{NearestClassMean, ReplayBuffer, ReplayPolicy};
