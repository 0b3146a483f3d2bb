//! One training step of end-task-aware training on a small shared body, for the benchmarks
//! (`benches/transfer.rs`, `bench_report`): five regression objectives on a 64 → 128 → 64
//! MLP body, weighted by fixed weights (MT-TARTAN) or after META-TARTAN's weight update.

#![allow(dead_code)]

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use modula::transfer::{TaskWeights, flat_gradient};

/// The shared body.
#[derive(Module, Debug)]
pub struct Body {
    l1: Linear,
    l2: Linear,
}

/// The body, six heads (five objectives and the dev head) and their batches of 32.
pub struct Setup {
    pub body: Body,
    heads: Vec<Linear>,
    xs: Vec<Tensor<2>>,
    ys: Vec<Tensor<2>>,
    pub optim: ModuleOptimizer,
    pub weights: TaskWeights,
}

impl Setup {
    /// A seeded setup on `device` (an autodiff device).
    pub fn new(device: &Device) -> Self {
        device.seed(0);
        let lin = |i, o| LinearConfig::new(i, o).init(device);
        Self {
            body: Body {
                l1: lin(64, 128),
                l2: lin(128, 64),
            },
            heads: (0..6).map(|_| lin(64, 10)).collect(),
            xs: (0..6)
                .map(|_| Tensor::random([32, 64], Distribution::Default, device))
                .collect(),
            ys: (0..6)
                .map(|_| Tensor::random([32, 10], Distribution::Default, device))
                .collect(),
            optim: AdamConfig::new().init(),
            weights: TaskWeights::equal(5),
        }
    }

    /// Objective `i`'s loss (5 is the dev objective).
    fn loss(&self, i: usize) -> Tensor<1> {
        let z = relu(
            self.body
                .l2
                .forward(relu(self.body.l1.forward(self.xs[i].clone()))),
        );
        (self.heads[i].forward(z) - self.ys[i].clone())
            .powi_scalar(2)
            .mean()
    }

    /// One step; META-TARTAN's weight update first when `meta`.
    pub fn step(&mut self, meta: bool) -> modula::Result<()> {
        if meta {
            let dev = flat_gradient(self.loss(5), &self.body);
            let grads: Vec<Vec<f64>> = (0..5)
                .map(|i| flat_gradient(self.loss(i), &self.body))
                .collect();
            self.weights.meta_step(&grads, &dev, 0.1)?;
        }
        let total = self
            .weights
            .combine((0..5).map(|i| self.loss(i)).collect())?;
        let grads = GradientsParams::from_grads(total.backward(), &self.body);
        self.body = self.optim.step(1e-3, self.body.clone(), grads);
        Ok(())
    }
}
