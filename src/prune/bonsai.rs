//! Bonsai: structured pruning with forward passes only (Dery, Kolawole, Kagy, Smith, Neubig,
//! Talwalkar 2024, "Everybody Prune Now", arXiv 2402.05406).
//!
//! Each round removes about `round_fraction` of the prunable parameters the model started
//! with:
//!
//! 1. **Prior.** A cheap score `ρ_u` per unit: activation RMS × mean |outgoing weight|
//!    ([`Prior::ActivationWeight`], the Wanda-style prior), the weight magnitude alone, or
//!    random. In each group the units with the highest prior beyond the lowest
//!    `2·round_fraction` are fixed (never masked); the rest are the round's candidates.
//! 2. **Sub-models.** Pairs of masks: the first drops `⌈round_fraction · units⌉ + 1` of each
//!    group's candidates, sampled without replacement with probability `∝ max ρ − ρ_u` (low
//!    priors first); the second is its complement over the candidates (antithetic: each
//!    candidate is dropped in exactly one of the two; fixed units are never dropped). Each
//!    sub-model is scored by the user's metric (higher is better: −perplexity, accuracy)
//!    with the masks inside the forward pass; no gradient is ever computed.
//! 3. **Regression.** [`lasso_cv`] fits the metric on the candidates' masks,
//!    globally across groups; `β̂_u` is unit `u`'s estimated contribution.
//! 4. **Removal.** Candidates sorted by `β̂` ascending are removed while the parameters they
//!    carry stay within the round's budget, and the model is pruned physically.
//!
//! Rounds repeat until the target share of the prunable parameters is gone (the last round's
//! budget is what remains). [`one_shot`] removes by the prior alone, the same share in every
//! group (Wanda-style, magnitude or random baselines).

use burn::tensor::{Device, Tensor, TensorData};

use super::{Prunable, UnitGroup, lasso_cv};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// The per-unit score that seeds a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prior {
    /// Activation RMS × mean |outgoing weight| (recorded over one run of the metric).
    ActivationWeight,
    /// Mean |outgoing weight| alone.
    Magnitude,
    /// Uniform random.
    Random,
}

/// Bonsai's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct BonsaiConfig {
    /// Share of the prunable parameters to remove in all, in `(0, 1)`.
    pub target_sparsity: f64,
    /// Share of the starting prunable parameters removed per round, in `(0, target]`.
    pub round_fraction: f64,
    /// Antithetic pairs of sub-models evaluated per round (2 metric calls each).
    pub pairs_per_round: usize,
    /// The prior.
    pub prior: Prior,
    /// Cross-validation folds of the regression.
    pub folds: usize,
    /// Penalties tried by the regression.
    pub penalties: usize,
    /// Seed of the sampling.
    pub seed: u64,
}

impl BonsaiConfig {
    /// `target_sparsity` in rounds of 5 %, 100 pairs per round (200 sub-models), the
    /// activation × weight prior, 5 folds over 10 penalties.
    pub fn new(target_sparsity: f64) -> Self {
        Self {
            target_sparsity,
            round_fraction: 0.05,
            pairs_per_round: 100,
            prior: Prior::ActivationWeight,
            folds: 5,
            penalties: 10,
            seed: 0,
        }
    }

    fn check(&self) -> Result<()> {
        let t = self.target_sparsity;
        if !(t > 0.0 && t < 1.0) {
            return Err(Error::invalid(
                "Bonsai target_sparsity",
                format!("{t} must be in (0, 1)"),
            ));
        }
        let r = self.round_fraction;
        if !(r > 0.0 && r <= t) {
            return Err(Error::invalid(
                "Bonsai round_fraction",
                format!("{r} must be in (0, target_sparsity = {t}]"),
            ));
        }
        if self.pairs_per_round * 2 < 2 * self.folds || self.folds < 2 {
            return Err(Error::invalid(
                "Bonsai pairs_per_round",
                format!(
                    "{} pairs for {} folds; give at least 2 folds and as many pairs as folds",
                    self.pairs_per_round, self.folds
                ),
            ));
        }
        Ok(())
    }
}

