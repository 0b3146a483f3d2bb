//! The dispatch plan: who computes what, built once per routing and shared by every layer
//! that uses the routing.
//!
//! A plan has one of three strategies, chosen from the routing when it is built:
//!
//! - **rows** ([`DispatchPlan::new`] on a top-k routing): the `rows·k` slots are counting-sorted
//!   by module on the host; `x` is gathered once in that order, module `m` runs on its
//!   contiguous segment, and the weighted outputs are scatter-added back.
//! - **dense** ([`DispatchPlan::new`] on a routing made by
//!   [`Routing::from_dense`](super::Routing::from_dense)): every module sees every row; nothing
//!   is read to the host, gathered or scattered, and each module's output is weighted by its
//!   column of the routing.
//! - **sequences** ([`DispatchPlan::per_sequence`]): the routing has one row per *sequence* of
//!   `len` consecutive input rows (a mixed-adapter batch where each request names its
//!   adapter). Segments are whole sequences: the index tensors have one entry per sequence, not
//!   per token, and with `k = 1` a layer may instead gather its factors per sequence
//!   ([`DispatchPlan::unit_modules`]; the "BGMV" layout of Punica/S-LoRA).
//!
//! Whatever the strategy, [`DispatchPlan::apply`] (in `dispatch.rs`) is the one entry point
//! and `DispatchPlan::each_segment` the one per-segment loop.

use burn::tensor::{IndexingUpdateOp, Int, Tensor};

use super::value::{Routing, check_index};
use crate::error::{Error, Result};
use crate::tensor_util::{ensure_finite, int_tensor, to_vec_i64};

/// A host-side plan of who computes what, built once from a [`Routing`] and reusable across
/// every layer that shares the routing (see the [module docs](crate::routing) for its strategies).
///
/// # Shapes
/// - the routing: `[units, k]`; a *unit* is one input row, or one sequence of
///   [`rows_per_unit`](Self::rows_per_unit) rows for [`per_sequence`](Self::per_sequence)
/// - inputs: `[rows, d]` with `rows = units · rows_per_unit`
/// - plan-ordered outputs ([`run`](Self::run)): `[num_entries, d_out]`
#[derive(Clone, Debug)]
pub struct DispatchPlan {
    units: usize,
    unit: usize,
    k: usize,
    num_modules: usize,
    /// Segment boundaries in units: module `m` owns entries `offsets[m]..offsets[m + 1]`.
    offsets: Vec<usize>,
    order: Order,
    /// The routing's weights per slot, `[units, k]`.
    slot_weights: Tensor<2>,
}

#[derive(Clone, Debug)]
enum Order {
    /// Every unit goes to every module, slot `j` being module `j`.
    Dense,
    /// Slots counting-sorted by module.
    Sorted(Box<Sorted>),
}

/// The rows and sequences strategies' host plan.
#[derive(Clone, Debug)]
struct Sorted {
    /// For each sorted entry, its flat slot `unit * k + j`.
    slots: Vec<i64>,
    /// For each sorted entry, its unit (`[n]`).
    unit_index: Tensor<1, Int>,
    /// For each sorted entry, its weight (`[n, 1]`).
    weights: Tensor<2>,
    /// With `k = 1`: the module of each unit (`-1`: dropped).
    unit_modules: Option<Vec<i64>>,
}

impl DispatchPlan {
    /// Plans the dispatch of `routing`, one unit per row: the rows strategy, or the dense one
    /// for a routing made by [`Routing::from_dense`].
    ///
    /// # Errors
    /// [`Error::ModuleIndex`] if an index is outside `-1..num_modules`; [`Error::NonFinite`] if
    /// a weight is NaN/inf.
    pub fn new(routing: &Routing) -> Result<Self> {
        Self::with_unit(routing, 1)
    }

