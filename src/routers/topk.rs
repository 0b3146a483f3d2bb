//! Learned softmax / top-k gates (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral).
//!
//! `logits = x W_g` (`W_g: [d, E]`, no bias, f32), `p = softmax(logits)`; each token keeps its
//! `k` most probable experts. With `renormalize` the kept probabilities are rescaled to sum
//! to one (Mixtral, GShard top-2); without it they are used as they are (Switch: the top-1
//! probability scales the expert's output). `k = E` with renormalisation is the dense
//! softmax mixture. During training an optional *jitter* multiplies the router input by
//! `U(1 − ε, 1 + ε)` noise (Switch, section 2.4).
//!
//! With a capacity factor the router works in capacity mode (Switch top-1, GShard top-2):
//! see [`capacity`](super::capacity). The load-balancing loss uses the choices before
//! dropping, as in Switch.
//!
//! Every routing carries the load-balancing loss and the router z-loss scaled by their
//! coefficients (see [`losses`](super::losses)), and the router entropy as a diagnostic.

use burn::config::Config;
use burn::module::{Flag, Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Distribution, Tensor};

use super::capacity::{SecondExpertPolicy, apply_capacity, expert_capacity};
use super::losses::{load_balancing_loss, router_entropy, z_loss};
use crate::error::{Error, Result};
use crate::modules::check_last_dim;
use crate::routing::{Router, RouterInput, Routing};
use crate::tensor_util::check_logits;

/// Configuration of a [`TopKRouter`].
#[derive(Config, Debug)]
pub struct TopKRouterConfig {
    /// Input width `d`.
    pub d_model: usize,
    /// Number of experts `E`.
    pub num_experts: usize,
    /// Experts per token `k` (1 ≤ k ≤ E).
    #[config(default = 2)]
    pub k: usize,
    /// Rescale the kept probabilities to sum to one.
    #[config(default = true)]
    pub renormalize: bool,
    /// Multiplicative input jitter `ε` during training (0 disables it).
    #[config(default = 0.0)]
    pub jitter: f64,
    /// Coefficient of the load-balancing loss (Switch uses 0.01).
    #[config(default = 0.01)]
    pub load_balance_coef: f64,
    /// Coefficient of the router z-loss (ST-MoE uses 0.001).
    #[config(default = 0.001)]
    pub z_loss_coef: f64,
    /// Capacity mode: each expert takes at most `ceil(factor · T · k / E)` slots and
    /// overflowing slots are dropped (see [`capacity`](super::capacity)). `None` is dropless.
    #[config(default = "None")]
    pub capacity_factor: Option<f64>,
    /// Which later choices are dispatched in capacity mode.
    #[config(default = "SecondExpertPolicy::All")]
    pub second_expert_policy: SecondExpertPolicy,
}

/// Checks the sizes every learned gate shares: positive widths and `1 ≤ k ≤ E`.
pub(crate) fn validate_gate(d_model: usize, num_experts: usize, k: usize) -> Result<()> {
    if num_experts == 0 || d_model == 0 {
        return Err(Error::invalid(
            "router",
            "d_model and num_experts must be positive",
        ));
    }
    if k == 0 || k > num_experts {
        return Err(Error::invalid(
            "top-k",
            format!("k = {k} must be between 1 and the number of experts ({num_experts})"),
        ));
    }
    Ok(())
}

impl TopKRouterConfig {
    /// Creates the router.
    ///
    /// # Errors
    /// [`Error::Invalid`] for `k = 0`, `k > E`, no experts, a zero width or a jitter outside
    /// `[0, 1)`.
    pub fn init(&self, device: &burn::tensor::Device) -> Result<TopKRouter> {
        validate_gate(self.d_model, self.num_experts, self.k)?;
        if let Some(f) = self.capacity_factor {
            expert_capacity(f, 1, self.k, self.num_experts)?;
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(Error::invalid(
                "router jitter",
                format!("{} is outside [0, 1)", self.jitter),
            ));
        }
        Ok(TopKRouter {
            gate: LinearConfig::new(self.d_model, self.num_experts)
                .with_bias(false)
                .init(device),
            k: self.k,
            renormalize: self.renormalize,
            jitter: self.jitter,
            load_balance_coef: self.load_balance_coef,
            z_loss_coef: self.z_loss_coef,
            capacity_factor: self.capacity_factor,
            second_expert_policy: self.second_expert_policy,
            training: Param::from_bool(true),
            expert_mask: None,
        })
    }
}

