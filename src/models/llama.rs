//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Mixtral) as transformers computes it,
//! with every projection a [`LoraLinear`] so that adapters attach by the Hugging Face module
//! path.
//!
//! # The math
//! Per layer, with RMSNorm `n(x) = x / sqrt(mean(x²) + ε) ⊙ g`:
//!
//! - `h = x + o_proj(attn(n₁(x)))`, where attention uses rotary positions on q and k
//!   ([`Rope`]), grouped-query heads (each key/value head serves
//!   `num_attention_heads / num_key_value_heads` query heads), a causal mask (and Mistral's
//!   sliding window), and `softmax(q kᵀ / sqrt(head_dim)) v`;
//! - `y = h + down_proj(silu(gate_proj(n₂(h))) ⊙ up_proj(n₂(h)))`, or in a Mixtral layer
//!   `y = h + Σ_{e ∈ top-k} p̂_e · w2_e(silu(w1_e n₂(h)) ⊙ w3_e n₂(h))` with `p = softmax(gate
//!   n₂(h))` over all E experts and `p̂` its top-k renormalised to sum to 1 (transformers'
//!   `MixtralSparseMoeBlock`), computed by modula's [`MoeLayer`] through the sparse dispatch
//!   (Jiang et al., "Mixtral of Experts", arXiv 2401.04088).
//!
//! The logits are `lm_head(n(h_L))`, or the transposed token embedding when the config ties
//! them. Module paths follow transformers' (`model.layers.3.self_attn.q_proj`, `lm_head`), so
//! they equal PEFT's keys.
//!
//! # Shapes
//! - input ids: `[batch, seq]` (Int); logits: `[batch, seq, vocab_size]`

use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::LinearLayers;
use super::config::DecoderConfig;
use super::mixed::{Mix, check_ids, linear, mask_values};
use super::rope::Rope;
use crate::error::{Error, Result};
use crate::modules::adapter::AdapterActivation;
use crate::modules::lora::LoraLinear;
use crate::modules::prompt::{PromptEmbedding, batch_prompts};
use crate::moe::MoeLayer;
use crate::moe::experts::{Expert, ExpertKind};
use crate::prune::UnitState;
use crate::rng::SplitMix64;
use crate::routers::TopKRouterConfig;
use crate::tensor_util::transpose_host;

/// Where a model's weights come from: a checkpoint by its Hugging Face names, in PyTorch's
/// layouts (`Linear` weights `[out, in]`). The `io` layer implements it for safetensors files.
pub trait WeightSource {
    /// The tensor `name` as `f32` values with its shape, or `None` if the checkpoint lacks it.
    ///
    /// # Errors
    /// A failed read (the source names its file).
    fn weight(&self, name: &str) -> Result<Option<TensorData>>;

    /// Every tensor name the checkpoint holds (a model refuses checkpoints with tensors it
    /// does not take).
    fn names(&self) -> Vec<String>;

    /// Names the checkpoint in errors (a file or folder).
    fn describe(&self) -> String;
}

/// Every tensor a Llama-family checkpoint for `config` holds, with its shape (PyTorch
/// layouts), in module order.
pub fn checkpoint_shapes(config: &DecoderConfig) -> Vec<(String, Vec<usize>)> {
    let c = config;
    let d = c.hidden_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
    )];
    let linear = |out: &mut Vec<(String, Vec<usize>)>, p: String, i: usize, o: usize, b: bool| {
        out.push((format!("{p}.weight"), vec![o, i]));
        if b {
            out.push((format!("{p}.bias"), vec![o]));
        }
    };
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![d]));
        let dims = projection_dims(c);
        for (k, (name, (i, o, b))) in PROJECTIONS.iter().zip(dims).enumerate() {
            if k == 4 {
                out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
                if let Some((e, _)) = c.experts {
                    // Mixtral: the router and E SwiGLU experts instead of the MLP.
                    let ff = c.intermediate_size;
                    let q = format!("{p}.block_sparse_moe");
                    out.push((format!("{q}.gate.weight"), vec![e, d]));
                    for j in 0..e {
                        for (w, shape) in [("w1", [ff, d]), ("w2", [d, ff]), ("w3", [ff, d])] {
                            out.push((format!("{q}.experts.{j}.{w}.weight"), shape.to_vec()));
                        }
                    }
                    break;
                }
            }
            linear(&mut out, format!("{p}.{name}"), i, o, b);
        }
    }
    out.push(("model.norm.weight".into(), vec![d]));
    if !c.tie_word_embeddings {
        linear(&mut out, "lm_head".into(), d, c.vocab_size, false);
    }
    out
}

/// Random weights of the right shapes for `config`: linear weights and embeddings uniform
/// with standard deviation 0.02 (transformers' `initializer_range`), norms 1, biases 0.
struct RandomWeights {
    shapes: Vec<(String, Vec<usize>)>,
    seed: u64,
}

