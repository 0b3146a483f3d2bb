//! The combination types (PEFT's names) and the settings of a merge.

use crate::error::{Error, Result};

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
pub(super) enum Reducer {
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

    pub(super) fn reducer(self) -> Reducer {
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
    pub(super) fn is_svd(self) -> bool {
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

/// Where the merge is computed; see the [module docs](super).
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

    pub(super) fn density(&self) -> Result<f64> {
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
