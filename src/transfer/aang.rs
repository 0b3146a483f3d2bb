//! AANG (Dery, Michel, Khodak, Neubig, Talwalkar 2022, "AANG: Automating Auxiliary Learning",
//! arXiv 2205.14082): auxiliary objectives are not hand-picked but generated from a space.
//!
//! An objective is a tuple of choices, one per **stage**: the input data (end-task text,
//! out-of-domain text, …), the transform (none, masking, replacement, …), the representation
//! (bidirectional, left-to-right, …) and the output (denoise the tokens, predict the
//! end-task label, …). Some tuples are meaningless (an end-task label for out-of-domain text);
//! rules exclude them.
//!
//! Weights are factored: stage `s` has logits over its options, `p_s = softmax`, and a legal
//! tuple `t` has weight `w_t ∝ Π_s p_s(t_s)` (renormalised over the legal tuples). Objectives are
//! sampled by `w`; after their meta-gradients `m_t` (TARTAN's `−cos(g_t, g_dev)`,
//! [`meta_gradients`](super::meta_gradients)) each option's logit moves against the sum of the
//! meta-gradients of the sampled tuples that use it.

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// One stage of the objective space: a name and its options.
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    /// The stage's name (`input`, `transform`, `representation`, `output`).
    pub name: String,
    /// Its options.
    pub options: Vec<String>,
}

impl Stage {
    /// A stage named `name` with `options`.
    pub fn new(name: &str, options: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }
}

/// The space of objectives with its exclusion rules and factored weights (see the
/// [module docs](self)).
#[derive(Clone, Debug, PartialEq)]
pub struct ObjectiveSpace {
    /// The stages, in tuple order.
    pub stages: Vec<Stage>,
    /// Excluded partial tuples: a tuple is illegal when it makes every `(stage, option)` choice
    /// of some rule.
    pub rules: Vec<Vec<(usize, usize)>>,
    /// Per stage, the logits over its options.
    pub logits: Vec<Vec<f64>>,
}

impl ObjectiveSpace {
    /// A space over `stages` with uniform weights and no exclusions.
    ///
    /// # Errors
    /// [`Error::Invalid`] for no stages or a stage without options.
    pub fn new(stages: Vec<Stage>) -> Result<Self> {
        if stages.is_empty() || stages.iter().any(|s| s.options.is_empty()) {
            return Err(Error::invalid(
                "AANG objective space",
                "give at least one stage, each with at least one option",
            ));
        }
        let logits = stages.iter().map(|s| vec![0.0; s.options.len()]).collect();
        Ok(Self {
            stages,
            rules: Vec::new(),
            logits,
        })
    }

    /// Excludes every tuple that makes all of `choices` (`(stage name, option name)` pairs).
    ///
    /// # Errors
    /// [`Error::Invalid`] for an unknown stage or option, or an empty rule.
    pub fn exclude(&mut self, choices: &[(&str, &str)]) -> Result<()> {
        if choices.is_empty() {
            return Err(Error::invalid(
                "AANG exclusion rule",
                "an empty rule would exclude every objective",
            ));
        }
        let rule = choices
            .iter()
            .map(|(s, o)| {
                let si = self
                    .stages
                    .iter()
                    .position(|st| st.name == *s)
                    .ok_or_else(|| {
                        Error::invalid("AANG exclusion rule", format!("no stage named `{s}`"))
                    })?;
                let oi = self.stages[si]
                    .options
                    .iter()
                    .position(|op| op == o)
                    .ok_or_else(|| {
                        Error::invalid(
                            "AANG exclusion rule",
                            format!("stage `{s}` has no option `{o}`"),
                        )
                    })?;
                Ok((si, oi))
            })
            .collect::<Result<Vec<_>>>()?;
        self.rules.push(rule);
        Ok(())
    }

    /// Whether `tuple` (one option index per stage) is legal.
    pub fn is_legal(&self, tuple: &[usize]) -> bool {
        tuple.len() == self.stages.len()
            && tuple
                .iter()
                .zip(&self.stages)
                .all(|(&o, s)| o < s.options.len())
            && !self
                .rules
                .iter()
                .any(|r| r.iter().all(|&(s, o)| tuple[s] == o))
    }

