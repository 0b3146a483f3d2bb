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

use super::UnitGroup;
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

/// How the end task and a transfer task share unit gates when pruning with a transfer task
/// (Dery's thesis, limited-data chapter, arXiv 2311.06382).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MaskSharing {
    /// One set of gates: both tasks train and use the same sub-network.
    Shared,
    /// A set per task: the tasks share weights, not masks; the end task's gates decide.
    Independent,
    /// A set per task, pulled together by `weight · Σ_u (P_end(z_u > 0) − P_transfer(z_u > 0))²`.
    Coupled(f64),
}

/// One gate group per unit group (`groups` from
/// [`Prunable::unit_groups`](super::Prunable::unit_groups)), every `log α` near `init`.
///
/// # Errors
/// As [`HardConcrete::new`].
pub fn gates_for(groups: &[UnitGroup], init: f64, device: &Device) -> Result<Vec<HardConcrete>> {
    groups
        .iter()
        .map(|g| HardConcrete::new(g.units, init, device))
        .collect()
}

/// A training sample of every group's gates: masks for
/// [`Prunable::set_unit_masks`](super::Prunable::set_unit_masks).
pub fn sample_masks(gates: &[HardConcrete]) -> Vec<Tensor<1>> {
    gates.iter().map(HardConcrete::sample).collect()
}

/// The expected sparsity of `gates` over the model's `groups` (their `params_per_unit` as
/// costs).
///
/// # Errors
/// As [`expected_sparsity`].
pub fn expected_model_sparsity(gates: &[HardConcrete], groups: &[UnitGroup]) -> Result<Tensor<1>> {
    let costs: Vec<usize> = groups.iter().map(|g| g.params_per_unit).collect();
    expected_sparsity(gates, &costs)
}

/// `Σ_g Σ_u (P_a(z > 0) − P_b(z > 0))²`, shape `[1]`: the coupling of two gate sets.
///
/// # Errors
/// [`Error::Shape`] for sets of different group counts or sizes.
pub fn coupling_penalty(a: &[HardConcrete], b: &[HardConcrete]) -> Result<Tensor<1>> {
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.units() != y.units()) || a.is_empty() {
        return Err(Error::shape(
            "coupled gate sets (the same groups)",
            format!(
                "{:?}",
                a.iter().map(HardConcrete::units).collect::<Vec<_>>()
            ),
            format!(
                "{:?}",
                b.iter().map(HardConcrete::units).collect::<Vec<_>>()
            ),
        ));
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x.prob_open() - y.prob_open()).powi_scalar(2).sum())
        .reduce(|p, q| p + q)
        .ok_or_else(|| Error::invalid("coupled gate sets", "no groups"))
}