/// What a pruning run did.
#[derive(Clone, Debug, PartialEq)]
pub struct BonsaiReport {
    /// Prunable parameters before and after.
    pub params_before: usize,
    /// Prunable parameters after.
    pub params_after: usize,
    /// Per round: the units removed as `(group path, unit index at that round)`.
    pub removed: Vec<Vec<(String, usize)>>,
    /// Per round: what [`Prunable::prune_units`] was given (the units kept per group), so the
    /// same pruning can be replayed on another copy of the model (say on an autodiff device
    /// for adaptation).
    pub keep: Vec<Vec<Vec<usize>>>,
    /// Per round: the regression's cross-validated Kendall τ.
    pub cv_tau: Vec<f64>,
    /// Metric evaluations made.
    pub evaluations: usize,
}

/// One round's candidates: per group, the candidate units (ascending) and their sampling
/// weights.
#[derive(Clone, Debug)]
pub(crate) struct Candidates {
    pub(crate) units: Vec<Vec<usize>>,
    pub(crate) weights: Vec<Vec<f64>>,
    /// Units to drop per group in the first mask of a pair.
    pub(crate) drop: Vec<usize>,
}

/// Candidates of a round: in each group the lowest-prior `⌈2·fraction·units⌉` units (at least
/// one while the group has any), sampling weights `max ρ − ρ_u` over them (uniform when they
/// are all equal).
pub(crate) fn candidates(priors: &[Vec<f64>], fraction: f64) -> Candidates {
    let mut out = Candidates {
        units: Vec::new(),
        weights: Vec::new(),
        drop: Vec::new(),
    };
    for p in priors {
        let n = p.len();
        let count = ((2.0 * fraction * n as f64).ceil() as usize).min(n);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(a.cmp(&b)));
        let mut units: Vec<usize> = order[..count].to_vec();
        units.sort_unstable();
        let top = p.iter().copied().fold(f64::MIN, f64::max);
        let mut w: Vec<f64> = units.iter().map(|&u| top - p[u]).collect();
        if w.iter().all(|&x| x <= 0.0) {
            w = vec![1.0; units.len()];
        }
        // Every candidate must be drawable: a small floor for the one at the maximum.
        let floor = w.iter().copied().fold(0.0, f64::max) * 1e-3;
        w.iter_mut().for_each(|x| *x = x.max(floor).max(1e-12));
        let drop = ((fraction * n as f64).ceil() as usize + 1).min(units.len());
        out.units.push(units);
        out.weights.push(w);
        out.drop.push(drop);
    }
    out
}

/// An antithetic pair of masks over the candidates (1 kept, 0 dropped): the first drops
/// `drop[g]` candidates of group `g` drawn without replacement by weight, the second is its
/// complement over the candidates.
pub(crate) fn antithetic_pair(c: &Candidates, rng: &mut SplitMix64) -> [Vec<Vec<f64>>; 2] {
    let mut first = Vec::with_capacity(c.units.len());
    for (g, units) in c.units.iter().enumerate() {
        let mut w = c.weights[g].clone();
        let mut m = vec![1.0; units.len()];
        for _ in 0..c.drop[g] {
            let total: f64 = w.iter().sum();
            if total <= 0.0 {
                break;
            }
            let mut r = rng.next_f64() * total;
            let mut pick = w.len() - 1;
            for (i, &x) in w.iter().enumerate() {
                if r < x {
                    pick = i;
                    break;
                }
                r -= x;
            }
            // Guard against rounding landing on an already drawn unit.
            if w[pick] == 0.0 {
                pick = w.iter().position(|&x| x > 0.0).unwrap_or(pick);
            }
            m[pick] = 0.0;
            w[pick] = 0.0;
        }
        first.push(m);
    }
    let second = first
        .iter()
        .map(|m| m.iter().map(|v| 1.0 - v).collect())
        .collect();
    [first, second]
}

/// Full per-group masks (1 on fixed units) from candidate masks.
fn full_masks(
    groups: &[UnitGroup],
    c: &Candidates,
    cand: &[Vec<f64>],
    device: &Device,
) -> Vec<Tensor<1>> {
    groups
        .iter()
        .enumerate()
        .map(|(g, group)| {
            let mut m = vec![1f32; group.units];
            for (&u, &v) in c.units[g].iter().zip(&cand[g]) {
                m[u] = v as f32;
            }
            Tensor::from_data(TensorData::new(m, [group.units]), device)
        })
        .collect()
}

