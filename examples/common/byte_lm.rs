//! The byte-level language model the text examples share: the six domains of data/, windows of
//! `SEQ` bytes as token ids, the Llama-architecture config, pre-training, and bits per byte.

#![allow(dead_code)]

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use modula::models::{DecoderConfig, LlamaForCausalLm, causal_lm_loss};

use super::progress::bar;
use super::rng::Rng;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// The domains of data/.
pub const DOMAINS: [&str; 6] = ["prose", "rust", "toml", "python", "c", "man"];
/// Bytes per window.
pub const SEQ: usize = 128;
/// Windows per training batch.
pub const BATCH: usize = 16;

/// A domain's `train` or `test` text.
pub fn read(domain: &str, split: &str) -> Res<Vec<u8>> {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(domain)
        .join(format!("{split}.txt"));
    Ok(std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?)
}

/// Every domain's `train` or `test` text, in [`DOMAINS`] order.
pub fn read_all(split: &str) -> Res<Vec<Vec<u8>>> {
    DOMAINS.iter().map(|d| read(d, split)).collect()
}

/// Mean bits per byte of `model` over the first `windows` windows of each of `texts`.
pub fn mean_bpb<T: AsRef<[u8]>>(
    model: &LlamaForCausalLm,
    texts: &[T],
    windows: usize,
    device: &Device,
) -> Res<f64> {
    let mut total = 0.0;
    for t in texts {
        total += bits_per_byte(model, t.as_ref(), windows, device)?;
    }
    Ok(total / texts.len() as f64)
}

/// Bytes as token ids, `[rows, SEQ]`.
pub fn to_ids(windows: &[&[u8]], device: &Device) -> Tensor<2, Int> {
    let v: Vec<i64> = windows
        .iter()
        .flat_map(|w| w.iter().map(|&b| i64::from(b)))
        .collect();
    Tensor::<1, Int>::from_data(TensorData::new(v, [windows.len() * SEQ]), device)
        .reshape([windows.len(), SEQ])
}

/// `BATCH` random windows drawn from `texts` (a text chosen uniformly per row).
pub fn sample<'a>(texts: &[&'a [u8]], rng: &mut Rng) -> Vec<&'a [u8]> {
    (0..BATCH)
        .map(|_| {
            let t = texts[rng.below(texts.len())];
            let start = rng.below(t.len() - SEQ);
            &t[start..start + SEQ]
        })
        .collect()
}

/// The mean next-byte loss of `model` on `windows` (as a tensor, for backward) and in bits.
pub fn lm_loss(
    model: &LlamaForCausalLm,
    windows: &[&[u8]],
    device: &Device,
) -> modula::Result<(Tensor<1>, f32)> {
    let ids = to_ids(windows, device);
    let loss = causal_lm_loss(model.forward(ids.clone())?, ids, None)?;
    let bits = loss.clone().into_scalar::<f32>() / std::f32::consts::LN_2;
    Ok((loss, bits))
}

/// Makes every parameter trainable (pre-training: the loaded layers start frozen).
struct Trainable;

impl ModuleMapper for Trainable {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad(true)
    }
}

/// Mean bits per byte of `model` over the first `windows` test windows of `text` (each window
/// predicts its bytes 2..SEQ from the bytes before them in the window).
pub fn bits_per_byte(
    model: &LlamaForCausalLm,
    text: &[u8],
    windows: usize,
    device: &Device,
) -> Res<f64> {
    let all: Vec<&[u8]> = text.chunks_exact(SEQ).take(windows).collect();
    let mut total = 0.0;
    for chunk in all.chunks(32) {
        total += f64::from(lm_loss(model, chunk, device)?.1) * chunk.len() as f64;
    }
    Ok(total / all.len() as f64)
}

/// The byte-level Llama: d = 128, 4 layers, 4 heads over 2 key/value heads, SwiGLU 352.
pub fn config() -> Res<DecoderConfig> {
    Ok(DecoderConfig::from_json(
        &serde_json::json!({
            "model_type": "llama", "vocab_size": 256, "hidden_size": 128,
            "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "rope_theta": 10000.0,
            "tie_word_embeddings": false
        })
        .to_string(),
        "byte-level Llama config",
    )?)
}

/// Pre-trains the byte-level Llama from seed 0 for `steps` on a mix of `texts` (Adam, lr 3e-3
/// after a 50-step warm-up), on the autodiff device `ad`. Returns the trained model (still
/// trainable) drawing its batches from `rng`.
pub fn pretrain(
    texts: &[&[u8]],
    steps: usize,
    ad: &Device,
    rng: &mut Rng,
) -> Res<LlamaForCausalLm> {
    ad.seed(0);
    let mut model = LlamaForCausalLm::random(&config()?, 0, ad)?.map(&mut Trainable);
    let mut optim = AdamConfig::new().init();
    let pb = bar(steps, "pre-train")?;
    for step in 0..steps {
        let (loss, bits) = lm_loss(&model, &sample(texts, rng), ad)?;
        pb.set_message(format!("{bits:.3} bits/byte"));
        let warm = ((step + 1) as f64 / 50.0).min(1.0);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(3e-3 * warm, model, grads);
        pb.inc(1);
    }
    pb.finish();
    Ok(model)
}
