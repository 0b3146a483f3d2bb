//! Latent replay (Ostapenko et al. 2022, "Continual Learning with Foundation Models: An
//! Empirical Study of Latent Replay", arXiv 2205.00329): a frozen encoder turns each example
//! into a feature vector once; a small buffer keeps a fixed number of features per class, and
//! classifiers on top are trained on the current task mixed with class-balanced replay.
//!
//! - [`ReplayBuffer`]: per-class storage, either the first `per_class` examples of each class
//!   ([`ReplayPolicy::FirstSeen`]) or a per-class reservoir sample ([`ReplayPolicy::Reservoir`],
//!   Vitter's algorithm R: every example of a class has the same chance of being kept).
//!   [`ReplayBuffer::sample_balanced`] draws batches with classes in equal proportion.
//! - [`NearestClassMean`]: the classifier that needs no training: per-class feature means,
//!   predict the nearest.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// Which examples a full class keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReplayPolicy {
    /// The first `per_class` examples seen.
    FirstSeen,
    /// A uniform sample of all examples seen (reservoir sampling), the default.
    #[default]
    Reservoir,
}

/// A class-balanced buffer of feature vectors (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct ReplayBuffer {
    dim: usize,
    per_class: usize,
    policy: ReplayPolicy,
    classes: BTreeMap<usize, (Vec<Vec<f32>>, usize)>,
    rng: SplitMix64,
}

impl ReplayBuffer {
    /// A buffer for `dim`-wide features keeping `per_class` per class.
    ///
    /// # Errors
    /// [`Error::Invalid`] for `dim` or `per_class` of 0.
    pub fn new(dim: usize, per_class: usize, policy: ReplayPolicy, seed: u64) -> Result<Self> {
        if dim == 0 || per_class == 0 {
            return Err(Error::invalid(
                "replay buffer",
                format!("feature width {dim} and per-class size {per_class} must be at least 1"),
            ));
        }
        Ok(Self {
            dim,
            per_class,
            policy,
            classes: BTreeMap::new(),
            rng: SplitMix64::new(seed),
        })
    }

    /// Feature width.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Offers `features` (row-major, `labels.len() × dim`) to the buffer.
    ///
    /// # Errors
    /// [`Error::Shape`] if `features.len()` is not `labels.len() × dim` (a feature width
    /// other than the buffer's).
    pub fn add(&mut self, features: &[f32], labels: &[usize]) -> Result<()> {
        if features.len() != labels.len() * self.dim {
            return Err(Error::shape(
                "ReplayBuffer::add (features = labels × width)",
                format!(
                    "{} × {} = {} values",
                    labels.len(),
                    self.dim,
                    labels.len() * self.dim
                ),
                format!("{} values", features.len()),
            ));
        }
        for (row, &c) in features.chunks_exact(self.dim).zip(labels) {
            let (kept, seen) = self.classes.entry(c).or_default();
            *seen += 1;
            if kept.len() < self.per_class {
                kept.push(row.to_vec());
            } else if self.policy == ReplayPolicy::Reservoir {
                let j = self.rng.below(*seen);
                if j < self.per_class {
                    kept[j] = row.to_vec();
                }
            }
        }
        Ok(())
    }

    /// Examples kept per class.
    pub fn counts(&self) -> BTreeMap<usize, usize> {
        self.classes
            .iter()
            .map(|(c, (k, _))| (*c, k.len()))
            .collect()
    }

    /// Total examples kept.
    pub fn len(&self) -> usize {
        self.classes.values().map(|(k, _)| k.len()).sum()
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A class-balanced batch of `n` examples (classes cycled in random order, examples drawn
    /// uniformly within a class): features `n × dim` and labels. Empty if the buffer is.
    pub fn sample_balanced(&mut self, n: usize) -> (Vec<f32>, Vec<usize>) {
        let classes: Vec<usize> = self.classes.keys().copied().collect();
        let mut x = Vec::with_capacity(n * self.dim);
        let mut y = Vec::with_capacity(n);
        if classes.is_empty() {
            return (x, y);
        }
        let mut order = classes.clone();
        for i in 0..n {
            if i % order.len() == 0 {
                for k in (1..order.len()).rev() {
                    order.swap(k, self.rng.below(k + 1));
                }
            }
            let c = order[i % order.len()];
            let kept = &self.classes[&c].0;
            let row = &kept[self.rng.below(kept.len())];
            x.extend_from_slice(row);
            y.push(c);
        }
        (x, y)
    }

    /// Every kept example: features and labels.
    pub fn all(&self) -> (Vec<f32>, Vec<usize>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for (c, (kept, _)) in &self.classes {
            for row in kept {
                x.extend_from_slice(row);
                y.push(*c);
            }
        }
        (x, y)
    }
}

/// Nearest-class-mean classification on features.
#[derive(Clone, Debug, Default)]
pub struct NearestClassMean {
    sums: BTreeMap<usize, (Vec<f64>, usize)>,
    dim: usize,
}

impl NearestClassMean {
    /// An empty classifier for `dim`-wide features.
    pub fn new(dim: usize) -> Self {
        Self {
            sums: BTreeMap::new(),
            dim,
        }
    }

    /// Adds examples to the class means.
    ///
    /// # Errors
    /// [`Error::Shape`] for a feature width other than `dim`.
    pub fn fit(&mut self, features: &[f32], labels: &[usize]) -> Result<()> {
        if features.len() != labels.len() * self.dim {
            return Err(Error::shape(
                "NearestClassMean::fit (features = labels × width)",
                format!("{} values", labels.len() * self.dim),
                format!("{} values", features.len()),
            ));
        }
        for (row, &c) in features.chunks_exact(self.dim).zip(labels) {
            let (s, n) = self
                .sums
                .entry(c)
                .or_insert_with(|| (vec![0.0; row.len()], 0));
            for (a, &v) in s.iter_mut().zip(row) {
                *a += f64::from(v);
            }
            *n += 1;
        }
        Ok(())
    }

    /// The nearest class mean of each row.
    ///
    /// # Errors
    /// [`Error::Shape`] for a feature width other than `dim`; [`Error::NotReady`] before any fit.
    pub fn predict(&self, features: &[f32]) -> Result<Vec<usize>> {
        if !features.len().is_multiple_of(self.dim.max(1)) {
            return Err(Error::shape(
                "NearestClassMean::predict (a multiple of the width)",
                self.dim.to_string(),
                features.len().to_string(),
            ));
        }
        if self.sums.is_empty() {
            return Err(Error::NotReady {
                what: "NearestClassMean".into(),
                fix: "it has no classes; call fit first".into(),
            });
        }
        let means: Vec<(usize, Vec<f64>)> = self
            .sums
            .iter()
            .map(|(c, (s, n))| (*c, s.iter().map(|v| v / *n as f64).collect()))
            .collect();
        Ok(features
            .chunks_exact(self.dim)
            .map(|row| {
                means
                    .iter()
                    .map(|(c, m)| {
                        let d: f64 = row
                            .iter()
                            .zip(m)
                            .map(|(&x, &mu)| (f64::from(x) - mu).powi(2))
                            .sum();
                        (*c, d)
                    })
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map_or(0, |(c, _)| c)
            })
            .collect())
    }
}
