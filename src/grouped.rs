//! Grouped matrix products: one operation multiplies consecutive row segments of its input,
//! each segment by its own weights. These are the compute step of the sparse dispatch when the
//! modules are matrices (the experts of an MoE layer, the adapters of a mixed-adapter batch):
//! [`DispatchPlan::apply_grouped`](crate::DispatchPlan::apply_grouped) gathers the rows in
//! plan order, one grouped op computes every module, and the plan adds the rows back.
//!
//! # The math
//! Rows are in *group order*: `x: [n, d_in]` with group sizes `n_0 + … + n_{G-1} = n`, group
//! `g` owning rows `o_g .. o_g + n_g` (`o_g = Σ_{h<g} n_h`; a size may be 0). With an optional
//! per-row scale `c: [n, 1]` (the routing weight of each entry), for the rows `x_g` of group `g`:
//!
//! - [`grouped_linear`]: `y_g = x_g W_g + b_g`;
//! - [`grouped_low_rank`]: `y_g = ((x_g A_g) ⊙ s_g c_g) B_g`, the LoRA path; ranks may differ
//!   from group to group;
//! - [`grouped_swiglu`]: `y_g = ((silu(x_g W^gate_g) ⊙ x_g W^up_g) ⊙ c_g) W^out_g`, the SwiGLU
//!   expert of Shazeer (arXiv 2002.05202) as in Mixtral, with `W^in_g = [W^gate_g | W^up_g]`.
//!
//! The scale multiplies the thin (`[n_g, r]`) or hidden (`[n_g, d_ff]`) intermediate before the
//! last product, which by linearity equals scaling the output, at a fraction of the cost.
//!
//! # Backends
//! On Flex, for `f32` tensors that do not track gradients, each op runs on the host buffers:
//! one output allocation, one `gemm` call per non-empty group writing straight into its rows
//! (strided, so transposed weights are read in place), and SwiGLU's element-wise step fused in
//! place into a hidden buffer reused by every group (and kept per thread between calls, so
//! repeated forwards do not page-fault it in again). This is the "grouped GEMM" of MegaBlocks
//! (Gale et al., arXiv 2211.15841) on the CPU. A product of at most 8 rows by a row-major
//! weight (a decoding step; [`dense_linear`] sends every base projection of the models here)
//! skips `gemm`'s packing: with so few rows the weight is the only large operand, so the
//! product is bound by memory bandwidth, and a kernel that streams each weight row once, in
//! column bands per thread, runs near it. Everywhere else (wgpu, CUDA, and autodiff, so
//! that training differentiates through it) the same op runs as plain tensor ops, one group at
//! a time, so every backend computes the same function.

use std::ops::Range;

use burn::tensor::Tensor;

use crate::error::{Error, Result};

/// `silu(g) ⊙ u` for `h = [g | u]: [n, 2·d_ff]`, `[n, d_ff]`: SwiGLU's element-wise step in
/// tensor ops (the experts' own forward uses it too).
pub(crate) fn swiglu_gate(h: Tensor<2>) -> Tensor<2> {
    let [n, two_ff] = h.dims();
    let ff = two_ff / 2;
    let gate = h.clone().slice([0..n, 0..ff]);
    let up = h.slice([0..n, ff..two_ff]);
    // silu(g) = g / (1 + exp(-g)), written out: on Flex this is about 40 % faster than
    // `activation::silu` (which composes a separate sigmoid and product), and it is exact at
    // the extremes (exp(-g) = inf gives -0, silu's limit).
    gate.clone() / (gate.neg().exp() + 1.0) * up
}

/// Whether the grouped ops take their host body (`gemm` on the Flex buffers) for a tensor like
/// `t`: an `f32` Flex tensor that does not track gradients. Other tensors take the tensor-op
/// body, which computes the same function.
pub fn runs_on_host(t: &Tensor<2>) -> bool {
    #[cfg(feature = "flex")]
    return host::is_host(t);
    #[cfg(not(feature = "flex"))]
    {
        let _ = t;
        false
    }
}

