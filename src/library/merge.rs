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

use crate::error::{Error, Result};
use crate::library::factors::{LoraExpert, LoraFactors};
use crate::linalg::{Mat, lowrank_svd, truncated_svd};
use crate::rng::SplitMix64;

/// PEFT's `combination_type`s (serialised under PEFT's names: `"ties_svd"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combination {
    /// `linear`: weighted sum.
    Linear,
    /// `cat`: concatenate the factors (exact weighted sum of updates, rank `Σ r_i`).
    Cat,
    /// `svd`: weighted sum of updates, truncated SVD.
    Svd,
    /// `ties`.
    Ties,
    /// `ties_svd`.
    TiesSvd,
    /// `dare_linear`.
    DareLinear,
    /// `dare_ties`.
    DareTies,
    /// `dare_linear_svd`.
    DareLinearSvd,
    /// `dare_ties_svd`.
    DareTiesSvd,
    /// `magnitude_prune`.
    MagnitudePrune,
    /// `magnitude_prune_svd`.
    MagnitudePruneSvd,
}

/// How the entries of the (pruned) inputs are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reducer {
    Sum,
    Ties,
    MagnitudePrune,
    DareLinear,
    DareTies,
}

impl Combination {
    /// Every combination type, in PEFT's documentation order.
    pub const ALL: [Combination; 11] = [
        Combination::Svd,
        Combination::Linear,
        Combination::Cat,
        Combination::Ties,
        Combination::TiesSvd,
        Combination::DareTies,
        Combination::DareLinear,
        Combination::DareTiesSvd,
        Combination::DareLinearSvd,
        Combination::MagnitudePrune,
        Combination::MagnitudePruneSvd,
    ];

    /// PEFT's name (`"ties_svd"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Combination::Linear => "linear",
            Combination::Cat => "cat",
            Combination::Svd => "svd",
            Combination::Ties => "ties",
            Combination::TiesSvd => "ties_svd",
            Combination::DareLinear => "dare_linear",
            Combination::DareTies => "dare_ties",
            Combination::DareLinearSvd => "dare_linear_svd",
            Combination::DareTiesSvd => "dare_ties_svd",
            Combination::MagnitudePrune => "magnitude_prune",
            Combination::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Parses PEFT's name.
    ///
    /// # Errors
    /// [`Error::Invalid`] listing the valid names.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.name() == name)
            .ok_or_else(|| {
                Error::invalid(
                    "combination type",
                    format!(
                        "`{name}` is not one of: {}",
                        Self::ALL.map(|c| c.name()).join(", ")
                    ),
                )
            })
    }

    fn reducer(self) -> Reducer {
        match self {
            Combination::Linear | Combination::Cat | Combination::Svd => Reducer::Sum,
            Combination::Ties | Combination::TiesSvd => Reducer::Ties,
            Combination::DareLinear | Combination::DareLinearSvd => Reducer::DareLinear,
            Combination::DareTies | Combination::DareTiesSvd => Reducer::DareTies,
            Combination::MagnitudePrune | Combination::MagnitudePruneSvd => Reducer::MagnitudePrune,
        }
    }

    /// Whether the type needs a `density`.
    pub fn needs_density(self) -> bool {
        self.reducer() != Reducer::Sum
    }

    /// Whether PEFT computes this type on the dense updates (`svd` and the `*_svd` types).
    fn is_svd(self) -> bool {
        matches!(
            self,
            Combination::Svd
                | Combination::TiesSvd
                | Combination::DareLinearSvd
                | Combination::DareTiesSvd
                | Combination::MagnitudePruneSvd
        )
    }
}

impl std::str::FromStr for Combination {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// Where the merge is computed; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeSpace {
    /// Exact combination of the updates `ΔW_i` (the default).
    #[default]
    Delta,
    /// PEFT 0.21's separate merging of `A` and `B` (for parity).
    Factor,
}

impl std::str::FromStr for MergeSpace {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "delta" => Ok(MergeSpace::Delta),
            "factor" => Ok(MergeSpace::Factor),
            other => Err(Error::invalid(
                "merge space",
                format!("`{other}` is neither `delta` nor `factor`"),
            )),
        }
    }
}

/// TIES sign election.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MajoritySign {
    /// Sign of the sum of the pruned inputs (PEFT's `"total"`, the default).
    #[default]
    Total,
    /// Sign of the sum of their signs (`"frequency"`).
    Frequency,
}

/// Settings of a merge. Serialisable (JSON: `{"combination": "ties", "density": 0.5}`; the
/// fields left out take [`MergeOptions::new`]'s values).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeOptions {
    /// The combination type.
    pub combination: Combination,
    /// Delta (exact, default) or factor (PEFT) space.
    #[serde(default)]
    pub space: MergeSpace,
    /// Fraction of entries kept by TIES, DARE and magnitude pruning, in `(0, 1]`.
    #[serde(default)]
    pub density: Option<f64>,
    /// TIES sign election.
    #[serde(default)]
    pub majority_sign: MajoritySign,
    /// Rank of the result for SVD re-compression (default: the largest input rank; `linear`
    /// in delta space is only compressed when this is set).
    #[serde(default)]
    pub svd_rank: Option<usize>,
    /// Seed of DARE's random drops.
    #[serde(default)]
    pub seed: u64,
}

impl MergeOptions {
    /// Options for `combination` in delta space, no density, seed 0.
    pub fn new(combination: Combination) -> Self {
        Self {
            combination,
            space: MergeSpace::Delta,
            density: None,
            majority_sign: MajoritySign::Total,
            svd_rank: None,
            seed: 0,
        }
    }

    /// Sets the space.
    pub fn with_space(mut self, space: MergeSpace) -> Self {
        self.space = space;
        self
    }

    /// Sets the density.
    pub fn with_density(mut self, density: f64) -> Self {
        self.density = Some(density);
        self
    }

    /// Sets the TIES sign election.
    pub fn with_majority_sign(mut self, m: MajoritySign) -> Self {
        self.majority_sign = m;
        self
    }

    /// Sets the rank of the result.
    pub fn with_svd_rank(mut self, k: usize) -> Self {
        self.svd_rank = Some(k);
        self
    }

    /// Sets the DARE seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    fn density(&self) -> Result<f64> {
        match self.density {
            Some(d) if d > 0.0 && d <= 1.0 => Ok(d),
            Some(d) => Err(Error::invalid(
                "merge density",
                format!("{d} is outside (0, 1]; it is the fraction of entries kept"),
            )),
            None if self.combination.needs_density() => Err(Error::invalid(
                "merge density",
                format!(
                    "`{}` needs a density (the fraction of entries kept), e.g. 0.5",
                    self.combination.name()
                ),
            )),
            None => Ok(1.0),
        }
    }
}

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
            let deltas: Vec<Mat> = adapters.iter().map(|a| a.delta()).collect();
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
            LoraFactors::new(svd.v.t(), b, 1.0)
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
            LoraFactors::new(
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

fn reduce(
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
