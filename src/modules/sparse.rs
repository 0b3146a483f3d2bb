//! Sparse parameter composition: sparse fine-tuning deltas (LT-SFT; Ansell, Ponti, Korhonen &
//! Vulić 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer", arXiv 2110.07560)
//! and bias-only deltas (BitFit; Ben Zaken, Ravfogel & Goldberg 2022, arXiv 2106.10199).
//!
//! A sparse delta changes `K` entries of a frozen weight `W: [d_in, d_out]` (burn's layout):
//!
//! ```text
//! y = x (W + Δ) + b,      Δ = Σ_k v_k e_{i_k} e_{j_k}ᵀ
//! (x Δ)[:, j] = Σ_{k : j_k = j} v_k · x[:, i_k]          (O(rows · K), never d_in × d_out)
//! ```
//!
//! **LT-SFT** (the lottery-ticket rule) fine-tunes the whole weight once, keeps the `K`
//! entries that moved most, `|W₁ − W₀|` ([`SparseDelta::top_k_changes`]), resets, and trains
//! only those entries ([`SparseDelta::values`] are the trainable parameters). Sparse deltas
//! **compose by addition** in delta space ([`SparseDelta::add`]: MAD-X-style language plus
//! task deltas, Ansell et al.'s composition), and merge into the weight exactly.
//! [`prune::DiffPruning`](crate::prune::DiffPruning) chooses the entries by learned
//! hard-concrete gates instead; its result converts with [`SparseDelta::from_dense`].
//!
//! **BitFit** trains the biases alone: [`BiasDelta`] is a frozen layer's bias change `Δb`, a
//! module whose output `Δb` does not depend on the row, merged by `b ← b + Δb`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor};

use super::{ComputeModule, check_last_dim};
use crate::error::{Error, Result};
use crate::tensor_util::{int_tensor, to_vec_f32};

/// `K` changed entries of a `[d_in, d_out]` weight (see the [module docs](self)).
///
/// # Shapes
/// - `values`: `[K]`; entry `k` is at input `i_k`, output `j_k`;
/// - [`forward_delta`](Self::forward_delta): `[..., d_in] → [..., d_out]`.
#[derive(Module, Debug)]
pub struct SparseDelta {
    /// The changed values, `[K]` (the trainable parameters).
    pub values: Param<Tensor<1>>,
    #[module(skip)]
    inputs: Tensor<1, Int>,
    #[module(skip)]
    outputs: Tensor<1, Int>,
    #[module(skip)]
    flat: Vec<i64>,
    #[module(skip)]
    dims: [usize; 2],
}

impl SparseDelta {
    /// A delta from flat row-major positions (`i·d_out + j`, sorted or not, distinct) and their
    /// values.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero width, a position outside the weight or given twice;
    /// [`Error::Shape`] for a value count other than the position count.
    pub fn new(positions: &[i64], values: Tensor<1>, d_in: usize, d_out: usize) -> Result<Self> {
        if d_in == 0 || d_out == 0 {
            return Err(Error::invalid(
                "sparse delta",
                format!("a [{d_in}, {d_out}] weight; both widths must be positive"),
            ));
        }
        if values.dims()[0] != positions.len() {
            return Err(Error::shape(
                "sparse delta values (one per position)",
                positions.len().to_string(),
                values.dims()[0].to_string(),
            ));
        }
        let n = (d_in * d_out) as i64;
        let mut seen = std::collections::BTreeSet::new();
        for &p in positions {
            if !(0..n).contains(&p) || !seen.insert(p) {
                return Err(Error::invalid(
                    "sparse delta positions",
                    format!("{p} is outside 0..{n} or given twice"),
                ));
            }
        }
        let device = values.device();
        let ins: Vec<i64> = positions.iter().map(|p| p / d_out as i64).collect();
        let outs: Vec<i64> = positions.iter().map(|p| p % d_out as i64).collect();
        Ok(Self {
            values: Param::from_tensor(values),
            inputs: int_tensor(&ins, &device),
            outputs: int_tensor(&outs, &device),
            flat: positions.to_vec(),
            dims: [d_in, d_out],
        })
    }

