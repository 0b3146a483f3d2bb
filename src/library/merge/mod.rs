//! Merging LoRA experts: every combination type of PEFT 0.21's `add_weighted_adapter`, exact
//! delta-space merges with low-rank re-compression, task arithmetic and SLERP.
//!
//! ## Two semantics, and which is which
//! A merge of LoRAs `ΔW_i = s_i B_i A_i` with weights `w_i` can mean two different things:
//!
//! - **Delta space (the default, exact).** The result's update is the combination of the
//!   *updates*: `linear` gives exactly `Σ w_i s_i B_i A_i`. That sum has rank at most `Σ r_i`
//!   and is stored exactly as the concatenation `B = [B_1 … B_n]`, `A = [w_1 s_1 A_1; …]`;
//!   with `svd_rank = k` it is re-compressed to its best rank-`k` approximation computed from
//!   the thin factors (QR of each side, then a `Σr × Σr` SVD; no `d_out × d_in` matrix).
//!   TIES, DARE and magnitude pruning act entry-wise on the dense updates (that is their
//!   definition), then the result is compressed back to rank `svd_rank` (default: the largest
//!   input rank). This is what PEFT calls `*_svd`, and what mergekit does on full weights.
//! - **Factor space (PEFT parity).** PEFT's `linear`, `ties`, `dare_*` and `magnitude_prune`
//!   merge the `A`s and the `B`s *separately*, each with weight `√|w_i s_i|` (the sign goes to
//!   `A`). The result is a rank-`r` adapter whose update is **not** `Σ w_i ΔW_i` (cross terms
//!   `B_i A_j` appear). Choose [`MergeSpace::Factor`] to reproduce PEFT's numbers.
//!
//! `cat` and `svd` mean the same in both spaces (they are exact already) and so do the `*_svd`
//! types. Every merged adapter has scaling 1 (PEFT writes `lora_alpha = r`), so the stored
//! factors carry the whole update. PEFT 0.21 instead keeps `use_rslora` on the merged adapter,
//! which then scales it by `√r`; modula does not copy that.
//!
//! ## The reducers (Yadav et al. 2023, TIES; Yu et al. 2024, DARE)
//! - *magnitude prune*: keep the `⌊density·n⌋` largest-magnitude entries of each input.
//! - *TIES*: magnitude prune, elect a sign per entry (`total`: sign of the sum of the pruned
//!   inputs; `frequency`: sign of the sum of their signs), keep the entries that agree with it,
//!   weight them, and divide by the number kept (disjoint mean).
//! - *DARE*: drop each entry with probability `1 − density` and rescale the rest by
//!   `1/density`; `dare_linear` then sums, `dare_ties` does the TIES election and disjoint mean.
//!
//! ## Other operations
//! - [`task_arithmetic`]: `Σ λ_i ΔW_i` (Ilharco et al. 2023), exact, optionally compressed.
//! - [`slerp`]: spherical interpolation between two updates (as mergekit does on weights),
//!   with the angle computed from the factors; the result is exact (it is a weighted sum).

//!
//! ## Files
//! `options.rs` (the combination types and [`MergeOptions`]), `reduce.rs` (the entry-wise
//! reducers), `lowrank.rs` (the exact concatenation and Eckart–Young re-compression),
//! `slerp.rs`, and this file (the merges themselves).

mod lowrank;
mod options;
mod reduce;
mod slerp;

pub use lowrank::{cat_form, compress};
pub use options::{Combination, MajoritySign, MergeOptions, MergeSpace};
pub use slerp::{slerp, slerp_experts};

use crate::error::{Error, Result};
use crate::library::factors::{LoraExpert, LoraFactors};
use crate::linalg::{Mat, truncated_svd};
use crate::rng::SplitMix64;
use reduce::reduce;

