//! Model-Based Clustering (MBC) of a LoRA library, as in mttl (Ostapenko et al. 2024,
//! arXiv 2405.11157, §4): experts whose parameters are similar were trained on related tasks,
//! so clustering the parameters groups tasks without looking at any data.
//!
//! The pipeline, per [`MbcConfig`]:
//! 1. flatten each expert's factors (every layer's `lora_A` then `lora_B`, layers in path
//!    order) into one vector;
//! 2. sparsify: zero the entries whose magnitude is at or below the expert's own
//!    `sparsity`-quantile (linear interpolation, as numpy's `quantile`);
//! 3. embed with a truncated SVD (`X ≈ U_c Σ_c V_cᵀ`, embedding `U_c Σ_c`, as scikit-learn's
//!    `TruncatedSVD.fit_transform`), computed exactly from the `n×n` Gram matrix `X Xᵀ`
//!    (one device matmul, then a Jacobi eigen-solve): no `D`-wide SVD;
//! 4. L2-normalise the embeddings and form the cosine-similarity matrix;
//! 5. k-means++ on the rows of that matrix, `n_init` seeded restarts, keep the lowest inertia.
//!
//! The result is deterministic for a seed. Clusters can then be merged
//! ([`merge_experts`](crate::library::merge_experts)) or retrained per cluster.

use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::library::factors::LoraExpert;
use crate::linalg::{Mat, svd};
use crate::rng::SplitMix64;
use crate::tensor_util::{float_tensor, to_vec_f32};

/// Settings of [`mbc_cluster`]. Serialisable; the fields left out of a JSON document take
/// [`MbcConfig::new`]'s defaults.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MbcConfig {
    /// Number of clusters.
    pub k: usize,
    /// Quantile of each expert's magnitudes below which entries are zeroed, in `[0, 1)`
    /// (0 keeps everything; mttl's pipeline keeps the top 20 %, i.e. 0.8, the default).
    pub sparsity: f64,
    /// Embedding width (capped at `n − 1`); default 64.
    pub n_components: usize,
    /// k-means restarts; default 10.
    pub n_init: usize,
    /// Lloyd iterations per restart at most; default 300.
    pub max_iter: usize,
    /// Seed of the k-means++ draws.
    pub seed: u64,
}

impl Default for MbcConfig {
    /// [`MbcConfig::new`] with 10 clusters.
    fn default() -> Self {
        Self::new(10)
    }
}

impl MbcConfig {
    /// `k` clusters with the defaults above and seed 42.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            sparsity: 0.8,
            n_components: 64,
            n_init: 10,
            max_iter: 300,
            seed: 42,
        }
    }

    /// Sets the sparsity quantile.
    pub fn with_sparsity(mut self, q: f64) -> Self {
        self.sparsity = q;
        self
    }

    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the number of restarts.
    pub fn with_n_init(mut self, n: usize) -> Self {
        self.n_init = n;
        self
    }
}

/// The result of a clustering.
#[derive(Clone, Debug, PartialEq)]
pub struct Clustering {
    /// Cluster of each input, in input order.
    pub assignments: Vec<usize>,
    /// The inputs of each cluster, ascending (clusters numbered by their first member).
    pub clusters: Vec<Vec<usize>>,
    /// k-means inertia (sum of squared distances to the centres) of the kept restart.
    pub inertia: f64,
}

/// One expert's factors as a flat vector: per layer (path order) `lora_A` then `lora_B`,
/// row-major.
pub fn flatten_expert(expert: &LoraExpert) -> Vec<f32> {
    let mut v = Vec::new();
    for f in expert.layers.values() {
        v.extend(f.a.data.iter().map(|&x| x as f32));
        v.extend(f.b.data.iter().map(|&x| x as f32));
    }
    v
}

