//! Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
//! arXiv 1902.00751; Pfeiffer et al. 2021, "AdapterFusion", arXiv 2005.00247).
//!
//! A bottleneck adapter is a small residual function on a hidden state `h: [..., d]`:
//!
//! ```text
//! f(h) = s · up(σ(down(h)))          down: d → d/reduction, up: d/reduction → d
//! sequential:  h' = h + f(h)                       (inserted after a sub-layer's output)
//! parallel:    h' = sublayer(x) + f(x)             (He et al. 2022, arXiv 2110.04366)
//! ```
//!
//! `up` starts at zero, so a new adapter is the identity. *Placement* says where adapters go in
//! a transformer block: **Houlsby** puts one after the attention sub-layer and one after the
//! feed-forward sub-layer; **Pfeiffer** puts a single one after the feed-forward sub-layer.
//! [`BlockAdapters`] holds the adapters of one block for either placement.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::{Device, Tensor, activation};

use super::{ComputeModule, check_last_dim};
use crate::error::{Error, Result};

/// The non-linearity between the down and up projections.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum AdapterActivation {
    /// `max(0, x)` (Houlsby's and adapter-transformers' default).
    Relu,
    /// Gaussian error linear unit.
    Gelu,
    /// `tanh(x)`.
    Tanh,
    /// `x · sigmoid(x)` (SiLU).
    Swish,
    /// No non-linearity.
    Identity,
}

impl AdapterActivation {
    pub(crate) fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Relu => activation::relu(x),
            Self::Gelu => activation::gelu(x),
            Self::Tanh => activation::tanh(x),
            Self::Swish => activation::silu(x),
            Self::Identity => x,
        }
    }
}

/// How the adapter composes with the sub-layer it adapts.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum AdapterForm {
    /// `h' = h + f(h)` on the sub-layer's output.
    Sequential,
    /// `h' = sublayer(x) + f(x)` on the sub-layer's input.
    Parallel,
}

/// Where the adapters of a transformer block go.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum AdapterPlacement {
    /// After the attention and after the feed-forward sub-layers (two adapters per block).
    Houlsby,
    /// After the feed-forward sub-layer only (one adapter per block).
    Pfeiffer,
}

/// Configuration of a [`BottleneckAdapter`].
#[derive(Config, Debug)]
pub struct BottleneckConfig {
    /// Hidden size `d` of the adapted stream.
    pub d_model: usize,
    /// Bottleneck width is `d_model / reduction_factor` (at least 1).
    #[config(default = 16)]
    pub reduction_factor: usize,
    /// Non-linearity.
    #[config(default = "AdapterActivation::Relu")]
    pub activation: AdapterActivation,
    /// Output scaling `s`.
    #[config(default = 1.0)]
    pub scaling: f64,
    /// Sequential or parallel composition.
    #[config(default = "AdapterForm::Sequential")]
    pub form: AdapterForm,
}

impl BottleneckConfig {
    /// Bottleneck width `max(1, d_model / reduction_factor)`.
    pub fn bottleneck(&self) -> usize {
        (self.d_model / self.reduction_factor.max(1)).max(1)
    }

    /// Creates the adapter (`up` zero-initialised, so it starts as the identity).
    ///
    /// # Errors
    /// [`Error::Invalid`] for `d_model = 0`, `reduction_factor = 0` or a non-finite scaling.
    pub fn init(&self, device: &Device) -> Result<BottleneckAdapter> {
        if self.d_model == 0 || self.reduction_factor == 0 {
            return Err(Error::invalid(
                "bottleneck adapter size",
                format!(
                    "d_model ({}) and reduction_factor ({}) must be positive",
                    self.d_model, self.reduction_factor
                ),
            ));
        }
        if !self.scaling.is_finite() {
            return Err(Error::invalid("adapter scaling", "must be finite"));
        }
        let m = self.bottleneck();
        Ok(BottleneckAdapter {
            down: LinearConfig::new(self.d_model, m).init(device),
            up: LinearConfig::new(m, self.d_model)
                .with_initializer(Initializer::Zeros)
                .init(device),
            activation: self.activation,
            scaling: self.scaling,
            form: self.form,
        })
    }
}