/// The round's removal: candidates sorted by score ascending (ties by position), taken while
/// the parameters removed stay within `budget`. Returns per group the units to remove.
pub(crate) fn select_within_budget(
    groups: &[UnitGroup],
    c: &Candidates,
    scores: &[f64],
    budget: usize,
) -> Vec<Vec<usize>> {
    let mut flat: Vec<(usize, usize, f64)> = Vec::new();
    let mut i = 0;
    for (g, units) in c.units.iter().enumerate() {
        for &u in units {
            flat.push((g, u, scores[i]));
            i += 1;
        }
    }
    flat.sort_by(|a, b| a.2.total_cmp(&b.2).then((a.0, a.1).cmp(&(b.0, b.1))));
    let mut removed = vec![Vec::new(); groups.len()];
    let mut left: Vec<usize> = groups.iter().map(|g| g.units).collect();
    let mut spent = 0;
    for (g, u, _) in flat {
        if left[g] <= groups[g].min_units {
            continue; // the group is at its floor; the next unit may be elsewhere
        }
        let cost = groups[g].params_per_unit;
        if spent + cost > budget {
            break;
        }
        left[g] -= 1;
        spent += cost;
        removed[g].push(u);
    }
    removed.iter_mut().for_each(|r| r.sort_unstable());
    removed
}

/// Units to keep per group, given those to remove.
fn keep_from_removed(groups: &[UnitGroup], removed: &[Vec<usize>]) -> Vec<Vec<usize>> {
    groups
        .iter()
        .zip(removed)
        .map(|(g, r)| (0..g.units).filter(|u| !r.contains(u)).collect())
        .collect()
}

/// Per group, the prior of every unit (see [`Prior`]); runs `metric` once with recording on
/// for the activation prior.
fn priors<M: Prunable>(
    model: &mut M,
    prior: Prior,
    metric: &mut dyn FnMut(&M) -> Result<f64>,
    rng: &mut SplitMix64,
) -> Result<Vec<Vec<f64>>> {
    let magnitude = model.unit_weight_magnitudes();
    match prior {
        Prior::Magnitude => Ok(magnitude),
        Prior::Random => Ok(magnitude
            .iter()
            .map(|g| g.iter().map(|_| rng.next_f64()).collect())
            .collect()),
        Prior::ActivationWeight => {
            model.record_unit_activations(true);
            let run = metric(model);
            let rms = model.unit_activation_rms();
            model.record_unit_activations(false);
            run?;
            Ok(rms?
                .iter()
                .zip(&magnitude)
                .map(|(a, w)| a.iter().zip(w).map(|(a, w)| a * w).collect())
                .collect())
        }
    }
}

