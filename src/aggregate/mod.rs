//! Aggregators with parameters or structure of their own, beside the plain mixtures
//! ([`WeightedSum`](crate::WeightedSum), [`WeightedMean`](crate::WeightedMean)) that live with
//! the [`Aggregator`](crate::Aggregator) trait in [`routing`](crate::routing).
//!
//! | aggregator | combines | paper |
//! |---|---|---|
//! | [`WeightedSum`](crate::WeightedSum) | `Σ_j w_j y_j` (MoE, Arrow, mixed batches; under a dense routing, the LMC mixture) | |
//! | [`WeightedMean`](crate::WeightedMean) | `Σ_j w_j y_j / Σ_j w_j` | |
//! | [`AdapterFusion`] | attention over the outputs, query from the input rows | Pfeiffer et al. 2021 |
//! | [`LoraFactorMix`] | LoRA factors: `(Σ w s B)(Σ w A) x` | Polytropon, mttl's Arrow |
//! | [`Stack`], [`stack_routed`] | function composition: `h + f₁(h)`, then `f₂` on that, … (per row with a routing per stage) | MAD-X, Pfeiffer et al. 2020 |
//!
//! [`lora_mixture`] applies a library of LoRA modules under a routing with either mixture
//! ([`LoraMix`]); [`RoutedLora`] joins a router and a mixture into the
//! [`LayerRouter`](crate::LayerRouter) a host layer runs in its forward pass.

pub mod fusion;
pub mod lora_mix;
pub mod routed;
pub mod stack;

pub use fusion::{AdapterFusion, AdapterFusionConfig};
pub use lora_mix::{LoraFactorMix, LoraMix, lora_mixture, lora_mixture_planned};
pub use routed::{RoutedLora, RoutingTrace, TracedRouting};
pub use stack::{Stack, stack_routed};
