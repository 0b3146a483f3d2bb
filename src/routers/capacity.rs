//! Expert capacity and token dropping (GShard, Lepikhin et al. 2020, arXiv 2006.16668;
//! Switch Transformer, Fedus et al. 2021).
//!
//! Each expert accepts at most `C = ceil(capacity_factor · T · k / E)` routing slots per batch.
//! Slots are assigned in order: all first choices (token order), then all second choices, and
//! so on. A slot's position is the running count of slots already accepted by its expert, so
//! second choices queue after every first choice, as in GShard's
//! `position_in_expert_2 = cumsum(mask_2) + Σ mask_1`. A slot at position `≥ C` is dropped:
//! its index becomes `-1` and the token gets no output from that expert (in a residual block
//! it passes through unchanged). The dropless mode simply skips this step.
//!
//! GShard's *second-expert policies* decide which second choices are dispatched at all,
//! before capacity: all of them, only those whose weight reaches a threshold, or each with
//! probability `min(1, 2·w_2)` (GShard's random routing, seeded here for reproducibility).

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::routing::Routing;
use crate::tensor_util::{int_tensor, to_vec_f32, to_vec_i64};

/// Which second (and later) choices are dispatched before capacity is applied.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SecondExpertPolicy {
    /// Dispatch every choice.
    All,
    /// Dispatch a later choice only if its weight is at least the threshold.
    Threshold(f32),
    /// Dispatch a later choice with probability `min(1, 2·w)` (GShard), from a seeded stream.
    Random {
        /// Seed of the host random stream.
        seed: u64,
    },
}

/// Checks that a capacity factor is a positive, finite number.
///
/// # Errors
/// [`Error::Invalid`] otherwise.
pub(crate) fn check_capacity_factor(capacity_factor: f64) -> Result<()> {
    if capacity_factor.is_finite() && capacity_factor > 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            "capacity factor",
            format!("{capacity_factor} must be a positive, finite number"),
        ))
    }
}

/// `ceil(capacity_factor · slots / experts)`, at least 1, for an already checked factor.
pub(crate) fn capacity_of(capacity_factor: f64, slots: usize, experts: usize) -> usize {
    ((capacity_factor * slots as f64 / experts as f64).ceil() as usize).max(1)
}

/// `ceil(capacity_factor · tokens · k / experts)`, at least 1.
///
/// # Errors
/// [`Error::Invalid`] if the factor is not a positive finite number (use the dropless mode
/// for no limit) or `experts` is 0.
pub fn expert_capacity(
    capacity_factor: f64,
    tokens: usize,
    k: usize,
    experts: usize,
) -> Result<usize> {
    check_capacity_factor(capacity_factor)?;
    if experts == 0 {
        return Err(Error::invalid(
            "experts",
            "there must be at least one expert",
        ));
    }
    Ok(capacity_of(capacity_factor, tokens * k, experts))
}

/// Applies the second-expert policy and the capacity `capacity` to `routing`, marking
/// dropped slots `-1`. Weights (and their gradients), auxiliary losses and diagnostics are
/// kept.
///
/// # Errors
/// [`Error::Invalid`] for a zero capacity.
pub fn apply_capacity(
    routing: Routing,
    capacity: usize,
    policy: SecondExpertPolicy,
) -> Result<Routing> {
    if capacity == 0 {
        return Err(Error::invalid("expert capacity", "must be at least 1"));
    }
    let (t, k, e) = (routing.rows(), routing.k(), routing.num_modules());
    let mut idx = to_vec_i64(routing.indices());
    if policy != SecondExpertPolicy::All && k > 1 {
        let w = to_vec_f32(routing.weights());
        let mut rng = SplitMix64::new(match policy {
            SecondExpertPolicy::Random { seed } => seed,
            _ => 0,
        });
        for row in 0..t {
            for j in 1..k {
                let s = row * k + j;
                let keep = match policy {
                    SecondExpertPolicy::Threshold(th) => w[s] >= th,
                    SecondExpertPolicy::Random { .. } => rng.next_f32() < (2.0 * w[s]).min(1.0),
                    SecondExpertPolicy::All => true,
                };
                if !keep {
                    idx[s] = -1;
                }
            }
        }
    }
    let mut accepted = vec![0usize; e];
    for j in 0..k {
        for row in 0..t {
            let s = row * k + j;
            if idx[s] >= 0 {
                let ex = idx[s] as usize;
                if accepted[ex] < capacity {
                    accepted[ex] += 1;
                } else {
                    idx[s] = -1;
                }
            }
        }
    }
    let device = routing.weights().device();
    let indices: Tensor<2, burn::tensor::Int> = int_tensor(&idx, &device).reshape([t, k]);
    let mut out = Routing::new(indices, routing.weights(), e)?;
    out.aux_losses = routing.aux_losses;
    out.diagnostics = routing.diagnostics;
    Ok(out)
}
