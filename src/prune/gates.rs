//! Learned unit gates: the hard-concrete distribution (Louizos, Welling, Kingma 2018,
//! "Learning Sparse Neural Networks through L0 Regularization") with CoFi's Lagrangian control
//! of the expected sparsity (Xia, Zhong, Chen 2022), as used for pruning with a transfer task
//! in Dery's thesis (CMU-CS-24-136, arXiv 2311.06382).
//!
//! Per unit a logit `log α`. A training sample is
//!
//! ```text
//! u ~ U(0, 1),  s = σ((log u − log(1 − u) + log α) / β),  z = min(1, max(0, s (ζ − γ) + γ))
//! ```
//!
//! with `β = 2/3`, `γ = −0.1`, `ζ = 1.1`: exactly 0 or 1 with positive probability, and
//! differentiable in `log α` in between. The probability that a gate is open, the expected L0,
//! and that it is fully open are closed forms:
//!
//! ```text
//! P(z > 0) = σ(log α − β log(−γ / ζ)),    P(z = 1) = σ(log α − β log((1 − γ) / (ζ − 1)))
//! ```
//!
//! At evaluation a gate is `min(1, max(0, σ(log α)(ζ − γ) + γ))`.
//!
//! The expected sparsity of a model with groups of units costing `c_g` parameters each is
//! `ŝ = 1 − Σ_g c_g Σ_u P(z_gu > 0) / Σ_g c_g n_g`, and the Lagrangian
//! `λ₁ (ŝ − t) + λ₂ (ŝ − t)²` is minimised over the gates and the model and maximised over
//! `λ₁, λ₂` (train the [`Lagrangian`] with a negative learning rate), which drives `ŝ` to
//! the target `t`.

use burn::module::{Module, Param};
use burn::tensor::activation::sigmoid;
use burn::tensor::{Device, Distribution, Tensor};

use crate::error::{Error, Result};

/// The stretch interval's lower end `γ`.
pub const GAMMA: f64 = -0.1;
/// The stretch interval's upper end `ζ`.
pub const ZETA: f64 = 1.1;
/// The concrete temperature `β`.
pub const BETA: f64 = 2.0 / 3.0;

/// Hard-concrete gates over the units of one group (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct HardConcrete {
    /// `log α` per unit, `[units]`.
    pub log_alpha: Param<Tensor<1>>,
}

impl HardConcrete {
    /// `units` gates with `log α` drawn from `N(init, 0.01²)` (CoFi starts every gate mostly
    /// open: an `init` of about 2.3 gives `P(z > 0) ≈ 0.99`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for no units or a non-finite `init`.
    pub fn new(units: usize, init: f64, device: &Device) -> Result<Self> {
        if units == 0 || !init.is_finite() {
            return Err(Error::invalid(
                "hard-concrete gates",
                format!(
                    "{units} units with log α {init}; give at least one unit and a finite log α"
                ),
            ));
        }
        let t = Tensor::<1>::random([units], Distribution::Normal(init, 0.01), device);
        Ok(Self {
            log_alpha: Param::from_tensor(t),
        })
    }

    /// Number of gates.
    pub fn units(&self) -> usize {
        self.log_alpha.shape().dims::<1>()[0]
    }

    /// One training sample of the gates, differentiable in `log α` (see the
    /// [module docs](self)).
    pub fn sample(&self) -> Tensor<1> {
        let la = self.log_alpha.val();
        let u = la.random_like(Distribution::Uniform(1e-6, 1.0 - 1e-6));
        let noise = u.clone().log() - u.neg().add_scalar(1.0).log();
        let s = sigmoid((noise + la).div_scalar(BETA));
        s.mul_scalar(ZETA - GAMMA).add_scalar(GAMMA).clamp(0.0, 1.0)
    }

    /// The gates at evaluation: `min(1, max(0, σ(log α)(ζ − γ) + γ))`.
    pub fn deterministic(&self) -> Tensor<1> {
        sigmoid(self.log_alpha.val())
            .mul_scalar(ZETA - GAMMA)
            .add_scalar(GAMMA)
            .clamp(0.0, 1.0)
    }

    /// `P(z > 0)` per unit: the expected L0 contribution, differentiable in `log α`.
    pub fn prob_open(&self) -> Tensor<1> {
        sigmoid(self.log_alpha.val().sub_scalar(BETA * (-GAMMA / ZETA).ln()))
    }

    /// `P(z = 1)` per unit.
    pub fn prob_full(&self) -> Tensor<1> {
        sigmoid(
            self.log_alpha
                .val()
                .sub_scalar(BETA * ((1.0 - GAMMA) / (ZETA - 1.0)).ln()),
        )
    }
}

/// Expected sparsity `ŝ` of groups of gates (see the [module docs](self)): `costs[g]`
/// parameters per unit of group `g`. Shape `[1]`, differentiable in every `log α`.
///
/// # Errors
/// [`Error::Invalid`] for a count of costs that does not match, no gates, or zero total cost.
pub fn expected_sparsity(gates: &[HardConcrete], costs: &[usize]) -> Result<Tensor<1>> {
    if gates.is_empty() || gates.len() != costs.len() {
        return Err(Error::invalid(
            "expected sparsity",
            format!(
                "{} gate groups and {} costs; give one cost per group, at least one group",
                gates.len(),
                costs.len()
            ),
        ));
    }
    let total: usize = gates.iter().zip(costs).map(|(g, c)| g.units() * c).sum();
    if total == 0 {
        return Err(Error::invalid(
            "expected sparsity",
            "the groups cost no parameters",
        ));
    }
    let kept = gates
        .iter()
        .zip(costs)
        .map(|(g, &c)| g.prob_open().sum().mul_scalar(c as f64))
        .reduce(|a, b| a + b)
        .ok_or_else(|| Error::invalid("expected sparsity", "no gate groups"))?;
    Ok(kept.div_scalar(total as f64).neg().add_scalar(1.0))
}

