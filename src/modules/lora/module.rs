//! One LoRA adapter: its configuration, initialisation and factors (see [`super`] for the
//! math, the paper and the host layers). The adapter is also a [`ComputeModule`] on its own,
//! the delta function a library of LoRA experts routes between.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{Device, Distribution, Tensor};

use crate::error::{Error, Result};
use crate::grouped::{LowRank, grouped_low_rank};
use crate::modules::ComputeModule;
use crate::routing::DispatchPlan;
use crate::tensor_util::float_tensor;

/// How the `A` factor of a new adapter is initialised (`B` always starts at zero).
#[derive(Config, Debug, Copy, PartialEq)]
pub enum LoraInit {
    /// PEFT's default (`init_lora_weights=True`): `A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`.
    KaimingUniform,
    /// PEFT's `init_lora_weights="gaussian"`: `A ~ N(0, 1/r)`.
    Gaussian,
}

/// Configuration of one LoRA adapter.
#[derive(Config, Debug)]
pub struct LoraConfig {
    /// Rank `r` of the low-rank update (≥ 1).
    pub rank: usize,
    /// Scaling numerator `alpha`.
    #[config(default = 8.0)]
    pub alpha: f64,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[config(default = false)]
    pub use_rslora: bool,
    /// Dropout probability on the adapter's input (training only), in `[0, 1)`.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// Initialisation of `A`.
    #[config(default = "LoraInit::KaimingUniform")]
    pub init: LoraInit,
}

/// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
pub fn lora_scaling(alpha: f64, rank: usize, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (rank as f64).sqrt()
    } else {
        alpha / rank as f64
    }
}

impl LoraConfig {
    /// The adapter's scaling `s`.
    pub fn scaling(&self) -> f64 {
        lora_scaling(self.alpha, self.rank, self.use_rslora)
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::invalid("LoRA rank", "rank must be at least 1"));
        }
        if !self.alpha.is_finite() {
            return Err(Error::invalid(
                "LoRA alpha",
                format!("{} is not finite", self.alpha),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid(
                "LoRA dropout",
                format!("{} is outside [0, 1)", self.dropout),
            ));
        }
        Ok(())
    }

    /// Creates a new adapter for a `d_in → d_out` layer, initialised as configured.
    ///
    /// # Errors
    /// [`Error::Invalid`] for rank 0, a non-finite alpha, dropout outside `[0, 1)` or a zero
    /// width.
    pub fn init(&self, d_in: usize, d_out: usize, device: &Device) -> Result<LoraModule> {
        self.validate()?;
        if d_in == 0 || d_out == 0 {
            return Err(Error::invalid(
                "LoRA layer widths",
                "d_in and d_out must be positive",
            ));
        }
        let a = match self.init {
            LoraInit::KaimingUniform => {
                let bound = 1.0 / (d_in as f64).sqrt();
                Tensor::<2>::random(
                    [d_in, self.rank],
                    Distribution::Uniform(-bound, bound),
                    device,
                )
            }
            LoraInit::Gaussian => Tensor::<2>::random(
                [d_in, self.rank],
                Distribution::Normal(0.0, 1.0 / self.rank as f64),
                device,
            ),
        };
        let b = Tensor::<2>::zeros([self.rank, d_out], device);
        LoraModule::from_factors(a, b, self.alpha, self.use_rslora, self.dropout)
    }
}

/// One LoRA adapter: the factors `A: [d_in, r]`, `B: [r, d_out]` and their scaling.
///
/// On its own it is the *delta* function `x ↦ s·(dropout(x) A) B`, which is what a library of
/// LoRA experts routes between ([`ComputeModule`]); on a host layer it lives inside a
/// [`LoraLinear`](super::LoraLinear).
#[derive(Module, Debug)]
pub struct LoraModule {
    /// Down-projection `A: [d_in, r]` (PEFT's `lora_A.weight` transposed).
    pub a: Param<Tensor<2>>,
    /// Up-projection `B: [r, d_out]` (PEFT's `lora_B.weight` transposed).
    pub b: Param<Tensor<2>>,
    /// Scaling numerator.
    pub alpha: f64,
    /// Whether the scaling is `alpha / sqrt(r)` (rsLoRA).
    pub use_rslora: bool,
    /// Dropout on the adapter input.
    pub dropout: Dropout,
    /// A multiplicative mask over the rank components (`[r]`, each scaling one column of `A`,
    /// so `(x A ⊙ m) B`), set by structured pruning of ranks; `None`: every component at 1.
    /// Not a parameter: saving, merging and host factors use `A` with the mask applied.
    #[module(skip)]
    pub rank_mask: Option<Tensor<1>>,
}

