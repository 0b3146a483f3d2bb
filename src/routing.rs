//! Routing, the one sparse dispatch, and the [`Router`] and [`Aggregator`] roles.
//!
//! In the modular deep learning view (Pfeiffer et al., "Modular Deep Learning",
//! arXiv 2302.11529) a *router* decides which modules see which input rows and with what weight,
//! and an *aggregator* combines the modules' outputs. modula writes that once:
//!
//! ```text
//! x [rows, d] ──► Router ──► Routing { indices [rows, k], weights [rows, k] }
//!                               │
//!                               ▼
//! DispatchPlan: sort the rows·k slots by module (one host counting sort),
//!               gather x once in that order, run module m on its contiguous segment only,
//!               scale by the slot weights and scatter-add back to [rows, d_out].
//! ```
//!
//! Only the selected modules compute, each only on its rows: the cost is
//! `Σ_m rows_m · cost_m` plus one gather and one scatter, instead of `modules · rows · cost`.
//! A slot whose index is `-1` is *dropped* (no module sees it, it contributes zero); this is how
//! capacity-limited routers mark overflowing tokens.
//!
//! The dense form of a routing is the `[rows, modules]` matrix `R` with
//! `R[i, indices[i, j]] += weights[i, j]`, and the dispatch computes exactly
//! `y_i = Σ_m R[i, m] · f_m(x_i)`.

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor};

use crate::error::{Error, Result};
use crate::tensor_util::{ensure_finite, float_tensor, int_tensor, to_vec_i64};

/// Per-row module selection in top-k form: for each row, `k` module indices and `k` weights.
///
/// Indices are in `0..num_modules`, or `-1` for a dropped slot. The same module may not appear
/// twice in one row with different meaning: duplicates are allowed and simply add up.
#[derive(Clone, Debug)]
pub struct Routing {
    indices: Tensor<2, Int>,
    weights: Tensor<2>,
    num_modules: usize,
    /// Auxiliary losses a router attaches (load balance, z-loss, ...), by name. Each is a scalar
    /// tensor `[1]` that stays in the autodiff graph.
    pub aux_losses: Vec<(String, Tensor<1>)>,
    /// Diagnostics a router reports (router entropy, ...), by name; not losses.
    pub diagnostics: Vec<(String, Tensor<1>)>,
}

impl Routing {
    /// Builds a routing from `indices: [rows, k]` (int) and `weights: [rows, k]` (float).
    ///
    /// # Errors
    /// [`Error::Shape`] if the two shapes differ, [`Error::Invalid`] if `num_modules` is 0.
    /// Index ranges are checked when the routing is planned ([`DispatchPlan::new`]).
    pub fn new(indices: Tensor<2, Int>, weights: Tensor<2>, num_modules: usize) -> Result<Self> {
        if indices.dims() != weights.dims() {
            return Err(Error::shape(
                "Routing::new (weights must match indices)",
                format!("{:?}", indices.dims()),
                format!("{:?}", weights.dims()),
            ));
        }
        if num_modules == 0 {
            return Err(Error::invalid(
                "num_modules",
                "a routing needs at least one module",
            ));
        }
        Ok(Self {
            indices,
            weights,
            num_modules,
            aux_losses: Vec::new(),
            diagnostics: Vec::new(),
        })
    }

    /// Builds a routing from host values: `indices[i]` and `weights[i]` are row `i`'s `k`
    /// selections. All rows must have the same `k`.
    ///
    /// # Errors
    /// [`Error::Shape`] on ragged rows or length mismatch; [`Error::Routing`] for an index
    /// outside `-1..num_modules` or a non-finite weight.
    pub fn from_rows(
        indices: &[Vec<i64>],
        weights: &[Vec<f32>],
        num_modules: usize,
        device: &Device,
    ) -> Result<Self> {
        let rows = indices.len();
        if weights.len() != rows {
            return Err(Error::shape(
                "Routing::from_rows (rows of weights)",
                rows.to_string(),
                weights.len().to_string(),
            ));
        }
        let k = indices.first().map_or(0, Vec::len);
        let mut flat_i = Vec::with_capacity(rows * k);
        let mut flat_w = Vec::with_capacity(rows * k);
        for (r, (ri, rw)) in indices.iter().zip(weights).enumerate() {
            if ri.len() != k || rw.len() != k {
                return Err(Error::shape(
                    format!("Routing::from_rows row {r}"),
                    format!("{k} indices and {k} weights"),
                    format!("{} indices and {} weights", ri.len(), rw.len()),
                ));
            }
            for (&i, &w) in ri.iter().zip(rw) {
                check_index(i, num_modules)?;
                if !w.is_finite() {
                    return Err(Error::Routing(format!(
                        "row {r} has a non-finite weight {w}"
                    )));
                }
                flat_i.push(i);
                flat_w.push(w);
            }
        }
        let idx = int_tensor(&flat_i, device).reshape([rows, k]);
        let w = float_tensor(flat_w, [rows, k], device);
        Self::new(idx, w, num_modules)
    }