/// MBC over experts (see the [module docs](self)).
///
/// # Errors
/// [`Error::Invalid`] for fewer experts than clusters, `k = 0`, a sparsity outside `[0, 1)`,
/// or experts whose flattened sizes differ (different layers or ranks).
pub fn mbc_cluster(
    experts: &[&LoraExpert],
    config: &MbcConfig,
    device: &Device,
) -> Result<Clustering> {
    let vectors: Vec<Vec<f32>> = experts.iter().map(|e| flatten_expert(e)).collect();
    mbc_cluster_vectors(&vectors, config, device)
}

/// MBC over already-flattened parameter vectors (one per expert, equal lengths).
///
/// # Errors
/// As [`mbc_cluster`].
pub fn mbc_cluster_vectors(
    vectors: &[Vec<f32>],
    config: &MbcConfig,
    device: &Device,
) -> Result<Clustering> {
    let n = vectors.len();
    if config.k == 0 || config.k > n {
        return Err(Error::invalid(
            "MBC k",
            format!(
                "{} clusters for {n} experts; k must be in 1..={n}",
                config.k
            ),
        ));
    }
    if !(0.0..1.0).contains(&config.sparsity) {
        return Err(Error::invalid(
            "MBC sparsity",
            format!("{} is outside [0, 1)", config.sparsity),
        ));
    }
    let dim = vectors[0].len();
    if let Some((i, v)) = vectors.iter().enumerate().find(|(_, v)| v.len() != dim) {
        return Err(Error::invalid(
            "MBC experts",
            format!(
                "expert {i} has {} parameters but expert 0 has {dim}; cluster experts of one base model, target modules and rank",
                v.len()
            ),
        ));
    }
    let mut flat = Vec::with_capacity(n * dim);
    for v in vectors {
        flat.extend(sparsify(v, config.sparsity));
    }
    // Gram matrix on the device, then its eigen-decomposition on the host.
    let x: Tensor<2> = float_tensor(flat, [n, dim], device);
    let gram = to_vec_f32(x.clone().matmul(x.transpose()));
    let g = Mat::from_f32(n, n, &gram);
    let eig = svd(&g); // symmetric PSD: singular values are eigenvalues σ².
    let c = config.n_components.min(n.saturating_sub(1)).max(1);
    let mut emb = Mat::zeros(n, c);
    for i in 0..n {
        for j in 0..c {
            *emb.at_mut(i, j) = eig.u.at(i, j) * eig.s[j].max(0.0).sqrt();
        }
    }
    normalise_rows(&mut emb);
    let sim = emb.matmul(&emb.t());
    let (assignments, inertia) = kmeans(
        &sim,
        config.k,
        config.n_init.max(1),
        config.max_iter,
        config.seed,
    );
    Ok(relabel(assignments, inertia))
}

