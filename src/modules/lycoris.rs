//! LoHa and LoKr: Hadamard- and Kronecker-product weight deltas (the LyCORIS family; Hyeon-Woo
//! et al. 2022, "FedPara", arXiv 2108.06098, for the Hadamard form; Yeh et al. 2024, "Navigating
//! Text-To-Image Customization", arXiv 2309.14859, for both as PEFT implements them).
//!
//! Both replace LoRA's product of two thin factors with a structured delta on a frozen linear
//! layer `y = x Wᵀ + b` (PyTorch layout `W: [d_out, d_in]`, the layout these factors use, as
//! in PEFT files):
//!
//! ```text
//! LoHa   ΔW = s · (W1a W1b) ⊙ (W2a W2b)        W1a, W2a: [d_out, r]   W1b, W2b: [r, d_in]
//! LoKr   ΔW = s · W1 ⊗ W2                      W1: [a_out, a_in]      W2: [b_out, b_in]
//!        d_out = a_out · b_out,  d_in = a_in · b_in,  each Wi full or a product Wi_a Wi_b
//! s = alpha / r
//! ```
//!
//! # Computing only what the math needs
//! PEFT forms the `d_out × d_in` delta on every forward pass. modula never does outside a
//! merge:
//! - the Hadamard product of two rank-`r` matrices is a rank-`r²` product of Khatri–Rao
//!   factors, `(W1a W1b) ⊙ (W2a W2b) = (W1a ⊙ᵣ W2a)(W1b ⊙ᶜ W2b)` with `(W1a ⊙ᵣ W2a)[o, (i,j)] =
//!   W1a[o,i]·W2a[o,j]`, so LoHa's forward is two thin matmuls of width `r²`
//!   ([`LohaModule::delta_forward`]);
//! - `(W1 ⊗ W2) vec(X) = vec(W1 X W2ᵀ)` for an input row viewed as `X: [a_in, b_in]`, so LoKr's
//!   forward is two small matmuls (`2·rows·(a_out·a_in·b_in + a_out·b_out·b_in)` FLOPs,
//!   [`LokrModule::delta_forward`]).
//!
//! Both also have an exact LoRA form ([`LohaModule::to_lora`], [`LokrModule::to_lora`]): LoHa
//! of rank `r²`, LoKr of rank `rank(W1)·rank(W2)` (`kron(U1 V1, U2 V2) = kron(U1, U2)
//! kron(V1, V2)`). A model's host layers hold adapters in that form, so LoHa and LoKr folders
//! join mixed-adapter batches, routing, merging and `bake` like LoRA ones, with outputs equal
//! to PEFT's (tests/models.rs). PEFT's own LoRA conversion is an approximation by truncated
//! SVD; this one is exact.
//!
//! Initialisation follows PEFT (`init_weights=True`): LoHa's `W2b = 0`, LoKr's `W1` (or
//! `W1a`) `= 0`, the rest Kaiming-uniform, so a new adapter leaves the layer unchanged. The
//! factor shapes of LoKr follow PEFT's `factorization` and `decompose_both` rules, so a folder
//! saved from a [`LokrModule`] loads in PEFT.
//!
//! Training-time regularisers of PEFT's implementation (`rank_dropout`, `module_dropout`) are
//! not applied; a folder that sets them loads, and they are kept when it is saved again.

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Tensor};

use super::ComputeModule;
use super::lora::LoraModule;
use crate::error::{Error, Result};

