//! Model-level routing over a library of LoRA adapters: a router in every adapted layer,
//! choosing per token from that layer's own input.
//!
//! ## Arrow (Ostapenko et al. 2024, arXiv 2405.11157)
//! For each adapted layer ℓ and the adapters `e` it holds, the prototype `v_e` is the unit top
//! right singular vector of `ΔW_e = s_e B_e A_e`, computed exactly from the factors
//! ([`arrow_prototype`](crate::library::arrow::arrow_prototype); experts of unequal ranks are
//! fine, which PEFT's Arrow refuses). Per token with layer input `x`:
//!
//! ```text
//! logit_e = |⟨v_e, x⟩|,   S = top-k of the logits,   w_e = softmax_{e ∈ S}(logit_e / τ)
//! y = W x + b + Σ_{e ∈ S} w_e s_e B_e A_e x            (LoraMix::Output, PEFT)
//! y = W x + b + (Σ_{e ∈ S} w_e s_e B_e)(Σ_{e ∈ S} w_e A_e) x   (LoraMix::Factor, mttl)
//! ```
//!
//! The routing is made again at every layer and every token, prefill and decoding steps
//! alike, and only the selected experts compute (the one dispatch). A layer holding fewer
//! than `k` of the experts routes over those it holds, top-`min(k, held)`.
//!
//! ## GenKnowSub (Bhardwaj et al. 2025)
//! [`gen_know_sub`] subtracts the mean of "general" adapters from each task adapter before
//! routing, in every layer: in factor space as PEFT's `ArrowConfig(use_gks=True)` does
//! (`A − mean A_g`, `B − mean B_g`), or exactly in delta space (`ΔW − mean ΔW_g`, rank
//! `r + Σ r_g`).

use std::sync::Arc;

use burn::module::Module;

use super::LinearLayers;
use crate::aggregate::{LoraMix, RoutedLora, RoutingTrace};
use crate::error::{Error, Result};
use crate::library::{LoraFactors, MergeSpace};
use crate::modules::lora::{LayerRouter, LoraLinear, SharedLayerRouter};
use crate::routers::ArrowRouter;
use crate::routing::Router;

/// Arrow's settings at model level (PEFT's `ArrowConfig` defaults: top 3, temperature 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArrowOptions {
    /// Experts kept per token (`top_k` in PEFT); at most the number a layer holds.
    pub top_k: usize,
    /// Softmax temperature over the kept logits (`router_temperature` in PEFT).
    pub temperature: f64,
    /// How the kept experts combine.
    pub mix: LoraMix,
}

impl Default for ArrowOptions {
    fn default() -> Self {
        Self {
            top_k: 3,
            temperature: 1.0,
            mix: LoraMix::Output,
        }
    }
}

/// Installs the router `build` returns for each linear layer (`None`: that layer keeps its
/// plain forward), all or nothing: every router is built before any is installed. Returns
/// the paths that got a router.
///
/// # Errors
/// The first error of `build` or of [`LoraLinear::set_router`], naming the layer; nothing
/// changes on error.
pub fn install_routers(
    model: &mut dyn LinearLayers,
    build: &mut dyn FnMut(&str, &LoraLinear) -> Result<Option<SharedLayerRouter>>,
) -> Result<Vec<String>> {
    let mut built = Vec::new();
    for (path, layer) in model.linear_layers() {
        if let Some(r) = build(&path, layer).map_err(|e| in_layer(&path, e))? {
            // Checked against the layer now, so that installing cannot fail half-way.
            layer
                .check_router(r.as_ref())
                .map_err(|e| in_layer(&path, e))?;
            built.push((path, r));
        }
    }
    let paths: Vec<String> = built.iter().map(|(p, _)| p.clone()).collect();
    let mut built: std::collections::HashMap<String, SharedLayerRouter> =
        built.into_iter().collect();
    for (path, layer) in model.linear_layers_mut() {
        if let Some(r) = built.remove(&path) {
            layer.set_router(Some(r)).map_err(|e| in_layer(&path, e))?;
        }
    }
    Ok(paths)
}

/// Removes every layer's router: the model computes its active adapters again.
pub fn remove_routers(model: &mut dyn LinearLayers) {
    for (_, layer) in model.linear_layers_mut() {
        // Removing a router cannot fail.
        let _ = layer.set_router(None);
    }
}

