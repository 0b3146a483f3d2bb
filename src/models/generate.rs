//! Autoregressive generation from a decoder: greedy decoding or seeded sampling, with a
//! [`KvCache`] so that each new token costs one position's forward pass.
//!
//! # The math
//! Each step takes the logits `z` of the last position. Greedy picks `argmax z` (the first
//! index on ties, as `torch.argmax`). Sampling draws from `softmax(z / T)` restricted, in
//! transformers' order, first to the `top_k` largest logits, then to the smallest set of
//! most probable tokens whose probability reaches `top_p` (the token that crosses the
//! threshold is kept). A sequence ends when it produces one of the EOS ids (which is
//! returned) or after `max_new_tokens`; a batch stops when every sequence has ended.
//!
//! # Shapes
//! - input ids and attention mask: `[batch, seq]` (Int, left padding marked 0 in the mask)
//! - result: one `Vec` of new token ids per sequence, at most `max_new_tokens` long

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

use super::llama::{KvCache, LlamaForCausalLm};
use crate::error::{Error, Result};
use crate::modules::prompt::PromptEmbedding;
use crate::rng::SplitMix64;
use crate::tensor_util::{int_tensor, to_vec_f32};

/// How the next token is chosen from the logits.
#[derive(Clone, Debug, PartialEq)]
pub enum Decoding {
    /// The most likely token.
    Greedy,
    /// A draw from the tempered, truncated distribution (see the [module docs](self)).
    Sample {
        /// Temperature `T > 0`.
        temperature: f64,
        /// Keep only the `k` largest logits (`None`: all).
        top_k: Option<usize>,
        /// Keep the most probable tokens up to this cumulative probability, in `(0, 1]`
        /// (`None`: all).
        top_p: Option<f64>,
        /// Seed of the draws; the same seed gives the same tokens.
        seed: u64,
    },
}

/// What [`LlamaForCausalLm::generate`] does.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// The most tokens generated per sequence.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub decoding: Decoding,
    /// Tokens that end a sequence (the model's `eos_token_id` by default).
    pub eos_token_ids: Vec<i64>,
}

impl GenerationConfig {
    /// Greedy decoding of up to `max_new_tokens`, ending at `model`'s EOS ids.
    pub fn greedy(model: &dyn CausalLm, max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            decoding: Decoding::Greedy,
            eos_token_ids: model.eos_token_ids(),
        }
    }

    fn check(&self) -> Result<()> {
        if let Decoding::Sample {
            temperature,
            top_k,
            top_p,
            ..
        } = self.decoding
        {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(Error::invalid(
                    "temperature",
                    format!("{temperature}: it must be a positive number (use greedy for 0)"),
                ));
            }
            if top_k == Some(0) {
                return Err(Error::invalid("top_k", "0: keep at least one token"));
            }
            if let Some(p) = top_p
                && !(p > 0.0 && p <= 1.0)
            {
                return Err(Error::invalid(
                    "top_p",
                    format!("{p}: it must be in (0, 1]"),
                ));
            }
        }
        Ok(())
    }
}

/// Chooses the next token from one row of logits.
struct Chooser {
    decoding: Decoding,
    rng: SplitMix64,
}

impl Chooser {
    fn new(decoding: &Decoding) -> Self {
        let seed = match decoding {
            Decoding::Sample { seed, .. } => *seed,
            Decoding::Greedy => 0,
        };
        Self {
            decoding: decoding.clone(),
            rng: SplitMix64::new(seed),
        }
    }

    fn choose(&mut self, logits: &[f32]) -> i64 {
        match self.decoding {
            Decoding::Greedy => argmax(logits) as i64,
            Decoding::Sample {
                temperature,
                top_k,
                top_p,
                ..
            } => {
                // Indices by decreasing logit (stable: ties keep index order).
                let mut order: Vec<usize> = (0..logits.len()).collect();
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                order.truncate(top_k.unwrap_or(order.len()).max(1));
                let top = f64::from(logits[order[0]]);
                let mut p: Vec<f64> = order
                    .iter()
                    .map(|&i| ((f64::from(logits[i]) - top) / temperature).exp())
                    .collect();
                let total: f64 = p.iter().sum();
                p.iter_mut().for_each(|v| *v /= total);
                if let Some(top_p) = top_p {
                    let mut acc = 0.0;
                    let keep = p
                        .iter()
                        .position(|v| {
                            acc += v;
                            acc >= top_p
                        })
                        .map_or(p.len(), |i| i + 1);
                    p.truncate(keep);
                    order.truncate(keep);
                }
                let total: f64 = p.iter().sum();
                let mut u = self.rng.next_f64() * total;
                for (i, v) in order.iter().zip(&p) {
                    if u < *v {
                        return *i as i64;
                    }
                    u -= v;
                }
                order[order.len() - 1] as i64
            }
        }
    }
}

