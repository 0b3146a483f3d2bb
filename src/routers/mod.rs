//! Every router in the crate, filed by role: each implements [`Router`](crate::Router) and
//! produces a [`Routing`](crate::Routing) that the one dispatch
//! ([`DispatchPlan`](crate::DispatchPlan)) serves.
//!
//! | router | reads | paper |
//! |---|---|---|
//! | [`FixedRouter`](crate::FixedRouter) | rows (an assignment) or task ids | task routing |
//! | [`TopKRouter`] | rows | Shazeer 2017, Switch, Mixtral |
//! | [`NoisyTopKRouter`] | rows | Shazeer et al. 2017 |
//! | [`ExpertChoiceRouter`] | rows | Zhou et al. 2022 |
//! | [`HashRouter`] | token ids | Roller et al. 2021 |
//! | [`ArrowRouter`] | rows | Ostapenko et al. 2024 (Arrow) |
//! | [`PolytroponRouter`] | task ids | Ponti et al. 2023 |
//! | [`PerSequence`] | a model layer's rows, pooled per sequence | routing levels: token, sequence, global |
//! | [`TaskRouted`] | a model layer's rows, by their sequences' tasks | task-level routing in a model |
//! | [`XLoraRouter`] | rows | Buehler & Buehler 2024; L2R (Araujo et al. 2024) |
//! | [`SimilarityRouter`] | rows | L2R's similarity baseline |
//! | [`HyperRouter`] | task ids | hypernetwork routing (Hyper-X, Üstün et al. 2022) |
//! | [`ReinforceRouter`] | rows | hard routing by the score-function estimator (Williams 1992; Rosenbaum et al. 2018) |
//! | [`GumbelRouter`] | rows | hard routing by Gumbel-softmax straight-through (Jang et al. 2017) |
//! | [`LmcLayer`](crate::continual::lmc::LmcLayer) | rows | Ostapenko et al. 2021 (LMC local routing) |
//!
//! Soft MoE's dispatch ([`SoftMoe`](crate::moe::soft::SoftMoe)) is not a router: it mixes
//! tokens into expert slots, so what an expert sees is not a subset of the rows.
//!
//! [`capacity`] (token dropping) and [`losses`] (load balance, z-loss, entropy) belong to the
//! learned top-k gates.

pub mod arrow;
pub mod capacity;
pub mod expert_choice;
pub mod hash;
pub mod hyper;
pub mod level;
pub mod losses;
pub mod noisy;
pub mod polytropon;
pub mod similarity;
pub mod stochastic;
pub mod task;
pub mod topk;
pub mod xlora;

pub use arrow::ArrowRouter;
pub use capacity::SecondExpertPolicy;
pub use expert_choice::{ExpertChoiceRouter, ExpertChoiceRouterConfig};
pub use hash::{HashRouter, HashRouterConfig};
pub use hyper::HyperRouter;
pub use level::{PerSequence, RoutingLevel, SequenceBatch};
pub use noisy::{NoisyTopKRouter, NoisyTopKRouterConfig};
pub use polytropon::{PolytroponRouter, PolytroponRouterConfig};
pub use similarity::SimilarityRouter;
pub use stochastic::{
    GumbelRouter, ReinforceRouter, ReinforceSample, RewardBaseline, reinforce_loss,
};
pub use task::{SequenceTasks, TaskRouted};
pub use topk::{TopKRouter, TopKRouterConfig};
pub use xlora::{XLoraRouter, XLoraRouterConfig};

/// Checks a softmax or relaxation temperature: positive and finite.
pub(crate) fn check_temperature(what: &str, t: f64) -> crate::error::Result<()> {
    if t > 0.0 && t.is_finite() {
        Ok(())
    } else {
        Err(crate::error::Error::invalid(
            what,
            format!("{t} must be positive and finite"),
        ))
    }
}
