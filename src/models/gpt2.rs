//! GPT-2 (`GPT2LMHeadModel`) as transformers computes it, with every `Conv1D` a [`LoraLinear`]
//! at its Hugging Face path (`transformer.h.0.attn.c_attn`, …) so PEFT folders attach by their
//! keys (PEFT marks these layers `fan_in_fan_out`: their weights are stored `[in, out]`, which
//! is burn's own layout, so they load without a transpose).
//!
//! # The math
//! Radford et al., "Language Models are Unsupervised Multitask Learners" (2019). With
//! pre-LayerNorm `LN` and `gelu_new` (the tanh approximation):
//!
//! - `h₀ = wte[ids] + wpe[positions]` (learned positions; with an attention mask they count
//!   the unmasked tokens, as transformers' generation);
//! - per layer, `q, k, v = split(c_attn(LN₁(h)))`, `h = h + c_proj(softmax(q kᵀ/√d_head + m) v)`
//!   with a causal mask `m` (and padded keys masked), then
//!   `h = h + mlp.c_proj(gelu_new(mlp.c_fc(LN₂(h))))`;
//! - logits `LN_f(h) wteᵀ` (the output layer is tied to the token embedding).
//!
//! # Shapes
//! - input ids, attention mask: `[batch, seq]` (Int); logits `[batch, seq, vocab]`

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::{gelu_approximate, softmax};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::LinearLayers;
use super::config::{Reader, config_object};
use super::generate::{CausalLm, GenerationConfig};
use super::llama::{KvCache, WeightSource, check_no_extra, read_checked};
use super::mixed::{Mix, check_ids, linear};
use crate::error::Result;
use crate::modules::lora::LoraLinear;

/// The values a GPT-2 model is built from (`config.json` of `model_type: gpt2`).
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width (`n_embd`).
    pub n_embd: usize,
    /// Layers (`n_layer`).
    pub n_layer: usize,
    /// Attention heads (`n_head`).
    pub n_head: usize,
    /// Positions the learned table covers (`n_positions`).
    pub n_positions: usize,
    /// Feed-forward width (`n_inner`, default `4 · n_embd`).
    pub n_inner: usize,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// The token ids that end a generated sequence (`eos_token_id`).
    pub eos_token_ids: Vec<i64>,
}

impl Gpt2Config {
    /// Reads a `config.json` document; `path` names the file in errors.
    ///
    /// # Errors
    /// [`Error::Invalid`](crate::Error::Invalid) naming the file and key for a `model_type` other
    /// than `gpt2`, an activation other than `gelu_new`, the attention variants modula does not
    /// compute (`scale_attn_by_inverse_layer_idx`, `reorder_and_upcast_attn`, unscaled attention),
    /// a value of the wrong type, or a width the heads do not divide.
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let (c, _) = config_object(text, path, &["gpt2"])?;
        let r = Reader::new(&c, path);
        if let Some(a) = r.string("activation_function")?
            && a != "gelu_new"
        {
            return Err(r.bad(
                "activation_function",
                format!("`{a}` is not supported (gelu_new)"),
            ));
        }
        for (key, want) in [
            ("scale_attn_by_inverse_layer_idx", false),
            ("reorder_and_upcast_attn", false),
            ("scale_attn_weights", true),
        ] {
            if let Some(v) = r.bool(key)?
                && v != want
            {
                return Err(r.bad(key, format!("{v} is not supported ({want})")));
            }
        }
        let n_embd = r.usize("n_embd")?.unwrap_or(768);
        let n_head = r.usize("n_head")?.unwrap_or(12);
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(r.bad(
                "n_head",
                format!("{n_head} does not divide n_embd = {n_embd}"),
            ));
        }
        Ok(Self {
            vocab_size: r.usize("vocab_size")?.unwrap_or(50257),
            n_embd,
            n_layer: r.usize("n_layer")?.unwrap_or(12),
            n_head,
            n_positions: r.usize("n_positions")?.unwrap_or(1024),
            n_inner: r.usize("n_inner")?.unwrap_or(4 * n_embd),
            layer_norm_epsilon: r.f64("layer_norm_epsilon")?.unwrap_or(1e-5),
            eos_token_ids: r.ids("eos_token_id")?,
        })
    }
}

/// One GPT-2 block (`transformer.h.{i}`).
#[derive(Module, Debug)]
pub struct Gpt2Block {
    /// `ln_1`.
    pub ln_1: LayerNorm,
    /// `attn.c_attn`: `d → 3d` (q, k, v).
    pub c_attn: LoraLinear,
    /// `attn.c_proj`.
    pub attn_proj: LoraLinear,
    /// `ln_2`.
    pub ln_2: LayerNorm,
    /// `mlp.c_fc`.
    pub c_fc: LoraLinear,
    /// `mlp.c_proj`.
    pub mlp_proj: LoraLinear,
}

