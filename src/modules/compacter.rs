//! Compacter and PHM layers (Mahabadi, Henderson & Ruder 2021, "Compacter: Efficient
//! Low-Rank Hypercomplex Adapter Layers", arXiv 2106.04647; Zhang et al. 2021's
//! parameterised hypercomplex multiplication, arXiv 2102.08597).
//!
//! A PHM layer builds its weight from `n` Kronecker products:
//!
//! ```text
//! W = Σ_{i=1}^{n} A_i ⊗ B_i          A_i: [n, n],  B_i: [d_in/n, d_out/n],   W: [d_in, d_out]
//! ```
//!
//! so it holds `n³ + d_in·d_out/n` numbers instead of `d_in·d_out`. Compacter makes every
//! `B_i` rank one, `B_i = s_i t_iᵀ`, and **shares the "rules" `A_i` across all adapter layers**;
//! each layer's bottleneck adapter `h + U(GELU(D h))` then has PHM down and up projections.
//! [`Compacter`] holds the shared rules once (one parameter, so one optimizer state) and the
//! per-layer factors, and applies layer `l`'s adapter.
//!
//! The weights are formed per call: an adapter's `D` and `U` are `d × r` and `r × d`, the size
//! of the bottleneck's own computation, never `d × d`.
//!
//! # Shapes
//! - rules `A`: `[n, n, n]`; layer `l`: `down_s [n, d/n]`, `down_t [n, r/n]`, `up_s [n, r/n]`,
//!   `up_t [n, d/n]`; hidden states `[rows, d]`

use burn::module::{Module, Param};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Distribution, Tensor};

use super::check_last_dim;
use crate::error::{Error, Result};

/// `Σ_i A_i ⊗ (s_i t_iᵀ)` for rules `a: [n, n, n]`, `s: [n, p]`, `t: [n, q]`: `[n·p, n·q]`.
pub fn phm_weight(a: Tensor<3>, s: Tensor<2>, t: Tensor<2>) -> Tensor<2> {
    let [n, _, _] = a.dims();
    let p = s.dims()[1];
    let q = t.dims()[1];
    // B_i[b, d] = s_i[b] t_i[d];  W[(a, b), (c, d)] = Σ_i A_i[a, c] B_i[b, d]
    let b: Tensor<3> = s.reshape([n, p, 1]) * t.reshape([n, 1, q]);
    let a5: Tensor<5> = a.reshape([n, n, 1, n, 1]);
    let b5: Tensor<5> = b.reshape([n, 1, p, 1, q]);
    (a5 * b5).sum_dim(0).reshape([n * p, n * q])
}

/// Per-layer factors of a [`Compacter`] adapter.
#[derive(Module, Debug)]
pub struct CompacterLayer {
    /// Down projection: `s_i`, `[n, d/n]`.
    pub down_s: Param<Tensor<2>>,
    /// Down projection: `t_i`, `[n, r/n]`.
    pub down_t: Param<Tensor<2>>,
    /// Up projection: `s_i`, `[n, r/n]`.
    pub up_s: Param<Tensor<2>>,
    /// Up projection: `t_i`, `[n, d/n]` (zero at first: the adapter starts as the identity).
    pub up_t: Param<Tensor<2>>,
}

/// Compacter adapters for `layers` layers of width `d` with bottleneck `r` over `n` shared
/// rules (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct Compacter {
    /// The shared rules `A_i`, `[n, n, n]`.
    pub rules: Param<Tensor<3>>,
    /// One adapter's factors per layer.
    pub layers: Vec<CompacterLayer>,
}

