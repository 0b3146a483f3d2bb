//! Mixture-of-experts: expert networks and an MoE layer over any router, run through the
//! crate's one sparse dispatch. The gates (top-k, noisy top-k, expert choice, hash) and their
//! losses live in [`routers`](crate::routers).
//!
//! `y = Σ_{e ∈ topk(x)} w_e(x) · expert_e(x)`: only the selected experts compute, each on its
//! own rows ([`DispatchPlan`]), so top-k of `E` experts costs
//! about `k/E` of running every expert, plus routing.

pub mod experts;
pub mod soft;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::grouped::{grouped_linear, grouped_swiglu, swiglu_gate};
use crate::modules::{ComputeModule, check_last_dim, check_modules};
use crate::routers::{TopKRouter, TopKRouterConfig};
use crate::routing::{DispatchPlan, Router, Routing, WeightedSum};
use experts::{Expert, ExpertConfig, ExpertKind};

/// A sparse MoE feed-forward layer: a router (by default the learned [`TopKRouter`]) over
/// [`Expert`]s. Any router that reads rows and is a burn `Module` fits
/// ([`NoisyTopKRouter`](crate::NoisyTopKRouter), [`ExpertChoiceRouter`](crate::ExpertChoiceRouter),
/// [`XLoraRouter`](crate::XLoraRouter), ...); a router that reads token ids
/// ([`HashRouter`](crate::HashRouter)) routes outside the layer and hands the routing to
/// [`forward_routed`](Self::forward_routed).
#[derive(Module, Debug)]
pub struct MoeLayer<R: Module = TopKRouter> {
    /// The gate.
    pub router: R,
    /// The experts.
    pub experts: Vec<Expert>,
}

/// Configuration of a [`MoeLayer`] with the learned top-k gate.
#[derive(burn::config::Config, Debug)]
pub struct MoeLayerConfig {
    /// The gate (its `num_experts` experts are created).
    pub router: TopKRouterConfig,
    /// Each expert's configuration.
    pub expert: ExpertConfig,
}

impl MoeLayerConfig {
    /// Creates `router.num_experts` experts from `expert` and the router.
    ///
    /// # Errors
    /// Configuration errors; [`Error::Shape`] if the widths disagree.
    pub fn init(&self, device: &Device) -> Result<MoeLayer> {
        let (router, expert) = (&self.router, &self.expert);
        if router.d_model != expert.d_model {
            return Err(Error::shape(
                "MoE router vs expert width",
                router.d_model.to_string(),
                expert.d_model.to_string(),
            ));
        }
        Ok(MoeLayer {
            router: router.init(device)?,
            experts: (0..router.num_experts)
                .map(|_| expert.init(device))
                .collect::<Result<_>>()?,
        })
    }
}

impl<R: Module + Router> MoeLayer<R> {
    /// A layer from a router and its experts.
    ///
    /// # Errors
    /// [`Error::Shape`] if the router chooses among another number of experts or the experts
    /// disagree on their width; [`Error::Invalid`] for no experts.
    pub fn with_router(router: R, experts: Vec<Expert>) -> Result<Self> {
        let (d_in, d_out) = check_modules(&experts, router.num_modules(), "MoeLayer::with_router")?;
        if d_in != d_out {
            return Err(Error::shape(
                "MoeLayer::with_router (experts map the model width to itself)",
                format!("[{d_in} -> {d_in}]"),
                format!("[{d_in} -> {d_out}]"),
            ));
        }
        Ok(Self { router, experts })
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.experts.first().map_or(0, ComputeModule::d_input)
    }

    /// Routes `x: [T, d]`, runs each selected expert on its rows only and mixes the outputs.
    /// Returns the output `[T, d]` and the routing (with its auxiliary losses).
    ///
    /// # Errors
    /// Shape errors; [`Error::NonFinite`] for NaN/inf router logits.
    pub fn forward(&self, x: Tensor<2>) -> Result<(Tensor<2>, Routing)> {
        check_last_dim(&x, self.d_model(), "MoE input")?;
        let routing = self.router.route(&x)?;
        let y = self.forward_routed(x, &routing)?;
        Ok((y, routing))
    }

