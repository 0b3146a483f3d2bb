//! Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient
//! Prompt Tuning", arXiv 2104.08691), as PEFT implements it, and input aggregation of several
//! prompts.
//!
//! A prompt is `P` trainable vectors in the model's input-embedding space, placed before each
//! sequence's token embeddings; the frozen model reads them as `P` extra tokens:
//!
//! ```text
//! h⁰ = [E_prompt ; embed(x)]          E_prompt: [P, d]
//! ```
//!
//! PEFT's `PROMPT_TUNING` stores `E_prompt` as `prompt_embeddings: [P, d]`, initialised at
//! random (`N(0, 1)`, `torch.nn.Embedding`) or from the embeddings of a text's tokens
//! ([`PromptEmbedding::from_tokens`], PEFT's `TEXT` init). The decoders take prompts per
//! sequence ([`LlamaForCausalLm::forward_prompted`](crate::models::LlamaForCausalLm::forward_prompted)):
//! rows with shorter prompts, or none, are left-padded, so prompts of different lengths and
//! plain rows share one batch (PEFT serves one prompt per batch).
//!
//! **Input aggregation** (the survey's term, Pfeiffer et al. 2023, §5.3): several prompts
//! combine before the model reads them, concatenated ([`PromptEmbedding::concat`], as in
//! multi-task prompt composition) or mixed by per-slot attention weights over source prompts
//! of one length ([`PromptEmbedding::attend`], ATTEMPT, Asai et al. 2022, arXiv 2205.11961).

use burn::module::{Module, Param};
use burn::tensor::{Device, Distribution, Int, Tensor, activation};

use crate::error::{Error, Result};

/// `P` soft tokens in a model's input-embedding space.
///
/// # Shapes
/// - `weight`: `[P, d]`
/// - [`expand`](Self::expand): `[batch, P, d]`
#[derive(Module, Debug)]
pub struct PromptEmbedding {
    /// The soft tokens, `[P, d]` (PEFT's `prompt_embeddings`).
    pub weight: Param<Tensor<2>>,
}

impl PromptEmbedding {
    /// `num_virtual_tokens` random soft tokens of width `d` (`N(0, 1)`, PEFT's `RANDOM` init).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero size.
    pub fn new(num_virtual_tokens: usize, d: usize, device: &Device) -> Result<Self> {
        if num_virtual_tokens == 0 || d == 0 {
            return Err(Error::invalid(
                "prompt tuning sizes",
                "num_virtual_tokens and the embedding width must be positive",
            ));
        }
        Ok(Self::from_tensor(Tensor::random(
            [num_virtual_tokens, d],
            Distribution::Normal(0.0, 1.0),
            device,
        )))
    }

    /// Soft tokens holding `weight: [P, d]`.
    pub fn from_tensor(weight: Tensor<2>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
        }
    }

    /// Soft tokens initialised from the rows `ids` of an embedding table `[vocab, d]` (PEFT's
    /// `TEXT` init with the ids of the init text; PEFT repeats or truncates the text to
    /// `num_virtual_tokens`, as this does).
    ///
    /// # Errors
    /// [`Error::Invalid`] for no ids, zero tokens or an id outside the table.
    pub fn from_tokens(table: Tensor<2>, ids: &[i64], num_virtual_tokens: usize) -> Result<Self> {
        let vocab = table.dims()[0];
        if ids.is_empty() || num_virtual_tokens == 0 {
            return Err(Error::invalid(
                "prompt init text",
                "needs at least one token id and one virtual token",
            ));
        }
        if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= vocab) {
            return Err(Error::invalid(
                "prompt init text",
                format!("token id {bad} is outside the embedding table (0..{vocab})"),
            ));
        }
        let picked: Vec<i64> = ids
            .iter()
            .cycle()
            .take(num_virtual_tokens)
            .copied()
            .collect();
        let device = table.device();
        let idx = crate::tensor_util::int_tensor(&picked, &device);
        Ok(Self::from_tensor(table.detach().select(0, idx)))
    }

    /// Number of soft tokens `P`.
    pub fn len(&self) -> usize {
        self.weight.shape().dims::<2>()[0]
    }

    /// Always false: a prompt has at least one token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Embedding width `d`.
    pub fn width(&self) -> usize {
        self.weight.shape().dims::<2>()[1]
    }

    /// The prompt repeated for `batch` sequences, `[batch, P, d]`.
    pub fn expand(&self, batch: usize) -> Tensor<3> {
        let [p, d] = self.weight.shape().dims::<2>();
        self.weight.val().unsqueeze::<3>().expand([batch, p, d])
    }

    /// Input aggregation by concatenation: the prompts' tokens one after another (`[ΣP, d]`).
    ///
    /// # Errors
    /// [`Error::Invalid`] for no prompts; [`Error::Shape`] for prompts of different widths.
    pub fn concat(prompts: &[&PromptEmbedding]) -> Result<Self> {
        check_widths(prompts)?;
        Ok(Self::from_tensor(Tensor::cat(
            prompts.iter().map(|p| p.weight.val()).collect(),
            0,
        )))
    }

    /// Input aggregation by attention (ATTEMPT): slot `i` of the result is `Σ_k a_k · E_k[i]`
    /// with `a = softmax(logits)`, one weight per source prompt (`logits: [K]`, trainable;
    /// gradients reach them and the prompts).
    ///
    /// # Errors
    /// [`Error::Invalid`] for no prompts; [`Error::Shape`] for prompts of different shapes or
    /// a logit count other than the prompt count.
    pub fn attend(prompts: &[&PromptEmbedding], logits: Tensor<1>) -> Result<Self> {
        let d = check_widths(prompts)?;
        let p = prompts[0].len();
        if let Some(q) = prompts.iter().find(|q| q.len() != p) {
            return Err(Error::shape(
                "attended prompts (one length)",
                format!("[{p}, {d}]"),
                format!("[{}, {d}]", q.len()),
            ));
        }
        let k = prompts.len();
        if logits.dims()[0] != k {
            return Err(Error::shape(
                "prompt attention logits (one per prompt)",
                k.to_string(),
                logits.dims()[0].to_string(),
            ));
        }
        let a = activation::softmax(logits, 0).reshape([k, 1, 1]);
        let stacked = Tensor::stack::<3>(prompts.iter().map(|q| q.weight.val()).collect(), 0);
        Ok(Self::from_tensor((stacked * a).sum_dim(0).reshape([p, d])))
    }
}