    /// Every legal tuple, in lexicographic order.
    pub fn legal(&self) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        let mut t = vec![0; self.stages.len()];
        loop {
            if self.is_legal(&t) {
                out.push(t.clone());
            }
            // Odometer over the stages.
            let mut s = self.stages.len();
            loop {
                if s == 0 {
                    return out;
                }
                s -= 1;
                t[s] += 1;
                if t[s] < self.stages[s].options.len() {
                    break;
                }
                t[s] = 0;
            }
        }
    }

    /// Per stage, `softmax` of its logits.
    pub fn stage_probabilities(&self) -> Vec<Vec<f64>> {
        self.logits
            .iter()
            .map(|l| {
                let m = l.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = l.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                e.iter().map(|x| x / z).collect()
            })
            .collect()
    }

    /// The legal tuples and their weights `∝ Π_s p_s(t_s)`, summing to 1.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the rules exclude every tuple.
    pub fn weights(&self) -> Result<Vec<(Vec<usize>, f64)>> {
        let p = self.stage_probabilities();
        let legal = self.legal();
        if legal.is_empty() {
            return Err(Error::invalid(
                "AANG objective space",
                "the exclusion rules leave no legal objective",
            ));
        }
        let raw: Vec<f64> = legal
            .iter()
            .map(|t| t.iter().enumerate().map(|(s, &o)| p[s][o]).product())
            .collect();
        let z: f64 = raw.iter().sum();
        Ok(legal.into_iter().zip(raw.iter().map(|w| w / z)).collect())
    }

    /// Samples `n` legal tuples by weight (with replacement), deterministically for `seed`
    /// (give each call its own, e.g. the step number).
    ///
    /// # Errors
    /// As [`weights`](Self::weights).
    pub fn sample(&self, n: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
        let mut rng = SplitMix64::new(seed);
        let w = self.weights()?;
        Ok((0..n)
            .map(|_| {
                let mut r = rng.next_f64();
                for (t, p) in &w {
                    if r < *p {
                        return t.clone();
                    }
                    r -= p;
                }
                w[w.len() - 1].0.clone()
            })
            .collect())
    }

    /// One update of the factored weights: each option's logit moves by `−lr ×` the sum of the
    /// meta-gradients of the `sampled` tuples that chose it.
    ///
    /// # Errors
    /// [`Error::Shape`] for a count of meta-gradients other than the tuples; [`Error::Invalid`]
    /// for an illegal tuple.
    pub fn meta_step(&mut self, sampled: &[Vec<usize>], meta: &[f64], lr: f64) -> Result<()> {
        if sampled.len() != meta.len() {
            return Err(Error::shape(
                "AANG meta-gradients (one per sampled objective)",
                sampled.len().to_string(),
                meta.len().to_string(),
            ));
        }
        if let Some(t) = sampled.iter().find(|t| !self.is_legal(t)) {
            return Err(Error::invalid(
                "AANG meta step",
                format!("{t:?} is not a legal objective of this space"),
            ));
        }
        for (t, m) in sampled.iter().zip(meta) {
            for (s, &o) in t.iter().enumerate() {
                self.logits[s][o] -= lr * m;
            }
        }
        Ok(())
    }

    /// A tuple's name: its options joined by `/`.
    pub fn name(&self, tuple: &[usize]) -> String {
        tuple
            .iter()
            .zip(&self.stages)
            .map(|(&o, s)| s.options.get(o).map_or("?", String::as_str))
            .collect::<Vec<_>>()
            .join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ObjectiveSpace {
        let mut s = ObjectiveSpace::new(vec![
            Stage::new("input", &["task", "out-of-domain"]),
            Stage::new("transform", &["none", "mask", "replace"]),
            Stage::new("representation", &["bidirectional", "left-to-right"]),
            Stage::new("output", &["denoise", "task-label"]),
        ])
        .unwrap();
        // No end-task labels for out-of-domain text; no denoising of untransformed input.
        s.exclude(&[("input", "out-of-domain"), ("output", "task-label")])
            .unwrap();
        s.exclude(&[("transform", "none"), ("output", "denoise")])
            .unwrap();
        s
    }

    #[test]
    fn illegal_tuples_are_never_sampled_and_weights_are_factored() {
        let mut s = space();
        let legal = s.legal();
        // 24 tuples; 6 out-of-domain × task-label; 4 none × denoise; none in both (one
        // output each).
        assert_eq!(legal.len(), 24 - 6 - 4);
        s.logits[1] = vec![0.0, 1.0, -1.0];
        let w = s.weights().unwrap();
        assert!((w.iter().map(|(_, p)| p).sum::<f64>() - 1.0).abs() < 1e-12);
        // Two legal tuples differing only in the transform: their weight ratio is the
        // transform stage's probability ratio.
        let find = |t: &[usize]| w.iter().find(|(u, _)| u == t).unwrap().1;
        let ratio = find(&[0, 1, 0, 0]) / find(&[0, 2, 0, 0]);
        assert!((ratio - 2f64.exp()).abs() < 1e-9);
        let samples = s.sample(5000, 1).unwrap();
        assert!(samples.iter().all(|t| s.is_legal(t)));
        assert!(!samples.iter().any(|t| t[0] == 1 && t[3] == 1));
        assert!(!samples.iter().any(|t| t[1] == 0 && t[3] == 0));
        assert_eq!(
            s.name(&[1, 1, 1, 0]),
            "out-of-domain/mask/left-to-right/denoise"
        );
        // Bad requests.
        assert!(s.exclude(&[("nope", "x")]).is_err());
        assert!(s.exclude(&[("input", "x")]).is_err());
        assert!(s.meta_step(&[vec![1, 0, 0, 1]], &[1.0], 0.1).is_err());
        assert!(s.meta_step(&[vec![0, 1, 0, 0]], &[], 0.1).is_err());
        let mut none = ObjectiveSpace::new(vec![Stage::new("input", &["a"])]).unwrap();
        none.exclude(&[("input", "a")]).unwrap();
        assert!(none.weights().is_err());
    }

    #[test]
    fn meta_steps_move_weight_from_harmful_to_helpful_options() {
        let mut s = space();
        for step in 0..50 {
            let t = s.sample(8, step).unwrap();
            // Masking helps the end task (gradient agrees with the dev gradient), replacement
            // hurts: meta-gradients −cos of +0.5 and −0.5.
            let meta: Vec<f64> = t
                .iter()
                .map(|t| match t[1] {
                    1 => -0.5,
                    2 => 0.5,
                    _ => 0.0,
                })
                .collect();
            s.meta_step(&t, &meta, 0.1).unwrap();
        }
        let p = s.stage_probabilities();
        assert!(p[1][1] > 0.8 && p[1][2] < 0.05, "{:?}", p[1]);
    }
}
