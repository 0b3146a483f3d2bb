//! Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing",
//! arXiv 2202.09368) and hash routing (Roller et al. 2021, "Hash Layers For Large Sparse
//! Models", arXiv 2106.04426).
//!
//! **Expert choice** inverts top-k: with token-to-expert affinities `S = softmax(x W_g)`
//! (`[T, E]`, softmax over experts), each expert picks the `C = ceil(capacity_factor · T / E)`
//! tokens with the highest affinity, so every expert processes exactly `C` tokens (perfect load
//! balance by construction) and a token may be picked by any number of experts, including none.
//! The output is `y_t = Σ_{e picked t} S_te · expert_e(x_t)`. In modula's [`Routing`] the row
//! of token `t` has `E` slots: slot `e` is `e` if expert `e` picked `t`, `-1` otherwise.
//!
//! **Hash routing** sends every occurrence of token id `v` to a fixed expert `h(v)`; here `h` is
//! a seeded random balanced assignment of the vocabulary (each expert gets `⌈V/E⌉` or `⌊V/E⌋`
//! ids), the paper's "balanced" hash. Weights are 1.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor, activation};

use super::capacity::{capacity_of, check_capacity_factor};
use super::router::validate_gate;
use crate::error::{Error, Result};
use crate::modules::check_last_dim;
use crate::rng::SplitMix64;
use crate::routing::{Router, Routing};
use crate::tensor_util::{ensure_finite, float_tensor, int_tensor, to_vec_i64};

/// A learned expert-choice router.
#[derive(Module, Debug)]
pub struct ExpertChoiceRouter {
    /// `d → E` affinities, no bias.
    pub gate: Linear,
    /// `C = ceil(capacity_factor · T / E)` tokens per expert (clamped to `T`).
    pub capacity_factor: f64,
}

impl ExpertChoiceRouter {
    /// Creates the router.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero sizes or a capacity factor that is not positive.
    pub fn new(
        d_model: usize,
        num_experts: usize,
        capacity_factor: f64,
        device: &Device,
    ) -> Result<Self> {
        validate_gate(d_model, num_experts, 1)?;
        check_capacity_factor(capacity_factor)?;
        Ok(Self {
            gate: LinearConfig::new(d_model, num_experts)
                .with_bias(false)
                .init(device),
            capacity_factor,
        })
    }

    /// Tokens per expert for a batch of `tokens`.
    pub fn capacity(&self, tokens: usize) -> usize {
        let e = self.gate.weight.shape().dims::<2>()[1];
        capacity_of(self.capacity_factor, tokens, e).min(tokens.max(1))
    }

    /// Routes from precomputed `logits: [T, E]`.
    ///
    /// # Errors
    /// [`Error::Routing`] for NaN/inf logits.
    pub fn route_logits(&self, logits: Tensor<2>) -> Result<Routing> {
        ensure_finite(&logits, "router logits")?;
        let [t, e] = logits.dims();
        let device = logits.device();
        let scores = activation::softmax(logits, 1);
        let c = self.capacity(t);
        let (_, picked) = scores.clone().detach().transpose().topk_with_indices(c, 1);
        let picked = to_vec_i64(picked);
        let mut idx = vec![-1i64; t * e];
        let mut mask = vec![0f32; t * e];
        for ex in 0..e {
            for j in 0..c {
                let tok = picked[ex * c + j] as usize;
                idx[tok * e + ex] = ex as i64;
                mask[tok * e + ex] = 1.0;
            }
        }
        let weights = scores * float_tensor(mask, [t, e], &device);
        Routing::new(int_tensor(&idx, &device).reshape([t, e]), weights, e)
    }
}

impl Router for ExpertChoiceRouter {
    fn num_modules(&self) -> usize {
        self.gate.weight.shape().dims::<2>()[1]
    }

    fn route(&self, x: &Tensor<2>) -> Result<Routing> {
        check_last_dim(x, self.gate.weight.shape().dims::<2>()[0], "router input")?;
        self.route_logits(self.gate.forward(x.clone()))
    }
}

/// A balanced random hash of token ids to experts.
#[derive(Clone, Debug)]
pub struct HashRouter {
    table: Vec<i64>,
    num_experts: usize,
}

impl HashRouter {
    /// Assigns each of `vocab_size` ids to an expert: a seeded shuffle of the ids, dealt to the
    /// experts in turn.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty vocabulary or no experts.
    pub fn new(vocab_size: usize, num_experts: usize, seed: u64) -> Result<Self> {
        if vocab_size == 0 || num_experts == 0 {
            return Err(Error::invalid(
                "hash router",
                "vocab_size and num_experts must be positive",
            ));
        }
        let mut order: Vec<usize> = (0..vocab_size).collect();
        let mut rng = SplitMix64::new(seed);
        for i in (1..vocab_size).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut table = vec![0i64; vocab_size];
        for (rank, &id) in order.iter().enumerate() {
            table[id] = (rank % num_experts) as i64;
        }
        Ok(Self { table, num_experts })
    }

    /// The expert of token id `id`, if in range.
    pub fn expert_of(&self, id: i64) -> Option<usize> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.table.get(i))
            .map(|&e| e as usize)
    }

    /// Routes a batch of token ids (one row each) with weight 1.
    ///
    /// # Errors
    /// [`Error::Routing`] naming the first id outside `0..vocab_size`.
    pub fn route_ids(&self, ids: &[i64], device: &Device) -> Result<Routing> {
        let experts = ids
            .iter()
            .map(|&id| {
                self.expert_of(id).map(|e| e as i64).ok_or_else(|| {
                    Error::Routing(format!(
                        "token id {id} is outside the hash router's vocabulary 0..{}",
                        self.table.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Routing::one_per_row(&experts, self.num_experts, device)
    }
}
