//! The routing value: per row, `k` module indices and weights.

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor};

use crate::error::{Error, Result};
use crate::tensor_util::{float_tensor, int_tensor, to_vec_i64};

/// Per-row module selection in top-k form: for each row, `k` module indices and `k` weights.
///
/// Indices are in `0..num_modules`, or `-1` for a dropped slot. A module may appear twice in one
/// row; its two slots simply add up.
///
/// A routing made by [`from_dense`](Self::from_dense) sends every row to every module in
/// order; [`DispatchPlan::new`](super::DispatchPlan::new) then runs each module on the whole
/// batch and reads nothing back to the host.
///
/// # Shapes
/// - indices: `[rows, k]` (int), weights: `[rows, k]` (float)
#[derive(Clone, Debug)]
pub struct Routing {
    pub(super) indices: Tensor<2, Int>,
    pub(super) weights: Tensor<2>,
    pub(super) num_modules: usize,
    /// Slot `j` of every row is module `j` (`k = num_modules`): the dense form.
    pub(super) dense: bool,
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
    /// Index ranges are checked when the routing is planned ([`DispatchPlan::new`](super::DispatchPlan::new)).
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
            dense: false,
            aux_losses: Vec::new(),
            diagnostics: Vec::new(),
        })
    }

    /// Builds a routing from host values: `indices[i]` and `weights[i]` are row `i`'s `k`
    /// selections. All rows must have the same `k`.
    ///
    /// # Errors
    /// [`Error::Shape`] on ragged rows or length mismatch; [`Error::ModuleIndex`] for an index
    /// outside `-1..num_modules`; [`Error::NonFinite`] for a NaN or infinite weight.
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
                    return Err(Error::non_finite(format!(
                        "routing weight of row {r} ({w})"
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
    /// [`Error::ModuleIndex`] for an index outside `-1..num_modules`.
    pub fn one_per_row(modules: &[i64], num_modules: usize, device: &Device) -> Result<Self> {
        for &m in modules {
            check_index(m, num_modules)?;
        }
        let rows = modules.len();
        let idx = int_tensor(modules, device).reshape([rows, 1]);
        let w = Tensor::<2>::ones([rows, 1], device);
        Self::new(idx, w, num_modules)
    }

    /// Sends every row to every module with the weights of a dense `[rows, modules]` matrix
    /// (k = modules): soft mixtures (LMC, Polytropon, dense X-LoRA). Planned without a host
    /// read; every module computes on the whole batch.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a matrix with no columns.
    pub fn from_dense(dense: Tensor<2>) -> Result<Self> {
        let [rows, modules] = dense.dims();
        let device = dense.device();
        let idx = Tensor::<1, Int>::arange(0..modules as i64, &device)
            .reshape([1, modules])
            .expand([rows, modules]);
        let mut routing = Self::new(idx, dense, modules)?;
        routing.dense = true;
        Ok(routing)
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

    /// Whether every row is sent to every module (made by [`from_dense`](Self::from_dense)).
    pub fn is_dense(&self) -> bool {
        self.dense
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
        if self.dense {
            return self.weights.clone();
        }
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
        if self.dense {
            return vec![self.rows(); self.num_modules];
        }
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
        if self.dense {
            return 0;
        }
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

/// Checks that `i` is a module index of a routing over `num_modules` modules, or `-1`.
pub(crate) fn check_index(i: i64, num_modules: usize) -> Result<()> {
    if i < -1 || i >= num_modules as i64 {
        Err(Error::ModuleIndex {
            index: i,
            num_modules,
        })
    } else {
        Ok(())
    }
}
