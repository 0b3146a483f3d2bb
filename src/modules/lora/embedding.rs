//! LoRA on an embedding table, as PEFT's LoRA `Embedding` layer.

use burn::module::Module;
use burn::nn::Embedding;
use burn::tensor::{Distribution, Int, Tensor};

use super::LoraModule;
use super::slots::{AdapterSlots, adapter_host_api, fold_delta};
use crate::error::{Error, Result};

/// A frozen burn [`Embedding`] with named LoRA adapters, as PEFT's LoRA `Embedding` layer.
///
/// With the table `E: [n, d]` and an adapter `A: [n, r]`, `B: [r, d]` (PEFT's
/// `lora_embedding_A` and `lora_embedding_B`, transposed), row `t` of the output is
/// `E[t] + s · A[t] B`: a lookup into the thin factor, never the `n × d` delta. PEFT
/// initialises `A = 0` and `B ~ N(0, 1)` for embeddings, and applies no dropout.
#[derive(Module, Debug)]
pub struct LoraEmbedding {
    /// The frozen table (`weight: [n, d]`).
    pub base: Embedding,
    /// The adapters, in insertion order.
    pub adapters: Vec<LoraModule>,
    #[module(skip)]
    slots: AdapterSlots,
}

adapter_host_api!(LoraEmbedding);

impl LoraEmbedding {
    /// Wraps `base`, freezing it.
    pub fn new(base: Embedding) -> Self {
        Self {
            base: base.no_grad(),
            adapters: Vec::new(),
            slots: AdapterSlots::default(),
        }
    }

    fn host_dims(&self) -> (usize, usize) {
        let [n, d] = self.base.weight.shape().dims();
        (n, d)
    }

    /// An embedding holds LoRA adapters only, so any may join.
    fn accepts_lora(&self, _name: &str) -> Result<()> {
        Ok(())
    }

    /// Adds a new adapter of rank `rank` with PEFT's embedding initialisation (`A = 0`,
    /// `B ~ N(0, 1)`).
    ///
    /// # Errors
    /// Rank 0, duplicate name.
    pub fn add_adapter(
        &mut self,
        name: &str,
        rank: usize,
        alpha: f64,
        use_rslora: bool,
    ) -> Result<()> {
        if rank == 0 {
            return Err(Error::invalid("LoRA rank", "rank must be at least 1"));
        }
        let (n, d) = self.host_dims();
        let device = self.base.weight.device();
        let a = Tensor::<2>::zeros([n, rank], &device);
        let b = Tensor::<2>::random([rank, d], Distribution::Normal(0.0, 1.0), &device);
        self.insert_adapter(
            name,
            LoraModule::from_factors(a, b, alpha, use_rslora, 0.0)?,
        )
    }

    /// Looks up `ids: [batch, seq]`, returning `[batch, seq, d]`.
    ///
    /// # Errors
    /// [`Error::Invalid`] if an id is outside the table.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Result<Tensor<3>> {
        let (n, _) = self.host_dims();
        let max = ids.clone().max().into_scalar::<i64>();
        let min = ids.clone().min().into_scalar::<i64>();
        if min < 0 || max >= n as i64 {
            return Err(Error::invalid(
                "token ids",
                format!("ids must be in 0..{n}, got {min}..={max}"),
            ));
        }
        let mut y = self.base.forward(ids.clone());
        for (i, adapter) in self.adapters.iter().enumerate() {
            if self.slots.contributes(i) {
                let z = burn::tensor::module::embedding(adapter.a_masked(), ids.clone());
                y = y + z
                    .matmul(adapter.b.val().unsqueeze())
                    .mul_scalar(adapter.scaling());
            }
        }
        Ok(y)
    }
}
