//! Arithmetic composition of parameter-efficient modules (PEM; Zhang et al. 2023, "Composing
//! Parameter-Efficient Modules with Arithmetic Operations", arXiv 2306.14870).
//!
//! - **Addition** `λ·θ₁ + (1−λ)·θ₂` (or any weighted sum). For LoRA, PEM adds the `A`s and the
//!   `B`s separately ([`MergeSpace::Factor`]); modula's default adds the updates exactly
//!   ([`MergeSpace::Delta`], rank `r₁ + r₂`).
//! - **Negation**, to unlearn a skill: LoRA negates `B` (so `ΔW → −ΔW`); IA3 maps a scaling
//!   vector `l` to `(1+λ) − λ·l`, whose deviation from the identity is `−λ` times the original's.
//! - **Scaling** by `λ`: LoRA multiplies its scaling (exactly `λ·ΔW`).

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::library::factors::LoraFactors;
use crate::library::merge::{MergeSpace, cat_form};

/// `−ΔW`: the same LoRA with `B` negated.
pub fn lora_negate(f: &LoraFactors) -> LoraFactors {
    let mut out = f.clone();
    out.b.data.iter_mut().for_each(|v| *v = -*v);
    out
}

/// `λ·ΔW`: the same factors with the scaling multiplied by `λ`.
pub fn lora_scale(f: &LoraFactors, lambda: f64) -> LoraFactors {
    let mut out = f.clone();
    out.scaling *= lambda;
    out
}

/// A weighted sum of LoRAs of one layer: exact (`Σ w_i ΔW_i`, delta space) or PEM's
/// `A = Σ w_i s_i A_i`, `B = Σ w_i B_i` (factor space, one rank).
///
/// # Errors
/// [`Error::Invalid`] for no inputs, a weight count that does not match, or (factor space)
/// different ranks; [`Error::Shape`] for different layer shapes.
pub fn lora_add(
    adapters: &[&LoraFactors],
    weights: &[f64],
    space: MergeSpace,
) -> Result<LoraFactors> {
    let Some(first) = adapters.first() else {
        return Err(Error::invalid("PEM addition", "there are no adapters"));
    };
    if weights.len() != adapters.len() {
        return Err(Error::invalid(
            "PEM addition weights",
            format!("{} weights for {} adapters", weights.len(), adapters.len()),
        ));
    }
    for a in adapters {
        first.check_same_shape(a, "PEM addition")?;
    }
    match space {
        MergeSpace::Delta => Ok(cat_form(adapters, weights)),
        MergeSpace::Factor => {
            if adapters.iter().any(|a| a.rank() != first.rank()) {
                return Err(Error::invalid(
                    "PEM addition in factor space",
                    "adapters must share one rank; use the delta space",
                ));
            }
            let mut out = LoraFactors {
                a: crate::linalg::Mat::zeros(first.rank(), first.d_in()),
                b: crate::linalg::Mat::zeros(first.d_out(), first.rank()),
                scaling: 1.0,
            };
            for (f, &w) in adapters.iter().zip(weights) {
                for (o, v) in out.a.data.iter_mut().zip(&f.a.data) {
                    *o += w * f.scaling * v;
                }
                for (o, v) in out.b.data.iter_mut().zip(&f.b.data) {
                    *o += w * v;
                }
            }
            Ok(out)
        }
    }
}

/// IA3 negation: `(1+λ) − λ·l`.
pub fn ia3_negate(scale: Tensor<1>, lambda: f64) -> Tensor<1> {
    scale.mul_scalar(-lambda).add_scalar(1.0 + lambda)
}

/// A weighted sum of IA3 scaling vectors `Σ w_i l_i` (PEM addition: `λ l₁ + (1−λ) l₂`).
///
/// # Errors
/// [`Error::Invalid`] for no vectors or a weight count that does not match;
/// [`Error::Shape`] for vectors of different lengths.
pub fn ia3_add(scales: &[Tensor<1>], weights: &[f64]) -> Result<Tensor<1>> {
    let Some(first) = scales.first() else {
        return Err(Error::invalid("IA3 addition", "there are no vectors"));
    };
    if weights.len() != scales.len() {
        return Err(Error::invalid(
            "IA3 addition weights",
            format!("{} weights for {} vectors", weights.len(), scales.len()),
        ));
    }
    let n = first.dims()[0];
    let mut out = first.clone().zeros_like();
    for (s, &w) in scales.iter().zip(weights) {
        if s.dims()[0] != n {
            return Err(Error::shape(
                "IA3 addition",
                n.to_string(),
                s.dims()[0].to_string(),
            ));
        }
        out = out + s.clone().mul_scalar(w);
    }
    Ok(out)
}
