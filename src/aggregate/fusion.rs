//! AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for
//! Transfer Learning", arXiv 2005.00247): attention over the adapters' outputs, the query from
//! the layer input, keys and values from each adapter's output.

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::routing::{Aggregator, DispatchPlan};

/// Configuration of a [`AdapterFusion`]: widths and temperature.
#[derive(burn::config::Config, Debug)]
pub struct AdapterFusionConfig {
    /// Width of the layer input (the query).
    pub d_in: usize,
    /// Width of the adapter outputs (keys and values).
    pub d_out: usize,
    /// Width of the attention space.
    pub d_attn: usize,
    /// Softmax temperature.
    #[config(default = 1.0)]
    pub temperature: f64,
}

impl AdapterFusionConfig {
    /// A fusion layer for inputs of width `d_in` and adapter outputs of width `d_out`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero widths or a temperature that is not positive.
    pub fn init(&self, device: &Device) -> Result<AdapterFusion> {
        let (d_in, d_out, d_attn, temperature) =
            (self.d_in, self.d_out, self.d_attn, self.temperature);

        if d_in == 0 || d_out == 0 || d_attn == 0 {
            return Err(Error::invalid(
                "AdapterFusion widths",
                "d_in, d_out and d_attn must be at least 1",
            ));
        }
        crate::routers::check_temperature("AdapterFusion temperature", temperature)?;
        let mut value = LinearConfig::new(d_out, d_out)
            .with_bias(false)
            .init(device);
        value.weight = Param::from_tensor(Tensor::<2>::eye(d_out, device));
        Ok(AdapterFusion {
            query: LinearConfig::new(d_in, d_attn).init(device),
            key: LinearConfig::new(d_out, d_attn).init(device),
            value,
            temperature,
        })
    }
}

/// AdapterFusion: attention over adapter outputs (see the [module docs](self)).
///
/// For a row with input `x` and adapter outputs `o_1 … o_E` (each `[d_out]`):
/// `q = x W_q`, `k_e = o_e W_k`, `a = softmax_e(q·k_e / T)`, output `Σ_e a_e (o_e W_v)`.
/// `W_v` starts at the identity (as in the paper) and `W_q`, `W_k` at small random values,
/// so a fresh fusion averages the adapters.
#[derive(Module, Debug)]
pub struct AdapterFusion {
    /// Query projection `d_in → d_attn`.
    pub query: Linear,
    /// Key projection `d_out → d_attn`.
    pub key: Linear,
    /// Value projection `d_out → d_out` (starts at the identity).
    pub value: Linear,
    /// Softmax temperature.
    #[module(skip)]
    pub temperature: f64,
}

impl AdapterFusion {
    /// Fuses `outputs: [rows, E, d_out]` (e.g. [`DispatchPlan::to_slots`](crate::routing::DispatchPlan::to_slots)
    /// of a dense routing) for inputs `x: [rows, d_in]`; returns the fused `[rows, d_out]` and
    /// the attention `[rows, E]`. As an [`Aggregator`], it fuses whatever slots a routing
    /// gave each row; the routing's weights are not used (the attention replaces them).
    ///
    /// # Errors
    /// [`Error::Shape`] for mismatched rows or widths.
    pub fn fuse(&self, x: Tensor<2>, outputs: Tensor<3>) -> Result<(Tensor<2>, Tensor<2>)> {
        let [rows, d_in] = x.dims();
        let [orows, e, d_out] = outputs.dims();
        let q_in = self.query.weight.shape().dims::<2>()[0];
        let v_in = self.value.weight.shape().dims::<2>()[0];
        if rows != orows || d_in != q_in || d_out != v_in {
            return Err(Error::shape(
                "AdapterFusion::fuse",
                format!("x: [rows, {q_in}], outputs: [rows, E, {v_in}]"),
                format!("x: {:?}, outputs: {:?}", x.dims(), outputs.dims()),
            ));
        }
        let q = self.query.forward(x); // [rows, d_attn]
        let k = self.key.forward(outputs.clone()); // [rows, E, d_attn]
        let scores = k.matmul(q.unsqueeze_dim::<3>(2)).reshape([rows, e]);
        let attn = softmax(scores.div_scalar(self.temperature), 1);
        let v = self.value.forward(outputs); // [rows, E, d_out]
        let fused = attn
            .clone()
            .unsqueeze_dim::<3>(1)
            .matmul(v)
            .reshape([rows, d_out]);
        Ok((fused, attn))
    }
}

impl Aggregator for AdapterFusion {
    fn combine(&self, plan: &DispatchPlan, x: &Tensor<2>, y: Tensor<2>) -> Result<Tensor<2>> {
        Ok(self.fuse(x.clone(), plan.to_slots(y))?.0)
    }
}
