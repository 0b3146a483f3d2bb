//! Small dense linear algebra on the host, in `f64`: what the offline library operations
//! (merging, Arrow prototypes, MBC embeddings) need, with no d×d work when the inputs are low
//! rank.
//!
//! - [`qr_thin`]: Householder QR of a tall matrix, `A = Q R` with `Q` `m×n`, `R` `n×n`.
//! - [`svd`]: one-sided Jacobi (Hestenes) SVD, accurate to machine precision for small or
//!   moderately sized matrices, including clustered and repeated singular values (where power
//!   iteration, as PEFT's Arrow uses, converges slowly or to the wrong vector).
//! - [`lowrank_svd`]: the SVD of `L Rᵀ` from the thin factors: QR of each factor, then an
//!   `k×k` core SVD, `O(k²(m+n))` work instead of `O(m·n·min(m,n))`.
//! - [`truncated_svd`]: the leading `k` singular triplets of a dense matrix; exact Jacobi for
//!   small matrices, block subspace iteration with Rayleigh–Ritz to convergence for large ones.
//!
//! Matrices are row-major [`Mat`]s. These routines are deliberately simple and exact; they are
//! not meant to compete with LAPACK on large dense problems.

use crate::rng::SplitMix64;

/// A dense row-major `f64` matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` entries, row-major.
    pub data: Vec<f64>,
}

impl Mat {
    /// An all-zero `rows × cols` matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// The `n × n` identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// A matrix from row-major `f32` values (`values.len()` must be `rows * cols`).
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        Self {
            rows,
            cols,
            data: values.iter().map(|&v| f64::from(v)).collect(),
        }
    }

    /// The entries as row-major `f32`.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }

    /// Entry `(i, j)`.
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// Mutable entry `(i, j)`.
    #[inline]
    pub fn at_mut(&mut self, i: usize, j: usize) -> &mut f64 {
        &mut self.data[i * self.cols + j]
    }

    /// The transpose.
    pub fn t(&self) -> Mat {
        let mut out = Mat::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        out
    }

    /// `self · other`.
    pub fn matmul(&self, other: &Mat) -> Mat {
        assert_eq!(self.cols, other.rows, "matmul: inner dimensions differ");
        let mut out = Mat::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            let orow = &mut out.data[i * other.cols..(i + 1) * other.cols];
            for p in 0..self.cols {
                let a = self.data[i * self.cols + p];
                if a == 0.0 {
                    continue;
                }
                let brow = &other.data[p * other.cols..(p + 1) * other.cols];
                for (o, &b) in orow.iter_mut().zip(brow) {
                    *o += a * b;
                }
            }
        }
        out
    }

    /// The first `k` columns.
    pub fn first_cols(&self, k: usize) -> Mat {
        let mut out = Mat::zeros(self.rows, k);
        for i in 0..self.rows {
            out.data[i * k..(i + 1) * k]
                .copy_from_slice(&self.data[i * self.cols..i * self.cols + k]);
        }
        out
    }

    /// Multiplies column `j` by `s[j]`.
    pub fn scale_cols(&mut self, s: &[f64]) {
        for i in 0..self.rows {
            for (j, &sj) in s.iter().enumerate() {
                self.data[i * self.cols + j] *= sj;
            }
        }
    }

    /// The Frobenius norm.
    pub fn frobenius(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum::<f64>().sqrt()
    }
}