    /// Routes row `i` to module `modules[i]` with weight 1 (task-id routing, mixed-adapter
    /// batches). `-1` drops the row.
    ///
    /// # Errors
    /// [`Error::Routing`] for an index outside `-1..num_modules`.
    pub fn one_per_row(modules: &[i64], num_modules: usize, device: &Device) -> Result<Self> {
        for &m in modules {
            check_index(m, num_modules)?;
        }
        let rows = modules.len();
        let idx = int_tensor(modules, device).reshape([rows, 1]);
        let w = Tensor::<2>::ones([rows, 1], device);
        Self::new(idx, w, num_modules)
    }

    /// Builds the routing that sends every row to every module with the weights of a dense
    /// `[rows, modules]` matrix (k = modules). Useful for soft (dense) mixtures.
    pub fn from_dense(dense: Tensor<2>) -> Result<Self> {
        let [rows, modules] = dense.dims();
        let device = dense.device();
        let idx = Tensor::<1, Int>::arange(0..modules as i64, &device)
            .reshape([1, modules])
            .expand([rows, modules]);
        Self::new(idx, dense, modules)
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.indices.dims()[0]
    }

    /// Slots per row (the `k` of top-k).
    pub fn k(&self) -> usize {
        self.indices.dims()[1]
    }

    /// Number of modules the indices refer to.
    pub fn num_modules(&self) -> usize {
        self.num_modules
    }

    /// The selected module indices, `[rows, k]` (`-1` = dropped).
    pub fn indices(&self) -> Tensor<2, Int> {
        self.indices.clone()
    }

    /// The selection weights, `[rows, k]`.
    pub fn weights(&self) -> Tensor<2> {
        self.weights.clone()
    }

    /// The dense `[rows, modules]` form: `R[i, indices[i, j]] += weights[i, j]`; dropped slots
    /// contribute nothing.
    pub fn to_dense(&self) -> Tensor<2> {
        let rows = self.rows();
        let device = self.weights.device();
        // Dropped slots (-1) are sent to an extra column that is cut off afterwards.
        let extra = self.num_modules as i64;
        let idx = self.indices.clone();
        let dropped = idx.clone().lower_elem(0);
        let idx = idx.mask_fill(dropped, extra);
        Tensor::<2>::zeros([rows, self.num_modules + 1], &device)
            .scatter(1, idx, self.weights.clone(), IndexingUpdateOp::Add)
            .slice([0..rows, 0..self.num_modules])
    }

    /// Number of non-dropped slots per module, read on the host.
    pub fn tokens_per_module(&self) -> Vec<usize> {
        let mut counts = vec![0; self.num_modules];
        for i in to_vec_i64(self.indices.clone()) {
            if i >= 0 && (i as usize) < self.num_modules {
                counts[i as usize] += 1;
            }
        }
        counts
    }

    /// Number of dropped slots (index `-1`).
    pub fn dropped_slots(&self) -> usize {
        to_vec_i64(self.indices.clone())
            .iter()
            .filter(|&&i| i < 0)
            .count()
    }

    /// The auxiliary loss called `name`, if the router attached one.
    pub fn aux_loss(&self, name: &str) -> Option<Tensor<1>> {
        self.aux_losses
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
    }

    /// Sum of all auxiliary losses (zero if none), a `[1]` tensor.
    pub fn total_aux_loss(&self) -> Tensor<1> {
        let device = self.weights.device();
        self.aux_losses
            .iter()
            .fold(Tensor::<1>::zeros([1], &device), |acc, (_, l)| {
                acc + l.clone()
            })
    }
}

fn check_index(i: i64, num_modules: usize) -> Result<()> {
    if i < -1 || i >= num_modules as i64 {
        Err(Error::Routing(format!(
            "module index {i} is outside 0..{num_modules} (use -1 for a dropped slot)"
        )))
    } else {
        Ok(())
    }
}

/// The router role: maps a batch of rows to a [`Routing`].
///
/// Implementations range from fixed task-id routing to learned gates; they may attach auxiliary
/// losses to the routing. Routers are backend-agnostic: they see `Tensor<2>` on whatever
/// `Device` the caller picked.
pub trait Router {
    /// Number of modules this router chooses among.
    fn num_modules(&self) -> usize;

