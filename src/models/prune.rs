//! Structured pruning of the Llama-family decoders ([`Prunable`] for [`LlamaForCausalLm`])
//! and of LoRA ranks in any model ([`AdapterRanks`]):
//! attention heads and feed-forward neurons of every layer, and rank components.
//!
//! - A **head** is its `head_dim` query columns of `q_proj` and rows of `o_proj`; its mask
//!   multiplies its attention output before `o_proj`. A key/value head goes with the last
//!   query head it serves (grouped-query attention), so pruning keeps a
//!   [`HeadLayout`](super::llama::HeadLayout) of which key/value head each remaining query head
//!   reads.
//! - A **neuron** is one column of `gate_proj` and `up_proj` and one row of `down_proj`; its
//!   mask multiplies `silu(gate) · up` before `down_proj`.
//! - An **expert** of a Mixtral layer is its weights and its column of the gate; its mask
//!   scales its routing probability before the top-k choice (renormalised), so a masked expert
//!   is never chosen ([`TopKRouter::expert_mask`](crate::TopKRouter::expert_mask)). Experts
//!   record no activations: the activation prior counts each at 1 (its weight magnitude).
//!
//! Every group keeps at least one unit (a Mixtral layer at least `k` experts). A pruned model computes as the masked one did; its per-layer shapes no
//! longer follow `config.json`, so it is used in memory (save adapters trained on it, not the
//! model as a Hugging Face checkpoint).

use burn::module::Module;
use burn::tensor::Tensor;

use super::LinearLayers;
use super::llama::{HeadLayout, LlamaForCausalLm};
use crate::error::{Error, Result};
use crate::modules::lora::{LoraLinear, LoraModule};
use crate::prune::{
    Prunable, UnitGroup, UnitKind, check_keep, check_masks, row_block_means, slice_linear,
};
use crate::tensor_util::int_tensor;

/// `layer`'s base with its weight's `dim` cut to `keep`, as a fresh (adapter-free) layer.
fn slice_layer(layer: &LoraLinear, dim: usize, keep: &[usize]) -> LoraLinear {
    LoraLinear::new(slice_linear(&layer.base, dim, keep))
}

/// Indices `u·width .. (u+1)·width` for each unit `u` of `units`.
fn spans(units: &[usize], width: usize) -> Vec<usize> {
    units
        .iter()
        .flat_map(|&u| u * width..(u + 1) * width)
        .collect()
}

impl LlamaForCausalLm {
    /// Query heads and key/value heads of layer `l` now, and its layout.
    fn layer_heads(&self, l: usize) -> HeadLayout {
        let c = &self.config;
        match &self.model.layers[l].self_attn.heads {
            Some(layout) => layout.clone(),
            None => {
                let g = c.num_attention_heads / c.num_key_value_heads.max(1);
                HeadLayout {
                    kv_of: (0..c.num_attention_heads).map(|i| i / g.max(1)).collect(),
                    kv_heads: c.num_key_value_heads,
                }
            }
        }
    }
}

impl Prunable for LlamaForCausalLm {
    /// Per layer, its attention heads (`model.layers.{i}.self_attn`), then its neurons
    /// (`model.layers.{i}.mlp`, dense layers only).
    fn unit_groups(&self) -> Vec<UnitGroup> {
        let c = &self.config;
        let (d, hd) = (c.hidden_size, c.head_dim);
        let mut out = Vec::new();
        for (l, layer) in self.model.layers.iter().enumerate() {
            let q_bias = usize::from(layer.self_attn.q_proj.base.bias.is_some());
            out.push(UnitGroup {
                path: format!("model.layers.{l}.self_attn"),
                kind: UnitKind::AttentionHead,
                units: self.layer_heads(l).kv_of.len(),
                params_per_unit: hd * d + hd * q_bias + hd * d,
                min_units: 1,
            });
            if let Some(mlp) = &layer.mlp {
                let ff = mlp.down_proj.d_in();
                let bias = usize::from(mlp.gate_proj.base.bias.is_some());
                out.push(UnitGroup {
                    path: format!("model.layers.{l}.mlp"),
                    kind: UnitKind::MlpNeuron,
                    units: ff,
                    params_per_unit: 3 * d + 2 * bias,
                    min_units: 1,
                });
            }
            if let Some(moe) = &layer.block_sparse_moe {
                let per_expert = moe.experts.first().map_or(0, |e| {
                    e.w_in.weight.shape().num_elements() + e.w_out.weight.shape().num_elements()
                });
                out.push(UnitGroup {
                    path: format!("model.layers.{l}.block_sparse_moe"),
                    kind: UnitKind::Expert,
                    units: moe.experts.len(),
                    params_per_unit: per_expert + d,
                    min_units: moe.router.k,
                });
            }
        }
        out
    }

