//! Function composition by stacking (MAD-X: Pfeiffer, Vulić, Gurevych & Ruder 2020, "MAD-X:
//! An Adapter-Based Framework for Multi-Task Cross-Lingual Transfer", arXiv 2005.00052): the
//! survey's function aggregation, where modules apply one after another rather than side by
//! side.
//!
//! Each stage is a residual function of the previous stage's output:
//!
//! ```text
//! h₀ = h,   h_s = h_{s−1} + f_s(h_{s−1}),   Stack(h) = h_S
//! ```
//!
//! MAD-X stacks a language adapter under a task adapter; swapping the language adapter at
//! test time transfers the task to another language. [`Stack`] composes fixed modules;
//! [`stack_routed`] routes every stage through the one dispatch, so each row can take its own
//! language and task modules (a mixed batch of language × task pairs), with the modules of a
//! stage computing only their own rows.
//!
//! # Shapes
//! `h`: `[rows, d]`; every module maps `d → d`.

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::modules::{ComputeModule, check_modules, dispatch_modules};
use crate::routing::{Routing, WeightedSum};

/// Modules applied in order, each on the previous output, with residual connections (see the
/// [module docs](self)).
#[derive(Debug)]
pub struct Stack<M> {
    stages: Vec<M>,
}

impl<M: ComputeModule> Stack<M> {
    /// Stacks `stages`, the first applied first.
    ///
    /// # Errors
    /// [`Error::Invalid`] for no stages; [`Error::Shape`] for a stage that does not map one
    /// width to itself or whose width differs from the first stage's.
    pub fn new(stages: Vec<M>) -> Result<Self> {
        let Some(first) = stages.first() else {
            return Err(Error::invalid("stack", "needs at least one stage"));
        };
        let d = first.d_input();
        for (i, m) in stages.iter().enumerate() {
            if m.d_input() != d || m.d_output() != d {
                return Err(Error::shape(
                    format!("stack stage {i} (each maps d -> d)"),
                    format!("[{d} -> {d}]"),
                    format!("[{} -> {}]", m.d_input(), m.d_output()),
                ));
            }
        }
        Ok(Self { stages })
    }

    /// The stages, first applied first.
    pub fn stages(&self) -> &[M] {
        &self.stages
    }

    /// `h_S`: every stage in order.
    pub fn forward(&self, h: Tensor<2>) -> Tensor<2> {
        self.stages
            .iter()
            .fold(h, |h, m| h.clone() + m.forward_rows(h))
    }
}

impl<M: ComputeModule> ComputeModule for Stack<M> {
    fn d_input(&self) -> usize {
        self.stages[0].d_input()
    }

    fn d_output(&self) -> usize {
        self.stages[0].d_output()
    }

    /// The stack's residual function, `Stack(h) − h`, as a stacked module is itself a module
    /// another router can choose.
    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward(x.clone()) - x
    }
}

/// Stacking with a routing per stage: `h_s = h_{s−1} + Σ_j w_{s,j} f_{s,j}(h_{s−1})` through
/// the dispatch, so each row takes its own modules at each stage (MAD-X's language then task
/// adapter, per row).
///
/// # Errors
/// [`Error::Invalid`] for no stages; as [`dispatch_modules`] (module widths, routing sizes).
pub fn stack_routed<M: ComputeModule>(
    h: Tensor<2>,
    stages: &[(&[M], &Routing)],
) -> Result<Tensor<2>> {
    if stages.is_empty() {
        return Err(Error::invalid("routed stack", "needs at least one stage"));
    }
    let mut h = h;
    for (s, (modules, routing)) in stages.iter().enumerate() {
        let (d_in, d_out) = check_modules(modules, routing.num_modules(), "routed stack stage")?;
        if d_in != d_out {
            return Err(Error::shape(
                format!("routed stack stage {s} (modules map d -> d)"),
                format!("[{d_in} -> {d_in}]"),
                format!("[{d_in} -> {d_out}]"),
            ));
        }
        h = h.clone() + dispatch_modules(modules, routing, h, &WeightedSum)?;
    }
    Ok(h)
}
