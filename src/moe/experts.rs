//! Expert networks: the feed-forward modules an MoE layer routes between.
//!
//! - plain two-layer MLP: `y = W_2 σ(W_1 x + b_1) + b_2`;
//! - SwiGLU (Shazeer 2020, arXiv 2002.05202, as in Mixtral/LLaMA):
//!   `y = W_2 (silu(W_g x) ⊙ W_u x)`. The gate and up projections are stored as one
//!   `d → 2·d_ff` matrix so that one GEMM computes both.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::grouped::swiglu_gate;
use crate::modules::ComputeModule;
use crate::modules::adapter::AdapterActivation;

/// The shape of an expert.
#[derive(Config, Debug, Copy, PartialEq)]
pub enum ExpertKind {
    /// Two layers with a non-linearity in between.
    Mlp,
    /// SwiGLU: `W_2 (silu(W_g x) ⊙ W_u x)`.
    SwiGlu,
}

/// Configuration of an [`Expert`].
#[derive(Config, Debug)]
pub struct ExpertConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Hidden width `d_ff`.
    pub d_ff: usize,
    /// Plain MLP or SwiGLU.
    #[config(default = "ExpertKind::SwiGlu")]
    pub kind: ExpertKind,
    /// Non-linearity of the plain MLP (ignored by SwiGLU).
    #[config(default = "AdapterActivation::Gelu")]
    pub activation: AdapterActivation,
    /// Bias terms on the projections.
    #[config(default = false)]
    pub bias: bool,
}

impl ExpertConfig {
    /// Creates one expert.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero width.
    pub fn init(&self, device: &Device) -> Result<Expert> {
        if self.d_model == 0 || self.d_ff == 0 {
            return Err(Error::invalid(
                "expert widths",
                "d_model and d_ff must be positive",
            ));
        }
        let up = match self.kind {
            ExpertKind::Mlp => self.d_ff,
            ExpertKind::SwiGlu => 2 * self.d_ff,
        };
        Ok(Expert {
            w_in: LinearConfig::new(self.d_model, up)
                .with_bias(self.bias)
                .init(device),
            w_out: LinearConfig::new(self.d_ff, self.d_model)
                .with_bias(self.bias)
                .init(device),
            kind: self.kind,
            activation: self.activation,
            hidden_mask: None,
        })
    }
}

/// One feed-forward expert.
#[derive(Module, Debug)]
pub struct Expert {
    /// `d → d_ff` (MLP) or `d → 2·d_ff` (SwiGLU: gate half first, then up half).
    pub w_in: Linear,
    /// `d_ff → d`.
    pub w_out: Linear,
    /// Plain MLP or SwiGLU.
    #[module(skip)]
    pub kind: ExpertKind,
    /// The MLP's non-linearity.
    #[module(skip)]
    pub activation: AdapterActivation,
    /// A multiplicative mask over the hidden units (`[d_ff]`, applied after the
    /// non-linearity), set by structured pruning; `None`: every unit at 1. A layer whose
    /// experts carry masks computes them one by one rather than grouped.
    #[module(skip)]
    pub hidden_mask: Option<Tensor<1>>,
}

impl Expert {
    /// Hidden width `d_ff`.
    pub fn d_ff(&self) -> usize {
        self.w_out.weight.shape().dims::<2>()[0]
    }

    /// Multiply-adds per row (for FLOP accounting): `d·d_ff·(2 or 3)`.
    pub fn macs_per_row(&self) -> usize {
        let [d, up] = self.w_in.weight.shape().dims();
        d * up + self.d_ff() * d
    }
}

impl ComputeModule for Expert {
    fn d_input(&self) -> usize {
        self.w_in.weight.shape().dims::<2>()[0]
    }

    fn d_output(&self) -> usize {
        self.w_out.weight.shape().dims::<2>()[1]
    }

    fn forward_rows(&self, x: Tensor<2>) -> Tensor<2> {
        let h = self.w_in.forward(x);
        let h = match self.kind {
            ExpertKind::Mlp => self.activation.apply(h),
            ExpertKind::SwiGlu => swiglu_gate(h),
        };
        let h = match &self.hidden_mask {
            Some(m) => h * m.clone().unsqueeze::<2>(),
            None => h,
        };
        self.w_out.forward(h)
    }
}