    /// The non-zero entries of a dense delta `[d_in, d_out]`.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn from_dense(delta: Tensor<2>) -> Result<Self> {
        let [d_in, d_out] = delta.dims();
        let v = to_vec_f32(delta.clone());
        let positions: Vec<i64> = (0..v.len() as i64)
            .filter(|&p| v[p as usize] != 0.0)
            .collect();
        let vals: Vec<f32> = positions.iter().map(|&p| v[p as usize]).collect();
        let device = delta.device();
        let values = Tensor::<1>::from_floats(vals.as_slice(), &device);
        Self::new(&positions, values, d_in, d_out)
    }

    /// LT-SFT's selection: the `k` entries where `after` moved most from `before` (ties by
    /// position), with a zero value each, ready to train from the original weight.
    ///
    /// # Errors
    /// [`Error::Shape`] for weights of different shapes; [`Error::Invalid`] for `k` of 0 or
    /// above the entry count.
    pub fn top_k_changes(before: Tensor<2>, after: Tensor<2>, k: usize) -> Result<Self> {
        if before.dims() != after.dims() {
            return Err(Error::shape(
                "LT-SFT weights (before and after fine-tuning)",
                format!("{:?}", before.dims()),
                format!("{:?}", after.dims()),
            ));
        }
        let [d_in, d_out] = before.dims();
        if k == 0 || k > d_in * d_out {
            return Err(Error::invalid(
                "LT-SFT k",
                format!("{k} is outside 1..={}", d_in * d_out),
            ));
        }
        let device = before.device();
        let moved = to_vec_f32((after - before).abs());
        let mut order: Vec<usize> = (0..moved.len()).collect();
        order.sort_by(|&a, &b| moved[b].total_cmp(&moved[a]).then(a.cmp(&b)));
        let mut positions: Vec<i64> = order[..k].iter().map(|&p| p as i64).collect();
        positions.sort_unstable();
        Self::new(&positions, Tensor::zeros([k], &device), d_in, d_out)
    }

    /// `[d_in, d_out]`.
    pub fn dims(&self) -> [usize; 2] {
        self.dims
    }

    /// Number of changed entries `K`.
    pub fn nnz(&self) -> usize {
        self.flat.len()
    }

    /// The flat row-major positions.
    pub fn positions(&self) -> &[i64] {
        &self.flat
    }

    /// `x Δ` for `x: [..., d_in]`. While the values train, and whenever the batch is small
    /// enough, through [`forward_thin`](Self::forward_thin) (`O(rows · K)`, no `d_in × d_out`
    /// tensor); for large inference batches at a density where a gather per entry costs more
    /// than a dense product, through a transient dense delta, as [`LoraForward::Auto`]
    /// chooses for LoRA (measured on Flex: a gathered entry costs about as much as 325
    /// multiply-adds of a dense product, forming the dense delta about 2.6 gathers per entry).
    ///
    /// [`LoraForward::Auto`]: crate::modules::lora::LoraForward::Auto
    pub fn forward_delta<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let [d_in, d_out] = self.dims;
        let thin_cost = (self.nnz() as f64) * 325.0 * rows as f64;
        let dense_cost = (d_in * d_out) as f64 * (rows as f64 + 125.0);
        if self.values.val().is_require_grad() || thin_cost <= dense_cost {
            return self.forward_thin(x);
        }
        x.matmul(self.to_dense().unsqueeze())
    }

    /// `x Δ` for `x: [..., d_in]` by one gather and one scatter-add per entry, `O(rows · K)`.
    pub fn forward_thin<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mut dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let [d_in, d_out] = self.dims;
        let x2: Tensor<2> = x.reshape([rows, d_in]);
        let device = x2.device();
        let picked = x2.select(1, self.inputs.clone()) * self.values.val().unsqueeze::<2>();
        let y = Tensor::<2>::zeros([rows, d_out], &device).select_assign(
            1,
            self.outputs.clone(),
            picked,
            IndexingUpdateOp::Add,
        );
        dims[D - 1] = d_out;
        y.reshape(dims)
    }

    /// The dense delta `[d_in, d_out]` (for merging and inspection).
    pub fn to_dense(&self) -> Tensor<2> {
        let [d_in, d_out] = self.dims;
        let device = self.values.device();
        let idx = int_tensor(&self.flat, &device);
        Tensor::<1>::zeros([d_in * d_out], &device)
            .select_assign(0, idx, self.values.val(), IndexingUpdateOp::Add)
            .reshape([d_in, d_out])
    }

    /// Composition by addition: the union of both deltas' entries, values summed where both
    /// change one (LT-SFT's language + task composition).
    ///
    /// # Errors
    /// [`Error::Shape`] for deltas of different weights.
    pub fn add(&self, other: &SparseDelta) -> Result<SparseDelta> {
        if self.dims != other.dims {
            return Err(Error::shape(
                "composed sparse deltas (one weight)",
                format!("{:?}", self.dims),
                format!("{:?}", other.dims),
            ));
        }
        let mut sum: std::collections::BTreeMap<i64, f32> = std::collections::BTreeMap::new();
        for d in [self, other] {
            for (p, v) in d.flat.iter().zip(to_vec_f32(d.values.val())) {
                *sum.entry(*p).or_default() += v;
            }
        }
        let device = self.values.device();
        let positions: Vec<i64> = sum.keys().copied().collect();
        let vals: Vec<f32> = sum.values().copied().collect();
        Self::new(
            &positions,
            Tensor::<1>::from_floats(vals.as_slice(), &device),
            self.dims[0],
            self.dims[1],
        )
    }

    /// Adds (`sign = 1`) or subtracts (`sign = -1`) the delta in `layer`'s weight, exactly.
    ///
    /// # Errors
    /// [`Error::Shape`] when the layer's weight is not `[d_in, d_out]`.
    pub fn merge_into(&self, layer: Linear, sign: f64) -> Result<Linear> {
        let dims = layer.weight.shape().dims::<2>();
        if dims != self.dims {
            return Err(Error::shape(
                "layer for a sparse delta",
                format!("{:?}", self.dims),
                format!("{dims:?}"),
            ));
        }
        let delta = self.to_dense().detach().mul_scalar(sign);
        let weight = layer.weight.clone().map(|w| w + delta);
        Ok(Linear { weight, ..layer })
    }
}