/// CoFi's Lagrangian multipliers `λ₁, λ₂` (see the [module docs](self)).
#[derive(Module, Debug)]
pub struct Lagrangian {
    /// `λ₁`, `[1]`.
    pub lambda1: Param<Tensor<1>>,
    /// `λ₂`, `[1]`.
    pub lambda2: Param<Tensor<1>>,
}

impl Lagrangian {
    /// Multipliers at 0.
    pub fn new(device: &Device) -> Self {
        Self {
            lambda1: Param::from_tensor(Tensor::zeros([1], device)),
            lambda2: Param::from_tensor(Tensor::zeros([1], device)),
        }
    }

    /// `λ₁ (ŝ − t) + λ₂ (ŝ − t)²` for the expected sparsity `sparsity` (`[1]`) and target `t`.
    /// Add it to the loss; step the gates with a positive learning rate and these multipliers
    /// with a negative one (ascent).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a target outside `[0, 1)`.
    pub fn penalty(&self, sparsity: Tensor<1>, target: f64) -> Result<Tensor<1>> {
        if !(0.0..1.0).contains(&target) {
            return Err(Error::invalid(
                "Lagrangian target sparsity",
                format!("{target} must be in [0, 1)"),
            ));
        }
        let gap = sparsity.sub_scalar(target);
        Ok(self.lambda1.val() * gap.clone() + self.lambda2.val() * gap.powi_scalar(2))
    }
}

#[cfg(test)]
mod tests {
    use burn::optim::{AdamConfig, GradientsParams};

    use super::*;

    fn host(t: Tensor<1>) -> Vec<f64> {
        t.into_data().iter::<f32>().map(f64::from).collect()
    }

    #[test]
    fn closed_form_probabilities_match_monte_carlo() {
        let device = Device::flex();
        device.seed(1);
        let gates = HardConcrete {
            log_alpha: Param::from_tensor(Tensor::from_floats(
                [-3.0, -0.5, 0.0, 0.7, 2.5],
                &device,
            )),
        };
        let (p_open, p_full) = (host(gates.prob_open()), host(gates.prob_full()));
        let n = 20_000;
        let (mut open, mut full) = (vec![0usize; 5], vec![0usize; 5]);
        for _ in 0..n / 500 {
            // 500 samples per call: the gates repeated.
            let big = HardConcrete {
                log_alpha: Param::from_tensor(gates.log_alpha.val().repeat_dim(0, 500)),
            };
            let z = host(big.sample());
            for (i, v) in z.iter().enumerate() {
                open[i % 5] += usize::from(*v > 0.0);
                full[i % 5] += usize::from(*v >= 1.0);
            }
        }
        for u in 0..5 {
            let (mo, mf) = (open[u] as f64 / n as f64, full[u] as f64 / n as f64);
            // 4 standard errors of a proportion over 20,000 draws.
            let tol = |p: f64| 4.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-3;
            assert!(
                (mo - p_open[u]).abs() < tol(p_open[u]),
                "P(z>0) unit {u}: {mo} vs {}",
                p_open[u]
            );
            assert!(
                (mf - p_full[u]).abs() < tol(p_full[u]),
                "P(z=1) unit {u}: {mf} vs {}",
                p_full[u]
            );
        }
        // Samples lie in [0, 1]; the deterministic gate is the clamped stretched sigmoid.
        let d = host(gates.deterministic());
        let want = [
            0.0,
            0.0 + (1.2 / (1.0 + 0.5f64.exp())) - 0.1,
            0.5,
            1.2 / (1.0 + (-0.7f64).exp()) - 0.1,
            1.0,
        ];
        for (a, b) in d.iter().zip(want) {
            assert!((a - b.clamp(0.0, 1.0)).abs() < 1e-6, "{d:?}");
        }
        assert!(HardConcrete::new(0, 1.0, &device).is_err());
    }

    #[test]
    fn the_lagrangian_drives_expected_sparsity_to_the_target() {
        // Two groups of different unit costs, and a "task" that pulls every gate open.
        let device = Device::flex().autodiff();
        device.seed(3);
        let mut gates = vec![
            HardConcrete::new(40, 2.3, &device).unwrap(),
            HardConcrete::new(60, 2.3, &device).unwrap(),
        ];
        let costs = [7, 3];
        let mut lagrangian = Lagrangian::new(&device);
        let (mut opt_g, mut opt_l) = (AdamConfig::new().init(), AdamConfig::new().init());
        let target = 0.4;
        let mut last = 0.0;
        for _ in 0..600 {
            let s = expected_sparsity(&gates, &costs).unwrap();
            last = host(s.clone())[0];
            let task = gates
                .iter()
                .map(|g| g.prob_open().sum().neg().mul_scalar(1e-3))
                .reduce(|a, b| a + b)
                .unwrap();
            let loss = task + lagrangian.penalty(s, target).unwrap();
            let mut grads = loss.backward();
            let gg = GradientsParams::from_module(&mut grads, &gates);
            let gl = GradientsParams::from_module(&mut grads, &lagrangian);
            gates = opt_g.step(0.05, gates, gg);
            lagrangian = opt_l.step(-0.05, lagrangian, gl);
        }
        assert!(
            (last - target).abs() < 0.01,
            "expected sparsity {last}, target {target}"
        );
        assert!(
            lagrangian
                .penalty(Tensor::zeros([1], &device), 1.0)
                .is_err()
        );
        assert!(expected_sparsity(&gates, &[1]).is_err());
    }
}
