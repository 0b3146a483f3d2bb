//! L2R, "Learning to Route" (Araujo et al. 2024, arXiv 2408.09053): one parameter-efficient
//! module per task is trained in isolation and frozen; a small memory keeps a few examples per
//! task; a router trained on that memory composes the frozen modules for any input, without
//! task ids, either as an output mixture or a parameter merge
//! ([`lora_mixture`](crate::aggregate::lora_mixture) with [`LoraMix`](crate::aggregate::LoraMix)).
//!
//! - [`train_task_router`]: trains an [`XLoraRouter`] classifier on the memory (a
//!   [`ReplayBuffer`] keyed by task id) with cross-entropy on the task ids.
//! - [`train_router_on_task_loss`]: the paper's training: the router composes the frozen
//!   modules and learns from the composed model's task loss on the memory. With the modules'
//!   predictive distributions mixed by the routing weights `w(x) = softmax(router(x))`, the
//!   loss of a memory example `(x, y)` is
//!
//!   ```text
//!   L = −log Σ_t w_t(x) · p_t(y | x)
//!   ```
//!
//!   where `p_t(y | x)` is module `t`'s probability of the true label (0 when `y` is not one of
//!   task `t`'s classes). The modules are frozen, so their `p_t` are computed once.
//! - [`SimilarityRouter`]: the similarity-based baseline the paper compares against: route
//!   each input to the task whose memory mean is most cosine-similar.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::continual::replay::ReplayBuffer;
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::routers::{SimilarityRouter, XLoraRouter};
use crate::routing::Router;
use crate::tensor_util::float_tensor;

/// `epochs` passes of shuffled mini-batches of 32 memory rows (`x`: `rows × d`) with Adam at
/// `lr`, minimising `loss(router, x_batch, batch_rows)`; returns the router for inference.
fn fit_router(
    mut router: XLoraRouter,
    x: &[f32],
    d: usize,
    epochs: usize,
    lr: f64,
    seed: u64,
    loss: impl Fn(&XLoraRouter, Tensor<2>, &[usize]) -> Result<Tensor<1>>,
) -> Result<XLoraRouter> {
    let device = router.out.weight.device();
    let mut optim = AdamConfig::new().init();
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..x.len() / d).collect();
    for _ in 0..epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for chunk in order.chunks(32) {
            let xs: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| x[i * d..(i + 1) * d].iter().copied())
                .collect();
            let xb = float_tensor(xs, [chunk.len(), d], &device);
            let l = loss(&router, xb, chunk)?;
            let grads = GradientsParams::from_grads(l.backward(), &router);
            router = optim.step(lr, router, grads);
        }
    }
    Ok(router.valid())
}

/// Trains `router` (created on an autodiff device) to predict the task of each memory
/// example: `epochs` passes of shuffled mini-batches of 32 with Adam at `lr`. Returns the
/// trained router for inference (autodiff stripped).
///
/// # Errors
/// [`Error::Invalid`] for an empty memory or task ids outside the router's modules;
/// [`Error::Shape`] if the memory's width is not the router's input width.
pub fn train_task_router(
    memory: &ReplayBuffer,
    router: XLoraRouter,
    epochs: usize,
    lr: f64,
    seed: u64,
) -> Result<XLoraRouter> {
    let (x, y) = memory.all();
    if y.is_empty() {
        return Err(Error::invalid(
            "L2R memory",
            "the memory is empty; add examples of each task",
        ));
    }
    let experts = router.num_modules();
    if let Some(t) = y.iter().find(|&&t| t >= experts) {
        return Err(Error::invalid(
            "L2R memory",
            format!("task id {t} but the router chooses among {experts} modules"),
        ));
    }
    let device = router.out.weight.device();
    let ce = CrossEntropyLossConfig::new().init(&device);
    fit_router(router, &x, memory.dim(), epochs, lr, seed, |r, xb, rows| {
        let ys: Vec<i64> = rows.iter().map(|&i| y[i] as i64).collect();
        let yb = Tensor::<1, Int>::from_data(TensorData::new(ys, [rows.len()]), &device);
        Ok(ce.forward(r.logits(&xb)?, yb))
    })
}

/// Trains `router` (created on an autodiff device) on the composed model's task loss over a
/// memory (see the [module docs](self)): `x` holds the memory's router inputs (`rows × d`,
/// row-major), `likelihood[i][t]` module `t`'s probability of example `i`'s true label.
/// `epochs` passes of shuffled mini-batches of 32 with Adam at `lr`. Returns the trained router
/// for inference (autodiff stripped).
///
/// # Errors
/// [`Error::Invalid`] for an empty memory, rows of another count than the likelihoods,
/// likelihoods of another width than the router's modules or outside `[0, 1]`, or an example
/// no module gives any probability; [`Error::Shape`] for inputs of another width.
pub fn train_router_on_task_loss(
    x: &[f32],
    likelihood: &[Vec<f64>],
    router: XLoraRouter,
    epochs: usize,
    lr: f64,
    seed: u64,
) -> Result<XLoraRouter> {
    let rows = likelihood.len();
    if rows == 0 || !x.len().is_multiple_of(rows) {
        return Err(Error::invalid(
            "L2R task-loss memory",
            format!(
                "{} input values for {rows} examples; give one input row per example, at least one",
                x.len()
            ),
        ));
    }
    let d = x.len() / rows;
    let modules = router.num_modules();
    for (i, l) in likelihood.iter().enumerate() {
        if l.len() != modules || l.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return Err(Error::invalid(
                "L2R task-loss memory",
                format!(
                    "example {i}: {l:?} must be {modules} probabilities in [0, 1], one per module"
                ),
            ));
        }
        if l.iter().all(|&p| p == 0.0) {
            return Err(Error::invalid(
                "L2R task-loss memory",
                format!("example {i}: no module gives its label any probability"),
            ));
        }
    }
    let device = router.out.weight.device();
    fit_router(router, x, d, epochs, lr, seed, |r, xb, rows| {
        let ps: Vec<f32> = rows
            .iter()
            .flat_map(|&i| likelihood[i].iter().map(|&p| p as f32))
            .collect();
        let pb = float_tensor(ps, [rows.len(), modules], &device);
        let w = burn::tensor::activation::softmax(r.logits(&xb)?, 1);
        let mixed = (w * pb).sum_dim(1).clamp_min(1e-12);
        Ok(mixed.log().mean().neg())
    })
}

impl SimilarityRouter {
    /// Task means from a memory keyed by task id (tasks `0..=max id`; a task with no examples
    /// is never chosen).
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty memory.
    pub fn from_memory(memory: &ReplayBuffer, device: &Device) -> Result<Self> {
        let (x, y) = memory.all();
        let Some(&max) = y.iter().max() else {
            return Err(Error::invalid("similarity router", "the memory is empty"));
        };
        let d = memory.dim();
        let tasks = max + 1;
        let mut means = vec![0f64; tasks * d];
        for (row, &t) in x.chunks_exact(d).zip(&y) {
            for (m, &v) in means[t * d..(t + 1) * d].iter_mut().zip(row) {
                *m += f64::from(v);
            }
        }
        Ok(Self::from_task_sums(&means, tasks, d, device))
    }
}