/// k-means++ with `n_init` restarts over the rows of `points`; returns the assignments of the
/// restart with the lowest inertia, and that inertia.
pub fn kmeans(
    points: &Mat,
    k: usize,
    n_init: usize,
    max_iter: usize,
    seed: u64,
) -> (Vec<usize>, f64) {
    let mut rng = SplitMix64::new(seed);
    let mut best: Option<(Vec<usize>, f64)> = None;
    for _ in 0..n_init {
        let (a, inertia) = lloyd(points, k, max_iter, &mut rng);
        if best.as_ref().is_none_or(|(_, b)| inertia < *b) {
            best = Some((a, inertia));
        }
    }
    best.unwrap_or_default()
}

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn lloyd(points: &Mat, k: usize, max_iter: usize, rng: &mut SplitMix64) -> (Vec<usize>, f64) {
    let (n, d) = (points.rows, points.cols);
    let row = |i: usize| &points.data[i * d..(i + 1) * d];
    // k-means++ seeding.
    let mut centres: Vec<Vec<f64>> = vec![row(rng.below(n)).to_vec()];
    let mut dist: Vec<f64> = (0..n).map(|i| sq_dist(row(i), &centres[0])).collect();
    while centres.len() < k {
        let total: f64 = dist.iter().sum();
        let pick = if total > 0.0 {
            let mut t = rng.next_f64() * total;
            let mut chosen = n - 1;
            for (i, &di) in dist.iter().enumerate() {
                if t < di {
                    chosen = i;
                    break;
                }
                t -= di;
            }
            chosen
        } else {
            rng.below(n)
        };
        centres.push(row(pick).to_vec());
        for (i, di) in dist.iter_mut().enumerate() {
            *di = di.min(sq_dist(row(i), centres.last().map_or(&[][..], |c| c)));
        }
    }
    let mut assign = vec![usize::MAX; n];
    let mut inertia = 0.0;
    for _ in 0..max_iter.max(1) {
        let mut changed = false;
        inertia = 0.0;
        for (i, a) in assign.iter_mut().enumerate() {
            let (mut bj, mut bd) = (0, f64::INFINITY);
            for (j, c) in centres.iter().enumerate() {
                let dd = sq_dist(row(i), c);
                if dd < bd {
                    (bj, bd) = (j, dd);
                }
            }
            inertia += bd;
            if *a != bj {
                *a = bj;
                changed = true;
            }
        }
        if !changed {
            break;
        }
        let mut sums = vec![vec![0.0; d]; k];
        let mut counts = vec![0usize; k];
        for (i, &a) in assign.iter().enumerate() {
            counts[a] += 1;
            for (s, v) in sums[a].iter_mut().zip(row(i)) {
                *s += v;
            }
        }
        for (j, c) in centres.iter_mut().enumerate() {
            if counts[j] > 0 {
                for (cv, s) in c.iter_mut().zip(&sums[j]) {
                    *cv = s / counts[j] as f64;
                }
            }
        }
    }
    (assign, inertia)
}

/// Numbers clusters by their first member and lists them.
fn relabel(assignments: Vec<usize>, inertia: f64) -> Clustering {
    let mut map: Vec<Option<usize>> = vec![None; assignments.iter().max().map_or(0, |m| m + 1)];
    let mut clusters: Vec<Vec<usize>> = Vec::new();
    let mut out = Vec::with_capacity(assignments.len());
    for (i, &a) in assignments.iter().enumerate() {
        let id = *map[a].get_or_insert_with(|| {
            clusters.push(Vec::new());
            clusters.len() - 1
        });
        clusters[id].push(i);
        out.push(id);
    }
    Clustering {
        assignments: out,
        clusters,
        inertia,
    }
}

fn normalise_rows(m: &mut Mat) {
    let c = m.cols;
    for row in m.data.chunks_mut(c) {
        let n = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if n > 0.0 {
            row.iter_mut().for_each(|v| *v /= n);
        }
    }
}

/// Zeroes entries with `|x| <=` the `q`-quantile of `|x|` (linear interpolation).
fn sparsify(v: &[f32], q: f64) -> Vec<f32> {
    if q <= 0.0 || v.is_empty() {
        return v.to_vec();
    }
    let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
    let pos = q * (mags.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let frac = pos - lo as f64;
    let (_, &mut lo_v, rest) = mags.select_nth_unstable_by(lo, f32::total_cmp);
    let hi_v = if frac > 0.0 {
        rest.iter().copied().fold(f32::INFINITY, f32::min)
    } else {
        lo_v
    };
    let thr = f64::from(lo_v) + frac * (f64::from(hi_v) - f64::from(lo_v));
    v.iter()
        .map(|&x| if f64::from(x.abs()) <= thr { 0.0 } else { x })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparsify_keeps_the_top_fraction() {
        let v: Vec<f32> = (1..=10)
            .map(|i| i as f32 * if i % 2 == 0 { -1.0 } else { 1.0 })
            .collect();
        // numpy: quantile(1..10, 0.8) = 8.2, so |x| <= 8.2 is zeroed: 9 and -10 survive.
        let s = sparsify(&v, 0.8);
        assert_eq!(s.iter().filter(|x| **x != 0.0).count(), 2);
        assert_eq!(s[8], 9.0);
        assert_eq!(s[9], -10.0);
    }
}