    /// Applies the experts under a given routing through the sparse dispatch.
    ///
    /// # Errors
    /// Shape or routing errors.
    pub fn forward_routed(&self, x: Tensor<2>, routing: &Routing) -> Result<Tensor<2>> {
        self.forward_planned(x, &DispatchPlan::new(routing)?)
    }

    /// [`forward_routed`](Self::forward_routed) under a plan built once (several layers that
    /// share one routing plan it once).
    ///
    /// # Errors
    /// Shape errors, or a plan over another number of experts.
    pub fn forward_planned(&self, x: Tensor<2>, plan: &DispatchPlan) -> Result<Tensor<2>> {
        if plan.num_modules() != self.experts.len() {
            return Err(Error::shape(
                "MoeLayer::forward_planned (routing modules = experts)",
                self.experts.len().to_string(),
                plan.num_modules().to_string(),
            ));
        }
        let Some(first) = self.experts.first() else {
            return Ok(Tensor::zeros([x.dims()[0], 0], &x.device()));
        };
        let (kind, activation) = (first.kind, first.activation);
        let biased = first.w_in.bias.is_some();
        let uniform = self.experts.iter().all(|e| {
            e.kind == kind
                && (kind == ExpertKind::SwiGlu || e.activation == activation)
                && e.w_in.bias.is_some() == biased
                && e.w_out.bias.is_some() == biased
                && e.d_ff() == first.d_ff()
                && e.hidden_mask.is_none()
        });
        if !uniform {
            // Experts of different shapes (or masked hidden units): each runs on its own rows.
            return plan.apply(x, self.d_model(), &WeightedSum, |m, xm| {
                Ok(self.experts[m].forward_rows(xm))
            });
        }
        let w_in: Vec<Tensor<2>> = self.experts.iter().map(|e| e.w_in.weight.val()).collect();
        let w_out: Vec<Tensor<2>> = self.experts.iter().map(|e| e.w_out.weight.val()).collect();
        plan.apply_grouped(x, self.d_model(), |xp, sizes, w| {
            if !biased && kind == ExpertKind::SwiGlu {
                return grouped_swiglu(xp, sizes, &w_in, &w_out, Some(w));
            }
            let biases = |f: fn(&Expert) -> &Linear| -> Option<Vec<Tensor<1>>> {
                self.experts
                    .iter()
                    .map(|e| f(e).bias.as_ref().map(|b| b.val()))
                    .collect()
            };
            let (b_in, b_out) = (biases(|e| &e.w_in), biases(|e| &e.w_out));
            let h = grouped_linear(xp, sizes, &w_in, b_in.as_deref())?;
            let h = match kind {
                ExpertKind::Mlp => activation.apply(h),
                ExpertKind::SwiGlu => swiglu_gate(h),
            };
            Ok(grouped_linear(h, sizes, &w_out, b_out.as_deref())? * w)
        })
    }

    /// Reference: every expert on every row, weighted by the routing's dense form. Same
    /// result as [`forward_routed`](Self::forward_routed), `E/k` times the work.
    ///
    /// # Errors
    /// Shape errors.
    pub fn forward_dense(&self, x: Tensor<2>, routing: &Routing) -> Result<Tensor<2>> {
        check_last_dim(&x, self.d_model(), "MoE input")?;
        let dense = routing.to_dense();
        let [t, _] = dense.dims();
        let mut y = Tensor::<2>::zeros([t, self.d_model()], &x.device());
        for (e, expert) in self.experts.iter().enumerate() {
            let w = dense.clone().slice([0..t, e..e + 1]);
            y = y + expert.forward_rows(x.clone()) * w;
        }
        Ok(y)
    }
}
