//! The aggregator role and the two output mixtures every other part of the crate relies on.

use burn::tensor::Tensor;

use super::plan::DispatchPlan;
use crate::error::Result;

/// The aggregator role: combines the outputs of the modules a row was routed to.
///
/// An aggregator sees the plan (which module computed which slot, with which weight), the
/// input rows `x` (AdapterFusion's query reads them) and its own parameters, if it has any.
/// The plain mixtures are here; parameterised ones (AdapterFusion, LoRA factor mixing) live in
/// [`aggregate`](crate::aggregate).
///
/// # Shapes
/// - `x`: `[rows, d_in]`, the rows the modules read
/// - `y`: `[plan.num_entries(), d]`, the modules' outputs in plan order
///   ([`DispatchPlan::run`]); [`DispatchPlan::to_slots`] places them as `[rows, k, d]`
/// - result: `[rows, d_out]`
pub trait Aggregator {
    /// Combines the plan-ordered outputs `y` of the modules for inputs `x`.
    ///
    /// # Errors
    /// Shape errors for outputs or inputs of the wrong width.
    fn combine(&self, plan: &DispatchPlan, x: &Tensor<2>, y: Tensor<2>) -> Result<Tensor<2>>;

    /// Whether this aggregator is the plain weighted sum `Σ_j w_ij y_ij`, which the dispatch
    /// can accumulate module by module without keeping every output.
    fn is_weighted_sum(&self) -> bool {
        false
    }
}

/// `y_i = Σ_j w_ij · f_{m_ij}(x_i)`: the weighted output mixture (MoE, Arrow, mixed batches,
/// and, under a dense routing, the LMC mixture).
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightedSum;

impl WeightedSum {
    /// `Σ_j w_ij slots[i, j]` for `slots: [rows, k, d]` and `weights: [rows, k]`.
    pub fn over_slots(slots: Tensor<3>, weights: Tensor<2>) -> Tensor<2> {
        let [rows, k, d] = slots.dims();
        (slots * weights.reshape([rows, k, 1]))
            .sum_dim(1)
            .reshape([rows, d])
    }
}

impl Aggregator for WeightedSum {
    fn combine(&self, plan: &DispatchPlan, _x: &Tensor<2>, y: Tensor<2>) -> Result<Tensor<2>> {
        Ok(plan.combine(y))
    }

    fn is_weighted_sum(&self) -> bool {
        true
    }
}

/// `y_i = (Σ_j w_ij f_{m_ij}(x_i)) / Σ_j w_ij`: a weighted mean, robust to weights that do not
/// sum to one (rows whose weights sum to zero give zero).
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightedMean;

impl Aggregator for WeightedMean {
    fn combine(&self, plan: &DispatchPlan, _x: &Tensor<2>, y: Tensor<2>) -> Result<Tensor<2>> {
        let weights = plan.slot_weights();
        let rows = weights.dims()[0];
        let total = weights.clone().sum_dim(1);
        let safe = total.clone().abs().lower_elem(1e-12);
        let total = total.mask_fill(safe, 1.0).reshape([rows, 1]);
        Ok(WeightedSum::over_slots(plan.to_slots(y), weights) / total)
    }
}
