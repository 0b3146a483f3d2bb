//! Aggregating LoRA modules under a routing (the aggregator role for libraries of LoRAs).
//!
//! - [`LoraMix::Output`]: the output mixture `Σ_e w_e s_e B_e A_e x`, each expert computed on
//!   the rows routed to it only (the core's sparse dispatch; per sequence, the factors are
//!   gathered instead: see [`DispatchPlan::per_sequence`]).
//! - [`LoraMix::Factor`]: the parameter (factor) mixture `(Σ_e w_e s_e B_e)(Σ_e w_e A_e) x` of
//!   mttl and Polytropon. The modules compute `x A_e` (`r` wide) and the [`LoraFactorMix`]
//!   aggregator sums them, `u = Σ_e w_e x A_e`, then applies the mixed up-projection
//!   `Σ_e w_e s_e u B_e` through a second pass of the same plan, so no mixed factor is ever
//!   formed; all experts must share one rank.
//!
//! Gradients flow to the routing weights and to the factors in both modes.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::modules::lora::LoraModule;
use crate::modules::lora::module::output_mixture;
use crate::routing::{Aggregator, DispatchPlan, Routing, WeightedSum};

/// How a routing combines LoRA experts (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum LoraMix {
    /// `Σ w_e s_e B_e A_e x` (PEFT's Arrow, X-LoRA).
    #[default]
    Output,
    /// `(Σ w_e s_e B_e)(Σ w_e A_e) x` (mttl's Arrow, Polytropon).
    Factor,
}

/// The factor-mixing aggregator: the modules' outputs are the down-projections `x A_e`
/// (`[rows_e, r]`); it combines them into `(Σ_e w_e s_e B_e)(Σ_e w_e A_e) x` (see the
/// [module docs](self)).
#[derive(Clone, Copy, Debug)]
pub struct LoraFactorMix<'a> {
    /// The modules, in the routing's order; they share one rank.
    pub modules: &'a [LoraModule],
}

impl Aggregator for LoraFactorMix<'_> {
    fn combine(&self, plan: &DispatchPlan, _x: &Tensor<2>, y: Tensor<2>) -> Result<Tensor<2>> {
        let d_out = self.modules.first().map_or(0, LoraModule::d_out);
        let u = plan.combine(y);
        plan.apply(u, d_out, &WeightedSum, |m, um| {
            let a = &self.modules[m];
            Ok(um.matmul(a.b.val()).mul_scalar(a.scaling()))
        })
    }
}

/// The experts' combined contribution for `x: [rows, d_in]` under `routing` (module `e` is
/// `adapters[e]`), `[rows, d_out]`. Plans the routing; several layers that share one routing
/// should plan it once and call [`lora_mixture_planned`].
///
/// # Errors
/// [`Error::Shape`] if the routing's module count or row count does not match, or the
/// adapters' widths differ; [`Error::Invalid`] for no adapters or (factor mode) mixed ranks.
pub fn lora_mixture(
    x: Tensor<2>,
    routing: &Routing,
    adapters: &[LoraModule],
    mode: LoraMix,
) -> Result<Tensor<2>> {
    lora_mixture_planned(x, &DispatchPlan::new(routing)?, adapters, mode)
}

/// [`lora_mixture`] under a plan built once (see [`DispatchPlan`]).
///
/// # Errors
/// As [`lora_mixture`].
pub fn lora_mixture_planned(
    x: Tensor<2>,
    plan: &DispatchPlan,
    adapters: &[LoraModule],
    mode: LoraMix,
) -> Result<Tensor<2>> {
    let Some(first) = adapters.first() else {
        return Err(Error::invalid("LoRA mixture", "there are no adapters"));
    };
    if let Some(a) = adapters
        .iter()
        .find(|a| (a.d_in(), a.d_out()) != (first.d_in(), first.d_out()))
    {
        return Err(Error::shape(
            "LoRA mixture (adapter widths)",
            format!("[{}, {}]", first.d_in(), first.d_out()),
            format!("[{}, {}]", a.d_in(), a.d_out()),
        ));
    }
    match mode {
        LoraMix::Output => output_mixture(x, plan, adapters),
        LoraMix::Factor => {
            if plan.num_modules() != adapters.len() {
                return Err(Error::shape(
                    "LoRA mixture (routing modules = adapters)",
                    adapters.len().to_string(),
                    plan.num_modules().to_string(),
                ));
            }
            let r = first.rank();
            if adapters.iter().any(|a| a.rank() != r) {
                return Err(Error::invalid(
                    "LoraMix::Factor",
                    "factor mixing needs adapters of one rank; use LoraMix::Output",
                ));
            }
            let mix = LoraFactorMix { modules: adapters };
            plan.apply(x, r, &mix, |m, xm| Ok(xm.matmul(adapters[m].a_masked())))
        }
    }
}
