//! # modula
//!
//! Modular deep learning on [burn](https://burn.dev) 0.22: parameter-efficient modules,
//! routers and aggregators, with Hugging Face PEFT's on-disk format in and out.
//!
//! Following Pfeiffer et al., "Modular Deep Learning" (arXiv 2302.11529), a modular model is
//! made of three roles, each a trait here:
//!
//! | role | trait | what exists today |
//! |---|---|---|
//! | module (computation function) | [`ComputeModule`] | [`LoraModule`], [`LoraLinear`], [`LoraEmbedding`], [`Ia3Linear`], [`BottleneckAdapter`]; prefix tuning ([`PrefixEncoder`], [`PrefixAttention`]); MoE [`Expert`]s |
//! | router | [`Router`] (reads rows, token ids or task ids: [`RouterInput`]) | [`FixedRouter`], [`TopKRouter`], [`NoisyTopKRouter`], [`ExpertChoiceRouter`], [`HashRouter`], [`ArrowRouter`], [`PolytroponRouter`], [`TaskRouted`], [`XLoraRouter`], [`SimilarityRouter`], LMC's local routing ([`continual::lmc::LmcLayer`]); all in [`routers`] |
//! | aggregator | [`Aggregator`] (sees the plan and the input rows) | [`WeightedSum`], [`WeightedMean`], [`AdapterFusion`], [`LoraFactorMix`]; offline parameter merging in [`library::merge`](mod@library::merge) |
//!
//! They meet in one pipeline, route → plan → compute → combine ([`routing`]): a [`Routing`]
//! (per row, `k` module indices and weights) is planned once ([`DispatchPlan`]) and the plan
//! serves every layer that shares the routing; every module computes on its own rows only and
//! the aggregator combines. A plan gathers rows by module (top-k routings), runs every module
//! on the whole batch with no data movement (dense routings), or routes whole sequences (a
//! batch where each request names its adapter). So "top-2 of 8 experts" costs about a quarter
//! of "all 8", and a batch where each row uses a different adapter costs one gathered pass.
//!
//! Code is written once against burn's `Tensor<D>`; the [`Device`](burn::tensor::Device) the
//! caller picks decides the backend: Flex (pure-Rust CPU, feature `flex`, the default), wgpu
//! (feature `wgpu`) or CUDA (feature `cuda`).
//!
//! ## Quick start: a PEFT LoRA folder on a burn model
//!
//! ```no_run
//! use burn::tensor::{Device, Tensor};
//! use modula::prelude::*;
//!
//! # fn main() -> modula::Result<()> {
//! let device = Device::flex();
//! // Base weights in PyTorch layout ([out, in]), e.g. from a safetensors checkpoint.
//! let base = TensorFile::open("tests/data/tiny_mlp_base.safetensors")?;
//! let mut fc1 = LoraLinear::new(base.linear_torch("fc1", &device)?);
//! // A PEFT adapter folder: adapter_config.json + adapter_model.safetensors.
//! let peft = PeftLora::load("tests/data/peft_lora_tiny_mlp", &device)?;
//! peft.attach("fc1", &mut fc1, "default")?;
//! let x: Tensor<2> = base.tensor("x", &device)?;
//! let y = fc1.forward(x.clone())?;        // base(x) + s·(x A) B
//! fc1.merge("default")?;                   // W ← W + s·A B: inference at base cost
//! let y_merged = fc1.forward(x)?;
//! # let _ = (y, y_merged);
//! # Ok(()) }
//! ```
//!
//! ## Modules
//! - [`modules::lora`]: LoRA and rsLoRA on `Linear` ([`LoraLinear`]) and `Embedding`
//!   ([`LoraEmbedding`]), with dropout, PEFT initialisation, many named adapters per layer (any
//!   subset active), merge/unmerge, training with burn's optimizers (only the factors get
//!   gradients). In training the delta is always `s·(x A) B`; for large inference batches
//!   [`LoraForward::Auto`] uses a transient `W + s·A B` when that costs less. It goes beyond
//!   burn-core's own `apply_lora` (one adapter, merged into the weight on every forward, no
//!   unmerge); see the module docs.
//! - [`modules::lycoris`]: LoHa (Hadamard) and LoKr (Kronecker) deltas with thin forwards
//!   and exact LoRA forms; PEFT folders in and out.
//! - [`modules::ia3`]: (IA)³ output-side and input-side (feed-forward) scaling, merge/unmerge.
//! - [`modules::adapter`]: bottleneck adapters, sequential and parallel, Houlsby and Pfeiffer
//!   placements, configurable reduction factor, non-linearity and scaling.
//! - [`modules::prefix`]: prefix tuning with the optional reparameterisation MLP, and a
//!   GPT-2-style attention that consumes the prefix as PEFT does.
//!
//! ## Mixture-of-experts
//! - [`moe`]: [`Expert`] networks (MLP, SwiGLU) and [`MoeLayer`] over any router (the
//!   [`TopKRouter`] gate by default), which runs only the selected experts through the
//!   dispatch, dropless or with a capacity factor ([`routers::capacity`], Switch/GShard token
//!   dropping); the gates' losses are in [`routers::losses`]. [`ExpertChoiceRouter`],
//!   [`NoisyTopKRouter`] (Shazeer's noisy gating with importance and load losses) and
//!   [`HashRouter`] (token ids, through [`MoeLayer::forward_routed`]) route the same layer.
//!   [`SoftMoe`] mixes tokens into expert slots (Puigcerver et al. 2023).
//!
//! ## Libraries of LoRA experts
//! - [`library`]: experts as host factors ([`library::LoraExpert`]); every PEFT
//!   `add_weighted_adapter` combination type in PEFT's factor space and exactly in delta space
//!   ([`library::merge`](mod@library::merge)), task arithmetic, SLERP, PEM arithmetic ([`library::arith`]); Arrow
//!   with exact prototypes ([`library::arrow`]); MBC clustering ([`library::mbc`]); a library
//!   folder with atomic writes ([`store`]).
//! - Mixed-adapter batches: [`LoraLinear::forward_mixed`], [`LoraLinear::forward_mixed_seqs`],
//!   [`LoraLinear::forward_routed`] serve many adapters on one base in one gathered pass.
//! - The host linear algebra these use (QR, Jacobi SVD, low-rank SVD) is exact `f64` and
//!   internal; factors come in and go out as burn `TensorData`.
//! - The `modula` command-line tool (feature `cli`): `inspect`, `merge`, `cluster`, `arrow`,
//!   `bake`.
//!
//! ## Structured pruning
//! - [`prune`]: models expose units ([`prune::Prunable`]: the decoders' attention heads, with
//!   grouped-query bookkeeping, feed-forward neurons, Mixtral experts, and LoRA rank
//!   components through [`models::AdapterRanks`]) that are masked inside the forward
//!   pass and then physically removed; Bonsai ([`prune::bonsai()`], Dery et al. 2024) prunes with
//!   forward passes only, [`prune::one_shot`] by a prior alone.
//!
//! ## End-task-aware training
//! - [`transfer`]: TARTAN's weighting of auxiliary objectives on a shared body, fixed
//!   (MT-TARTAN) or learned by the dev-head meta-gradient (META-TARTAN), and AANG's space of
//!   auxiliary objectives built from stages with factored weights.
//!
//! ## Continual learning
//! - [`continual`]: LMC local module composition (expansion by outlier test, freezing,
//!   task-agnostic inference, fusion), latent replay buffers, L2R routers over frozen task
//!   modules.
//!
//! ## Files
//! - [`peft`]: PEFT LoRA and IA3 folders, loaded by module path and saved so that PEFT 0.21
//!   loads them with identical outputs; unsupported settings (DoRA, bias training, ...) are
//!   errors, never silently different models.
//! - [`io`]: safetensors reading/writing (atomic writes) and `Linear` loading from PyTorch
//!   (`[out, in]`) or GPT-2 `Conv1D` (`[in, out]`) layouts.
//!
//! ## Performance on the CPU
//! - When the modules are matrices (MoE experts, LoRA adapters), one grouped op computes all
//!   of them on the plan-ordered rows ([`grouped`], [`DispatchPlan::apply_grouped`]); on Flex
//!   it runs `gemm` on the host buffers, one call per expert, with SwiGLU and the routing
//!   weights fused in.
//! - On x86-64 the matmuls use AVX-512 kernels where the CPU has them (picked at run time).
//! - **Use a caching allocator in your program.** glibc's `malloc` unmaps every freed buffer
//!   above its mmap threshold, so each forward pass page-faults its multi-megabyte
//!   activations in again; on 2 cores that cost a 1024² Linear over 4,096 rows 40 % of its
//!   speed (115 against 186–190 GFLOP/s). The `modula` binary and the examples use
//!   [mimalloc](https://crates.io/crates/mimalloc); an application does the same with
//!   `#[global_allocator] static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;` (a library
//!   cannot choose it for you), or, without a new dependency, by raising glibc's thresholds:
//!   `MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=4000000000`.
//!
//! ## Errors
//! Every fallible API returns [`Result`] with an [`Error`] that says what was wrong and how to
//! fix it; bad input does not panic.

