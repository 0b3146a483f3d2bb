//! Diff pruning (Guo, Rush, Kim 2021, "Parameter-Efficient Transfer Learning with Diff
//! Pruning"): a task's change to a frozen weight is a sparse delta `δ ⊙ z`, with one
//! hard-concrete gate `z` ([`HardConcrete`]) per entry, made sparse by the expected L0 (or
//! driven to a target density by a [`Lagrangian`](super::Lagrangian)); the same gates that
//! prune units, here over parameters. The layer computes `y = x (W₀ + δ ⊙ z) + b` with `W₀`
//! frozen; after training, [`DiffPruning::magnitude_pruned`] keeps the largest entries of
//! the deterministic delta at an exact density, as the paper's final step.
//!
//! # Shapes
//! - `W₀`, `δ`, the gates: `[d_in, d_out]` (burn's `Linear` layout); `x`: `[rows, d_in]`

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};

use super::HardConcrete;
use crate::error::{Error, Result};

/// A sparse, gated delta over one frozen weight (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct DiffPruning {
    /// The dense delta `δ`, `[d_in, d_out]`, initialised at 0.
    pub delta: Param<Tensor<2>>,
    /// One gate per entry (flattened row-major).
    pub gates: HardConcrete,
}

impl DiffPruning {
    /// A zero delta over a `[d_in, d_out]` weight, gates at `log α ≈ init`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero width or a non-finite `init`.
    pub fn new(d_in: usize, d_out: usize, init: f64, device: &Device) -> Result<Self> {
        if d_in == 0 || d_out == 0 {
            return Err(Error::invalid(
                "diff pruning",
                format!("a [{d_in}, {d_out}] weight; both widths must be positive"),
            ));
        }
        Ok(Self {
            delta: Param::from_tensor(Tensor::zeros([d_in, d_out], device)),
            gates: HardConcrete::new(d_in * d_out, init, device)?,
        })
    }

    fn dims(&self) -> [usize; 2] {
        self.delta.shape().dims::<2>()
    }

    /// `δ ⊙ z` with a training sample of the gates.
    pub fn sample(&self) -> Tensor<2> {
        self.delta.val() * self.gates.sample().reshape(self.dims())
    }

    /// `δ ⊙ z` with the deterministic gates.
    pub fn deterministic(&self) -> Tensor<2> {
        self.delta.val() * self.gates.deterministic().reshape(self.dims())
    }

    /// The expected share of non-zero entries, `mean P(z > 0)`, `[1]`.
    pub fn expected_density(&self) -> Tensor<1> {
        self.gates.prob_open().mean()
    }

    /// `x (W₀ + Δ) + b` for the frozen `base`, with a gate sample (`training`) or the
    /// deterministic gates.
    ///
    /// # Errors
    /// [`Error::Shape`] for a base of other widths.
    pub fn forward(&self, base: &Linear, x: Tensor<2>, training: bool) -> Result<Tensor<2>> {
        let w = base.weight.val();
        if w.dims() != self.dims() {
            return Err(Error::shape(
                "diff-pruned base weight",
                format!("{:?}", self.dims()),
                format!("{:?}", w.dims()),
            ));
        }
        let d = if training {
            self.sample()
        } else {
            self.deterministic()
        };
        let y = x.matmul(w + d);
        Ok(match &base.bias {
            Some(b) => y + b.val().unsqueeze::<2>(),
            None => y,
        })
    }

    /// The deterministic delta with all but its `density` largest entries (by magnitude) set
    /// to 0: the final sparse delta, `[d_in, d_out]`, to add to `W₀`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a density outside `(0, 1]`.
    pub fn magnitude_pruned(&self, density: f64) -> Result<Tensor<2>> {
        if !(density > 0.0 && density <= 1.0) {
            return Err(Error::invalid(
                "diff pruning density",
                format!("{density} must be in (0, 1]"),
            ));
        }
        let d = self.deterministic();
        let device = d.device();
        let v: Vec<f32> = d.into_data().iter::<f32>().collect();
        let keep = ((density * v.len() as f64).round() as usize).max(1);
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()).then(a.cmp(&b)));
        let mut out = vec![0f32; v.len()];
        for &i in &order[..keep] {
            out[i] = v[i];
        }
        Ok(Tensor::from_data(
            TensorData::new(out, self.dims()),
            &device,
        ))
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::LinearConfig;
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::tensor::Distribution;

    use super::*;
    use crate::prune::Lagrangian;

    #[test]
    fn diff_pruning_finds_a_planted_sparse_change() {
        // W* = W₀ + Δ*, Δ* non-zero at 4 of 32 entries; the gated delta, driven to a density
        // of 4/32, learns y = x W* and its 4 largest entries are Δ*'s.
        let device = Device::flex().autodiff();
        device.seed(5);
        let base = LinearConfig::new(8, 4)
            .with_bias(false)
            .init(&device)
            .no_grad();
        let support = [
            (0usize, 1usize, 1.5f32),
            (3, 0, -1.0),
            (5, 3, 2.0),
            (7, 2, -1.5),
        ];
        let mut dstar = vec![0f32; 32];
        for &(i, j, v) in &support {
            dstar[i * 4 + j] = v;
        }
        let wstar = base.weight.val() + Tensor::from_data(TensorData::new(dstar, [8, 4]), &device);
        let mut diff = DiffPruning::new(8, 4, 1.0, &device).unwrap();
        let mut lagrangian = Lagrangian::new(&device);
        let (mut od, mut ol) = (AdamConfig::new().init(), AdamConfig::new().init());
        for _ in 0..800 {
            let x = Tensor::<2>::random([64, 8], Distribution::Normal(0.0, 1.0), &device);
            let y = x.clone().matmul(wstar.clone());
            let fit = (diff.forward(&base, x, true).unwrap() - y)
                .powi_scalar(2)
                .mean();
            let sparsity = diff.expected_density().neg().add_scalar(1.0);
            let loss = fit + lagrangian.penalty(sparsity, 1.0 - 4.0 / 32.0).unwrap();
            let mut grads = loss.backward();
            let gd = GradientsParams::from_module(&mut grads, &diff);
            let gl = GradientsParams::from_module(&mut grads, &lagrangian);
            diff = od.step(0.05, diff, gd);
            lagrangian = ol.step(-0.05, lagrangian, gl);
        }
        let sparse = diff.valid().magnitude_pruned(4.0 / 32.0).unwrap();
        let v: Vec<f32> = sparse.into_data().iter::<f32>().collect();
        let found: Vec<usize> = (0..32).filter(|&i| v[i] != 0.0).collect();
        let mut want: Vec<usize> = support.iter().map(|&(i, j, _)| i * 4 + j).collect();
        want.sort_unstable();
        assert_eq!(found, want, "{v:?}");
        for &(i, j, val) in &support {
            assert!(
                (v[i * 4 + j] - val).abs() < 0.2,
                "{i},{j}: {} vs {val}",
                v[i * 4 + j]
            );
        }
        assert!(DiffPruning::new(0, 4, 1.0, &device).is_err());
        assert!(diff.magnitude_pruned(0.0).is_err());
        let other = LinearConfig::new(4, 4).init(&device);
        assert!(
            diff.forward(&other, Tensor::zeros([1, 4], &device), false)
                .is_err()
        );
    }
}
