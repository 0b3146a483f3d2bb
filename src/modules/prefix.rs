//! Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
//! Generation", arXiv 2101.00190), as PEFT implements it.
//!
//! Each attention layer `l` receives `p` trainable key and value vectors per head, prepended
//! to the keys and values computed from the sequence:
//!
//! ```text
//! K = [P_k^l ; x W_k],  V = [P_v^l ; x W_v]
//! attn(x)_i = softmax(q_i K^T / sqrt(d_head) + mask_i) V,
//!   where query i sees every prefix slot and the tokens j ≤ i (causal part).
//! ```
//!
//! PEFT stores all prefixes as one embedding `E: [p, L·2·d]`, read as `[p, L·2, heads, d_head]`:
//! layer `l`'s keys are slice `2l`, its values `2l + 1`. With the optional reparameterisation
//! (`prefix_projection=True`) the prefix is produced by an MLP,
//! `E = W_2 tanh(W_1 e + b_1) + b_2` from a `[p, d]` embedding `e`, which trains more stably; after
//! training the MLP output can be frozen into a plain prefix ([`PrefixEncoder::freeze_projection`]).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData, activation};

use super::check_last_dim;
use crate::error::{Error, Result};

/// Configuration of a [`PrefixEncoder`].
#[derive(Config, Debug)]
pub struct PrefixConfig {
    /// Number of prefix slots `p` (PEFT's `num_virtual_tokens`).
    pub num_virtual_tokens: usize,
    /// Number of attention layers `L`.
    pub num_layers: usize,
    /// Model width `d` (`heads · d_head`).
    pub d_model: usize,
    /// Hidden width of the reparameterisation MLP; `None` trains the prefix directly.
    #[config(default = "None")]
    pub projection_hidden: Option<usize>,
}

impl PrefixConfig {
    /// Creates the encoder with random (`N(0, 1)`, as `torch.nn.Embedding`) prefixes.
    ///
    /// # Errors
    /// [`Error::Invalid`] if any size is zero.
    pub fn init(&self, device: &Device) -> Result<PrefixEncoder> {
        if self.num_virtual_tokens == 0 || self.num_layers == 0 || self.d_model == 0 {
            return Err(Error::invalid(
                "prefix tuning sizes",
                "num_virtual_tokens, num_layers and d_model must be positive",
            ));
        }
        let out = self.num_layers * 2 * self.d_model;
        let normal = Distribution::Normal(0.0, 1.0);
        Ok(match self.projection_hidden {
            None => PrefixEncoder {
                embedding: Param::from_tensor(Tensor::random(
                    [self.num_virtual_tokens, out],
                    normal,
                    device,
                )),
                projection: None,
                num_layers: self.num_layers,
            },
            Some(h) => PrefixEncoder {
                embedding: Param::from_tensor(Tensor::random(
                    [self.num_virtual_tokens, self.d_model],
                    normal,
                    device,
                )),
                projection: Some(PrefixProjection {
                    first: LinearConfig::new(self.d_model, h).init(device),
                    second: LinearConfig::new(h, out).init(device),
                }),
                num_layers: self.num_layers,
            },
        })
    }
}

/// PEFT's prefix reparameterisation MLP: `Linear(d, h) → tanh → Linear(h, L·2·d)`.
#[derive(Module, Debug)]
pub struct PrefixProjection {
    /// `d → h`.
    pub first: Linear,
    /// `h → L·2·d`.
    pub second: Linear,
}

/// The trainable prefixes of every layer.
#[derive(Module, Debug)]
pub struct PrefixEncoder {
    /// `[p, L·2·d]` without projection, `[p, d]` with.
    pub embedding: Param<Tensor<2>>,
    /// The reparameterisation MLP, if any.
    pub projection: Option<PrefixProjection>,
    /// Number of layers `L`.
    pub num_layers: usize,
}

