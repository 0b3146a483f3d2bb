//! Building blocks of Hugging Face transformer models, computed as transformers computes them
//! so that checkpoints and PEFT adapters trained there give the same outputs here.
//!
//! - [`config`]: a Llama-family decoder's `config.json` (Llama 2/3, Mistral, Qwen2, Mixtral),
//!   in transformers 4's and 5's layouts, with transformers' defaults.
//! - [`rope`]: rotary position embeddings in Hugging Face's rotate-half layout, with Llama-3
//!   frequency scaling.

pub mod config;
pub mod rope;

pub use config::{DecoderConfig, DecoderFamily};
pub use rope::{Rope, RopeScaling};