    /// Routes the rows of `x: [rows, d]`.
    ///
    /// # Errors
    /// Shape errors for the wrong `d`; [`Error::Routing`] for NaN/inf logits.
    fn route(&self, x: &Tensor<2>) -> Result<Routing>;
}

/// A fixed router: row `i` goes to `assignment[i]` (task-id routing, or a mixed-adapter batch
/// where each row names its adapter). `-1` sends a row to no module.
#[derive(Clone, Debug)]
pub struct FixedRouter {
    /// The module of each row.
    pub assignment: Vec<i64>,
    /// The number of modules.
    pub modules: usize,
}

impl Router for FixedRouter {
    fn num_modules(&self) -> usize {
        self.modules
    }

    fn route(&self, x: &Tensor<2>) -> Result<Routing> {
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
}

/// A host-side plan of who computes what, built once from a [`Routing`] and reusable across
/// every layer that shares the routing (e.g. all layers of a mixed-adapter batch).
///
/// Building it reads the `[rows, k]` indices to the host (one small transfer) and counting-sorts
/// the slots by module. Applying it costs one gather of the input rows, the modules' own work on
/// their contiguous segments, and one weighted scatter-add.
#[derive(Clone, Debug)]
pub struct DispatchPlan {
    rows: usize,
    k: usize,
    num_modules: usize,
    /// Segment boundaries: module `m` owns sorted entries `offsets[m]..offsets[m + 1]`.
    offsets: Vec<usize>,
    /// For each sorted entry, its flat slot `row * k + j`.
    slots: Vec<i64>,
    /// For each sorted entry, its row (device tensor, `[n]`).
    row_index: Tensor<1, Int>,
    /// For each sorted entry, its weight (`[n, 1]`).
    weights: Tensor<2>,
    /// The routing's weights per slot, `[rows, k]` (for aggregators that see every slot).
    slot_weights: Tensor<2>,
}

impl DispatchPlan {
    /// Plans the dispatch of `routing`.
    ///
    /// # Errors
    /// [`Error::Routing`] if an index is outside `-1..num_modules` or a weight is NaN/inf.
    pub fn new(routing: &Routing) -> Result<Self> {
        ensure_finite(&routing.weights, "routing weights")?;
        let (rows, k, m) = (routing.rows(), routing.k(), routing.num_modules);
        let device = routing.weights.device();
        let flat = to_vec_i64(routing.indices.clone());
        let mut counts = vec![0usize; m];
        for &i in &flat {
            check_index(i, m)?;
            if i >= 0 {
                counts[i as usize] += 1;
            }
        }
        let mut offsets = Vec::with_capacity(m + 1);
        offsets.push(0);
        for c in &counts {
            offsets.push(offsets.last().copied().unwrap_or(0) + c);
        }
        let n = offsets[m];
        let mut cursor = offsets[..m].to_vec();
        let mut slots = vec![0i64; n];
        for (s, &i) in flat.iter().enumerate() {
            if i >= 0 {
                let c = &mut cursor[i as usize];
                slots[*c] = s as i64;
                *c += 1;
            }
        }
        let k_i = k.max(1) as i64;
        let rows_of: Vec<i64> = slots.iter().map(|s| s / k_i).collect();
        let slot_t = int_tensor(&slots, &device);
        let weights = if n == 0 {
            Tensor::<2>::zeros([0, 1], &device)
        } else {
            routing
                .weights
                .clone()
                .reshape([rows * k])
                .select(0, slot_t)
                .reshape([n, 1])
        };
        Ok(Self {
            rows,
            k,
            num_modules: m,
            offsets,
            slots,
            row_index: int_tensor(&rows_of, &device),
            weights,
            slot_weights: routing.weights.clone(),
        })
    }

    /// Number of rows of the routed batch.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of modules the routing chooses among.
    pub fn num_modules(&self) -> usize {
        self.num_modules
    }

    /// The routing's weights per slot, `[rows, k]` (zero or any value for dropped slots).
    pub fn slot_weights(&self) -> Tensor<2> {
        self.slot_weights.clone()
    }

    fn check_rows(&self, rows: usize, context: &str) -> Result<()> {
        if rows == self.rows {
            Ok(())
        } else {
            Err(Error::shape(
                format!("{context} (rows of x vs routing)"),
                self.rows.to_string(),
                rows.to_string(),
            ))
        }
    }

    /// Number of (row, module) pairs that compute (dropped slots excluded).
    pub fn num_entries(&self) -> usize {
        self.offsets[self.num_modules]
    }