/// Householder QR of an `m × n` matrix with `m ≥ n`: `A = Q R`, `Q` `m×n` with orthonormal
/// columns, `R` `n×n` upper triangular. Rank-deficient inputs are fine (zero columns give zero
/// rows of `R`).
///
/// # Panics
/// If `m < n` (callers in this crate always pass tall factors).
pub fn qr_thin(a: &Mat) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    assert!(m >= n, "qr_thin needs a tall matrix, got {m}x{n}");
    // Work column-major for cache-friendly Householder updates.
    let mut w: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| a.at(i, j)).collect())
        .collect();
    let mut vs: Vec<Vec<f64>> = Vec::with_capacity(n);
    let mut r = Mat::zeros(n, n);
    for j in 0..n {
        let col = &w[j];
        let norm = col[j..].iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut v = col[j..].to_vec();
        let alpha = if v[0] >= 0.0 { -norm } else { norm };
        v[0] -= alpha;
        let vnorm2: f64 = v.iter().map(|x| x * x).sum();
        if vnorm2 > 0.0 && norm > 0.0 {
            for col in w.iter_mut().skip(j) {
                let dot: f64 = v.iter().zip(&col[j..]).map(|(a, b)| a * b).sum();
                let f = 2.0 * dot / vnorm2;
                for (c, vi) in col[j..].iter_mut().zip(&v) {
                    *c -= f * vi;
                }
            }
        } else {
            v.iter_mut().for_each(|x| *x = 0.0);
        }
        for (i, col) in w.iter().enumerate().skip(j) {
            *r.at_mut(j, i) = col[j];
        }
        vs.push(v);
    }
    // Q = H_0 H_1 ... H_{n-1} applied to the first n columns of the identity.
    let mut q_cols: Vec<Vec<f64>> = (0..n)
        .map(|j| {
            let mut e = vec![0.0; m];
            e[j] = 1.0;
            e
        })
        .collect();
    for j in (0..n).rev() {
        let v = &vs[j];
        let vnorm2: f64 = v.iter().map(|x| x * x).sum();
        if vnorm2 == 0.0 {
            continue;
        }
        for col in q_cols.iter_mut() {
            let dot: f64 = v.iter().zip(&col[j..]).map(|(a, b)| a * b).sum();
            let f = 2.0 * dot / vnorm2;
            for (c, vi) in col[j..].iter_mut().zip(v) {
                *c -= f * vi;
            }
        }
    }
    let mut q = Mat::zeros(m, n);
    for (j, col) in q_cols.iter().enumerate() {
        for (i, &v) in col.iter().enumerate() {
            q.data[i * n + j] = v;
        }
    }
    (q, r)
}

/// A singular value decomposition `A = U diag(s) Vᵀ`, singular values in descending order.
#[derive(Debug, Clone)]
pub struct Svd {
    /// Left singular vectors as columns, `m × k`.
    pub u: Mat,
    /// Singular values, descending, length `k`.
    pub s: Vec<f64>,
    /// Right singular vectors as columns, `n × k`.
    pub v: Mat,
}

impl Svd {
    /// Keeps the leading `k` triplets.
    pub fn truncate(mut self, k: usize) -> Svd {
        let k = k.min(self.s.len());
        self.u = self.u.first_cols(k);
        self.v = self.v.first_cols(k);
        self.s.truncate(k);
        self
    }
}

/// The thin SVD of any `m × n` matrix by one-sided Jacobi rotations (`k = min(m, n)`).
pub fn svd(a: &Mat) -> Svd {
    if a.rows < a.cols {
        let t = svd(&a.t());
        return Svd {
            u: t.v,
            s: t.s,
            v: t.u,
        };
    }
    let (m, n) = (a.rows, a.cols);
    // Columns of `g` are orthogonalised in place; `v` accumulates the rotations.
    let mut g: Vec<Vec<f64>> = (0..n)
        .map(|j| (0..m).map(|i| a.at(i, j)).collect())
        .collect();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|j| {
            let mut e = vec![0.0; n];
            e[j] = 1.0;
            e
        })
        .collect();
    let eps = 1e-15;
    for _sweep in 0..60 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (alpha, beta, gamma) = {
                    let (gp, gq) = (&g[p], &g[q]);
                    let mut alpha = 0.0;
                    let mut beta = 0.0;
                    let mut gamma = 0.0;
                    for (x, y) in gp.iter().zip(gq) {
                        alpha += x * x;
                        beta += y * y;
                        gamma += x * y;
                    }
                    (alpha, beta, gamma)
                };
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut g, p, q, c, s);
                rotate(&mut v, p, q, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(usize, f64)> = g
        .iter()
        .enumerate()
        .map(|(j, col)| (j, col.iter().map(|x| x * x).sum::<f64>().sqrt()))
        .collect();
    order.sort_by(|x, y| y.1.total_cmp(&x.1));
    let mut u = Mat::zeros(m, n);
    let mut vm = Mat::zeros(n, n);
    let mut s = Vec::with_capacity(n);
    for (k, &(j, sigma)) in order.iter().enumerate() {
        s.push(sigma);
        for (i, &gi) in g[j].iter().enumerate() {
            u.data[i * n + k] = if sigma > 0.0 { gi / sigma } else { 0.0 };
        }
        for (i, &vi) in v[j].iter().enumerate() {
            vm.data[i * n + k] = vi;
        }
    }
    Svd { u, s, v: vm }
}

