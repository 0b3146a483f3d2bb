//! LoRA: low-rank adaptation of a frozen linear layer (Hu et al. 2021, arXiv 2106.09685).
//!
//! A LoRA adapter of rank `r` on a frozen weight `W: [d_in, d_out]` (burn's layout; PyTorch
//! and PEFT store `[d_out, d_in]`) adds a trainable low-rank path:
//!
//! ```text
//! y = x W + b + s · (dropout(x) A) B        A: [d_in, r], B: [r, d_out]
//! s = alpha / r            (LoRA)
//! s = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732)
//! ```
//!
//! The product is evaluated right to left, so the `d_in × d_out` delta is never formed in the
//! forward pass: the extra cost is `2·r·(d_in + d_out)` FLOPs per row. It is formed only when an
//! adapter is [merged](LoraLinear::merge) into the base weight (`W ← W + s·A B`), which makes
//! inference cost exactly the base layer's; [unmerge](LoraLinear::unmerge) subtracts it again.
//!
//! Initialisation follows PEFT: `A` Kaiming-uniform (bound `1/sqrt(d_in)`, PyTorch's
//! `kaiming_uniform_(a=sqrt(5))`), `B = 0`, so a new adapter leaves the model unchanged; the
//! Gaussian option draws `A ~ N(0, 1/r)`.
//!
//! # Relation to burn's own LoRA
//! burn-core 0.22's `Module::apply_lora` reparameterises every 2-D weight with one adapter and
//! materialises `W + s·A B` on every forward, in training too: its backward then forms a full
//! `d_in × d_out` weight gradient before reaching the factors. It has no rsLoRA, dropout, named
//! adapters, unmerge or PEFT files. modula's [`LoraLinear`] wraps a burn `Linear` instead:
//! several named adapters, any subset active, merged or not. While adapters train, the delta
//! is applied as two thin matmuls, so backward costs `O(rows·r·(d_in + d_out))` beyond the
//! base. In inference, [`LoraForward::Auto`] forms the fused weight transiently only when the
//! batch is large enough that doing so is cheaper. Both crates' adapters are plain factor
//! pairs: burn's `LoraAdapter { a: [d_in, r], b: [r, d_out], scale }` holds the same numbers as
//! modula's [`LoraModule`] (`scale` = [`LoraModule::scaling`]).

//!
//! # Files
//! - `module.rs`: [`LoraConfig`], [`LoraInit`], [`LoraModule`] (one adapter) and the output
//!   mixture every mixed-adapter path shares;
//! - `slots.rs`: [`AdapterSlots`] and the adapter-management API of the host layers;
//! - this file: [`LoraLinear`] and [`LoraForward`];
//! - `mixed.rs`: mixed-adapter batches on [`LoraLinear`];
//! - `routed.rs`: a router installed in the layer ([`LayerRouter`]), choosing adapters per row;
//! - `ia3.rs`: (IA)³ adapters on [`LoraLinear`] (a layer holds LoRA or IA3 adapters);
//! - `embedding.rs`: [`LoraEmbedding`].

mod embedding;
mod ia3;
mod mixed;
pub(crate) mod module;
mod routed;
mod slots;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;

use super::ia3::Ia3Vector;
use super::{ComputeModule, check_last_dim};
use crate::error::{Error, Result};
use slots::{adapter_host_api, fold_delta};

pub use embedding::LoraEmbedding;
pub use module::{LoraConfig, LoraInit, LoraModule, lora_scaling};
pub use routed::{LayerRouter, SharedLayerRouter};
pub use slots::AdapterSlots;

/// How [`LoraLinear`] applies its unmerged active adapters in the forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LoraForward {
    /// Pick per call (the default): [`FusedWeight`](Self::FusedWeight) in inference when it
    /// moves less data and does fewer FLOPs than [`Thin`](Self::Thin), that is when
    /// `rows · (d_in + d_out) ≥ d_in · d_out`; [`Thin`](Self::Thin) otherwise, and always while
    /// any adapter trains.
    #[default]
    Auto,
    /// `x W + b + Σ s·(x A) B`: never forms `A B`. Costs `2·rows·r·(d_in + d_out)` FLOPs and
    /// two `[rows, d_out]` passes over memory per adapter.
    Thin,
    /// `x (W + Σ s·A B) + b` with a transient `[d_in, d_out]` weight, built and dropped within
    /// the call (never stored): `2·d_in·d_out·r` FLOPs per adapter, independent of the batch.
    /// Inference only: in training [`Auto`](Self::Auto) never picks it, and forcing it still
    /// falls back to [`Thin`](Self::Thin) so that backward never forms a `d_in × d_out`
    /// gradient.
    FusedWeight,
}