/// Prunes `model` by Bonsai (see the [module docs](self)) until `target_sparsity` of its
/// prunable parameters are gone. `metric` scores the model as it is (masks installed);
/// higher is better, and it must be finite (cap a perplexity). `progress(round, rounds)` is
/// called after each round.
///
/// # Errors
/// [`Error::Invalid`] for bad settings, a model with no prunable parameters, or a metric that
/// is not finite; the metric's and the model's errors. The model keeps the rounds completed
/// before an error, with its masks cleared.
pub fn bonsai<M: Prunable>(
    model: &mut M,
    config: &BonsaiConfig,
    device: &Device,
    metric: &mut dyn FnMut(&M) -> Result<f64>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<BonsaiReport> {
    config.check()?;
    let start = model.prunable_params();
    if start == 0 {
        return Err(Error::invalid(
            "Bonsai",
            "the model has no prunable parameters left",
        ));
    }
    let goal = (config.target_sparsity * start as f64).round() as usize;
    let per_round = ((config.round_fraction * start as f64).round() as usize).max(1);
    let rounds = goal.div_ceil(per_round);
    let mut rng = SplitMix64::new(config.seed);
    let mut report = BonsaiReport {
        params_before: start,
        params_after: start,
        removed: Vec::new(),
        keep: Vec::new(),
        cv_tau: Vec::new(),
        evaluations: 0,
    };
    for round in 0..rounds {
        let done = start - model.prunable_params();
        if done >= goal {
            break;
        }
        let budget = per_round.min(goal - done);
        let result = bonsai_round(model, config, budget, device, metric, &mut rng, &mut report);
        model.set_unit_masks(None)?;
        result?;
        progress(round + 1, rounds);
    }
    report.params_after = model.prunable_params();
    Ok(report)
}

fn bonsai_round<M: Prunable>(
    model: &mut M,
    config: &BonsaiConfig,
    budget: usize,
    device: &Device,
    metric: &mut dyn FnMut(&M) -> Result<f64>,
    rng: &mut SplitMix64,
    report: &mut BonsaiReport,
) -> Result<()> {
    let groups = model.unit_groups();
    let prior = priors(model, config.prior, metric, rng)?;
    // The round's share of each group, from the budget.
    let total = model.prunable_params().max(1);
    let fraction = (budget as f64 / total as f64).clamp(1e-6, 0.5);
    let c = candidates(&prior, fraction);
    let mut xs = Vec::with_capacity(2 * config.pairs_per_round);
    let mut ys = Vec::with_capacity(2 * config.pairs_per_round);
    for _ in 0..config.pairs_per_round {
        for cand in antithetic_pair(&c, rng) {
            model.set_unit_masks(Some(full_masks(&groups, &c, &cand, device)))?;
            let y = metric(model)?;
            report.evaluations += 1;
            if !y.is_finite() {
                return Err(Error::invalid(
                    "Bonsai metric",
                    format!("{y} for a sub-model; return a finite score (cap a perplexity)"),
                ));
            }
            xs.push(cand.concat());
            ys.push(y);
        }
    }
    model.set_unit_masks(None)?;
    let fit = lasso_cv(&xs, &ys, config.folds, config.penalties)?;
    let removed = select_within_budget(&groups, &c, &fit.coefficients, budget);
    let keep = keep_from_removed(&groups, &removed);
    model.prune_units(&keep)?;
    report.keep.push(keep);
    report.cv_tau.push(fit.cv_tau.unwrap_or(0.0));
    report.removed.push(
        groups
            .iter()
            .zip(&removed)
            .flat_map(|(g, r)| r.iter().map(|&u| (g.path.clone(), u)))
            .collect(),
    );
    Ok(())
}

/// Removes `sparsity` of every group's units by the prior alone, lowest first (Wanda-style
/// with [`Prior::ActivationWeight`]; magnitude and random baselines). `metric` runs once for
/// the activation prior. Returns the units removed per group.
///
/// # Errors
/// [`Error::Invalid`] for a sparsity outside `[0, 1)`; the metric's and the model's errors.
pub fn one_shot<M: Prunable>(
    model: &mut M,
    sparsity: f64,
    prior: Prior,
    seed: u64,
    metric: &mut dyn FnMut(&M) -> Result<f64>,
) -> Result<Vec<Vec<usize>>> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(Error::invalid(
            "one-shot sparsity",
            format!("{sparsity} must be in [0, 1)"),
        ));
    }
    let mut rng = SplitMix64::new(seed);
    let groups = model.unit_groups();
    let p = priors(model, prior, metric, &mut rng)?;
    let removed: Vec<Vec<usize>> = groups
        .iter()
        .zip(&p)
        .map(|(g, p)| {
            let n = ((sparsity * g.units as f64).round() as usize)
                .min(g.units.saturating_sub(g.min_units));
            let mut order: Vec<usize> = (0..g.units).collect();
            order.sort_by(|&a, &b| p[a].total_cmp(&p[b]).then(a.cmp(&b)));
            let mut r = order[..n].to_vec();
            r.sort_unstable();
            r
        })
        .collect();
    model.prune_units(&keep_from_removed(&groups, &removed))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::prune::{UnitKind, kendall_tau};

    /// A fake model: groups of units with planted contributions; the metric is
    /// `Σ β_u m_u + noise` over the installed masks. Records every mask it was given.
    struct Planted {
        beta: Vec<Vec<f64>>,
        cost: Vec<usize>,
        masks: Option<Vec<Vec<f32>>>,
        seen: RefCell<Vec<Vec<Vec<f32>>>>,
        noise: RefCell<SplitMix64>,
        noise_scale: f64,
    }

    impl Planted {
        fn metric(&self) -> f64 {
            let masks = self
                .masks
                .clone()
                .unwrap_or_else(|| self.beta.iter().map(|b| vec![1.0; b.len()]).collect());
            self.seen.borrow_mut().push(masks.clone());
            let signal: f64 = self
                .beta
                .iter()
                .zip(&masks)
                .flat_map(|(b, m)| b.iter().zip(m).map(|(b, m)| b * f64::from(*m)))
                .sum();
            signal + self.noise_scale * (self.noise.borrow_mut().next_f64() - 0.5)
        }
    }

    impl Prunable for Planted {
        fn unit_groups(&self) -> Vec<UnitGroup> {
            self.beta
                .iter()
                .enumerate()
                .map(|(g, b)| UnitGroup {
                    path: format!("g{g}"),
                    kind: UnitKind::MlpNeuron,
                    units: b.len(),
                    params_per_unit: self.cost[g],
                    min_units: 1,
                })
                .collect()
        }
        fn set_unit_masks(&mut self, masks: Option<Vec<Tensor<1>>>) -> Result<()> {
            self.masks = masks.map(|m| {
                m.into_iter()
                    .map(|t| t.into_data().iter::<f32>().collect())
                    .collect()
            });
            Ok(())
        }
        fn unit_weight_magnitudes(&self) -> Vec<Vec<f64>> {
            // The prior: the contributions, blurred.
            self.beta
                .iter()
                .map(|b| b.iter().map(|v| v.abs() + 0.5).collect())
                .collect()
        }
        fn record_unit_activations(&mut self, _on: bool) {}
        fn unit_activation_rms(&self) -> Result<Vec<Vec<f64>>> {
            Ok(self.beta.iter().map(|b| vec![1.0; b.len()]).collect())
        }
        fn prune_units(&mut self, keep: &[Vec<usize>]) -> Result<()> {
            crate::prune::check_keep(&self.unit_groups(), keep)?;
            self.beta = self
                .beta
                .iter()
                .zip(keep)
                .map(|(b, k)| k.iter().map(|&u| b[u]).collect())
                .collect();
            Ok(())
        }
    }

    fn planted(groups: usize, units: usize, cost: Vec<usize>, seed: u64) -> Planted {
        let mut rng = SplitMix64::new(seed);
        Planted {
            beta: (0..groups)
                .map(|_| (0..units).map(|_| rng.next_f64()).collect())
                .collect(),
            cost,
            masks: None,
            seen: RefCell::new(Vec::new()),
            noise: RefCell::new(SplitMix64::new(seed + 1)),
            noise_scale: 0.05,
        }
    }

    #[test]
    fn the_regression_recovers_a_planted_additive_metric_from_200_antithetic_masks() {
        let model = planted(1, 64, vec![1], 11);
        // Every unit a candidate (fraction ½), 100 pairs.
        let flat: Vec<Vec<f64>> = vec![vec![0.0; 64]];
        let c = candidates(&flat, 0.5);
        assert_eq!(c.units[0].len(), 64);
        let mut rng = SplitMix64::new(5);
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        let mut m = model;
        for _ in 0..100 {
            for cand in antithetic_pair(&c, &mut rng) {
                let dev = Device::flex();
                m.set_unit_masks(Some(full_masks(&m.unit_groups(), &c, &cand, &dev)))
                    .unwrap();
                ys.push(m.metric());
                xs.push(cand.concat());
            }
        }
        let fit = lasso_cv(&xs, &ys, 5, 10).unwrap();
        let tau = kendall_tau(&fit.coefficients, &m.beta[0]).unwrap();
        assert!(tau > 0.9, "Kendall τ {tau} between β̂ and β");
    }

    #[test]
    fn antithetic_pairs_cover_each_candidate_once_and_never_mask_a_fixed_unit() {
        let mut rng = SplitMix64::new(2);
        let priors: Vec<Vec<f64>> = (0..3)
            .map(|_| (0..40).map(|_| rng.next_f64()).collect())
            .collect();
        let c = candidates(&priors, 0.1);
        for (g, p) in priors.iter().enumerate() {
            // 2 · 0.1 · 40 = 8 candidates: the lowest priors.
            assert_eq!(c.units[g].len(), 8);
            let worst_candidate = c.units[g].iter().map(|&u| p[u]).fold(f64::MIN, f64::max);
            let fixed_min = (0..40)
                .filter(|u| !c.units[g].contains(u))
                .map(|u| p[u])
                .fold(f64::MAX, f64::min);
            assert!(worst_candidate <= fixed_min);
            assert_eq!(c.drop[g], 5, "⌈0.1 · 40⌉ + 1");
        }
        let groups: Vec<UnitGroup> = (0..3)
            .map(|g| UnitGroup {
                path: format!("g{g}"),
                kind: UnitKind::AttentionHead,
                units: 40,
                params_per_unit: 1,
                min_units: 1,
            })
            .collect();
        for _ in 0..50 {
            let [a, b] = antithetic_pair(&c, &mut rng);
            for g in 0..3 {
                assert_eq!(a[g].iter().filter(|&&v| v == 0.0).count(), 5);
                for (x, y) in a[g].iter().zip(&b[g]) {
                    assert_eq!(x + y, 1.0, "each candidate dropped in exactly one");
                }
            }
            let full = full_masks(&groups, &c, &a, &Device::flex());
            for (g, t) in full.into_iter().enumerate() {
                let v: Vec<f32> = t.into_data().iter::<f32>().collect();
                for u in (0..40).filter(|u| !c.units[g].contains(u)) {
                    assert_eq!(v[u], 1.0, "fixed unit {u} of group {g} masked");
                }
            }
        }
    }

    #[test]
    fn rounds_meet_their_budget_within_one_unit_and_stop_at_the_target() {
        // Heads-like units of cost 7 and neuron-like of cost 3.
        let mut m = planted(4, 30, vec![7, 3, 7, 3], 4);
        let start = m.prunable_params();
        let config = BonsaiConfig {
            pairs_per_round: 20,
            ..BonsaiConfig::new(0.4)
        };
        let mut rounds = Vec::new();
        let report = bonsai(
            &mut m,
            &config,
            &Device::flex(),
            &mut |m: &Planted| Ok(m.metric()),
            &mut |r, n| rounds.push((r, n)),
        )
        .unwrap();
        let per_round = (0.05 * start as f64).round() as usize;
        let goal = (0.4 * start as f64).round() as usize;
        for (i, removed) in report.removed.iter().enumerate() {
            let cost: usize = removed
                .iter()
                .map(|(p, _)| if p == "g0" || p == "g2" { 7 } else { 3 })
                .sum();
            let budget = per_round.min(goal - (i * per_round).min(goal));
            assert!(
                cost <= budget && cost + 7 > budget,
                "round {i}: removed {cost} of a {budget} budget"
            );
        }
        let gone = start - report.params_after;
        assert!(
            gone <= goal && gone + 7 * report.removed.len() > goal,
            "{gone} of {goal}"
        );
        assert!(((gone as f64 / start as f64) - 0.4).abs() < 0.05);
        assert_eq!(rounds.last().map(|r| r.1), Some(8));
        assert_eq!(report.evaluations, 40 * report.removed.len());
        assert!(m.masks.is_none(), "masks cleared after pruning");
        // The regression ranks well on this planted metric, so what goes is mostly low-β.
        assert!(
            report.cv_tau.iter().all(|&t| t > 0.3),
            "{:?}",
            report.cv_tau
        );
        // Bad settings.
        for bad in [
            BonsaiConfig::new(0.0),
            BonsaiConfig::new(1.0),
            BonsaiConfig {
                round_fraction: 0.5,
                ..BonsaiConfig::new(0.3)
            },
            BonsaiConfig {
                pairs_per_round: 1,
                ..BonsaiConfig::new(0.3)
            },
        ] {
            assert!(
                bonsai(
                    &mut m,
                    &bad,
                    &Device::flex(),
                    &mut |m: &Planted| Ok(m.metric()),
                    &mut |_, _| {}
                )
                .is_err()
            );
        }
        // A non-finite metric is an error naming the fix; the model keeps no masks.
        let err = bonsai(
            &mut m,
            &config,
            &Device::flex(),
            &mut |_: &Planted| Ok(f64::INFINITY),
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(err.to_string().contains("finite"), "{err}");
        assert!(m.masks.is_none());
    }
}