/// The units to keep after gate training: every unit ranked by `P(z > 0)`, the highest kept
/// until `1 − sparsity` of the groups' parameters are kept (each group keeps at least its
/// `min_units`), as [`Prunable::prune_units`](super::Prunable::prune_units) takes them.
///
/// # Errors
/// [`Error::Invalid`] for a sparsity outside `[0, 1)` or gates that do not match the groups.
pub fn keep_by_gates(
    groups: &[UnitGroup],
    gates: &[HardConcrete],
    sparsity: f64,
) -> Result<Vec<Vec<usize>>> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::invalid(
            "gate pruning sparsity",
            format!("{sparsity} must be in [0, 1)"),
        ));
    }
    if groups.len() != gates.len() || groups.iter().zip(gates).any(|(g, z)| g.units != z.units()) {
        return Err(Error::invalid(
            "gate pruning",
            "one gate group per unit group, of the same size",
        ));
    }
    let total: usize = groups.iter().map(|g| g.units * g.params_per_unit).sum();
    let budget = ((1.0 - sparsity) * total as f64).round() as usize;
    let mut units: Vec<(usize, usize, f32)> = Vec::new();
    let mut keep: Vec<Vec<usize>> = vec![Vec::new(); groups.len()];
    let mut spent = 0;
    for (g, z) in gates.iter().enumerate() {
        let p: Vec<f32> = z.prob_open().into_data().iter::<f32>().collect();
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        // Each group's floor first.
        for &u in &order[..groups[g].min_units.min(p.len())] {
            keep[g].push(u);
            spent += groups[g].params_per_unit;
        }
        units.extend(
            order[groups[g].min_units.min(p.len())..]
                .iter()
                .map(|&u| (g, u, p[u])),
        );
    }
    units.sort_by(|a, b| b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    for (g, u, _) in units {
        let cost = groups[g].params_per_unit;
        if spent + cost > budget {
            continue;
        }
        spent += cost;
        keep[g].push(u);
    }
    keep.iter_mut().for_each(|k| k.sort_unstable());
    Ok(keep)
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

    #[test]
    fn gate_sets_couple_and_keep_the_most_open_units_within_budget() {
        let device = Device::flex();
        let groups = vec![
            UnitGroup {
                path: "a".into(),
                kind: super::super::UnitKind::AttentionHead,
                units: 4,
                params_per_unit: 10,
                min_units: 1,
            },
            UnitGroup {
                path: "b".into(),
                kind: super::super::UnitKind::MlpNeuron,
                units: 6,
                params_per_unit: 3,
                min_units: 1,
            },
        ];
        let set = |v: [&[f32]; 2]| -> Vec<HardConcrete> {
            v.iter()
                .map(|l| HardConcrete {
                    log_alpha: Param::from_tensor(Tensor::from_floats(*l, &device)),
                })
                .collect()
        };
        let a = set([&[3.0, -3.0, 1.0, -1.0], &[2.0, 2.0, -4.0, 0.5, -0.5, 1.5]]);
        let b = set([&[3.0, -3.0, 1.0, -1.0], &[2.0, 2.0, -4.0, 0.5, -0.5, 1.5]]);
        let zero = host(coupling_penalty(&a, &b).unwrap())[0];
        assert!(zero.abs() < 1e-12);
        let c = set([&[-3.0, -3.0, 1.0, -1.0], &[2.0, 2.0, -4.0, 0.5, -0.5, 1.5]]);
        let pen = host(coupling_penalty(&a, &c).unwrap())[0];
        let (pa, pc) = (host(a[0].prob_open())[0], host(c[0].prob_open())[0]);
        assert!((pen - (pa - pc).powi(2)).abs() < 1e-6);
        assert!(coupling_penalty(&a, &c[..1]).is_err());
        // 58 parameters; keep 50 %: 29. By P(z > 0): a0 (10), b0, b1, b5 (3 each), a2 (10)...
        let keep = keep_by_gates(&groups, &a, 0.5).unwrap();
        let kept: usize = keep[0].len() * 10 + keep[1].len() * 3;
        assert!(kept <= 29 && kept + 10 > 29, "{keep:?}");
        assert!(keep[0].contains(&0) && !keep[0].contains(&1), "{keep:?}");
        assert!(keep[1].contains(&0) && keep[1].contains(&1) && !keep[1].contains(&2));
        // Floors hold even when every gate is shut.
        let shut = set([&[-9.0; 4], &[-9.0; 6]]);
        let keep = keep_by_gates(&groups, &shut, 0.99).unwrap();
        assert!(keep.iter().all(|k| k.len() == 1));
        assert!(keep_by_gates(&groups, &a, 1.0).is_err());
        let m = sample_masks(&a);
        assert_eq!(m.iter().map(|t| t.dims()[0]).collect::<Vec<_>>(), [4, 6]);
        let s = host(expected_model_sparsity(&a, &groups).unwrap())[0];
        let want = 1.0
            - (host(a[0].prob_open()).iter().sum::<f64>() * 10.0
                + host(a[1].prob_open()).iter().sum::<f64>() * 3.0)
                / 58.0;
        assert!((s - want).abs() < 1e-6);
    }
}