/// The factors of one group of [`grouped_low_rank`]: `a: [d_in, r]`, `b: [r, d_out]` and the
/// scalar `scale` (a LoRA adapter's `s`).
#[derive(Clone, Debug)]
pub struct LowRank {
    /// Down-projection `[d_in, r]`.
    pub a: Tensor<2>,
    /// Up-projection `[r, d_out]`.
    pub b: Tensor<2>,
    /// Scalar factor of the group.
    pub scale: f64,
}

/// `y_g = x_g W_g + b_g` for every group `g` of the rows of `x` (see the [module docs](self)).
///
/// # Shapes
/// - `x`: `[n, d_in]`, rows in group order; `sizes`: `G` sizes summing to `n`
/// - `weights[g]`: `[d_in, d_out]`; `biases[g]` (optional): `[d_out]`
/// - result: `[n, d_out]`
///
/// # Errors
/// [`Error::Shape`] if the sizes do not sum to `n`, there is not one weight (and bias) per
/// group, or the widths disagree.
pub fn grouped_linear(
    x: Tensor<2>,
    sizes: &[usize],
    weights: &[Tensor<2>],
    biases: Option<&[Tensor<1>]>,
) -> Result<Tensor<2>> {
    let [n, d_in] = x.dims();
    check_sizes(n, sizes, weights.len(), "grouped_linear")?;
    let d_out = common_width(weights, d_in, "grouped_linear weights")?;
    if let Some(b) = biases {
        check_count(b.len(), sizes.len(), "grouped_linear biases")?;
        for bg in b {
            check_dims(&bg.dims(), &[d_out], "grouped_linear bias")?;
        }
    }
    #[cfg(feature = "flex")]
    if let Some(y) = host::linear(&x, sizes, weights, biases, d_out) {
        return Ok(y);
    }
    Ok(per_group(x, sizes, d_out, |g, _, xg| {
        let y = xg.matmul(weights[g].clone());
        match biases {
            Some(b) => y + b[g].clone().unsqueeze(),
            None => y,
        }
    }))
}

/// burn's [`linear`](burn::tensor::module::linear), `x W + b` over the last axis, with one
/// group: on Flex, for `f32` tensors that do not track gradients and at most a few rows
/// (decoding), it runs the weight-streaming kernel [`grouped_linear`] uses for small groups,
/// which reads every weight element from memory once instead of packing it first; elsewhere
/// it is burn's `linear`.
///
/// # Shapes
/// - `x`: `[..., d_in]`; `weight`: `[d_in, d_out]`; `bias`: `[d_out]`; result: `[..., d_out]`
pub fn dense_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    #[cfg(feature = "flex")]
    {
        let dims = x.dims();
        let [d_in, d_out] = weight.dims();
        let rows: usize = dims[..D - 1].iter().product();
        if rows <= host::STREAM_ROWS && dims[D - 1] == d_in {
            let x2 = x.clone().reshape([rows, d_in]);
            let biases = bias.clone().map(|b| [b]);
            if let Some(y) = host::linear(
                &x2,
                &[rows],
                std::slice::from_ref(&weight),
                biases.as_ref().map(|b| &b[..]),
                d_out,
            ) {
                let mut out = dims;
                out[D - 1] = d_out;
                return y.reshape(out);
            }
        }
    }
    burn::tensor::module::linear(x, weight, bias)
}