#![warn(missing_docs)]

// The layers and the one-way rule between them are in docs/architecture.md.
pub mod aggregate;
pub mod checkpoint;
pub mod continual;
pub mod error;
pub mod grouped;
pub mod io;
pub mod library;
pub(crate) mod linalg;
pub mod models;
pub mod modules;
pub mod moe;
pub mod peft;
pub mod prune;
pub mod request;
pub(crate) mod rng;
pub mod routers;
pub mod routing;
pub mod store;
pub(crate) mod tensor_util;
#[cfg(feature = "tokenizers")]
pub mod tokenizer;
pub mod transfer;

pub use aggregate::{
    AdapterFusion, AdapterFusionConfig, LoraFactorMix, LoraMix, RoutedLora, RoutingTrace, Stack,
    TracedRouting, lora_mixture, stack_routed,
};
pub use error::{Error, Result, Scope};
pub use io::{HostTensor, TensorFile};
pub use modules::adapter::{
    AdapterActivation, AdapterForm, AdapterPlacement, BlockAdapters, BottleneckAdapter,
    BottleneckConfig,
};
pub use modules::compacter::Compacter;
pub use modules::film::Film;
pub use modules::hyper::{GeneratedAdapter, HyperAdapters, HyperEmbedding};
pub use modules::ia3::{Ia3Linear, Ia3Vector};
pub use modules::lora::{
    AdapterSlots, LayerRouter, LoraConfig, LoraEmbedding, LoraForward, LoraInit, LoraLinear,
    LoraModule, SharedLayerRouter,
};
pub use modules::lycoris::{
    FactorPair, KronFactor, LohaModule, LokrLayout, LokrModule, LokrShape, LycorisModule,
};
pub use modules::prefix::{PrefixAttention, PrefixConfig, PrefixEncoder};
pub use modules::prompt::PromptEmbedding;
pub use modules::sparse::{BiasDelta, SparseDelta};
pub use modules::{ComputeModule, dispatch_modules, dispatch_planned};
pub use moe::experts::{Expert, ExpertConfig, ExpertKind};
pub use moe::soft::{SoftMoe, SoftMoeConfig};
pub use moe::{MoeLayer, MoeLayerConfig};
pub use peft::{PeftAdapter, PeftConfig, PeftIa3, PeftLora, PeftLycoris, PeftPrompt};
pub use routers::{
    ArrowRouter, ExpertChoiceRouter, ExpertChoiceRouterConfig, GumbelRouter, HashRouter,
    HashRouterConfig, HyperRouter, NoisyTopKRouter, NoisyTopKRouterConfig, PolytroponRouter,
    PolytroponRouterConfig, ReinforceRouter, SecondExpertPolicy, SequenceTasks, SimilarityRouter,
    TaskRouted, TopKRouter, TopKRouterConfig, XLoraRouter, XLoraRouterConfig,
};
pub use routing::{
    Aggregator, DispatchPlan, FixedRouter, Router, RouterInput, Routing, WeightedMean, WeightedSum,
    route_and_dispatch,
};

/// The names most programs need: `use modula::prelude::*;`.
pub mod prelude {
    pub use crate::error::{Error, Result};
    pub use crate::io::TensorFile;
    pub use crate::modules::adapter::{BottleneckAdapter, BottleneckConfig};
    pub use crate::modules::ia3::Ia3Linear;
    pub use crate::modules::lora::{LoraConfig, LoraEmbedding, LoraLinear, LoraModule};
    pub use crate::modules::prefix::{PrefixAttention, PrefixConfig, PrefixEncoder};
    pub use crate::modules::{ComputeModule, dispatch_modules, dispatch_planned};
    pub use crate::peft::{PeftIa3, PeftLora};
    pub use crate::routing::{
        Aggregator, DispatchPlan, FixedRouter, Router, RouterInput, Routing, WeightedSum,
    };
}
