//! Modules: the computation functions of modular deep learning.
//!
//! Pfeiffer et al. (arXiv 2302.11529) distinguish three ways a module composes with a
//! pre-trained model, and modula has each:
//!
//! - **parameter composition**, modules that modify a host layer's weights:
//!   [`lora`] (LoRA, rsLoRA, many named adapters per layer, merge/unmerge), [`lycoris`]
//!   (LoHa, LoKr), [`sparse`] (LT-SFT sparse deltas, BitFit bias deltas) and [`ia3`];
//! - **input composition**, modules that add inputs: [`prefix`] (prefix tuning) and
//!   [`prompt`] (prompt tuning, with input aggregation of several prompts);
//! - **function composition**, modules that add a function on the hidden state:
//!   [`adapter`] (bottleneck adapters, Houlsby and Pfeiffer placements), [`compacter`]
//!   (PHM / Compacter adapters with shared rules) and [`film`] (conditioned scale and shift);
//! - **hypernetworks** that generate modules: [`hyper`] (HyperFormer-style adapters from task
//!   and layer embeddings).
//!
//! Any of them can also serve as a routed expert: the [`ComputeModule`] trait is what the
//! sparse dispatch ([`DispatchPlan`]) calls on the rows a module
//! was routed.

pub mod adapter;
pub mod compacter;
pub mod film;
pub mod hyper;
pub mod ia3;
pub mod lora;
pub mod lycoris;
pub mod prefix;
pub mod prompt;
pub mod sparse;

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::routing::{Aggregator, DispatchPlan, Routing};

/// The module role: a computation function on rows of hidden states, `[n, d_input]` to
/// `[n, d_output]`.
///
/// Named to stay clear of burn's own `Module` derive trait in a user's scope. Types that
/// implement it are usually also burn `Module`s (they hold parameters).
pub trait ComputeModule {
    /// Width of the rows the module reads.
    fn d_input(&self) -> usize;

    /// Width of the rows the module writes.
    fn d_output(&self) -> usize;

    /// Applies the module to `x: [n, d_input]`, returning `[n, d_output]`.
    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2>;
}

/// Applies `modules` to `x: [rows, d]` under `routing` through the sparse dispatch: each module
/// computes on its own rows only, and `agg` combines the results. Plans the routing; layers
/// that share one routing should plan it once and call [`dispatch_planned`].
///
/// # Errors
/// [`Error::Shape`] if the modules disagree on widths, `x` has the wrong width or the routing
/// refers to a different number of modules; [`Error::ModuleIndex`] or [`Error::NonFinite`] for invalid routings.
pub fn dispatch_modules<M, A>(
    modules: &[M],
    routing: &Routing,
    x: Tensor<2>,
    agg: &A,
) -> Result<Tensor<2>>
where
    M: ComputeModule,
    A: Aggregator + ?Sized,
{
    dispatch_planned(modules, &DispatchPlan::new(routing)?, x, agg)
}

/// [`dispatch_modules`] under a plan built once.
///
/// # Errors
/// As [`dispatch_modules`].
pub fn dispatch_planned<M, A>(
    modules: &[M],
    plan: &DispatchPlan,
    x: Tensor<2>,
    agg: &A,
) -> Result<Tensor<2>>
where
    M: ComputeModule,
    A: Aggregator + ?Sized,
{
    let (d_in, d_out) = check_modules(modules, plan.num_modules(), "dispatch_modules")?;
    if x.dims()[1] != d_in {
        return Err(Error::shape(
            "dispatch_modules input width",
            d_in.to_string(),
            x.dims()[1].to_string(),
        ));
    }
    plan.apply(x, d_out, agg, |m, xm| Ok(modules[m].forward_rows(xm)))
}

/// Checks that there is at least one module, that a routing over `num_modules` modules fits
/// `modules`, and that every module has the first one's widths; returns `(d_in, d_out)`.
pub(crate) fn check_modules<M: ComputeModule>(
    modules: &[M],
    num_modules: usize,
    context: &str,
) -> Result<(usize, usize)> {
    let Some(first) = modules.first() else {
        return Err(Error::invalid(context, "there must be at least one module"));
    };
    if num_modules != modules.len() {
        return Err(Error::shape(
            format!("{context} (routing modules vs modules given)"),
            modules.len().to_string(),
            num_modules.to_string(),
        ));
    }
    let (d_in, d_out) = (first.d_input(), first.d_output());
    for (i, m) in modules.iter().enumerate() {
        if m.d_input() != d_in || m.d_output() != d_out {
            return Err(Error::shape(
                format!("{context}: module {i} widths"),
                format!("[{d_in} -> {d_out}]"),
                format!("[{} -> {}]", m.d_input(), m.d_output()),
            ));
        }
    }
    Ok((d_in, d_out))
}

/// Checks that the last axis of a `D`-dimensional input has width `expected`.
pub(crate) fn check_last_dim<const D: usize>(
    x: &Tensor<D>,
    expected: usize,
    context: &str,
) -> Result<()> {
    let got = x.dims()[D - 1];
    if got == expected {
        Ok(())
    } else {
        Err(Error::shape(
            context,
            format!("last axis {expected}"),
            format!("{:?}", x.dims()),
        ))
    }
}
