//! Where the plan meets the aggregator: [`DispatchPlan::apply`] (compute, then combine) and
//! the whole pipeline in one call, [`route_and_dispatch`].

use burn::tensor::Tensor;

use super::aggregate::Aggregator;
use super::plan::{DispatchPlan, check_output};
use super::router::Router;
use super::value::Routing;
use crate::error::Result;

impl DispatchPlan {
    /// The one entry point: runs each selected module on its rows (`f(m, x_m)`), then
    /// aggregates with `agg`. A plan built once serves every layer that shares its routing.
    ///
    /// For aggregators that are linear in the outputs ([`Aggregator::is_weighted_sum`]) each
    /// module's output is weighted and added into the result as soon as it is computed, so the
    /// outputs are never concatenated.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if `x` has other rows than the routing or a module returns the wrong
    /// shape; whatever `f` or the aggregator returns.
    pub fn apply<F, A>(&self, x: Tensor<2>, d_out: usize, agg: &A, f: F) -> Result<Tensor<2>>
    where
        F: FnMut(usize, Tensor<2>) -> Result<Tensor<2>>,
        A: Aggregator + ?Sized,
    {
        if !agg.is_weighted_sum() {
            let y = self.run(x.clone(), d_out, f)?;
            return agg.combine(self, &x, y);
        }
        let (rows, device) = (x.dims()[0], x.device());
        // Moved in and out of the option so each scatter-add can update the buffer in place.
        let mut out = Some(Tensor::<2>::zeros([rows, d_out], &device));
        self.each_segment(
            x,
            d_out,
            f,
            |m, ym| out = out.take().map(|o| self.add_weighted(o, m, ym)),
            "DispatchPlan::apply",
        )?;
        Ok(out.unwrap_or_else(|| Tensor::zeros([rows, d_out], &device)))
    }
}

impl DispatchPlan {
    /// The grouped form of [`apply`](Self::apply) for the weighted sum, when every module is
    /// computed by one operation: `g(x_plan, sizes, weights)` receives the rows gathered once
    /// in plan order (`[num_entries, d]`, module `m` owning `sizes[m]` consecutive rows) and
    /// each entry's routing weight (`[num_entries, 1]`), and returns the modules' outputs in
    /// plan order, *already weighted* (`[num_entries, d_out]`); the plan adds them back to
    /// their rows. The ops of [`grouped`](crate::grouped) are such a `g`.
    ///
    /// # Errors
    /// [`Error::Shape`](crate::Error::Shape) if `x` has other rows than the routing or `g`
    /// returns the wrong shape; whatever `g` returns.
    pub fn apply_grouped<G>(&self, x: Tensor<2>, d_out: usize, g: G) -> Result<Tensor<2>>
    where
        G: FnOnce(Tensor<2>, &[usize], Tensor<2>) -> Result<Tensor<2>>,
    {
        let rows = x.dims()[0];
        self.check_rows(rows, "DispatchPlan::apply_grouped")?;
        let n = self.num_entries();
        if n == 0 {
            return Ok(Tensor::zeros([rows, d_out], &x.device()));
        }
        let y = g(
            self.gather(x),
            &self.rows_per_module(),
            self.entry_weights(),
        )?;
        check_output(
            "DispatchPlan::apply_grouped (output of the grouped modules)",
            &y,
            n,
            d_out,
        )?;
        Ok(self.add_rows(y))
    }
}

/// Routes the rows of `x` with `router`, plans, runs the selected modules and aggregates: the
/// whole modular pipeline in one call. `f(m, x_m)` computes module `m` on its rows.
///
/// # Errors
/// Whatever the router, the plan, `f` or the aggregator returns.
pub fn route_and_dispatch<R, A, F>(
    router: &R,
    agg: &A,
    x: Tensor<2>,
    d_out: usize,
    f: F,
) -> Result<(Tensor<2>, Routing)>
where
    R: Router + ?Sized,
    A: Aggregator + ?Sized,
    F: FnMut(usize, Tensor<2>) -> Result<Tensor<2>>,
{
    let routing = router.route(&x)?;
    let plan = DispatchPlan::new(&routing)?;
    let y = plan.apply(x, d_out, agg, f)?;
    Ok((y, routing))
}