/// The first index of the largest value.
fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// A causal language model that decodes incrementally over a [`KvCache`]: what
/// [`generate`] drives (the Llama family and GPT-2 implement it).
pub trait CausalLm {
    /// Logits for the new tokens after those `cache` holds, which then holds these too; only
    /// the last position's when `last_only` (see
    /// [`LlamaForCausalLm::forward_cached`]).
    ///
    /// # Errors
    /// The model's input errors.
    fn forward_cached(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor<3>>;

    /// Feeds each sequence's soft prompt into an empty `cache` (prompt tuning; see
    /// [`LlamaForCausalLm::prefill_prompts`]) and returns the prompt positions' logits.
    ///
    /// # Errors
    /// By default [`Error::Invalid`]: the model takes no soft prompts.
    fn prefill_prompts(
        &self,
        prompts: &[Option<&PromptEmbedding>],
        adapters: Option<&[Option<&str>]>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        let _ = (prompts, adapters, cache);
        Err(Error::invalid(
            "soft prompts",
            "this model does not take prompt-tuning adapters; the Llama family does",
        ))
    }

    /// The longest sequence its positions cover.
    fn max_positions(&self) -> usize;

    /// The token ids that end a generated sequence (its config's `eos_token_id`).
    fn eos_token_ids(&self) -> Vec<i64>;
}

impl CausalLm for LlamaForCausalLm {
    fn forward_cached(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor<3>> {
        LlamaForCausalLm::forward_cached(
            self,
            input_ids,
            attention_mask,
            adapters,
            cache,
            last_only,
        )
    }

    fn prefill_prompts(
        &self,
        prompts: &[Option<&PromptEmbedding>],
        adapters: Option<&[Option<&str>]>,
        cache: &mut KvCache,
    ) -> Result<Tensor<3>> {
        LlamaForCausalLm::prefill_prompts(self, prompts, adapters, cache)
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn eos_token_ids(&self) -> Vec<i64> {
        self.config.eos_token_ids.clone()
    }
}

impl LlamaForCausalLm {
    /// [`generate`] with this model.
    ///
    /// # Errors
    /// As [`generate`].
    pub fn generate(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<Tensor<2, Int>>,
        adapters: Option<&[Option<&str>]>,
        config: &GenerationConfig,
        on_step: impl FnMut(&[Option<i64>]),
    ) -> Result<Vec<Vec<i64>>> {
        generate(self, input_ids, attention_mask, adapters, config, on_step)
    }
}

/// Generates up to `config.max_new_tokens` tokens after each sequence of `input_ids` with
/// `model` (left-padded when `attention_mask` marks padding with 0), sequence `i` through
/// adapter `adapters[i]` when given (as
/// [`LlamaForCausalLm::forward_mixed`]; `None`: the active adapters). The prompt is one forward
/// pass that fills a [`KvCache`]; every later step feeds one token per sequence. `on_step`
/// sees each step's tokens as they are produced (`None` for a sequence that has ended), for
/// streaming.
///
/// # Errors
/// As [`CausalLm::forward_cached`] (token ids outside the vocabulary, a mask of another shape,
/// unknown adapters, a prompt plus `max_new_tokens` longer than the model's positions);
/// [`Error::Invalid`] for a temperature, `top_k` or `top_p` out of range.
pub fn generate(
    model: &dyn CausalLm,
    input_ids: Tensor<2, Int>,
    attention_mask: Option<Tensor<2, Int>>,
    adapters: Option<&[Option<&str>]>,
    config: &GenerationConfig,
    on_step: impl FnMut(&[Option<i64>]),
) -> Result<Vec<Vec<i64>>> {
    generate_after(
        model,
        KvCache::new(),
        input_ids,
        attention_mask,
        adapters,
        config,
        on_step,
    )
}

/// [`generate`] continuing after the positions `cache` already holds: soft prompts fed by
/// [`LlamaForCausalLm::prefill_prompts`] (prompt tuning), or a shared context.
///
/// # Errors
/// As [`generate`]; the cache's positions count towards the model's limit.
pub fn generate_after(
    model: &dyn CausalLm,
    mut cache: KvCache,
    input_ids: Tensor<2, Int>,
    attention_mask: Option<Tensor<2, Int>>,
    adapters: Option<&[Option<&str>]>,
    config: &GenerationConfig,
    mut on_step: impl FnMut(&[Option<i64>]),
) -> Result<Vec<Vec<i64>>> {
    config.check()?;
    let [b, s] = input_ids.dims();
    let s = s + cache.len();
    let limit = model.max_positions();
    if s + config.max_new_tokens > limit + 1 {
        return Err(Error::invalid(
            "max_new_tokens",
            format!(
                "{} prompt positions + {} new tokens exceed the model's {limit} positions \
                     (max_position_embeddings)",
                s, config.max_new_tokens
            ),
        ));
    }
    let device = input_ids.device();
    let mut chooser = Chooser::new(&config.decoding);
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut logits = model.forward_cached(input_ids, attention_mask, adapters, &mut cache, true)?;
    for step in 0..config.max_new_tokens {
        let vocab = logits.dims()[2];
        let values = to_vec_f32(logits);
        let mut tokens = vec![None; b];
        let mut next = Vec::with_capacity(b);
        for r in 0..b {
            let row = &values[r * vocab..(r + 1) * vocab];
            if done[r] {
                // An ended sequence keeps feeding its last token; its outputs are unused.
                next.push(*out[r].last().unwrap_or(&0));
                continue;
            }
            let t = chooser.choose(row);
            out[r].push(t);
            tokens[r] = Some(t);
            done[r] = config.eos_token_ids.contains(&t);
            next.push(t);
        }
        on_step(&tokens);
        if step + 1 == config.max_new_tokens || done.iter().all(|d| *d) {
            break;
        }
        let ids = int_tensor(&next, &device).reshape([b, 1]);
        logits = model.forward_cached(ids, None, adapters, &mut cache, true)?;
    }
    Ok(out)
}

/// The causal language-modelling loss of transformers' `*ForCausalLM` with `labels =
/// input_ids` and padding labelled -100: the mean over every position `t` whose next token is
/// not padding of `−log softmax(logits[t])[input_ids[t + 1]]`.
///
/// # Shapes
/// - `logits`: `[batch, seq, vocab]`; `input_ids`, `attention_mask`: `[batch, seq]` (Int)
/// - result: `[1]`
///
/// # Errors
/// [`Error::Shape`] for ids or a mask of another shape than the logits' first two axes;
/// [`Error::Invalid`] for sequences shorter than 2 tokens or a batch with no target.
pub fn causal_lm_loss(
    logits: Tensor<3>,
    input_ids: Tensor<2, Int>,
    attention_mask: Option<Tensor<2, Int>>,
) -> Result<Tensor<1>> {
    let [b, s, v] = logits.dims();
    for (what, dims) in [
        ("input_ids", Some(input_ids.dims())),
        ("attention_mask", attention_mask.as_ref().map(Tensor::dims)),
    ] {
        if let Some(d) = dims
            && d != [b, s]
        {
            return Err(Error::shape(
                format!("causal_lm_loss {what} (the logits' [batch, seq])"),
                format!("{:?}", [b, s]),
                format!("{d:?}"),
            ));
        }
    }
    if s < 2 {
        return Err(Error::invalid(
            "causal_lm_loss",
            "sequences need at least 2 tokens (one to predict from, one to predict)",
        ));
    }
    let targets = input_ids.slice([0..b, 1..s]);
    let logp = log_softmax(logits.slice([0..b, 0..s - 1, 0..v]), 2);
    let picked = logp
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .reshape([b, s - 1]);
    let (picked, count) = match attention_mask {
        Some(m) => {
            let keep = m.slice([0..b, 1..s]).float();
            let count = to_vec_f32(keep.clone().sum())
                .first()
                .copied()
                .unwrap_or(0.0);
            (picked * keep, count)
        }
        None => (picked, (b * (s - 1)) as f32),
    };
    if count == 0.0 {
        return Err(Error::invalid(
            "causal_lm_loss",
            "every target is padding; nothing to learn from",
        ));
    }
    Ok(picked.sum().neg() / f64::from(count))
}

/// Knowledge distillation to a teacher (Hinton et al. 2015), as pruned models are adapted
/// back toward their unpruned original: the mean over positions of
/// `τ² · KL(softmax(teacher / τ) ‖ softmax(student / τ))`. The teacher's logits carry no
/// gradient (pass them detached or from a frozen model).
///
/// # Shapes
/// - `student`, `teacher`: `[batch, seq, vocab]`
/// - result: `[1]`
///
/// # Errors
/// [`Error::Shape`] for logits of different shapes; [`Error::Invalid`] for a temperature that
/// is not positive and finite.
pub fn distillation_loss(
    student: Tensor<3>,
    teacher: Tensor<3>,
    temperature: f64,
) -> Result<Tensor<1>> {
    if student.dims() != teacher.dims() {
        return Err(Error::shape(
            "distillation_loss teacher logits (the student's shape)",
            format!("{:?}", student.dims()),
            format!("{:?}", teacher.dims()),
        ));
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        return Err(Error::invalid(
            "distillation temperature",
            format!("{temperature} must be positive and finite"),
        ));
    }
    let [b, s, _] = student.dims();
    let t = log_softmax(teacher.detach().div_scalar(temperature), 2);
    let st = log_softmax(student.div_scalar(temperature), 2);
    let kl = (t.clone().exp() * (t - st)).sum();
    Ok(kl.mul_scalar(temperature * temperature / (b * s) as f64))
}
