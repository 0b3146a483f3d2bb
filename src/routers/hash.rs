//! Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models", arXiv 2106.04426):
//! sends every occurrence of token id `v` to a fixed expert `h(v)`; here `h` is
//! a seeded random balanced assignment of the vocabulary (each expert gets `⌈V/E⌉` or `⌊V/E⌋`
//! ids), the paper's "balanced" hash. Weights are 1.

use burn::tensor::Device;

use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::routing::{Router, RouterInput, Routing};

/// Configuration of a [`HashRouter`].
#[derive(burn::config::Config, Debug)]
pub struct HashRouterConfig {
    /// Size of the token vocabulary.
    pub vocab_size: usize,
    /// Number of experts.
    pub num_experts: usize,
    /// Seed of the balanced random assignment.
    #[config(default = 0)]
    pub seed: u64,
}

impl HashRouterConfig {
    /// Assigns each of `vocab_size` ids to an expert: a seeded shuffle of the ids, dealt to the
    /// experts in turn.
    ///
    /// # Errors
    /// [`Error::Invalid`] for an empty vocabulary or no experts.
    pub fn init(&self) -> Result<HashRouter> {
        let (vocab_size, num_experts, seed) = (self.vocab_size, self.num_experts, self.seed);
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
        Ok(HashRouter { table, num_experts })
    }
}

/// A balanced random hash of token ids to experts.
#[derive(Clone, Debug)]
pub struct HashRouter {
    table: Vec<i64>,
    num_experts: usize,
}

impl HashRouter {
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
    /// [`Error::IdOutOfRange`] naming the first id outside `0..vocab_size`.
    pub fn route_ids(&self, ids: &[i64], device: &Device) -> Result<Routing> {
        let experts = ids
            .iter()
            .map(|&id| {
                self.expert_of(id)
                    .map(|e| e as i64)
                    .ok_or(Error::IdOutOfRange {
                        what: "token id",
                        within: "the hash router's vocabulary",
                        id,
                        bound: self.table.len(),
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Routing::one_per_row(&experts, self.num_experts, device)
    }
}

impl Router for HashRouter {
    fn num_modules(&self) -> usize {
        self.num_experts
    }

    /// Routes [`RouterInput::TokenIds`]; other inputs are an error.
    fn route_input(&self, input: RouterInput<'_>) -> Result<Routing> {
        match input {
            RouterInput::TokenIds { ids, device } => self.route_ids(ids, device),
            other => Err(other.wrong("HashRouter", "token ids")),
        }
    }
}
