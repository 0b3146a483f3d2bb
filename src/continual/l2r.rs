//! L2R, "Learning to Route" (Araujo et al. 2024, arXiv 2408.09053): one parameter-efficient
//! module per task is trained in isolation and frozen; a small memory keeps a few examples per
//! task; a router trained on that memory composes the frozen modules for any input, without
//! task ids, either as an output mixture or a parameter merge
//! ([`lora_mixture`](crate::aggregate::lora_mixture) with [`LoraMix`](crate::aggregate::LoraMix)).
//!
//! - [`train_task_router`]: trains an [`XLoraRouter`] classifier on the memory (a
//!   [`ReplayBuffer`] keyed by task id) with cross-entropy on the task ids.
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

/// Trains `router` (created on an autodiff device) to predict the task of each memory
/// example: `epochs` passes of shuffled mini-batches of 32 with Adam at `lr`. Returns the
/// trained router for inference (autodiff stripped).
///
/// # Errors
/// [`Error::Invalid`] for an empty memory or task ids outside the router's modules;
/// [`Error::Shape`] if the memory's width is not the router's input width.
pub fn train_task_router(
    memory: &ReplayBuffer,
    mut router: XLoraRouter,
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
    let d = memory.dim();
    let device = router.out.weight.device();
    let ce = CrossEntropyLossConfig::new().init(&device);
    let mut optim = AdamConfig::new().init();
    let mut rng = SplitMix64::new(seed);
    let mut order: Vec<usize> = (0..y.len()).collect();
    for _ in 0..epochs {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for chunk in order.chunks(32) {
            let xs: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| x[i * d..(i + 1) * d].iter().copied())
                .collect();
            let ys: Vec<i64> = chunk.iter().map(|&i| y[i] as i64).collect();
            let xb = float_tensor(xs, [chunk.len(), d], &device);
            let yb = Tensor::<1, Int>::from_data(TensorData::new(ys, [chunk.len()]), &device);
            let loss = ce.forward(router.logits(&xb)?, yb);
            let grads = GradientsParams::from_grads(loss.backward(), &router);
            router = optim.step(lr, router, grads);
        }
    }
    Ok(router.valid())
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
