//! Libraries of LoRA experts (Ostapenko et al. 2024, "Towards Modular LLMs by Building and
//! Reusing a Library of LoRAs", arXiv 2405.11157; Zhang et al. 2023, "Composing
//! Parameter-Efficient Modules with Arithmetic Operations", arXiv 2306.14870).
//!
//! - [`factors`]: host copies of LoRA factors ([`LoraFactors`]) and whole experts
//!   ([`LoraExpert`], one LoRA per adapted layer), converted from and to PEFT folders.
//! - [`merge`](mod@merge): every PEFT `add_weighted_adapter` combination type, in PEFT's factor space for
//!   parity and exactly in delta space (the default), task arithmetic, SLERP.
//! - [`arith`]: arithmetic composition of modules (PEM): addition, negation, scaling, for LoRA
//!   and IA3.
//! - [`arrow`]: Arrow prototypes computed exactly from the thin factors, the Arrow router, and
//!   an Arrow-routed Linear with output or factor mixing; GenKnowSub.
//! - The routers over a library (Arrow, Polytropon, X-LoRA) are in [`crate::routers`]; the
//!   LoRA mixtures and AdapterFusion in [`crate::aggregate`].
//! - [`mbc`]: model-based clustering of a library (sparsify, exact Gram-based embedding, cosine
//!   similarity, seeded k-means++).
//!
//! The library's math never touches files: a library folder on disk (JSON index + one PEFT
//! folder per expert, atomic writes, PEFT import/export) is [`store`](super::store), and the PEFT
//! conversions of [`LoraExpert`] live in [`peft`](super::peft).
//!
//! Mixed-adapter batches (each row or sequence its own adapter) are methods of
//! [`LoraLinear`](crate::LoraLinear): `forward_mixed`, `forward_mixed_seqs`, `forward_routed`.
//!
//! Offline operations (merging, prototypes) run on the host in `f64`: the factors are small
//! (`r × d`), and exact linear algebra there (the crate-private `linalg`) is faster than round trips to
//! a device.

pub mod arith;
pub mod arrow;
pub mod factors;
pub mod mbc;
pub mod merge;

pub use arrow::{ArrowLinear, arrow_prototype, arrow_prototypes, gen_know_sub};
pub use factors::{LoraExpert, LoraFactors};
pub use mbc::{Clustering, MbcConfig, mbc_cluster};
pub use merge::{
    Combination, MajoritySign, MergeOptions, MergeSpace, compress, merge, merge_experts,
    merge_experts_with_progress, slerp, slerp_experts, task_arithmetic,
};
