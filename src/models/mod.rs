//! Building blocks of Hugging Face transformer models, computed as transformers computes them
//! so that checkpoints and PEFT adapters trained there give the same outputs here.
//!
//! [`LoraLinear`]: crate::LoraLinear
//!
//! - [`config`]: a Llama-family decoder's `config.json` (Llama 2/3, Mistral, Qwen2, Mixtral),
//!   in transformers 4's and 5's layouts, with transformers' defaults.
//! - [`llama`]: the Llama-family causal LM (Llama 2/3, Mistral, Qwen2) with [`LoraLinear`]
//!   projections at transformers' module paths, built from any [`WeightSource`].
//! - [`rope`]: rotary position embeddings in Hugging Face's rotate-half layout, with Llama-3
//!   frequency scaling.

pub mod config;
pub mod llama;
pub mod rope;

pub use config::{DecoderConfig, DecoderFamily};
pub use llama::{LlamaForCausalLm, WeightSource};
pub use rope::{Rope, RopeScaling};
