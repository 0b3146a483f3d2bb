//! Mixed-adapter batches on [`LoraLinear`]: each row or sequence names its own adapter.

use burn::tensor::Tensor;

use super::LoraLinear;
use super::module::output_mixture;
use crate::error::{Error, Result};
use crate::modules::check_last_dim;
use crate::routing::{DispatchPlan, Routing};

/// Mixed-adapter batches: serving many adapters on one base in one pass (each row or
/// sequence names its own adapter, as PEFT's `adapter_names` argument).
///
/// The base layer runs once over the whole batch. The adapter paths run on the gathered rows
/// of each adapter only, through the core's dispatch ([`forward_mixed`](Self::forward_mixed),
/// [`forward_routed`](Self::forward_routed)), or, when whole sequences share an adapter and
/// all adapters have one rank, as two batched matmuls against factors gathered per sequence
/// ([`forward_mixed_seqs`](Self::forward_mixed_seqs); the "BGMV" layout of Punica/S-LoRA),
/// which moves no activations at all. Active flags are ignored (the batch names the
/// adapters); dropout is not applied (this is the serving path). No adapter may be merged.
impl LoraLinear {
    /// Mixed-adapter forwards add each adapter's own path, so none may be merged, and the
    /// batch names the adapters, so no router may be installed.
    fn check_unmerged(&self) -> Result<()> {
        if self.router.is_some() {
            return Err(Error::invalid(
                "mixed-adapter batch",
                "the layer routes its adapters itself (a router is installed); remove the router (set_router(None)) to name adapters per sequence",
            ));
        }
        match self.slots.merged.iter().position(|m| *m) {
            Some(i) => Err(Error::AlreadyMerged {
                name: self.slots.names[i].clone(),
                operation: "a mixed-adapter forward",
            }),
            None => Ok(()),
        }
    }

    fn mixed_ids(&self, names: &[Option<&str>]) -> Result<Vec<i64>> {
        self.check_unmerged()?;
        names
            .iter()
            .map(|n| n.map_or(Ok(-1), |n| self.slots.index(n).map(|i| i as i64)))
            .collect()
    }

    /// Row `i` of `x: [rows, d_in]` uses adapter `names[i]` (`None`: the base only).
    ///
    /// # Errors
    /// [`Error::Shape`] for the wrong width or a name count that is not `rows`;
    /// [`Error::UnknownAdapter`]; [`Error::AlreadyMerged`] if an adapter is merged.
    pub fn forward_mixed(&self, x: Tensor<2>, names: &[Option<&str>]) -> Result<Tensor<2>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward_mixed input")?;
        let rows = x.dims()[0];
        if names.len() != rows {
            return Err(Error::shape(
                "LoraLinear::forward_mixed (one adapter name per row)",
                rows.to_string(),
                names.len().to_string(),
            ));
        }
        let ids = self.mixed_ids(names)?;
        let routing = Routing::one_per_row(&ids, self.adapters.len(), &x.device())?;
        self.forward_routed(x, &routing)
    }

    /// Each row mixes the adapters its routing selects: `base(x) + Σ_j w_j · Δ_{a_j}(x)`,
    /// with every adapter computed on its own rows only. `routing.num_modules()` must be the
    /// number of adapters (indices follow [`names`](Self::names)).
    ///
    /// # Errors
    /// Shape errors; [`Error::AlreadyMerged`] if an adapter is merged.
    pub fn forward_routed(&self, x: Tensor<2>, routing: &Routing) -> Result<Tensor<2>> {
        self.forward_planned(x, &DispatchPlan::new(routing)?)
    }

    /// [`forward_routed`](Self::forward_routed) under a plan built once: every layer that
    /// shares a routing (all layers of a mixed-adapter batch) can take the same plan, so the
    /// routing is read to the host and sorted once per batch, not once per layer.
    ///
    /// # Errors
    /// As [`forward_routed`](Self::forward_routed).
    pub fn forward_planned(&self, x: Tensor<2>, plan: &DispatchPlan) -> Result<Tensor<2>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward_routed input")?;
        self.check_unmerged()?;
        if plan.num_modules() != self.adapters.len() {
            return Err(Error::shape(
                "LoraLinear::forward_routed (routing modules = adapters)",
                self.adapters.len().to_string(),
                plan.num_modules().to_string(),
            ));
        }
        let base = self.base_forward(x.clone());
        if self.adapters.is_empty() {
            return Ok(base);
        }
        Ok(base + output_mixture(x, plan, &self.adapters)?)
    }

    /// Sequence `i` of `x: [batch, seq, d_in]` uses adapter `names[i]` (`None`: the base
    /// only), through a per-sequence plan ([`DispatchPlan::per_sequence`]): with one rank
    /// across the adapters the delta is two batched matmuls against the per-sequence factors
    /// (`[batch, d_in, r]`, `[batch, r, d_out]`); otherwise each adapter runs on its whole
    /// sequences. A model whose layers share the batch's routing can build that plan once and
    /// call [`forward_planned`](Self::forward_planned) in every layer.
    ///
    /// # Errors
    /// As [`forward_mixed`](Self::forward_mixed), with one name per sequence.
    pub fn forward_mixed_seqs(&self, x: Tensor<3>, names: &[Option<&str>]) -> Result<Tensor<3>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward_mixed_seqs input")?;
        let [batch, seq, d_in] = x.dims();
        if names.len() != batch {
            return Err(Error::shape(
                "LoraLinear::forward_mixed_seqs (one adapter name per sequence)",
                batch.to_string(),
                names.len().to_string(),
            ));
        }
        let ids = self.mixed_ids(names)?;
        let routing = Routing::one_per_row(&ids, self.adapters.len(), &x.device())?;
        let plan = DispatchPlan::per_sequence(&routing, seq)?;
        let y = self.forward_planned(x.reshape([batch * seq, d_in]), &plan)?;
        Ok(y.reshape([batch, seq, self.d_out()]))
    }
}
