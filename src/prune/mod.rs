//! Structured pruning: models expose **units** (attention heads, feed-forward neurons, …) that
//! can be masked inside the forward pass and then physically removed, so the pruned model is
//! smaller and faster, not just masked (Dery, "On Resource Efficient Transfer Learning",
//! CMU-CS-24-136).
//!
//! - [`Prunable`]: the role. A model lists its [`UnitGroup`]s (one per block: the heads of one
//!   attention layer, the neurons of one MLP), takes a multiplicative mask per group, reports
//!   its units' outgoing-weight magnitudes and recorded activation RMS (the priors), and slices
//!   its weights to the units kept. A masked forward with 0/1 masks equals the pruned forward.
//! - [`UnitState`]: what a prunable block holds for its units (the mask and the activation
//!   recorder), so every model applies masks the same way.
//! - [`diff`]: the same gates over parameters: diff pruning's sparse delta on a frozen weight.
//! - [`mlp`]: the hidden units of a feed-forward [`Expert`](crate::Expert) (the digits
//!   examples' MLPs, MoE experts) as units.
//! - [`regression`]: Bonsai's sparse linear estimate of unit importance from sub-model metrics.
//! - [`gates`]: learned hard-concrete gates per unit (Louizos et al. 2018) with CoFi's
//!   Lagrangian control of the expected sparsity; their samples are masks for
//!   [`Prunable::set_unit_masks`].
//! - [`mod@bonsai`]: Bonsai's rounds (Dery et al. 2024, arXiv 2402.05406): priors, antithetic
//!   sub-model sampling, the regression, and global removal under a parameter budget, with
//!   forward passes only.

pub mod bonsai;
pub mod diff;
pub mod gates;
pub mod mlp;
pub mod regression;

use std::sync::{Arc, Mutex};

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::tensor_util::int_tensor;

pub use bonsai::{BonsaiConfig, BonsaiReport, Prior, bonsai, one_shot};
pub use diff::DiffPruning;
pub use gates::{
    HardConcrete, Lagrangian, MaskSharing, coupling_penalty, expected_model_sparsity,
    expected_sparsity, gates_for, keep_by_gates, sample_masks,
};
pub use regression::{LinearFit, kendall_tau, lasso, lasso_cv};

/// What kind of unit a group holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnitKind {
    /// An attention head (its query rows, and its share of the output projection).
    AttentionHead,
    /// A feed-forward neuron (a gate/up column and a down row).
    MlpNeuron,
    /// A LoRA rank component (a column of `A` and a row of `B`).
    LoraRank,
    /// A mixture-of-experts expert (its weights and its column of the gate).
    Expert,
}

/// One group of prunable units: a block of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct UnitGroup {
    /// The block's module path (transformers' names: `model.layers.3.self_attn`).
    pub path: String,
    /// The kind of its units.
    pub kind: UnitKind,
    /// How many units it has now.
    pub units: usize,
    /// Parameters removed with one unit (an attention head's key/value share is counted
    /// when the last query head of its group goes, not here).
    pub params_per_unit: usize,
    /// Units the group always keeps (pruning never goes below).
    pub min_units: usize,
}

/// The state a prunable block keeps for its units: a multiplicative mask over them and an
/// optional recorder of each unit's activation energy (for the priors). Cheap to clone; clones
/// share the recorder.
#[derive(Clone, Debug, Default)]
pub struct UnitState {
    /// `[units]`, multiplied into each unit's output; `None`: every unit at 1.
    pub mask: Option<Tensor<1>>,
    recorder: Option<Arc<Mutex<Recorded>>>,
}

/// Sums of squares per unit and the number of values each sum covers.
#[derive(Debug, Default)]
struct Recorded {
    sum_sq: Vec<f64>,
    count: u64,
}

impl UnitState {
    /// Multiplies `h`'s units (along `axis`, of size `units`) by the mask, after recording
    /// their activations when recording.
    ///
    /// # Errors
    /// [`Error::Shape`] for a mask of another length than `h`'s axis.
    pub fn apply<const D: usize>(&self, h: Tensor<D>, axis: usize) -> Result<Tensor<D>> {
        let dims = h.dims();
        let units = dims[axis];
        if let Some(rec) = &self.recorder {
            let mut perm: [usize; D] = std::array::from_fn(|i| i);
            perm.swap(axis, D - 1);
            let total: usize = dims.iter().product();
            let rows = h
                .clone()
                .powi_scalar(2)
                .permute(perm)
                .reshape([total / units.max(1), units]);
            let n = rows.dims()[0] as u64;
            let sums: Vec<f64> = rows
                .sum_dim(0)
                .into_data()
                .iter::<f32>()
                .map(f64::from)
                .collect();
            let mut r = rec.lock().unwrap_or_else(|e| e.into_inner());
            if r.sum_sq.len() != units {
                r.sum_sq = vec![0.0; units];
                r.count = 0;
            }
            r.sum_sq.iter_mut().zip(&sums).for_each(|(a, b)| *a += b);
            r.count += n;
        }
        let Some(mask) = &self.mask else {
            return Ok(h);
        };
        let len = mask.dims()[0];
        if len != units {
            return Err(Error::shape(
                "unit mask",
                format!("{units} units"),
                format!("{len} values"),
            ));
        }
        let shape: [usize; D] = std::array::from_fn(|i| if i == axis { units } else { 1 });
        Ok(h * mask.clone().reshape(shape))
    }

