//! Mixture-of-experts: learned routers, their auxiliary losses, expert networks, and an MoE
//! layer that runs through the crate's one sparse dispatch.
//!
//! `y = Σ_{e ∈ topk(x)} w_e(x) · expert_e(x)`: only the selected experts compute, each on its
//! own rows ([`DispatchPlan`]), so top-k of `E` experts costs
//! about `k/E` of running every expert, plus routing.

pub mod capacity;
pub mod expert_choice;
pub mod experts;
pub mod losses;
pub mod noisy;
pub mod router;
pub mod soft;

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::modules::{ComputeModule, check_last_dim};
use crate::routing::{DispatchPlan, Router, Routing, WeightedSum};
use experts::{Expert, ExpertConfig};
use router::{TopKRouter, TopKRouterConfig};

/// A sparse MoE feed-forward layer: a [`TopKRouter`] over [`Expert`]s.
#[derive(Module, Debug)]
pub struct MoeLayer {
    /// The gate.
    pub router: TopKRouter,
    /// The experts.
    pub experts: Vec<Expert>,
}

impl MoeLayer {
    /// Creates `router.num_experts` experts from `expert` and the router.
    ///
    /// # Errors
    /// Configuration errors; [`Error::Shape`] if the widths disagree.
    pub fn new(router: &TopKRouterConfig, expert: &ExpertConfig, device: &Device) -> Result<Self> {
        if router.d_model != expert.d_model {
            return Err(Error::shape(
                "MoE router vs expert width",
                router.d_model.to_string(),
                expert.d_model.to_string(),
            ));
        }
        Ok(Self {
            router: router.init(device)?,
            experts: (0..router.num_experts)
                .map(|_| expert.init(device))
                .collect::<Result<_>>()?,
        })
    }

    /// Model width.
    pub fn d_model(&self) -> usize {
        self.experts.first().map_or(0, ComputeModule::d_input)
    }

    /// Routes `x: [T, d]`, runs each selected expert on its rows only and mixes the outputs.
    /// Returns the output `[T, d]` and the routing (with its auxiliary losses).
    ///
    /// # Errors
    /// Shape errors; [`Error::Routing`] for NaN/inf router logits.
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
        plan.apply(x, self.d_model(), &WeightedSum, |m, xm| {
            Ok(self.experts[m].forward_rows(xm))
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

impl Router for MoeLayer {
    fn num_modules(&self) -> usize {
        self.experts.len()
    }

    fn route(&self, x: &Tensor<2>) -> Result<Routing> {
        self.router.route(x)
    }
}
