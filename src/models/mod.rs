//! Building blocks of Hugging Face transformer models, computed as transformers computes them
//! so that checkpoints and PEFT adapters trained there give the same outputs here.
//!
//! - [`rope`]: rotary position embeddings in Hugging Face's rotate-half layout, with Llama-3
//!   frequency scaling.

pub mod rope;

pub use rope::{Rope, RopeScaling};
