//! Building blocks of Hugging Face transformer models, computed as transformers computes them
//! so that checkpoints and PEFT adapters trained there give the same outputs here.
//!
//! [`LoraLinear`]: crate::LoraLinear
//!
//! - [`bert`]: BERT encoders (`BertModel`) with sentence-transformers' mean pooling.
//! - [`config`]: a Llama-family decoder's `config.json` (Llama 2/3, Mistral, Qwen2, Mixtral),
//!   in transformers 4's and 5's layouts, with transformers' defaults.
//! - [`llama`]: the Llama-family causal LM (Llama 2/3, Mistral, Qwen2) with [`LoraLinear`]
//!   projections at transformers' module paths, built from any [`WeightSource`].
//! - [`gpt2`]: GPT-2 with its tied head, `Conv1D` layers as [`LoraLinear`]s.
//! - [`generate`](mod@generate): greedy and sampled generation with a key/value cache, streamed.
//! - [`rope`]: rotary position embeddings in Hugging Face's rotate-half layout, with Llama-3
//!   frequency scaling.
//! - [`routing`](mod@routing): a router in every adapted layer, routing a library of LoRA
//!   adapters per token (Arrow).

pub mod bert;
pub mod config;
pub mod generate;
pub mod gpt2;
pub mod llama;
mod mixed;
mod prune;
pub mod rope;
pub mod routing;

use crate::error::{Error, Result, Scope};
use crate::library::{LoraExpert, LoraFactors, MergeOptions, merge_experts};
use crate::modules::lora::{LoraConfig, LoraLinear};

pub use bert::{BertConfig, BertModel, mean_pooling};
pub use config::{DecoderConfig, DecoderFamily};
pub use generate::{
    CausalLm, Decoding, GenerationConfig, causal_lm_loss, distillation_loss, generate,
    generate_after,
};
pub use gpt2::{Gpt2Config, Gpt2LmHeadModel};
pub use llama::{
    HeadLayout, KvCache, LlamaForCausalLm, PROJECTIONS, WeightSource, checkpoint_shapes,
};
pub use prune::AdapterRanks;
pub use rope::{Rope, RopeScaling};
pub use routing::{
    ArrowOptions, LayerRouters, gen_know_sub, install_routers, remove_routers, route_arrow,
};

/// A model whose linear layers are [`LoraLinear`]s at Hugging Face module paths: what PEFT's
/// target-module rules select from ([`PeftLora::attach_to_model`](crate::PeftLora::attach_to_model)),
/// with PEFT's model-level adapter management (list, activate, delete, merge, unmerge) over
/// every layer at once.
pub trait LinearLayers {
    /// Every linear layer with its path (`model.layers.0.self_attn.q_proj`, `lm_head`), in
    /// module order.
    fn linear_layers(&self) -> Vec<(String, &LoraLinear)>;

