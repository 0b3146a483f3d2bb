//! A hypernetwork router: routing weights generated from learned task and layer embeddings
//! (the routing counterpart of HyperFormer's generated adapters, as in Hyper-X, Üstün et al.
//! 2022, and the survey's "hypernetwork routing", Pfeiffer et al. 2023 §4.2):
//!
//! ```text
//! w(task, layer) = softmax((ReLU([z_task ; z_layer] P + p) R + ρ) / τ)      over E modules
//! ```
//!
//! optionally kept to the top `k` and renormalised. One generator serves every layer, so a
//! new task needs one embedding, not a router per layer; gradients reach the embeddings, the
//! projection and `R`.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Device;
use burn::tensor::activation::softmax;

use super::check_temperature;
use crate::error::{Error, Result};
use crate::modules::hyper::HyperEmbedding;
use crate::routing::{Router, RouterInput, Routing};

/// A hypernetwork router over `E` modules (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct HyperRouter {
    /// Task and layer embeddings and their projection.
    pub embedding: HyperEmbedding,
    /// `h → E`: the routing logits.
    pub out: Linear,
    /// The layer whose routing [`route_input`](Router::route_input) gives.
    pub layer: usize,
    /// Softmax temperature.
    pub temperature: f64,
    /// Keep the top `k` weights (renormalised); `None` keeps all (dense routing).
    #[module(skip)]
    pub top_k: Option<usize>,
}

impl HyperRouter {
    /// A router over `modules` modules for `tasks` tasks and `layers` layers, from `e_dim`-wide
    /// embeddings through a `hidden`-wide projection; it routes layer 0 until
    /// [`layer`](Self::layer) is set.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero size, a `top_k` outside `1..=modules` or a temperature
    /// that is not positive and finite.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tasks: usize,
        layers: usize,
        modules: usize,
        e_dim: usize,
        hidden: usize,
        top_k: Option<usize>,
        temperature: f64,
        device: &Device,
    ) -> Result<Self> {
        check_temperature("hypernetwork router temperature", temperature)?;
        if modules == 0 || top_k.is_some_and(|k| k == 0 || k > modules) {
            return Err(Error::invalid(
                "hypernetwork router",
                format!(
                    "{modules} modules with top_k {top_k:?}: need modules >= 1 and 1 <= k <= modules"
                ),
            ));
        }
        Ok(Self {
            embedding: HyperEmbedding::new(tasks, layers, e_dim, hidden, device)?,
            out: LinearConfig::new(hidden, modules).init(device),
            layer: 0,
            temperature,
            top_k,
        })
    }

    /// The routing of rows whose tasks are `tasks` at `layer`.
    ///
    /// # Errors
    /// As [`HyperEmbedding::embed`].
    pub fn route_at(&self, tasks: &[usize], layer: usize) -> Result<Routing> {
        let logits = self.out.forward(self.embedding.embed(tasks, layer)?);
        let probs = softmax(logits.div_scalar(self.temperature), 1);
        match self.top_k {
            None => Routing::from_dense(probs),
            Some(k) => {
                let e = probs.dims()[1];
                let (_, idx) = probs.clone().detach().topk_with_indices(k, 1);
                let w = probs.gather(1, idx.clone());
                let w = w.clone() / w.sum_dim(1);
                Routing::new(idx, w, e)
            }
        }
    }
}

impl Router for HyperRouter {
    fn num_modules(&self) -> usize {
        self.out.weight.shape().dims::<2>()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        match input {
            RouterInput::TaskIds { ids, .. } => self.route_at(ids, self.layer),
            other => Err(other.wrong("HyperRouter", "task ids")),
        }
    }
}
