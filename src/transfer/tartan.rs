//! TARTAN (Dery, Michel, Talwalkar, Neubig 2021, "Should We Be Pre-training? An Argument for
//! End-task Aware Training as an Alternative", arXiv 2109.07437).
//!
//! The end task `T*` and auxiliary objectives `T_1 … T_n` share a body `θ`; each has its own
//! head. The body is trained on `Σ_i w_i L_i(θ)` (the end task among the `i`).
//!
//! - **MT-TARTAN**: fixed weights (for example equal).
//! - **META-TARTAN**: the weights are learned. A separate *dev head* is trained on the end
//!   task's held-out (dev) data; with `g_dev = ∇_θ L_dev(θ)` and `g_i = ∇_θ L_i(θ)`, the
//!   meta-gradient of objective `i`'s weight logit is
//!
//!   ```text
//!   ∂L_dev / ∂w_i ≈ −cos(g_i, g_dev)
//!   ```
//!
//!   (one step of `θ ← θ − η Σ w_i g_i` changes `L_dev` by `−η Σ w_i ⟨g_i, g_dev⟩`; TARTAN
//!   normalises the inner product to the cosine). Descending it raises the weight of an
//!   objective whose gradient agrees with the end task's dev gradient and lowers a harmful
//!   one's. Weights are `softmax` of the logits.
//!
//! [`flat_gradient`] reads a loss's gradient on a module's parameters as one host vector, in
//! the module's parameter order, so that objectives' gradients on the same body compare.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use crate::error::{Error, Result};

/// Collects a module's parameter gradients, in visiting order (zeros where a parameter got
/// none).
struct Flatten<'a> {
    grads: &'a GradientsParams,
    out: Vec<f64>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n: usize = param.shape().dims::<D>().iter().product();
        match self.grads.get::<D>(param.id) {
            Some(g) => self.out.extend(g.into_data().iter::<f32>().map(f64::from)),
            None => self.out.extend(std::iter::repeat_n(0.0, n)),
        }
    }
}

