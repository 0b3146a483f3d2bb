//! The pipeline: route → plan → compute → combine.
//!
//! In the modular deep learning view (Pfeiffer et al., "Modular Deep Learning",
//! arXiv 2302.11529) a *router* decides which modules see which input rows and with what weight,
//! modules compute, and an *aggregator* combines the modules' outputs. modula writes that once,
//! and everything else in the crate is a member of one of these roles:
//!
//! ```text
//! input (rows, token ids or task ids) ──► Router ──► Routing { indices [units, k], weights [units, k] }
//!                                                       │
//!                                                       ▼
//! DispatchPlan (built once, shared by every layer that uses the routing):
//!     rows:      sort the units·k slots by module, gather x once, scatter-add back
//!     dense:     every module on every row, weighted by its column (no host read)
//!     sequences: as rows, one unit = one sequence of consecutive rows
//!                                                       │
//!                                                       ▼
//! module m computes on its segment only ──► Aggregator combines (sees the plan and x)
//! ```
//!
//! Only the selected modules compute, each only on its rows: the cost is
//! `Σ_m rows_m · cost_m` plus one gather and one scatter, instead of `modules · rows · cost`.
//! A slot whose index is `-1` is *dropped* (no module sees it, it contributes zero); this is how
//! capacity-limited routers mark overflowing tokens.
//!
//! The dense form of a routing is the `[rows, modules]` matrix `R` with
//! `R[i, indices[i, j]] += weights[i, j]`, and a weighted-sum dispatch computes exactly
//! `y_i = Σ_m R[i, m] · f_m(x_i)`.
//!
//! - [`Routing`] (value.rs): the routing value.
//! - [`Router`], [`RouterInput`], [`FixedRouter`] (router.rs): the router role. The learned
//!   routers live in [`routers`](crate::routers).
//! - [`DispatchPlan`] (plan.rs): the plan and its three strategies; its one entry point
//!   [`DispatchPlan::apply`] and [`route_and_dispatch`] (dispatch.rs), where the plan meets
//!   the aggregator.
//! - [`Aggregator`], [`WeightedSum`], [`WeightedMean`] (aggregate.rs): the aggregator role;
//!   parameterised aggregators live in [`aggregate`](crate::aggregate).

mod aggregate;
mod dispatch;
mod plan;
mod router;
mod value;

pub use aggregate::{Aggregator, WeightedMean, WeightedSum};
pub use dispatch::route_and_dispatch;
pub use plan::DispatchPlan;
pub use router::{FixedRouter, Router, RouterInput};
pub use value::Routing;
