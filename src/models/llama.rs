//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as transformers computes it, with every
//! projection a [`LoraLinear`] so that adapters attach by the Hugging Face module path.
//!
//! # The math
//! Per layer, with RMSNorm `n(x) = x / sqrt(mean(x²) + ε) ⊙ g`:
//!
//! - `h = x + o_proj(attn(n₁(x)))`, where attention uses rotary positions on q and k
//!   ([`Rope`]), grouped-query heads (each key/value head serves
//!   `num_attention_heads / num_key_value_heads` query heads), a causal mask (and Mistral's
//!   sliding window), and `softmax(q kᵀ / sqrt(head_dim)) v`;
//! - `y = h + down_proj(silu(gate_proj(n₂(h))) ⊙ up_proj(n₂(h)))`.
//!
//! The logits are `lm_head(n(h_L))`, or the transposed token embedding when the config ties
//! them. Module paths follow transformers' (`model.layers.3.self_attn.q_proj`, `lm_head`), so
//! they equal PEFT's keys.
//!
//! # Shapes
//! - input ids: `[batch, seq]` (Int); logits: `[batch, seq, vocab_size]`

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear, RmsNorm};
use burn::tensor::activation::softmax;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::LinearLayers;
use super::config::{DecoderConfig, DecoderFamily};
use super::rope::Rope;
use crate::error::{Error, Result, Scope};
use crate::modules::lora::LoraLinear;
use crate::rng::SplitMix64;
use crate::routing::{DispatchPlan, Routing};
use crate::tensor_util::to_vec_i64;