/// The gradient of `loss` on `module`'s parameters as one host vector (parameter order; zeros
/// for parameters the loss does not reach). `loss` must be a scalar (`[1]`) on an autodiff
/// device.
pub fn flat_gradient<M: Module>(loss: Tensor<1>, module: &M) -> Vec<f64> {
    let grads = GradientsParams::from_grads(loss.backward(), module);
    let mut v = Flatten {
        grads: &grads,
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// `⟨a, b⟩ / (‖a‖ ‖b‖)`, 0 when either is zero.
///
/// # Errors
/// [`Error::Shape`] for vectors of different lengths.
pub fn cosine(a: &[f64], b: &[f64]) -> Result<f64> {
    if a.len() != b.len() {
        return Err(Error::shape(
            "cosine of gradients",
            a.len().to_string(),
            b.len().to_string(),
        ));
    }
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    Ok(if na > 0.0 && nb > 0.0 {
        dot / (na * nb)
    } else {
        0.0
    })
}

/// META-TARTAN's meta-gradients: `−cos(g_i, g_dev)` for each objective's body gradient.
///
/// # Errors
/// [`Error::Shape`] for gradients of different lengths.
pub fn meta_gradients(objectives: &[Vec<f64>], dev: &[f64]) -> Result<Vec<f64>> {
    objectives
        .iter()
        .map(|g| cosine(g, dev).map(|c| -c))
        .collect()
}

/// Objective weights: `softmax` of logits, fixed (MT-TARTAN) or learned (META-TARTAN).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskWeights {
    /// One logit per objective.
    pub logits: Vec<f64>,
}

impl TaskWeights {
    /// Equal weights over `n` objectives.
    pub fn equal(n: usize) -> Self {
        Self {
            logits: vec![0.0; n],
        }
    }

    /// The weights, `softmax(logits)`.
    pub fn weights(&self) -> Vec<f64> {
        let m = self.logits.iter().copied().fold(f64::MIN, f64::max);
        let e: Vec<f64> = self.logits.iter().map(|l| (l - m).exp()).collect();
        let z: f64 = e.iter().sum();
        e.iter().map(|x| x / z).collect()
    }

    /// One META-TARTAN step: `logit_i ← logit_i − lr · (−cos(g_i, g_dev))`. Returns the
    /// meta-gradients used.
    ///
    /// # Errors
    /// [`Error::Shape`] for a count of gradients other than the objectives or gradients of
    /// different lengths; [`Error::Invalid`] for a learning rate that is not finite.
    pub fn meta_step(&mut self, objectives: &[Vec<f64>], dev: &[f64], lr: f64) -> Result<Vec<f64>> {
        if objectives.len() != self.logits.len() {
            return Err(Error::shape(
                "META-TARTAN gradients (one per objective)",
                self.logits.len().to_string(),
                objectives.len().to_string(),
            ));
        }
        if !lr.is_finite() {
            return Err(Error::invalid(
                "META-TARTAN learning rate",
                format!("{lr} is not finite"),
            ));
        }
        let g = meta_gradients(objectives, dev)?;
        self.logits
            .iter_mut()
            .zip(&g)
            .for_each(|(l, g)| *l -= lr * g);
        Ok(g)
    }

    /// The weighted sum `Σ w_i L_i` of the objectives' losses (each `[1]`).
    ///
    /// # Errors
    /// [`Error::Shape`] for a count of losses other than the objectives.
    pub fn combine(&self, losses: Vec<Tensor<1>>) -> Result<Tensor<1>> {
        if losses.len() != self.logits.len() || losses.is_empty() {
            return Err(Error::shape(
                "weighted objectives (one loss per objective)",
                self.logits.len().to_string(),
                losses.len().to_string(),
            ));
        }
        losses
            .into_iter()
            .zip(self.weights())
            .map(|(l, w)| l.mul_scalar(w))
            .reduce(|a, b| a + b)
            .ok_or_else(|| Error::invalid("weighted objectives", "no losses were given"))
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{GradientsParams, SgdConfig};
    use burn::tensor::{Device, Tensor};

    use super::*;
    use crate::rng::SplitMix64;

    /// `L = ½‖X w + b − y‖² / n` on a 1-output linear body: `∇w = Xᵀ r / n`, `∇b = Σ r / n`.
    fn analytic(x: &[Vec<f64>], y: &[f64], w: &[f64], b: f64) -> Vec<f64> {
        let n = x.len() as f64;
        let r: Vec<f64> = x
            .iter()
            .zip(y)
            .map(|(xi, yi)| xi.iter().zip(w).map(|(a, c)| a * c).sum::<f64>() + b - yi)
            .collect();
        let mut g: Vec<f64> = (0..w.len())
            .map(|j| x.iter().zip(&r).map(|(xi, ri)| xi[j] * ri).sum::<f64>() / n)
            .collect();
        g.push(r.iter().sum::<f64>() / n);
        g
    }

    fn loss(body: &Linear, x: &[Vec<f64>], y: &[f64], device: &Device) -> Tensor<1> {
        let (n, d) = (x.len(), x[0].len());
        let xs: Vec<f32> = x.iter().flatten().map(|&v| v as f32).collect();
        let xt = Tensor::<1>::from_floats(xs.as_slice(), device).reshape([n, d]);
        let yt = Tensor::<1>::from_floats(
            y.iter().map(|&v| v as f32).collect::<Vec<_>>().as_slice(),
            device,
        )
        .reshape([n, 1]);
        (body.forward(xt) - yt)
            .powi_scalar(2)
            .sum()
            .div_scalar(2.0 * n as f64)
    }

    fn data(rng: &mut SplitMix64, n: usize, w: &[f64]) -> (Vec<Vec<f64>>, Vec<f64>) {
        let x: Vec<Vec<f64>> = (0..n)
            .map(|_| (0..w.len()).map(|_| 2.0 * rng.next_f64() - 1.0).collect())
            .collect();
        let y = x
            .iter()
            .map(|xi| xi.iter().zip(w).map(|(a, b)| a * b).sum())
            .collect();
        (x, y)
    }

    #[test]
    fn the_meta_gradient_is_minus_the_cosine_of_the_body_gradients() {
        let device = Device::flex().autodiff();
        device.seed(4);
        let body = LinearConfig::new(3, 1).init(&device);
        let w: Vec<f64> = body
            .weight
            .val()
            .into_data()
            .iter::<f32>()
            .map(f64::from)
            .collect();
        let b = f64::from(
            body.bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .iter::<f32>()
                .next()
                .unwrap(),
        );
        let mut rng = SplitMix64::new(9);
        let (xd, yd) = data(&mut rng, 16, &[1.0, -2.0, 0.5]);
        let (xa, ya) = data(&mut rng, 16, &[1.0, -1.5, 0.0]);
        let (xh, mut yh) = data(&mut rng, 16, &[1.0, -2.0, 0.5]);
        yh.reverse();
        let dev = flat_gradient(loss(&body, &xd, &yd, &device), &body);
        let grads = [
            flat_gradient(loss(&body, &xa, &ya, &device), &body),
            flat_gradient(loss(&body, &xh, &yh, &device), &body),
        ];
        // burn's parameter order for a Linear: weight ([3, 1], row-major = w), then bias.
        let want_dev = analytic(&xd, &yd, &w, b);
        for (g, want) in dev.iter().zip(&want_dev) {
            assert!((g - want).abs() < 1e-5, "{dev:?} vs {want_dev:?}");
        }
        let meta = meta_gradients(&grads, &dev).unwrap();
        for (m, (x, y)) in meta.iter().zip([(&xa, &ya), (&xh, &yh)]) {
            let g = analytic(x, y, &w, b);
            let cos = {
                let dot: f64 = g.iter().zip(&want_dev).map(|(a, b)| a * b).sum();
                let n = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
                dot / (n(&g) * n(&want_dev))
            };
            assert!((m + cos).abs() < 1e-5, "{m} vs −{cos}");
        }
        assert!(cosine(&[1.0], &[1.0, 2.0]).is_err());
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]).unwrap(), 0.0);
    }

    #[test]
    fn meta_tartan_lowers_a_harmful_auxiliary_and_raises_a_helpful_one() {
        // End task y = ⟨(1, −2, 0.5), x⟩ with few training rows; a helpful auxiliary (the same
        // function on other rows) and a harmful one (shuffled targets).
        let device = Device::flex().autodiff();
        device.seed(7);
        let mut rng = SplitMix64::new(1);
        let truth = [1.0, -2.0, 0.5];
        let (xt, yt) = data(&mut rng, 4, &truth);
        let (xd, yd) = data(&mut rng, 32, &truth);
        let (xa, ya) = data(&mut rng, 64, &truth);
        let (xh, mut yh) = data(&mut rng, 64, &truth);
        let mut perm: Vec<usize> = (0..64).collect();
        for i in (1..64).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        yh = perm.iter().map(|&i| yh[i]).collect();
        let mut body = LinearConfig::new(3, 1).init(&device);
        let mut weights = TaskWeights::equal(3);
        let mut optim = SgdConfig::new().init();
        for _ in 0..40 {
            let dev = flat_gradient(loss(&body, &xd, &yd, &device), &body);
            let grads: Vec<Vec<f64>> = [(&xt, &yt), (&xa, &ya), (&xh, &yh)]
                .iter()
                .map(|(x, y)| flat_gradient(loss(&body, x, y, &device), &body))
                .collect();
            weights.meta_step(&grads, &dev, 0.5).unwrap();
            let total = weights
                .combine(vec![
                    loss(&body, &xt, &yt, &device),
                    loss(&body, &xa, &ya, &device),
                    loss(&body, &xh, &yh, &device),
                ])
                .unwrap();
            let g = GradientsParams::from_grads(total.backward(), &body);
            body = optim.step(0.2, body, g);
        }
        let w = weights.weights();
        assert!(w[2] < 1.0 / 3.0 - 0.1, "harmful weight {w:?}");
        assert!(w[1] > w[2], "{w:?}");
        assert!(weights.meta_step(&[vec![0.0]], &[0.0], 0.1).is_err());
    }
}
