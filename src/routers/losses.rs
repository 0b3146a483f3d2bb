//! Auxiliary losses and diagnostics of learned routers.
//!
//! Formulas (`T` tokens, `E` experts, router probabilities `p = softmax(logits)`):
//!
//! - **Load balancing** (Switch Transformer, Fedus et al. 2021, arXiv 2101.03961, eq. 4):
//!   `L_lb = E · Σ_e f_e · P̄_e`, with `P̄_e = (1/T) Σ_t p_te` and `f_e` the fraction of the
//!   `T·k` routing slots that selected expert `e` (so `Σ_e f_e = 1` for any `k`, and a
//!   perfectly balanced router gives `L_lb = 1`). Hugging Face's Mixtral implementation
//!   counts each token `k` times without dividing by `k`; its value is `k · L_lb`. `f_e` is a
//!   count and carries no gradient; `P̄_e` does.
//! - **Router z-loss** (ST-MoE, Zoph et al. 2022, arXiv 2202.08906, eq. 5):
//!   `L_z = (1/T) Σ_t (log Σ_e exp(logits_te))²`.
//! - **Importance CV²** (Shazeer et al. 2017, arXiv 1701.06538, eq. 6):
//!   `importance_e = Σ_t g_te` over the sparse gate values, `L_imp = CV(importance)²`, where
//!   `CV² = Var/Mean²` with the population variance.
//! - **Mutual information** (ModuleFormer, Shen et al. 2023, arXiv 2306.04640, eq. 6): the
//!   router should be confident per token yet use all experts overall, i.e. maximise
//!   `MI(token; expert) = H(P̄) − (1/T) Σ_t H(p_t)`; the loss is `L_MI = −MI`.
//! - **Router entropy** (diagnostic): `(1/T) Σ_t −Σ_e p_te log p_te`.

use burn::tensor::{IndexingUpdateOp, Int, Tensor, activation};

/// Switch load-balancing loss `E · Σ_e f_e · P̄_e` (see the module docs), a `[1]` tensor.
///
/// `probs: [T, E]` are the router's softmax probabilities, `indices: [T, k]` the selected
/// experts (`-1` slots are ignored in `f`).
pub fn load_balancing_loss(probs: Tensor<2>, indices: Tensor<2, Int>) -> Tensor<1> {
    let [_, e] = probs.dims();
    let f = slot_fractions(indices, e, &probs.device()).detach();
    let p_mean = probs.mean_dim(0).reshape([e]);
    (f * p_mean).sum().mul_scalar(e as f64)
}

/// Fraction of the non-dropped routing slots assigned to each expert, `[E]`.
pub fn slot_fractions(
    indices: Tensor<2, Int>,
    e: usize,
    device: &burn::tensor::Device,
) -> Tensor<1> {
    let [t, k] = indices.dims();
    // Dropped slots (-1) go to an extra bucket that is cut off.
    let dropped = indices.clone().lower_elem(0);
    let idx = indices.mask_fill(dropped, e as i64).reshape([t * k]);
    let counts = Tensor::<1>::zeros([e + 1], device).select_assign(
        0,
        idx,
        Tensor::<1>::ones([t * k], device),
        IndexingUpdateOp::Add,
    );
    let counts = counts.narrow(0, 0, e);
    let total = counts.clone().sum().clamp_min(1.0);
    counts / total
}

/// Router z-loss `mean_t (logsumexp_e logits_te)²`, a `[1]` tensor.
pub fn z_loss(logits: Tensor<2>) -> Tensor<1> {
    let [t, _] = logits.dims();
    let max = logits.clone().max_dim(1).detach();
    let lse = (logits - max.clone()).exp().sum_dim(1).log() + max;
    lse.powf_scalar(2.0).reshape([t]).mean()
}

/// `Var(v) / Mean(v)²` with the population variance (`0` when the mean is 0), a `[1]` tensor.
pub fn cv_squared(v: Tensor<1>) -> Tensor<1> {
    let mean = v.clone().mean();
    let var = (v - mean.clone()).powf_scalar(2.0).mean();
    var / (mean.powf_scalar(2.0) + 1e-10)
}

/// Shazeer's importance loss `CV(Σ_t g_t)²` over the dense gate matrix `gates: [T, E]`.
pub fn importance_loss(gates: Tensor<2>) -> Tensor<1> {
    let [_, e] = gates.dims();
    cv_squared(gates.sum_dim(0).reshape([e]))
}

/// Mean routing entropy `(1/T) Σ_t −Σ_e p log p` of `probs: [T, E]` (natural log).
pub fn router_entropy(probs: Tensor<2>) -> Tensor<1> {
    let [t, _] = probs.dims();
    let logp = probs.clone().clamp_min(1e-20).log();
    (probs * logp).sum_dim(1).neg().reshape([t]).mean()
}

/// ModuleFormer's mutual-information loss `−(H(P̄) − mean_t H(p_t))` of `probs: [T, E]`.
pub fn mutual_information_loss(probs: Tensor<2>) -> Tensor<1> {
    let [_, e] = probs.dims();
    let p_mean = probs.clone().mean_dim(0).reshape([e]);
    let h_mean = (p_mean.clone() * p_mean.clamp_min(1e-20).log()).sum().neg();
    router_entropy(probs) - h_mean
}

/// Softmax over experts, for callers that only have logits.
pub fn router_probs(logits: Tensor<2>) -> Tensor<2> {
    activation::softmax(logits, 1)
}