/// Routes `adapters` by Arrow in every layer that holds any of them (see the
/// [module docs](self)), recording every decision in `trace` when given (labelled by layer
/// path). Returns the routed paths. Routers replace the active adapters until
/// [`remove_routers`].
///
/// # Errors
/// [`Error::UnknownAdapter`] for a name no layer holds; [`Error::Invalid`] for no adapters,
/// a repeated name, `top_k` of 0 or a temperature that is not positive and finite, or IA3
/// adapters; [`Error::AlreadyMerged`] for a merged adapter. Nothing changes on error.
pub fn route_arrow(
    model: &mut dyn LinearLayers,
    adapters: &[&str],
    options: &ArrowOptions,
    trace: Option<&RoutingTrace>,
) -> Result<Vec<String>> {
    if adapters.is_empty() {
        return Err(Error::invalid("Arrow routing", "no adapters were given"));
    }
    model.check_adapters(adapters)?;
    if options.top_k == 0 {
        return Err(Error::invalid(
            "Arrow top_k",
            "0 keeps no expert; give at least 1",
        ));
    }
    install_routers(model, &mut |path, layer| {
        let held: Vec<String> = adapters
            .iter()
            .filter(|a| layer.names().iter().any(|n| n == *a))
            .map(|a| a.to_string())
            .collect();
        if held.is_empty() {
            return Ok(None);
        }
        let factors = held
            .iter()
            .map(|n| layer.adapter(n).map(LoraFactors::from_adapter))
            .collect::<Result<Vec<_>>>()?;
        if options.mix == LoraMix::Factor && factors.iter().any(|f| f.rank() != factors[0].rank()) {
            return Err(Error::invalid(
                "LoraMix::Factor",
                "factor mixing needs adapters of one rank; use LoraMix::Output",
            ));
        }
        let refs: Vec<&LoraFactors> = factors.iter().collect();
        let k = options.top_k.min(held.len());
        let device = layer.base.weight.device();
        let router = ArrowRouter::from_experts(&refs, k, options.temperature, &device)?;
        let mut routed = RoutedLora::new(router, held, options.mix)?;
        if let Some(t) = trace {
            routed = routed.with_trace(path, t.clone());
        }
        Ok(Some(Arc::new(routed) as Arc<dyn LayerRouter>))
    })
}

/// One router per adapted layer, held as a burn module so that an optimiser trains them
/// (X-LoRA-style classifiers, Polytropon, L2R's routers): the learned counterpart of
/// [`route_arrow`]. [`install`](Self::install) puts a clone of each (sharing its parameters)
/// into its layer, so a forward pass of the model routes through them and its loss reaches
/// their parameters.
#[derive(Module, Debug)]
pub struct LayerRouters<R: Module> {
    /// The routers, one per routed layer, in module order.
    pub layers: Vec<R>,
    /// The routed layers' paths.
    #[module(skip)]
    pub paths: Vec<String>,
    /// The adapters every router chooses among, in its module order.
    #[module(skip)]
    pub adapters: Vec<String>,
    /// How the chosen adapters combine.
    #[module(skip)]
    pub mix: LoraMix,
}