fn check_widths(prompts: &[&PromptEmbedding]) -> Result<usize> {
    let Some(first) = prompts.first() else {
        return Err(Error::invalid(
            "prompt aggregation",
            "needs at least one prompt",
        ));
    };
    let d = first.width();
    if let Some(q) = prompts.iter().find(|q| q.width() != d) {
        return Err(Error::shape(
            "aggregated prompts (one embedding width)",
            d.to_string(),
            q.width().to_string(),
        ));
    }
    Ok(d)
}

/// The per-row soft tokens of a batch, left-padded to the longest: `([batch, P_max, d],
/// mask [batch, P_max])` with mask 0 on padding (rows without a prompt are all padding).
///
/// # Errors
/// [`Error::Invalid`] when no row has a prompt; [`Error::Shape`] for a prompt of width other
/// than `d`.
pub fn batch_prompts(
    prompts: &[Option<&PromptEmbedding>],
    d: usize,
    device: &Device,
) -> Result<(Tensor<3>, Tensor<2, Int>)> {
    let p_max = prompts
        .iter()
        .flatten()
        .map(|p| p.len())
        .max()
        .ok_or_else(|| Error::invalid("prompts", "no row has a prompt; call the plain forward"))?;
    let mut rows = Vec::with_capacity(prompts.len());
    let mut mask = Vec::with_capacity(prompts.len() * p_max);
    for p in prompts {
        let len = p.map_or(0, PromptEmbedding::len);
        if let Some(p) = p
            && p.width() != d
        {
            return Err(Error::shape(
                "prompt width (the model's hidden size)",
                d.to_string(),
                p.width().to_string(),
            ));
        }
        let pad = Tensor::<2>::zeros([p_max - len, d], device);
        rows.push(match p {
            Some(p) if len == p_max => p.weight.val(),
            Some(p) => Tensor::cat(vec![pad, p.weight.val()], 0),
            None => pad,
        });
        mask.extend((0..p_max).map(|i| i64::from(i >= p_max - len)));
    }
    let b = prompts.len();
    let mask = crate::tensor_util::int_tensor(&mask, device).reshape([b, p_max]);
    Ok((Tensor::stack(rows, 0), mask))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor_util::to_vec_f32;

    #[test]
    fn aggregation_concatenates_and_attends() {
        let d = Device::flex();
        let a = PromptEmbedding::from_tensor(Tensor::from_floats([[1.0, 0.0], [0.0, 1.0]], &d));
        let b = PromptEmbedding::from_tensor(Tensor::from_floats([[3.0, 0.0], [0.0, 3.0]], &d));
        let c = PromptEmbedding::concat(&[&a, &b]).unwrap();
        assert_eq!(c.len(), 4);
        let mid = PromptEmbedding::attend(&[&a, &b], Tensor::from_floats([0.0, 0.0], &d)).unwrap();
        assert_eq!(to_vec_f32(mid.weight.val()), [2.0, 0.0, 0.0, 2.0]);
        assert!(PromptEmbedding::attend(&[&a, &c], Tensor::from_floats([0.0, 0.0], &d)).is_err());
        assert!(PromptEmbedding::attend(&[&a, &b], Tensor::from_floats([0.0], &d)).is_err());
        assert!(PromptEmbedding::concat(&[]).is_err());
        let (x, m) = batch_prompts(&[Some(&a), None, Some(&c)], 2, &d).unwrap();
        assert_eq!(x.dims(), [3, 4, 2]);
        assert_eq!(
            crate::tensor_util::to_vec_i64(m),
            [0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]
        );
        assert!(batch_prompts(&[None], 2, &d).is_err());
        assert!(batch_prompts(&[Some(&a)], 3, &d).is_err());
        let t = Tensor::<2>::from_floats([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]], &d);
        let p = PromptEmbedding::from_tokens(t.clone(), &[2, 1], 3).unwrap();
        assert_eq!(to_vec_f32(p.weight.val()), [2.0, 2.0, 1.0, 1.0, 2.0, 2.0]);
        assert!(PromptEmbedding::from_tokens(t, &[3], 1).is_err());
    }
}