impl WeightSource for RandomWeights {
    fn weight(&self, name: &str) -> Result<Option<TensorData>> {
        let Some(i) = self.shapes.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        let shape = self.shapes[i].1.clone();
        let len: usize = shape.iter().product();
        let values: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; len]
        } else if name.ends_with(".bias") {
            vec![0.0; len]
        } else {
            let mut rng = SplitMix64::new(self.seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
            let a = 0.02 * 3f32.sqrt();
            (0..len).map(|_| (2.0 * rng.next_f32() - 1.0) * a).collect()
        };
        Ok(Some(TensorData::new(values, shape)))
    }

    fn names(&self) -> Vec<String> {
        self.shapes.iter().map(|(n, _)| n.clone()).collect()
    }

    fn describe(&self) -> String {
        format!("random weights (seed {})", self.seed)
    }
}

/// Grouped-query self-attention with rotary positions.
#[derive(Module, Debug)]
pub struct Attention {
    /// Query projection, `hidden → heads·head_dim`.
    pub q_proj: LoraLinear,
    /// Key projection, `hidden → kv_heads·head_dim`.
    pub k_proj: LoraLinear,
    /// Value projection, `hidden → kv_heads·head_dim`.
    pub v_proj: LoraLinear,
    /// Output projection, `heads·head_dim → hidden`.
    pub o_proj: LoraLinear,
    /// After head pruning, the key/value head of each remaining query head; `None`: the
    /// config's grouping (`num_attention_heads / num_key_value_heads` consecutive query heads
    /// per key/value head).
    #[module(skip)]
    pub heads: Option<HeadLayout>,
    /// The heads' mask and activation recorder ([`Prunable`](crate::prune::Prunable)).
    #[module(skip)]
    pub units: UnitState,
}

/// Which key/value head serves each query head of a pruned attention layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadLayout {
    /// Per remaining query head, the index of its key/value head among the remaining ones.
    pub kv_of: Vec<usize>,
    /// Remaining key/value heads.
    pub kv_heads: usize,
}

/// The SwiGLU feed-forward block.
#[derive(Module, Debug)]
pub struct Mlp {
    /// Gate projection, `hidden → intermediate`.
    pub gate_proj: LoraLinear,
    /// Up projection, `hidden → intermediate`.
    pub up_proj: LoraLinear,
    /// Down projection, `intermediate → hidden`.
    pub down_proj: LoraLinear,
    /// The neurons' mask and activation recorder ([`Prunable`](crate::prune::Prunable)).
    #[module(skip)]
    pub units: UnitState,
}

/// One decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm,
    /// Self-attention.
    pub self_attn: Attention,
    /// RMSNorm before the feed-forward block.
    pub post_attention_layernorm: RmsNorm,
    /// Feed-forward block (Llama, Mistral, Qwen2); `None` in a Mixtral layer.
    pub mlp: Option<Mlp>,
    /// Mixtral's sparse mixture of SwiGLU experts with its top-k router (transformers'
    /// routing: softmax over every expert, top-k, renormalised); `None` in a dense layer.
    pub block_sparse_moe: Option<MoeLayer>,
}

/// The seven projections of a decoder layer, by their paths inside the layer, in module order:
/// the one list the loader, the shapes and the adapter paths follow. A Mixtral layer has the
/// first four (its experts are not `Linear` layers, in transformers 5 either).
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl DecoderLayer {
    /// The projections with their [`PROJECTIONS`] paths (four in a Mixtral layer).
    pub fn projections(&self) -> Vec<(&'static str, &LoraLinear)> {
        let a = &self.self_attn;
        let mut layers = vec![&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj];
        if let Some(m) = &self.mlp {
            layers.extend([&m.gate_proj, &m.up_proj, &m.down_proj]);
        }
        PROJECTIONS.into_iter().zip(layers).collect()
    }

    /// The projections with their [`PROJECTIONS`] paths, mutably.
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut LoraLinear)> {
        let a = &mut self.self_attn;
        let mut layers = vec![&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj];
        if let Some(m) = &mut self.mlp {
            layers.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        PROJECTIONS.into_iter().zip(layers).collect()
    }
}

/// `[in, out]` and whether it has a bias, for each of [`PROJECTIONS`] under `config`.
fn projection_dims(c: &DecoderConfig) -> [(usize, usize, bool); 7] {
    let (d, ff) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    [
        (d, q, c.qkv_bias),
        (d, kv, c.qkv_bias),
        (d, kv, c.qkv_bias),
        (q, d, c.o_bias),
        (d, ff, c.mlp_bias),
        (d, ff, c.mlp_bias),
        (ff, d, c.mlp_bias),
    ]
}

/// The decoder stack (`model.` in transformers' names).
#[derive(Module, Debug)]
pub struct LlamaBody {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// Decoder layers.
    pub layers: Vec<DecoderLayer>,
    /// Final RMSNorm.
    pub norm: RmsNorm,
}

