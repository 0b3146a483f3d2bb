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
//! modula's [`LoraAdapter`] (`scale` = [`LoraAdapter::scaling`]).

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::{Distribution, Int, Tensor};

use super::mix::{LoraMix, lora_mixture_planned};
use super::{ComputeModule, check_last_dim};
use crate::error::{Error, Result};
use crate::routing::DispatchPlan;

pub use super::lora_adapter::{LoraAdapter, LoraConfig, LoraInit, lora_scaling};

/// Names, activity and merge state of the adapters on one host layer (shared by
/// [`LoraLinear`] and [`LoraEmbedding`]). Index `i` describes the layer's `adapters[i]`.
#[derive(Clone, Debug, Default)]
pub struct AdapterSlots {
    names: Vec<String>,
    active: Vec<bool>,
    merged: Vec<bool>,
}

impl AdapterSlots {
    fn push(&mut self, name: &str) -> Result<()> {
        if self.names.iter().any(|n| n == name) {
            return Err(Error::DuplicateAdapter {
                name: name.to_string(),
                on: String::new(),
            });
        }
        self.names.push(name.to_string());
        self.active.push(true);
        self.merged.push(false);
        Ok(())
    }

    fn remove(&mut self, i: usize) {
        self.names.remove(i);
        self.active.remove(i);
        self.merged.remove(i);
    }

    /// The adapter names, in insertion order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Position of adapter `name`.
    ///
    /// # Errors
    /// [`Error::UnknownAdapter`] listing the known names.
    pub fn index(&self, name: &str) -> Result<usize> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| Error::UnknownAdapter {
                name: name.to_string(),
                on: String::new(),
                known: self.names.join(", "),
            })
    }

    /// Names of the active adapters.
    pub fn active(&self) -> Vec<&str> {
        self.names
            .iter()
            .zip(&self.active)
            .filter(|(_, a)| **a)
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn set_active(&mut self, names: &[&str]) -> Result<()> {
        let idx = names
            .iter()
            .map(|n| self.index(n))
            .collect::<Result<Vec<_>>>()?;
        self.active.iter_mut().for_each(|a| *a = false);
        for i in idx {
            self.active[i] = true;
        }
        Ok(())
    }

    /// Whether adapter `i` contributes through its own path (active and not merged).
    fn contributes(&self, i: usize) -> bool {
        self.active[i] && !self.merged[i]
    }

    /// Index of `name`, checking it is (`want_merged`) or is not merged.
    fn index_for_merge(&self, name: &str, want_merged: bool) -> Result<usize> {
        let i = self.index(name)?;
        match (self.merged[i], want_merged) {
            (true, false) => Err(Error::State(format!("adapter `{name}` is already merged"))),
            (false, true) => Err(Error::State(format!("adapter `{name}` is not merged"))),
            _ => Ok(i),
        }
    }

    fn active_unmerged(&self) -> Vec<String> {
        (0..self.names.len())
            .filter(|&i| self.contributes(i))
            .map(|i| self.names[i].clone())
            .collect()
    }

    fn all_merged(&self) -> Vec<String> {
        (0..self.names.len())
            .filter(|&i| self.merged[i])
            .map(|i| self.names[i].clone())
            .collect()
    }
}

/// Adds (`sign = 1`) or subtracts (`sign = -1`) `s·A B` to a frozen weight `[d_in, d_out]`.
fn fold_delta(weight: Param<Tensor<2>>, adapter: &LoraAdapter, sign: f64) -> Param<Tensor<2>> {
    let delta = adapter.delta_weight().detach().mul_scalar(sign);
    weight.map(|w| (w + delta).detach())
}

