//! BERT encoders (`BertModel`) as transformers computes them, with every linear layer a
//! [`LoraLinear`] at its Hugging Face path (`encoder.layer.0.attention.self.query`, …) so
//! PEFT adapters attach by their keys, and sentence-transformers' mean pooling.
//!
//! # The math
//! Devlin et al., "BERT" (arXiv 1810.04805); Reimers & Gurevych, "Sentence-BERT" (arXiv
//! 1908.10084). With post-LayerNorm `LN`:
//!
//! - `h₀ = LN(E_word[ids] + E_pos[0..s] + E_type[token_type_ids])` (absolute positions);
//! - per layer, `a = LN(h + dense(softmax(q kᵀ/√d_head + m) v))` with `m` the most negative
//!   float on padded keys, then `h' = LN(a + output(gelu(intermediate(a))))` (exact GELU);
//! - a sentence embedding is the mean of `h_L` over the unmasked tokens, divided by its L2
//!   norm when the folder's `modules.json` lists a `Normalize` module.
//!
//! # Shapes
//! - input ids, attention mask, token types: `[batch, seq]` (Int)
//! - last hidden state: `[batch, seq, hidden]`; sentence embedding: `[batch, hidden]`

use burn::module::{Module, Param};
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde_json::{Map, Value};

use super::LinearLayers;
use super::config::{Reader, config_object};
use super::llama::{WeightSource, check_no_extra, read_checked};
use super::mixed::{Mix, check_ids, linear, mask_values};
use crate::error::{Error, Result};
use crate::modules::lora::LoraLinear;
use crate::tensor_util::transpose_host;

/// The values a BERT encoder is built from (`config.json` of `model_type: bert`).
#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// Positions the learned position table covers.
    pub max_position_embeddings: usize,
    /// Token types (segments).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
}

impl BertConfig {
    /// Reads a `config.json` document; `path` names the file in errors.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the file and key for a `model_type` other than `bert`, an
    /// activation other than `gelu`, a `position_embedding_type` other than `absolute`, a
    /// value of the wrong type, or a width the heads do not divide.
    pub fn from_json(text: &str, path: &str) -> Result<Self> {
        let (c, _) = config_object(text, path, &["bert"])?;
        let r = Reader::new(&c, path);
        for (key, want) in [
            ("hidden_act", "gelu"),
            ("position_embedding_type", "absolute"),
        ] {
            if let Some(v) = r.string(key)?
                && v != want
            {
                return Err(r.bad(key, format!("`{v}` is not supported (only `{want}`)")));
            }
        }
        let hidden_size = r.usize("hidden_size")?.unwrap_or(768);
        let heads = r.usize("num_attention_heads")?.unwrap_or(12);
        if heads == 0 || hidden_size % heads != 0 {
            return Err(r.bad(
                "num_attention_heads",
                format!("{heads} does not divide hidden_size = {hidden_size}"),
            ));
        }
        Ok(Self {
            vocab_size: r.usize("vocab_size")?.unwrap_or(30522),
            hidden_size,
            num_hidden_layers: r.usize("num_hidden_layers")?.unwrap_or(12),
            num_attention_heads: heads,
            intermediate_size: r.usize("intermediate_size")?.unwrap_or(3072),
            max_position_embeddings: r.usize("max_position_embeddings")?.unwrap_or(512),
            type_vocab_size: r.usize("type_vocab_size")?.unwrap_or(2),
            layer_norm_eps: r.f64("layer_norm_eps")?.unwrap_or(1e-12),
        })
    }
}

/// One encoder layer (`encoder.layer.{i}`).
#[derive(Module, Debug)]
pub struct BertLayer {
    /// `attention.self.query`.
    pub query: LoraLinear,
    /// `attention.self.key`.
    pub key: LoraLinear,
    /// `attention.self.value`.
    pub value: LoraLinear,
    /// `attention.output.dense`.
    pub attention_output: LoraLinear,
    /// `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm,
    /// `intermediate.dense`.
    pub intermediate: LoraLinear,
    /// `output.dense`.
    pub output: LoraLinear,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm,
}

/// The paths of a layer's linear layers inside `encoder.layer.{i}`, in module order.
const LAYER_LINEARS: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

