//! Polytropon (Ponti et al. 2023, "Combining Parameter-efficient Modules for Task-level
//! Generalisation", arXiv 2202.13914): a task × skill allocation matrix of logits `Z`. In
//! training each task's allocation is a relaxed Bernoulli sample
//! `σ((Z_ts + log u − log(1−u)) / τ)`, `u ~ U(0,1)`; in evaluation `σ(Z_ts)`. Weights are
//! normalised over skills, and the skills' factors are mixed
//! ([`LoraMix::Factor`](crate::aggregate::LoraMix)).

use burn::module::{Module, Param};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Distribution, Tensor};

use crate::error::{Error, Result};
use crate::routing::{Router, RouterInput, Routing};
use crate::tensor_util::{ensure_finite, int_tensor};

/// Configuration of a [`PolytroponRouter`]: the allocation matrix's size and temperature.
#[derive(burn::config::Config, Debug)]
pub struct PolytroponRouterConfig {
    /// Number of tasks (rows of `Z`).
    pub tasks: usize,
    /// Number of skills (columns of `Z`).
    pub skills: usize,
    /// Relaxed-Bernoulli temperature.
    #[config(default = 1.0)]
    pub temperature: f64,
}

impl PolytroponRouterConfig {
    /// `tasks × skills` logits initialised uniformly in `[-1e-3, 1e-3]` (as in mttl), so every
    /// skill starts at allocation ½.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero tasks or skills or a temperature that is not positive.
    pub fn init(&self, device: &Device) -> Result<PolytroponRouter> {
        let (tasks, skills, temperature) = (self.tasks, self.skills, self.temperature);

        if tasks == 0 || skills == 0 {
            return Err(Error::invalid(
                "Polytropon allocation",
                format!("{tasks} tasks × {skills} skills; both must be at least 1"),
            ));
        }
        super::check_temperature("Polytropon temperature", temperature)?;
        let z = Tensor::<2>::random([tasks, skills], Distribution::Uniform(-1e-3, 1e-3), device);
        Ok(PolytroponRouter {
            logits: Param::from_tensor(z),
            temperature,
        })
    }
}

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
    /// [`Error::IdOutOfRange`] for a task id out of range; [`Error::NonFinite`] for
    /// non-finite logits.
    pub fn route_tasks(&self, task_ids: &[usize], training: bool) -> Result<Routing> {
        let tasks = self.tasks();
        if let Some(&t) = task_ids.iter().find(|&&t| t >= tasks) {
            return Err(Error::IdOutOfRange {
                what: "task id",
                within: "the allocation matrix's tasks",
                id: t as i64,
                bound: tasks,
            });
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

impl Router for PolytroponRouter {
    fn num_modules(&self) -> usize {
        self.skills()
    }

    /// Routes [`RouterInput::TaskIds`] in evaluation mode (`σ(Z)`, normalised); training
    /// samples come from [`route_tasks`](PolytroponRouter::route_tasks) with `training`.
    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        match input {
            RouterInput::TaskIds { ids, .. } => self.route_tasks(ids, false),
            other => Err(other.wrong("PolytroponRouter", "task ids")),
        }
    }
}