/// The adapter-management API shared by [`LoraLinear`] and [`LoraEmbedding`].
macro_rules! adapter_host_api {
    ($ty:ty) => {
        impl $ty {
            /// Inserts an existing adapter (e.g. loaded from a PEFT folder) under `name`,
            /// active.
            ///
            /// # Errors
            /// [`Error::DuplicateAdapter`] if the name exists; [`Error::Shape`] if its widths
            /// differ from the host layer's.
            pub fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter) -> Result<()> {
                let (d_in, d_out) = self.host_dims();
                if adapter.d_in() != d_in || adapter.d_out() != d_out {
                    return Err(Error::shape(
                        format!("adapter `{name}` on a LoRA layer"),
                        format!("[{d_in} -> {d_out}]"),
                        format!("[{} -> {}]", adapter.d_in(), adapter.d_out()),
                    ));
                }
                self.slots.push(name)?;
                self.adapters.push(adapter);
                Ok(())
            }

            /// Removes adapter `name` and returns it. A merged adapter is unmerged first.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`].
            pub fn remove_adapter(&mut self, name: &str) -> Result<LoraAdapter> {
                let i = self.slots.index(name)?;
                if self.slots.merged[i] {
                    self.unmerge(name)?;
                }
                self.slots.remove(i);
                Ok(self.adapters.remove(i))
            }

            /// The adapter names, in insertion order.
            pub fn names(&self) -> &[String] {
                self.slots.names()
            }

            /// The adapter called `name`.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`].
            pub fn adapter(&self, name: &str) -> Result<&LoraAdapter> {
                Ok(&self.adapters[self.slots.index(name)?])
            }

            /// Names of the active adapters.
            pub fn active_adapters(&self) -> Vec<&str> {
                self.slots.active()
            }

            /// Makes exactly the adapters in `names` active (an empty slice disables all).
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`] for a name not on the layer; nothing changes then.
            pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
                self.slots.set_active(names)
            }

            /// Whether adapter `name` is currently merged into the base weight.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`].
            pub fn is_merged(&self, name: &str) -> Result<bool> {
                Ok(self.slots.merged[self.slots.index(name)?])
            }

            /// Merges adapter `name` into the base weight: `W ← W + s·A B`. It then stops
            /// contributing separately, so outputs are unchanged (up to rounding).
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`]; [`Error::State`] if it is already merged.
            pub fn merge(&mut self, name: &str) -> Result<()> {
                let i = self.slots.index_for_merge(name, false)?;
                self.base.weight = fold_delta(self.base.weight.clone(), &self.adapters[i], 1.0);
                self.slots.merged[i] = true;
                Ok(())
            }

            /// Undoes [`merge`](Self::merge): `W ← W − s·A B`.
            ///
            /// # Errors
            /// [`Error::UnknownAdapter`]; [`Error::State`] if it is not merged.
            pub fn unmerge(&mut self, name: &str) -> Result<()> {
                let i = self.slots.index_for_merge(name, true)?;
                self.base.weight = fold_delta(self.base.weight.clone(), &self.adapters[i], -1.0);
                self.slots.merged[i] = false;
                Ok(())
            }

            /// Merges every active adapter that is not merged yet.
            ///
            /// # Errors
            /// None in practice (the names come from the layer).
            pub fn merge_active(&mut self) -> Result<()> {
                for n in self.slots.active_unmerged() {
                    self.merge(&n)?;
                }
                Ok(())
            }

            /// Unmerges every merged adapter.
            ///
            /// # Errors
            /// None in practice (the names come from the layer).
            pub fn unmerge_all(&mut self) -> Result<()> {
                for n in self.slots.all_merged() {
                    self.unmerge(&n)?;
                }
                Ok(())
            }
        }
    };
}

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
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// The frozen host layer (`weight: [d_in, d_out]`).
    pub base: Linear,
    /// The adapters, in insertion order (their names are in [`names`](Self::names)).
    pub adapters: Vec<LoraAdapter>,
    #[module(skip)]
    slots: AdapterSlots,
    #[module(skip)]
    mode: LoraForward,
}

adapter_host_api!(LoraLinear);

impl LoraLinear {
    /// Wraps `base`, freezing its parameters. The layer starts with no adapters.
    pub fn new(base: Linear) -> Self {
        Self {
            base: base.no_grad(),
            adapters: Vec::new(),
            slots: AdapterSlots::default(),
            mode: LoraForward::Auto,
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

    /// Forward pass for `x: [..., d_in]`.
    ///
    /// # Errors
    /// [`Error::Shape`] if the last axis is not `d_in`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Result<Tensor<D>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward input")?;
        Ok(self.forward_unchecked(x))
    }

    /// The adapters that contribute through their own path: active and not merged.
    fn live_adapters(&self) -> impl Iterator<Item = &LoraAdapter> {
        self.adapters
            .iter()
            .enumerate()
            .filter(|(i, _)| self.slots.contributes(*i))
            .map(|(_, a)| a)
    }

    fn forward_unchecked<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let live: Vec<&LoraAdapter> = self.live_adapters().collect();
        if live.is_empty() {
            return self.base.forward(x);
        }
        let rows: usize = x.dims()[..D - 1].iter().product();
        if self.resolved_forward(rows) == LoraForward::FusedWeight {
            let mut w = self.base.weight.val();
            for a in &live {
                w = w + a.delta_weight();
            }
            return burn::tensor::module::linear(x, w, self.base.bias.as_ref().map(|b| b.val()));
        }
        let mut y = self.base.forward(x.clone());
        for a in live {
            y = y + a.delta_forward(x.clone());
        }
        y
    }

    /// The form ([`LoraForward::Thin`] or [`LoraForward::FusedWeight`]) a forward pass over
    /// `rows` rows takes with the current mode and adapters.
    pub fn resolved_forward(&self, rows: usize) -> LoraForward {
        if self.live_adapters().any(LoraAdapter::is_training) {
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

    /// PEFT's `merge_and_unload`: merges the active adapters and returns the plain layer.
    ///
    /// # Errors
    /// None in practice (the names come from the layer).
    pub fn merge_and_unload(mut self) -> Result<Linear> {
        self.merge_active()?;
        Ok(self.base)
    }
}

/// Mixed-adapter batches: serving many adapters on one base in one pass (each row or
/// sequence names its own adapter, as PEFT's `adapter_names` argument).
///
/// The base layer runs once over the whole batch. The adapter paths run on the gathered rows
/// of each adapter only, through the core's dispatch ([`forward_mixed`](Self::forward_mixed),
/// [`forward_routed`](Self::forward_routed)), or, when whole sequences share an adapter and
/// all adapters have one rank, as two batched matmuls against factors gathered per sequence
/// ([`forward_mixed_seqs`](Self::forward_mixed_seqs); the "BGMV" layout of Punica/S-LoRA),
/// which moves no activations at all. Active flags are ignored (the batch names the
/// adapters); dropout is not applied (this is the serving path). No adapter may be merged.
impl LoraLinear {
    /// Mixed-adapter forwards add each adapter's own path, so none may be merged.
    fn check_unmerged(&self) -> Result<()> {
        match self.slots.merged.iter().position(|m| *m) {
            Some(i) => Err(Error::State(format!(
                "adapter `{}` is merged into the base weight; unmerge it before a mixed-adapter forward",
                self.slots.names[i]
            ))),
            None => Ok(()),
        }
    }

    fn mixed_ids(&self, names: &[Option<&str>]) -> Result<Vec<i64>> {
        self.check_unmerged()?;
        names
            .iter()
            .map(|n| n.map_or(Ok(-1), |n| self.slots.index(n).map(|i| i as i64)))
            .collect()
    }

    /// Row `i` of `x: [rows, d_in]` uses adapter `names[i]` (`None`: the base only).
    ///
    /// # Errors
    /// [`Error::Shape`] for the wrong width or a name count that is not `rows`;
    /// [`Error::UnknownAdapter`]; [`Error::State`] if an adapter is merged.
    pub fn forward_mixed(&self, x: Tensor<2>, names: &[Option<&str>]) -> Result<Tensor<2>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward_mixed input")?;
        let rows = x.dims()[0];
        if names.len() != rows {
            return Err(Error::shape(
                "LoraLinear::forward_mixed (one adapter name per row)",
                rows.to_string(),
                names.len().to_string(),
            ));
        }
        let ids = self.mixed_ids(names)?;
        let routing = crate::routing::Routing::one_per_row(&ids, self.adapters.len(), &x.device())?;
        self.forward_routed(x, &routing)
    }

    /// Each row mixes the adapters its routing selects: `base(x) + Σ_j w_j · Δ_{a_j}(x)`,
    /// with every adapter computed on its own rows only. `routing.num_modules()` must be the
    /// number of adapters (indices follow [`names`](Self::names)).
    ///
    /// # Errors
    /// Shape errors; [`Error::State`] if an adapter is merged.
    pub fn forward_routed(
        &self,
        x: Tensor<2>,
        routing: &crate::routing::Routing,
    ) -> Result<Tensor<2>> {
        self.forward_planned(x, &DispatchPlan::new(routing)?)
    }

    /// [`forward_routed`](Self::forward_routed) under a plan built once: every layer that
    /// shares a routing (all layers of a mixed-adapter batch) can take the same plan, so the
    /// routing is read to the host and sorted once per batch, not once per layer.
    ///
    /// # Errors
    /// As [`forward_routed`](Self::forward_routed).
    pub fn forward_planned(&self, x: Tensor<2>, plan: &DispatchPlan) -> Result<Tensor<2>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward_routed input")?;
        self.check_unmerged()?;
        if plan.num_modules() != self.adapters.len() {
            return Err(Error::shape(
                "LoraLinear::forward_routed (routing modules = adapters)",
                self.adapters.len().to_string(),
                plan.num_modules().to_string(),
            ));
        }
        let base = self.base.forward(x.clone());
        if self.adapters.is_empty() {
            return Ok(base);
        }
        let delta = lora_mixture_planned(x, plan, &self.adapters, LoraMix::Output)?;
        Ok(base + delta)
    }

    /// Sequence `i` of `x: [batch, seq, d_in]` uses adapter `names[i]` (`None`: the base
    /// only). With one rank across the adapters this is two batched matmuls against the
    /// per-sequence factors (`[batch, d_in, r]`, `[batch, r, d_out]`); otherwise it falls back
    /// to the per-row dispatch.
    ///
    /// # Errors
    /// As [`forward_mixed`](Self::forward_mixed), with one name per sequence.
    pub fn forward_mixed_seqs(&self, x: Tensor<3>, names: &[Option<&str>]) -> Result<Tensor<3>> {
        check_last_dim(&x, self.d_in(), "LoraLinear::forward_mixed_seqs input")?;
        let [batch, seq, d_in] = x.dims();
        if names.len() != batch {
            return Err(Error::shape(
                "LoraLinear::forward_mixed_seqs (one adapter name per sequence)",
                batch.to_string(),
                names.len().to_string(),
            ));
        }
        let ids = self.mixed_ids(names)?;
        let d_out = self.d_out();
        let one_rank = self
            .adapters
            .first()
            .is_some_and(|a0| self.adapters.iter().all(|a| a.rank() == a0.rank()));
        if !one_rank {
            let row_ids: Vec<Option<&str>> = names
                .iter()
                .flat_map(|n| std::iter::repeat_n(*n, seq))
                .collect();
            let y = self.forward_mixed(x.reshape([batch * seq, d_in]), &row_ids)?;
            return Ok(y.reshape([batch, seq, d_out]));
        }
        let base = self.base.forward(x.clone());
        if ids.iter().all(|&i| i < 0) {
            return Ok(base);
        }
        let pick = |i: i64| &self.adapters[i.max(0) as usize];
        let a = Tensor::stack::<3>(ids.iter().map(|&i| pick(i).a.val()).collect(), 0);
        let b = Tensor::stack::<3>(ids.iter().map(|&i| pick(i).b.val()).collect(), 0);
        let scales: Vec<f32> = ids
            .iter()
            .map(|&i| if i < 0 { 0.0 } else { pick(i).scaling() as f32 })
            .collect();
        let s = crate::tensor_util::float_tensor(scales, [batch, 1, 1], &x.device());
        Ok(base + x.matmul(a).mul(s).matmul(b))
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

/// A frozen burn [`Embedding`] with named LoRA adapters, as PEFT's LoRA `Embedding` layer.
///
/// With the table `E: [n, d]` and an adapter `A: [n, r]`, `B: [r, d]` (PEFT's
/// `lora_embedding_A` and `lora_embedding_B`, transposed), row `t` of the output is
/// `E[t] + s · A[t] B`: a lookup into the thin factor, never the `n × d` delta. PEFT
/// initialises `A = 0` and `B ~ N(0, 1)` for embeddings, and applies no dropout.
#[derive(Module, Debug)]
pub struct LoraEmbedding {
    /// The frozen table (`weight: [n, d]`).
    pub base: Embedding,
    /// The adapters, in insertion order.
    pub adapters: Vec<LoraAdapter>,
    #[module(skip)]
    slots: AdapterSlots,
}

adapter_host_api!(LoraEmbedding);

impl LoraEmbedding {
    /// Wraps `base`, freezing it.
    pub fn new(base: Embedding) -> Self {
        Self {
            base: base.no_grad(),
            adapters: Vec::new(),
            slots: AdapterSlots::default(),
        }
    }

    fn host_dims(&self) -> (usize, usize) {
        let [n, d] = self.base.weight.shape().dims();
        (n, d)
    }

    /// Adds a new adapter of rank `rank` with PEFT's embedding initialisation (`A = 0`,
    /// `B ~ N(0, 1)`).
    ///
    /// # Errors
    /// Rank 0, duplicate name.
    pub fn add_adapter(
        &mut self,
        name: &str,
        rank: usize,
        alpha: f64,
        use_rslora: bool,
    ) -> Result<()> {
        if rank == 0 {
            return Err(Error::invalid("LoRA rank", "rank must be at least 1"));
        }
        let (n, d) = self.host_dims();
        let device = self.base.weight.device();
        let a = Tensor::<2>::zeros([n, rank], &device);
        let b = Tensor::<2>::random([rank, d], Distribution::Normal(0.0, 1.0), &device);
        self.insert_adapter(
            name,
            LoraAdapter::from_factors(a, b, alpha, use_rslora, 0.0)?,
        )
    }

    /// Looks up `ids: [batch, seq]`, returning `[batch, seq, d]`.
    ///
    /// # Errors
    /// [`Error::Invalid`] if an id is outside the table.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Result<Tensor<3>> {
        let (n, _) = self.host_dims();
        let max = ids.clone().max().into_scalar::<i64>();
        let min = ids.clone().min().into_scalar::<i64>();
        if min < 0 || max >= n as i64 {
            return Err(Error::invalid(
                "token ids",
                format!("ids must be in 0..{n}, got {min}..={max}"),
            ));
        }
        let mut y = self.base.forward(ids.clone());
        for (i, adapter) in self.adapters.iter().enumerate() {
            if self.slots.contributes(i) {
                let z = burn::tensor::module::embedding(adapter.a.val(), ids.clone());
                y = y + z
                    .matmul(adapter.b.val().unsqueeze())
                    .mul_scalar(adapter.scaling());
            }
        }
        Ok(y)
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
            Err(Error::State(_))
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
