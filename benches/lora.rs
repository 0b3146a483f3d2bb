//! Criterion benchmarks of LoRA layers against the plain Linear they adapt (Flex, f32).

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use modula::prelude::*;

fn bench_lora(c: &mut Criterion) {
    let device = Device::flex();
    let (d, tokens) = (1024, 1024);
    let linear = LinearConfig::new(d, d).init(&device).no_grad();
    let x = Tensor::<2>::random([tokens, d], Distribution::Default, &device);
    let mut lora = LoraLinear::new(linear.clone());
    let a = Tensor::<2>::random([d, 8], Distribution::Default, &device);
    let b = Tensor::<2>::random([8, d], Distribution::Default, &device);
    lora.insert_adapter(
        "r8",
        LoraModule::from_factors(a, b, 16.0, false, 0.0).unwrap(),
    )
    .unwrap();
    let mut merged = lora.clone();
    merged.merge("r8").unwrap();
    let sync = || device.sync().unwrap();

    let mut g = c.benchmark_group("lora_1024x1024_1024tok");
    g.sample_size(20);
    g.bench_function("linear_fwd", |bch| {
        bch.iter(|| {
            let y = linear.forward(x.clone());
            sync();
            y
        })
    });
    g.bench_function("lora_r8_fwd", |bch| {
        bch.iter(|| {
            let y = lora.forward(x.clone()).unwrap();
            sync();
            y
        })
    });
    g.bench_function("lora_r8_merged_fwd", |bch| {
        bch.iter(|| {
            let y = merged.forward(x.clone()).unwrap();
            sync();
            y
        })
    });
    g.bench_function("lora_r8_merge_unmerge", |bch| {
        bch.iter(|| {
            let mut l = lora.clone();
            l.merge("r8").unwrap();
            l.unmerge("r8").unwrap();
            sync();
            l
        })
    });
    g.finish();
}

/// LoHa, LoKr and a 1 % sparse delta on a 1024 × 1024 layer: the thin forwards against forming
/// the dense delta on every call (what PEFT's LoHa and LoKr layers do).
fn bench_structured_deltas(c: &mut Criterion) {
    use modula::{LohaModule, LokrModule, LokrShape, SparseDelta};
    let device = Device::flex();
    let (d, tokens) = (1024, 1024);
    let x = Tensor::<2>::random([tokens, d], Distribution::Default, &device);
    let u = |r: usize, c: usize| {
        Tensor::<2>::random([r, c], Distribution::Uniform(-0.05, 0.05), &device)
    };
    let loha = LohaModule::from_factors(u(d, 8), u(8, d), u(d, 8), u(8, d), 16.0).unwrap();
    let mut lokr = LokrModule::new(d, d, LokrShape::new(8), &device).unwrap();
    if let modula::KronFactor::Full(w) = &mut lokr.w1 {
        *w = burn::module::Param::from_tensor(u(32, 32));
    }
    let k = d * d / 100;
    let positions: Vec<i64> = (0..k as i64).map(|i| i * 100 + (i % 97)).collect();
    let sparse = SparseDelta::new(&positions, u(1, k).reshape([k]), d, d).unwrap();
    let sync = || device.sync().unwrap();
    let mut g = c.benchmark_group("structured_deltas_1024x1024_1024tok");
    g.sample_size(10);
    g.bench_function("loha_r8_thin", |b| {
        b.iter(|| {
            let y = loha.delta_forward(x.clone());
            sync();
            y
        })
    });
    g.bench_function("loha_r8_dense_delta", |b| {
        b.iter(|| {
            let y = x.clone().matmul(loha.delta_weight());
            sync();
            y
        })
    });
    g.bench_function("lokr_r8_thin", |b| {
        b.iter(|| {
            let y = lokr.delta_forward(x.clone());
            sync();
            y
        })
    });
    g.bench_function("lokr_r8_dense_delta", |b| {
        b.iter(|| {
            let y = x.clone().matmul(lokr.delta_weight());
            sync();
            y
        })
    });
    g.bench_function("sparse_1pct_thin", |b| {
        b.iter(|| {
            let y = sparse.forward_thin(x.clone());
            sync();
            y
        })
    });
    g.bench_function("sparse_1pct_dense_delta", |b| {
        b.iter(|| {
            let y = x.clone().matmul(sparse.to_dense());
            sync();
            y
        })
    });
    g.finish();
}

criterion_group!(benches, bench_lora, bench_structured_deltas);
criterion_main!(benches);
