//! Hard learned routing trained through a discrete choice: the score-function estimator
//! (REINFORCE, Williams 1992, with a baseline) and the Gumbel-softmax straight-through
//! estimator (Jang, Gu & Poole 2017, arXiv 1611.01144; Maddison et al. 2017), the two
//! estimators the survey lists for hard routing (Pfeiffer et al. 2023, §4.2.2; used by
//! Rosenbaum et al. 2018's routing networks and by Chang et al. 2019, among others).
//!
//! Both routers hold a linear gate `logits = x W` (`W: [d, E]`, no bias) and choose one module
//! per row. In training the choice is a sample from `π = softmax(logits / τ)`, drawn with the
//! Gumbel-max trick `a = argmax(logits/τ + g)`, `g = −log(−log u)`, `u ~ U(0, 1)`; out of
//! training it is `argmax(logits)`. Only the chosen module computes (the one dispatch with
//! `k = 1`).
//!
//! - [`ReinforceRouter`]: the routing weight is 1 and carries no gradient. After the modules
//!   ran and a per-row reward `r` (e.g. minus the row's loss) is known,
//!   [`reinforce_loss`] gives the surrogate `−mean((r − b) · log π(a | x))`, whose gradient is
//!   the score-function estimate of `−∇ E[r]`; it is unbiased for any baseline `b` that does
//!   not depend on the sampled `a` ([`RewardBaseline`]: an exponential moving average of past
//!   rewards, which lowers the variance).
//! - [`GumbelRouter`]: the routing weight of the chosen module is `1 + ỹ_a − sg(ỹ_a)` with
//!   `ỹ = softmax((logits + g) / τ)`: exactly 1 in the forward pass, the relaxed probability's
//!   gradient in the backward pass (straight-through). The sparse form passes the gradient
//!   through the chosen slot only, so only the chosen module computes; with `dense_gradient`
//!   every module computes and the full estimator `y_hard − sg(ỹ) + ỹ` weights all of them
//!   (zero weight in the forward pass for the modules not chosen).

use burn::module::{Flag, Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Distribution, Int, Tensor};

use super::check_temperature;
use super::topk::validate_gate;
use crate::error::{Error, Result};
use crate::modules::check_last_dim;
use crate::routing::{Router, RouterInput, Routing};
use crate::tensor_util::{check_logits, float_tensor};

/// Gumbel noise `−log(−log u)` of `logits`' shape.
fn gumbel_like(logits: &Tensor<2>) -> Tensor<2> {
    let u = logits
        .random_like(Distribution::Uniform(0.0, 1.0))
        .clamp(1e-10, 1.0 - 1e-7);
    u.log().neg().log().neg()
}

/// A linear gate `d → E` (no bias), as the learned gates are initialised.
fn gate(d_model: usize, num_modules: usize, device: &Device) -> Result<Linear> {
    validate_gate(d_model, num_modules, 1)?;
    Ok(LinearConfig::new(d_model, num_modules)
        .with_bias(false)
        .init(device))
}

/// Gate logits for `x`, checked.
fn gate_logits(gate: &Linear, x: &Tensor<2>) -> Result<Tensor<2>> {
    check_last_dim(x, gate.weight.shape().dims::<2>()[0], "router input")?;
    let logits = gate.forward(x.clone());
    check_logits(&logits, "router logits")?;
    Ok(logits)
}

/// One sampled (or greedy) routing of a [`ReinforceRouter`] with what the estimator needs.
#[derive(Debug)]
pub struct ReinforceSample {
    /// The routing (one module per row, weight 1, no gradient).
    pub routing: Routing,
    /// `log π(a | x)` of each row's choice, `[rows]`, in the autodiff graph.
    pub log_prob: Tensor<1>,
    /// The chosen module of each row, `[rows]`.
    pub actions: Tensor<1, Int>,
}

/// A hard router trained with the score-function estimator (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct ReinforceRouter {
    /// `d → E` logits, no bias.
    pub gate: Linear,
    /// Sampling temperature `τ`.
    pub temperature: f64,
    /// Sample in training (greedy otherwise).
    pub training: Param<Flag>,
}

impl ReinforceRouter {
    /// A router over `num_modules` modules for rows of width `d_model`, sampling at
    /// temperature `τ`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero sizes or a temperature that is not positive and finite.
    pub fn new(
        d_model: usize,
        num_modules: usize,
        temperature: f64,
        device: &Device,
    ) -> Result<Self> {
        check_temperature("REINFORCE router temperature", temperature)?;
        Ok(Self {
            gate: gate(d_model, num_modules, device)?,
            temperature,
            training: Param::from_bool(true),
        })
    }

    /// Samples a module per row of `x: [rows, d]` (training) or takes the most likely one,
    /// returning the routing with the log-probabilities the estimator needs.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong width; [`Error::NonFinite`] for NaN or infinite logits.
    pub fn sample(&self, x: &Tensor<2>) -> Result<ReinforceSample> {
        let logits = gate_logits(&self.gate, x)?.div_scalar(self.temperature);
        let [rows, e] = logits.dims();
        let pick = if self.training.is_enabled() {
            logits.clone().detach() + gumbel_like(&logits)
        } else {
            logits.clone().detach()
        };
        let actions: Tensor<2, Int> = pick.argmax(1);
        let log_prob = log_softmax(logits, 1)
            .gather(1, actions.clone())
            .reshape([rows]);
        let weights = Tensor::<2>::ones([rows, 1], &x.device());
        let routing = Routing::new(actions.clone(), weights, e)?;
        Ok(ReinforceSample {
            routing,
            log_prob,
            actions: actions.reshape([rows]),
        })
    }