    /// Starts recording (clearing what was recorded) or stops.
    pub fn record(&mut self, on: bool) {
        self.recorder = on.then(Default::default);
    }

    /// Each unit's activation RMS over what was recorded (`None` when not recording or
    /// nothing passed yet).
    pub fn rms(&self) -> Option<Vec<f64>> {
        let r = self.recorder.as_ref()?;
        let r = r.lock().unwrap_or_else(|e| e.into_inner());
        (r.count > 0).then(|| {
            r.sum_sq
                .iter()
                .map(|s| (s / r.count as f64).sqrt())
                .collect()
        })
    }
}

/// A model whose structured units can be masked and removed (see the [module docs](self)).
pub trait Prunable {
    /// The groups of units, in a fixed order every other method follows.
    fn unit_groups(&self) -> Vec<UnitGroup>;

    /// Sets one `[units]` mask per group (in [`unit_groups`](Self::unit_groups) order), or
    /// removes every mask with `None`. Masks may carry gradients (learned gates).
    ///
    /// # Errors
    /// [`Error::Shape`] for a count or length that does not match the groups; nothing
    /// changes on error.
    fn set_unit_masks(&mut self, masks: Option<Vec<Tensor<1>>>) -> Result<()>;

    /// Per group, each unit's mean absolute outgoing weight (the weights that carry its output
    /// onward: an attention head's columns of the output projection, a neuron's row of the
    /// down projection).
    fn unit_weight_magnitudes(&self) -> Vec<Vec<f64>>;

    /// Starts recording each unit's activations in later forward passes (clearing earlier
    /// records), or stops.
    fn record_unit_activations(&mut self, on: bool);

    /// Per group, each unit's activation RMS over the forward passes since recording began.
    ///
    /// # Errors
    /// [`Error::Invalid`] when nothing was recorded (turn recording on, run the model).
    fn unit_activation_rms(&self) -> Result<Vec<Vec<f64>>>;

    /// Physically removes units: `keep[g]` lists the units of group `g` to keep, ascending.
    /// Weights are sliced, so the model gets smaller and faster; masks are cleared. A group
    /// keeps at least its `min_units`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a count of groups that does not match, unsorted, repeated or
    /// out-of-range indices, fewer than a group's `min_units`, or a block holding adapters (prune before attaching them);
    /// nothing changes on error.
    fn prune_units(&mut self, keep: &[Vec<usize>]) -> Result<()>;

    /// Parameters the groups' units hold now: `Σ units × params_per_unit`.
    fn prunable_params(&self) -> usize {
        self.unit_groups()
            .iter()
            .map(|g| g.units * g.params_per_unit)
            .sum()
    }
}

/// Checks `keep` against `groups`: one ascending, in-range, repeat-free list per group.
pub(crate) fn check_keep(groups: &[UnitGroup], keep: &[Vec<usize>]) -> Result<()> {
    if keep.len() != groups.len() {
        return Err(Error::invalid(
            "units to keep",
            format!(
                "{} lists for {} unit groups; give one list per group",
                keep.len(),
                groups.len()
            ),
        ));
    }
    for (g, k) in groups.iter().zip(keep) {
        if k.len() < g.min_units {
            return Err(Error::invalid(
                format!("units to keep in `{}`", g.path),
                format!(
                    "{} units; the group keeps at least {}",
                    k.len(),
                    g.min_units
                ),
            ));
        }
        if k.windows(2).any(|w| w[0] >= w[1]) || k.last().is_some_and(|&u| u >= g.units) {
            return Err(Error::invalid(
                format!("units to keep in `{}`", g.path),
                format!(
                    "{k:?} must be ascending, without repeats, below {}",
                    g.units
                ),
            ));
        }
    }
    Ok(())
}

/// Checks one mask per group, each as long as its group has units.
pub(crate) fn check_masks(groups: &[UnitGroup], masks: &[Tensor<1>]) -> Result<()> {
    if masks.len() != groups.len() {
        return Err(Error::shape(
            "unit masks (one per unit group)",
            groups.len().to_string(),
            masks.len().to_string(),
        ));
    }
    if let Some((g, t)) = groups
        .iter()
        .zip(masks)
        .find(|(g, t)| t.dims()[0] != g.units)
    {
        return Err(Error::shape(
            format!("unit mask of `{}`", g.path),
            g.units.to_string(),
            t.dims()[0].to_string(),
        ));
    }
    Ok(())
}

/// `linear` with `dim` of its weight (0: inputs, 1: outputs, burn's `[in, out]` layout) cut to
/// `keep` (indices of that dim); the bias follows the outputs.
pub(crate) fn slice_linear(linear: &Linear, dim: usize, keep: &[usize]) -> Linear {
    let w = linear.weight.val();
    let ids: Vec<i64> = keep.iter().map(|&i| i as i64).collect();
    let ids = int_tensor(&ids, &w.device());
    Linear {
        weight: Param::from_tensor(w.select(dim, ids.clone())),
        bias: linear.bias.as_ref().map(|b| {
            Param::from_tensor(if dim == 1 {
                b.val().select(0, ids)
            } else {
                b.val()
            })
        }),
    }
}

/// Mean |w| over the row blocks of `w: [units·width, cols]`, one value per unit (a unit's
/// outgoing weights).
pub(crate) fn row_block_means(w: Tensor<2>, units: usize) -> Vec<f64> {
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