/// The linear layers of a block inside `transformer.h.{i}`, in module order.
const BLOCK_LINEARS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];

/// GPT-2 with its tied language-model head.
#[derive(Module, Debug)]
pub struct Gpt2LmHeadModel {
    /// `transformer.wte` (also the output layer).
    pub wte: Embedding,
    /// `transformer.wpe`.
    pub wpe: Embedding,
    /// `transformer.h`.
    pub blocks: Vec<Gpt2Block>,
    /// `transformer.ln_f`.
    pub ln_f: LayerNorm,
    /// The configuration it was built from.
    #[module(skip)]
    pub config: Gpt2Config,
}

impl Gpt2LmHeadModel {
    /// Builds the model from `config` and the checkpoint `weights` (names under
    /// `transformer.`, or bare as the original checkpoints; `attn.bias` / `attn.masked_bias`
    /// buffers and a tied `lm_head.weight` are ignored).
    ///
    /// # Errors
    /// [`Error::Invalid`](crate::Error::Invalid) naming the checkpoint and key for a missing tensor
    /// or one the model does not take; [`Error::Shape`](crate::Error::Shape) for a shape the config
    /// disagrees with.
    pub fn from_weights(
        config: &Gpt2Config,
        weights: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let names = weights.names();
        let prefix = if names.iter().any(|n| n.starts_with("transformer.")) {
            "transformer."
        } else {
            ""
        };
        let c = config;
        let (d, ff) = (c.n_embd, c.n_inner);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("wte.weight".into(), vec![c.vocab_size, d]),
            ("wpe.weight".into(), vec![c.n_positions, d]),
            ("ln_f.weight".into(), vec![d]),
            ("ln_f.bias".into(), vec![d]),
        ];
        for i in 0..c.n_layer {
            let p = format!("h.{i}");
            for ln in ["ln_1", "ln_2"] {
                shapes.push((format!("{p}.{ln}.weight"), vec![d]));
                shapes.push((format!("{p}.{ln}.bias"), vec![d]));
            }
            for (name, (n_in, n_out)) in
                BLOCK_LINEARS
                    .iter()
                    .zip([(d, 3 * d), (d, d), (d, ff), (ff, d)])
            {
                // Conv1D: weight [in, out].
                shapes.push((format!("{p}.{name}.weight"), vec![n_in, n_out]));
                shapes.push((format!("{p}.{name}.bias"), vec![n_out]));
            }
        }
        let expected: std::collections::HashMap<String, Vec<usize>> = shapes
            .into_iter()
            .map(|(n, s)| (format!("{prefix}{n}"), s))
            .collect();
        let ignored = |n: &str| {
            n == "lm_head.weight" || n.ends_with(".attn.bias") || n.ends_with(".attn.masked_bias")
        };
        check_no_extra(weights, &names, |n| expected.contains_key(n) || ignored(n))?;
        let load = |name: &str| -> Result<TensorData> {
            let key = format!("{prefix}{name}");
            read_checked(weights, &key, expected.get(&key).map(Vec::as_slice))
        };
        let t1 = |n: &str| -> Result<Tensor<1>> { Ok(Tensor::from_data(load(n)?, device)) };
        let norm = |n: &str| -> Result<LayerNorm> {
            let mut ln = LayerNormConfig::new(d)
                .with_epsilon(c.layer_norm_epsilon)
                .init(device);
            ln.gamma = Param::from_tensor(t1(&format!("{n}.weight"))?);
            ln.beta = Some(Param::from_tensor(t1(&format!("{n}.bias"))?));
            Ok(ln.no_grad())
        };
        let conv1d = |n: &str| -> Result<LoraLinear> {
            Ok(LoraLinear::new(Linear {
                weight: Param::from_tensor(Tensor::from_data(
                    load(&format!("{n}.weight"))?,
                    device,
                )),
                bias: Some(Param::from_tensor(t1(&format!("{n}.bias"))?)),
            }))
        };
        let embedding = |n: &str| -> Result<Embedding> {
            Ok(Embedding {
                weight: Param::from_tensor(Tensor::from_data(load(n)?, device)),
            }
            .no_grad())
        };
        let blocks = (0..c.n_layer)
            .map(|i| {
                let p = format!("h.{i}");
                Ok(Gpt2Block {
                    ln_1: norm(&format!("{p}.ln_1"))?,
                    c_attn: conv1d(&format!("{p}.{}", BLOCK_LINEARS[0]))?,
                    attn_proj: conv1d(&format!("{p}.{}", BLOCK_LINEARS[1]))?,
                    ln_2: norm(&format!("{p}.ln_2"))?,
                    c_fc: conv1d(&format!("{p}.{}", BLOCK_LINEARS[2]))?,
                    mlp_proj: conv1d(&format!("{p}.{}", BLOCK_LINEARS[3]))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            wte: embedding("wte.weight")?,
            wpe: embedding("wpe.weight")?,
            blocks,
            ln_f: norm("ln_f")?,
            config: c.clone(),
        })
    }

    /// Logits `[batch, seq, vocab]` for `input_ids`, with an optional left-padding
    /// `attention_mask` (positions then count unmasked tokens, as transformers' generation)
    /// and per-sequence adapters (PEFT's `adapter_names`; otherwise the active adapters).
    ///
    /// # Errors
    /// [`Error::IdOutOfRange`](crate::Error::IdOutOfRange) for a token id outside the vocabulary;
    /// [`Error::Invalid`](crate::Error::Invalid) for a sequence longer than `n_positions` or mask
    /// values other than 0/1; [`Error::Shape`](crate::Error::Shape) for a mask of another shape;
    /// unknown adapter names.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
    ) -> Result<Tensor<3>> {
        self.forward_cached(
            input_ids,
            attention_mask,
            adapters,
            &mut KvCache::new(),
            false,
        )
    }

