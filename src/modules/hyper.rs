//! Hypernetwork-generated adapters (HyperFormer: Mahabadi, Ruder, Dehghani & Henderson 2021,
//! "Parameter-efficient Multi-task Fine-tuning for Transformers via Shared Hypernetworks",
//! arXiv 2106.04489; Hyper-X, Üstün et al. 2022).
//!
//! Instead of one adapter per task and layer, one generator produces every adapter's weights
//! from a learned task embedding and a learned layer embedding:
//!
//! ```text
//! e = ReLU([z_task ; z_layer] P + p)                     z: [e_dim], e: [h]
//! D = reshape(e G_D, [d, r]),  U = reshape(e G_U, [r, d])
//! adapter(x) = x + ReLU(x D) U
//! ```
//!
//! Tasks share the generator, so what one task learns transfers to the others through it, and
//! the parameters grow with the embedding count, not with tasks × layers × adapter size.
//! `G_U` starts at zero, so every generated adapter is the identity at first. A generated
//! adapter is a [`ComputeModule`] ([`GeneratedAdapter`]) that routers and the dispatch use
//! like any other; [`routers::HyperRouter`](crate::routers::HyperRouter) generates routing
//! weights the same way.
//!
//! # Shapes
//! - task embeddings `[T, e_dim]`, layer embeddings `[L, e_dim]`; `x`: `[rows, d]`

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};

use super::{ComputeModule, check_last_dim};
use crate::error::{Error, Result};

/// The task and layer embeddings and their projection, shared by the adapter generator and the
/// hypernetwork router.
#[derive(Module, Debug)]
pub struct HyperEmbedding {
    /// Task embeddings, `[T, e_dim]`.
    pub tasks: Param<Tensor<2>>,
    /// Layer embeddings, `[L, e_dim]`.
    pub layers: Param<Tensor<2>>,
    /// `2·e_dim → h`, ReLU after.
    pub project: Linear,
}

impl HyperEmbedding {
    /// Embeddings for `tasks` tasks and `layers` layers of width `e_dim`, projected to `hidden`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero size.
    pub fn new(
        tasks: usize,
        layers: usize,
        e_dim: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Self> {
        if tasks == 0 || layers == 0 || e_dim == 0 || hidden == 0 {
            return Err(Error::invalid(
                "hypernetwork sizes",
                format!(
                    "tasks {tasks}, layers {layers}, e_dim {e_dim}, hidden {hidden} must be positive"
                ),
            ));
        }
        let normal = |n: usize| {
            Param::from_tensor(Tensor::random(
                [n, e_dim],
                Distribution::Normal(0.0, 1.0),
                device,
            ))
        };
        Ok(Self {
            tasks: normal(tasks),
            layers: normal(layers),
            project: LinearConfig::new(2 * e_dim, hidden).init(device),
        })
    }

    /// Number of tasks.
    pub fn num_tasks(&self) -> usize {
        self.tasks.shape().dims::<2>()[0]
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.shape().dims::<2>()[0]
    }

    /// `ReLU([z_task ; z_layer] P + p)` for each task of `tasks` at `layer`, `[tasks.len(), h]`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a task or layer out of range, or no tasks.
    pub fn embed(&self, tasks: &[usize], layer: usize) -> Result<Tensor<2>> {
        let (nt, nl) = (self.num_tasks(), self.num_layers());
        if tasks.is_empty() {
            return Err(Error::invalid(
                "hypernetwork tasks",
                "give at least one task",
            ));
        }
        if let Some(t) = tasks.iter().find(|&&t| t >= nt) {
            return Err(Error::invalid(
                "hypernetwork task",
                format!("{t} is outside 0..{nt}"),
            ));
        }
        if layer >= nl {
            return Err(Error::invalid(
                "hypernetwork layer",
                format!("{layer} is outside 0..{nl}"),
            ));
        }
        let device = self.tasks.device();
        let ids: Vec<i64> = tasks.iter().map(|&t| t as i64).collect();
        let z_t = self
            .tasks
            .val()
            .select(0, crate::tensor_util::int_tensor(&ids, &device));
        let e_dim = z_t.dims()[1];
        let z_l = self
            .layers
            .val()
            .slice([layer..layer + 1, 0..e_dim])
            .expand([tasks.len(), e_dim]);
        Ok(relu(self.project.forward(Tensor::cat(vec![z_t, z_l], 1))))
    }
}

/// The adapter generator (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct HyperAdapters {
    /// Task and layer embeddings.
    pub embedding: HyperEmbedding,
    /// `h → d·r`: the down projection's weights.
    pub gen_down: Linear,
    /// `h → r·d`: the up projection's weights (zero at first).
    pub gen_up: Linear,
    #[module(skip)]
    d: usize,
    #[module(skip)]
    r: usize,
}

impl HyperAdapters {
    /// A generator of bottleneck adapters `d → r → d` for `tasks` tasks and `layers` layers,
    /// from `e_dim`-wide embeddings through a `hidden`-wide projection.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero size.
    pub fn new(
        tasks: usize,
        layers: usize,
        d: usize,
        r: usize,
        e_dim: usize,
        hidden: usize,
        device: &Device,
    ) -> Result<Self> {
        if d == 0 || r == 0 {
            return Err(Error::invalid(
                "hypernetwork adapter",
                "d and r must be positive",
            ));
        }
        let mut gen_up = LinearConfig::new(hidden, r * d).init(device);
        gen_up.weight = Param::from_tensor(Tensor::zeros([hidden, r * d], device));
        gen_up.bias = Some(Param::from_tensor(Tensor::zeros([r * d], device)));
        let mut gen_down = LinearConfig::new(hidden, d * r).init(device);
        // Scale the generated down projection like a fan-in initialisation of a d → r layer.
        gen_down.weight = Param::from_tensor(
            gen_down
                .weight
                .val()
                .mul_scalar(1.0 / (d as f64).sqrt())
                .detach(),
        );
        Ok(Self {
            embedding: HyperEmbedding::new(tasks, layers, e_dim, hidden, device)?,
            gen_down,
            gen_up,
            d,
            r,
        })
    }

    /// The adapter of `task` at `layer`.
    ///
    /// # Errors
    /// As [`HyperEmbedding::embed`].
    pub fn adapter(&self, task: usize, layer: usize) -> Result<GeneratedAdapter> {
        let e = self.embedding.embed(&[task], layer)?;
        Ok(GeneratedAdapter {
            down: self.gen_down.forward(e.clone()).reshape([self.d, self.r]),
            up: self.gen_up.forward(e).reshape([self.r, self.d]),
        })
    }

    /// `x + ReLU(x D) U` with the adapter of `task` at `layer`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a width other than `d`; as [`adapter`](Self::adapter).
    pub fn forward(&self, x: Tensor<2>, task: usize, layer: usize) -> Result<Tensor<2>> {
        check_last_dim(&x, self.d, "hypernetwork adapter input")?;
        let a = self.adapter(task, layer)?;
        Ok(x.clone() + a.forward_rows(x))
    }
}

/// A generated bottleneck adapter: the residual function `ReLU(x D) U` (gradients flow into
/// the generator).
#[derive(Clone, Debug)]
pub struct GeneratedAdapter {
    /// `[d, r]`.
    pub down: Tensor<2>,
    /// `[r, d]`.
    pub up: Tensor<2>,
}

impl ComputeModule for GeneratedAdapter {
    fn d_input(&self) -> usize {
        self.down.dims()[0]
    }

    fn d_output(&self) -> usize {
        self.up.dims()[1]
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        relu(x.matmul(self.down.clone())).matmul(self.up.clone())
    }
}