/// A frozen burn [`Linear`] with any number of named LoRA adapters.
///
/// `y = x W + b + Σ_{a active, not merged} s_a · (x A_a) B_a`.
///
/// For large inference batches the same sum is computed as `x (W + Σ s_a A_a B_a) + b` (see
/// [`LoraForward`]); both forms agree to f32 rounding.
///
/// The base parameters never receive gradients; each adapter's factors do. Adapters can be
/// activated in any combination, merged into the base weight for inference and unmerged again.
///
/// The layer can hold named (IA)³ vectors instead of LoRA adapters, managed the same way
/// ([`insert_ia3`](Self::insert_ia3) and the methods beside it); never both kinds at once.
///
/// A [`LayerRouter`] installed with [`set_router`](Self::set_router) replaces the active
/// adapters in [`forward`](Self::forward): each row gets the router's mixture of the
/// adapters. As a [`ComputeModule`] inside another dispatch the layer computes its active
/// adapters.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen host layer (`weight: [d_in, d_out]`).
    pub base: Linear,
    /// The adapters, in insertion order (their names are in [`names`](Self::names)).
    pub adapters: Vec<LoraModule>,
    /// The IA3 adapters, in insertion order (names in [`ia3_names`](Self::ia3_names)).
    pub ia3: Vec<Ia3Vector>,
    #[module(skip)]
    slots: AdapterSlots,
    #[module(skip)]
    ia3_slots: AdapterSlots,
    #[module(skip)]
    mode: LoraForward,
    #[module(skip)]
    router: Option<SharedLayerRouter>,
}

adapter_host_api!(LoraLinear);

impl LoraLinear {
    /// Wraps `base`, freezing its parameters. The layer starts with no adapters.
    pub fn new(base: Linear) -> Self {
        Self {
            base: base.no_grad(),
            adapters: Vec::new(),
            ia3: Vec::new(),
            slots: AdapterSlots::default(),
            ia3_slots: AdapterSlots::default(),
            mode: LoraForward::Auto,
            router: None,
        }
    }

    /// Chooses how unmerged adapters are applied (default [`LoraForward::Auto`]).
    pub fn set_forward_mode(&mut self, mode: LoraForward) {
        self.mode = mode;
    }

    /// The current forward mode.
    pub fn forward_mode(&self) -> LoraForward {
        self.mode
    }

    fn host_dims(&self) -> (usize, usize) {
        (self.d_in(), self.d_out())
    }