    /// Turns sampling on (training) or off (greedy choice).
    pub fn set_training(&mut self, on: bool) {
        self.training = Param::from_bool(on);
    }
}

impl Router for ReinforceRouter {
    fn num_modules(&self) -> usize {
        self.gate.weight.shape().dims::<2>()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("ReinforceRouter")?;
        Ok(self.sample(x)?.routing)
    }
}

/// The REINFORCE surrogate loss `−mean_i((r_i − b) · log π(a_i | x_i))` for the choices of a
/// [`ReinforceSample`] (`log_prob: [rows]`) and their rewards (higher is better); its
/// gradient is the score-function estimate of `−∇ E[r]`. Add it to the modules' own loss.
///
/// # Errors
/// [`Error::Shape`] for a reward count other than the row count; [`Error::NonFinite`] for a
/// NaN or infinite reward or baseline.
pub fn reinforce_loss(log_prob: Tensor<1>, rewards: &[f32], baseline: f64) -> Result<Tensor<1>> {
    let rows = log_prob.dims()[0];
    if rewards.len() != rows {
        return Err(Error::shape(
            "REINFORCE rewards (one per routed row)",
            rows.to_string(),
            rewards.len().to_string(),
        ));
    }
    if !baseline.is_finite() || rewards.iter().any(|r| !r.is_finite()) {
        return Err(Error::non_finite("REINFORCE rewards or baseline"));
    }
    let advantage: Vec<f32> = rewards.iter().map(|r| r - baseline as f32).collect();
    let a = float_tensor(advantage, [rows], &log_prob.device());
    Ok((log_prob * a).mean().neg())
}

/// An exponential moving average of past mean rewards: a baseline that does not depend on the
/// current choices, so the estimator stays unbiased.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RewardBaseline {
    /// The current baseline (0 before the first update).
    pub value: f64,
    /// Weight of the old value in an update, in `[0, 1)`.
    pub decay: f64,
    seen: bool,
}

impl RewardBaseline {
    /// A baseline with the given `decay` (0.9 is common).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a decay outside `[0, 1)`.
    pub fn new(decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::invalid(
                "baseline decay",
                format!("{decay} is outside [0, 1)"),
            ));
        }
        Ok(Self {
            value: 0.0,
            decay,
            seen: false,
        })
    }

    /// Folds in a batch of rewards *after* they were used (the first batch sets the value).
    pub fn update(&mut self, rewards: &[f32]) {
        if rewards.is_empty() {
            return;
        }
        let mean = rewards.iter().map(|&r| f64::from(r)).sum::<f64>() / rewards.len() as f64;
        self.value = if self.seen {
            self.decay * self.value + (1.0 - self.decay) * mean
        } else {
            mean
        };
        self.seen = true;
    }
}

/// A hard router trained with the Gumbel-softmax straight-through estimator (see the
/// [module docs](self)).
#[derive(Module, Debug)]
pub struct GumbelRouter {
    /// `d → E` logits, no bias.
    pub gate: Linear,
    /// Relaxation temperature `τ`.
    pub temperature: f64,
    /// Route every row to every module so the full estimator reaches all logits (every
    /// module computes); otherwise only the chosen slot carries the gradient.
    pub dense_gradient: bool,
    /// Sample in training (greedy otherwise).
    pub training: Param<Flag>,
}

impl GumbelRouter {
    /// A router over `num_modules` modules for rows of width `d_model`, relaxed at temperature
    /// `τ`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero sizes or a temperature that is not positive and finite.
    pub fn new(
        d_model: usize,
        num_modules: usize,
        temperature: f64,
        device: &Device,
    ) -> Result<Self> {
        check_temperature("Gumbel router temperature", temperature)?;
        Ok(Self {
            gate: gate(d_model, num_modules, device)?,
            temperature,
            dense_gradient: false,
            training: Param::from_bool(true),
        })
    }

    /// Turns sampling on (training) or off (greedy choice, weight 1).
    pub fn set_training(&mut self, on: bool) {
        self.training = Param::from_bool(on);
    }

    /// Routes from precomputed `logits: [rows, E]`.
    ///
    /// # Errors
    /// [`Error::NonFinite`] for NaN or infinite logits.
    pub fn route_logits(&self, logits: Tensor<2>) -> Result<Routing> {
        check_logits(&logits, "router logits")?;
        let [rows, e] = logits.dims();
        let device = logits.device();
        if !self.training.is_enabled() {
            let idx: Tensor<2, Int> = logits.argmax(1);
            return Routing::new(idx, Tensor::ones([rows, 1], &device), e);
        }
        let noisy = logits.clone() + gumbel_like(&logits);
        let soft = softmax(noisy.clone().div_scalar(self.temperature), 1);
        let idx: Tensor<2, Int> = noisy.detach().argmax(1);
        if self.dense_gradient {
            let hard = Tensor::<2>::zeros([rows, e], &device).scatter(
                1,
                idx,
                Tensor::ones([rows, 1], &device),
                burn::tensor::IndexingUpdateOp::Add,
            );
            return Routing::from_dense(hard + soft.clone() - soft.detach());
        }
        let chosen = soft.gather(1, idx.clone());
        let w = chosen.clone() - chosen.detach() + 1.0;
        Routing::new(idx, w, e)
    }
}

impl Router for GumbelRouter {
    fn num_modules(&self) -> usize {
        self.gate.weight.shape().dims::<2>()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("GumbelRouter")?;
        self.route_logits(gate_logits(&self.gate, x)?)
    }
}