/// `y_g = ((x_g A_g) ⊙ s_g c_g) B_g` for every group `g` (see the [module docs](self)); `c`
/// is 1 when `row_scale` is `None`.
///
/// # Shapes
/// - `x`: `[n, d_in]`, rows in group order; `sizes`: `G` sizes summing to `n`
/// - `factors[g]`: `a: [d_in, r_g]`, `b: [r_g, d_out]`
/// - `row_scale`: `[n, 1]`; result: `[n, d_out]`
///
/// # Errors
/// [`Error::Shape`] if the sizes do not sum to `n`, there is not one factor pair per group,
/// the widths or inner ranks disagree, or `row_scale` is not `[n, 1]`.
pub fn grouped_low_rank(
    x: Tensor<2>,
    sizes: &[usize],
    factors: &[LowRank],
    row_scale: Option<Tensor<2>>,
) -> Result<Tensor<2>> {
    let [n, d_in] = x.dims();
    check_sizes(n, sizes, factors.len(), "grouped_low_rank")?;
    let d_out = factors.first().map_or(0, |f| f.b.dims()[1]);
    for f in factors {
        let [da, r] = f.a.dims();
        check_dims(&[da], &[d_in], "grouped_low_rank A (rows = d_in)")?;
        check_dims(&f.b.dims(), &[r, d_out], "grouped_low_rank B ([r, d_out])")?;
    }
    check_row_scale(row_scale.as_ref(), n, "grouped_low_rank row scale")?;
    #[cfg(feature = "flex")]
    if let Some(y) = host::low_rank(&x, sizes, factors, row_scale.as_ref(), d_out) {
        return Ok(y);
    }
    Ok(per_group(x, sizes, d_out, |g, rows, xg| {
        let f = &factors[g];
        let t = xg.matmul(f.a.clone()).mul_scalar(f.scale);
        scale_rows(t, row_scale.as_ref(), rows).matmul(f.b.clone())
    }))
}

/// `y_g = ((silu(x_g W^gate_g) ⊙ x_g W^up_g) ⊙ c_g) W^out_g` for every group `g` (see the
/// [module docs](self)); `c` is 1 when `row_scale` is `None`.
///
/// # Shapes
/// - `x`: `[n, d]`, rows in group order; `sizes`: `G` sizes summing to `n`
/// - `w_in[g]`: `[d, 2·d_ff]` (gate columns first, then up); `w_out[g]`: `[d_ff, d_out]`
/// - `row_scale`: `[n, 1]`; result: `[n, d_out]`
///
/// # Errors
/// [`Error::Shape`] if the sizes do not sum to `n`, there is not one weight pair per group or
/// the widths disagree.
pub fn grouped_swiglu(
    x: Tensor<2>,
    sizes: &[usize],
    w_in: &[Tensor<2>],
    w_out: &[Tensor<2>],
    row_scale: Option<Tensor<2>>,
) -> Result<Tensor<2>> {
    let [n, d] = x.dims();
    check_sizes(n, sizes, w_in.len(), "grouped_swiglu")?;
    check_count(w_out.len(), sizes.len(), "grouped_swiglu output weights")?;
    let two_ff = common_width(w_in, d, "grouped_swiglu input weights")?;
    if two_ff % 2 != 0 {
        return Err(Error::shape(
            "grouped_swiglu input weights ([d, 2·d_ff]: gate and up halves)",
            "an even width",
            two_ff.to_string(),
        ));
    }
    let d_out = common_width(w_out, two_ff / 2, "grouped_swiglu output weights")?;
    check_row_scale(row_scale.as_ref(), n, "grouped_swiglu row scale")?;
    #[cfg(feature = "flex")]
    if let Some(y) = host::swiglu(&x, sizes, w_in, w_out, row_scale.as_ref(), d_out) {
        return Ok(y);
    }
    Ok(per_group(x, sizes, d_out, |g, rows, xg| {
        let h = swiglu_gate(xg.matmul(w_in[g].clone()));
        scale_rows(h, row_scale.as_ref(), rows).matmul(w_out[g].clone())
    }))
}

/// Runs `f(g, rows)` for each non-empty group, `rows` its range of rows: the one walk over the
/// segments, shared by the tensor-op and host bodies.
fn groups(sizes: &[usize], mut f: impl FnMut(usize, Range<usize>)) {
    let mut start = 0;
    for (g, &len) in sizes.iter().enumerate() {
        if len > 0 {
            f(g, start..start + len);
        }
        start += len;
    }
}

