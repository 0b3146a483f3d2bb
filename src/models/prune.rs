//! Structured pruning of the Llama-family decoders ([`Prunable`] for [`LlamaForCausalLm`]):
//! attention heads and feed-forward neurons of every layer.
//!
//! - A **head** is its `head_dim` query columns of `q_proj` and rows of `o_proj`; its mask
//!   multiplies its attention output before `o_proj`. A key/value head goes with the last
//!   query head it serves (grouped-query attention), so pruning keeps a
//!   [`HeadLayout`](super::llama::HeadLayout) of which key/value head each remaining query head
//!   reads.
//! - A **neuron** is one column of `gate_proj` and `up_proj` and one row of `down_proj`; its
//!   mask multiplies `silu(gate) · up` before `down_proj`.
//!
//! Mixtral layers have heads only (their experts are not neuron groups here). Every group keeps
//! at least one unit. A pruned model computes as the masked one did; its per-layer shapes no
//! longer follow `config.json`, so it is used in memory (save adapters trained on it, not the
//! model as a Hugging Face checkpoint).

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::Tensor;

use super::llama::{HeadLayout, LlamaForCausalLm};
use crate::error::{Error, Result};
use crate::modules::lora::LoraLinear;
use crate::prune::{Prunable, UnitGroup, UnitKind, check_keep};
use crate::tensor_util::int_tensor;

/// `layer` with its base weight's `dim` (0: inputs, 1: outputs, burn's `[in, out]` layout)
/// cut to `keep` (indices of that dim), the bias along with the outputs.
fn slice_linear(layer: &LoraLinear, dim: usize, keep: &[usize]) -> LoraLinear {
    let w = layer.base.weight.val();
    let ids: Vec<i64> = keep.iter().map(|&i| i as i64).collect();
    let ids = int_tensor(&ids, &w.device());
    let bias = layer.base.bias.as_ref().map(|b| {
        let b = b.val();
        Param::from_tensor(if dim == 1 {
            b.select(0, ids.clone())
        } else {
            b
        })
    });
    LoraLinear::new(Linear {
        weight: Param::from_tensor(w.select(dim, ids)),
        bias,
    })
}

/// Indices `u·width .. (u+1)·width` for each unit `u` of `units`.
fn spans(units: &[usize], width: usize) -> Vec<usize> {
    units
        .iter()
        .flat_map(|&u| u * width..(u + 1) * width)
        .collect()
}

/// Mean |w| over the row blocks of `w: [units·width, cols]`, one value per unit.
fn row_block_means(w: Tensor<2>, units: usize) -> Vec<f64> {
    let [rows, cols] = w.dims();
    let width = rows / units.max(1);
    let v: Vec<f32> = w.abs().into_data().iter::<f32>().collect();
    (0..units)
        .map(|u| {
            let block = &v[u * width * cols..(u + 1) * width * cols];
            block.iter().map(|&x| f64::from(x)).sum::<f64>() / block.len().max(1) as f64
        })
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
        }
        out
    }

    fn set_unit_masks(&mut self, masks: Option<Vec<Tensor<1>>>) -> Result<()> {
        let groups = self.unit_groups();
        if let Some(m) = &masks {
            if m.len() != groups.len() {
                return Err(Error::shape(
                    "unit masks (one per unit group)",
                    groups.len().to_string(),
                    m.len().to_string(),
                ));
            }
            for (g, t) in groups.iter().zip(m) {
                if t.dims()[0] != g.units {
                    return Err(Error::shape(
                        format!("unit mask of `{}`", g.path),
                        g.units.to_string(),
                        t.dims()[0].to_string(),
                    ));
                }
            }
        }
        let mut masks = masks.map(Vec::into_iter);
        for layer in &mut self.model.layers {
            layer.self_attn.units.mask = masks.as_mut().and_then(Iterator::next);
            if let Some(mlp) = &mut layer.mlp {
                mlp.units.mask = masks.as_mut().and_then(Iterator::next);
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
            a.q_proj = slice_linear(&a.q_proj, 1, &spans(&heads, hd));
            a.k_proj = slice_linear(&a.k_proj, 1, &spans(&kv_kept, hd));
            a.v_proj = slice_linear(&a.v_proj, 1, &spans(&kv_kept, hd));
            a.o_proj = slice_linear(&a.o_proj, 0, &spans(&heads, hd));
            a.heads = Some(HeadLayout {
                kv_of,
                kv_heads: kv_kept.len(),
            });
            a.units.mask = None;
            if let Some(mlp) = &mut layer.mlp {
                let neurons = keep.next().cloned().unwrap_or_default();
                mlp.gate_proj = slice_linear(&mlp.gate_proj, 1, &neurons);
                mlp.up_proj = slice_linear(&mlp.up_proj, 1, &neurons);
                mlp.down_proj = slice_linear(&mlp.down_proj, 0, &neurons);
                mlp.units.mask = None;
            }
        }
        Ok(())
    }
}