impl LoraModule {
    /// Builds an adapter from existing factors `a: [d_in, r]`, `b: [r, d_out]`.
    ///
    /// # Errors
    /// [`Error::Shape`] if the inner ranks differ, [`Error::Invalid`] for rank 0 or bad
    /// dropout.
    pub fn from_factors(
        a: Tensor<2>,
        b: Tensor<2>,
        alpha: f64,
        use_rslora: bool,
        dropout: f64,
    ) -> Result<Self> {
        let [_, r] = a.dims();
        let [rb, _] = b.dims();
        if r != rb {
            return Err(Error::shape(
                "LoRA factors (A: [d_in, r], B: [r, d_out])",
                format!("B with {r} rows"),
                format!("B of shape {:?}", b.dims()),
            ));
        }
        LoraConfig::new(r)
            .with_alpha(alpha)
            .with_dropout(dropout)
            .validate()?;
        Ok(Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            alpha,
            use_rslora,
            dropout: DropoutConfig::new(dropout).init(),
            rank_mask: None,
        })
    }

    /// `A` with the rank mask applied (`A` itself when there is none), `[d_in, r]`: what every
    /// path of the adapter computes with.
    pub fn a_masked(&self) -> Tensor<2> {
        match &self.rank_mask {
            Some(m) => self.a.val() * m.clone().unsqueeze::<2>(),
            None => self.a.val(),
        }
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.a.shape().dims::<2>()[1]
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.a.shape().dims::<2>()[0]
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.b.shape().dims::<2>()[1]
    }

    /// The scaling `s` (`alpha/r` or `alpha/sqrt(r)`).
    pub fn scaling(&self) -> f64 {
        lora_scaling(self.alpha, self.rank(), self.use_rslora)
    }

    /// The low-rank path `s · (dropout(x) A) B` for `x: [..., d_in]`, never forming `A B`.
    pub fn delta_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = self.dropout.forward(x);
        let s = self.scaling();
        // Scale the thin [.., r] intermediate, not the wide output.
        x.matmul(self.a_masked().unsqueeze())
            .mul_scalar(s)
            .matmul(self.b.val().unsqueeze())
    }

    /// Whether this adapter is in training: its factors track gradients, or dropout is live.
    pub(crate) fn is_training(&self) -> bool {
        self.a.val().is_require_grad()
            || self.b.val().is_require_grad()
            || (self.dropout.prob > 0.0
                && self.dropout.training.is_enabled()
                && self.a.device().is_autodiff())
    }

    /// The dense update `s · A B`, `[d_in, d_out]`. Only merging needs it.
    pub fn delta_weight(&self) -> Tensor<2> {
        self.a_masked()
            .mul_scalar(self.scaling())
            .matmul(self.b.val())
    }
}

impl ComputeModule for LoraModule {
    fn d_input(&self) -> usize {
        self.d_in()
    }

    fn d_output(&self) -> usize {
        self.d_out()
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.delta_forward(x)
    }
}

/// `Σ_j w_j · s_{m_j} (x A_{m_j}) B_{m_j}` for every row of `x: [rows, d_in]` under `plan`
/// (module `m` is `modules[m]`), `[rows, d_out]`: the LoRA output mixture, one copy for
/// mixed-adapter layers and for library mixtures.
///
/// Under the rows and dense strategies each module runs on its own rows. Under the
/// sequences strategy with one slot per sequence and one rank, the factors are gathered per
/// sequence instead (`[units, d_in, r]`, `[units, r, d_out]`) and the delta is two batched
/// matmuls, which moves no activations (the "BGMV" layout of Punica/S-LoRA).
///
/// # Errors
/// [`Error::Shape`] if the plan routes another number of modules or `x` another number of
/// rows.
pub(crate) fn output_mixture(
    x: Tensor<2>,
    plan: &DispatchPlan,
    modules: &[LoraModule],
) -> Result<Tensor<2>> {
    if plan.num_modules() != modules.len() {
        return Err(Error::shape(
            "LoRA mixture (routing modules = adapters)",
            modules.len().to_string(),
            plan.num_modules().to_string(),
        ));
    }
    let d_out = modules.first().map_or(0, LoraModule::d_out);
    let unit = plan.rows_per_unit();
    let one_rank = modules
        .first()
        .is_some_and(|a0| modules.iter().all(|a| a.rank() == a0.rank()));
    if let (true, true, Some((ids, weights))) = (unit > 1, one_rank, plan.unit_modules()) {
        let [rows, d_in] = x.dims();
        plan.check_rows(rows, "LoRA mixture")?;
        let units = plan.units();
        let device = x.device();
        if ids.iter().all(|&i| i < 0) {
            return Ok(Tensor::zeros([rows, d_out], &device));
        }
        let pick = |i: i64| &modules[i.max(0) as usize];
        let a = Tensor::stack::<3>(ids.iter().map(|&i| pick(i).a_masked()).collect(), 0);
        let b = Tensor::stack::<3>(ids.iter().map(|&i| pick(i).b.val()).collect(), 0);
        let scales: Vec<f32> = ids
            .iter()
            .map(|&i| if i < 0 { 0.0 } else { pick(i).scaling() as f32 })
            .collect();
        let s = float_tensor(scales, [units, 1, 1], &device) * weights.reshape([units, 1, 1]);
        let x3 = x.reshape([units, unit, d_in]);
        return Ok(x3.matmul(a).mul(s).matmul(b).reshape([rows, d_out]));
    }
    let factors: Vec<LowRank> = modules
        .iter()
        .map(|m| LowRank {
            a: m.a_masked(),
            b: m.b.val(),
            scale: m.scaling(),
        })
        .collect();
    plan.apply_grouped(x, d_out, |xp, sizes, w| {
        grouped_low_rank(xp, sizes, &factors, Some(w))
    })
}