/// A learned linear gate with softmax and top-k selection.
#[derive(Module, Debug)]
pub struct TopKRouter {
    /// `d → E` logits, no bias.
    pub gate: Linear,
    /// Experts per token.
    pub k: usize,
    /// Renormalise the kept probabilities.
    pub renormalize: bool,
    /// Input jitter `ε`.
    pub jitter: f64,
    /// Load-balancing loss coefficient.
    pub load_balance_coef: f64,
    /// Router z-loss coefficient.
    pub z_loss_coef: f64,
    /// Capacity factor, `None` for dropless.
    #[module(skip)]
    pub capacity_factor: Option<f64>,
    /// Later-choice policy in capacity mode.
    #[module(skip)]
    pub second_expert_policy: SecondExpertPolicy,
    /// Training flag (jitter is applied only in training, on an autodiff device).
    pub training: Param<Flag>,
    /// A multiplicative mask over the experts (`[E]`): the routing probabilities are
    /// multiplied by it and renormalised before the top-k choice, so an expert at 0 is never
    /// chosen and the others share its probability as if it were gone (structured pruning of
    /// experts); `None`: every expert at 1.
    #[module(skip)]
    pub expert_mask: Option<Tensor<1>>,
}

impl TopKRouter {
    /// Router logits `x W_g`, `[T, E]`, with jitter in training.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong width.
    pub fn logits(&self, x: &Tensor<2>) -> Result<Tensor<2>> {
        check_last_dim(x, self.gate.weight.shape().dims::<2>()[0], "router input")?;
        let x = if self.jitter > 0.0 && self.training.is_enabled() && x.device().is_autodiff() {
            let noise = x.random_like(Distribution::Uniform(1.0 - self.jitter, 1.0 + self.jitter));
            x.clone() * noise
        } else {
            x.clone()
        };
        Ok(self.gate.forward(x))
    }

    /// Routes from precomputed `logits: [T, E]` (used by [`route`](Router::route), and by
    /// tests with hand-set logits).
    ///
    /// # Errors
    /// [`Error::NonFinite`] if a logit is NaN or infinite.
    pub fn route_logits(&self, logits: Tensor<2>) -> Result<Routing> {
        check_logits(&logits, "router logits")?;
        let [_, e] = logits.dims();
        let mut probs = burn::tensor::activation::softmax(logits.clone(), 1);
        if let Some(m) = &self.expert_mask {
            if m.dims()[0] != e {
                return Err(Error::shape(
                    "expert mask",
                    format!("{e} experts"),
                    format!("{} values", m.dims()[0]),
                ));
            }
            probs = probs * m.clone().unsqueeze::<2>();
            probs = probs.clone() / probs.sum_dim(1).clamp_min(1e-30);
        }
        let (_, indices) = probs.clone().detach().topk_with_indices(self.k, 1);
        let mut weights = probs.clone().gather(1, indices.clone());
        if self.renormalize {
            let total = weights.clone().sum_dim(1);
            weights = weights / total;
        }
        let mut routing = Routing::new(indices.clone(), weights, e)?;
        routing.aux_losses.push((
            "load_balance".into(),
            load_balancing_loss(probs.clone(), indices).mul_scalar(self.load_balance_coef),
        ));
        routing
            .aux_losses
            .push(("z_loss".into(), z_loss(logits).mul_scalar(self.z_loss_coef)));
        routing
            .diagnostics
            .push(("router_entropy".into(), router_entropy(probs)));
        match self.capacity_factor {
            None => Ok(routing),
            Some(f) => {
                let c = expert_capacity(f, routing.rows(), self.k, e)?;
                apply_capacity(routing, c, self.second_expert_policy)
            }
        }
    }
}

impl Router for TopKRouter {
    fn num_modules(&self) -> usize {
        self.gate.weight.shape().dims::<2>()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("TopKRouter")?;
        self.route_logits(self.logits(x)?)
    }
}