    /// A LoRA adapter `name` may join the layer: it holds no IA3 adapters.
    fn accepts_lora(&self, name: &str) -> Result<()> {
        if self.ia3.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(
            format!("LoRA adapter `{name}`"),
            format!(
                "the layer holds IA3 adapters ({}); a layer holds one kind of adapter, as a PEFT model does",
                self.ia3_slots.names().join(", ")
            ),
        ))
    }

    /// Input width of the host layer.
    pub fn d_in(&self) -> usize {
        self.base.weight.shape().dims::<2>()[0]
    }

    /// Output width of the host layer.
    pub fn d_out(&self) -> usize {
        self.base.weight.shape().dims::<2>()[1]
    }

    /// Adds a new adapter built from `config` under `name`, active.
    ///
    /// # Errors
    /// [`Error::DuplicateAdapter`] if the name exists; configuration errors from
    /// [`LoraConfig::init`].
    pub fn add_adapter(&mut self, name: &str, config: &LoraConfig) -> Result<()> {
        let device = self.base.weight.device();
        let adapter = config.init(self.d_in(), self.d_out(), &device)?;
        self.insert_adapter(name, adapter)
    }

    /// Forward pass for `x: [..., d_in]`: the base plus the active adapters, or plus the
    /// installed router's mixture ([`set_router`](Self::set_router)).
    ///
    /// # Errors
    /// [`Error::Shape`] if the last axis is not `d_in`; with a router, its errors and
    /// [`Error::UnknownAdapter`] / [`Error::AlreadyMerged`] for a routed adapter removed or
    /// merged since.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Result<Tensor<D>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward input")?;
        if let Some(router) = &self.router {
            return self.routed_forward(router.as_ref(), x);
        }
        Ok(self.forward_unchecked(x))
    }

    /// The frozen base layer alone, `x W + b` ([`crate::grouped::dense_linear`]: a
    /// weight-streaming kernel for the few rows of a decoding step on Flex).
    fn base_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        crate::grouped::dense_linear(
            x,
            self.base.weight.val(),
            self.base.bias.as_ref().map(|b| b.val()),
        )
    }

    /// The adapters that contribute through their own path: active and not merged.
    fn live_adapters(&self) -> impl Iterator<Item = &LoraModule> {
        self.adapters
            .iter()
            .enumerate()
            .filter(|(i, _)| self.slots.contributes(*i))
            .map(|(_, a)| a)
    }

    fn forward_unchecked<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if !self.ia3.is_empty() {
            return self.ia3_forward(x);
        }
        let live: Vec<&LoraModule> = self.live_adapters().collect();
        if live.is_empty() {
            return self.base_forward(x);
        }
        let rows: usize = x.dims()[..D - 1].iter().product();
        if self.resolved_forward(rows) == LoraForward::FusedWeight {
            let mut w = self.base.weight.val();
            for a in &live {
                w = w + a.delta_weight();
            }
            return burn::tensor::module::linear(x, w, self.base.bias.as_ref().map(|b| b.val()));
        }
        let mut y = self.base_forward(x.clone());
        for a in live {
            y = y + a.delta_forward(x.clone());
        }
        y
    }

    /// The form ([`LoraForward::Thin`] or [`LoraForward::FusedWeight`]) a forward pass over
    /// `rows` rows takes with the current mode and adapters.
    pub fn resolved_forward(&self, rows: usize) -> LoraForward {
        if self.live_adapters().any(LoraModule::is_training) {
            return LoraForward::Thin;
        }
        let (d_in, d_out) = (self.d_in(), self.d_out());
        let fused = match self.mode {
            LoraForward::Thin => false,
            LoraForward::FusedWeight => true,
            LoraForward::Auto => rows * (d_in + d_out) >= d_in * d_out,
        };
        if fused {
            LoraForward::FusedWeight
        } else {
            LoraForward::Thin
        }
    }

    /// PEFT's `merge_and_unload`: merges the active adapters (LoRA or IA3) and returns the
    /// plain layer.
    ///
    /// # Errors
    /// None in practice (the names come from the layer).
    pub fn merge_and_unload(mut self) -> Result<Linear> {
        self.merge_active()?;
        for n in self.ia3_slots.active_unmerged() {
            self.merge_ia3(&n)?;
        }
        Ok(self.base)
    }
}

impl ComputeModule for LoraLinear {
    fn d_input(&self) -> usize {
        self.d_in()
    }

    fn d_output(&self) -> usize {
        self.d_out()
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.forward_unchecked(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_track_activity_and_merge_state() {
        let mut s = AdapterSlots::default();
        s.push("a").unwrap();
        s.push("b").unwrap();
        assert!(matches!(s.push("a"), Err(Error::DuplicateAdapter { .. })));
        s.set_active(&["b"]).unwrap();
        assert_eq!(s.active(), ["b"]);
        assert!(!s.contributes(0) && s.contributes(1));
        s.merged[1] = true;
        assert!(
            !s.contributes(1),
            "a merged adapter contributes through the weight"
        );
        assert!(matches!(
            s.index_for_merge("b", false),
            Err(Error::AlreadyMerged { .. })
        ));
        assert_eq!(s.all_merged(), ["b"]);
        s.remove(0);
        assert_eq!(s.names(), ["b"]);
        assert_eq!(s.index("b").unwrap(), 0);
    }

    #[test]
    fn scaling_follows_lora_and_rslora() {
        assert_eq!(lora_scaling(16.0, 8, false), 2.0);
        assert_eq!(lora_scaling(16.0, 4, true), 8.0);
        assert_eq!(LoraConfig::new(4).with_alpha(8.0).scaling(), 2.0);
    }
}
