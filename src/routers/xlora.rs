//! An X-LoRA-style (Buehler & Buehler 2024, arXiv 2402.07148) per-token classifier over a
//! library's experts: a small MLP on the layer's input, softmax (optionally kept to the top `k`
//! and renormalised), used as output-mixture weights. X-LoRA itself computes the scalings of
//! every layer from a first, adapter-free pass of the whole model; this router is the
//! layer-local form of the same classifier. L2R trains it on a task memory
//! ([`continual::l2r`](crate::continual::l2r)).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::{Device, Tensor};

use crate::error::{Error, Result};
use crate::routing::{Router, RouterInput, Routing};
use crate::tensor_util::check_logits;

/// Configuration of a [`XLoraRouter`]: a classifier `d_in → hidden → experts` (ReLU).
#[derive(burn::config::Config, Debug)]
pub struct XLoraRouterConfig {
    /// Input width.
    pub d_in: usize,
    /// Hidden width of the classifier.
    pub hidden: usize,
    /// Number of experts (output logits).
    pub experts: usize,
    /// Keep only the top `k` weights per row (renormalised); `None` keeps all.
    pub top_k: Option<usize>,
    /// Softmax temperature.
    #[config(default = 1.0)]
    pub temperature: f64,
}

impl XLoraRouterConfig {
    /// A classifier `d_in → hidden → experts` (ReLU).
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero widths, `top_k` of 0 or above `experts`, or a temperature
    /// that is not positive.
    pub fn init(&self, device: &Device) -> Result<XLoraRouter> {
        let (d_in, hidden, experts, top_k, temperature) = (
            self.d_in,
            self.hidden,
            self.experts,
            self.top_k,
            self.temperature,
        );

        if d_in == 0 || hidden == 0 || experts == 0 {
            return Err(Error::invalid(
                "X-LoRA classifier",
                format!("widths {d_in} → {hidden} → {experts} must all be at least 1"),
            ));
        }
        if let Some(k) = top_k
            && (k == 0 || k > experts)
        {
            return Err(Error::invalid(
                "X-LoRA top_k",
                format!("{k} is outside 1..={experts} (the number of experts)"),
            ));
        }
        super::check_temperature("X-LoRA temperature", temperature)?;
        Ok(XLoraRouter {
            hidden: LinearConfig::new(d_in, hidden).init(device),
            out: LinearConfig::new(hidden, experts).init(device),
            top_k,
            temperature,
        })
    }
}

/// An X-LoRA-style per-token classifier over `experts` (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct XLoraRouter {
    /// Hidden layer of the classifier.
    pub hidden: Linear,
    /// Output layer: one logit per expert.
    pub out: Linear,
    /// Keep only the top `k` weights per row (renormalised); `None` keeps all.
    #[module(skip)]
    pub top_k: Option<usize>,
    /// Softmax temperature.
    #[module(skip)]
    pub temperature: f64,
}

impl XLoraRouter {
    /// The classifier's logits (before temperature and softmax), `[rows, experts]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for the wrong input width.
    pub fn logits(&self, x: &Tensor<2>) -> Result<Tensor<2>> {
        let d_in = self.hidden.weight.shape().dims::<2>()[0];
        if x.dims()[1] != d_in {
            return Err(Error::shape(
                "XLoraRouter input width",
                d_in.to_string(),
                x.dims()[1].to_string(),
            ));
        }
        Ok(self.out.forward(relu(self.hidden.forward(x.clone()))))
    }
}

impl Router for XLoraRouter {
    fn num_modules(&self) -> usize {
        self.out.weight.shape().dims::<2>()[1]
    }

    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        let x = input.into_rows("XLoraRouter")?;
        let logits = self.logits(x)?.div_scalar(self.temperature);
        check_logits(&logits, "X-LoRA logits")?;
        match self.top_k {
            None => Routing::from_dense(softmax(logits, 1)),
            Some(k) => {
                let (vals, idx) = logits.topk_with_indices(k, 1);
                Routing::new(idx, softmax(vals, 1), self.num_modules())
            }
        }
    }
}