/// The tensor-op body shared by every grouped op: `f(g, rows, x_g)` on each non-empty group,
/// in order, concatenated.
fn per_group<F>(x: Tensor<2>, sizes: &[usize], d_out: usize, mut f: F) -> Tensor<2>
where
    F: FnMut(usize, Range<usize>, Tensor<2>) -> Tensor<2>,
{
    let [n, d_in] = x.dims();
    let device = x.device();
    let mut outs = Vec::new();
    groups(sizes, |g, rows| {
        let xg = if rows.len() == n {
            x.clone()
        } else {
            x.clone().slice([rows.clone(), 0..d_in])
        };
        outs.push(f(g, rows, xg));
    });
    match outs.len() {
        0 => Tensor::zeros([0, d_out], &device),
        1 => outs
            .pop()
            .unwrap_or_else(|| Tensor::zeros([0, d_out], &device)),
        _ => Tensor::cat(outs, 0),
    }
}

/// `t ⊙ c[rows]` for a per-row scale `c: [n, 1]` (`t` unchanged without one).
fn scale_rows(t: Tensor<2>, c: Option<&Tensor<2>>, rows: Range<usize>) -> Tensor<2> {
    match c {
        Some(c) => t * c.clone().slice([rows, 0..1]),
        None => t,
    }
}

fn check_sizes(n: usize, sizes: &[usize], groups: usize, what: &str) -> Result<()> {
    check_count(groups, sizes.len(), what)?;
    let total: usize = sizes.iter().sum();
    if total != n {
        return Err(Error::shape(
            format!("{what} (group sizes sum to the rows of x)"),
            n.to_string(),
            total.to_string(),
        ));
    }
    Ok(())
}

fn check_count(have: usize, groups: usize, what: &str) -> Result<()> {
    if have == groups {
        Ok(())
    } else {
        Err(Error::shape(
            format!("{what} (one per group)"),
            groups.to_string(),
            have.to_string(),
        ))
    }
}

fn check_dims(got: &[usize], want: &[usize], what: &str) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::shape(what, format!("{want:?}"), format!("{got:?}")))
    }
}

fn check_row_scale(c: Option<&Tensor<2>>, n: usize, what: &str) -> Result<()> {
    c.map_or(Ok(()), |c| check_dims(&c.dims(), &[n, 1], what))
}

/// The common output width of `[d_in, d_out]` matrices (0 for none).
fn common_width(ws: &[Tensor<2>], d_in: usize, what: &str) -> Result<usize> {
    let d_out = ws.first().map_or(0, |w| w.dims()[1]);
    for w in ws {
        check_dims(&w.dims(), &[d_in, d_out], what)?;
    }
    Ok(d_out)
}

/// The Flex bodies: `gemm` on the host buffers.
#[cfg(feature = "flex")]
mod host {
    use std::cell::RefCell;

    use burn::backend::Flex;
    use burn::backend::flex::FlexTensor;
    use burn::tensor::{DType, Shape, Tensor};
    use rayon::prelude::*;

    use super::{LowRank, groups};

    /// The most rows [`super::dense_linear`] sends to the host path.
    pub(super) const STREAM_ROWS: usize = stream::MAX_ROWS;

    /// A 2-d `f32` matrix in a Flex buffer: the buffer, its element offset and strides.
    struct Mat {
        t: FlexTensor,
        rs: isize,
        cs: isize,
    }

    impl Mat {
        /// The Flex buffer of `t`, or `None` on another backend, another dtype or a tensor
        /// that tracks gradients (those take the tensor-op body).
        fn of(t: &Tensor<2>) -> Option<Self> {
            if t.dtype() != DType::F32 {
                return None;
            }
            let t = t.clone().try_into_primitive::<Flex>().ok()?;
            let (rs, cs) = match t.layout().strides() {
                &[rs, cs] => (rs, cs),
                _ => return None,
            };
            Some(Self { t, rs, cs })
        }

        /// Pointer to element `(row, 0)`.
        fn row(&self, row: usize) -> *const f32 {
            let base = self.t.storage::<f32>().as_ptr();
            // SAFETY: the layout's offset and strides address elements of this buffer for
            // every row < rows, which the callers guarantee.
            unsafe { base.offset(self.t.layout().start_offset() as isize + row as isize * self.rs) }
        }
    }

