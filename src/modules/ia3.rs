//! (IA)³: infused adapters by inhibiting and amplifying inner activations
//! (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
//! In-Context Learning", arXiv 2205.05638).
//!
//! A learned vector `l` rescales a frozen linear layer, following PEFT's two placements:
//!
//! ```text
//! output-side (attention k/v):       y = (x W + b) ⊙ l        l: [d_out]
//! input-side  (feed-forward target): y = (x ⊙ l) W + b        l: [d_in]
//! ```
//!
//! Merging folds `l` into the weight: output-side scales `W`'s output columns and the bias,
//! input-side scales `W`'s input rows and leaves the bias alone. PEFT initialises `l = 1`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::Tensor;

use super::{ComputeModule, check_last_dim};
use crate::error::{Error, Result};

/// One named (IA)³ adapter as a [`LoraLinear`](super::lora::LoraLinear) holds it (see
/// [`LoraLinear::insert_ia3`](super::lora::LoraLinear::insert_ia3)): the vector `l` and its
/// placement.
///
/// # Shapes
/// `scale: [d_in]` when `feedforward` (input-side), `[d_out]` otherwise.
#[derive(Module, Debug)]
pub struct Ia3Vector {
    /// The vector `l` (trainable unless frozen).
    pub scale: Param<Tensor<1>>,
    /// Input-side (PEFT's `feedforward_modules`) rather than output-side.
    pub feedforward: bool,
}

/// A frozen [`Linear`] rescaled by an (IA)³ vector.
#[derive(Module, Debug)]
pub struct Ia3Linear {
    /// The frozen host layer.
    pub base: Linear,
    /// The scaling vector: `[d_out]` output-side, `[d_in]` input-side (feed-forward).
    pub scale: Param<Tensor<1>>,
    /// Input-side (PEFT's `feedforward_modules`) rather than output-side.
    pub feedforward: bool,
    /// Whether `scale` is folded into `base`.
    pub merged: bool,
}

impl Ia3Linear {
    /// Wraps `base` with `l = 1` (the identity), freezing the base.
    pub fn new(base: Linear, feedforward: bool) -> Self {
        let [d_in, d_out] = base.weight.shape().dims();
        let n = if feedforward { d_in } else { d_out };
        let scale = Tensor::<1>::ones([n], &base.weight.device());
        Self {
            base: base.no_grad(),
            scale: Param::from_tensor(scale),
            feedforward,
            merged: false,
        }
    }

    /// Wraps `base` with a given vector `l`.
    ///
    /// # Errors
    /// [`Error::Shape`] if `l` has the wrong length for the placement.
    pub fn with_scale(base: Linear, scale: Tensor<1>, feedforward: bool) -> Result<Self> {
        let mut layer = Self::new(base, feedforward);
        let want = layer.scale.shape().dims::<1>()[0];
        let got = scale.dims()[0];
        if want != got {
            return Err(Error::shape(
                if feedforward {
                    "IA3 input-side vector (d_in)"
                } else {
                    "IA3 output-side vector (d_out)"
                },
                want.to_string(),
                got.to_string(),
            ));
        }
        layer.scale = Param::from_tensor(scale);
        Ok(layer)
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.base.weight.shape().dims::<2>()[0]
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.base.weight.shape().dims::<2>()[1]
    }

    /// Forward pass for `x: [..., d_in]`.
    ///
    /// # Errors
    /// [`Error::Shape`] if the last axis is not `d_in`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Result<Tensor<D>> {
        check_last_dim(&x, self.d_in(), "Ia3Linear::forward input")?;
        Ok(self.forward_unchecked(x))
    }

    fn forward_unchecked<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if self.merged {
            return self.base.forward(x);
        }
        let l = self.scale.val().unsqueeze::<D>();
        if self.feedforward {
            self.base.forward(x * l)
        } else {
            self.base.forward(x) * l
        }
    }

    /// Folds `l` into the base weight (and bias, output-side).
    ///
    /// # Errors
    /// [`Error::AlreadyMerged`] if already merged.
    pub fn merge(&mut self) -> Result<()> {
        if self.merged {
            return Err(Error::AlreadyMerged {
                name: "ia3".into(),
                operation: "merging it again",
            });
        }
        self.fold(false);
        self.merged = true;
        Ok(())
    }

    /// Undoes [`merge`](Self::merge) by dividing by `l` (exact for `l` away from zero; PEFT
    /// adds `1e-8` to the divisor, modula refuses entries with `|l| < 1e-8` instead).
    ///
    /// # Errors
    /// [`Error::NotMerged`] if not merged; [`Error::Invalid`] if `l` has (near-)zero entries.
    pub fn unmerge(&mut self) -> Result<()> {
        if !self.merged {
            return Err(Error::NotMerged { name: "ia3".into() });
        }
        check_invertible(&self.scale.val())?;
        self.fold(true);
        self.merged = false;
        Ok(())
    }

    fn fold(&mut self, inverse: bool) {
        fold_ia3(&mut self.base, self.scale.val(), self.feedforward, inverse);
    }
}

/// Folds an IA3 vector `l` into a frozen layer (`inverse`: its reciprocal, to undo a fold):
/// input-side `W ← diag(l) W`; output-side `W ← W diag(l)`, `b ← l ⊙ b`.
pub(crate) fn fold_ia3(base: &mut Linear, l: Tensor<1>, feedforward: bool, inverse: bool) {
    let l = l.detach();
    let l = if inverse { l.recip() } else { l };
    let n = l.dims()[0];
    if feedforward {
        let lw = l.reshape([n, 1]);
        base.weight = base.weight.clone().map(|w| (w * lw).detach());
    } else {
        let lw = l.clone().reshape([1, n]);
        base.weight = base.weight.clone().map(|w| (w * lw).detach());
        if let Some(b) = base.bias.take() {
            base.bias = Some(b.map(|b| (b * l).detach()));
        }
    }
}

/// [`Error::Invalid`] when `l` has an entry of magnitude below `1e-8`, whose fold cannot be
/// undone by dividing (PEFT adds `1e-8` to the divisor instead, which is not exact).
pub(crate) fn check_invertible(l: &Tensor<1>) -> Result<()> {
    let min_abs = l.clone().abs().min().into_scalar::<f32>();
    if min_abs < 1e-8 {
        return Err(Error::invalid(
            "IA3 unmerge",
            format!(
                "the vector has an entry of magnitude {min_abs:e} < 1e-8, so the merge cannot be undone; keep the unmerged layer instead"
            ),
        ));
    }
    Ok(())
}

impl ComputeModule for Ia3Linear {
    fn d_input(&self) -> usize {
        self.d_in()
    }

    fn d_output(&self) -> usize {
        self.d_out()
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_unchecked(x)
    }
}
