//! A router and a LoRA mixture joined into a [`LayerRouter`]: what a host layer
//! ([`LoraLinear::set_router`](crate::LoraLinear::set_router)) runs to route its adapters per
//! row.
//!
//! `Δ(x) = lora_mixture(x, router(x), adapters, mix)`: the router reads the layer's input
//! rows, the mixture ([`LoraMix::Output`] as PEFT, [`LoraMix::Factor`] as mttl) computes only
//! the experts each row is routed to, through the one dispatch. A [`RoutingTrace`] records
//! every decision, labelled by layer, for analysis (which expert each token went to).

use std::fmt;
use std::sync::{Arc, Mutex};

use burn::tensor::Tensor;

use super::lora_mix::{LoraMix, lora_mixture};
use crate::error::{Error, Result};
use crate::modules::lora::{LayerRouter, LoraModule};
use crate::routing::Router;
use crate::tensor_util::{to_vec_f32, to_vec_i64};

/// One recorded routing decision of one layer: for each of `rows` rows, `k` module indices
/// (into the router's adapters; `-1` for an empty slot) and their weights, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct TracedRouting {
    /// The layer's label (its module path when installed by a model).
    pub label: String,
    /// The adapters routed over, in module order (what the indices count).
    pub adapters: Vec<String>,
    /// Rows routed.
    pub rows: usize,
    /// Slots per row.
    pub k: usize,
    /// `rows × k` module indices.
    pub indices: Vec<i64>,
    /// `rows × k` weights.
    pub weights: Vec<f32>,
}

impl TracedRouting {
    /// The weight each module gets in each row, `rows × modules` row-major (slots of one
    /// module added).
    pub fn dense(&self, modules: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * modules];
        for (slot, (&i, &w)) in self.indices.iter().zip(&self.weights).enumerate() {
            if i >= 0 && (i as usize) < modules {
                out[(slot / self.k.max(1)) * modules + i as usize] += w;
            }
        }
        out
    }
}

/// A shared, thread-safe record of routing decisions (clones share one record).
#[derive(Clone, Debug, Default)]
pub struct RoutingTrace(Arc<Mutex<Vec<TracedRouting>>>);

impl RoutingTrace {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes every decision recorded so far, in order, leaving the record empty.
    pub fn take(&self) -> Vec<TracedRouting> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TracedRouting>> {
        // A panic while recording cannot leave a half-written entry: recover the data.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A router over some of a layer's LoRA adapters, with the mixture that combines them: the
/// [`LayerRouter`] a [`LoraLinear`](crate::LoraLinear) runs (see the [module docs](self)).
pub struct RoutedLora<R> {
    router: R,
    adapters: Vec<String>,
    mix: LoraMix,
    label: String,
    trace: Option<RoutingTrace>,
}

impl<R: Router> RoutedLora<R> {
    /// `router` routes over `adapters` (names, in its module order), combined by `mix`.
    ///
    /// # Errors
    /// [`Error::Shape`] when the router's module count is not the number of adapters;
    /// [`Error::Invalid`] for a repeated name.
    pub fn new(router: R, adapters: Vec<String>, mix: LoraMix) -> Result<Self> {
        if router.num_modules() != adapters.len() {
            return Err(Error::shape(
                "RoutedLora (router modules = adapters)",
                adapters.len().to_string(),
                router.num_modules().to_string(),
            ));
        }
        for (i, a) in adapters.iter().enumerate() {
            if adapters[..i].contains(a) {
                return Err(Error::invalid(
                    "RoutedLora adapters",
                    format!("`{a}` is named twice; name each adapter once"),
                ));
            }
        }
        Ok(Self {
            router,
            adapters,
            mix,
            label: String::new(),
            trace: None,
        })
    }

    /// Records every routing into `trace`, labelled `label`.
    pub fn with_trace(mut self, label: impl Into<String>, trace: RoutingTrace) -> Self {
        self.label = label.into();
        self.trace = Some(trace);
        self
    }

    /// The router.
    pub fn router(&self) -> &R {
        &self.router
    }

    /// The mixture.
    pub fn mix(&self) -> LoraMix {
        self.mix
    }
}

impl<R> fmt::Debug for RoutedLora<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutedLora")
            .field("router", &std::any::type_name::<R>())
            .field("adapters", &self.adapters)
            .field("mix", &self.mix)
            .field("label", &self.label)
            .field("traced", &self.trace.is_some())
            .finish()
    }
}

impl<R: Router + Send + Sync> LayerRouter for RoutedLora<R> {
    fn adapters(&self) -> &[String] {
        &self.adapters
    }

    fn delta(&self, x: Tensor<2>, modules: &[LoraModule]) -> Result<Tensor<2>> {
        let routing = self.router.route(&x)?;
        if let Some(trace) = &self.trace {
            trace.lock().push(TracedRouting {
                label: self.label.clone(),
                adapters: self.adapters.clone(),
                rows: routing.rows(),
                k: routing.k(),
                indices: to_vec_i64(routing.indices()),
                weights: to_vec_f32(routing.weights()),
            });
        }
        lora_mixture(x, &routing, modules, self.mix)
    }

    fn sequences(&self) -> Option<usize> {
        self.router.sequences()
    }
}