    fn set_unit_masks(&mut self, masks: Option<Vec<Tensor<1>>>) -> Result<()> {
        if let Some(m) = &masks {
            check_masks(&self.unit_groups(), m)?;
        }
        let mut masks = masks.map(Vec::into_iter);
        for layer in &mut self.model.layers {
            layer.self_attn.units.mask = masks.as_mut().and_then(Iterator::next);
            if let Some(mlp) = &mut layer.mlp {
                mlp.units.mask = masks.as_mut().and_then(Iterator::next);
            }
            if let Some(moe) = &mut layer.block_sparse_moe {
                moe.router.expert_mask = masks.as_mut().and_then(Iterator::next);
            }
        }
        Ok(())
    }

    /// Heads: mean |w| of their `o_proj` rows; neurons: of their `down_proj` row.
    fn unit_weight_magnitudes(&self) -> Vec<Vec<f64>> {
        let mut out = Vec::new();
        for (l, layer) in self.model.layers.iter().enumerate() {
            let h = self.layer_heads(l).kv_of.len();
            out.push(row_block_means(layer.self_attn.o_proj.base.weight.val(), h));
            if let Some(mlp) = &layer.mlp {
                let w = mlp.down_proj.base.weight.val();
                let ff = w.dims()[0];
                out.push(row_block_means(w, ff));
            }
            if let Some(moe) = &layer.block_sparse_moe {
                out.push(
                    moe.experts
                        .iter()
                        .map(|e| row_block_means(e.w_out.weight.val(), 1)[0])
                        .collect(),
                );
            }
        }
        out
    }

    fn record_unit_activations(&mut self, on: bool) {
        for layer in &mut self.model.layers {
            layer.self_attn.units.record(on);
            if let Some(mlp) = &mut layer.mlp {
                mlp.units.record(on);
            }
        }
    }

    fn unit_activation_rms(&self) -> Result<Vec<Vec<f64>>> {
        let mut out = Vec::new();
        for layer in &self.model.layers {
            let mut states = vec![&layer.self_attn.units];
            if let Some(mlp) = &layer.mlp {
                states.push(&mlp.units);
            }
            for s in states {
                out.push(s.rms().ok_or_else(|| {
                    Error::invalid(
                        "unit activations",
                        "nothing was recorded; call record_unit_activations(true) and run the \
                         model first",
                    )
                })?);
            }
            if let Some(moe) = &layer.block_sparse_moe {
                out.push(vec![1.0; moe.experts.len()]);
            }
        }
        Ok(out)
    }

    fn prune_units(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        let groups = self.unit_groups();
        check_keep(&groups, keep)?;
        for (l, layer) in self.model.layers.iter().enumerate() {
            let mut held = layer
                .projections()
                .into_iter()
                .filter(|(_, p)| !p.names().is_empty() || !p.ia3_names().is_empty());
            if let Some((name, _)) = held.next() {
                return Err(Error::invalid(
                    format!("pruning `model.layers.{l}.{name}`"),
                    "the layer holds adapters; prune the base model before attaching adapters \
                     (or merge them first)",
                ));
            }
        }
        let hd = self.config.head_dim;
        let mut keep = keep.iter();
        for l in 0..self.model.layers.len() {
            let layout = self.layer_heads(l);
            let heads = keep.next().cloned().unwrap_or_default();
            // Key/value heads still read by a kept query head, renumbered in order.
            let mut kv_kept: Vec<usize> = heads.iter().map(|&h| layout.kv_of[h]).collect();
            kv_kept.dedup();
            let kv_of: Vec<usize> = heads
                .iter()
                .map(|&h| {
                    kv_kept
                        .iter()
                        .position(|&j| j == layout.kv_of[h])
                        .unwrap_or(0)
                })
                .collect();
            let layer = &mut self.model.layers[l];
            let a = &mut layer.self_attn;
            a.q_proj = slice_layer(&a.q_proj, 1, &spans(&heads, hd));
            a.k_proj = slice_layer(&a.k_proj, 1, &spans(&kv_kept, hd));
            a.v_proj = slice_layer(&a.v_proj, 1, &spans(&kv_kept, hd));
            a.o_proj = slice_layer(&a.o_proj, 0, &spans(&heads, hd));
            a.heads = Some(HeadLayout {
                kv_of,
                kv_heads: kv_kept.len(),
            });
            a.units.mask = None;
            if let Some(mlp) = &mut layer.mlp {
                let neurons = keep.next().cloned().unwrap_or_default();
                mlp.gate_proj = slice_layer(&mlp.gate_proj, 1, &neurons);
                mlp.up_proj = slice_layer(&mlp.up_proj, 1, &neurons);
                mlp.down_proj = slice_layer(&mlp.down_proj, 0, &neurons);
                mlp.units.mask = None;
            }
            if let Some(moe) = &mut layer.block_sparse_moe {
                let experts = keep.next().cloned().unwrap_or_default();
                moe.router.gate = slice_linear(&moe.router.gate, 1, &experts).no_grad();
                moe.experts = experts.iter().map(|&e| moe.experts[e].clone()).collect();
                moe.router.expert_mask = None;
            }
        }
        Ok(())
    }
}