/// Merges LoRAs of one layer with `weights`; the result has scaling 1.
///
/// # Errors
/// [`Error::Invalid`] for no inputs, a weight count that differs from the input count,
/// non-finite weights, a missing or out-of-range density, `svd_rank = 0`, or (factor space,
/// PEFT's rule) inputs of different ranks for `linear`, `ties`, `dare_*` or `magnitude_prune`;
/// [`Error::Shape`] for inputs that adapt layers of different shapes.
pub fn merge(
    adapters: &[&LoraFactors],
    weights: &[f64],
    options: &MergeOptions,
) -> Result<LoraFactors> {
    let first = check_inputs(adapters, weights)?;
    let density = options.density()?;
    if options.svd_rank == Some(0) {
        return Err(Error::invalid("svd_rank", "must be at least 1"));
    }
    let max_rank = adapters.iter().map(|a| a.rank()).max().unwrap_or(1);
    let target_rank = options.svd_rank.unwrap_or(max_rank);
    let c = options.combination;
    let mut rng = SplitMix64::new(options.seed);
    match (c, options.space) {
        // The exact weighted sum in cat form; compressed only when a rank is asked for in
        // delta space (PEFT's `cat` keeps the full rank).
        (Combination::Cat, space) | (Combination::Linear, space @ MergeSpace::Delta) => {
            let cat = cat_form(adapters, weights);
            Ok(match options.svd_rank {
                Some(k) if space == MergeSpace::Delta => compress(&cat, k),
                _ => cat,
            })
        }
        (Combination::Svd, _) => Ok(compress(&cat_form(adapters, weights), target_rank)),
        (c, space) if c.is_svd() || space == MergeSpace::Delta => {
            // Dense reducers on the updates, then re-compression.
            let deltas: Vec<Mat> = adapters.iter().map(|a| a.delta_mat()).collect();
            let slices: Vec<&[f64]> = deltas.iter().map(|d| d.data.as_slice()).collect();
            let merged = reduce(
                &slices,
                weights,
                c.reducer(),
                density,
                options.majority_sign,
                &mut rng,
            );
            let dense = Mat {
                rows: first.d_out(),
                cols: first.d_in(),
                data: merged,
            };
            let svd = truncated_svd(&dense, target_rank);
            let mut b = svd.u;
            b.scale_cols(&svd.s);
            LoraFactors::from_mats(svd.v.t(), b, 1.0)
        }
        (c, _) => {
            // PEFT's factor-space merge.
            if adapters.iter().any(|a| a.rank() != first.rank()) {
                return Err(Error::invalid(
                    "factor-space merge",
                    format!(
                        "`{}` in factor space needs adapters of one rank (PEFT's rule), got ranks {:?}; use the delta space, `cat` or `svd`",
                        c.name(),
                        adapters.iter().map(|a| a.rank()).collect::<Vec<_>>()
                    ),
                ));
            }
            let ws: Vec<f64> = adapters
                .iter()
                .zip(weights)
                .map(|(a, w)| w * a.scaling)
                .collect();
            let wa: Vec<f64> = ws.iter().map(|w| w.signum() * w.abs().sqrt()).collect();
            let wb: Vec<f64> = ws.iter().map(|w| w.abs().sqrt()).collect();
            let a_in: Vec<&[f64]> = adapters.iter().map(|a| a.a.data.as_slice()).collect();
            let b_in: Vec<&[f64]> = adapters.iter().map(|a| a.b.data.as_slice()).collect();
            let a = reduce(
                &a_in,
                &wa,
                c.reducer(),
                density,
                options.majority_sign,
                &mut rng,
            );
            let b = reduce(
                &b_in,
                &wb,
                c.reducer(),
                density,
                options.majority_sign,
                &mut rng,
            );
            LoraFactors::from_mats(
                Mat {
                    rows: first.rank(),
                    cols: first.d_in(),
                    data: a,
                },
                Mat {
                    rows: first.d_out(),
                    cols: first.rank(),
                    data: b,
                },
                1.0,
            )
        }
    }
}

/// Merges whole experts layer by layer (see [`merge`]). DARE draws differ per layer but are
/// fixed by the seed.
///
/// # Errors
/// As [`merge`], plus [`Error::Invalid`] if the experts do not adapt the same layers.
pub fn merge_experts(
    experts: &[&LoraExpert],
    weights: &[f64],
    options: &MergeOptions,
) -> Result<LoraExpert> {
    merge_experts_with_progress(experts, weights, options, |_| {})
}

/// [`merge_experts`], calling `on_layer(path)` after each layer is merged (for progress
/// reporting).
///
/// # Errors
/// As [`merge_experts`].
pub fn merge_experts_with_progress(
    experts: &[&LoraExpert],
    weights: &[f64],
    options: &MergeOptions,
    mut on_layer: impl FnMut(&str),
) -> Result<LoraExpert> {
    let Some(first) = experts.first() else {
        return Err(Error::invalid("merge", "there are no experts to merge"));
    };
    check_same_layers(experts)?;
    let mut out = LoraExpert::default();
    for (i, path) in first.layers.keys().enumerate() {
        let layer: Vec<&LoraFactors> = experts
            .iter()
            .map(|e| e.layer(path))
            .collect::<Result<_>>()?;
        let opts = options.clone().with_seed(
            options
                .seed
                .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        );
        out.layers
            .insert(path.clone(), merge(&layer, weights, &opts)?);
        on_layer(path);
    }
    Ok(out)
}

/// Task arithmetic (Ilharco et al. 2023): `Σ λ_i ΔW_i`, exact (rank `Σ r_i`), or compressed to
/// `rank` from the thin factors. Negative `λ` subtracts a task.
///
/// # Errors
/// As [`merge`].
pub fn task_arithmetic(
    experts: &[&LoraExpert],
    lambdas: &[f64],
    rank: Option<usize>,
) -> Result<LoraExpert> {
    let mut opts = MergeOptions::new(Combination::Linear);
    opts.svd_rank = rank;
    merge_experts(experts, lambdas, &opts)
}

fn check_inputs<'a>(adapters: &[&'a LoraFactors], weights: &[f64]) -> Result<&'a LoraFactors> {
    let Some(first) = adapters.first() else {
        return Err(Error::invalid("merge", "there are no adapters to merge"));
    };
    if weights.len() != adapters.len() {
        return Err(Error::invalid(
            "merge weights",
            format!(
                "{} weights for {} adapters; give one weight per adapter",
                weights.len(),
                adapters.len()
            ),
        ));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(Error::invalid(
            "merge weights",
            format!("{w} is not finite"),
        ));
    }
    for a in &adapters[1..] {
        first.check_same_shape(a, "merge (all adapters must adapt the same layer)")?;
    }
    Ok(first)
}

fn check_same_layers(experts: &[&LoraExpert]) -> Result<()> {
    let first: Vec<&String> = experts[0].layers.keys().collect();
    for (i, e) in experts.iter().enumerate().skip(1) {
        let these: Vec<&String> = e.layers.keys().collect();
        if these != first {
            return Err(Error::invalid(
                "merge",
                format!(
                    "expert {i} adapts layers {these:?} but expert 0 adapts {first:?}; experts must share one base model and target modules"
                ),
            ));
        }
    }
    Ok(())
}