impl BertLayer {
    fn linears(&self) -> [&LoraLinear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attention_output,
            &self.intermediate,
            &self.output,
        ]
    }

    fn linears_mut(&mut self) -> [&mut LoraLinear; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attention_output,
            &mut self.intermediate,
            &mut self.output,
        ]
    }
}

/// A BERT encoder (`BertModel`), with an optional pooler.
#[derive(Module, Debug)]
pub struct BertModel {
    /// `embeddings.word_embeddings`.
    pub word_embeddings: Embedding,
    /// `embeddings.position_embeddings`.
    pub position_embeddings: Embedding,
    /// `embeddings.token_type_embeddings`.
    pub token_type_embeddings: Embedding,
    /// `embeddings.LayerNorm`.
    pub embeddings_norm: LayerNorm,
    /// `encoder.layer`.
    pub layers: Vec<BertLayer>,
    /// `pooler.dense` (tanh of the first token), when the checkpoint has one.
    pub pooler: Option<LoraLinear>,
    /// The configuration it was built from.
    #[module(skip)]
    pub config: BertConfig,
}

impl BertModel {
    /// Builds the encoder from `config` and the checkpoint `weights`: transformers' names,
    /// bare (`embeddings.…`, as `BertModel` saves) or under `bert.` (as the task models save).
    /// The pooler is loaded when present; `embeddings.position_ids` buffers are ignored.
    ///
    /// # Errors
    /// [`Error::Invalid`] naming the checkpoint and key for a missing tensor or one the model
    /// does not take; [`Error::Shape`] naming the key for a shape the config disagrees with.
    pub fn from_weights(
        config: &BertConfig,
        weights: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let names = weights.names();
        let prefix = if names.iter().any(|n| n.starts_with("bert.embeddings.")) {
            "bert."
        } else {
            ""
        };
        let c = config;
        let (h, ff) = (c.hidden_size, c.intermediate_size);
        let has_pooler = names
            .iter()
            .any(|n| *n == format!("{prefix}pooler.dense.weight"));
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                vec![c.vocab_size, h],
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![c.max_position_embeddings, h],
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                vec![c.type_vocab_size, h],
            ),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            for (name, (o, n)) in
                LAYER_LINEARS
                    .iter()
                    .zip([(h, h), (h, h), (h, h), (h, h), (ff, h), (h, ff)])
            {
                shapes.push((format!("{p}.{name}.weight"), vec![o, n]));
                shapes.push((format!("{p}.{name}.bias"), vec![o]));
            }
            for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
                shapes.push((format!("{p}.{norm}.weight"), vec![h]));
                shapes.push((format!("{p}.{norm}.bias"), vec![h]));
            }
        }
        if has_pooler {
            shapes.push(("pooler.dense.weight".into(), vec![h, h]));
            shapes.push(("pooler.dense.bias".into(), vec![h]));
        }
        let expected: std::collections::HashMap<String, Vec<usize>> = shapes
            .into_iter()
            .map(|(n, s)| (format!("{prefix}{n}"), s))
            .collect();
        check_no_extra(weights, &names, |n| {
            expected.contains_key(n) || n.ends_with("embeddings.position_ids")
        })?;
        let load = |name: &str| -> Result<TensorData> {
            let key = format!("{prefix}{name}");
            read_checked(weights, &key, expected.get(&key).map(Vec::as_slice))
        };
        let tensor1 =
            |name: &str| -> Result<Tensor<1>> { Ok(Tensor::from_data(load(name)?, device)) };
        let embedding = |name: &str| -> Result<Embedding> {
            Ok(Embedding {
                weight: Param::from_tensor(Tensor::from_data(load(name)?, device)),
            }
            .no_grad())
        };
        let norm = |name: &str| -> Result<LayerNorm> {
            let mut n = LayerNormConfig::new(h)
                .with_epsilon(c.layer_norm_eps)
                .init(device);
            n.gamma = Param::from_tensor(tensor1(&format!("{name}.weight"))?);
            n.beta = Some(Param::from_tensor(tensor1(&format!("{name}.bias"))?));
            Ok(n.no_grad())
        };
        let lin = |name: &str| -> Result<LoraLinear> {
            let w = load(&format!("{name}.weight"))?;
            let [o, i] = [w.shape()[0], w.shape()[1]];
            let values: Vec<f32> = w.convert::<f32>().try_into_vec::<f32>().unwrap_or_default();
            let w = Tensor::from_data(
                TensorData::new(transpose_host(&values, o, i), [i, o]),
                device,
            );
            Ok(LoraLinear::new(Linear {
                weight: Param::from_tensor(w),
                bias: Some(Param::from_tensor(tensor1(&format!("{name}.bias"))?)),
            }))
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let l = |n: &str| lin(&format!("{p}.{n}"));
                Ok(BertLayer {
                    query: l(LAYER_LINEARS[0])?,
                    key: l(LAYER_LINEARS[1])?,
                    value: l(LAYER_LINEARS[2])?,
                    attention_output: l(LAYER_LINEARS[3])?,
                    attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: l(LAYER_LINEARS[4])?,
                    output: l(LAYER_LINEARS[5])?,
                    output_norm: norm(&format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            word_embeddings: embedding("embeddings.word_embeddings.weight")?,
            position_embeddings: embedding("embeddings.position_embeddings.weight")?,
            token_type_embeddings: embedding("embeddings.token_type_embeddings.weight")?,
            embeddings_norm: norm("embeddings.LayerNorm")?,
            layers,
            pooler: if has_pooler {
                Some(lin("pooler.dense")?)
            } else {
                None
            },
            config: c.clone(),
        })
    }

    /// The last hidden state `[batch, seq, hidden]` for `input_ids` with an optional
    /// `attention_mask` (1 on tokens, 0 on padding, either side) and `token_type_ids` (0 when
    /// absent); sequence `i` through adapter `adapters[i]` when given (PEFT's `adapter_names`;
    /// otherwise the active adapters). Positions are `0..seq`, as transformers' BERT.
    ///
    /// # Errors
    /// [`Error::IdOutOfRange`] for a token id or token type outside its table;
    /// [`Error::Invalid`] for a sequence longer than `max_position_embeddings` or mask values
    /// other than 0 and 1; [`Error::Shape`] for a mask or token types of another shape;
    /// unknown adapter names.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        token_type_ids: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
    ) -> Result<Tensor<3>> {
        let [b, s] = input_ids.dims();
        let c = &self.config;
        let device = input_ids.device();
        check_ids(
            input_ids.clone(),
            "token id",
            "the vocabulary",
            c.vocab_size,
        )?;
        if s > c.max_position_embeddings {
            return Err(Error::invalid(
                "sequence length",
                format!(
                    "{s} tokens exceed max_position_embeddings = {}",
                    c.max_position_embeddings
                ),
            ));
        }
        let types = match token_type_ids {
            Some(t) => {
                if t.dims() != [b, s] {
                    return Err(Error::shape(
                        "token_type_ids (the shape of input_ids)",
                        format!("{:?}", [b, s]),
                        format!("{:?}", t.dims()),
                    ));
                }
                check_ids(
                    t.clone(),
                    "token type id",
                    "type_vocab_size",
                    c.type_vocab_size,
                )?;
                t
            }
            None => Tensor::<2, Int>::zeros([b, s], &device),
        };
        let mix = match adapters {
            Some(names) => Some(Mix::new(self, b, names)?),
            None => None,
        };
        let mix = mix.as_ref();
        let positions = Tensor::<1, Int>::arange(0..s as i64, &device)
            .reshape([1, s])
            .expand([b, s]);
        let x = self.word_embeddings.forward(input_ids)
            + self.position_embeddings.forward(positions)
            + self.token_type_embeddings.forward(types);
        let mut x = self.embeddings_norm.forward(x);
        // [b, s, s]: true where a key is padding.
        let padded = match attention_mask {
            Some(m) => {
                let padding: Vec<bool> = mask_values(m, [b, s])?
                    .chunks(s.max(1))
                    .flat_map(|row| (0..s).flat_map(move |_| row.iter().map(|&v| v == 0)))
                    .collect();
                Some(Tensor::<3, Bool>::from_data(
                    TensorData::new(padding, [b, s, s]),
                    &device,
                ))
            }
            None => None,
        };
        let (heads, hd) = (c.num_attention_heads, c.hidden_size / c.num_attention_heads);
        for layer in &self.layers {
            let split = |t: Tensor<3>| t.reshape([b, s, heads, hd]).swap_dims(1, 2);
            let q = split(linear(&layer.query, x.clone(), mix)?);
            let k = split(linear(&layer.key, x.clone(), mix)?);
            let v = split(linear(&layer.value, x.clone(), mix)?);
            let mut scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
            if let Some(p) = &padded {
                scores = scores.mask_fill(
                    p.clone().unsqueeze_dim::<4>(1).expand([b, heads, s, s]),
                    f32::MIN,
                );
            }
            let ctx = softmax(scores, 3)
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([b, s, c.hidden_size]);
            let a = layer
                .attention_norm
                .forward(linear(&layer.attention_output, ctx, mix)? + x);
            let inter = gelu(linear(&layer.intermediate, a.clone(), mix)?);
            x = layer
                .output_norm
                .forward(linear(&layer.output, inter, mix)? + a);
        }
        Ok(x)
    }
}

