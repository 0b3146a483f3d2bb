//! Arrow's router (Ostapenko et al. 2024, arXiv 2405.11157): per token `x`,
//! `logit_e = |x·v_e| / τ` against each expert's prototype `v_e`; the top `k` logits are kept
//! and the routing weights are their softmax. `x` is not normalised, as in PEFT. The
//! prototypes are computed exactly from a library's factors in
//! [`library::arrow`](crate::library::arrow).

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use crate::error::{Error, Result};
use crate::routing::{Router, RouterInput, Routing};
use crate::tensor_util::{ensure_finite, float_tensor};

/// Arrow's router for one layer: `|x·v_e| / τ`, top-`k`, softmax over the kept logits.
#[derive(Clone, Debug)]
pub struct ArrowRouter {
    /// Prototypes, `[experts, d_in]`, transposed to `[d_in, experts]` for the logits matmul.
    prototypes_t: Tensor<2>,
    top_k: usize,
    temperature: f64,
}

impl ArrowRouter {
    /// A router from prototypes, `[experts, d_in]` in any float dtype (e.g.
    /// [`arrow_prototypes`](crate::library::arrow_prototypes)).
    ///
    /// # Errors
    /// [`Error::Shape`] if the prototypes are not a 2-D matrix; [`Error::NonFinite`] for NaN
    /// or infinite entries; [`Error::Invalid`] for `top_k` of 0 or above the number of
    /// experts, or a temperature that is not positive and finite.
    pub fn new(
        prototypes: &TensorData,
        top_k: usize,
        temperature: f64,
        device: &Device,
    ) -> Result<Self> {
        let dims = prototypes.shape().to_vec();
        let &[e, d_in] = dims.as_slice() else {
            return Err(Error::shape(
                "Arrow prototypes ([experts, d_in])",
                "2 dimensions",
                format!("{dims:?}"),
            ));
        };
        let rows: Vec<f32> = prototypes.iter::<f32>().collect();
        if rows.iter().any(|v| !v.is_finite()) {
            return Err(Error::non_finite("Arrow prototypes"));
        }
        // Stored `[d_in, experts]` for the logits matmul.
        let mut t_major = vec![0f32; e * d_in];
        for (i, row) in rows.chunks_exact(d_in.max(1)).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                t_major[j * e + i] = v;
            }
        }
        if top_k == 0 || top_k > e {
            return Err(Error::invalid(
                "Arrow top_k",
                format!("{top_k} is outside 1..={e} (the number of experts)"),
            ));
        }
        super::check_temperature("Arrow temperature", temperature)?;
        Ok(Self {
            prototypes_t: float_tensor(t_major, [d_in, e], device),
            top_k,
            temperature,
        })
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.prototypes_t.dims()[0]
    }

    /// `|x·v_e|` for every token and expert, `[rows, experts]`.
    pub fn similarities(&self, x: &Tensor<2>) -> Result<Tensor<2>> {
        let [_, d] = x.dims();
        if d != self.d_in() {
            return Err(Error::shape(
                "ArrowRouter (input width)",
                self.d_in().to_string(),
                d.to_string(),
            ));
        }
        let sims = x.clone().matmul(self.prototypes_t.clone()).abs();
        ensure_finite(&sims, "Arrow logits")?;
        Ok(sims)
    }
}

impl Router for ArrowRouter {
    fn num_modules(&self) -> usize {
        self.prototypes_t.dims()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("ArrowRouter")?;
        let sims = self.similarities(x)?;
        let (vals, idx) = sims.topk_with_indices(self.top_k, 1);
        let w = softmax(vals.div_scalar(self.temperature), 1);
        Routing::new(idx, w, self.num_modules())
    }
}