impl ComputeModule for SparseDelta {
    fn d_input(&self) -> usize {
        self.dims[0]
    }

    fn d_output(&self) -> usize {
        self.dims[1]
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_delta(x)
    }
}

/// BitFit's change to a frozen layer's bias, `Δb: [d_out]` (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct BiasDelta {
    /// `Δb`, `[d_out]`, trainable.
    pub delta: Param<Tensor<1>>,
    #[module(skip)]
    d_in: usize,
}

impl BiasDelta {
    /// A zero change for a `d_in → d_out` layer.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero width.
    pub fn new(d_in: usize, d_out: usize, device: &Device) -> Result<Self> {
        if d_in == 0 || d_out == 0 {
            return Err(Error::invalid(
                "BitFit bias delta",
                "d_in and d_out must be positive",
            ));
        }
        Ok(Self {
            delta: Param::from_tensor(Tensor::zeros([d_out], device)),
            d_in,
        })
    }

    /// `y + Δb` for the frozen layer's output `y: [..., d_out]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for another output width.
    pub fn apply<const D: usize>(&self, y: Tensor<D>) -> Result<Tensor<D>> {
        check_last_dim(&y, self.delta.dims()[0], "BitFit output")?;
        Ok(y + self.delta.val().unsqueeze::<D>())
    }

    /// `b ← b + sign·Δb` in `layer` (a layer without a bias gets `sign·Δb`).
    ///
    /// # Errors
    /// [`Error::Shape`] when the layer's output width differs.
    pub fn merge_into(&self, mut layer: Linear, sign: f64) -> Result<Linear> {
        let [d_in, d_out] = layer.weight.shape().dims::<2>();
        if [d_in, d_out] != [self.d_in, self.delta.dims()[0]] {
            return Err(Error::shape(
                "layer for a bias delta",
                format!("[{}, {}]", self.d_in, self.delta.dims()[0]),
                format!("[{d_in}, {d_out}]"),
            ));
        }
        let delta = self.delta.val().detach().mul_scalar(sign);
        layer.bias = Some(match layer.bias {
            Some(b) => b.map(|b| b + delta),
            None => Param::from_tensor(delta),
        });
        Ok(layer)
    }
}

