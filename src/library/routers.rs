//! Learned routers over a library of LoRA experts. Each produces a [`Routing`] over the
//! library's experts, and the experts are combined by [`lora_mixture`](super::lora_mixture)
//! (or any [`Aggregator`](crate::Aggregator)), like every other router in the crate.
//!
//! - [`PolytroponRouter`] (Ponti et al. 2023, "Combining Parameter-efficient Modules for
//!   Task-level Generalisation", arXiv 2202.13914): a task × skill allocation matrix of logits
//!   `Z`. In training each task's allocation is a relaxed Bernoulli sample
//!   `σ((Z_ts + log u − log(1−u)) / τ)`, `u ~ U(0,1)`; in evaluation `σ(Z_ts)`. Weights are
//!   normalised over skills and the skills' factors are mixed ([`LoraMix::Factor`](super::LoraMix)).
//! - [`XLoraRouter`]: an X-LoRA-style (Buehler & Buehler 2024, arXiv 2402.07148) per-token
//!   classifier over the experts: a small MLP on the layer's input, softmax (optionally kept to
//!   the top `k` and renormalised), used as output-mixture weights. X-LoRA itself computes
//!   the scalings of every layer from a first, adapter-free pass of the whole model; this
//!   router is the layer-local form of the same classifier.
//! - [`AdapterFusion`] (Pfeiffer et al. 2021, arXiv 2005.00247): attention over the adapters'
//!   outputs, the query from the layer input, keys and values from each adapter's output.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{relu, sigmoid, softmax};
use burn::tensor::{Device, Distribution, Tensor};

use crate::error::{Error, Result};
use crate::routing::{Router, Routing};
use crate::tensor_util::{ensure_finite, int_tensor};

/// Polytropon's task × skill allocation (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct PolytroponRouter {
    /// Allocation logits `Z`, `[tasks, skills]`.
    pub logits: Param<Tensor<2>>,
    /// Relaxed-Bernoulli temperature.
    #[module(skip)]
    pub temperature: f64,
}

impl PolytroponRouter {
    /// `tasks × skills` logits initialised uniformly in `[-1e-3, 1e-3]` (as in mttl), so every
    /// skill starts at allocation ½.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero tasks or skills or a temperature that is not positive.
    pub fn new(tasks: usize, skills: usize, temperature: f64, device: &Device) -> Result<Self> {
        if tasks == 0 || skills == 0 {
            return Err(Error::invalid(
                "Polytropon allocation",
                format!("{tasks} tasks × {skills} skills; both must be at least 1"),
            ));
        }
        super::check_temperature("Polytropon temperature", temperature)?;
        let z = Tensor::<2>::random([tasks, skills], Distribution::Uniform(-1e-3, 1e-3), device);
        Ok(Self {
            logits: Param::from_tensor(z),
            temperature,
        })
    }

    /// Number of skills.
    pub fn skills(&self) -> usize {
        self.logits.shape().dims::<2>()[1]
    }

    /// Number of tasks.
    pub fn tasks(&self) -> usize {
        self.logits.shape().dims::<2>()[0]
    }

    /// The dense routing of rows whose tasks are `task_ids`: relaxed-Bernoulli samples when
    /// `training`, `σ(Z)` otherwise, normalised over skills.
    ///
    /// # Errors
    /// [`Error::Routing`] for a task id out of range or non-finite logits.
    pub fn route_tasks(&self, task_ids: &[usize], training: bool) -> Result<Routing> {
        let tasks = self.tasks();
        if let Some(t) = task_ids.iter().find(|&&t| t >= tasks) {
            return Err(Error::Routing(format!(
                "task id {t} is outside 0..{tasks}; the allocation matrix has {tasks} tasks"
            )));
        }
        let z = self.logits.val();
        ensure_finite(&z, "Polytropon logits")?;
        let device = z.device();
        let ids: Vec<i64> = task_ids.iter().map(|&t| t as i64).collect();
        let z = z.select(0, int_tensor(&ids, &device));
        let w = if training {
            let u = z.random_like(Distribution::Uniform(1e-6, 1.0 - 1e-6));
            let noise = u.clone().log() - u.neg().add_scalar(1.0).log();
            sigmoid((z + noise).div_scalar(self.temperature))
        } else {
            sigmoid(z)
        };
        let w = w.clone() / w.sum_dim(1).add_scalar(1e-12);
        Routing::from_dense(w)
    }
}

/// An X-LoRA-style per-token classifier over `experts` (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct XLoraRouter {
    /// Hidden layer of the classifier.
    pub hidden: Linear,
    /// Output layer: one logit per expert.
    pub out: Linear,
    /// Keep only the top `k` weights per row (renormalised); `None` keeps all.
    #[module(skip)]
    pub top_k: Option<usize>,
    /// Softmax temperature.
    #[module(skip)]
    pub temperature: f64,
}