/// PyTorch's `kaiming_uniform_(a = sqrt(5))` on a `[fan_out, fan_in]` tensor: uniform in
/// `±1/sqrt(fan_in)`.
fn kaiming(shape: [usize; 2], device: &Device) -> Tensor<2> {
    let bound = 1.0 / (shape[1] as f64).sqrt();
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

/// `kron(p, q)`: `[m, n] ⊗ [s, t] → [m·s, n·t]`, entry `[(i·s + k), (j·t + l)] = p[i,j]·q[k,l]`.
pub fn kron(p: Tensor<2>, q: Tensor<2>) -> Tensor<2> {
    let [m, n] = p.dims();
    let [s, t] = q.dims();
    let p4: Tensor<4> = p.reshape([m, 1, n, 1]);
    let q4: Tensor<4> = q.reshape([1, s, 1, t]);
    (p4 * q4).reshape([m * s, n * t])
}

/// Row-wise Khatri–Rao product: `[n, r1] , [n, r2] → [n, r1·r2]`, column `i·r2 + j` =
/// `p[:, i] ⊙ q[:, j]`.
fn khatri_rao_rows(p: Tensor<2>, q: Tensor<2>) -> Tensor<2> {
    let [n, r1] = p.dims();
    let r2 = q.dims()[1];
    let p3: Tensor<3> = p.reshape([n, r1, 1]);
    let q3: Tensor<3> = q.reshape([n, 1, r2]);
    (p3 * q3).reshape([n, r1 * r2])
}

fn check_factor_pair(what: &str, a: &Tensor<2>, b: &Tensor<2>) -> Result<()> {
    if a.dims()[1] != b.dims()[0] {
        return Err(Error::shape(
            format!("{what} factors (a: [out, r], b: [r, in])"),
            format!("b with {} rows", a.dims()[1]),
            format!("a {:?}, b {:?}", a.dims(), b.dims()),
        ));
    }
    Ok(())
}

fn check_alpha(alpha: f64, rank: usize, what: &str) -> Result<()> {
    if rank == 0 {
        return Err(Error::invalid(
            format!("{what} rank"),
            "rank must be at least 1",
        ));
    }
    if !alpha.is_finite() {
        return Err(Error::invalid(
            format!("{what} alpha"),
            format!("{alpha} is not finite"),
        ));
    }
    Ok(())
}

/// One LoHa adapter: `ΔW = s · (W1a W1b) ⊙ (W2a W2b)`, `s = alpha / r` (see the module docs).
///
/// # Shapes
/// - `w1a`, `w2a`: `[d_out, r]`; `w1b`, `w2b`: `[r, d_in]` (PEFT's `hada_w*` tensors);
/// - [`delta_forward`](Self::delta_forward): `[..., d_in] → [..., d_out]`;
/// - [`delta_weight`](Self::delta_weight): `[d_in, d_out]` (burn's layout).
#[derive(Module, Debug)]
pub struct LohaModule {
    /// `hada_w1_a`, `[d_out, r]`.
    pub w1a: Param<Tensor<2>>,
    /// `hada_w1_b`, `[r, d_in]`.
    pub w1b: Param<Tensor<2>>,
    /// `hada_w2_a`, `[d_out, r]`.
    pub w2a: Param<Tensor<2>>,
    /// `hada_w2_b`, `[r, d_in]`.
    pub w2b: Param<Tensor<2>>,
    /// `alpha`; the scaling is `alpha / r`.
    pub alpha: f64,
}

impl LohaModule {
    /// A new adapter as PEFT initialises one (`W2b = 0`: the layer is unchanged).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero rank or width or a non-finite alpha.
    pub fn new(
        d_in: usize,
        d_out: usize,
        rank: usize,
        alpha: f64,
        device: &Device,
    ) -> Result<Self> {
        check_alpha(alpha, rank, "LoHa")?;
        if d_in == 0 || d_out == 0 {
            return Err(Error::invalid(
                "LoHa layer widths",
                "d_in and d_out must be positive",
            ));
        }
        Self::from_factors(
            kaiming([d_out, rank], device),
            kaiming([rank, d_in], device),
            kaiming([d_out, rank], device),
            Tensor::zeros([rank, d_in], device),
            alpha,
        )
    }

    /// An adapter from its four factors (PEFT's layouts).
    ///
    /// # Errors
    /// [`Error::Shape`] for factors whose shapes disagree; [`Error::Invalid`] for a
    /// non-finite alpha.
    pub fn from_factors(
        w1a: Tensor<2>,
        w1b: Tensor<2>,
        w2a: Tensor<2>,
        w2b: Tensor<2>,
        alpha: f64,
    ) -> Result<Self> {
        check_factor_pair("LoHa hada_w1", &w1a, &w1b)?;
        check_factor_pair("LoHa hada_w2", &w2a, &w2b)?;
        if w1a.dims() != w2a.dims() || w1b.dims() != w2b.dims() {
            return Err(Error::shape(
                "LoHa factors (hada_w2_* shaped as hada_w1_*)",
                format!("{:?} and {:?}", w1a.dims(), w1b.dims()),
                format!("{:?} and {:?}", w2a.dims(), w2b.dims()),
            ));
        }
        check_alpha(alpha, w1a.dims()[1], "LoHa")?;
        Ok(Self {
            w1a: Param::from_tensor(w1a),
            w1b: Param::from_tensor(w1b),
            w2a: Param::from_tensor(w2a),
            w2b: Param::from_tensor(w2b),
            alpha,
        })
    }

    /// The rank `r` of each Hadamard factor.
    pub fn rank(&self) -> usize {
        self.w1a.shape().dims::<2>()[1]
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.w1b.shape().dims::<2>()[1]
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.w1a.shape().dims::<2>()[0]
    }

    /// `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// The rank-`r²` factors `(U: [d_out, r²], V: [r², d_in])` with `U V = (W1a W1b) ⊙ (W2a
    /// W2b)`.
    fn khatri_rao(&self) -> (Tensor<2>, Tensor<2>) {
        let u = khatri_rao_rows(self.w1a.val(), self.w2a.val());
        let v = khatri_rao_rows(self.w1b.val().transpose(), self.w2b.val().transpose()).transpose();
        (u, v)
    }

    /// `s · x ΔWᵀ` for `x: [..., d_in]`, through the rank-`r²` form (never `d_out × d_in`).
    pub fn delta_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let (u, v) = self.khatri_rao();
        x.matmul(v.transpose().unsqueeze())
            .mul_scalar(self.scaling())
            .matmul(u.transpose().unsqueeze())
    }

    /// `s·ΔWᵀ`, `[d_in, d_out]` (burn's layout), for merging.
    pub fn delta_weight(&self) -> Tensor<2> {
        ((self.w1a.val().matmul(self.w1b.val())) * (self.w2a.val().matmul(self.w2b.val())))
            .mul_scalar(self.scaling())
            .transpose()
    }

    /// The same delta as a LoRA adapter of rank `r²` (exact: the Khatri–Rao factors), frozen.
    pub fn to_lora(&self) -> LoraModule {
        let (u, v) = self.khatri_rao();
        lora_form(v.transpose(), u.transpose(), self.scaling())
    }
}

