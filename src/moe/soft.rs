//! Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts",
//! arXiv 2308.00951).
//!
//! Each of the `E` experts owns `p` slots. With learned slot parameters `Φ: [d, E·p]` and
//! logits `L = X Φ` (`[T, E·p]`):
//!
//! ```text
//! D = softmax_over_tokens(L)      (each slot is a convex mix of the tokens)
//! C = softmax_over_slots(L)       (each token is a convex mix of the slot outputs)
//! X̃ = Dᵀ X                        [E·p, d], slot s of expert e
//! Ỹ_s = expert_e(X̃_s)
//! Y = C Ỹ                         [T, d]
//! ```
//!
//! It is fully differentiable and drops no token, at the cost of every slot seeing every token.
//! Expert `e` computes on its `p` slots only, through the same [`Expert`] modules as the
//! sparse layer.

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Tensor, activation};

use super::experts::{Expert, ExpertConfig};
use crate::error::{Error, Result};
use crate::modules::{ComputeModule, check_last_dim};

/// Configuration of a [`SoftMoe`].
#[derive(burn::config::Config, Debug)]
pub struct SoftMoeConfig {
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Slots per expert `p`.
    pub slots_per_expert: usize,
    /// The experts' configuration (its `d_model` is the layer's width).
    pub expert: ExpertConfig,
}

impl SoftMoeConfig {
    /// Creates `num_experts` experts from `expert` with `slots_per_expert` slots each;
    /// `Φ ~ N(0, 1/d)`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero experts or slots; expert configuration errors.
    pub fn init(&self, device: &Device) -> Result<SoftMoe> {
        let (num_experts, slots_per_expert, expert) =
            (self.num_experts, self.slots_per_expert, &self.expert);

        if num_experts == 0 || slots_per_expert == 0 {
            return Err(Error::invalid(
                "Soft MoE",
                "num_experts and slots_per_expert must be positive",
            ));
        }
        let d = expert.d_model;
        let phi = Tensor::<2>::random(
            [d, num_experts * slots_per_expert],
            Distribution::Normal(0.0, 1.0 / (d as f64).sqrt()),
            device,
        );
        Ok(SoftMoe {
            phi: Param::from_tensor(phi),
            experts: (0..num_experts)
                .map(|_| expert.init(device))
                .collect::<Result<_>>()?,
            slots_per_expert,
        })
    }
}

/// A Soft MoE layer.
#[derive(Module, Debug)]
pub struct SoftMoe {
    /// Slot parameters `Φ: [d, E·p]`.
    pub phi: Param<Tensor<2>>,
    /// The experts.
    pub experts: Vec<Expert>,
    /// Slots per expert `p`.
    pub slots_per_expert: usize,
}

impl SoftMoe {
    /// Dispatch weights `D` and combine weights `C` (both `[T, E·p]`) for `x: [T, d]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong width.
    pub fn weights(&self, x: &Tensor<2>) -> Result<(Tensor<2>, Tensor<2>)> {
        check_last_dim(x, self.phi.shape().dims::<2>()[0], "Soft MoE input")?;
        let logits = x.clone().matmul(self.phi.val());
        Ok((
            activation::softmax(logits.clone(), 0),
            activation::softmax(logits, 1),
        ))
    }

    /// `Y = C · expert(Dᵀ X)` for `x: [T, d]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong width.
    pub fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        let (dispatch, combine) = self.weights(&x)?;
        let slots_in = dispatch.transpose().matmul(x);
        let [_, d] = slots_in.dims();
        let p = self.slots_per_expert;
        let outs: Vec<Tensor<2>> = self
            .experts
            .iter()
            .enumerate()
            .map(|(e, ex)| ex.forward_rows(slots_in.clone().slice([e * p..(e + 1) * p, 0..d])))
            .collect();
        Ok(combine.matmul(Tensor::cat(outs, 0)))
    }
}
