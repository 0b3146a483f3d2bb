//! Task-level routing inside a model: routers that read a task id per sequence (a fixed
//! per-task choice, Polytropon's task × skill allocation) driven from a model's layers, which
//! see only their input rows.
//!
//! A model's layers flatten a batch of `b` sequences of `t` tokens into `b·t` rows in sequence
//! order, and a cached decoding step into `b` rows. [`TaskRouted`] turns such rows back into
//! task ids: the caller states the task of each sequence in a [`SequenceTasks`] before running
//! the model, and every layer's router repeats sequence `i`'s task over its `rows / b` rows:
//!
//! ```text
//! task(row r) = tasks[r / (rows / b)]
//! ```
//!
//! so one routing decision is made per sequence and layer (the survey's "global" routing level,
//! Pfeiffer et al. 2023, arXiv 2302.11529 §4), through the same dispatch as token-level routing.

use std::sync::{Arc, RwLock};

use burn::module::Module;

use crate::error::{Error, Result};
use crate::routing::{Router, RouterInput, Routing};

/// The task of each sequence of the batch a model runs next, shared between the caller (who
/// [`set`](Self::set)s it) and the [`TaskRouted`] routers installed in the model (cheap to
/// clone; clones share the ids).
#[derive(Clone, Debug, Default)]
pub struct SequenceTasks(Arc<RwLock<Vec<usize>>>);

impl SequenceTasks {
    /// No tasks set yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// States the task of each sequence of the next batch (one id per sequence, in batch
    /// order).
    pub fn set(&self, tasks: &[usize]) {
        // A poisoned lock only means a panic elsewhere while it was held; the ids stay valid.
        let mut ids = self.0.write().unwrap_or_else(|e| e.into_inner());
        ids.clear();
        ids.extend_from_slice(tasks);
    }

    /// The tasks set last.
    pub fn get(&self) -> Vec<usize> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// One task id per row for `rows` rows made of the set sequences in order.
    ///
    /// # Errors
    /// [`Error::Invalid`] when no tasks are set; [`Error::Shape`] when `rows` is not a multiple
    /// of the number of sequences.
    pub fn per_row(&self, rows: usize) -> Result<Vec<usize>> {
        let tasks = self.get();
        if tasks.is_empty() {
            return Err(Error::invalid(
                "task routing",
                "no sequence tasks are set; call SequenceTasks::set with one task id per \
                 sequence before running the model",
            ));
        }
        if !rows.is_multiple_of(tasks.len()) {
            return Err(Error::shape(
                "task routing: rows (a multiple of the sequences' tasks)",
                format!("a multiple of {}", tasks.len()),
                rows.to_string(),
            ));
        }
        let per = rows / tasks.len();
        Ok(tasks
            .iter()
            .flat_map(|&t| std::iter::repeat_n(t, per))
            .collect())
    }
}

/// A router over task ids (for example [`FixedRouter::per_task`](crate::FixedRouter::per_task)
/// or a [`PolytroponRouter`](super::PolytroponRouter)) that routes a layer's rows by the tasks
/// of their sequences (see the [module docs](self)). A burn module when `R` is one, so
/// [`LayerRouters`](crate::models::LayerRouters) trains it through the model.
#[derive(Module, Debug)]
pub struct TaskRouted<R> {
    /// The router reading task ids.
    pub router: R,
    /// Where the sequences' tasks come from.
    #[module(skip)]
    pub tasks: SequenceTasks,
}

impl<R> TaskRouted<R> {
    /// `router` reading the tasks in `tasks`.
    pub fn new(router: R, tasks: SequenceTasks) -> Self {
        Self { router, tasks }
    }
}

impl<R: Router> Router for TaskRouted<R> {
    fn num_modules(&self) -> usize {
        self.router.num_modules()
    }

    /// Routes [`RouterInput::Rows`] by their sequences' tasks; task ids pass through.
    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        match input {
            RouterInput::Rows(x) => {
                let ids = self.tasks.per_row(x.dims()[0])?;
                self.router.route_input(RouterInput::TaskIds {
                    ids: &ids,
                    device: &x.device(),
                })
            }
            ids @ RouterInput::TaskIds { .. } => self.router.route_input(ids),
            other => Err(other.wrong("TaskRouted", "rows or task ids")),
        }
    }

    /// The number of tasks set (`None` while none is: routing then fails, saying so): a
    /// model's layers refuse a batch of another size.
    fn sequences(&self) -> Option<usize> {
        Some(self.tasks.get().len()).filter(|&n| n > 0)
    }
}