impl ComputeModule for BiasDelta {
    fn d_input(&self) -> usize {
        self.d_in
    }

    fn d_output(&self) -> usize {
        self.delta.dims()[0]
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        let rows = x.dims()[0];
        self.delta
            .val()
            .unsqueeze::<2>()
            .expand([rows, self.d_output()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
        to_vec_f32((a - b).abs().max())[0]
    }

    /// The sparse forward equals the dense delta's; composition adds entries; merging and
    /// unmerging return the weight; LT-SFT keeps the largest changes.
    #[test]
    fn sparse_deltas_forward_compose_and_merge_exactly() {
        let d = Device::flex();
        let x = Tensor::<2>::random([4, 6], Distribution::Normal(0.0, 1.0), &d);
        let a =
            SparseDelta::new(&[0, 7, 23], Tensor::from_floats([1.0, -2.0, 0.5], &d), 6, 5).unwrap();
        let b = SparseDelta::new(&[7, 11], Tensor::from_floats([3.0, 1.0], &d), 6, 5).unwrap();
        assert!(max_diff(a.forward_thin(x.clone()), x.clone().matmul(a.to_dense())) < 1e-6);
        // A dense enough delta on enough rows takes the dense path: the same numbers.
        let dense: Vec<i64> = (0..30).collect();
        let big = SparseDelta::new(&dense, Tensor::ones([30], &d), 6, 5).unwrap();
        let xs = Tensor::<2>::random([600, 6], Distribution::Normal(0.0, 1.0), &d);
        assert!(max_diff(big.forward_delta(xs.clone()), big.forward_thin(xs)) < 1e-5);
        let ab = a.add(&b).unwrap();
        assert_eq!(ab.positions(), [0, 7, 11, 23]);
        assert_eq!(to_vec_f32(ab.values.val()), [1.0, 1.0, 1.0, 0.5]);
        assert!(max_diff(ab.to_dense(), a.to_dense() + b.to_dense()) < 1e-7);
        let layer = burn::nn::LinearConfig::new(6, 5).init(&d);
        let w0 = layer.weight.val();
        let merged = ab.merge_into(layer, 1.0).unwrap();
        let y = merged.forward(x.clone());
        let back = ab.merge_into(merged, -1.0).unwrap();
        assert!(max_diff(back.weight.val(), w0.clone()) < 1e-6);
        assert!(max_diff(y, back.forward(x.clone()) + ab.forward_delta(x)) < 1e-5);
        // a moves entry 7 by 2, entry 0 by 1 and entry 23 by 0.5.
        let moved = w0.clone() + a.to_dense();
        let pick = SparseDelta::top_k_changes(w0.clone(), moved.clone(), 2).unwrap();
        assert_eq!(pick.positions(), [0, 7]);
        assert_eq!(
            SparseDelta::top_k_changes(w0, moved, 1)
                .unwrap()
                .positions(),
            [7]
        );
        assert!(SparseDelta::new(&[30], Tensor::from_floats([1.0], &d), 6, 5).is_err());
        assert!(SparseDelta::new(&[1, 1], Tensor::from_floats([1.0, 1.0], &d), 6, 5).is_err());
        assert!(
            a.add(&SparseDelta::new(&[0], Tensor::from_floats([1.0], &d), 5, 6).unwrap())
                .is_err()
        );
    }

    #[test]
    fn bias_deltas_add_and_merge() {
        let d = Device::flex();
        let mut bit = BiasDelta::new(3, 2, &d).unwrap();
        bit.delta = Param::from_tensor(Tensor::from_floats([1.0, -1.0], &d));
        let layer = burn::nn::LinearConfig::new(3, 2).init(&d);
        let x = Tensor::<2>::ones([2, 3], &d);
        let want = bit.apply(layer.forward(x.clone())).unwrap();
        let merged = bit.merge_into(layer, 1.0).unwrap();
        assert!(max_diff(merged.forward(x.clone()), want) < 1e-6);
        assert_eq!(to_vec_f32(bit.forward_rows(x)), [1.0, -1.0, 1.0, -1.0]);
        assert!(bit.apply(Tensor::<2>::ones([1, 3], &d)).is_err());
    }
}
