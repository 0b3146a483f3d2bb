//! Bonsai's estimator of unit importance (Dery et al. 2024, "Everybody Prune Now", arXiv
//! 2402.05406, §3): from `n` sub-models, each a 0/1 mask `m ∈ {0,1}^p` over the candidate units
//! and the metric `U(m)` it scored, fit a sparse linear model
//!
//! ```text
//! β̂ = argmin_β  1/(2n) Σ_i (U_i − b − ⟨β, m_i⟩)² + λ ‖β‖₁
//! ```
//!
//! by cyclic coordinate descent on centred data (the lasso), and read `β̂_j` as unit `j`'s
//! contribution. The penalty `λ` is chosen from a grid by k-fold cross-validation of Kendall's
//! rank correlation between held-out predictions and metrics: what pruning needs is the order
//! of the units, not the metric's scale. Host math in `f64`.

use crate::error::{Error, Result};

/// Kendall's rank correlation τ-b of two equally long samples (ties counted as neither
/// concordant nor discordant, τ-b's normalisation); 0 when either sample is constant.
///
/// # Errors
/// [`Error::Invalid`] for samples of different lengths or fewer than two values.
pub fn kendall_tau(a: &[f64], b: &[f64]) -> Result<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return Err(Error::invalid(
            "Kendall's tau",
            format!(
                "samples of {} and {} values; give two equally long samples of at least 2",
                a.len(),
                b.len()
            ),
        ));
    }
    let (mut concordant, mut discordant, mut ties_a, mut ties_b) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            let (da, db) = (a[i] - a[j], b[i] - b[j]);
            match (da == 0.0, db == 0.0) {
                (true, true) => {}
                (true, false) => ties_a += 1,
                (false, true) => ties_b += 1,
                (false, false) if (da > 0.0) == (db > 0.0) => concordant += 1,
                (false, false) => discordant += 1,
            }
        }
    }
    let n0 = (concordant + discordant) as f64;
    let denom = ((n0 + ties_a as f64) * (n0 + ties_b as f64)).sqrt();
    Ok(if denom > 0.0 {
        (concordant - discordant) as f64 / denom
    } else {
        0.0
    })
}

/// A fitted linear model of the metric: `U ≈ intercept + ⟨coefficients, m⟩`.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearFit {
    /// One coefficient per candidate unit: its estimated contribution to the metric.
    pub coefficients: Vec<f64>,
    /// The intercept.
    pub intercept: f64,
    /// The penalty the fit used.
    pub lambda: f64,
    /// Mean held-out Kendall τ of the chosen penalty (`None` when it was not cross-validated).
    pub cv_tau: Option<f64>,
}

impl LinearFit {
    /// The model's prediction for one mask.
    pub fn predict(&self, mask: &[f64]) -> f64 {
        self.intercept
            + self
                .coefficients
                .iter()
                .zip(mask)
                .map(|(c, m)| c * m)
                .sum::<f64>()
    }
}

/// Checks a design: `masks` rows of equal width, one metric each, all finite.
fn check_design(masks: &[Vec<f64>], metrics: &[f64]) -> Result<usize> {
    if masks.is_empty() || masks.len() != metrics.len() {
        return Err(Error::invalid(
            "unit-importance regression",
            format!(
                "{} masks and {} metrics; give one metric per mask, at least one",
                masks.len(),
                metrics.len()
            ),
        ));
    }
    let p = masks[0].len();
    if p == 0 || masks.iter().any(|m| m.len() != p) {
        return Err(Error::invalid(
            "unit-importance regression",
            "masks must all cover the same, non-empty set of units",
        ));
    }
    if metrics.iter().any(|v| !v.is_finite()) || masks.iter().flatten().any(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "unit-importance regression",
            "a metric or mask value is NaN or infinite; clamp the metric (e.g. a perplexity cap)",
        ));
    }
    Ok(p)
}

/// The lasso at penalty `lambda` (see the [module docs](self)), by cyclic coordinate descent
/// until the largest coefficient change is below `1e-6` of the metric's scale or 1000 sweeps.
///
/// # Errors
/// [`Error::Invalid`] for an empty or ragged design, non-finite values or a negative `lambda`.
pub fn lasso(masks: &[Vec<f64>], metrics: &[f64], lambda: f64) -> Result<LinearFit> {
    check_design(masks, metrics)?;
    check_lambda(lambda)?;
    let design = Design::new(masks, metrics);
    let beta = design.fit(lambda, vec![0.0; design.cols.len()]);
    Ok(design.into_fit(beta, lambda))
}

fn check_lambda(lambda: f64) -> Result<()> {
    if lambda >= 0.0 && lambda.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(
            "lasso penalty",
            format!("{lambda} must be non-negative and finite"),
        ))
    }
}

/// A checked design, centred once: fits at several penalties reuse it, each starting from the
/// previous fit (a warm-started path).
struct Design {
    n: f64,
    mean_x: Vec<f64>,
    mean_y: f64,
    /// Centred columns, column-major for the coordinate sweeps.
    cols: Vec<Vec<f64>>,
    /// `‖x_j − x̄_j‖² / n`.
    sq: Vec<f64>,
    /// `y − ȳ`.
    y: Vec<f64>,
}

