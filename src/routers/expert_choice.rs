//! Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
//! arXiv 2202.09368).
//!
//! **Expert choice** inverts top-k: with token-to-expert affinities `S = softmax(x W_g)`
//! (`[T, E]`, softmax over experts), each expert picks the `C = ceil(capacity_factor · T / E)`
//! tokens with the highest affinity, so every expert processes exactly `C` tokens (perfect load
//! balance by construction) and a token may be picked by any number of experts, including none.
//! The output is `y_t = Σ_{e picked t} S_te · expert_e(x_t)`. In modula's [`Routing`] the row
//! of token `t` has `E` slots: slot `e` is `e` if expert `e` picked `t`, `-1` otherwise.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, activation};

use super::capacity::{capacity_of, check_capacity_factor};
use super::topk::validate_gate;
use crate::error::Result;
use crate::modules::check_last_dim;
use crate::routing::{Router, RouterInput, Routing};
use crate::tensor_util::{check_logits, float_tensor, int_tensor, to_vec_i64};

/// Configuration of a [`ExpertChoiceRouter`]: the gate width, the experts and the capacity factor.
#[derive(burn::config::Config, Debug)]
pub struct ExpertChoiceRouterConfig {
    /// Model width.
    pub d_model: usize,
    /// Number of experts.
    pub num_experts: usize,
    /// `C = ceil(capacity_factor · T / E)` tokens per expert.
    #[config(default = 1.0)]
    pub capacity_factor: f64,
}

impl ExpertChoiceRouterConfig {
    /// Creates the router.
    ///
    /// # Errors
    /// [`Error::Invalid`](crate::Error::Invalid) for zero sizes or a capacity factor that is not positive.
    pub fn init(&self, device: &Device) -> Result<ExpertChoiceRouter> {
        let (d_model, num_experts, capacity_factor) =
            (self.d_model, self.num_experts, self.capacity_factor);

        validate_gate(d_model, num_experts, 1)?;
        check_capacity_factor(capacity_factor)?;
        Ok(ExpertChoiceRouter {
            gate: LinearConfig::new(d_model, num_experts)
                .with_bias(false)
                .init(device),
            capacity_factor,
        })
    }
}

/// A learned expert-choice router.
#[derive(Module, Debug)]
pub struct ExpertChoiceRouter {
    /// `d → E` affinities, no bias.
    pub gate: Linear,
    /// `C = ceil(capacity_factor · T / E)` tokens per expert (clamped to `T`).
    pub capacity_factor: f64,
}

impl ExpertChoiceRouter {
    /// Tokens per expert for a batch of `tokens`.
    pub fn capacity(&self, tokens: usize) -> usize {
        let e = self.gate.weight.shape().dims::<2>()[1];
        capacity_of(self.capacity_factor, tokens, e).min(tokens.max(1))
    }

    /// Routes from precomputed `logits: [T, E]`.
    ///
    /// # Errors
    /// [`Error::NonFinite`](crate::Error::NonFinite) for NaN/inf logits.
    pub fn route_logits(&self, logits: Tensor<2>) -> Result<Routing> {
        check_logits(&logits, "router logits")?;
        let [t, e] = logits.dims();
        let device = logits.device();
        let scores = activation::softmax(logits, 1);
        let c = self.capacity(t);
        // Top `c` tokens of every expert column, `[c, E]`. (Taken along dim 0: burn 0.22's wgpu
        // top-k on the transposed `[E, T]` view returns wrong indices for all but the first
        // row.)
        let (_, picked) = scores.clone().detach().topk_with_indices(c, 0);
        let picked = to_vec_i64(picked);
        let mut idx = vec![-1i64; t * e];
        let mut mask = vec![0f32; t * e];
        for ex in 0..e {
            for j in 0..c {
                let tok = picked[j * e + ex] as usize;
                idx[tok * e + ex] = ex as i64;
                mask[tok * e + ex] = 1.0;
            }
        }
        let weights = scores * float_tensor(mask, [t, e], &device);
        Routing::new(int_tensor(&idx, &device).reshape([t, e]), weights, e)
    }
}

impl Router for ExpertChoiceRouter {
    fn num_modules(&self) -> usize {
        self.gate.weight.shape().dims::<2>()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("ExpertChoiceRouter")?;
        check_last_dim(x, self.gate.weight.shape().dims::<2>()[0], "router input")?;
        self.route_logits(self.gate.forward(x.clone()))
    }
}