/// A Llama-family causal language model (`LlamaForCausalLM` and its siblings).
#[derive(Module, Debug)]
pub struct LlamaForCausalLm {
    /// The decoder stack.
    pub model: LlamaBody,
    /// The output layer; `None` when tied to the token embedding.
    pub lm_head: Option<LoraLinear>,
    /// The configuration it was built from.
    #[module(skip)]
    pub config: DecoderConfig,
    #[module(skip)]
    rope: Rope,
}

impl LlamaForCausalLm {
    /// Builds the model from `config` and the checkpoint `weights` (transformers' names).
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the checkpoint and key for a missing tensor or a tensor the
    /// model does not take; [`Error::Shape`] naming the
    /// key for a tensor whose shape disagrees with the config ([`checkpoint_shapes`]); RoPE
    /// setting errors.
    pub fn from_weights(
        config: &DecoderConfig,
        weights: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let c = config;
        // Counts from config.json bound every list built below: the last layer (and expert) it
        // names must be in the weights before anything of that size is allocated.
        let names = weights.names();
        let has = |n: &str| names.iter().any(|m| m == n);
        let last = c
            .num_hidden_layers
            .checked_sub(1)
            .map(|l| format!("model.layers.{l}.input_layernorm.weight"));
        if let Some(last) = last.filter(|n| !has(n)) {
            return Err(Error::invalid(
                "config.json: key `num_hidden_layers`",
                format!(
                    "{} layers, but `{last}` is missing from the weights; the config does not belong to them",
                    c.num_hidden_layers
                ),
            ));
        }
        if let Some((experts, _)) = c.experts
            && let Some(e) = experts.checked_sub(1)
            && !has(&format!(
                "model.layers.0.block_sparse_moe.experts.{e}.w1.weight"
            ))
        {
            return Err(Error::invalid(
                "config.json: key `num_local_experts`",
                format!("{experts} experts, but the weights hold no expert {e} in layer 0"),
            ));
        }
        // One list says which tensors the model takes and their shapes.
        let shapes: HashMap<String, Vec<usize>> = checkpoint_shapes(c).into_iter().collect();
        // transformers itself ignores a tied lm_head copy and old RoPE buffers.
        let ignored = |n: &str| {
            (c.tie_word_embeddings && n == "lm_head.weight") || n.ends_with("rotary_emb.inv_freq")
        };
        check_no_extra(weights, &names, |n| shapes.contains_key(n) || ignored(n))?;
        let w = Loader {
            src: weights,
            shapes: &shapes,
            eps: c.rms_norm_eps,
            device,
        };
        // The output layer first: its host transpose briefly holds two copies of the largest
        // weight, which then costs no more than the finished model.
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(w.linear("lm_head")?)
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let dense = c.experts.is_none();
                let names = if dense {
                    &PROJECTIONS[..]
                } else {
                    &PROJECTIONS[..4]
                };
                let mut proj = Vec::with_capacity(names.len());
                for name in names {
                    proj.push(w.linear(&format!("{p}.{name}"))?);
                }
                let mut proj = proj.into_iter();
                let mut next = || {
                    proj.next()
                        .ok_or_else(|| Error::invalid("decoder layer", "a projection is missing"))
                };
                let self_attn = Attention {
                    q_proj: next()?,
                    k_proj: next()?,
                    v_proj: next()?,
                    o_proj: next()?,
                    heads: None,
                    units: UnitState::default(),
                };
                let mlp = if dense {
                    Some(Mlp {
                        gate_proj: next()?,
                        up_proj: next()?,
                        down_proj: next()?,
                        units: UnitState::default(),
                    })
                } else {
                    None
                };
                let block_sparse_moe = match c.experts {
                    Some((e, k)) => Some(w.moe(&format!("{p}.block_sparse_moe"), e, k)?),
                    None => None,
                };
                Ok(DecoderLayer {
                    input_layernorm: w.norm(&format!("{p}.input_layernorm"))?,
                    self_attn,
                    post_attention_layernorm: w.norm(&format!("{p}.post_attention_layernorm"))?,
                    mlp,
                    block_sparse_moe,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = w.tensor::<2>("model.embed_tokens.weight")?;
        // The base model is frozen (LoraLinear freezes its own weights): only adapters train.
        Ok(Self {
            model: LlamaBody {
                embed_tokens: Embedding {
                    weight: Param::from_tensor(embed),
                }
                .no_grad(),
                layers,
                norm: w.norm("model.norm")?,
            },
            lm_head,
            config: config.clone(),
            rope: Rope::new(c.head_dim, c.rope_theta, c.rope_scaling)?,
        })
    }

    /// A model with random weights for `config` (see [`checkpoint_shapes`]): for benchmarks,
    /// tests and training from scratch. Deterministic for a seed.
    ///
    /// # Errors
    /// As [`from_weights`](Self::from_weights).
    pub fn random(config: &DecoderConfig, seed: u64, device: &Device) -> Result<Self> {
        let source = RandomWeights {
            shapes: checkpoint_shapes(config),
            seed,
        };
        Self::from_weights(config, &source, device)
    }

    /// Every weight by transformers' name in PyTorch's layouts (`Linear` weights `[out, in]`),
    /// in [`checkpoint_shapes`] order: what a `model.safetensors` of this model holds. Base
    /// weights only: an adapter merged into its layer is in them, an unmerged one is not.
    pub fn base_weights(&self) -> Vec<(String, TensorData)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.model.embed_tokens.weight.val().into_data(),
        )];
        let linear = |out: &mut Vec<(String, TensorData)>, p: String, l: &LoraLinear| {
            out.push((
                format!("{p}.weight"),
                l.base.weight.val().transpose().into_data(),
            ));
            if let Some(b) = &l.base.bias {
                out.push((format!("{p}.bias"), b.val().into_data()));
            }
        };
        for (i, layer) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.gamma.val().into_data(),
            ));
            let projections = layer.projections();
            for (k, (name, l)) in projections.iter().enumerate() {
                if k == 4 {
                    out.push((
                        format!("{p}.post_attention_layernorm.weight"),
                        layer.post_attention_layernorm.gamma.val().into_data(),
                    ));
                }
                linear(&mut out, format!("{p}.{name}"), l);
            }
            if let Some(moe) = &layer.block_sparse_moe {
                out.push((
                    format!("{p}.post_attention_layernorm.weight"),
                    layer.post_attention_layernorm.gamma.val().into_data(),
                ));
                let q = format!("{p}.block_sparse_moe");
                out.push((
                    format!("{q}.gate.weight"),
                    moe.router.gate.weight.val().transpose().into_data(),
                ));
                for (j, ex) in moe.experts.iter().enumerate() {
                    // w_in is [d, 2·ff]: the gate half (w1), then the up half (w3).
                    let w_in = ex.w_in.weight.val();
                    let [d, ff2] = w_in.dims();
                    let ff = ff2 / 2;
                    let half = |r: std::ops::Range<usize>| {
                        w_in.clone().slice([0..d, r]).transpose().into_data()
                    };
                    out.push((format!("{q}.experts.{j}.w1.weight"), half(0..ff)));
                    out.push((
                        format!("{q}.experts.{j}.w2.weight"),
                        ex.w_out.weight.val().transpose().into_data(),
                    ));
                    out.push((format!("{q}.experts.{j}.w3.weight"), half(ff..ff2)));
                }
            }
        }
        out.push((
            "model.norm.weight".into(),
            self.model.norm.gamma.val().into_data(),
        ));
        if let Some(head) = &self.lm_head {
            linear(&mut out, "lm_head".into(), head);
        }
        out
    }

    /// Logits for `input_ids: [batch, seq]`, positions `0..seq` in every row: `[batch, seq,
    /// vocab]`.
    ///
    /// # Errors
    /// [`Error::IdOutOfRange`] for a token id outside the vocabulary; [`Error::Invalid`] for a
    /// sequence longer than `max_position_embeddings`; layer errors.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Result<Tensor<3>> {
        self.run(input_ids, None, None)
    }

    /// Logits for a left-padded batch: `attention_mask: [batch, seq]` is 1 on tokens and 0
    /// on padding. As in transformers' generation, positions count the unmasked tokens only
    /// (`cumsum(mask) - 1`) and no token attends to padding, so a padded row's logits at its
    /// tokens equal those of the row without padding. Logits at padded positions are
    /// meaningless.
    ///
    /// # Errors
    /// As [`forward`](Self::forward); [`Error::Shape`] for a mask of another shape;
    /// [`Error::Invalid`] for mask values other than 0 and 1.
    pub fn forward_masked(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Tensor<2, Int>,
    ) -> Result<Tensor<3>> {
        self.run(input_ids, Some(attention_mask), None)
    }

    /// Logits where sequence `i` of the batch uses adapter `adapters[i]` (`None`: the base
    /// model), as PEFT's `adapter_names`: every adapted layer computes each adapter on its own
    /// sequences in one gathered pass, and a layer without that adapter gives those sequences
    /// its base output. The dispatch plan is built once per forward for every set of layers
    /// that hold the same adapters, and reused by all of them. Active flags are ignored; no
    /// adapter may be merged. An `attention_mask` works as in
    /// [`forward_masked`](Self::forward_masked).
    ///
    /// # Errors
    /// As [`forward_masked`](Self::forward_masked); [`Error::Shape`] for a name count other
    /// than the batch size; [`Error::UnknownAdapter`] for a name no layer holds;
    /// [`Error::AlreadyMerged`].
    pub fn forward_mixed(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: &[Option<&str>],
    ) -> Result<Tensor<3>> {
        let mix = self.mix(input_ids.dims()[0], adapters)?;
        self.run(input_ids, attention_mask, Some(&mix))
    }

    /// Logits for the new tokens `input_ids: [batch, new]` after those `cache` holds (none
    /// for an empty cache), which then holds these too: incremental decoding. `attention_mask`
    /// (`[batch, new]`, 0 on left padding) works as in [`forward_masked`](Self::forward_masked)
    /// and its zeros stay masked for every later step; `adapters` as in
    /// [`forward_mixed`](Self::forward_mixed) (`None`: every layer's active adapters). Only
    /// the logits of the last position are computed when `last_only` (`[batch, 1, vocab]`),
    /// which is all generation needs.
    ///
    /// # Errors
    /// As [`forward_mixed`](Self::forward_mixed); [`Error::Invalid`] when the cache and the
    /// new tokens together exceed `max_position_embeddings`; [`Error::Shape`] for a cache of
    /// another batch size.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor<3>> {
        let mix = match adapters {
            Some(names) => Some(self.mix(input_ids.dims()[0], names)?),
            None => None,
        };
        self.run_cached(input_ids, attention_mask, mix.as_ref(), cache, last_only)
    }

    /// Logits of the input tokens when sequence `i` is preceded by the soft tokens
    /// `prompts[i]` (prompt tuning, PEFT's `PROMPT_TUNING`; `None`: no prompt): `[batch, seq,
    /// vocab]`, PEFT's logits without the prompt positions. Shorter prompts are left-padded,
    /// so rows with different prompts or none share the batch (a row without a prompt gets
    /// the plain forward's logits). `attention_mask` and `adapters` work as in
    /// [`forward_cached`](Self::forward_cached), the adapters for the prompt positions too.
    /// Gradients reach the prompts.
    ///
    /// # Errors
    /// As [`forward_cached`](Self::forward_cached) and
    /// [`prefill_prompts`](Self::prefill_prompts).
    pub fn forward_prompted(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        prompts: &[Option<&PromptEmbedding>],
        adapters: Option<&[Option<&str>]>,
    ) -> Result<Tensor<3>> {
        let mut cache = KvCache::new();
        self.prefill_prompts(prompts, adapters, &mut cache)?;
        self.forward_cached(input_ids, attention_mask, adapters, &mut cache, false)
    }

    /// Feeds each sequence's soft prompt (left-padded to the longest) into an empty `cache`,
    /// so that [`forward_cached`](Self::forward_cached) and
    /// [`generate_after`](super::generate_after) continue after it; returns the logits at the
    /// prompt positions, `[batch, P_max, vocab]` (PEFT returns them before the tokens').
    ///
    /// # Errors
    /// [`Error::Invalid`] for a cache that is not empty or no prompt at all; [`Error::Shape`]
    /// for a prompt whose width is not the hidden size or an adapter count other than the
    /// prompt count; as [`forward_cached`](Self::forward_cached).
    pub fn prefill_prompts(
        &self,
        prompts: &[Option<&PromptEmbedding>],
        adapters: Option<&[Option<&str>]>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        if !cache.is_empty() {
            return Err(Error::invalid(
                "prefill_prompts cache",
                "the cache already holds positions; prompts go first, into an empty cache",
            ));
        }
        let device = self.model.embed_tokens.weight.device();
        let (x, mask) = batch_prompts(prompts, self.config.hidden_size, &device)?;
        let mix = match adapters {
            Some(names) => Some(self.mix(prompts.len(), names)?),
            None => None,
        };
        self.run_embedded(x, Some(mask), mix.as_ref(), cache, false)
    }

    /// The mixed-adapter state for a batch of `b` sequences, after checking the names.
    fn mix<'a>(&self, b: usize, adapters: &'a [Option<&'a str>]) -> Result<Mix<'a>> {
        Mix::new(self, b, adapters)
    }

    fn run(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        mix: Option<&Mix<'_>>,
    ) -> Result<Tensor<3>> {
        let mut cache = KvCache::new();
        self.run_cached(input_ids, attention_mask, mix, &mut cache, false)
    }

    fn run_cached(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        mix: Option<&Mix<'_>>,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor<3>> {
        check_ids(
            input_ids.clone(),
            "token id",
            "the model's vocabulary",
            self.config.vocab_size,
        )?;
        let x = self.model.embed_tokens.forward(input_ids);
        self.run_embedded(x, attention_mask, mix, cache, last_only)
    }

    /// [`run_cached`](Self::run_cached) from input embeddings `x: [batch, new, d]`.
    fn run_embedded(
        &self,
        mut x: Tensor<3>,
        attention_mask: Option<Tensor<2, Int>>,
        mix: Option<&Mix<'_>>,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor<3>> {
        let [b, s, _] = x.dims();
        let c = &self.config;
        let device = x.device();
        let (positions, blocked) = cache.advance(
            attention_mask,
            [b, s],
            c.max_position_embeddings,
            c.sliding_window,
            &device,
        )?;
        let (cos, sin) = self.rope.cos_sin(positions);
        for (l, layer) in self.model.layers.iter().enumerate() {
            let a = layer.input_layernorm.forward(x.clone());
            x = x + self.attention(&layer.self_attn, a, &cos, &sin, &blocked, mix, cache, l)?;
            let m = layer.post_attention_layernorm.forward(x.clone());
            if let Some(mlp) = &layer.mlp {
                let g = linear(&mlp.gate_proj, m.clone(), mix)?;
                let hidden = burn::tensor::activation::silu(g) * linear(&mlp.up_proj, m, mix)?;
                let hidden = mlp.units.apply(hidden, 2)?;
                x = x + linear(&mlp.down_proj, hidden, mix)?;
            } else if let Some(moe) = &layer.block_sparse_moe {
                let d = c.hidden_size;
                let (y, _) = moe.forward(m.reshape([b * s, d]))?;
                x = x + y.reshape([b, s, d]);
            }
        }
        let x = if last_only && s > 1 {
            x.slice([0..b, s - 1..s])
        } else {
            x
        };
        let x = self.model.norm.forward(x);
        match &self.lm_head {
            Some(head) => linear(head, x, mix),
            None => {
                let e = self
                    .model
                    .embed_tokens
                    .weight
                    .val()
                    .transpose()
                    .unsqueeze::<3>();
                Ok(x.matmul(e))
            }
        }
    }

    /// Attention of the new positions over the cached and new keys of layer `l` (the new keys
    /// and values are appended to `cache`).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        attn: &Attention,
        x: Tensor<3>,
        cos: &Tensor<3>,
        sin: &Tensor<3>,
        blocked: &Tensor<3, Bool>,
        mix: Option<&Mix<'_>>,
        cache: &mut KvCache,
        l: usize,
    ) -> Result<Tensor<3>> {
        let [b, s, _] = x.dims();
        let t = blocked.dims()[2];
        let c = &self.config;
        let (h, kv, hd) = match &attn.heads {
            Some(l) => (l.kv_of.len(), l.kv_heads, c.head_dim),
            None => (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        };
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let q = linear(&attn.q_proj, x.clone(), mix)?;
        let k = linear(&attn.k_proj, x.clone(), mix)?;
        let v = heads(linear(&attn.v_proj, x, mix)?, kv);
        let q = self.rope.apply(heads(q, h), cos, sin)?;
        let k = self.rope.apply(heads(k, kv), cos, sin)?;
        let (k, v) = cache.append(l, k, v);
        let blocked = blocked.clone().unsqueeze_dim::<4>(1).expand([b, h, s, t]);
        // The most negative finite value, as transformers: a padded query row that sees
        // nothing gets a uniform (finite) softmax instead of NaN.
        let out = match attn.heads.as_ref().filter(|l| !grouped(l)) {
            None => {
                // Key/value head j serves query heads j·g .. (j+1)·g (transformers'
                // repeat_kv). Those g heads are consecutive, so they attend as g·s query rows
                // of head j: the keys and values are read in place, never repeated.
                let g = h / kv;
                let q = q.reshape([b, kv, g * s, hd]);
                let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
                let scores = scores.reshape([b, h, s, t]).mask_fill(blocked, f32::MIN);
                let p = softmax(scores, 3).reshape([b, kv, g * s, t]);
                p.matmul(v).reshape([b, h, s, hd])
            }
            Some(layout) => {
                // Pruned unevenly: each query head reads its own key/value head.
                let ids: Vec<i64> = layout.kv_of.iter().map(|&j| j as i64).collect();
                let ids = crate::tensor_util::int_tensor(&ids, &q.device());
                let (k, v) = (k.select(1, ids.clone()), v.select(1, ids));
                let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
                softmax(scores.mask_fill(blocked, f32::MIN), 3).matmul(v)
            }
        };
        let out = attn.units.apply(out, 1)?;
        linear(
            &attn.o_proj,
            out.swap_dims(1, 2).reshape([b, s, h * hd]),
            mix,
        )
    }
}