    /// Logits for the new tokens after those `cache` holds, which then holds these too (incremental
    /// decoding, as [`LlamaForCausalLm::forward_cached`](super::LlamaForCausalLm::forward_cached));
    /// only the last position's when `last_only`.
    ///
    /// # Errors
    /// As [`forward`](Self::forward); a cache of another batch size.
    pub fn forward_cached(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let c = &self.config;
        let device = input_ids.device();
        check_ids(
            input_ids.clone(),
            "token id",
            "the model's vocabulary",
            c.vocab_size,
        )?;
        let (positions, blocked) =
            cache.advance(attention_mask, [b, s], c.n_positions, None, &device)?;
        let t = cache.len();
        let mix = match adapters {
            Some(names) => Some(Mix::new(self, b, names)?),
            None => None,
        };
        let mix = mix.as_ref();
        let (heads, hd) = (c.n_head, c.n_embd / c.n_head);
        let mut x = self.wte.forward(input_ids) + self.wpe.forward(positions);
        for (l, block) in self.blocks.iter().enumerate() {
            let qkv = linear(&block.c_attn, block.ln_1.forward(x.clone()), mix)?;
            let part = |k: usize| {
                qkv.clone()
                    .slice([0..b, 0..s, k * c.n_embd..(k + 1) * c.n_embd])
                    .reshape([b, s, heads, hd])
                    .swap_dims(1, 2)
            };
            let (k, v) = cache.append(l, part(1), part(2));
            let q = part(0);
            let scores = (q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt()).mask_fill(
                blocked
                    .clone()
                    .unsqueeze_dim::<4>(1)
                    .expand([b, heads, s, t]),
                f32::MIN,
            );
            let ctx = softmax(scores, 3)
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([b, s, c.n_embd]);
            x = x + linear(&block.attn_proj, ctx, mix)?;
            let h = gelu_approximate(linear(&block.c_fc, block.ln_2.forward(x.clone()), mix)?);
            x = x + linear(&block.mlp_proj, h, mix)?;
        }
        let x = if last_only && s > 1 {
            x.slice([0..b, s - 1..s])
        } else {
            x
        };
        let x = self.ln_f.forward(x);
        Ok(x.matmul(self.wte.weight.val().transpose().unsqueeze::<3>()))
    }

    /// [`generate`](super::generate::generate) with this model.
    ///
    /// # Errors
    /// As [`generate`](super::generate::generate).
    pub fn generate(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
        config: &GenerationConfig,
        on_step: impl FnMut(&[Option<i64>]),
    ) -> Result<Vec<Vec<i64>>> {
        super::generate::generate(self, input_ids, attention_mask, adapters, config, on_step)
    }
}

impl CausalLm for Gpt2LmHeadModel {
    fn forward_cached(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor<3>> {
        Gpt2LmHeadModel::forward_cached(self, input_ids, attention_mask, adapters, cache, last_only)
    }

    fn max_positions(&self) -> usize {
        self.config.n_positions
    }

    fn eos_token_ids(&self) -> Vec<i64> {
        self.config.eos_token_ids.clone()
    }
}

impl LinearLayers for Gpt2LmHeadModel {
    fn linear_layers(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            for (name, l) in
                BLOCK_LINEARS
                    .iter()
                    .zip([&b.c_attn, &b.attn_proj, &b.c_fc, &b.mlp_proj])
            {
                out.push((format!("transformer.h.{i}.{name}"), l));
            }
        }
        out
    }

    fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter_mut().enumerate() {
            for (name, l) in BLOCK_LINEARS.iter().zip([
                &mut b.c_attn,
                &mut b.attn_proj,
                &mut b.c_fc,
                &mut b.mlp_proj,
            ]) {
                out.push((format!("transformer.h.{i}.{name}"), l));
            }
        }
        out
    }

    fn output_layer(&self) -> Option<&str> {
        None
    }
}
