//! Criterion benchmarks of the Llama-family decoder (a random model of the peers' section-h
//! shape, scaled down to d = 256, 4 layers, vocab 8,000 so a run stays short): a prefill of 4
//! prompts of 64 tokens, one cached decoding step for 4 sequences, the same step with a
//! different LoRA per sequence, and with Arrow routing every token over the 4 LoRAs (top 2)
//! in every adapted layer.

#[path = "common/decoder.rs"]
mod decoder;

use burn::tensor::{Device, Int, Tensor, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::LoraConfig;
use modula::models::{ArrowOptions, KvCache, LinearLayers, route_arrow};

fn bench_decoder(c: &mut Criterion) {
    let device = Device::flex();
    let (mut model, ids) = decoder::model_and_prompts(&device);
    let b = ids.dims()[0];
    let step =
        Tensor::<1, Int>::from_data(TensorData::new(vec![5i64; b], [b]), &device).reshape([b, 1]);
    let mut g = c.benchmark_group("decoder");
    g.sample_size(10);
    g.bench_function("prefill_4x64", |bench| {
        bench.iter(|| model.forward(ids.clone()).unwrap())
    });
    let mut prompt_cache = KvCache::new();
    model
        .forward_cached(ids.clone(), None, None, &mut prompt_cache, true)
        .unwrap();
    g.bench_function("decode_step_4_seqs", |bench| {
        bench.iter(|| {
            let mut cache = prompt_cache.clone();
            model
                .forward_cached(step.clone(), None, None, &mut cache, true)
                .unwrap()
        })
    });
    let names: Vec<String> = (0..b).map(|i| format!("a{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        device.seed(i as u64);
        model
            .add_lora(name, &LoraConfig::new(8), &|p| p.contains("self_attn"))
            .unwrap();
    }
    let per_seq: Vec<Option<&str>> = names.iter().map(|n| Some(n.as_str())).collect();
    g.bench_function("decode_step_4_seqs_4_loras", |bench| {
        bench.iter(|| {
            let mut cache = prompt_cache.clone();
            model
                .forward_cached(step.clone(), None, Some(&per_seq), &mut cache, true)
                .unwrap()
        })
    });
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let options = ArrowOptions {
        top_k: 2,
        ..ArrowOptions::default()
    };
    route_arrow(&mut model, &refs, &options, None).unwrap();
    g.bench_function("decode_step_4_seqs_arrow_top2_of_4", |bench| {
        bench.iter(|| {
            let mut cache = prompt_cache.clone();
            model
                .forward_cached(step.clone(), None, None, &mut cache, true)
                .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench_decoder);
criterion_main!(benches);