/// Whether `layout` is the regular grouping the fast path computes: the same number of
/// consecutive query heads for every key/value head.
fn grouped(layout: &HeadLayout) -> bool {
    let (h, kv) = (layout.kv_of.len(), layout.kv_heads);
    kv > 0
        && h.is_multiple_of(kv)
        && layout
            .kv_of
            .iter()
            .enumerate()
            .all(|(i, &j)| j == i / (h / kv))
}

/// The keys and values of the positions a decoder has seen, per layer, for incremental
/// decoding ([`LlamaForCausalLm::forward_cached`]), with each sequence's padding and token
/// count.
///
/// # Shapes
/// - per layer: keys and values `[batch, kv_heads, len, head_dim]` (keys after RoPE)
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<(Tensor<4>, Tensor<4>)>,
    batch: usize,
    length: usize,
    /// `[batch · length]`: true where a cached position is padding.
    padding: Vec<bool>,
    /// Per sequence, the unmasked tokens seen so far.
    seen: Vec<i64>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `dims = [batch, new]` new positions (padding where `attention_mask` holds 0):
    /// returns their positions (unmasked tokens counted so far, 1 on padding, as transformers'
    /// generation) and the attention mask `[batch, new, len]`, true where new query `i` may
    /// not see key `j` (a later key, a padded key, or one `window` or more behind), and
    /// extends the cache's bookkeeping (the layers' keys and values are the model's to append).
    ///
    /// # Errors
    /// [`Error::Invalid`] when the cache and the new positions exceed `max_positions`;
    /// [`Error::Shape`] for another batch size than the cache's or a mask of another shape;
    /// mask values other than 0 and 1.
    pub(super) fn advance(
        &mut self,
        attention_mask: Option<Tensor<2, Int>>,
        dims: [usize; 2],
        max_positions: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<(Tensor<2, Int>, Tensor<3, Bool>)> {
        let [b, s] = dims;
        let t0 = self.length;
        if t0 + s > max_positions {
            return Err(Error::invalid(
                "sequence length",
                format!(
                    "{} tokens exceed the model's {max_positions} positions \
                     (max_position_embeddings)",
                    t0 + s
                ),
            ));
        }
        if t0 > 0 && self.batch != b {
            return Err(Error::shape(
                "forward_cached batch (the cache's)",
                self.batch.to_string(),
                b.to_string(),
            ));
        }
        let mask = match attention_mask {
            None => vec![1; b * s],
            Some(m) => mask_values(m, [b, s])?,
        };
        if t0 == 0 {
            self.batch = b;
            self.seen = vec![0; b];
        }
        let mut positions = Vec::with_capacity(b * s);
        for (r, row) in mask.chunks(s.max(1)).enumerate() {
            for &m in row {
                self.seen[r] += m;
                positions.push(if m == 0 { 1 } else { self.seen[r] - 1 });
            }
        }
        let t = t0 + s;
        let mut padded = Vec::with_capacity(b * t);
        for r in 0..b {
            padded.extend_from_slice(&self.padding[r * t0..(r + 1) * t0]);
            padded.extend(mask[r * s..(r + 1) * s].iter().map(|&m| m == 0));
        }
        let blocked: Vec<bool> = (0..b)
            .flat_map(|r| {
                let padded = &padded[r * t..(r + 1) * t];
                (0..s).flat_map(move |i| {
                    let q = t0 + i;
                    (0..t).map(move |j| j > q || window.is_some_and(|w| j + w <= q) || padded[j])
                })
            })
            .collect();
        self.padding = padded;
        self.length = t;
        Ok((
            crate::tensor_util::int_tensor(&positions, device).reshape([b, s]),
            Tensor::<3, Bool>::from_data(TensorData::new(blocked, [b, s, t]), device),
        ))
    }

    /// Layer `l`'s keys and values with `k`, `v` (`[batch, kv_heads, new, head_dim]`)
    /// appended; the cache keeps them.
    pub(super) fn append(
        &mut self,
        l: usize,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match self.layers.get(l) {
            Some((pk, pv)) => (
                Tensor::cat(vec![pk.clone(), k], 2),
                Tensor::cat(vec![pv.clone(), v], 2),
            ),
            None => (k, v),
        };
        if l < self.layers.len() {
            self.layers[l] = (k.clone(), v.clone());
        } else {
            self.layers.push((k.clone(), v.clone()));
        }
        (k, v)
    }

    /// The positions cached (padding included).
    pub fn len(&self) -> usize {
        self.length
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }
}