/// A LoRA adapter with factors `a: [d_in, R]`, `b: [R, d_out]` whose scaling is `s` (alpha
/// `s·R`, plain LoRA scaling), detached.
fn lora_form(a: Tensor<2>, b: Tensor<2>, s: f64) -> LoraModule {
    let rank = a.dims()[1];
    LoraModule::from_factors(a.detach(), b.detach(), s * rank as f64, false, 0.0)
        .expect("the LoRA form's factors share their rank and the scaling is finite")
        .no_grad()
}

impl ComputeModule for LohaModule {
    fn d_input(&self) -> usize {
        self.d_in()
    }

    fn d_output(&self) -> usize {
        self.d_out()
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.delta_forward(x)
    }
}

/// One Kronecker factor of a LoKr adapter: a full matrix or a low-rank product.
#[derive(Module, Debug)]
pub enum KronFactor {
    /// `lokr_w1` / `lokr_w2`, `[out, in]`.
    Full(Param<Tensor<2>>),
    /// `lokr_w*_a` (`[out, r]`) and `lokr_w*_b` (`[r, in]`).
    LowRank(FactorPair),
}

/// A low-rank product `a b` (`a: [out, r]`, `b: [r, in]`).
#[derive(Module, Debug)]
pub struct FactorPair {
    /// `[out, r]`.
    pub a: Param<Tensor<2>>,
    /// `[r, in]`.
    pub b: Param<Tensor<2>>,
}

impl FactorPair {
    fn new(a: Tensor<2>, b: Tensor<2>) -> Self {
        Self {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
        }
    }
}

impl KronFactor {
    /// The factor as a matrix, `[out, in]`.
    pub fn matrix(&self) -> Tensor<2> {
        match self {
            Self::Full(w) => w.val(),
            Self::LowRank(p) => p.a.val().matmul(p.b.val()),
        }
    }

