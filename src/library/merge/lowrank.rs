//! The exact weighted sum of LoRAs as one adapter (concatenated factors), and its best
//! low-rank approximation from the thin factors.

use crate::library::factors::LoraFactors;
use crate::linalg::{Mat, lowrank_svd};

/// The exact weighted sum as one adapter: `A = [w_1 s_1 A_1; …]`, `B = [B_1 … B_n]`, scaling
/// 1 (PEFT's `cat`).
pub fn cat_form(adapters: &[&LoraFactors], weights: &[f64]) -> LoraFactors {
    let d_in = adapters[0].d_in();
    let d_out = adapters[0].d_out();
    let total: usize = adapters.iter().map(|a| a.rank()).sum();
    let mut a = Mat::zeros(total, d_in);
    let mut b = Mat::zeros(d_out, total);
    let mut off = 0;
    for (f, &w) in adapters.iter().zip(weights) {
        let ws = w * f.scaling;
        for i in 0..f.rank() {
            for j in 0..d_in {
                *a.at_mut(off + i, j) = ws * f.a.at(i, j);
            }
        }
        for i in 0..d_out {
            for j in 0..f.rank() {
                *b.at_mut(i, off + j) = f.b.at(i, j);
            }
        }
        off += f.rank();
    }
    LoraFactors { a, b, scaling: 1.0 }
}

/// The best rank-`k` approximation of an adapter's update (Eckart–Young), computed from the
/// factors: `B' = U_k Σ_k`, `A' = V_kᵀ`, scaling 1. `k` larger than the rank keeps every
/// non-trivial direction (the result has rank `min(k, r)`).
pub fn compress(f: &LoraFactors, k: usize) -> LoraFactors {
    let mut l = f.b.clone();
    l.data.iter_mut().for_each(|v| *v *= f.scaling);
    let svd = lowrank_svd(&l, &f.a.t());
    let svd = svd.truncate(k.min(f.rank()).max(1));
    let mut b = svd.u;
    b.scale_cols(&svd.s);
    LoraFactors {
        a: svd.v.t(),
        b,
        scaling: 1.0,
    }
}