/// The rank components of one LoRA adapter across a model, as prunable units: one group per
/// layer holding the adapter (its path), one unit per rank component (a column of `A` and a
/// row of `B`). A mask scales the components ([`LoraModule::rank_mask`](crate::LoraModule::rank_mask));
/// pruning slices `A` and `B` and rescales `alpha` so that `alpha / r` (or `alpha / √r` for
/// rsLoRA) is unchanged, so the pruned adapter computes what the masked one did.
///
/// Rank components record no activations: use [`Prior::Magnitude`](crate::prune::Prior) (the
/// mean |row of `B`|) or random priors with them.
#[derive(Debug)]
pub struct AdapterRanks<M> {
    /// The model.
    pub model: M,
    /// The adapter whose ranks are pruned.
    pub adapter: String,
}

impl<M: LinearLayers> AdapterRanks<M> {
    /// The ranks of `adapter` in `model`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] when no layer holds it.
    pub fn new(model: M, adapter: &str) -> Result<Self> {
        model.check_adapters(&[adapter])?;
        Ok(Self {
            model,
            adapter: adapter.to_string(),
        })
    }

    fn held(&self) -> Vec<(String, &LoraLinear)> {
        self.model
            .linear_layers()
            .into_iter()
            .filter(|(_, l)| l.names().contains(&self.adapter))
            .collect()
    }
}

impl<M: LinearLayers> Prunable for AdapterRanks<M> {
    fn unit_groups(&self) -> Vec<UnitGroup> {
        self.held()
            .into_iter()
            .filter_map(|(path, l)| {
                let a = l.adapter(&self.adapter).ok()?;
                Some(UnitGroup {
                    path,
                    kind: UnitKind::LoraRank,
                    units: a.rank(),
                    params_per_unit: a.d_in() + a.d_out(),
                    min_units: 1,
                })
            })
            .collect()
    }

    fn set_unit_masks(&mut self, masks: Option<Vec<Tensor<1>>>) -> Result<()> {
        if let Some(m) = &masks {
            check_masks(&self.unit_groups(), m)?;
        }
        let mut masks = masks.map(Vec::into_iter);
        let name = self.adapter.clone();
        for (_, layer) in self.model.linear_layers_mut() {
            if !layer.names().contains(&name) {
                continue;
            }
            let mut a = layer.adapter(&name)?.clone();
            a.rank_mask = masks.as_mut().and_then(Iterator::next);
            layer.replace_adapter(&name, a)?;
        }
        Ok(())
    }

    /// Mean |row of `B`| per rank component, times its scaling.
    fn unit_weight_magnitudes(&self) -> Vec<Vec<f64>> {
        self.held()
            .into_iter()
            .filter_map(|(_, l)| {
                let a = l.adapter(&self.adapter).ok()?;
                let r = a.rank();
                Some(
                    row_block_means(a.b.val(), r)
                        .into_iter()
                        .map(|v| v * a.scaling())
                        .collect(),
                )
            })
            .collect()
    }

    fn record_unit_activations(&mut self, _on: bool) {}

    fn unit_activation_rms(&self) -> Result<Vec<Vec<f64>>> {
        Err(Error::invalid(
            "LoRA rank activations",
            "rank components record no activations; prune them with the magnitude or random \
             prior",
        ))
    }

    fn prune_units(&mut self, keep: &[Vec<usize>]) -> Result<()> {
        let groups = self.unit_groups();
        check_keep(&groups, keep)?;
        let name = self.adapter.clone();
        let mut keep = keep.iter();
        for (_, layer) in self.model.linear_layers_mut() {
            if !layer.names().contains(&name) {
                continue;
            }
            let k = keep.next().cloned().unwrap_or_default();
            let old = layer.adapter(&name)?;
            let ids: Vec<i64> = k.iter().map(|&i| i as i64).collect();
            let ids = int_tensor(&ids, &old.a.val().device());
            let (r, r2) = (old.rank() as f64, k.len() as f64);
            // Keep the scaling: alpha / r (or / √r) stays what it was.
            let alpha = if old.use_rslora {
                old.alpha * (r2 / r).sqrt()
            } else {
                old.alpha * r2 / r
            };
            let mut new = LoraModule::from_factors(
                old.a.val().select(1, ids.clone()),
                old.b.val().select(0, ids),
                alpha,
                old.use_rslora,
                old.dropout.prob,
            )?;
            new.dropout = old.dropout.clone();
            layer.replace_adapter(&name, new)?;
        }
        Ok(())
    }
}