impl PrefixEncoder {
    /// Number of prefix slots `p`.
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.shape().dims::<2>()[0]
    }

    /// The flat prefix `[p, L·2·d]` (through the MLP when there is one).
    pub fn kv_flat(&self) -> Tensor<2> {
        let e = self.embedding.val();
        match &self.projection {
            None => e,
            Some(p) => p.second.forward(activation::tanh(p.first.forward(e))),
        }
    }

    /// Replaces the MLP by its output: a plain prefix with the same values (PEFT does this
    /// when saving a prefix trained with projection).
    pub fn freeze_projection(self) -> Self {
        let flat = self.kv_flat().detach();
        Self {
            embedding: Param::from_tensor(flat),
            projection: None,
            num_layers: self.num_layers,
        }
    }

    /// Keys and values of `layer` for `heads` heads, each `[heads, p, d_head]`.
    ///
    /// # Errors
    /// [`Error::Invalid`] if `layer ≥ L` or `heads` does not divide `d`.
    pub fn layer_kv(&self, layer: usize, heads: usize) -> Result<(Tensor<3>, Tensor<3>)> {
        if layer >= self.num_layers {
            return Err(Error::invalid(
                "prefix layer",
                format!("layer {layer} >= num_layers {}", self.num_layers),
            ));
        }
        let flat = self.kv_flat();
        let [p, total] = flat.dims();
        let d = total / (2 * self.num_layers);
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::invalid(
                "prefix heads",
                format!("{heads} heads do not divide d_model {d}"),
            ));
        }
        let hd = d / heads;
        let v = flat.reshape([p, 2 * self.num_layers, heads, hd]);
        let pick = |i: usize| {
            v.clone()
                .slice([0..p, i..i + 1, 0..heads, 0..hd])
                .reshape([p, heads, hd])
                .swap_dims(0, 1)
        };
        Ok((pick(2 * layer), pick(2 * layer + 1)))
    }
}

/// GPT-2-style causal multi-head self-attention that consumes a prefix as PEFT does.
///
/// `c_attn: d → 3d` produces `q, k, v`; `c_proj: d → d` mixes the heads. Weights use burn's
/// `[in, out]` layout, which is also GPT-2's `Conv1D` layout.
#[derive(Module, Debug)]
pub struct PrefixAttention {
    /// Fused query/key/value projection `d → 3d`.
    pub c_attn: Linear,
    /// Output projection `d → d`.
    pub c_proj: Linear,
    /// Number of heads.
    pub heads: usize,
}

impl PrefixAttention {
    /// Creates a randomly initialised attention layer.
    ///
    /// # Errors
    /// [`Error::Invalid`] if `heads` does not divide `d_model`.
    pub fn new(d_model: usize, heads: usize, device: &Device) -> Result<Self> {
        Self::from_linears(
            LinearConfig::new(d_model, 3 * d_model).init(device),
            LinearConfig::new(d_model, d_model).init(device),
            heads,
        )
    }

