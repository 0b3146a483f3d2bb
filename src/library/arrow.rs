//! Arrow: zero-shot routing over a library of LoRA experts (Ostapenko et al. 2024, "Towards
//! Modular LLMs by Building and Reusing a Library of LoRAs", arXiv 2405.11157).
//!
//! ## Prototypes
//! For expert `e` at one adapted layer, the prototype `v_e` is the top right singular vector
//! of its update `B_e A_e` (a unit vector in the layer's input space: the input direction the
//! expert changes most). modula computes it exactly from the thin factors: the Cholesky
//! factor of `A_e A_eᵀ` and the Gram matrix `B_eᵀB_e` reduce it to an `r×r` symmetric
//! eigenproblem (QR of both factors when `A_e` is rank-deficient); `O(r²(d_in+d_out))` work
//! and no `d_out×d_in` matrix. PEFT 0.21 runs 15 power iterations
//! from a random start instead, which is wrong when the top two singular values are close. A
//! singular vector's sign is arbitrary and Arrow only uses `|x·v|`, so prototypes are
//! sign-normalised (largest-magnitude entry positive) to make them reproducible.
//!
//! ## Routing
//! Per token `x` (the layer's input), `logit_e = |x·v_e| / τ`; the top `k` logits are kept and
//! the routing weights are their softmax (zero elsewhere). `x` is not normalised, as in PEFT.
//!
//! ## Aggregation ([`LoraMix`], [`lora_mixture`])
//! - `Output` (default): `Σ_e w_e s_e B_e A_e x` over the gathered top-`k` experts only (the
//!   core's sparse dispatch), exactly PEFT's Arrow forward.
//! - `Factor` (mttl's mixing): `(Σ_e w_e s_e B_e)(Σ_e w_e A_e) x`, two dispatch passes through
//!   an `r`-wide intermediate; all experts must share one rank.
//!
//! ## GenKnowSub
//! [`gen_know_sub`] subtracts the mean of "general" experts from a task expert before routing
//! (Bhardwaj et al. 2025): in factor space (PEFT's parity: `A − mean A_g`, `B − mean B_g`) or
//! exactly in delta space (`ΔW − mean ΔW_g`, rank `r + Σ r_g`).

use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};

use crate::aggregate::{LoraMix, lora_mixture};
use crate::error::{Error, Result};
use crate::library::factors::LoraFactors;
use crate::library::merge::{MergeSpace, cat_form};
use crate::linalg::{Mat, lowrank_svd};
use crate::modules::lora::LoraModule;
use crate::routers::ArrowRouter;
use crate::routing::{Router, Routing};

/// The Arrow prototype of one LoRA: the sign-normalised top right singular vector of `B A`
/// (length `d_in`), computed from the factors.
///
/// With `G_A = A Aᵀ = L Lᵀ` (Cholesky) and `G_B = BᵀB`, the right singular vectors of `B A`
/// are `Aᵀ L⁻ᵀ w` for the eigenvectors `w` of the symmetric `r×r` matrix `Lᵀ G_B L`, and they
/// come out unit-norm. That is two `r×r` Gram matrices (`r²(d_in+d_out)` multiply-adds), an
/// `r×r` Jacobi eigen-solve and one `Aᵀ z`. If `A` is rank-deficient (Cholesky fails) the QR
/// route (the SVD of `B Aᵀ` from QR of both factors) is used instead.
pub fn arrow_prototype(f: &LoraFactors) -> Vec<f64> {
    let mut v = gram_top_right_vector(f).unwrap_or_else(|| {
        let svd = lowrank_svd(&f.b, &f.a.t());
        (0..f.d_in()).map(|i| svd.v.at(i, 0)).collect()
    });
    let (mut best, mut best_abs) = (0.0, -1.0);
    for &x in &v {
        if x.abs() > best_abs {
            best_abs = x.abs();
            best = x;
        }
    }
    if best < 0.0 {
        v.iter_mut().for_each(|x| *x = -*x);
    }
    v
}