/// sentence-transformers' mean pooling: the mean of `hidden` over the tokens `attention_mask`
/// marks (all when `None`), divided by its L2 norm (`max(‖v‖, 1e-12)`, as `F.normalize`) when
/// `normalize`.
///
/// # Shapes
/// - `hidden`: `[batch, seq, d]`; `attention_mask`: `[batch, seq]`; result `[batch, d]`
///
/// # Errors
/// [`Error::Shape`] for a mask of another shape; [`Error::Invalid`] for mask values other
/// than 0 and 1.
pub fn mean_pooling(
    hidden: Tensor<3>,
    attention_mask: Option<Tensor<2, Int>>,
    normalize: bool,
) -> Result<Tensor<2>> {
    let [b, s, d] = hidden.dims();
    let device = hidden.device();
    let mask = match attention_mask {
        Some(m) => {
            let values: Vec<f32> = mask_values(m, [b, s])?.iter().map(|&v| v as f32).collect();
            Tensor::<2>::from_data(TensorData::new(values, [b, s]), &device)
        }
        None => Tensor::<2>::ones([b, s], &device),
    };
    let m = mask.clone().unsqueeze_dim::<3>(2);
    let sum = (hidden * m).sum_dim(1).reshape([b, d]);
    let count = mask.sum_dim(1).clamp_min(1e-9);
    let mean = sum / count;
    if !normalize {
        return Ok(mean);
    }
    let norm = mean
        .clone()
        .powf_scalar(2.0)
        .sum_dim(1)
        .sqrt()
        .clamp_min(1e-12);
    Ok(mean / norm)
}