impl LinearLayers for LlamaForCausalLm {
    fn linear_layers(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter().enumerate() {
            for (name, layer) in l.projections() {
                out.push((format!("model.layers.{i}.{name}"), layer));
            }
        }
        if let Some(head) = &self.lm_head {
            out.push(("lm_head".into(), head));
        }
        out
    }

    fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            for (name, layer) in l.projections_mut() {
                out.push((format!("model.layers.{i}.{name}"), layer));
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".into(), head));
        }
        out
    }

    fn output_layer(&self) -> Option<&str> {
        self.lm_head.as_ref().map(|_| "lm_head")
    }
}

/// Tensor `key` of `weights`, checked against the shape `want` the config implies (`None`: the
/// model does not take it). The one shape check every model's loader uses.
///
/// # Errors
/// [`Error::Invalid`] naming the checkpoint and key for a tensor the model does not take or
/// one the checkpoint lacks; [`Error::Shape`] for another shape.
pub(super) fn read_checked(
    weights: &dyn WeightSource,
    key: &str,
    want: Option<&[usize]>,
) -> Result<TensorData> {
    let what = || format!("{}: key `{key}`", weights.describe());
    let want = want.ok_or_else(|| Error::invalid(what(), "not a tensor of this model"))?;
    let data = weights
        .weight(key)?
        .ok_or_else(|| Error::invalid(what(), "missing from the checkpoint"))?;
    if data.shape().as_slice() != want {
        return Err(Error::shape(
            format!("{} (from config.json)", what()),
            format!("{want:?}"),
            format!("{:?}", data.shape().as_slice()),
        ));
    }
    Ok(data)
}