fn rotate(cols: &mut [Vec<f64>], p: usize, q: usize, c: f64, s: f64) {
    let (lo, hi) = cols.split_at_mut(q);
    for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
        let (xp, xq) = (*x, *y);
        *x = c * xp - s * xq;
        *y = s * xp + c * xq;
    }
}

/// The SVD of `L · Rᵀ` (`L` is `m×k`, `R` is `n×k`) computed from the factors: thin QR of
/// each, an SVD of the `k×k` core `R_L R_Rᵀ`, and the rotations back. Never forms the `m×n`
/// product. Returns `k` triplets (some may be zero when the product has lower rank).
pub fn lowrank_svd(l: &Mat, r: &Mat) -> Svd {
    assert_eq!(
        l.cols, r.cols,
        "lowrank_svd: factors must share their inner dimension"
    );
    let k = l.cols;
    if l.rows < k || r.rows < k {
        // More factor columns than rows: the product is small, do it directly.
        return svd(&l.matmul(&r.t()));
    }
    let (ql, rl) = qr_thin(l);
    let (qr, rr) = qr_thin(r);
    let core = rl.matmul(&rr.t());
    let inner = svd(&core);
    Svd {
        u: ql.matmul(&inner.u),
        s: inner.s,
        v: qr.matmul(&inner.v),
    }
}