/// Where a model's weights come from: a checkpoint by its Hugging Face names, in PyTorch's
/// layouts (`Linear` weights `[out, in]`). The `io` layer implements it for safetensors files.
pub trait WeightSource {
    /// The tensor `name` as `f32` values with its shape, or `None` if the checkpoint lacks it.
    fn weight(&self, name: &str) -> Option<TensorData>;

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
    let (hd, h, kv) = (c.head_dim, c.num_attention_heads, c.num_key_value_heads);
    let (d, ff) = (c.hidden_size, c.intermediate_size);
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
        linear(
            &mut out,
            format!("{p}.self_attn.q_proj"),
            d,
            h * hd,
            c.qkv_bias,
        );
        linear(
            &mut out,
            format!("{p}.self_attn.k_proj"),
            d,
            kv * hd,
            c.qkv_bias,
        );
        linear(
            &mut out,
            format!("{p}.self_attn.v_proj"),
            d,
            kv * hd,
            c.qkv_bias,
        );
        linear(
            &mut out,
            format!("{p}.self_attn.o_proj"),
            h * hd,
            d,
            c.o_bias,
        );
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        linear(&mut out, format!("{p}.mlp.gate_proj"), d, ff, c.mlp_bias);
        linear(&mut out, format!("{p}.mlp.up_proj"), d, ff, c.mlp_bias);
        linear(&mut out, format!("{p}.mlp.down_proj"), ff, d, c.mlp_bias);
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
    fn weight(&self, name: &str) -> Option<TensorData> {
        let i = self.shapes.iter().position(|(n, _)| n == name)?;
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
        Some(TensorData::new(values, shape))
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
    /// Feed-forward block.
    pub mlp: Mlp,
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
    /// [`Error::Invalid`] naming the checkpoint and key for a missing tensor, a tensor the
    /// model does not take, or a Mixtral config (not built yet); [`Error::Shape`] naming the
    /// key for a tensor whose shape disagrees with the config ([`checkpoint_shapes`]); RoPE
    /// setting errors.
    pub fn from_weights(
        config: &DecoderConfig,
        weights: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        if config.family == DecoderFamily::Mixtral {
            return Err(Error::invalid(
                "model_type `mixtral`",
                "the Mixtral decoder is not built yet (its config reads)",
            ));
        }
        let c = config;
        // One list says which tensors the model takes and their shapes.
        let shapes: HashMap<String, Vec<usize>> = checkpoint_shapes(c).into_iter().collect();
        // transformers itself ignores a tied lm_head copy and old RoPE buffers.
        let ignored = |n: &str| {
            (c.tie_word_embeddings && n == "lm_head.weight") || n.ends_with("rotary_emb.inv_freq")
        };
        if let Some(extra) = weights
            .names()
            .into_iter()
            .find(|n| !shapes.contains_key(n) && !ignored(n))
        {
            return Err(Error::invalid(
                format!("{}: key `{extra}`", weights.describe()),
                "the checkpoint holds a tensor this model does not take; is config.json the \
                 checkpoint's own?",
            ));
        }
        let w = Loader {
            src: weights,
            shapes: &shapes,
            eps: c.rms_norm_eps,
            device,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(DecoderLayer {
                    input_layernorm: w.norm(&format!("{p}.input_layernorm"))?,
                    self_attn: Attention {
                        q_proj: w.linear(&format!("{p}.self_attn.q_proj"))?,
                        k_proj: w.linear(&format!("{p}.self_attn.k_proj"))?,
                        v_proj: w.linear(&format!("{p}.self_attn.v_proj"))?,
                        o_proj: w.linear(&format!("{p}.self_attn.o_proj"))?,
                    },
                    post_attention_layernorm: w.norm(&format!("{p}.post_attention_layernorm"))?,
                    mlp: Mlp {
                        gate_proj: w.linear(&format!("{p}.mlp.gate_proj"))?,
                        up_proj: w.linear(&format!("{p}.mlp.up_proj"))?,
                        down_proj: w.linear(&format!("{p}.mlp.down_proj"))?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = w.tensor::<2>("model.embed_tokens.weight")?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(w.linear("lm_head")?)
        };
        Ok(Self {
            model: LlamaBody {
                embed_tokens: Embedding {
                    weight: Param::from_tensor(embed),
                },
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
        let b = input_ids.dims()[0];
        if adapters.len() != b {
            return Err(Error::shape(
                "LlamaForCausalLm::forward_mixed (one adapter name or None per sequence)",
                b.to_string(),
                adapters.len().to_string(),
            ));
        }
        let known: BTreeSet<&str> = self
            .linear_layers()
            .flat_map(|l| l.names().iter().map(String::as_str))
            .collect();
        if let Some(bad) = adapters.iter().flatten().find(|n| !known.contains(**n)) {
            return Err(Error::UnknownAdapter {
                name: bad.to_string(),
                scope: Scope::Layer,
                known: known.iter().map(|s| s.to_string()).collect(),
            });
        }
        let mix = Mix {
            adapters,
            plans: RefCell::new(HashMap::new()),
        };
        self.run(input_ids, attention_mask, Some(&mix))
    }

    /// Every linear layer, in module order.
    fn linear_layers(&self) -> impl Iterator<Item = &LoraLinear> {
        self.model
            .layers
            .iter()
            .flat_map(|l| {
                let (a, m) = (&l.self_attn, &l.mlp);
                [
                    &a.q_proj,
                    &a.k_proj,
                    &a.v_proj,
                    &a.o_proj,
                    &m.gate_proj,
                    &m.up_proj,
                    &m.down_proj,
                ]
            })
            .chain(self.lm_head.as_ref())
    }

    fn run(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        mix: Option<&Mix<'_>>,
    ) -> Result<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let c = &self.config;
        let ids = to_vec_i64(input_ids.clone());
        if let Some(&bad) = ids.iter().find(|&&t| t < 0 || t as usize >= c.vocab_size) {
            return Err(Error::IdOutOfRange {
                what: "token id",
                within: "the model's vocabulary",
                id: bad,
                bound: c.vocab_size,
            });
        }
        if s > c.max_position_embeddings {
            return Err(Error::invalid(
                "sequence length",
                format!(
                    "{s} tokens exceed max_position_embeddings = {}",
                    c.max_position_embeddings
                ),
            ));
        }
        let device = input_ids.device();
        let (positions, padding) = match attention_mask {
            None => (
                Tensor::<1, Int>::arange(0..s as i64, &device)
                    .reshape([1, s])
                    .expand([b, s]),
                None,
            ),
            Some(m) => {
                let (positions, padding) = padded_positions(m, [b, s])?;
                (positions, Some(padding))
            }
        };
        let (cos, sin) = self.rope.cos_sin(positions);
        // [b, s, s]: true where query i may not see key j.
        let causal = causal_mask(s, c.sliding_window, &device)
            .unsqueeze::<3>()
            .expand([b, s, s]);
        let mask = match padding {
            Some(p) => causal.bool_or(p.unsqueeze_dim::<3>(1).expand([b, s, s])),
            None => causal,
        };
        let mut x = self.model.embed_tokens.forward(input_ids);
        for layer in &self.model.layers {
            let a = layer.input_layernorm.forward(x.clone());
            x = x + self.attention(&layer.self_attn, a, &cos, &sin, &mask, mix)?;
            let m = layer.post_attention_layernorm.forward(x.clone());
            let mlp = &layer.mlp;
            let g = linear(&mlp.gate_proj, m.clone(), mix)?;
            let hidden = burn::tensor::activation::silu(g) * linear(&mlp.up_proj, m, mix)?;
            x = x + linear(&mlp.down_proj, hidden, mix)?;
        }
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

    fn attention(
        &self,
        attn: &Attention,
        x: Tensor<3>,
        cos: &Tensor<3>,
        sin: &Tensor<3>,
        mask: &Tensor<3, Bool>,
        mix: Option<&Mix<'_>>,
    ) -> Result<Tensor<3>> {
        let [b, s, _] = x.dims();
        let c = &self.config;
        let (h, kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let heads = |t: Tensor<3>, n: usize| t.reshape([b, s, n, hd]).swap_dims(1, 2);
        let q = linear(&attn.q_proj, x.clone(), mix)?;
        let k = linear(&attn.k_proj, x.clone(), mix)?;
        let v = heads(linear(&attn.v_proj, x, mix)?, kv);
        let q = self.rope.apply(heads(q, h), cos, sin)?;
        let k = self.rope.apply(heads(k, kv), cos, sin)?;
        // Key/value head j serves query heads j·g .. (j+1)·g (transformers' repeat_kv).
        let g = h / kv;
        let repeat = |t: Tensor<4>| {
            t.unsqueeze_dim::<5>(2)
                .expand([b, kv, g, s, hd])
                .reshape([b, h, s, hd])
        };
        let (k, v) = (repeat(k), repeat(v));
        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
        let scores = scores.mask_fill(
            mask.clone().unsqueeze_dim::<4>(1).expand([b, h, s, s]),
            // The most negative finite value, as transformers: a padded query row that sees
            // nothing gets a uniform (finite) softmax instead of NaN.
            f32::MIN,
        );
        let out = softmax(scores, 3).matmul(v);
        linear(
            &attn.o_proj,
            out.swap_dims(1, 2).reshape([b, s, h * hd]),
            mix,
        )
    }
}

impl LinearLayers for LlamaForCausalLm {
    fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            out.push((format!("{p}.self_attn.q_proj"), &mut a.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut a.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut a.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut a.o_proj));
            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate_proj));
            out.push((format!("{p}.mlp.up_proj"), &mut m.up_proj));
            out.push((format!("{p}.mlp.down_proj"), &mut m.down_proj));
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

/// A mixed-adapter batch: the adapter of each sequence, and one plan per set of adapter
/// names a layer can hold (layers that hold the same adapters share it).
struct Mix<'a> {
    adapters: &'a [Option<&'a str>],
    plans: RefCell<HashMap<Vec<String>, DispatchPlan>>,
}

/// `layer(x)` for `x: [batch, seq, d_in]`, each sequence through its own adapter under `mix`.
fn linear(layer: &LoraLinear, x: Tensor<3>, mix: Option<&Mix<'_>>) -> Result<Tensor<3>> {
    let [b, s, d_in] = x.dims();
    let names = layer.names();
    let Some(mix) = mix.filter(|_| !names.is_empty()) else {
        // One [b·s, d_in] product, the rows the mixed path sees too.
        let y = layer.forward(x.reshape([b * s, d_in]))?;
        return Ok(y.reshape([b, s, layer.d_out()]));
    };
    let mut plans = mix.plans.borrow_mut();
    let plan = match plans.entry(names.to_vec()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            // A sequence whose adapter this layer lacks takes the base output (-1), as PEFT.
            let ids: Vec<i64> = mix
                .adapters
                .iter()
                .map(|a| {
                    a.and_then(|a| names.iter().position(|n| n == a))
                        .map_or(-1, |i| i as i64)
                })
                .collect();
            let routing = Routing::one_per_row(&ids, names.len(), &x.device())?;
            e.insert(DispatchPlan::per_sequence(&routing, s)?)
        }
    };
    let y = layer.forward_planned(x.reshape([b * s, d_in]), plan)?;
    Ok(y.reshape([b, s, layer.d_out()]))
}

/// Positions `cumsum(mask) - 1` (1 on padding, as transformers' generation) and the padded
/// keys (`true`), from a 0/1 `attention_mask` of shape `dims`.
fn padded_positions(
    mask: Tensor<2, Int>,
    dims: [usize; 2],
) -> Result<(Tensor<2, Int>, Tensor<2, Bool>)> {
    if mask.dims() != dims {
        return Err(Error::shape(
            "attention_mask (the shape of input_ids)",
            format!("{dims:?}"),
            format!("{:?}", mask.dims()),
        ));
    }
    let device = mask.device();
    let values = to_vec_i64(mask);
    if let Some(v) = values.iter().find(|&&v| v != 0 && v != 1) {
        return Err(Error::invalid(
            "attention_mask",
            format!("{v}: the mask holds 1 for tokens and 0 for padding"),
        ));
    }
    let [b, s] = dims;
    let mut positions = Vec::with_capacity(b * s);
    for row in values.chunks(s.max(1)) {
        let mut seen = 0i64;
        for &m in row {
            seen += m;
            positions.push(if m == 0 { 1 } else { seen - 1 });
        }
    }
    let padding: Vec<bool> = values.iter().map(|&v| v == 0).collect();
    Ok((
        crate::tensor_util::int_tensor(&positions, &device).reshape([b, s]),
        Tensor::from_data(TensorData::new(padding, [b, s]), &device),
    ))
}

/// `true` where query `i` may not see key `j`: `j > i`, or `i - j ≥ window`.
fn causal_mask(s: usize, window: Option<usize>, device: &Device) -> Tensor<2, Bool> {
    let v: Vec<bool> = (0..s)
        .flat_map(|i| (0..s).map(move |j| j > i || window.is_some_and(|w| i - j >= w)))
        .collect();
    Tensor::from_data(TensorData::new(v, [s, s]), device)
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
        let missing =
            |why: &str| Error::invalid(format!("{}: key `{name}`", self.src.describe()), why);
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| missing("not a tensor of this model"))?;
        let data = self
            .src
            .weight(name)
            .ok_or_else(|| missing("missing from the checkpoint"))?;
        if data.shape().as_slice() != shape.as_slice() {
            return Err(Error::shape(
                format!("{}: `{name}` (from config.json)", self.src.describe()),
                format!("{shape:?}"),
                format!("{:?}", data.shape().as_slice()),
            ));
        }
        Ok(Tensor::from_data(data, self.device))
    }

    /// A PyTorch-layout `Linear` (`weight: [out, in]`) as a [`LoraLinear`] without adapters.
    fn linear(&self, prefix: &str) -> Result<LoraLinear> {
        let w: Tensor<2> = self.tensor(&format!("{prefix}.weight"))?;
        let bias = format!("{prefix}.bias");
        let b = if self.takes(&bias) {
            Some(Param::from_tensor(self.tensor::<1>(&bias)?))
        } else {
            None
        };
        Ok(LoraLinear::new(Linear {
            weight: Param::from_tensor(w.transpose()),
            bias: b,
        }))
    }

    fn norm(&self, prefix: &str) -> Result<RmsNorm> {
        Ok(RmsNorm {
            gamma: Param::from_tensor(self.tensor(&format!("{prefix}.weight"))?),
            epsilon: self.eps,
        })
    }
}
