//! Routing inside a host layer: a [`LoraLinear`] whose adapters are chosen per row, from the
//! layer's own input, by a router installed in the layer.
//!
//! With a [`LayerRouter`] installed, the layer computes
//!
//! ```text
//! y = x W + b + Δ(x),    Δ(x) = the router's mixture of the adapters it routes over
//! ```
//!
//! and its active flags no longer apply (the router picks). Every caller of the layer's
//! [`forward`](LoraLinear::forward), a model's prefill and each of its decoding steps
//! included, then routes token by token at this layer: Arrow's per-token, per-layer routing
//! (Ostapenko et al. 2024, arXiv 2405.11157) is one router per adapted layer. The layer knows
//! only the contract; the routers and mixtures that fill it live in later layers of the crate
//! ([`RoutedLora`](crate::aggregate::RoutedLora)).

use std::fmt::Debug;
use std::sync::Arc;

use burn::tensor::Tensor;

use super::{LoraLinear, LoraModule};
use crate::error::{Error, Result};

/// What a host layer's router provides: the names of the adapters it routes over, and their
/// routed contribution for a batch of rows.
pub trait LayerRouter: Debug + Send + Sync {
    /// The adapters routed over, by name, in the router's module order.
    fn adapters(&self) -> &[String];

    /// The routed adapters' contribution `Δ(x)` for `x: [rows, d_in]`, `[rows, d_out]`;
    /// `modules[e]` is the layer's adapter named `adapters()[e]`.
    ///
    /// # Errors
    /// The router's errors (non-finite logits, widths).
    fn delta(&self, x: Tensor<2>, modules: &[LoraModule]) -> Result<Tensor<2>>;

    /// The number of sequences a batch must hold when the router routes each sequence by
    /// something stated about it ([`Router::sequences`](crate::Router::sequences)); the layer
    /// checks it against the leading dimension of a `[batch, seq, d_in]` input. `None` (the
    /// default): any batch.
    fn sequences(&self) -> Option<usize> {
        None
    }
}

/// A router shared by the layers that hold it (cheap to clone).
pub type SharedLayerRouter = Arc<dyn LayerRouter>;

impl LoraLinear {
    /// Installs `router` (or removes it, with `None`): from then on the layer's
    /// [`forward`](Self::forward) adds the router's mixture of its adapters to the base output
    /// instead of the active adapters: `y = x W + b + Δ(x)` with `Δ` the router's mixture.
    ///
    /// The router is not one of the layer's parameters: optimisers do not see it, and moving
    /// the layer ([`Module::valid`](burn::module::Module::valid),
    /// [`Module::to_device`](burn::module::Module::to_device)) keeps it as it is. Train a
    /// learned router as a module of its own and install clones of it (they share its
    /// parameters); install routers on the device the model runs on.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a router over no adapters, or a layer holding IA3 adapters;
    /// [`Error::UnknownAdapter`] for a name the layer does not hold; [`Error::AlreadyMerged`]
    /// for a merged adapter. Nothing changes on error.
    pub fn set_router(&mut self, router: Option<SharedLayerRouter>) -> Result<()> {
        if let Some(r) = &router {
            self.check_router(r.as_ref())?;
        }
        self.router = router;
        Ok(())
    }

    /// Whether [`set_router`](Self::set_router) would accept `router`.
    ///
    /// # Errors
    /// As [`set_router`](Self::set_router).
    pub fn check_router(&self, r: &dyn LayerRouter) -> Result<()> {
        {
            if r.adapters().is_empty() {
                return Err(Error::invalid(
                    "layer router",
                    "it routes over no adapters; give it at least one of the layer's adapters",
                ));
            }
            if !self.ia3.is_empty() {
                return Err(Error::invalid(
                    "layer router",
                    "the layer holds IA3 adapters; routers mix LoRA adapters",
                ));
            }
            self.routed_modules(r)?;
        }
        Ok(())
    }

    /// The installed router, if any.
    pub fn router(&self) -> Option<&SharedLayerRouter> {
        self.router.as_ref()
    }

    /// The adapters `router` routes over, in its order, after checking each is held and
    /// unmerged.
    fn routed_modules(&self, router: &dyn LayerRouter) -> Result<Vec<LoraModule>> {
        router
            .adapters()
            .iter()
            .map(|name| {
                let i = self.slots.index(name)?;
                if self.slots.merged[i] {
                    return Err(Error::AlreadyMerged {
                        name: name.clone(),
                        operation: "routing over it",
                    });
                }
                Ok(self.adapters[i].clone())
            })
            .collect()
    }

    /// `base(x) + Δ(x)` through the installed router, for `x: [..., d_in]`.
    pub(super) fn routed_forward<const D: usize>(
        &self,
        router: &dyn LayerRouter,
        x: Tensor<D>,
    ) -> Result<Tensor<D>> {
        let modules = self.routed_modules(router)?;
        let dims = x.dims();
        if let Some(n) = router.sequences().filter(|&n| D >= 3 && n != dims[0]) {
            return Err(Error::shape(
                "routed layer input (one stated task per sequence)",
                format!("{n} sequences"),
                format!("{} sequences", dims[0]),
            ));
        }
        let rows: usize = dims[..D - 1].iter().product();
        let x2 = x.reshape([rows, self.d_in()]);
        let delta = router.delta(x2.clone(), &modules)?;
        let y = self.base_forward(x2) + delta;
        let mut out = dims;
        out[D - 1] = self.d_out();
        Ok(y.reshape(out))
    }
}