    /// Number of rows each module receives.
    pub fn rows_per_module(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Sorted-entry range of module `m`.
    pub fn segment(&self, m: usize) -> std::ops::Range<usize> {
        self.offsets[m]..self.offsets[m + 1]
    }

    /// Gathers the rows of `x: [rows, d]` in plan order: `[num_entries, d]`.
    pub fn gather(&self, x: Tensor<2>) -> Tensor<2> {
        x.select(0, self.row_index.clone())
    }

    /// Runs `f(m, x_m)` for every module `m` that received rows, on its rows only, and returns
    /// the outputs in plan order, `[num_entries, d_out]` (not yet weighted).
    ///
    /// `f` must map `[n_m, d]` to `[n_m, d_out]` with the same `d_out` for every module.
    pub fn run<F>(&self, x: Tensor<2>, d_out: usize, f: F) -> Result<Tensor<2>>
    where
        F: FnMut(usize, Tensor<2>) -> Result<Tensor<2>>,
    {
        let device = x.device();
        let mut outs = Vec::new();
        self.each_segment(x, d_out, f, |_, ym| outs.push(ym), "DispatchPlan::run")?;
        Ok(match outs.len() {
            0 => Tensor::<2>::zeros([0, d_out], &device),
            1 => outs
                .pop()
                .unwrap_or_else(|| Tensor::zeros([0, d_out], &device)),
            _ => Tensor::cat(outs, 0),
        })
    }

    /// The one per-segment loop: gathers `x` once in plan order, runs `f(m, x_m)` on each
    /// module's contiguous segment, checks its shape and hands `(segment, y_m)` to `sink`.
    fn each_segment<F, S>(
        &self,
        x: Tensor<2>,
        d_out: usize,
        mut f: F,
        mut sink: S,
        context: &str,
    ) -> Result<()>
    where
        F: FnMut(usize, Tensor<2>) -> Result<Tensor<2>>,
        S: FnMut(std::ops::Range<usize>, Tensor<2>),
    {
        let [rows, d] = x.dims();
        self.check_rows(rows, context)?;
        let n = self.num_entries();
        if n == 0 {
            return Ok(());
        }
        let gathered = self.gather(x);
        for m in 0..self.num_modules {
            let seg = self.segment(m);
            if seg.is_empty() {
                continue;
            }
            let len = seg.len();
            let xm = if len == n {
                gathered.clone()
            } else {
                gathered.clone().slice([seg.clone(), 0..d])
            };
            let ym = f(m, xm)?;
            check_output(m, &ym, len, d_out)?;
            sink(seg, ym);
        }
        Ok(())
    }

    /// Weights plan-ordered outputs `y: [num_entries, d_out]` by their routing weights and
    /// scatter-adds them back to `[rows, d_out]` (the weighted-sum aggregation).
    pub fn combine(&self, y: Tensor<2>) -> Tensor<2> {
        let d_out = y.dims()[1];
        let device = y.device();
        let out = Tensor::<2>::zeros([self.rows, d_out], &device);
        if self.num_entries() == 0 {
            return out;
        }
        out.select_assign(
            0,
            self.row_index.clone(),
            y * self.weights.clone(),
            IndexingUpdateOp::Add,
        )
    }

    /// Places plan-ordered outputs back into their slots: `[rows, k, d_out]`, zeros for dropped
    /// slots. Used by aggregators that need every slot (attention over outputs, max, ...).
    pub fn to_slots(&self, y: Tensor<2>) -> Tensor<3> {
        let d_out = y.dims()[1];
        let device = y.device();
        let out = Tensor::<2>::zeros([self.rows * self.k, d_out], &device);
        let out = if self.num_entries() == 0 {
            out
        } else {
            out.select_assign(
                0,
                int_tensor(&self.slots, &device),
                y,
                IndexingUpdateOp::Add,
            )
        };
        out.reshape([self.rows, self.k, d_out])
    }

    /// The full sparse path: run each selected module on its rows, then aggregate with `agg`.
    /// A plan built once serves every layer that shares its routing.
    ///
    /// For aggregators that are linear in the outputs ([`Aggregator::is_weighted_sum`]) each
    /// module's output is weighted and scatter-added into the result as soon as it is
    /// computed, so the outputs are never concatenated.
    ///
    /// # Errors
    /// [`Error::Shape`] if `x` has other rows than the routing or a module returns the wrong
    /// shape; whatever `f` returns.
    pub fn apply<F, A>(&self, x: Tensor<2>, d_out: usize, agg: &A, f: F) -> Result<Tensor<2>>
    where
        F: FnMut(usize, Tensor<2>) -> Result<Tensor<2>>,
        A: Aggregator + ?Sized,
    {
        if !agg.is_weighted_sum() {
            let y = self.run(x, d_out, f)?;
            return Ok(agg.combine(self, y));
        }
        let (rows, device) = (x.dims()[0], x.device());
        // Moved in and out of the option so each scatter-add can update the buffer in place.
        let mut out = Some(Tensor::<2>::zeros([rows, d_out], &device));
        self.each_segment(
            x,
            d_out,
            f,
            |seg, ym| {
                let w = self.weights.clone().slice([seg.clone(), 0..1]);
                let rows = self.row_index.clone().narrow(0, seg.start, seg.len());
                out = out
                    .take()
                    .map(|o| o.select_assign(0, rows, ym * w, IndexingUpdateOp::Add));
            },
            "DispatchPlan::apply",
        )?;
        Ok(out.unwrap_or_else(|| Tensor::zeros([rows, d_out], &device)))
    }
}

/// Checks that module `m` returned `[len, d_out]`.
fn check_output(m: usize, ym: &Tensor<2>, len: usize, d_out: usize) -> Result<()> {
    if ym.dims() == [len, d_out] {
        Ok(())
    } else {
        Err(Error::shape(
            format!("output of module {m}"),
            format!("[{len}, {d_out}]"),
            format!("{:?}", ym.dims()),
        ))
    }
}

/// The aggregator role: combines the outputs of the modules a row was routed to.
pub trait Aggregator {
    /// Combines per-slot outputs `slots: [rows, k, d]` (zeros for dropped slots) with the
    /// routing weights `[rows, k]` into `[rows, d]`.
    fn aggregate(&self, slots: Tensor<3>, weights: Tensor<2>) -> Tensor<2>;