/// A bottleneck adapter `f(h) = s · up(σ(down(h)))`.
#[derive(Module, Debug)]
pub struct BottleneckAdapter {
    /// `d → d/reduction` projection.
    pub down: Linear,
    /// `d/reduction → d` projection (zero-initialised).
    pub up: Linear,
    /// Non-linearity.
    #[module(skip)]
    pub activation: AdapterActivation,
    /// Output scaling.
    pub scaling: f64,
    /// Sequential or parallel.
    #[module(skip)]
    pub form: AdapterForm,
}

impl BottleneckAdapter {
    /// Hidden size.
    pub fn d_model(&self) -> usize {
        self.down.weight.shape().dims::<2>()[0]
    }

    /// The residual function `f(h)` alone, `[..., d] → [..., d]`.
    pub fn delta<const D: usize>(&self, h: Tensor<D>) -> Tensor<D> {
        self.up
            .forward(self.activation.apply(self.down.forward(h)))
            .mul_scalar(self.scaling)
    }

    /// Applies the adapter around a sub-layer. `sublayer_in` is the sub-layer's input and
    /// `sublayer_out` its output: sequential returns `out + f(out)`, parallel `out + f(in)`.
    ///
    /// # Errors
    /// [`Error::Shape`] if either last axis is not `d_model`.
    pub fn forward<const D: usize>(
        &self,
        sublayer_in: Tensor<D>,
        sublayer_out: Tensor<D>,
    ) -> Result<Tensor<D>> {
        let d = self.d_model();
        check_last_dim(&sublayer_out, d, "bottleneck adapter sub-layer output")?;
        match self.form {
            AdapterForm::Sequential => Ok(sublayer_out.clone() + self.delta(sublayer_out)),
            AdapterForm::Parallel => {
                check_last_dim(&sublayer_in, d, "bottleneck adapter sub-layer input")?;
                Ok(sublayer_out + self.delta(sublayer_in))
            }
        }
    }
}

impl ComputeModule for BottleneckAdapter {
    fn d_input(&self) -> usize {
        self.d_model()
    }

    fn d_output(&self) -> usize {
        self.d_model()
    }

    /// The residual function `f(h)` (the part a router mixes).
    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        self.delta(x)
    }
}

/// The adapters of one transformer block under a [`AdapterPlacement`].
#[derive(Module, Debug)]
pub struct BlockAdapters {
    /// After the attention sub-layer (Houlsby only).
    pub attention: Option<BottleneckAdapter>,
    /// After the feed-forward sub-layer.
    pub feed_forward: BottleneckAdapter,
}

impl BlockAdapters {
    /// Creates the adapters `placement` asks for, each from `config`.
    ///
    /// # Errors
    /// As [`BottleneckConfig::init`].
    pub fn new(
        placement: AdapterPlacement,
        config: &BottleneckConfig,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self {
            attention: match placement {
                AdapterPlacement::Houlsby => Some(config.init(device)?),
                AdapterPlacement::Pfeiffer => None,
            },
            feed_forward: config.init(device)?,
        })
    }

    /// Adapts the attention sub-layer's output (a no-op under Pfeiffer placement).
    ///
    /// # Errors
    /// Shape errors as [`BottleneckAdapter::forward`].
    pub fn after_attention<const D: usize>(
        &self,
        attn_in: Tensor<D>,
        attn_out: Tensor<D>,
    ) -> Result<Tensor<D>> {
        match &self.attention {
            Some(a) => a.forward(attn_in, attn_out),
            None => Ok(attn_out),
        }
    }

    /// Adapts the feed-forward sub-layer's output.
    ///
    /// # Errors
    /// Shape errors as [`BottleneckAdapter::forward`].
    pub fn after_feed_forward<const D: usize>(
        &self,
        ffn_in: Tensor<D>,
        ffn_out: Tensor<D>,
    ) -> Result<Tensor<D>> {
        self.feed_forward.forward(ffn_in, ffn_out)
    }
}