/// `XᵀX`-style Gram of the rows of a row-major `n × r` matrix: `Σ_i x_i x_iᵀ` (`r × r`).
fn gram_rows(m: &Mat) -> Mat {
    let r = m.cols;
    let mut g = Mat::zeros(r, r);
    for row in m.data.chunks_exact(r) {
        for i in 0..r {
            let xi = row[i];
            let gi = &mut g.data[i * r..(i + 1) * r];
            for (gij, &xj) in gi.iter_mut().zip(row) {
                *gij += xi * xj;
            }
        }
    }
    g
}

fn gram_top_right_vector(f: &LoraFactors) -> Option<Vec<f64>> {
    let r = f.rank();
    let g_a = f.a.matmul(&f.a.t()); // r × r
    let g_b = gram_rows(&f.b); // r × r
    // Cholesky G_A = L Lᵀ; give up (fall back to QR) unless A is well conditioned.
    let mut l = Mat::zeros(r, r);
    let scale = (0..r).map(|i| g_a.at(i, i)).fold(0.0, f64::max);
    for j in 0..r {
        let mut d = g_a.at(j, j);
        for k in 0..j {
            d -= l.at(j, k) * l.at(j, k);
        }
        if d <= 1e-10 * scale || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        *l.at_mut(j, j) = d;
        for i in j + 1..r {
            let mut s = g_a.at(i, j);
            for k in 0..j {
                s -= l.at(i, k) * l.at(j, k);
            }
            *l.at_mut(i, j) = s / d;
        }
    }
    let core = l.t().matmul(&g_b).matmul(&l);
    let eig = crate::linalg::svd(&core); // symmetric PSD
    let w: Vec<f64> = (0..r).map(|i| eig.u.at(i, 0)).collect();
    // z = L⁻ᵀ w (back substitution with the upper-triangular Lᵀ).
    let mut z = vec![0.0; r];
    for i in (0..r).rev() {
        let mut s = w[i];
        for (k, zk) in z.iter().enumerate().skip(i + 1) {
            s -= l.at(k, i) * zk;
        }
        z[i] = s / l.at(i, i);
    }
    // v = Aᵀ z, then renormalise against rounding.
    let d_in = f.d_in();
    let mut v = vec![0.0; d_in];
    for (k, &zk) in z.iter().enumerate() {
        for (vi, &a) in v.iter_mut().zip(&f.a.data[k * d_in..(k + 1) * d_in]) {
            *vi += zk * a;
        }
    }
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if !(n > 0.0 && n.is_finite()) {
        return None;
    }
    v.iter_mut().for_each(|x| *x /= n);
    Some(v)
}

/// The prototypes of several LoRAs of one layer as an `[experts, d_in]` matrix (`f64`), rows
/// in input order: what [`ArrowRouter::new`] takes.
///
/// # Errors
/// [`Error::Invalid`] for no experts; [`Error::Shape`] for experts of different layer shapes.
pub fn arrow_prototypes(experts: &[&LoraFactors]) -> Result<TensorData> {
    let p = prototype_rows(experts)?;
    Ok(TensorData::new(p.data, [p.rows, p.cols]))
}

/// [`arrow_prototypes`] as a host matrix.
fn prototype_rows(experts: &[&LoraFactors]) -> Result<Mat> {
    let Some(first) = experts.first() else {
        return Err(Error::invalid("Arrow prototypes", "there are no experts"));
    };
    let d_in = first.d_in();
    for f in experts {
        first.check_same_shape(f, "Arrow prototypes (all experts must adapt one layer)")?;
    }
    let mut out = Mat::zeros(experts.len(), d_in);
    // Experts are independent: split them over the available cores.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(experts.len());
    let per = experts.len().div_ceil(threads.max(1));
    std::thread::scope(|scope| {
        for (chunk, rows) in experts.chunks(per).zip(out.data.chunks_mut(per * d_in)) {
            scope.spawn(move || {
                for (f, row) in chunk.iter().zip(rows.chunks_mut(d_in)) {
                    row.copy_from_slice(&arrow_prototype(f));
                }
            });
        }
    });
    Ok(out)
}

