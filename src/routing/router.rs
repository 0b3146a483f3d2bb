//! The router role and what a router reads.

use burn::tensor::{Device, Tensor};

use super::value::Routing;
use crate::error::{Error, Result};

/// What a router reads to route a batch: hidden-state rows, token ids or task ids.
///
/// Learned gates (top-k, X-LoRA, Arrow, similarity) read rows; hash routing reads token ids;
/// task routing and Polytropon read task ids. Each router accepts the kinds it can route and
/// returns [`Error::RouterInput`] for the others.
#[derive(Clone, Copy, Debug)]
pub enum RouterInput<'a> {
    /// Hidden states, `[rows, d]`.
    Rows(&'a Tensor<2>),
    /// One token id per row, on `device`.
    TokenIds {
        /// The ids.
        ids: &'a [i64],
        /// Where the routing is built.
        device: &'a Device,
    },
    /// One task id per row, on `device`.
    TaskIds {
        /// The ids.
        ids: &'a [usize],
        /// Where the routing is built.
        device: &'a Device,
    },
}

impl<'a> RouterInput<'a> {
    /// Number of rows to route.
    pub fn rows(&self) -> usize {
        match self {
            Self::Rows(x) => x.dims()[0],
            Self::TokenIds { ids, .. } => ids.len(),
            Self::TaskIds { ids, .. } => ids.len(),
        }
    }

    /// The kind's name, for messages: `"rows"`, `"token ids"` or `"task ids"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Rows(_) => "rows",
            Self::TokenIds { .. } => "token ids",
            Self::TaskIds { .. } => "task ids",
        }
    }

    /// The rows, or [`Error::RouterInput`] naming `router`.
    ///
    /// # Errors
    /// [`Error::RouterInput`] for token or task ids.
    pub fn into_rows(self, router: &'static str) -> Result<&'a Tensor<2>> {
        match self {
            Self::Rows(x) => Ok(x),
            other => Err(other.wrong(router, "rows")),
        }
    }

    /// The error for a router `router` that reads `expected` and was given this input.
    pub(crate) fn wrong(&self, router: &'static str, expected: &'static str) -> Error {
        Error::RouterInput {
            router,
            expected,
            got: self.kind(),
        }
    }
}

impl<'a> From<&'a Tensor<2>> for RouterInput<'a> {
    fn from(x: &'a Tensor<2>) -> Self {
        Self::Rows(x)
    }
}

/// The router role: maps a batch (rows, token ids or task ids) to a [`Routing`].
///
/// Implementations range from fixed task-id routing to learned gates; they may attach auxiliary
/// losses to the routing. Routers are backend-agnostic: they see tensors on whatever `Device`
/// the caller picked.
pub trait Router {
    /// Number of modules this router chooses among.
    fn num_modules(&self) -> usize;

    /// Routes a batch.
    ///
    /// # Errors
    /// [`Error::RouterInput`] for an input kind the router does not read; shape errors for the
    /// wrong width; [`Error::NonFinite`] for NaN/inf logits; [`Error::IdOutOfRange`] for ids
    /// outside the router's table.
    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing>;

    /// Routes the rows of `x: [rows, d]` (shorthand for [`route_input`](Self::route_input)
    /// with [`RouterInput::Rows`]).
    ///
    /// # Errors
    /// As [`route_input`](Self::route_input).
    fn route(&self, x: &Tensor<2>) -> Result<Routing> {
        self.route_input(RouterInput::Rows(x))
    }

    /// For a router that routes each sequence of a model's batch by something stated about it
    /// ([`TaskRouted`](crate::routers::TaskRouted)), the number of sequences the batch must
    /// hold; `None` (the default) for routers that read the rows alone.
    fn sequences(&self) -> Option<usize> {
        None
    }
}

/// A fixed router (task-id routing, or a mixed-adapter batch where each row names its
/// adapter).
///
/// Given rows, row `i` goes to `assignment[i]` (`-1` sends it to no module). Given task ids,
/// task `t` goes to module `t` (one module per task), and `assignment` is not used.
#[derive(Clone, Debug)]
pub struct FixedRouter {
    /// The module of each row (for [`RouterInput::Rows`]).
    pub assignment: Vec<i64>,
    /// The number of modules.
    pub modules: usize,
}

impl FixedRouter {
    /// One module per task: routes [`RouterInput::TaskIds`] (task `t` → module `t`).
    pub fn per_task(modules: usize) -> Self {
        Self {
            assignment: Vec::new(),
            modules,
        }
    }
}

impl Router for FixedRouter {
    fn num_modules(&self) -> usize {
        self.modules
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        match input {
            RouterInput::Rows(x) => {
                let rows = x.dims()[0];
                if rows != self.assignment.len() {
                    return Err(Error::shape(
                        "FixedRouter::route (rows)",
                        self.assignment.len().to_string(),
                        rows.to_string(),
                    ));
                }
                Routing::one_per_row(&self.assignment, self.modules, &x.device())
            }
            RouterInput::TaskIds { ids, device } => {
                if let Some(&t) = ids.iter().find(|&&t| t >= self.modules) {
                    return Err(Error::IdOutOfRange {
                        what: "task id",
                        within: "the router's modules (one per task)",
                        id: t as i64,
                        bound: self.modules,
                    });
                }
                let ids: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
                Routing::one_per_row(&ids, self.modules, device)
            }
            other => Err(other.wrong("FixedRouter", "rows or task ids")),
        }
    }
}