    /// `[out, in]`.
    pub fn dims(&self) -> [usize; 2] {
        match self {
            Self::Full(w) => w.shape().dims::<2>(),
            Self::LowRank(p) => [p.a.shape().dims::<2>()[0], p.b.shape().dims::<2>()[1]],
        }
    }

    /// `(U: [out, k], V: [k, in])` with `U V` the factor and `k` as small as the form allows:
    /// the low-rank pair, or a full matrix against an identity on its shorter side.
    fn thin(&self) -> (Tensor<2>, Tensor<2>) {
        match self {
            Self::LowRank(p) => (p.a.val(), p.b.val()),
            Self::Full(w) => {
                let w = w.val();
                let [o, i] = w.dims();
                let device = w.device();
                if o <= i {
                    (Tensor::eye(o, &device), w)
                } else {
                    (w, Tensor::eye(i, &device))
                }
            }
        }
    }

    fn full_or_pair(
        a: Option<Tensor<2>>,
        pair: Option<(Tensor<2>, Tensor<2>)>,
        what: &str,
    ) -> Result<Self> {
        match (a, pair) {
            (Some(w), None) => Ok(Self::Full(Param::from_tensor(w))),
            (None, Some((a, b))) => {
                check_factor_pair(what, &a, &b)?;
                Ok(Self::LowRank(FactorPair::new(a, b)))
            }
            _ => Err(Error::invalid(
                format!("LoKr {what}"),
                "give either the full matrix or both low-rank factors",
            )),
        }
    }
}

/// PEFT's `factorization(dimension, factor)`: `(m, n)` with `m·n = dimension`, `m ≤ n`; with
/// `factor > 0` dividing the dimension, `(factor, dimension / factor)`; otherwise the divisor
/// pair nearest the square root whose smaller member does not exceed `factor` (any, for
/// `factor = -1`).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        return (factor as usize, dimension / factor as usize);
    }
    let factor = if factor == -1 {
        dimension
    } else {
        factor.max(0) as usize
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n; // as in PEFT, not updated in the loop
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n { (n, m) } else { (m, n) }
}

/// How a new [`LokrModule`] is shaped (PEFT's `LoKrConfig` keys).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LokrShape {
    /// `r`: the rank of the low-rank factors.
    pub rank: usize,
    /// `alpha`; the scaling is `alpha / r`.
    pub alpha: f64,
    /// `decompose_both`: also factor `W1` when `r` is below half its larger side.
    pub decompose_both: bool,
    /// `decompose_factor` (`-1`: split each width near its square root).
    pub decompose_factor: i64,
}

impl LokrShape {
    /// PEFT's defaults for rank `r`: `alpha = 8`, no `decompose_both`, `decompose_factor = -1`.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: 8.0,
            decompose_both: false,
            decompose_factor: -1,
        }
    }
}

/// The factor shapes of a LoKr adapter and which factors are full matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LokrLayout {
    /// `[a_out, a_in]`.
    pub w1: [usize; 2],
    /// `[b_out, b_in]`.
    pub w2: [usize; 2],
    /// `W1` is one matrix (`lokr_w1`), not a pair.
    pub w1_full: bool,
    /// `W2` is one matrix (`lokr_w2`), not a pair.
    pub w2_full: bool,
}

/// One LoKr adapter: `ΔW = s · W1 ⊗ W2`, `s = alpha / r` (see the module docs).
///
/// # Shapes
/// - `w1`: `[a_out, a_in]`, `w2`: `[b_out, b_in]` ([`KronFactor::dims`]), `d_out = a_out·b_out`,
///   `d_in = a_in·b_in`;
/// - [`delta_forward`](Self::delta_forward): `[..., d_in] → [..., d_out]`;
/// - [`delta_weight`](Self::delta_weight): `[d_in, d_out]` (burn's layout).
#[derive(Module, Debug)]
pub struct LokrModule {
    /// The left factor (`lokr_w1` or `lokr_w1_a`/`lokr_w1_b`).
    pub w1: KronFactor,
    /// The right factor (`lokr_w2` or `lokr_w2_a`/`lokr_w2_b`).
    pub w2: KronFactor,
    /// `alpha`.
    pub alpha: f64,
    /// `r`, the rank the scaling divides by (PEFT uses it whether or not a factor is low-rank).
    pub rank: usize,
}