    /// Whether this aggregator is the plain weighted sum `Σ_j w_ij y_ij`, which the dispatch
    /// can accumulate module by module without keeping every output.
    fn is_weighted_sum(&self) -> bool {
        false
    }

    /// Combines plan-ordered outputs. The default places them into slots and calls
    /// [`aggregate`](Self::aggregate) with the plan's slot weights; linear aggregators override
    /// it with a scatter-add.
    fn combine(&self, plan: &DispatchPlan, y: Tensor<2>) -> Tensor<2> {
        self.aggregate(plan.to_slots(y), plan.slot_weights())
    }
}

/// `y_i = Σ_j w_ij · f_{m_ij}(x_i)`: the weighted output mixture (MoE, Arrow, mixed batches).
#[derive(Clone, Copy, Debug, Default)]
pub struct WeightedSum;

impl Aggregator for WeightedSum {
    fn aggregate(&self, slots: Tensor<3>, weights: Tensor<2>) -> Tensor<2> {
        let [rows, k, d] = slots.dims();
        (slots * weights.reshape([rows, k, 1]))
            .sum_dim(1)
            .reshape([rows, d])
    }

    fn combine(&self, plan: &DispatchPlan, y: Tensor<2>) -> Tensor<2> {
        plan.combine(y)
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
    fn aggregate(&self, slots: Tensor<3>, weights: Tensor<2>) -> Tensor<2> {
        let [rows, _, _] = slots.dims();
        let total = weights.clone().sum_dim(1);
        let safe = total.clone().abs().lower_elem(1e-12);
        let total = total.mask_fill(safe, 1.0).reshape([rows, 1]);
        WeightedSum.aggregate(slots, weights) / total
    }
}

/// Routes with `router`, plans, runs the selected modules and aggregates: the whole modular
/// pipeline in one call. `modules[m]` computes module `m` on its rows.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_sorts_slots_by_module() {
        let device = Device::flex();
        let r = Routing::from_rows(
            &[vec![2, 0], vec![0, -1], vec![2, 2]],
            &[vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]],
            3,
            &device,
        )
        .unwrap();
        let plan = DispatchPlan::new(&r).unwrap();
        assert_eq!(plan.rows_per_module(), [2, 0, 3]);
        assert_eq!(plan.num_entries(), 5);
        // Module 0 owns slots (0,1) and (1,0); module 2 owns (0,0), (2,0), (2,1).
        assert_eq!(plan.slots, [1, 2, 0, 4, 5]);
        assert_eq!(plan.segment(2), 2..5);
        let w: Vec<f32> = plan.weights.clone().into_data().iter::<f32>().collect();
        assert_eq!(w, [2.0, 3.0, 1.0, 5.0, 6.0]);
    }

    #[test]
    fn index_range_is_checked() {
        assert!(check_index(-1, 2).is_ok());
        assert!(check_index(1, 2).is_ok());
        assert!(check_index(2, 2).is_err());
        assert!(check_index(-2, 2).is_err());
    }
}
