//! Routing levels (Pfeiffer et al. 2023, arXiv 2302.11529 §4.3): the same router deciding per
//! token, per sequence in each layer, or once per sequence for the whole model.
//!
//! Inside a model a layer's router sees `b·t` rows for a prefill of `b` sequences of `t`
//! tokens and `b` rows for a cached decoding step. [`PerSequence`] wraps any router that reads
//! rows and lifts it to a coarser level:
//!
//! - [`RoutingLevel::Token`]: the inner router per row (what it does unwrapped);
//! - [`RoutingLevel::Sequence`]: per layer, the mean of each sequence's rows is routed and
//!   that decision applies to all its tokens; decoding steps reuse the prefill's decision of
//!   the same layer, so a sequence keeps its modules while it is generated;
//! - [`RoutingLevel::Global`]: the first routed layer of a forward decides per sequence (from
//!   its pooled input) and every later layer and decoding step reuses that decision (one
//!   routing per example for the whole model; install the same router in every layer, e.g.
//!   with [`install_routers`](crate::models::install_routers) returning one shared router).
//!
//! The caller states the number of sequences of the next batch with
//! [`SequenceBatch::start`], which also clears the decisions of the last batch.

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::routing::{Router, RouterInput, Routing};

/// Where a [`PerSequence`] router decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutingLevel {
    /// Per token (row): the inner router as it is.
    Token,
    /// Per sequence, in each layer (give each layer its own router).
    Sequence,
    /// Per sequence, once for the whole model.
    Global,
}

#[derive(Debug, Default)]
struct BatchState {
    sequences: usize,
    /// Incremented by every [`SequenceBatch::start`].
    epoch: u64,
    /// The model-wide decision of this batch ([`RoutingLevel::Global`]).
    global: Option<Routing>,
}

/// The batch a model runs next, shared between the caller and the [`PerSequence`] routers of
/// its layers (cheap to clone; clones share the state).
#[derive(Clone, Debug, Default)]
pub struct SequenceBatch(Arc<Mutex<BatchState>>);

impl SequenceBatch {
    /// No batch started yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a batch of `sequences` sequences, forgetting the decisions of the last one.
    pub fn start(&self, sequences: usize) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.sequences = sequences;
        s.epoch += 1;
        s.global = None;
    }

    /// The number of sequences of the batch in progress (0 before [`start`](Self::start)).
    pub fn sequences(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).sequences
    }
}

/// A router's own decision for the batch of an epoch.
type Decision = Arc<Mutex<Option<(u64, Routing)>>>;

/// A router lifted to a [`RoutingLevel`] (see the [module docs](self)). A burn module when `R`
/// is one, so [`LayerRouters`](crate::models::LayerRouters) trains it through the model.
#[derive(Module, Debug)]
pub struct PerSequence<R> {
    /// The router that decides (reads rows).
    pub router: R,
    /// The level.
    #[module(skip)]
    pub level: RoutingLevel,
    /// The batch in progress.
    #[module(skip)]
    pub batch: SequenceBatch,
    #[module(skip)]
    decided: Decision,
}

impl<R> PerSequence<R> {
    /// `router` deciding at `level` for the batches `batch` announces.
    pub fn new(router: R, level: RoutingLevel, batch: SequenceBatch) -> Self {
        Self {
            router,
            level,
            batch,
            decided: Decision::default(),
        }
    }
}

/// Repeats each of `b` rows of a routing `per` times (sequence order).
fn repeat_rows(r: &Routing, per: usize) -> Result<Routing> {
    if per == 1 {
        return Ok(r.clone());
    }
    let idx = r.indices();
    let w = r.weights();
    let [b, k] = idx.dims();
    let idx = idx
        .reshape([b, 1, k])
        .expand([b, per, k])
        .reshape([b * per, k]);
    let w: Tensor<2> = w
        .reshape([b, 1, k])
        .expand([b, per, k])
        .reshape([b * per, k]);
    let mut out = Routing::new(idx, w, r.num_modules())?;
    out.aux_losses = r.aux_losses.clone();
    out.diagnostics = r.diagnostics.clone();
    Ok(out)
}

impl<R: Router> Router for PerSequence<R> {
    fn num_modules(&self) -> usize {
        self.router.num_modules()
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("PerSequence")?;
        if self.level == RoutingLevel::Token {
            return self.router.route(x);
        }
        let [rows, d] = x.dims();
        let mut s = self.batch.0.lock().unwrap_or_else(|e| e.into_inner());
        let b = s.sequences;
        if b == 0 {
            return Err(Error::invalid(
                "sequence-level routing",
                "no batch is started; call SequenceBatch::start with the number of sequences before running the model",
            ));
        }
        if !rows.is_multiple_of(b) {
            return Err(Error::shape(
                "sequence-level routing: rows (a multiple of the sequences)",
                format!("a multiple of {b}"),
                rows.to_string(),
            ));
        }
        let per = rows / b;
        let pooled = || -> Tensor<2> { x.clone().reshape([b, per, d]).mean_dim(1).reshape([b, d]) };
        if self.level == RoutingLevel::Global {
            if s.global.is_none() {
                s.global = Some(self.router.route(&pooled())?);
            }
            return match &s.global {
                Some(g) => repeat_rows(g, per),
                None => unreachable!("decided above"),
            };
        }
        // Sequence level: a prefill (several rows per sequence) decides anew; a decoding step
        // (one row per sequence) of the same batch reuses this layer's decision.
        let epoch = s.epoch;
        drop(s);
        let mut mine = self.decided.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = matches!(&*mine, Some((e, _)) if *e == epoch);
        if per > 1 || !fresh {
            *mine = Some((epoch, self.router.route(&pooled())?));
        }
        match &*mine {
            Some((_, r)) => repeat_rows(r, per),
            None => unreachable!("decided above"),
        }
    }

    fn sequences(&self) -> Option<usize> {
        Some(self.batch.sequences()).filter(|&n| n > 0 && self.level != RoutingLevel::Token)
    }
}