impl<R> LayerRouters<R>
where
    R: Module + Router + Send + Sync + 'static,
{
    /// A router for every layer of `model` that holds all of `adapters`, made by `build`
    /// (given the layer's path and layer; it must route over `adapters.len()` modules).
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`]; [`Error::Invalid`] for no adapters or when no layer holds
    /// them all; the errors of `build`.
    pub fn new(
        model: &dyn LinearLayers,
        adapters: &[&str],
        mix: LoraMix,
        build: &mut dyn FnMut(&str, &LoraLinear) -> Result<R>,
    ) -> Result<Self> {
        if adapters.is_empty() {
            return Err(Error::invalid("layer routers", "no adapters were given"));
        }
        model.check_adapters(adapters)?;
        let (mut layers, mut paths) = (Vec::new(), Vec::new());
        for (path, layer) in model.linear_layers() {
            if adapters
                .iter()
                .all(|a| layer.names().iter().any(|n| n == a))
            {
                layers.push(build(&path, layer).map_err(|e| in_layer(&path, e))?);
                paths.push(path);
            }
        }
        if layers.is_empty() {
            return Err(Error::invalid(
                "layer routers",
                "no linear layer holds all the adapters",
            ));
        }
        Ok(Self {
            layers,
            paths,
            adapters: adapters.iter().map(|a| a.to_string()).collect(),
            mix,
        })
    }

    /// Installs a clone of each router in its layer (replacing any router there).
    ///
    /// # Errors
    /// As [`install_routers`]; [`Error::Shape`] for a router whose module count is not the
    /// number of adapters.
    pub fn install(&self, model: &mut dyn LinearLayers) -> Result<Vec<String>> {
        install_routers(model, &mut |path, _| {
            let Some(i) = self.paths.iter().position(|p| p == path) else {
                return Ok(None);
            };
            let routed = RoutedLora::new(self.layers[i].clone(), self.adapters.clone(), self.mix)?;
            Ok(Some(Arc::new(routed) as SharedLayerRouter))
        })
    }
}

/// GenKnowSub at model level (see the [module docs](self)): in every layer that holds a task
/// adapter of `tasks`, its factors become the task's minus the mean of the `general`
/// adapters' (all of which the layer must hold), by [`library::gen_know_sub`](crate::library::gen_know_sub).
/// The general adapters stay as they are (deactivate or delete them as needed). Returns the
/// changed layer paths.
///
/// # Errors
/// [`Error::UnknownAdapter`]; [`Error::Invalid`] for no tasks or no general adapters, a name
/// in both lists, a layer holding a task adapter but not every general one (naming it), or
/// (factor space) ranks or scalings that differ; [`Error::AlreadyMerged`] for a merged
/// adapter. Nothing changes on error.
pub fn gen_know_sub(
    model: &mut dyn LinearLayers,
    tasks: &[&str],
    general: &[&str],
    space: MergeSpace,
) -> Result<Vec<String>> {
    if tasks.is_empty() || general.is_empty() {
        return Err(Error::invalid(
            "GenKnowSub",
            "give at least one task adapter and one general adapter",
        ));
    }
    if let Some(both) = tasks.iter().find(|t| general.contains(t)) {
        return Err(Error::invalid(
            "GenKnowSub",
            format!("`{both}` is both a task and a general adapter"),
        ));
    }
    model.check_adapters(tasks)?;
    model.check_adapters(general)?;
    let mut updates = Vec::new();
    for (path, layer) in model.linear_layers() {
        let held = |n: &&str| layer.names().iter().any(|h| h == n);
        if !tasks.iter().any(held) {
            continue;
        }
        if let Some(missing) = general.iter().find(|g| !held(g)) {
            return Err(Error::invalid(
                format!("GenKnowSub: layer `{path}`"),
                format!("it holds a task adapter but not the general adapter `{missing}`"),
            ));
        }
        let gen_factors = general
            .iter()
            .map(|g| layer.adapter(g).map(LoraFactors::from_adapter))
            .collect::<Result<Vec<_>>>()?;
        let gen_refs: Vec<&LoraFactors> = gen_factors.iter().collect();
        for t in tasks.iter().filter(|t| held(t)) {
            if layer.is_merged(t)? {
                return Err(Error::AlreadyMerged {
                    name: t.to_string(),
                    operation: "GenKnowSub",
                });
            }
            let task = LoraFactors::from_adapter(layer.adapter(t)?);
            let f = crate::library::gen_know_sub(&task, &gen_refs, space)
                .map_err(|e| in_layer(&path, e))?;
            let adapter = f.to_adapter(&layer.base.weight.device())?;
            updates.push((path.clone(), t.to_string(), adapter));
        }
    }
    let mut paths: Vec<String> = Vec::new();
    let mut layers: std::collections::HashMap<String, &mut LoraLinear> =
        model.linear_layers_mut().into_iter().collect();
    for (path, name, adapter) in updates {
        if let Some(layer) = layers.get_mut(&path) {
            layer.replace_adapter(&name, adapter)?;
            if !paths.contains(&path) {
                paths.push(path);
            }
        }
    }
    Ok(paths)
}

/// `e` with the layer's path in its message where it has room for one.
fn in_layer(path: &str, e: Error) -> Error {
    match e {
        Error::Invalid { what, why } => Error::Invalid {
            what: format!("layer `{path}`: {what}"),
            why,
        },
        e => e,
    }
}