impl LokrModule {
    /// The factor shapes PEFT gives a `d_in → d_out` layer: `([a_out, a_in], [b_out, b_in])`
    /// and whether each factor is full (PEFT's `use_w1`, `use_w2`).
    pub fn peft_layout(d_in: usize, d_out: usize, shape: LokrShape) -> LokrLayout {
        let (in_m, in_n) = factorization(d_in, shape.decompose_factor);
        let (out_l, out_k) = factorization(d_out, shape.decompose_factor);
        let r = shape.rank as f64;
        LokrLayout {
            w1: [out_l, in_m],
            w2: [out_k, in_n],
            w1_full: !(shape.decompose_both && r < out_l.max(in_m) as f64 / 2.0),
            w2_full: r >= out_k.max(in_n) as f64 / 2.0,
        }
    }

    /// This adapter's layout, in the terms of [`peft_layout`](Self::peft_layout).
    pub fn layout(&self) -> LokrLayout {
        LokrLayout {
            w1: self.w1.dims(),
            w2: self.w2.dims(),
            w1_full: matches!(self.w1, KronFactor::Full(_)),
            w2_full: matches!(self.w2, KronFactor::Full(_)),
        }
    }

    /// A new adapter for a `d_in → d_out` layer, shaped and initialised as PEFT does
    /// (`W1` or `W1a` zero: the layer is unchanged).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero rank or width or a non-finite alpha.
    pub fn new(d_in: usize, d_out: usize, shape: LokrShape, device: &Device) -> Result<Self> {
        check_alpha(shape.alpha, shape.rank, "LoKr")?;
        if d_in == 0 || d_out == 0 {
            return Err(Error::invalid(
                "LoKr layer widths",
                "d_in and d_out must be positive",
            ));
        }
        let LokrLayout {
            w1: [out_l, in_m],
            w2: [out_k, in_n],
            w1_full: use_w1,
            w2_full: use_w2,
        } = Self::peft_layout(d_in, d_out, shape);
        let r = shape.rank;
        let w1 = if use_w1 {
            KronFactor::Full(Param::from_tensor(Tensor::zeros([out_l, in_m], device)))
        } else {
            KronFactor::LowRank(FactorPair::new(
                Tensor::zeros([out_l, r], device),
                kaiming([r, in_m], device),
            ))
        };
        let w2 = if use_w2 {
            KronFactor::Full(Param::from_tensor(kaiming([out_k, in_n], device)))
        } else {
            KronFactor::LowRank(FactorPair::new(
                kaiming([out_k, r], device),
                kaiming([r, in_n], device),
            ))
        };
        Ok(Self {
            w1,
            w2,
            alpha: shape.alpha,
            rank: r,
        })
    }

    /// An adapter from its factors (PEFT's layouts): for each side the full matrix or the
    /// low-rank pair.
    ///
    /// # Errors
    /// [`Error::Invalid`] unless each side has exactly one form, for a zero rank or a
    /// non-finite alpha; [`Error::Shape`] for a pair whose inner sizes differ.
    pub fn from_factors(
        w1: Option<Tensor<2>>,
        w1_pair: Option<(Tensor<2>, Tensor<2>)>,
        w2: Option<Tensor<2>>,
        w2_pair: Option<(Tensor<2>, Tensor<2>)>,
        alpha: f64,
        rank: usize,
    ) -> Result<Self> {
        check_alpha(alpha, rank, "LoKr")?;
        Ok(Self {
            w1: KronFactor::full_or_pair(w1, w1_pair, "lokr_w1")?,
            w2: KronFactor::full_or_pair(w2, w2_pair, "lokr_w2")?,
            alpha,
            rank,
        })
    }

    /// Input width `a_in · b_in`.
    pub fn d_in(&self) -> usize {
        self.w1.dims()[1] * self.w2.dims()[1]
    }