    /// Builds the layer from existing projections.
    ///
    /// # Errors
    /// [`Error::Shape`] if the projections are not `d → 3d` and `d → d`; [`Error::Invalid`]
    /// if `heads` does not divide `d`.
    pub fn from_linears(c_attn: Linear, c_proj: Linear, heads: usize) -> Result<Self> {
        let [d, three_d] = c_attn.weight.shape().dims();
        let pd = c_proj.weight.shape().dims::<2>();
        if three_d != 3 * d || pd != [d, d] {
            return Err(Error::shape(
                "PrefixAttention projections",
                format!("c_attn [{d}, {}], c_proj [{d}, {d}]", 3 * d),
                format!("c_attn [{d}, {three_d}], c_proj {pd:?}"),
            ));
        }
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(Error::invalid(
                "attention heads",
                format!("{heads} heads do not divide d_model {d}"),
            ));
        }
        Ok(Self {
            c_attn,
            c_proj,
            heads,
        })
    }

    /// Causal attention over `h: [batch, seq, d]` with an optional prefix
    /// `(keys, values)`, each `[heads, p, d_head]` (shared by the batch). Returns `[batch, seq, d]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a wrong width or prefix shape.
    pub fn forward(
        &self,
        h: Tensor<3>,
        prefix: Option<(Tensor<3>, Tensor<3>)>,
    ) -> Result<Tensor<3>> {
        let d = self.c_proj.weight.shape().dims::<2>()[0];
        check_last_dim(&h, d, "PrefixAttention input")?;
        let [b, s, _] = h.dims();
        let heads = self.heads;
        let hd = d / heads;
        let qkv = self.c_attn.forward(h);
        let split = |i: usize| {
            qkv.clone()
                .slice([0..b, 0..s, i * d..(i + 1) * d])
                .reshape([b, s, heads, hd])
                .swap_dims(1, 2)
        };
        let (q, mut k, mut v) = (split(0), split(1), split(2));
        let mut p = 0;
        if let Some((pk, pv)) = prefix {
            let [ph, pp, phd] = pk.dims();
            if [ph, phd] != [heads, hd] || pv.dims() != pk.dims() {
                return Err(Error::shape(
                    "prefix keys/values",
                    format!("[{heads}, p, {hd}] each"),
                    format!("keys {:?}, values {:?}", pk.dims(), pv.dims()),
                ));
            }
            p = pp;
            let pk = pk.unsqueeze::<4>().expand([b, heads, pp, hd]);
            let pv = pv.unsqueeze::<4>().expand([b, heads, pp, hd]);
            k = Tensor::cat(vec![pk, k], 2);
            v = Tensor::cat(vec![pv, v], 2);
        }
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt());
        // Query i may see every prefix slot and the tokens j <= i.
        let mask: Vec<bool> = (0..s)
            .flat_map(|i| (0..p + s).map(move |j| j >= p && j - p > i))
            .collect();
        let mask =
            Tensor::<2, Bool>::from_data(TensorData::new(mask, [s, p + s]), &scores.device())
                .unsqueeze::<4>()
                .expand([b, heads, s, p + s]);
        let scores = scores.mask_fill(mask, f32::NEG_INFINITY);
        let attn = activation::softmax(scores, 3);
        let out = attn.matmul(v).swap_dims(1, 2).reshape([b, s, d]);
        Ok(self.c_proj.forward(out))
    }
}

impl PrefixEncoder {
    /// A plain prefix from PEFT's embedding `[p, L·2·d]`.
    ///
    /// # Errors
    /// [`Error::Invalid`] if `num_layers` is zero or does not divide the width into `L·2·d`.
    pub fn from_embedding(embedding: Tensor<2>, num_layers: usize) -> Result<Self> {
        let [_, w] = embedding.dims();
        if num_layers == 0 || !w.is_multiple_of(2 * num_layers) {
            return Err(Error::invalid(
                "prefix embedding",
                format!("width {w} is not L·2·d for L = {num_layers}"),
            ));
        }
        Ok(Self {
            embedding: Param::from_tensor(embedding),
            projection: None,
            num_layers,
        })
    }

    /// A reparameterised prefix: embedding `[p, d]`, `first: d → h`, `second: h → L·2·d`.
    ///
    /// # Errors
    /// [`Error::Shape`] if the widths do not chain.
    pub fn from_projection(
        embedding: Tensor<2>,
        first: Linear,
        second: Linear,
        num_layers: usize,
    ) -> Result<Self> {
        let [_, d] = embedding.dims();
        let [i1, h] = first.weight.shape().dims();
        let [i2, out] = second.weight.shape().dims();
        if i1 != d || i2 != h || num_layers == 0 || out != num_layers * 2 * d {
            return Err(Error::shape(
                "prefix projection",
                format!("[{d} -> h] then [h -> {}]", num_layers * 2 * d),
                format!("[{i1} -> {h}] then [{i2} -> {out}]"),
            ));
        }
        Ok(Self {
            embedding: Param::from_tensor(embedding),
            projection: Some(PrefixProjection { first, second }),
            num_layers,
        })
    }
}