/// An error naming the first of `names` that `takes` refuses: a checkpoint must hold no
/// tensor its model does not take.
pub(super) fn check_no_extra(
    weights: &dyn WeightSource,
    names: &[String],
    takes: impl Fn(&str) -> bool,
) -> Result<()> {
    match names.iter().find(|n| !takes(n)) {
        Some(extra) => Err(Error::invalid(
            format!("{}: key `{extra}`", weights.describe()),
            "the checkpoint holds a tensor this model does not take; is config.json the \
             checkpoint's own?",
        )),
        None => Ok(()),
    }
}

/// Reads tensors from a [`WeightSource`], checking each against the shape the config implies.
struct Loader<'a> {
    src: &'a dyn WeightSource,
    shapes: &'a HashMap<String, Vec<usize>>,
    eps: f64,
    device: &'a Device,
}

impl Loader<'_> {
    /// Whether the model takes a tensor `name` (a bias, say).
    fn takes(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    fn tensor<const D: usize>(&self, name: &str) -> Result<Tensor<D>> {
        self.tensor_with(name, |d| d)
    }

    /// Tensor `name`, checked against its shape, with `f` applied to the host data first.
    fn tensor_with<const D: usize>(
        &self,
        name: &str,
        f: impl FnOnce(TensorData) -> TensorData,
    ) -> Result<Tensor<D>> {
        let data = read_checked(self.src, name, self.shapes.get(name).map(Vec::as_slice))?;
        Ok(Tensor::from_data(f(data), self.device))
    }

    /// A PyTorch-layout `Linear` (`weight: [out, in]`) as a [`LoraLinear`] without adapters.
    /// The weight is stored contiguous in burn's `[in, out]` layout (transposed on the host
    /// while loading): a strided transposed view would make every small-batch product (decoding)
    /// read it three times slower.
    fn linear(&self, prefix: &str) -> Result<LoraLinear> {
        let w: Tensor<2> = self.tensor_with(&format!("{prefix}.weight"), |data| {
            let [o, i] = [data.shape()[0], data.shape()[1]];
            // After `convert` the dtype is f32, so `into_vec` cannot fail.
            let values: Vec<f32> = data
                .convert::<f32>()
                .try_into_vec::<f32>()
                .unwrap_or_default();
            TensorData::new(transpose_host(&values, o, i), [i, o])
        })?;
        let bias = format!("{prefix}.bias");
        let b = if self.takes(&bias) {
            Some(Param::from_tensor(self.tensor::<1>(&bias)?))
        } else {
            None
        };
        Ok(LoraLinear::new(Linear {
            weight: Param::from_tensor(w),
            bias: b,
        }))
    }

    /// Mixtral's `block_sparse_moe` at `prefix`: the router `gate` (`[E, d]`) and E SwiGLU
    /// experts (`w1` gate and `w3` up `[ff, d]`, `w2` down `[d, ff]`), in burn's layouts.
    fn moe(&self, prefix: &str, e: usize, k: usize) -> Result<MoeLayer> {
        let gate: Tensor<2> = self.tensor(&format!("{prefix}.gate.weight"))?;
        let d = gate.dims()[1];
        let mut router = TopKRouterConfig::new(d, e)
            .with_k(k)
            .with_renormalize(true)
            .with_load_balance_coef(0.0)
            .with_z_loss_coef(0.0)
            .init(self.device)?;
        router.gate = Linear {
            weight: Param::from_tensor(gate.transpose()),
            bias: None,
        };
        let experts = (0..e)
            .map(|j| {
                let p = format!("{prefix}.experts.{j}");
                let w = |n: &str| self.tensor::<2>(&format!("{p}.{n}.weight"));
                let (w1, w2, w3) = (w("w1")?, w("w2")?, w("w3")?);
                Ok(Expert {
                    w_in: Linear {
                        weight: Param::from_tensor(Tensor::cat(
                            vec![w1.transpose(), w3.transpose()],
                            1,
                        )),
                        bias: None,
                    },
                    w_out: Linear {
                        weight: Param::from_tensor(w2.transpose()),
                        bias: None,
                    },
                    kind: ExpertKind::SwiGlu,
                    activation: AdapterActivation::Swish,
                    hidden_mask: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MoeLayer::with_router(router, experts)?.no_grad())
    }

    fn norm(&self, prefix: &str) -> Result<RmsNorm> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.tensor(&format!("{prefix}.weight"))?),
            epsilon: self.eps,
        }
        .no_grad())
    }
}