    pub(super) fn is_host(t: &Tensor<2>) -> bool {
        Mat::of(t).is_some()
    }

    thread_local! {
        /// The hidden (`[rows, 2·d_ff]`) or thin (`[rows, r]`) block of the group being
        /// computed, kept between calls: a fresh multi-MB buffer per call would be
        /// page-faulted in again under allocators that return large blocks to the OS.
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// Runs `f` on this thread's scratch buffer, grown to at least `len` elements.
    fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < len {
                s.resize(len, 0.0);
            }
            f(&mut s[..len])
        })
    }

    impl Mat {
        /// Rows from `start` on, as the left operand of [`times`].
        fn rows_from(&self, start: usize) -> (*const f32, isize, isize) {
            (self.row(start), self.rs, self.cs)
        }
    }

    /// A row-major `[rows, cols]` output buffer.
    fn output(rows: usize, cols: usize) -> FlexTensor {
        FlexTensor::empty(Shape::from(vec![rows, cols]), DType::F32)
    }

    fn wrap(t: FlexTensor) -> Tensor<2> {
        Tensor::from_primitive::<Flex>(t)
    }

    fn all(ts: &[Tensor<2>]) -> Option<Vec<Mat>> {
        ts.iter().map(Mat::of).collect()
    }

    /// Host copy of a `[n, 1]` scale.
    fn scales(c: Option<&Tensor<2>>) -> Option<Option<Vec<f32>>> {
        match c {
            None => Some(None),
            Some(c) => {
                let m = Mat::of(c)?;
                let n = c.dims()[0];
                // SAFETY: rows < n of a [n, 1] matrix.
                Some(Some((0..n).map(|i| unsafe { *m.row(i) }).collect()))
            }
        }
    }

    /// `dst[m, n] (= dst +) lhs[m, k] · w[k, n]`, strided (`lhs = (pointer, row stride,
    /// column stride)`; `dst` row-major with row stride `dst_rs`); parallel when large
    /// (Flex's own threshold).
    ///
    /// # Safety
    /// `lhs` must address an `m × k` matrix with its strides, `w` be `k × n`, and `dst` hold
    /// `m` rows of `n` at stride `dst_rs`.
    unsafe fn times(
        (m, n, k): (usize, usize, usize),
        (dst, dst_rs): (*mut f32, usize),
        accumulate: bool,
        (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
        w: &Mat,
    ) {
        if m <= stream::MAX_ROWS && w.cs == 1 && w.rs >= n as isize && n >= stream::MIN_COLS {
            // SAFETY: forwarded from the caller; `w` is row-major with row stride `w.rs`.
            unsafe {
                stream::times(
                    (m, n, k),
                    (dst, dst_rs),
                    accumulate,
                    (lhs, lhs_rs, lhs_cs),
                    (w.row(0), w.rs as usize),
                )
            };
            return;
        }
        let par = if m.saturating_mul(n).saturating_mul(k) >= 192 * 192 * 192 {
            gemm::Parallelism::Rayon(0)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: forwarded from the caller.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst,
                1,
                dst_rs as isize,
                accumulate,
                lhs,
                lhs_cs,
                lhs_rs,
                w.row(0),
                w.cs,
                w.rs,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            );
        }
    }

    pub(super) fn linear(
        x: &Tensor<2>,
        sizes: &[usize],
        weights: &[Tensor<2>],
        biases: Option<&[Tensor<1>]>,
        d_out: usize,
    ) -> Option<Tensor<2>> {
        let [n, d_in] = x.dims();
        let xm = Mat::of(x)?;
        let ws = all(weights)?;
        let bs: Option<Vec<Vec<f32>>> = match biases {
            None => None,
            Some(b) => Some(
                b.iter()
                    .map(|b| {
                        let m = Mat::of(&b.clone().unsqueeze::<2>())?;
                        // SAFETY: d_out elements of a [1, d_out] matrix, column stride cs.
                        Some(
                            (0..d_out)
                                .map(|j| unsafe { *m.row(0).offset(j as isize * m.cs) })
                                .collect(),
                        )
                    })
                    .collect::<Option<_>>()?,
            ),
        };
        let mut out = output(n, d_out);
        let y = out.storage_mut::<f32>().as_mut_ptr();
        groups(sizes, |g, rows| {
            let (start, len) = (rows.start, rows.len());
            // SAFETY: rows start..start+len of y (row-major [n, d_out]) and of x.
            let dst = unsafe { y.add(start * d_out) };
            if let Some(bs) = &bs {
                for i in 0..len {
                    // SAFETY: row i < len of the group's d_out-wide output rows.
                    unsafe {
                        std::ptr::copy_nonoverlapping(bs[g].as_ptr(), dst.add(i * d_out), d_out)
                    };
                }
            }
            // SAFETY: shapes checked by the caller: x [n, d_in], W [d_in, d_out].
            unsafe {
                times(
                    (len, d_out, d_in),
                    (dst, d_out),
                    bs.is_some(),
                    xm.rows_from(start),
                    &ws[g],
                )
            };
        });
        Some(wrap(out))
    }

    pub(super) fn low_rank(
        x: &Tensor<2>,
        sizes: &[usize],
        factors: &[LowRank],
        row_scale: Option<&Tensor<2>>,
        d_out: usize,
    ) -> Option<Tensor<2>> {
        let [n, d_in] = x.dims();
        let xm = Mat::of(x)?;
        let fs: Vec<(Mat, Mat)> = factors
            .iter()
            .map(|f| Some((Mat::of(&f.a)?, Mat::of(&f.b)?)))
            .collect::<Option<_>>()?;
        let c = scales(row_scale)?;
        let max_rows_rank = sizes
            .iter()
            .zip(factors)
            .map(|(s, f)| s * f.a.dims()[1])
            .max()
            .unwrap_or(0);
        let mut out = output(n, d_out);
        let y = out.storage_mut::<f32>().as_mut_ptr();
        with_scratch(max_rows_rank, |thin| {
            groups(sizes, |g, rows| {
                let (start, len) = (rows.start, rows.len());
                let ((a, b), r) = (&fs[g], factors[g].a.dims()[1]);
                let t = thin.as_mut_ptr();
                // SAFETY: x rows start..start+len [.., d_in] times A [d_in, r] into t [len, r].
                unsafe { times((len, r, d_in), (t, r), false, xm.rows_from(start), a) };
                let s = factors[g].scale as f32;
                for (i, row) in thin[..len * r].chunks_exact_mut(r).enumerate() {
                    let si = c.as_ref().map_or(s, |c| s * c[start + i]);
                    row.iter_mut().for_each(|v| *v *= si);
                }
                // SAFETY: t [len, r] times B [r, d_out] into rows start..start+len of y.
                unsafe {
                    times(
                        (len, d_out, r),
                        (y.add(start * d_out), d_out),
                        false,
                        (thin.as_ptr(), r as isize, 1),
                        b,
                    )
                };
            });
        });
        Some(wrap(out))
    }

    pub(super) fn swiglu(
        x: &Tensor<2>,
        sizes: &[usize],
        w_in: &[Tensor<2>],
        w_out: &[Tensor<2>],
        row_scale: Option<&Tensor<2>>,
        d_out: usize,
    ) -> Option<Tensor<2>> {
        let [n, d] = x.dims();
        let two_ff = w_in.first().map_or(0, |w| w.dims()[1]);
        let ff = two_ff / 2;
        let xm = Mat::of(x)?;
        let (wi, wo) = (all(w_in)?, all(w_out)?);
        let c = scales(row_scale)?;
        let max_rows = sizes.iter().copied().max().unwrap_or(0);
        // One hidden buffer for every group: [rows, 2·d_ff], gate half then up half.
        let mut out = output(n, d_out);
        let y = out.storage_mut::<f32>().as_mut_ptr();
        with_scratch(max_rows * two_ff, |hidden| {
            groups(sizes, |g, rows| {
                let (start, len) = (rows.start, rows.len());
                let h = hidden.as_mut_ptr();
                // SAFETY: x rows start..start+len times W_in [d, 2·d_ff] into h [len, 2·d_ff].
                unsafe {
                    times(
                        (len, two_ff, d),
                        (h, two_ff),
                        false,
                        xm.rows_from(start),
                        &wi[g],
                    )
                };
                // silu(gate) ⊙ up ⊙ c, in place over the gate half of each row.
                hidden[..len * two_ff]
                    .par_chunks_exact_mut(two_ff)
                    .enumerate()
                    .for_each(|(i, row)| {
                        let ci = c.as_ref().map_or(1.0, |c| c[start + i]);
                        let (gate, up) = row.split_at_mut(ff);
                        for (gv, uv) in gate.iter_mut().zip(up.iter()) {
                            let v = *gv;
                            *gv = v / (1.0 + (-v).exp()) * *uv * ci;
                        }
                    });
                // SAFETY: the gate half of h ([len, d_ff], row stride 2·d_ff) times
                // W_out [d_ff, d_out] into rows start..start+len of y.
                unsafe {
                    times(
                        (len, d_out, ff),
                        (y.add(start * d_out), d_out),
                        false,
                        (hidden.as_ptr(), two_ff as isize, 1),
                        &wo[g],
                    )
                };
            });
        });
        Some(wrap(out))
    }

    /// Products of a few rows by a large row-major weight (decoding: one to a few tokens per
    /// sequence) without `gemm`'s packing: the weight is the only large operand, so the
    /// product is bound by how fast the weight streams from memory. Each thread owns a band
    /// of output columns; it walks the weight eight rows at a time, each row a sequential
    /// stream over its band, and adds `x[r, i..i+8] · W[i..i+8, band]` into the rows of the
    /// output, which stay in cache. Every weight element is read from memory once.
    mod stream {
        use rayon::prelude::*;

        /// The most rows that take this path (above it `gemm`'s packed kernel wins).
        pub(in crate::grouped) const MAX_ROWS: usize = 8;
        /// The fewest output columns that take this path (narrow products are `gemm`'s).
        pub(in crate::grouped) const MIN_COLS: usize = 64;
        /// Weight rows per pass.
        const IB: usize = 8;
        /// Output columns per cache block: `IB` weight rows of this width stay in L1 while
        /// every output row is updated.
        const CB: usize = 512;

        /// A pointer that may cross to the worker threads (each writes its own columns).
        #[derive(Clone, Copy)]
        struct Out(*mut f32);
        // SAFETY: the threads write disjoint column bands of the output.
        unsafe impl Send for Out {}
        unsafe impl Sync for Out {}

        /// As [`super::times`] for a row-major `w` (`(pointer, row stride)`).
        ///
        /// # Safety
        /// As [`super::times`].
        pub(in crate::grouped) unsafe fn times(
            (m, n, k): (usize, usize, usize),
            (dst, dst_rs): (*mut f32, usize),
            accumulate: bool,
            (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
            (w, w_rs): (*const f32, usize),
        ) {
            // The left rows, contiguous (`m·k` values, small).
            let mut x = vec![0.0f32; m * k];
            for r in 0..m {
                for i in 0..k {
                    // SAFETY: lhs addresses an m × k matrix with these strides.
                    x[r * k + i] =
                        unsafe { *lhs.offset(r as isize * lhs_rs + i as isize * lhs_cs) };
                }
            }
            // SAFETY: w addresses k rows of n at stride w_rs.
            let w = unsafe { std::slice::from_raw_parts(w, (k - 1) * w_rs + n) };
            let threads = rayon::current_num_threads().max(1);
            // Bands of whole 16-column vectors, at least 256 columns each.
            let band = n.div_ceil(threads).next_multiple_of(16).max(256);
            let out = Out(dst);
            let run = |c0: usize| {
                let c1 = (c0 + band).min(n);
                // SAFETY: each band writes columns c0..c1 of the m output rows only.
                unsafe { band_times(&x, (m, k), w, w_rs, (c0, c1), out, dst_rs, accumulate) };
            };
            let starts: Vec<usize> = (0..n).step_by(band).collect();
            if starts.len() == 1 || (m * n * k) < (1 << 18) {
                starts.into_iter().for_each(run);
            } else {
                starts.into_par_iter().for_each(run);
            }
        }

        /// One thread's band, on the widest vector unit this CPU has.
        #[allow(clippy::too_many_arguments)]
        unsafe fn band_times(
            x: &[f32],
            mk: (usize, usize),
            w: &[f32],
            w_rs: usize,
            cols: (usize, usize),
            out: Out,
            dst_rs: usize,
            accumulate: bool,
        ) {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (and so FMA); the rest as the caller's.
                    return unsafe { band_avx512(x, mk, w, w_rs, cols, out, dst_rs, accumulate) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA.
                    return unsafe { band_avx2(x, mk, w, w_rs, cols, out, dst_rs, accumulate) };
                }
            }
            // SAFETY: as the caller's.
            unsafe { band_body(x, mk, w, w_rs, cols, out, dst_rs, accumulate) }
        }

        /// [`band_body`] compiled with the named target features (one copy per vector width).
        macro_rules! band_with_features {
            ($name:ident, $features:literal) => {
                #[cfg(target_arch = "x86_64")]
                #[target_feature(enable = $features)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn $name(
                    x: &[f32],
                    mk: (usize, usize),
                    w: &[f32],
                    w_rs: usize,
                    cols: (usize, usize),
                    out: Out,
                    dst_rs: usize,
                    accumulate: bool,
                ) {
                    // SAFETY: as the caller's.
                    unsafe { band_body(x, mk, w, w_rs, cols, out, dst_rs, accumulate) }
                }
            };
        }
        band_with_features!(band_avx512, "avx512f,fma");
        band_with_features!(band_avx2, "avx2,fma");

        /// `out[r, c0..c1] (+)= Σ_i x[r, i] · w[i, c0..c1]`, compiled into each caller's
        /// vector width.
        ///
        /// # Safety
        /// `out` holds `m` rows at stride `dst_rs` with columns `c0..c1` written by this
        /// call alone.
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn band_body(
            x: &[f32],
            (m, k): (usize, usize),
            w: &[f32],
            w_rs: usize,
            (c0, c1): (usize, usize),
            out: Out,
            dst_rs: usize,
            accumulate: bool,
        ) {
            let len = c1 - c0;
            // SAFETY: rows r < m of the output, columns c0..c1 (this band's alone).
            let mut rows: Vec<&mut [f32]> = (0..m)
                .map(|r| unsafe { std::slice::from_raw_parts_mut(out.0.add(r * dst_rs + c0), len) })
                .collect();
            if !accumulate {
                for row in &mut rows {
                    row.fill(0.0);
                }
            }
            let wrow = |i: usize, a: usize, b: usize| &w[i * w_rs + c0 + a..i * w_rs + c0 + b];
            let mut i0 = 0;
            while i0 + IB <= k {
                for a in (0..len).step_by(CB) {
                    let b = (a + CB).min(len);
                    let ws: [&[f32]; IB] = std::array::from_fn(|j| wrow(i0 + j, a, b));
                    for (r, row) in rows.iter_mut().enumerate() {
                        let xs: [f32; IB] = std::array::from_fn(|j| x[r * k + i0 + j]);
                        let acc = &mut row[a..b];
                        let n = acc.len();
                        let ws: [&[f32]; IB] = std::array::from_fn(|j| &ws[j][..n]);
                        for c in 0..n {
                            let mut v = acc[c];
                            for j in 0..IB {
                                v = ws[j][c].mul_add(xs[j], v);
                            }
                            acc[c] = v;
                        }
                    }
                }
                i0 += IB;
            }
            for i in i0..k {
                let wi = wrow(i, 0, len);
                for (r, row) in rows.iter_mut().enumerate() {
                    let xi = x[r * k + i];
                    for (o, wv) in row.iter_mut().zip(wi) {
                        *o = wv.mul_add(xi, *o);
                    }
                }
            }
        }
    }
}