/// How a sentence-transformers folder pools: reads `modules.json` and the pooling module's
/// `config.json`. Returns whether the embedding is L2-normalised.
///
/// # Errors
/// [`Error::Invalid`] naming the file and key for a pooling mode other than mean.
pub fn sentence_pooling(
    modules: &Value,
    pooling: Option<&Map<String, Value>>,
    path: &str,
) -> Result<bool> {
    if let Some(p) = pooling {
        for key in [
            "pooling_mode_cls_token",
            "pooling_mode_max_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
            "pooling_mode_weightedmean_tokens",
            "pooling_mode_lasttoken",
        ] {
            if p.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(Error::invalid(
                    format!("{path}: key `{key}`"),
                    "modula pools by the mean over tokens only",
                ));
            }
        }
    }
    Ok(modules.as_array().is_some_and(|m| {
        m.iter().any(|e| {
            e.get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("models.Normalize"))
        })
    }))
}

impl LinearLayers for BertModel {
    fn linear_layers(&self) -> Vec<(String, &LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (name, layer) in LAYER_LINEARS.iter().zip(l.linears()) {
                out.push((format!("encoder.layer.{i}.{name}"), layer));
            }
        }
        if let Some(p) = &self.pooler {
            out.push(("pooler.dense".into(), p));
        }
        out
    }

    fn linear_layers_mut(&mut self) -> Vec<(String, &mut LoraLinear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, layer) in LAYER_LINEARS.iter().zip(l.linears_mut()) {
                out.push((format!("encoder.layer.{i}.{name}"), layer));
            }
        }
        if let Some(p) = &mut self.pooler {
            out.push(("pooler.dense".into(), p));
        }
        out
    }

    fn output_layer(&self) -> Option<&str> {
        None
    }
}