impl Design {
    fn new(masks: &[Vec<f64>], metrics: &[f64]) -> Self {
        let p = masks[0].len();
        let n = masks.len() as f64;
        let mean_x: Vec<f64> = (0..p)
            .map(|j| masks.iter().map(|m| m[j]).sum::<f64>() / n)
            .collect();
        let mean_y = metrics.iter().sum::<f64>() / n;
        let cols: Vec<Vec<f64>> = (0..p)
            .map(|j| masks.iter().map(|m| m[j] - mean_x[j]).collect())
            .collect();
        let sq = cols
            .iter()
            .map(|c| c.iter().map(|v| v * v).sum::<f64>() / n)
            .collect();
        let y = metrics.iter().map(|v| v - mean_y).collect();
        Self {
            n,
            mean_x,
            mean_y,
            cols,
            sq,
            y,
        }
    }

    /// Coordinate descent at `lambda` from `beta`, until the largest coefficient change is
    /// below `1e-6` of the metric's scale or 1000 sweeps.
    fn fit(&self, lambda: f64, mut beta: Vec<f64>) -> Vec<f64> {
        let n = self.n;
        let mut resid = self.y.clone();
        for (j, b) in beta.iter().enumerate().filter(|(_, b)| **b != 0.0) {
            for (r, x) in resid.iter_mut().zip(&self.cols[j]) {
                *r -= b * x;
            }
        }
        let scale = self
            .y
            .iter()
            .map(|r| r.abs())
            .fold(0.0, f64::max)
            .max(1e-300);
        for _ in 0..1000 {
            let mut largest = 0.0f64;
            for ((col, &sq), b) in self.cols.iter().zip(&self.sq).zip(beta.iter_mut()) {
                if sq == 0.0 {
                    continue; // a unit that never varies carries no information
                }
                let rho = col.iter().zip(&resid).map(|(x, r)| x * r).sum::<f64>() / n + sq * *b;
                let new = soft_threshold(rho, lambda) / sq;
                let delta = new - *b;
                if delta != 0.0 {
                    for (r, x) in resid.iter_mut().zip(col) {
                        *r -= delta * x;
                    }
                    *b = new;
                    largest = largest.max(delta.abs());
                }
            }
            if largest <= 1e-6 * scale {
                break;
            }
        }
        beta
    }

    fn into_fit(self, beta: Vec<f64>, lambda: f64) -> LinearFit {
        let intercept = self.mean_y
            - beta
                .iter()
                .zip(&self.mean_x)
                .map(|(b, m)| b * m)
                .sum::<f64>();
        LinearFit {
            coefficients: beta,
            intercept,
            lambda,
            cv_tau: None,
        }
    }
}

fn soft_threshold(x: f64, t: f64) -> f64 {
    if x > t {
        x - t
    } else if x < -t {
        x + t
    } else {
        0.0
    }
}

/// The smallest penalty at which every lasso coefficient is zero: `max_j |⟨x_j − x̄_j, y − ȳ⟩| / n`.
fn lambda_max(masks: &[Vec<f64>], metrics: &[f64]) -> f64 {
    let n = masks.len() as f64;
    let p = masks[0].len();
    let mean_y = metrics.iter().sum::<f64>() / n;
    (0..p)
        .map(|j| {
            let mean_x = masks.iter().map(|m| m[j]).sum::<f64>() / n;
            (masks
                .iter()
                .zip(metrics)
                .map(|(m, y)| (m[j] - mean_x) * (y - mean_y))
                .sum::<f64>()
                / n)
                .abs()
        })
        .fold(0.0, f64::max)
}

