//! SLERP between two updates, from the factors.

use super::check_same_layers;
use super::lowrank::cat_form;
use crate::error::{Error, Result};
use crate::library::factors::{LoraExpert, LoraFactors};

/// Spherical interpolation between two updates, `t ∈ [0, 1]` (mergekit's SLERP applied to
/// `ΔW`): with `θ` the angle between `ΔW_a` and `ΔW_b` (computed from the factors),
/// `sin((1−t)θ)/sin θ · ΔW_a + sin(tθ)/sin θ · ΔW_b`, falling back to linear interpolation when
/// the updates are nearly parallel (`|cos θ| > 0.9995`). Exact: the result has rank
/// `r_a + r_b`.
///
/// # Errors
/// [`Error::Invalid`] for `t` outside `[0, 1]` or a zero update; [`Error::Shape`] for layers
/// of different shapes.
pub fn slerp(a: &LoraFactors, b: &LoraFactors, t: f64) -> Result<LoraFactors> {
    a.check_same_shape(b, "slerp")?;
    if !(0.0..=1.0).contains(&t) {
        return Err(Error::invalid("slerp t", format!("{t} is outside [0, 1]")));
    }
    let (na, nb) = (a.delta_norm(), b.delta_norm());
    if na == 0.0 || nb == 0.0 {
        return Err(Error::invalid(
            "slerp",
            "one of the updates is zero, so the angle between them is undefined",
        ));
    }
    let cos = (a.delta_dot(b) / (na * nb)).clamp(-1.0, 1.0);
    let (wa, wb) = if cos.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = cos.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    Ok(cat_form(&[a, b], &[wa, wb]))
}

/// SLERP of two experts, layer by layer.
///
/// # Errors
/// As [`slerp`], plus experts that adapt different layers.
pub fn slerp_experts(a: &LoraExpert, b: &LoraExpert, t: f64) -> Result<LoraExpert> {
    check_same_layers(&[a, b])?;
    let mut out = LoraExpert::default();
    for (path, fa) in &a.layers {
        out.layers
            .insert(path.clone(), slerp(fa, b.layer(path)?, t)?);
    }
    Ok(out)
}