    /// Plans a routing whose row `i` routes the `len` consecutive input rows
    /// `i·len..(i+1)·len` (a sequence): the sequences strategy.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`Error::Invalid`] for `len` 0.
    pub fn per_sequence(routing: &Routing, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::invalid(
                "sequence length",
                "a per-sequence plan needs sequences of at least one row",
            ));
        }
        Self::with_unit(routing, len)
    }

    fn with_unit(routing: &Routing, unit: usize) -> Result<Self> {
        ensure_finite(&routing.weights, "routing weights")?;
        let (units, k, m) = (routing.rows(), routing.k(), routing.num_modules);
        if routing.dense {
            return Ok(Self {
                units,
                unit,
                k,
                num_modules: m,
                offsets: (0..=m).map(|i| i * units).collect(),
                order: Order::Dense,
                slot_weights: routing.weights.clone(),
            });
        }
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
        let units_of: Vec<i64> = slots.iter().map(|s| s / k_i).collect();
        let weights = if n == 0 {
            Tensor::<2>::zeros([0, 1], &device)
        } else {
            routing
                .weights
                .clone()
                .reshape([units * k])
                .select(0, int_tensor(&slots, &device))
                .reshape([n, 1])
        };
        Ok(Self {
            units,
            unit,
            k,
            num_modules: m,
            offsets,
            order: Order::Sorted(Box::new(Sorted {
                slots,
                unit_index: int_tensor(&units_of, &device),
                weights,
                unit_modules: (k == 1).then_some(flat),
            })),
            slot_weights: routing.weights.clone(),
        })
    }

    /// Number of input rows the plan routes (`units · rows_per_unit`).
    pub fn rows(&self) -> usize {
        self.units * self.unit
    }

    /// Number of routed units: rows, or sequences for [`per_sequence`](Self::per_sequence).
    pub fn units(&self) -> usize {
        self.units
    }

    /// Input rows per unit: 1, or the sequence length.
    pub fn rows_per_unit(&self) -> usize {
        self.unit
    }

    /// Number of modules the routing chooses among.
    pub fn num_modules(&self) -> usize {
        self.num_modules
    }

    /// Whether every row goes to every module (the dense strategy).
    pub fn is_dense(&self) -> bool {
        matches!(self.order, Order::Dense)
    }

    /// With one slot per unit (`k = 1`, not dense): the module of each unit (`-1`: dropped),
    /// and the weights `[units, 1]`. Layers whose modules are factors (LoRA) use it to gather
    /// factors per sequence instead of gathering activations.
    pub fn unit_modules(&self) -> Option<(&[i64], Tensor<2>)> {
        match &self.order {
            Order::Sorted(s) => s
                .unit_modules
                .as_deref()
                .map(|ids| (ids, self.slot_weights.clone())),
            Order::Dense => None,
        }
    }

    /// The routing's weights per slot and input row, `[rows, k]` (any value for dropped
    /// slots).
    pub fn slot_weights(&self) -> Tensor<2> {
        if self.unit == 1 {
            return self.slot_weights.clone();
        }
        let (units, k, unit) = (self.units, self.k, self.unit);
        self.slot_weights
            .clone()
            .reshape([units, 1, k])
            .expand([units, unit, k])
            .reshape([units * unit, k])
    }

    /// Checks that `x` has the plan's number of rows; `context` names the caller.
    pub(crate) fn check_rows(&self, rows: usize, context: &str) -> Result<()> {
        if rows == self.rows() {
            Ok(())
        } else {
            Err(Error::shape(
                format!("{context} (rows of x vs routing)"),
                self.rows().to_string(),
                rows.to_string(),
            ))
        }
    }

    /// Number of (row, module) pairs that compute (dropped slots excluded).
    pub fn num_entries(&self) -> usize {
        self.offsets[self.num_modules] * self.unit
    }

    /// Number of rows each module receives.
    pub fn rows_per_module(&self) -> Vec<usize> {
        self.offsets
            .windows(2)
            .map(|w| (w[1] - w[0]) * self.unit)
            .collect()
    }

    /// Plan-order row range of module `m`.
    pub fn segment(&self, m: usize) -> std::ops::Range<usize> {
        self.offsets[m] * self.unit..self.offsets[m + 1] * self.unit
    }

    /// Gathers the rows of `x: [rows, d]` in plan order: `[num_entries, d]`.
    pub fn gather(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.order {
            Order::Dense => Tensor::cat(vec![x; self.num_modules], 0),
            Order::Sorted(s) => self.gather_units(x, s.unit_index.clone()),
        }
    }

    fn gather_units(&self, x: Tensor<2>, index: Tensor<1, Int>) -> Tensor<2> {
        if self.unit == 1 {
            return x.select(0, index);
        }
        let d = x.dims()[1];
        let n = index.dims()[0];
        x.reshape([self.units, self.unit * d])
            .select(0, index)
            .reshape([n * self.unit, d])
    }

    /// Runs `f(m, x_m)` for every module `m` that received rows, on its rows only, and returns
    /// the outputs in plan order, `[num_entries, d_out]` (not yet weighted).
    ///
    /// `f` must map `[n_m, d]` to `[n_m, d_out]` with the same `d_out` for every module.
    ///
    /// # Errors
    /// [`Error::Shape`] if `x` has other rows than the plan or `f` returns the wrong shape;
    /// whatever `f` returns.
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

    /// The one per-segment loop: runs `f(m, x_m)` on each module's rows (gathered once in plan
    /// order; the whole batch under the dense strategy), checks its shape and hands
    /// `(m, y_m)` to `sink`.
    pub(super) fn each_segment<F, S>(
        &self,
        x: Tensor<2>,
        d_out: usize,
        mut f: F,
        mut sink: S,
        context: &str,
    ) -> Result<()>
    where
        F: FnMut(usize, Tensor<2>) -> Result<Tensor<2>>,
        S: FnMut(usize, Tensor<2>),
    {
        let [rows, d] = x.dims();
        self.check_rows(rows, context)?;
        let n = self.num_entries();
        if n == 0 {
            return Ok(());
        }
        let gathered = match &self.order {
            Order::Dense => x,
            Order::Sorted(s) => self.gather_units(x, s.unit_index.clone()),
        };
        for m in 0..self.num_modules {
            let seg = self.segment(m);
            if seg.is_empty() {
                continue;
            }
            let len = seg.len();
            let xm = match self.order {
                Order::Dense => gathered.clone(),
                Order::Sorted(_) if len == n => gathered.clone(),
                Order::Sorted(_) => gathered.clone().slice([seg.clone(), 0..d]),
            };
            let ym = f(m, xm)?;
            check_output(&format!("output of module {m}"), &ym, len, d_out)?;
            sink(m, ym);
        }
        Ok(())
    }

    /// Adds module `m`'s weighted outputs `y_m` (its segment, plan order) into `out: [rows,
    /// d_out]`.
    pub(super) fn add_weighted(&self, out: Tensor<2>, m: usize, ym: Tensor<2>) -> Tensor<2> {
        let d_out = ym.dims()[1];
        let seg = self.offsets[m]..self.offsets[m + 1];
        let (index, w) = match &self.order {
            Order::Dense => {
                let w = self.slot_weights.clone().slice([0..self.units, m..m + 1]);
                if self.unit == 1 {
                    return out + ym * w;
                }
                return out
                    + (ym.reshape([self.units, self.unit * d_out]) * w)
                        .reshape([self.rows(), d_out]);
            }
            Order::Sorted(s) => (
                s.unit_index.clone().narrow(0, seg.start, seg.len()),
                s.weights.clone().slice([seg.clone(), 0..1]),
            ),
        };
        self.scatter_add(out, index, ym, Some(w))
    }

    /// `out[index[i]] += w[i] · y[i]` (`w[i] = 1` for `None`), units of `rows_per_unit` rows
    /// at a time.
    fn scatter_add(
        &self,
        out: Tensor<2>,
        index: Tensor<1, Int>,
        y: Tensor<2>,
        w: Option<Tensor<2>>,
    ) -> Tensor<2> {
        let weigh = |y: Tensor<2>| match &w {
            Some(w) => y * w.clone(),
            None => y,
        };
        if self.unit == 1 {
            return out.select_assign(0, index, weigh(y), IndexingUpdateOp::Add);
        }
        let d_out = y.dims()[1];
        let n = index.dims()[0];
        let span = self.unit * d_out;
        out.reshape([self.units, span])
            .select_assign(0, index, weigh(y.reshape([n, span])), IndexingUpdateOp::Add)
            .reshape([self.rows(), d_out])
    }

    /// Each entry's routing weight, one per plan-ordered row: `[num_entries, 1]`.
    pub fn entry_weights(&self) -> Tensor<2> {
        let (units, unit) = (self.units, self.unit);
        let (w, entries) = match &self.order {
            // Plan order is module-major: column m of the slot weights, then the next.
            Order::Dense => (
                self.slot_weights
                    .clone()
                    .swap_dims(0, 1)
                    .reshape([units * self.k, 1]),
                units * self.k,
            ),
            Order::Sorted(s) => (s.weights.clone(), s.slots.len()),
        };
        if unit == 1 {
            return w;
        }
        w.expand([entries, unit]).reshape([entries * unit, 1])
    }

    /// Adds plan-ordered rows `y: [num_entries, d_out]`, already weighted, back to their input
    /// rows: `[rows, d_out]`.
    pub(super) fn add_rows(&self, y: Tensor<2>) -> Tensor<2> {
        let d_out = y.dims()[1];
        let rows = self.rows();
        match &self.order {
            Order::Dense => y
                .reshape([self.num_modules, rows * d_out])
                .sum_dim(0)
                .reshape([rows, d_out]),
            Order::Sorted(s) => {
                let out = Tensor::<2>::zeros([rows, d_out], &y.device());
                self.scatter_add(out, s.unit_index.clone(), y, None)
            }
        }
    }

    /// Weights plan-ordered outputs `y: [num_entries, d_out]` by their routing weights and
    /// adds them back to `[rows, d_out]` (the weighted-sum aggregation).
    pub fn combine(&self, y: Tensor<2>) -> Tensor<2> {
        let d_out = y.dims()[1];
        let device = y.device();
        let out = Tensor::<2>::zeros([self.rows(), d_out], &device);
        if self.num_entries() == 0 {
            return out;
        }
        match &self.order {
            Order::Sorted(s) => {
                self.scatter_add(out, s.unit_index.clone(), y, Some(s.weights.clone()))
            }
            Order::Dense => (0..self.num_modules).fold(out, |acc, m| {
                let seg = self.segment(m);
                self.add_weighted(acc, m, y.clone().slice([seg, 0..d_out]))
            }),
        }
    }

    /// Places plan-ordered outputs back into their slots: `[rows, k, d_out]`, zeros for dropped
    /// slots. Used by aggregators that need every slot (attention over outputs, max, ...).
    pub fn to_slots(&self, y: Tensor<2>) -> Tensor<3> {
        let d_out = y.dims()[1];
        let device = y.device();
        let (units, unit, k) = (self.units, self.unit, self.k);
        let per_unit = match &self.order {
            // Plan order is module-major: [k = modules, units, unit · d_out].
            Order::Dense => {
                if self.num_entries() == 0 {
                    Tensor::<3>::zeros([units, k, unit * d_out], &device)
                } else {
                    y.reshape([k, units, unit * d_out]).swap_dims(0, 1)
                }
            }
            Order::Sorted(s) => {
                let slots = &s.slots;
                let out = Tensor::<2>::zeros([units * k, unit * d_out], &device);
                let out = if self.num_entries() == 0 {
                    out
                } else {
                    let n = slots.len();
                    out.select_assign(
                        0,
                        int_tensor(slots, &device),
                        y.reshape([n, unit * d_out]),
                        IndexingUpdateOp::Add,
                    )
                };
                out.reshape([units, k, unit * d_out])
            }
        };
        if unit == 1 {
            return per_unit.reshape([units, k, d_out]);
        }
        per_unit
            .reshape([units, k, unit, d_out])
            .swap_dims(1, 2)
            .reshape([units * unit, k, d_out])
    }
}

/// Checks that an output (`what`) is `[len, d_out]`.
pub(super) fn check_output(what: &str, y: &Tensor<2>, len: usize, d_out: usize) -> Result<()> {
    if y.dims() == [len, d_out] {
        Ok(())
    } else {
        Err(Error::shape(
            what,
            format!("[{len}, {d_out}]"),
            format!("{:?}", y.dims()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

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
        assert_eq!(plan.segment(2), 2..5);
        let Order::Sorted(sorted) = &plan.order else {
            panic!("a top-k routing is planned by rows");
        };
        // Module 0 owns slots (0,1) and (1,0); module 2 owns (0,0), (2,0), (2,1).
        assert_eq!(sorted.slots, [1, 2, 0, 4, 5]);
        let w: Vec<f32> = sorted.weights.clone().into_data().iter::<f32>().collect();
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