/// General-knowledge subtraction: `task − mean(general)`, in factor space (PEFT) or exactly in
/// delta space (see the [module docs](self)).
///
/// # Errors
/// [`Error::Invalid`] for no general experts, or (factor space) ranks or scalings that differ
/// from the task's; [`Error::Shape`] for other layer shapes.
pub fn gen_know_sub(
    task: &LoraFactors,
    general: &[&LoraFactors],
    space: MergeSpace,
) -> Result<LoraFactors> {
    if general.is_empty() {
        return Err(Error::invalid("GenKnowSub", "there are no general experts"));
    }
    for g in general {
        task.check_same_shape(g, "GenKnowSub")?;
    }
    let n = general.len() as f64;
    match space {
        MergeSpace::Delta => {
            let mut all = vec![task];
            all.extend_from_slice(general);
            let mut w = vec![-1.0 / n; all.len()];
            w[0] = 1.0;
            Ok(cat_form(&all, &w))
        }
        MergeSpace::Factor => {
            if general
                .iter()
                .any(|g| g.rank() != task.rank() || g.scaling != task.scaling)
            {
                return Err(Error::invalid(
                    "GenKnowSub in factor space",
                    "general experts must have the task's rank and scaling; use the delta space",
                ));
            }
            let mut out = task.clone();
            for g in general {
                for (o, v) in out.a.data.iter_mut().zip(&g.a.data) {
                    *o -= v / n;
                }
                for (o, v) in out.b.data.iter_mut().zip(&g.b.data) {
                    *o -= v / n;
                }
            }
            Ok(out)
        }
    }
}

/// Building an [`ArrowRouter`] from a library's experts.
impl ArrowRouter {
    /// A router over `experts` (their prototypes computed here).
    ///
    /// # Errors
    /// As [`arrow_prototypes`] and [`ArrowRouter::new`].
    pub fn from_experts(
        experts: &[&LoraFactors],
        top_k: usize,
        temperature: f64,
        device: &Device,
    ) -> Result<Self> {
        Self::new(&arrow_prototypes(experts)?, top_k, temperature, device)
    }
}

/// A Linear layer with a library of LoRA experts routed by Arrow.
#[derive(Debug)]
pub struct ArrowLinear {
    /// The frozen host layer.
    pub base: Linear,
    /// The experts, in the router's order.
    pub experts: Vec<LoraModule>,
    /// The router.
    pub router: ArrowRouter,
    /// The aggregation.
    pub mix: LoraMix,
}

impl ArrowLinear {
    /// Builds the layer; the router's prototypes are computed from `experts`.
    ///
    /// # Errors
    /// [`Error::Shape`] if an expert does not fit `base`; as [`ArrowRouter::new`].
    pub fn new(
        base: Linear,
        experts: Vec<LoraModule>,
        top_k: usize,
        temperature: f64,
        mix: LoraMix,
    ) -> Result<Self> {
        let [d_in, d_out] = base.weight.dims();
        let host: Vec<LoraFactors> = experts.iter().map(LoraFactors::from_adapter).collect();
        for (e, f) in host.iter().enumerate() {
            if (f.d_in(), f.d_out()) != (d_in, d_out) {
                return Err(Error::shape(
                    format!("ArrowLinear expert {e}"),
                    format!("[d_in, d_out] = [{d_in}, {d_out}]"),
                    format!("[{}, {}]", f.d_in(), f.d_out()),
                ));
            }
        }
        if mix == LoraMix::Factor && host.iter().any(|f| f.rank() != host[0].rank()) {
            return Err(Error::invalid(
                "LoraMix::Factor",
                "factor mixing needs experts of one rank; use LoraMix::Output",
            ));
        }
        let refs: Vec<&LoraFactors> = host.iter().collect();
        let router = ArrowRouter::from_experts(&refs, top_k, temperature, &base.weight.device())?;
        Ok(Self {
            base,
            experts,
            router,
            mix,
        })
    }

    /// The experts' contribution alone (no base), with the routing used.
    ///
    /// # Errors
    /// Shape errors for the wrong input width; NaN/inf inputs.
    pub fn delta(&self, x: Tensor<2>) -> Result<(Tensor<2>, Routing)> {
        let routing = self.router.route(&x)?;
        let y = lora_mixture(x, &routing, &self.experts, self.mix)?;
        Ok((y, routing))
    }

    /// `base(x) + delta(x)` for `x: [rows, d_in]`.
    ///
    /// # Errors
    /// As [`delta`](Self::delta).
    pub fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        let (delta, _) = self.delta(x.clone())?;
        Ok(self.base.forward(x) + delta)
    }
}
