//! Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks",
//! arXiv 1701.06538, section 2.1 and appendix A).
//!
//! ```text
//! H(x)_i = (x W_g)_i + ε_i · softplus((x W_noise)_i),  ε ~ N(0, 1) in training, 0 otherwise
//! G(x)   = softmax(KeepTopK(H(x), k))                  (weights over the kept experts only)
//! ```
//!
//! Two balancing losses come with every routing (both `CV²`, the squared coefficient of
//! variation with the population variance):
//!
//! - **importance**: `Importance_i = Σ_x G(x)_i`, `L_imp = w_imp · CV(Importance)²`;
//! - **load**: a smooth estimate of the number of tokens per expert,
//!   `P(x, i) = Φ(((x W_g)_i − kth_excluding(H(x), k, i)) / softplus((x W_noise)_i))`, where
//!   `kth_excluding(H, k, i)` is the `k`-th largest entry of `H` once entry `i` is left out, and
//!   `Load_i = Σ_x P(x, i)`, `L_load = w_load · CV(Load)²`. With `k = E` every expert is
//!   always selected and the load loss is zero.

use burn::config::Config;
use burn::module::{Flag, Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Distribution, Tensor, activation};

use super::losses::{cv_squared, router_entropy};
use super::topk::validate_gate;
use crate::error::{Error, Result};
use crate::modules::check_last_dim;
use crate::routing::{Router, RouterInput, Routing};
use crate::tensor_util::check_logits;

/// Configuration of a [`NoisyTopKRouter`].
#[derive(Config, Debug)]
pub struct NoisyTopKRouterConfig {
    /// Input width `d`.
    pub d_model: usize,
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Experts per token.
    #[config(default = 2)]
    pub k: usize,
    /// Importance-loss coefficient `w_imp`.
    #[config(default = 0.1)]
    pub importance_coef: f64,
    /// Load-loss coefficient `w_load`.
    #[config(default = 0.1)]
    pub load_coef: f64,
}

impl NoisyTopKRouterConfig {
    /// Creates the router with both gate matrices at zero, as in the paper (uniform routing and
    /// noise of scale `softplus(0) = ln 2` at the start).
    ///
    /// # Errors
    /// [`Error::Invalid`] for `k = 0`, `k > E` or zero sizes.
    pub fn init(&self, device: &burn::tensor::Device) -> Result<NoisyTopKRouter> {
        validate_gate(self.d_model, self.num_experts, self.k)?;
        let lin = || {
            LinearConfig::new(self.d_model, self.num_experts)
                .with_bias(false)
                .with_initializer(Initializer::Zeros)
                .init(device)
        };
        Ok(NoisyTopKRouter {
            w_gate: lin(),
            w_noise: lin(),
            k: self.k,
            importance_coef: self.importance_coef,
            load_coef: self.load_coef,
            training: Param::from_bool(true),
        })
    }
}

/// Shazeer's noisy top-k gate.
#[derive(Module, Debug)]
pub struct NoisyTopKRouter {
    /// Clean logits `W_g`.
    pub w_gate: Linear,
    /// Noise scale `W_noise` (through softplus).
    pub w_noise: Linear,
    /// Experts per token.
    pub k: usize,
    /// Importance-loss coefficient.
    pub importance_coef: f64,
    /// Load-loss coefficient.
    pub load_coef: f64,
    /// Training flag: noise is added only in training on an autodiff device.
    pub training: Param<Flag>,
}

/// Standard normal CDF `Φ(z) = (1 + erf(z / √2)) / 2`.
fn normal_cdf(z: Tensor<2>) -> Tensor<2> {
    (z.div_scalar(std::f64::consts::SQRT_2).erf() + 1.0).mul_scalar(0.5)
}

impl NoisyTopKRouter {
    /// Routes from explicit parts: clean logits, noise scale (already through softplus) and a
    /// standard-normal sample `eps` (all `[T, E]`). [`route`](Router::route) draws `eps` in
    /// training and uses zeros otherwise.
    ///
    /// # Errors
    /// [`Error::Shape`] if the parts differ in shape; [`Error::NonFinite`] for NaN/inf.
    pub fn route_parts(
        &self,
        clean: Tensor<2>,
        noise_std: Tensor<2>,
        eps: Tensor<2>,
    ) -> Result<Routing> {
        if clean.dims() != noise_std.dims() || clean.dims() != eps.dims() {
            return Err(Error::shape(
                "noisy top-k parts",
                format!("{:?} for all three", clean.dims()),
                format!(
                    "{:?}, {:?}, {:?}",
                    clean.dims(),
                    noise_std.dims(),
                    eps.dims()
                ),
            ));
        }
        check_logits(&clean, "router logits")?;
        let [t, e] = clean.dims();
        let k = self.k;
        let noisy = clean.clone() + eps * noise_std.clone();
        let kk = (k + 1).min(e);
        let (top_vals, top_idx) = noisy.clone().topk_with_indices(kk, 1);
        let indices = top_idx.clone().slice([0..t, 0..k]);
        let kept = noisy.clone().gather(1, indices.clone());
        let weights = activation::softmax(kept, 1);
        // Dense gates G for the importance loss.
        let gates = Tensor::<2>::zeros([t, e], &clean.device()).scatter(
            1,
            indices.clone(),
            weights.clone(),
            burn::tensor::IndexingUpdateOp::Add,
        );
        let importance =
            cv_squared(gates.clone().sum_dim(0).reshape([e])).mul_scalar(self.importance_coef);
        let load = if k < e {
            let kth = top_vals.clone().slice([0..t, k - 1..k]); // k-th largest
            let next = top_vals.slice([0..t, k..k + 1]); // (k+1)-th largest
            let in_top = noisy.greater_equal(kth.clone().expand([t, e]));
            let threshold = kth.expand([t, e]).mask_where(in_top, next.expand([t, e]));
            let p = normal_cdf((clean.clone() - threshold) / noise_std.clamp_min(1e-9));
            cv_squared(p.sum_dim(0).reshape([e])).mul_scalar(self.load_coef)
        } else {
            Tensor::<1>::zeros([1], &clean.device())
        };
        let mut routing = Routing::new(indices, weights, e)?;
        routing.aux_losses.push(("importance".into(), importance));
        routing.aux_losses.push(("load".into(), load));
        routing.diagnostics.push((
            "router_entropy".into(),
            router_entropy(activation::softmax(clean, 1)),
        ));
        Ok(routing)
    }
}

impl Router for NoisyTopKRouter {
    fn num_modules(&self) -> usize {
        self.w_gate.weight.shape().dims::<2>()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("NoisyTopKRouter")?;
        check_last_dim(x, self.w_gate.weight.shape().dims::<2>()[0], "router input")?;
        let clean = self.w_gate.forward(x.clone());
        let std = activation::softplus(self.w_noise.forward(x.clone()), 1.0);
        let eps = if self.training.is_enabled() && x.device().is_autodiff() {
            clean.random_like(Distribution::Normal(0.0, 1.0))
        } else {
            clean.zeros_like()
        };
        self.route_parts(clean, std, eps)
    }
}