    /// [`linear_layers`](Self::linear_layers), mutably.
    fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear)>;

    /// The path of the output layer, which `all-linear` leaves out (`None` when tied).
    fn output_layer(&self) -> Option<&str>;

    /// Adds a new, trainable LoRA adapter `name` (initialised by `config`, `B = 0` as PEFT)
    /// to every layer whose path `select` accepts; it is active. Returns the adapted paths.
    ///
    /// # Errors
    /// [`Error::Invalid`] when `select` accepts no layer; [`Error::DuplicateAdapter`] when a
    /// selected layer has `name` already (nothing changes); configuration errors.
    fn add_lora(
        &mut self,
        name: &str,
        config: &LoraConfig,
        select: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<String>> {
        let mut layers = self.linear_layers_mut();
        layers.retain(|(p, _)| select(p));
        if layers.is_empty() {
            return Err(Error::invalid(
                format!("add_lora `{name}`"),
                "the selection matches no linear layer of the model",
            ));
        }
        if layers.iter().any(|(_, l)| l.holds(name)) {
            return Err(Error::DuplicateAdapter {
                name: name.to_string(),
                scope: Scope::Model,
            });
        }
        let mut paths = Vec::with_capacity(layers.len());
        for (path, layer) in layers {
            layer.add_adapter(name, config)?;
            paths.push(path);
        }
        Ok(paths)
    }

    /// Every adapter name (LoRA or IA3) some layer holds, in the order first met.
    fn adapter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (_, layer) in self.linear_layers() {
            for n in layer.names().iter().chain(layer.ia3_names()) {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
    }

    /// Makes `names` the active adapters of every layer (PEFT's `set_adapter`): each layer
    /// activates those of them it holds, so an adapter that covers some layers only leaves the
    /// others at their base output. An empty list deactivates every adapter.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] for a name no layer holds (nothing changes).
    fn set_active_adapters(&mut self, names: &[&str]) -> Result<()> {
        self.check_adapters(names)?;
        for (_, layer) in self.linear_layers_mut() {
            let held = |have: &[String]| -> Vec<&str> {
                names
                    .iter()
                    .copied()
                    .filter(|n| have.iter().any(|h| h == n))
                    .collect()
            };
            let (lora, ia3) = (held(layer.names()), held(layer.ia3_names()));
            layer.set_active(&lora)?;
            layer.set_active_ia3(&ia3)?;
        }
        Ok(())
    }

    /// Removes adapter `name` from every layer that holds it (unmerging it first where it is
    /// merged), as PEFT's `delete_adapter`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] for a name no layer holds; [`Error::Invalid`] for a merged
    /// IA3 adapter whose merge cannot be undone (a vector entry near zero; nothing changes).
    fn delete_adapter(&mut self, name: &str) -> Result<()> {
        self.check_adapters(&[name])?;
        let mut layers = self.linear_layers_mut();
        for (_, layer) in &layers {
            layer.check_undoable(name)?;
        }
        for (_, layer) in &mut layers {
            layer.remove_named(name)?;
        }
        Ok(())
    }

    /// Merges adapter `name` into the base weight of every layer that holds it (LoRA: `W ← W
    /// + s·A B`; IA3: the vector folded into `W` and, output-side, the bias): the same outputs
    /// at the base model's cost, until [`unmerge_adapter`](Self::unmerge_adapter).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`]; [`Error::AlreadyMerged`] (nothing changes).
    fn merge_adapter(&mut self, name: &str) -> Result<()> {
        self.check_adapters(&[name])?;
        let mut layers = self.linear_layers_mut();
        for (_, layer) in &layers {
            if layer.merged_named(name) == Some(true) {
                return Err(Error::AlreadyMerged {
                    name: name.to_string(),
                    operation: "merging it again",
                });
            }
        }
        for (_, layer) in &mut layers {
            layer.merge_named(name)?;
        }
        Ok(())
    }

    /// Undoes [`merge_adapter`](Self::merge_adapter) in every layer that holds `name` (IA3:
    /// dividing by the vector, to f32 rounding).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`]; [`Error::NotMerged`]; [`Error::Invalid`] for an IA3 vector
    /// with an entry near zero (nothing changes).
    fn unmerge_adapter(&mut self, name: &str) -> Result<()> {
        self.check_adapters(&[name])?;
        let mut layers = self.linear_layers_mut();
        for (_, layer) in &layers {
            if layer.merged_named(name) == Some(false) {
                return Err(Error::NotMerged {
                    name: name.to_string(),
                });
            }
            layer.check_undoable(name)?;
        }
        for (_, layer) in &mut layers {
            layer.unmerge_named(name)?;
        }
        Ok(())
    }

    /// Adds adapter `new_name`, the combination of `adapters` with `weights` by `options`
    /// (PEFT's `add_weighted_adapter`, computed by [`merge_experts`]:
    /// `cat` and delta-space `linear` are the exact weighted sum of the updates; TIES, DARE,
    /// magnitude pruning and SVD as there), in every layer the adapters adapt. The new
    /// adapter is inactive until [`set_active_adapters`](Self::set_active_adapters).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`]; [`Error::DuplicateAdapter`] when `new_name` exists;
    /// [`Error::Invalid`] naming a layer some of the adapters do not adapt; the merge's own
    /// errors (weights, density, rank). Nothing changes on error.
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        options: &MergeOptions,
        new_name: &str,
    ) -> Result<()> {
        self.check_adapters(adapters)?;
        for (_, layer) in self.linear_layers() {
            if let Some(a) = adapters
                .iter()
                .find(|a| layer.ia3_names().iter().any(|n| n == *a))
            {
                return Err(Error::invalid(
                    format!("add_weighted_adapter: adapter `{a}`"),
                    "it is an IA3 adapter; add_weighted_adapter combines LoRA adapters",
                ));
            }
        }
        if self.adapter_names().iter().any(|n| n == new_name) {
            return Err(Error::DuplicateAdapter {
                name: new_name.to_string(),
                scope: Scope::Model,
            });
        }
        let mut experts = vec![LoraExpert::default(); adapters.len()];
        for (path, layer) in self.linear_layers() {
            let held: Vec<bool> = adapters
                .iter()
                .map(|a| layer.names().iter().any(|n| n == a))
                .collect();
            if !held.iter().any(|h| *h) {
                continue;
            }
            if let Some(i) = held.iter().position(|h| !h) {
                return Err(Error::invalid(
                    format!("add_weighted_adapter: layer `{path}`"),
                    format!(
                        "adapter `{}` does not adapt it but others do; combine adapters of the same layers",
                        adapters[i]
                    ),
                ));
            }
            for (e, a) in experts.iter_mut().zip(adapters) {
                e.layers
                    .insert(path.clone(), LoraFactors::from_adapter(layer.adapter(a)?));
            }
        }
        let refs: Vec<&LoraExpert> = experts.iter().collect();
        let merged = merge_experts(&refs, weights, options)?;
        let mut built = Vec::with_capacity(merged.layers.len());
        for (path, layer) in self.linear_layers() {
            if let Some(f) = merged.layers.get(&path) {
                built.push((path, f.to_adapter(&layer.base.weight.val().device())?));
            }
        }
        let mut built: std::collections::HashMap<String, _> = built.into_iter().collect();
        for (path, layer) in self.linear_layers_mut() {
            if let Some(adapter) = built.remove(&path) {
                layer.insert_adapter(new_name, adapter)?;
                let active: Vec<String> = layer
                    .active_adapters()
                    .into_iter()
                    .filter(|n| *n != new_name)
                    .map(str::to_string)
                    .collect();
                let active: Vec<&str> = active.iter().map(String::as_str).collect();
                layer.set_active(&active)?;
            }
        }
        Ok(())
    }

    /// [`Error::UnknownAdapter`] unless some layer holds each of `names`.
    fn check_adapters(&self, names: &[&str]) -> Result<()> {
        let known = self.adapter_names();
        match names.iter().find(|n| !known.iter().any(|k| k == *n)) {
            Some(bad) => Err(Error::UnknownAdapter {
                name: bad.to_string(),
                scope: Scope::Model,
                known,
            }),
            None => Ok(()),
        }
    }
}