    /// Output width `a_out · b_out`.
    pub fn d_out(&self) -> usize {
        self.w1.dims()[0] * self.w2.dims()[0]
    }

    /// `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// `s · x ΔWᵀ` for `x: [..., d_in]`: each row viewed as `X: [a_in, b_in]` maps to `s · W1 X
    /// W2ᵀ` (never forms the `d_out × d_in` delta).
    pub fn delta_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let [a_out, a_in] = self.w1.dims();
        let [b_out, b_in] = self.w2.dims();
        let w2t = self.w2.matrix().transpose();
        // [rows·a_in, b_in] W2ᵀ → [rows, a_in, b_out] → [rows, b_out, a_in] → ·W1ᵀ
        let t = x.reshape([rows * a_in, b_in]).matmul(w2t);
        let t: Tensor<3> = t.reshape([rows, a_in, b_out]).swap_dims(1, 2);
        let y = t
            .reshape([rows * b_out, a_in])
            .matmul(self.w1.matrix().transpose().mul_scalar(self.scaling()));
        let y: Tensor<3> = y.reshape([rows, b_out, a_out]).swap_dims(1, 2);
        let mut out = dims;
        out[D - 1] = a_out * b_out;
        y.reshape(out)
    }

    /// `s·ΔWᵀ`, `[d_in, d_out]` (burn's layout), for merging.
    pub fn delta_weight(&self) -> Tensor<2> {
        kron(self.w1.matrix(), self.w2.matrix())
            .mul_scalar(self.scaling())
            .transpose()
    }

    /// The rank of the exact LoRA form, `rank(W1)·rank(W2)` as the factors' forms bound it.
    pub fn lora_rank(&self) -> usize {
        let k = |f: &KronFactor| match f {
            KronFactor::LowRank(p) => p.a.shape().dims::<2>()[1],
            KronFactor::Full(w) => {
                let [o, i] = w.shape().dims::<2>();
                o.min(i)
            }
        };
        k(&self.w1) * k(&self.w2)
    }

    /// The same delta as a LoRA adapter of rank [`lora_rank`](Self::lora_rank):
    /// `kron(U1, U2) kron(V1, V2)` (exact), frozen.
    pub fn to_lora(&self) -> LoraModule {
        let (u1, v1) = self.w1.thin();
        let (u2, v2) = self.w2.thin();
        lora_form(
            kron(v1, v2).transpose(),
            kron(u1, u2).transpose(),
            self.scaling(),
        )
    }
}

impl ComputeModule for LokrModule {
    fn d_input(&self) -> usize {
        self.d_in()
    }

    fn d_output(&self) -> usize {
        self.d_out()
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.delta_forward(x)
    }
}

/// A LoHa or a LoKr adapter (what a PEFT `LOHA` / `LOKR` folder holds per module).
#[derive(Module, Debug)]
pub enum LycorisModule {
    /// A LoHa adapter.
    Loha(LohaModule),
    /// A LoKr adapter.
    Lokr(LokrModule),
}

impl LycorisModule {
    /// Input width.
    pub fn d_in(&self) -> usize {
        match self {
            Self::Loha(m) => m.d_in(),
            Self::Lokr(m) => m.d_in(),
        }
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        match self {
            Self::Loha(m) => m.d_out(),
            Self::Lokr(m) => m.d_out(),
        }
    }

    /// `s · x ΔWᵀ`.
    pub fn delta_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Loha(m) => m.delta_forward(x),
            Self::Lokr(m) => m.delta_forward(x),
        }
    }

    /// `s·ΔWᵀ`, `[d_in, d_out]`.
    pub fn delta_weight(&self) -> Tensor<2> {
        match self {
            Self::Loha(m) => m.delta_weight(),
            Self::Lokr(m) => m.delta_weight(),
        }
    }

    /// The exact LoRA form.
    pub fn to_lora(&self) -> LoraModule {
        match self {
            Self::Loha(m) => m.to_lora(),
            Self::Lokr(m) => m.to_lora(),
        }
    }
}

impl ComputeModule for LycorisModule {
    fn d_input(&self) -> usize {
        self.d_in()
    }