/// The leading `k` singular triplets of a dense matrix. Matrices whose smaller side is at most
/// 256 get the exact Jacobi SVD; larger ones block subspace iteration (oversampled by
/// `max(k, 8)`) with Rayleigh–Ritz, run until the leading `k` singular values change by less
/// than `1e-12` relative (at most 500 iterations).
pub fn truncated_svd(a: &Mat, k: usize) -> Svd {
    let small = a.rows.min(a.cols);
    let k = k.min(small);
    if small <= 256 {
        return svd(a).truncate(k);
    }
    let p = (k + k.max(8)).min(small);
    // Deterministic start: a fixed pseudo-random block.
    let mut rng = SplitMix64::new(0x9E37_79B9_7F4A_7C15);
    let mut q = Mat::zeros(a.cols, p);
    for v in q.data.iter_mut() {
        *v = rng.next_f64() - 0.5;
    }
    let at = a.t();
    let mut prev: Vec<f64> = vec![f64::INFINITY; k];
    let mut q = qr_thin(&q).0;
    let mut iterations = 0;
    let ritz = loop {
        let (qy, _) = qr_thin(&a.matmul(&q)); // m×p
        q = qr_thin(&at.matmul(&qy)).0; // n×p
        // Rayleigh–Ritz: the SVD of A Q (m×p) gives the Ritz values.
        let ritz = svd(&a.matmul(&q));
        let cur: Vec<f64> = ritz.s[..k].to_vec();
        let converged = cur
            .iter()
            .zip(&prev)
            .all(|(c, p)| (c - p).abs() <= 1e-12 * cur[0].max(f64::MIN_POSITIVE));
        prev = cur;
        iterations += 1;
        if converged || iterations == 500 {
            break ritz;
        }
    };
    // A Q = U S Wᵀ  ⇒  A ≈ U S (Q W)ᵀ.
    let v = q.matmul(&ritz.v);
    Svd {
        u: ritz.u,
        s: ritz.s,
        v,
    }
    .truncate(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_mat(rows: usize, cols: usize, seed: u64) -> Mat {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let mut m = Mat::zeros(rows, cols);
        for v in m.data.iter_mut() {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *v = ((state >> 33) as f64 / (1u64 << 31) as f64) - 0.5;
        }
        m
    }

    fn reconstruct(s: &Svd) -> Mat {
        let mut u = s.u.clone();
        u.scale_cols(&s.s);
        u.matmul(&s.v.t())
    }

    fn max_diff(a: &Mat, b: &Mat) -> f64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn qr_reconstructs_and_is_orthonormal() {
        let a = rand_mat(20, 6, 3);
        let (q, r) = qr_thin(&a);
        assert!(max_diff(&q.matmul(&r), &a) < 1e-12);
        assert!(max_diff(&q.t().matmul(&q), &Mat::identity(6)) < 1e-12);
    }

    #[test]
    fn svd_reconstructs_wide_and_tall() {
        for (m, n) in [(9, 5), (5, 9), (7, 7)] {
            let a = rand_mat(m, n, (m * n) as u64);
            let s = svd(&a);
            assert!(max_diff(&reconstruct(&s), &a) < 1e-12, "{m}x{n}");
            assert!(s.s.windows(2).all(|w| w[0] >= w[1]));
        }
    }

    #[test]
    fn lowrank_svd_matches_dense() {
        let l = rand_mat(30, 4, 1);
        let r = rand_mat(25, 4, 2);
        let dense = svd(&l.matmul(&r.t()));
        let thin = lowrank_svd(&l, &r);
        for i in 0..4 {
            assert!((dense.s[i] - thin.s[i]).abs() < 1e-12);
        }
        assert!(max_diff(&reconstruct(&thin), &l.matmul(&r.t())) < 1e-12);
    }

    #[test]
    fn truncated_svd_large_matches_leading_values() {
        // A 300x280 matrix with a known spectrum: U diag(s) Vᵀ.
        let (u, _) = qr_thin(&rand_mat(300, 20, 5));
        let (v, _) = qr_thin(&rand_mat(280, 20, 6));
        let s: Vec<f64> = (0..20).map(|i| 10.0 / (1.0 + i as f64)).collect();
        let mut us = u.clone();
        us.scale_cols(&s);
        let a = us.matmul(&v.t());
        let t = truncated_svd(&a, 4);
        assert_eq!(t.s.len(), 4);
        assert_eq!((t.u.rows, t.u.cols, t.v.rows, t.v.cols), (300, 4, 280, 4));
        for (got, want) in t.s.iter().zip(&s) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        // The vectors: the planted ones up to a sign shared by u_i and v_i, orthonormal, and
        // together the best rank-4 approximation U₄ S₄ V₄ᵀ. The iteration stops on the values
        // (1e-12 relative change), which bounds the vectors' error only by about its square
        // root, 1e-6 (measured here: 1e-7 for the fourth pair, whose gap σ₅/σ₄ is 0.8).
        for i in 0..4 {
            let cu: f64 = (0..300).map(|r| t.u.at(r, i) * u.at(r, i)).sum();
            let sign = cu.signum();
            let du = (0..300)
                .map(|r| (t.u.at(r, i) - sign * u.at(r, i)).powi(2))
                .sum::<f64>()
                .sqrt();
            let dv = (0..280)
                .map(|r| (t.v.at(r, i) - sign * v.at(r, i)).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(
                du < 1e-6 && dv < 1e-6,
                "vector {i}: |Δu| = {du:e}, |Δv| = {dv:e}"
            );
        }
        assert!(max_diff(&t.u.t().matmul(&t.u), &Mat::identity(4)) < 1e-12);
        assert!(max_diff(&t.v.t().matmul(&t.v), &Mat::identity(4)) < 1e-12);
        let mut u4 = u.first_cols(4);
        u4.scale_cols(&s[..4]);
        let best = u4.matmul(&v.first_cols(4).t());
        let err = max_diff(&reconstruct(&t), &best);
        assert!(err < 1e-7, "rank-4 reconstruction off by {err:e}");
    }
}
