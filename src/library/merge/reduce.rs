//! The entry-wise reducers: magnitude pruning, DARE drops, TIES sign election and disjoint
//! mean.

use super::options::{MajoritySign, Reducer};
use crate::rng::SplitMix64;

/// Keeps the `⌊density·n⌋` largest-magnitude entries.
fn magnitude_prune(x: &[f64], density: f64) -> Vec<f64> {
    let k = (density * x.len() as f64) as usize;
    if k >= x.len() {
        return x.to_vec();
    }
    let mut out = vec![0.0; x.len()];
    if k == 0 {
        return out;
    }
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.select_nth_unstable_by(k - 1, |&i, &j| x[j].abs().total_cmp(&x[i].abs()));
    for &i in &idx[..k] {
        out[i] = x[i];
    }
    out
}

/// Drops each entry with probability `1 − density`, rescales the rest by `1/density`.
fn dare_prune(x: &[f64], density: f64, rng: &mut SplitMix64) -> Vec<f64> {
    x.iter()
        .map(|&v| {
            if rng.next_f64() < density {
                v / density
            } else {
                0.0
            }
        })
        .collect()
}

pub(super) fn reduce(
    inputs: &[&[f64]],
    weights: &[f64],
    reducer: Reducer,
    density: f64,
    majority: MajoritySign,
    rng: &mut SplitMix64,
) -> Vec<f64> {
    let n = inputs[0].len();
    let pruned: Vec<Vec<f64>> = match reducer {
        Reducer::Sum => inputs.iter().map(|x| x.to_vec()).collect(),
        Reducer::Ties | Reducer::MagnitudePrune => {
            inputs.iter().map(|x| magnitude_prune(x, density)).collect()
        }
        Reducer::DareLinear | Reducer::DareTies => {
            inputs.iter().map(|x| dare_prune(x, density, rng)).collect()
        }
    };
    let mut out = vec![0.0; n];
    match reducer {
        Reducer::Sum | Reducer::MagnitudePrune | Reducer::DareLinear => {
            for (p, w) in pruned.iter().zip(weights) {
                for (o, v) in out.iter_mut().zip(p) {
                    *o += w * v;
                }
            }
        }
        Reducer::Ties | Reducer::DareTies => {
            for (j, o) in out.iter_mut().enumerate() {
                let elect: f64 = match majority {
                    MajoritySign::Total => pruned.iter().map(|p| p[j]).sum(),
                    MajoritySign::Frequency => pruned.iter().map(|p| sign(p[j])).sum(),
                };
                let majority_sign = if elect >= 0.0 { 1.0 } else { -1.0 };
                let mut sum = 0.0;
                let mut count = 0usize;
                for (p, w) in pruned.iter().zip(weights) {
                    if sign(p[j]) == majority_sign {
                        sum += w * p[j];
                        count += 1;
                    }
                }
                *o = sum / count.max(1) as f64;
            }
        }
    }
    out
}

fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}