    fn d_output(&self) -> usize {
        self.d_out()
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.delta_forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor_util::to_vec_f32;

    fn max_diff(a: Tensor<2>, b: Tensor<2>) -> f32 {
        to_vec_f32((a - b).abs().max())[0]
    }

    /// PEFT's docstring examples of `factorization`.
    #[test]
    fn factorization_matches_peft() {
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        assert_eq!(factorization(40, -1), (5, 8));
        assert_eq!(factorization(40, 4), (4, 10));
        assert_eq!(factorization(48, 5), (4, 12));
        assert_eq!(factorization(10, -1), (2, 5));
    }

    #[test]
    fn kron_matches_its_definition() {
        let d = Device::flex();
        let p = Tensor::<2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &d);
        let q = Tensor::<2>::from_floats([[0.0, 5.0, 1.0]], &d);
        let k = to_vec_f32(kron(p, q));
        assert_eq!(
            k,
            [
                0.0, 5.0, 1.0, 0.0, 10.0, 2.0, 0.0, 15.0, 3.0, 0.0, 20.0, 4.0
            ]
        );
    }

    /// The thin forward passes and the exact LoRA forms agree with the dense delta.
    #[test]
    fn thin_forwards_and_lora_forms_equal_the_dense_delta() {
        let d = Device::flex();
        let x = Tensor::<2>::random([5, 12], Distribution::Normal(0.0, 1.0), &d);
        let loha = LohaModule::from_factors(
            kaiming([10, 3], &d),
            kaiming([3, 12], &d),
            kaiming([10, 3], &d),
            kaiming([3, 12], &d),
            6.0,
        )
        .unwrap();
        let dense = x.clone().matmul(loha.delta_weight());
        assert!(max_diff(loha.delta_forward(x.clone()), dense.clone()) < 1e-5);
        let lora = loha.to_lora();
        assert_eq!(lora.rank(), 9);
        assert!(max_diff(lora.delta_forward(x.clone()), dense) < 1e-5);
        for (w1, w2) in [
            (Some(kaiming([2, 3], &d)), None),
            (None, Some((kaiming([2, 1], &d), kaiming([1, 3], &d)))),
        ] {
            let lokr = LokrModule::from_factors(
                w1,
                w2,
                None,
                Some((kaiming([5, 2], &d), kaiming([2, 4], &d))),
                4.0,
                2,
            )
            .unwrap();
            assert_eq!((lokr.d_in(), lokr.d_out()), (12, 10));
            let dense = x.clone().matmul(lokr.delta_weight());
            assert!(max_diff(lokr.delta_forward(x.clone()), dense.clone()) < 1e-5);
            let lora = lokr.to_lora();
            assert_eq!(lora.rank(), lokr.lora_rank());
            assert!(max_diff(lora.delta_forward(x.clone()), dense) < 1e-5);
        }
    }

    /// New adapters start at zero and take PEFT's factor shapes.
    #[test]
    fn new_adapters_are_zero_with_peft_shapes() {
        let d = Device::flex();
        let loha = LohaModule::new(12, 10, 4, 8.0, &d).unwrap();
        assert_eq!(to_vec_f32(loha.delta_weight().abs().max())[0], 0.0);
        // 32 = 4·8, 40 = 5·8: r = 2 < 8/2 makes W2 low-rank; W1 full without decompose_both.
        let lokr = LokrModule::new(32, 40, LokrShape::new(2), &d).unwrap();
        assert_eq!(lokr.w1.dims(), [5, 4]);
        assert!(matches!(lokr.w1, KronFactor::Full(_)));
        assert!(matches!(lokr.w2, KronFactor::LowRank(_)));
        assert_eq!(to_vec_f32(lokr.delta_weight().abs().max())[0], 0.0);
        let both = LokrShape {
            decompose_both: true,
            ..LokrShape::new(1)
        };
        assert!(matches!(
            LokrModule::new(32, 40, both, &d).unwrap().w1,
            KronFactor::LowRank(_)
        ));
        assert!(LokrModule::new(32, 40, LokrShape::new(0), &d).is_err());
        assert!(LohaModule::new(12, 10, 4, f64::NAN, &d).is_err());
    }
}