impl Compacter {
    /// `layers` adapters of width `d` and bottleneck `r`, over `n` rules (`n` divides `d` and
    /// `r`); each starts as the identity.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero sizes or an `n` that does not divide `d` and `r`.
    pub fn new(layers: usize, d: usize, r: usize, n: usize, device: &Device) -> Result<Self> {
        if layers == 0 || d == 0 || r == 0 || n == 0 || !d.is_multiple_of(n) || !r.is_multiple_of(n)
        {
            return Err(Error::invalid(
                "Compacter sizes",
                format!(
                    "layers {layers}, d {d}, r {r}, n {n}: all positive, with n dividing d and r"
                ),
            ));
        }
        let normal = |shape: [usize; 2], std: f64| {
            Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, std),
                device,
            ))
        };
        let (dn, rn) = (d / n, r / n);
        Ok(Self {
            rules: Param::from_tensor(Tensor::random(
                [n, n, n],
                Distribution::Normal(0.0, 1.0 / n as f64),
                device,
            )),
            layers: (0..layers)
                .map(|_| CompacterLayer {
                    down_s: normal([n, dn], (1.0 / d as f64).sqrt()),
                    down_t: normal([n, rn], 1.0),
                    up_s: normal([n, rn], (1.0 / r as f64).sqrt()),
                    up_t: Param::from_tensor(Tensor::zeros([n, dn], device)),
                })
                .collect(),
        })
    }

    /// Number of rules `n`.
    pub fn n(&self) -> usize {
        self.rules.shape().dims::<3>()[0]
    }

    /// Hidden width `d`.
    pub fn d(&self) -> usize {
        self.n() * self.layers[0].down_s.shape().dims::<2>()[1]
    }

    /// Layer `l`'s `(D: [d, r], U: [r, d])`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a layer index out of range.
    pub fn weights(&self, l: usize) -> Result<(Tensor<2>, Tensor<2>)> {
        let layer = self.layers.get(l).ok_or_else(|| {
            Error::invalid(
                "Compacter layer",
                format!("{l} is outside 0..{}", self.layers.len()),
            )
        })?;
        let a = self.rules.val();
        Ok((
            phm_weight(a.clone(), layer.down_s.val(), layer.down_t.val()),
            phm_weight(a, layer.up_s.val(), layer.up_t.val()),
        ))
    }

    /// Layer `l`'s adapter: `h + U(GELU(D h))`.
    ///
    /// # Errors
    /// [`Error::Shape`] for a width other than `d`; as [`weights`](Self::weights).
    pub fn forward(&self, l: usize, h: Tensor<2>) -> Result<Tensor<2>> {
        check_last_dim(&h, self.d(), "Compacter input")?;
        let (down, up) = self.weights(l)?;
        Ok(h.clone() + gelu(h.matmul(down)).matmul(up))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::lycoris::kron;
    use crate::tensor_util::to_vec_f32;

    /// The PHM weight equals Σ kron(A_i, s_i t_iᵀ) built one product at a time; a new
    /// Compacter is the identity; its parameter count is the paper's.
    #[test]
    fn phm_weight_is_a_sum_of_kronecker_products() {
        let dev = Device::flex();
        let n = 2;
        let a = Tensor::<3>::random([n, n, n], Distribution::Normal(0.0, 1.0), &dev);
        let s = Tensor::<2>::random([n, 3], Distribution::Normal(0.0, 1.0), &dev);
        let t = Tensor::<2>::random([n, 4], Distribution::Normal(0.0, 1.0), &dev);
        let w = phm_weight(a.clone(), s.clone(), t.clone());
        assert_eq!(w.dims(), [6, 8]);
        let mut want = Tensor::<2>::zeros([6, 8], &dev);
        for i in 0..n {
            let ai: Tensor<2> = a.clone().slice([i..i + 1, 0..n, 0..n]).reshape([n, n]);
            let bi = s
                .clone()
                .slice([i..i + 1, 0..3])
                .transpose()
                .matmul(t.clone().slice([i..i + 1, 0..4]));
            want = want + kron(ai, bi);
        }
        let diff = to_vec_f32((w - want).abs().max())[0];
        assert!(diff < 1e-5, "{diff}");
        let c = Compacter::new(3, 8, 4, 2, &dev).unwrap();
        let h = Tensor::<2>::random([5, 8], Distribution::Normal(0.0, 1.0), &dev);
        assert_eq!(
            to_vec_f32(c.forward(2, h.clone()).unwrap()),
            to_vec_f32(h.clone())
        );
        assert_eq!(c.num_params(), 2 * 2 * 2 + 3 * 2 * (4 + 2 + 2 + 4));
        assert!(c.forward(3, h).is_err());
        assert!(Compacter::new(1, 9, 4, 2, &dev).is_err());
    }
}
