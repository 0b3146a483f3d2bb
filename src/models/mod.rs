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

use crate::modules::lora::LoraLinear;

pub use config::{DecoderConfig, DecoderFamily};
pub use llama::{LlamaForCausalLm, WeightSource, checkpoint_shapes};
pub use rope::{Rope, RopeScaling};

/// A model whose linear layers are [`LoraLinear`]s at Hugging Face module paths: what PEFT's
/// target-module rules select from ([`PeftLora::attach_to_model`](crate::PeftLora::attach_to_model)).
pub trait LinearLayers {
    /// Every linear layer with its path (`model.layers.0.self_attn.q_proj`, `lm_head`), in
    /// module order.
    fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear)>;

    /// The path of the output layer, which `all-linear` leaves out (`None` when tied).
    fn output_layer(&self) -> Option<&str>;
}
