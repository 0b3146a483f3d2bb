//! Rotary position embeddings (RoPE; Su et al., RoFormer, arXiv 2104.09864) as Hugging Face
//! transformers computes them for the Llama family.
//!
//! # The math
//! For a head of width `d` (even) and base `θ`, the inverse frequencies are
//! `f_i = θ^(-2i/d)` for `i < d/2`. A vector `x` at position `p` is rotated as
//!
//! `rope(x, p) = x ⊙ cos(p·[f, f]) + rotate_half(x) ⊙ sin(p·[f, f])`,
//! `rotate_half([x₁, x₂]) = [-x₂, x₁]`,
//!
//! with `x₁`, `x₂` the first and second halves of `x`. Frequency `i` thus pairs component `i`
//! with component `i + d/2`. burn-nn's `RotaryEncoding` pairs adjacent components instead; with
//! it a checkpoint's q/k weights would have to be permuted, which breaks q/k LoRAs trained on
//! the original layout.
//!
//! Llama 3.1 (`rope_type: "llama3"`) rescales the frequencies. With wavelength
//! `λ_i = 2π/f_i`, original context `L`, `factor` `s` and frequency factors `lo`, `hi`:
//! - `λ_i < L/hi`: `f_i` is kept;
//! - `λ_i > L/lo`: `f_i/s`;
//! - in between: `(1 - a)·f_i/s + a·f_i` with `a = (L/λ_i - lo)/(hi - lo)`.
//!
//! Every step runs in `f32` in the order transformers uses, so the frequencies equal
//! transformers' bit for bit (tests/data/rope_golden.safetensors).

use burn::tensor::{Int, Tensor};

use crate::error::{Error, Result};
use crate::tensor_util::float_tensor;

/// A frequency scaling of RoPE (`rope_scaling` / `rope_parameters` in a `config.json`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's `llama3` scaling.
    Llama3 {
        /// `factor` (8 for Llama 3.1).
        factor: f64,
        /// `low_freq_factor` (1).
        low_freq_factor: f64,
        /// `high_freq_factor` (4).
        high_freq_factor: f64,
        /// `original_max_position_embeddings` (8192).
        original_max_position_embeddings: usize,
    },
}

/// Rotary position embeddings for heads of one width (see the [module docs](self)).
///
/// # Shapes
/// - positions: `[batch, seq]` (Int); cos and sin: `[batch, seq, head_dim]`
/// - [`apply`](Self::apply): `x: [batch, heads, seq, head_dim]`, same shape out
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// RoPE for heads of width `head_dim` with base `theta`, optionally scaled.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an odd or zero `head_dim`, a `theta` that is not above 1, or
    /// scaling parameters out of range (`factor` ≤ 0, `high_freq_factor` ≤ `low_freq_factor`,
    /// a zero original context).
    pub fn new(head_dim: usize, theta: f64, scaling: Option<RopeScaling>) -> Result<Self> {
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Error::invalid(
                "RoPE head_dim",
                format!("{head_dim}: rotary embeddings need an even, positive head width"),
            ));
        }
        if !(theta.is_finite() && theta > 1.0) {
            return Err(Error::invalid(
                "rope_theta",
                format!("{theta}: the base must be a finite number above 1"),
            ));
        }
        // transformers: 1 / (base ** (arange(0, dim, 2).float() / dim)), in f32.
        let base = theta as f32;
        let mut inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        if let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = scaling
        {
            if !(factor > 0.0
                && low_freq_factor >= 0.0
                && high_freq_factor > low_freq_factor
                && original_max_position_embeddings > 0)
            {
                return Err(Error::invalid(
                    "rope_scaling (llama3)",
                    "needs factor > 0, high_freq_factor > low_freq_factor >= 0 and a positive \
                     original_max_position_embeddings",
                ));
            }
            let (s, lo, hi) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
            );
            let context = original_max_position_embeddings as f32;
            let (low_wavelen, high_wavelen) = (context / lo, context / hi);
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let scaled = if wavelen > low_wavelen { *f / s } else { *f };
                let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                *f = if medium {
                    let a = (context / wavelen - lo) / (hi - lo);
                    (1.0 - a) * scaled / s + a * scaled
                } else {
                    scaled
                };
            }
        }
        Ok(Self { inv_freq })
    }

    /// The inverse frequencies `f_i`, `head_dim / 2` of them.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// `cos(p·[f, f])` and `sin(p·[f, f])` for every position: `([batch, seq, head_dim],
    /// [batch, seq, head_dim])`. Positions are what the model counts (with left padding,
    /// Hugging Face counts unmasked tokens only; the caller passes those).
    pub fn cos_sin(&self, positions: Tensor<2, Int>) -> (Tensor<3>, Tensor<3>) {
        let [batch, seq] = positions.dims();
        let device = positions.device();
        let half = self.inv_freq.len();
        let f = float_tensor(self.inv_freq.clone(), [1, 1, half], &device);
        let freqs = positions.float().reshape([batch, seq, 1]) * f;
        let angles = Tensor::cat(vec![freqs.clone(), freqs], 2);
        (angles.clone().cos(), angles.sin())
    }

    /// Rotates `x: [batch, heads, seq, head_dim]` by `cos`/`sin` from
    /// [`cos_sin`](Self::cos_sin).
    ///
    /// # Errors
    /// [`Error::Shape`] if `x`'s head width is not this RoPE's, or cos/sin are not
    /// `[batch, seq, head_dim]`.
    pub fn apply(&self, x: Tensor<4>, cos: &Tensor<3>, sin: &Tensor<3>) -> Result<Tensor<4>> {
        let [b, h, s, d] = x.dims();
        if d != self.head_dim() {
            return Err(Error::shape(
                "RoPE input head width",
                self.head_dim().to_string(),
                d.to_string(),
            ));
        }
        for t in [cos, sin] {
            if t.dims() != [b, s, d] {
                return Err(Error::shape(
                    "RoPE cos/sin ([batch, seq, head_dim])",
                    format!("{:?}", [b, s, d]),
                    format!("{:?}", t.dims()),
                ));
            }
        }
        let half = d / 2;
        let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
        let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let (c, sn) = (cos.clone().unsqueeze_dim(1), sin.clone().unsqueeze_dim(1));
        Ok(x * c + rotated * sn)
    }
}
