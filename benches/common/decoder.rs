//! The decoder the benches share: a random Llama of the peers' section-h shape scaled down
//! (d = 256, 4 layers, 8 heads over 2 key/value heads, vocab 8,000), and 4 prompts of 64 tokens.

use burn::tensor::{Device, Int, Tensor, TensorData};
use modula::models::{DecoderConfig, LlamaForCausalLm};

/// The model and the prompts `[4, 64]`.
pub fn model_and_prompts(device: &Device) -> (LlamaForCausalLm, Tensor<2, Int>) {
    let config = DecoderConfig::from_json(
        r#"{"model_type": "llama", "vocab_size": 8000, "hidden_size": 256,
            "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": 2, "max_position_embeddings": 2048}"#,
        "bench config",
    )
    .expect("a valid config");
    let model = LlamaForCausalLm::random(&config, 0, device).expect("random weights");
    let (b, p) = (4, 64);
    let ids: Vec<i64> = (0..b * p).map(|i| (3 + i * 7919 % 7990) as i64).collect();
    let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [b * p]), device).reshape([b, p]);
    (model, ids)
}