impl XLoraRouter {
    /// A classifier `d_in → hidden → experts` (ReLU).
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero widths, `top_k` of 0 or above `experts`, or a temperature
    /// that is not positive.
    pub fn new(
        d_in: usize,
        hidden: usize,
        experts: usize,
        top_k: Option<usize>,
        temperature: f64,
        device: &Device,
    ) -> Result<Self> {
        if d_in == 0 || hidden == 0 || experts == 0 {
            return Err(Error::invalid(
                "X-LoRA classifier",
                format!("widths {d_in} → {hidden} → {experts} must all be at least 1"),
            ));
        }
        if let Some(k) = top_k
            && (k == 0 || k > experts)
        {
            return Err(Error::invalid(
                "X-LoRA top_k",
                format!("{k} is outside 1..={experts} (the number of experts)"),
            ));
        }
        super::check_temperature("X-LoRA temperature", temperature)?;
        Ok(Self {
            hidden: LinearConfig::new(d_in, hidden).init(device),
            out: LinearConfig::new(hidden, experts).init(device),
            top_k,
            temperature,
        })
    }
}

impl XLoraRouter {
    /// The classifier's logits (before temperature and softmax), `[rows, experts]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for the wrong input width.
    pub fn logits(&self, x: &Tensor<2>) -> Result<Tensor<2>> {
        let d_in = self.hidden.weight.shape().dims::<2>()[0];
        if x.dims()[1] != d_in {
            return Err(Error::shape(
                "XLoraRouter input width",
                d_in.to_string(),
                x.dims()[1].to_string(),
            ));
        }
        Ok(self.out.forward(relu(self.hidden.forward(x.clone()))))
    }
}

impl Router for XLoraRouter {
    fn num_modules(&self) -> usize {
        self.out.weight.shape().dims::<2>()[1]
    }

    fn route(&self, x: &Tensor<2>) -> Result<Routing> {
        let logits = self.logits(x)?.div_scalar(self.temperature);
        ensure_finite(&logits, "X-LoRA logits")?;
        match self.top_k {
            None => Routing::from_dense(softmax(logits, 1)),
            Some(k) => {
                let (vals, idx) = logits.topk_with_indices(k, 1);
                Routing::new(idx, softmax(vals, 1), self.num_modules())
            }
        }
    }
}

/// AdapterFusion: attention over adapter outputs (see the [module docs](self)).
///
/// For a row with input `x` and adapter outputs `o_1 … o_E` (each `[d_out]`):
/// `q = x W_q`, `k_e = o_e W_k`, `a = softmax_e(q·k_e / T)`, output `Σ_e a_e (o_e W_v)`.
/// `W_v` starts at the identity (as in the paper) and `W_q`, `W_k` at small random values,
/// so a fresh fusion averages the adapters.
#[derive(Module, Debug)]
pub struct AdapterFusion {
    /// Query projection `d_in → d_attn`.
    pub query: Linear,
    /// Key projection `d_out → d_attn`.
    pub key: Linear,
    /// Value projection `d_out → d_out` (starts at the identity).
    pub value: Linear,
    /// Softmax temperature.
    #[module(skip)]
    pub temperature: f64,
}

impl AdapterFusion {
    /// A fusion layer for inputs of width `d_in` and adapter outputs of width `d_out`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero widths or a temperature that is not positive.
    pub fn new(
        d_in: usize,
        d_out: usize,
        d_attn: usize,
        temperature: f64,
        device: &Device,
    ) -> Result<Self> {
        if d_in == 0 || d_out == 0 || d_attn == 0 {
            return Err(Error::invalid(
                "AdapterFusion widths",
                "d_in, d_out and d_attn must be at least 1",
            ));
        }
        super::check_temperature("AdapterFusion temperature", temperature)?;
        let mut value = LinearConfig::new(d_out, d_out)
            .with_bias(false)
            .init(device);
        value.weight = Param::from_tensor(Tensor::<2>::eye(d_out, device));
        Ok(Self {
            query: LinearConfig::new(d_in, d_attn).init(device),
            key: LinearConfig::new(d_out, d_attn).init(device),
            value,
            temperature,
        })
    }

    /// Fuses `outputs: [rows, E, d_out]` (e.g. [`DispatchPlan::to_slots`](crate::routing::DispatchPlan::to_slots)
    /// of a dense routing) for inputs `x: [rows, d_in]`; returns the fused `[rows, d_out]` and
    /// the attention `[rows, E]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for mismatched rows or widths.
    pub fn fuse(&self, x: Tensor<2>, outputs: Tensor<3>) -> Result<(Tensor<2>, Tensor<2>)> {
        let [rows, d_in] = x.dims();
        let [orows, e, d_out] = outputs.dims();
        let q_in = self.query.weight.shape().dims::<2>()[0];
        let v_in = self.value.weight.shape().dims::<2>()[0];
        if rows != orows || d_in != q_in || d_out != v_in {
            return Err(Error::shape(
                "AdapterFusion::fuse",
                format!("x: [rows, {q_in}], outputs: [rows, E, {v_in}]"),
                format!("x: {:?}, outputs: {:?}", x.dims(), outputs.dims()),
            ));
        }
        let q = self.query.forward(x); // [rows, d_attn]
        let k = self.key.forward(outputs.clone()); // [rows, E, d_attn]
        let scores = k.matmul(q.unsqueeze_dim::<3>(2)).reshape([rows, e]);
        let attn = softmax(scores.div_scalar(self.temperature), 1);
        let v = self.value.forward(outputs); // [rows, E, d_out]
        let fused = attn
            .clone()
            .unsqueeze_dim::<3>(1)
            .matmul(v)
            .reshape([rows, d_out]);
        Ok((fused, attn))
    }
}