/// The lasso with its penalty chosen by `folds`-fold cross-validation of Kendall's τ (see the
/// [module docs](self)) over `grid` penalties spaced geometrically from the largest useful
/// penalty down to 1e-4 of it, plus no penalty; then refitted on every mask. Folds are
/// contiguous blocks, so keep an antithetic pair's two masks next to each other: a pair then
/// stays within one fold.
///
/// # Errors
/// As [`lasso`]; [`Error::Invalid`] for fewer than 2 folds, a grid of 0, or fewer masks than
/// `2 · folds`.
pub fn lasso_cv(
    masks: &[Vec<f64>],
    metrics: &[f64],
    folds: usize,
    grid: usize,
) -> Result<LinearFit> {
    check_design(masks, metrics)?;
    if folds < 2 || grid == 0 || masks.len() < 2 * folds {
        return Err(Error::invalid(
            "lasso cross-validation",
            format!(
                "{} masks, {folds} folds, {grid} penalties; give at least 2 folds of at least \
                 2 masks each and at least 1 penalty",
                masks.len()
            ),
        ));
    }
    let top = lambda_max(masks, metrics);
    let mut lambdas: Vec<f64> = (0..grid)
        .map(|i| top * 1e-4f64.powf(i as f64 / grid.max(2).saturating_sub(1) as f64))
        .collect();
    lambdas.push(0.0);
    let n = masks.len();
    // Per fold, the whole penalty path (largest first, each fit warm-started from the last).
    let mut taus = vec![0.0; lambdas.len()];
    for f in 0..folds {
        let (lo, hi) = (f * n / folds, (f + 1) * n / folds);
        let train_x: Vec<Vec<f64>> = masks[..lo].iter().chain(&masks[hi..]).cloned().collect();
        let train_y: Vec<f64> = metrics[..lo]
            .iter()
            .chain(&metrics[hi..])
            .copied()
            .collect();
        let design = Design::new(&train_x, &train_y);
        let mut beta = vec![0.0; design.cols.len()];
        for (i, &lambda) in lambdas.iter().enumerate() {
            beta = design.fit(lambda, beta);
            let intercept = design.mean_y
                - beta
                    .iter()
                    .zip(&design.mean_x)
                    .map(|(b, m)| b * m)
                    .sum::<f64>();
            let pred: Vec<f64> = masks[lo..hi]
                .iter()
                .map(|m| intercept + beta.iter().zip(m).map(|(b, x)| b * x).sum::<f64>())
                .collect();
            taus[i] += kendall_tau(&pred, &metrics[lo..hi])? / folds as f64;
        }
    }
    // Ties go to the larger penalty (the sparser model), which comes first.
    let mut best: Option<(f64, f64)> = None;
    for (&lambda, &tau) in lambdas.iter().zip(&taus) {
        if best.is_none_or(|(_, t)| tau > t) {
            best = Some((lambda, tau));
        }
    }
    let (lambda, tau) = best.unwrap_or((0.0, 0.0));
    let mut fit = lasso(masks, metrics, lambda)?;
    fit.cv_tau = Some(tau);
    Ok(fit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    #[test]
    fn kendall_tau_of_known_orders() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(kendall_tau(&a, &[10.0, 20.0, 30.0, 40.0]).unwrap(), 1.0);
        assert_eq!(kendall_tau(&a, &[4.0, 3.0, 2.0, 1.0]).unwrap(), -1.0);
        // One swapped pair of six: (5 - 1) / 6.
        let t = kendall_tau(&a, &[1.0, 3.0, 2.0, 4.0]).unwrap();
        assert!((t - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(kendall_tau(&a, &[1.0; 4]).unwrap(), 0.0);
        assert!(kendall_tau(&a, &[1.0]).is_err());
    }

    #[test]
    fn lasso_without_penalty_is_least_squares_and_a_large_penalty_zeroes_everything() {
        // y = 1 + 2 m0 − 3 m1 exactly, on all four masks of two units.
        let masks = vec![
            vec![0.0, 0.0],
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![1.0, 1.0],
        ];
        let y: Vec<f64> = masks
            .iter()
            .map(|m| 1.0 + 2.0 * m[0] - 3.0 * m[1])
            .collect();
        let fit = lasso(&masks, &y, 0.0).unwrap();
        assert!((fit.coefficients[0] - 2.0).abs() < 1e-8, "{fit:?}");
        assert!((fit.coefficients[1] + 3.0).abs() < 1e-8, "{fit:?}");
        assert!((fit.intercept - 1.0).abs() < 1e-8);
        let zero = lasso(&masks, &y, lambda_max(&masks, &y) * 1.0001).unwrap();
        assert!(zero.coefficients.iter().all(|c| *c == 0.0), "{zero:?}");
        assert!(lasso(&masks, &y, -1.0).is_err());
        assert!(lasso(&masks, &y[..3], 0.0).is_err());
        let mut nan = y.clone();
        nan[0] = f64::NAN;
        assert!(lasso(&masks, &nan, 0.0).is_err());
    }

    #[test]
    fn cross_validated_lasso_recovers_a_sparse_planted_order() {
        // 32 units, 8 of which matter; the penalty CV picks keeps their order.
        let mut rng = SplitMix64::new(3);
        let beta: Vec<f64> = (0..32)
            .map(|j| {
                if j % 4 == 0 {
                    1.0 + rng.next_f64()
                } else {
                    0.0
                }
            })
            .collect();
        let masks: Vec<Vec<f64>> = (0..120)
            .map(|_| (0..32).map(|_| f64::from(rng.next_f64() < 0.5)).collect())
            .collect();
        let y: Vec<f64> = masks
            .iter()
            .map(|m| m.iter().zip(&beta).map(|(a, b)| a * b).sum::<f64>() + 0.05 * rng.next_f64())
            .collect();
        let fit = lasso_cv(&masks, &y, 5, 8).unwrap();
        assert!(fit.cv_tau.unwrap() > 0.8, "{fit:?}");
        let tau = kendall_tau(&fit.coefficients, &beta).unwrap();
        assert!(tau > 0.6, "τ {tau}: {:?}", fit.coefficients);
        assert!(lasso_cv(&masks, &y, 1, 8).is_err());
    }
}
